"""ALRC: adaptive learning rate clipping (Ede & Beanland), on the loss or the gradient norm.

The loss is capped at its running mean plus ``num_stddev`` standard deviations.
For a scalar loss, capping ``L`` at ``t`` by ``L / stop_gradient(L / t)`` multiplies
every gradient by ``t / L``, so batch-level ALRC is a gradient transformation that
receives the loss as ``value`` and scales the updates. Per-example ALRC (the paper's
own form for batches) caps each example inside the loss with :func:`cap_losses` and
then folds the capped losses into the same statistics in ``update``. The statistics
themselves are kept by :mod:`optax_logdamp._statistics`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_logdamp._docs import document_fields
from optax_logdamp._statistics import (
    SIGNALS,
    ALRCState,
    Signal,
    cap_and_fold,
    find_alrc_states,
    init_state,
    loss_scale,
    make_rule,
    signal_transform,
    zero_if_skipped,
)
from optax_logdamp._validation import (
    check_inexact_leaves,
    check_params_match,
    check_state_type,
    loss_array,
)


@document_fields
class ALRCPerExampleState(NamedTuple):
    """State of :func:`alrc_per_example`: the statistics of individual losses.

    Its type is what tells :func:`cap_losses` which statistics to cap examples with:
    those of individual losses, where the state of batch :func:`alrc` holds statistics
    of batch losses.

    Attributes:
      losses: the :class:`ALRCState` of the examples' losses, counted per example.
    """

    losses: ALRCState


def alrc(
    num_stddev: chex.Numeric = 3.0,
    decay: chex.Numeric = 0.999,
    *,
    signal: Signal = "loss",
    mu1_init: chex.Numeric | None = None,
    mu2_init: chex.Numeric | None = None,
    warmup_steps: int = 20,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive learning rate clipping: caps the loss (or the gradient norm) at mean + n std.

    A statistic :math:`x` of each step (the loss :math:`L` given as ``value``; with
    ``signal="grad_norm"`` the global L2 norm of the updates) is capped at the threshold
    :math:`t = \mu + n\sigma` of its running mean and variance, which scales the updates:

    .. math::
      u &\leftarrow u \cdot \min(1, t / x),

      \mu &\leftarrow \mu + a (x' - \mu), \qquad
      \sigma^2 \leftarrow (1 - a)\left(\sigma^2 + a (x' - \mu_{\mathrm{old}})^2\right),

    with :math:`x' = \min(x, t)` the capped statistic and, at the :math:`k`-th step,
    :math:`a = (1 - \beta) / (1 - \beta^k)` (bias-corrected: no scale to guess), or
    :math:`a = 1 - \beta` and :math:`t = \mu + n\sqrt{\sigma^2 + 10^{-8}}` from the
    paper's ``mu1_init`` and ``mu2_init``.
    ``signal="both"`` keeps both statistics and applies the smaller factor. Warm-up,
    non-finite input (the step is zeroed), signed losses, data parallelism and gradient
    accumulation: :doc:`the ALRC guide </guide/alrc>`.

    Args:
      num_stddev: :math:`n > 0`, how many standard deviations above the mean to cap.
      decay: :math:`\beta \in (0, 1)`, the decay of the moving averages.
      signal: ``"loss"`` (needs ``value``), ``"grad_norm"`` or ``"both"`` (needs ``value``).
      mu1_init: the paper's initial loss mean; give both inits or neither.
      mu2_init: the paper's initial second raw moment, ``> mu1_init**2``.
      warmup_steps: steps during which :math:`t \ge (1 + n)\mu` and a statistic below
        :math:`\mu / (1 + n)` restarts the statistics (from data only).
      axis_name: the ``pmap``/``shard_map`` axis over which to average the signals.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its state is an
      :class:`ALRCState` for ``signal="loss"`` and an :class:`ALRCSignalsState` otherwise.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import alrc
      >>> tx = optax.chain(alrc(), optax.sgd(0.1))
      >>> params = jnp.ones(2)
      >>> state = tx.init(params)
      >>> loss_fn = lambda p: jnp.sum(p ** 2)
      >>> for _ in range(3):
      ...   loss, grads = jax.value_and_grad(loss_fn)(params)
      ...   updates, state = tx.update(grads, state, params, value=loss)
      ...   params = optax.apply_updates(params, updates)
      >>> optax.tree.get(state, "num_steps")
      Array(3, dtype=int32)

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, Machine Learning: Science and
      Technology, 2020.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}.")
    if signal != "loss" and (mu1_init is not None or mu2_init is not None):
        raise ValueError(
            "mu1_init and mu2_init are the paper's guessed loss moments and apply to "
            f'signal="loss" only; signal={signal!r} starts its statistics from the data.'
        )
    rule = make_rule(num_stddev, decay, mu1_init, mu2_init, warmup_steps)
    return signal_transform("alrc", "loss", rule, signal, axis_name, mu1_init, mu2_init)


def alrc_per_example(
    num_stddev: chex.Numeric = 3.0,
    decay: chex.Numeric = 0.999,
    *,
    mu1_init: chex.Numeric | None = None,
    mu2_init: chex.Numeric | None = None,
    warmup_steps: int = 20,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Per-example ALRC, the paper's form for batches: each example's loss is capped.

    Inside the loss function, :func:`cap_losses` caps every example's loss
    :math:`L_i` at the threshold :math:`t = \mu + n\sigma` held in this transform's
    state. Then ``update`` receives the raw per-example losses as ``value`` (any shape:
    examples, or examples x tokens), caps them again and folds the mean :math:`m` and
    variance :math:`s^2` of the capped losses into the statistics:

    .. math::
      L'_i &= \min(L_i, t), \qquad m = \operatorname{mean}_i L'_i, \qquad
      s^2 = \operatorname{mean}_i (L'_i - m)^2,

      \mu &\leftarrow \mu + a (m - \mu), \qquad
      \sigma^2 \leftarrow (1 - a)\left(\sigma^2 + a (m - \mu_{\mathrm{old}})^2\right) + a s^2,

    the moments of individual losses, as the paper's batch means of :math:`L'` and
    :math:`L'^2`, with :math:`a` as in :func:`alrc`. The updates pass unchanged, or
    zeroed if a loss is not finite. More: :doc:`the per-example guide </guide/per_example>`.

    Args:
      num_stddev: :math:`n > 0`, how many standard deviations above the mean to cap.
      decay: :math:`\beta \in (0, 1)`, the decay of the moving averages.
      mu1_init: the paper's initial mean; give both inits or neither.
      mu2_init: the paper's initial second raw moment, ``> mu1_init**2``.
      warmup_steps: steps of warm-up when starting from data (ignored with inits).
      axis_name: the ``pmap``/``shard_map`` axis over which the batch is split.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes the
      per-example losses as ``value`` and whose state is an :class:`ALRCPerExampleState`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import alrc_per_example, cap_losses
      >>> tx = optax.chain(alrc_per_example(), optax.sgd(0.1))
      >>> params = jnp.ones(2)
      >>> opt_state = tx.init(params)
      >>> inputs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> def loss_fn(params, opt_state):
      ...   losses = (inputs @ params) ** 2              # one loss per example
      ...   return cap_losses(losses, opt_state).mean(), losses
      >>> (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      ...     params, opt_state)
      >>> updates, opt_state = tx.update(grads, opt_state, params, value=losses)
      >>> optax.tree.get(opt_state, "num_losses")
      Array(3, dtype=int32)

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, 2020; code at
      https://github.com/Jeffrey-Ede/ALRC.
    """
    rule = make_rule(num_stddev, decay, mu1_init, mu2_init, warmup_steps)

    def init_fn(params):
        del params
        return ALRCPerExampleState(losses=init_state(rule, mu1_init, mu2_init))

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        check_params_match("alrc_per_example", updates, params)
        check_inexact_leaves("alrc_per_example", updates)
        check_state_type("alrc_per_example", state, ALRCPerExampleState)
        losses = loss_array("alrc_per_example", value).astype(jnp.float32)
        if losses.ndim == 0:
            raise ValueError(
                "alrc_per_example expects value to be the per-example losses, shape (batch,) "
                "or (batch, ...), got a scalar. Return them from the loss function before the "
                "mean (as has_aux) and pass value=losses; for the scalar loss of the batch, "
                "use alrc()."
            )
        if losses.size == 0:
            raise ValueError("alrc_per_example: value holds no losses (size 0).")
        _, finite, stats = cap_and_fold(rule, state.losses, losses, axis_name=axis_name)
        return zero_if_skipped(updates, finite), ALRCPerExampleState(losses=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cap_losses(losses: jax.Array, state: Any) -> jax.Array:
    r"""Caps each loss at the ALRC threshold, for use inside the loss function.

    With :math:`t` the threshold of the :func:`alrc_per_example` state and
    :math:`\mathrm{sg}` the stop gradient, each element :math:`L` becomes

    .. math::
      L \cdot \mathrm{sg}(\min(1, t / L)):

    the value is :math:`\min(L, t)` (for positive losses) and the gradient of a capped
    loss is scaled by :math:`t / L`. Losses below the threshold, and all losses
    before the first step when the statistics start from data, are unchanged.

    Args:
      losses: per-example (or per-token) losses, any shape.
      state: an optimizer state holding exactly one :class:`ALRCPerExampleState`
        (found anywhere inside: chain, ``inject_hyperparams``, ``MultiSteps``; the states
        of batch :func:`alrc` are not counted, and a tree with only those is refused),
        that state itself, or the threshold as an array.

    Returns:
      The capped losses, same shape and dtype as ``losses``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import alrc_per_example, cap_losses
      >>> tx = optax.chain(alrc_per_example(mu1_init=1.0, mu2_init=1.25), optax.sgd(0.1))
      >>> opt_state = tx.init(jnp.zeros(2))  # the paper's inits: t = 1 + 3 * 0.5
      >>> cap_losses(jnp.array([1.0, 2.0, 10.0]), opt_state)
      Array([1. , 2. , 2.5], dtype=float32)

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, 2020.
    """
    if isinstance(state, (jax.Array, np.ndarray, np.number, float, int)):
        threshold = jnp.asarray(state, jnp.float32)
    else:
        threshold = _per_example_state(state).losses.threshold
    losses = jnp.asarray(losses)
    scale, _ = loss_scale(losses.astype(jnp.float32), threshold)
    return losses * scale.astype(losses.dtype)


def _per_example_state(tree: Any) -> ALRCPerExampleState:
    """The one :class:`ALRCPerExampleState` in ``tree``, or an error that says what to build."""
    is_per_example = lambda node: isinstance(node, ALRCPerExampleState)  # noqa: E731
    nodes = jax.tree.leaves(tree, is_leaf=is_per_example)
    per_example = [node for node in nodes if is_per_example(node)]
    found = find_alrc_states(tree)
    if len(per_example) == 1:
        return per_example[0]
    explicit = "To cap at a threshold of your own, pass it: cap_losses(losses, threshold)."
    if len(per_example) > 1:
        raise ValueError(
            "cap_losses needs exactly one ALRCPerExampleState (the state of "
            f"alrc_per_example()) in the optimizer state, found {len(per_example)}. "
            "Pass the one to use (e.g. opt_state[0]), or its threshold. " + explicit
        )
    if found:
        raise ValueError(
            "cap_losses needs the state of alrc_per_example() (an ALRCPerExampleState, "
            "statistics of individual losses); this optimizer state holds only the state of "
            "batch alrc(), whose statistics are of batch losses and which scales the whole "
            "step in update. Build the optimizer with alrc_per_example() to cap each example "
            "(optax.chain(alrc_per_example(), optax.adam(lr))), or keep alrc() and do not "
            "call cap_losses. " + explicit
        )
    raise ValueError(
        "cap_losses found no ALRCPerExampleState in the optimizer state: build the optimizer "
        "with alrc_per_example(), e.g. optax.chain(alrc_per_example(), optax.adam(lr)). " + explicit
    )
