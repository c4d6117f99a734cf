"""spike_guard: the recommended defence (gradient-norm ALRC, then the auto knee) fused."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_logdamp._alrc import (
    SIGNALS,
    ALRCState,
    Signal,
    _check_exponent,
    _init_state,
    _make_rule,
    _zero_if_skipped,
    average_signals,
    cap_signals,
    scalar_loss,
)
from optax_logdamp._dampening import (
    Curve,
    LogDampenState,
    _check_curve,
    dampen_at_knees,
    default_curve,
    init_knees,
)
from optax_logdamp._docs import document_fields
from optax_logdamp._numerics import norm_of_sums, sum_of_squares
from optax_logdamp._validation import (
    as_float,
    check_inexact_leaves,
    check_not_half_precision,
    check_open_unit_interval,
    check_params_match,
    check_positive,
    check_scalar,
    check_state_type,
)


@document_fields
class SpikeGuardState(NamedTuple):
    """State of :func:`spike_guard`: ALRC's statistics per signal and the tensors' knees.

    Attributes:
      loss: the :class:`ALRCState` of the loss (``signal="loss"`` or ``"both"``), or
        ``optax.EmptyState()``.
      grad_norm: the :class:`ALRCState` of the global gradient norm (``"grad_norm"``
        or ``"both"``), or ``optax.EmptyState()``.
      knee: the :class:`LogDampenState` of the per-tensor knees, or
        ``optax.EmptyState()`` when ``knee=None``.
    """

    loss: ALRCState | optax.EmptyState
    grad_norm: ALRCState | optax.EmptyState
    knee: LogDampenState | optax.EmptyState


def spike_guard(
    *,
    num_stddev: chex.Numeric = 3.0,
    signal: Signal = "grad_norm",
    knee: chex.Numeric | None = 30.0,
    exponent: chex.Numeric = 2.0,
    curve: Curve = "linlog",
    decay: chex.Numeric = 0.999,
    knee_decay: chex.Numeric = 0.999,
    warmup_steps: int = 20,
    normalize_steps: int = 0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The recommended defence against spikes, as one transform in front of any optimizer.

    ``optax.chain(spike_guard(), optax.adamw(...))``: first the global norm :math:`G` of
    the updates is judged against its running mean + :math:`n` standard deviations
    :math:`t_G` (:func:`alrc` on the gradient norm), and a step above it is scaled by
    :math:`(t_G / G)^p`, so that a step far above the threshold counts for less than a
    threshold-sized one (``exponent`` :math:`p = 2`). Then each tensor :math:`T` is
    dampened above a knee :math:`s_T` of ``knee`` times its running RMS
    (:func:`log_dampen` with ``"auto"``), on the ``"linlog"`` curve: the identity below
    the knee, logarithmic above it:

    .. math::
      f = \min\left(1, \frac{t_G}{G}\right)^p, \qquad
      u \leftarrow \operatorname{sign}(u)\, \phi_{s_T}(f |u|), \qquad
      \phi_s(m) = \begin{cases} m & m \le s \\ s (1 + \log(m / s)) & m > s \end{cases}

    One sum of squares per tensor serves both (the knee's statistic of the capped update
    is :math:`2 \log f` plus that of the raw one). Non-finite input zeroes the step and
    leaves every statistic unchanged. ``knee=3, exponent=1, curve="log1p"`` is
    ``optax.chain(alrc(signal="grad_norm"), log_dampen("auto", curve="log1p"))``, to a
    few ulp of the knees' statistics. Why these defaults, with the numbers:
    :doc:`the guide </guide/choosing>`.

    Args:
      num_stddev: :math:`n > 0`, how many standard deviations above the mean to cap.
      signal: ``"grad_norm"`` (needs no ``value`` and ignores it), ``"loss"`` or
        ``"both"`` (need the loss as ``value``; see :func:`alrc`).
      knee: the knee in units of each tensor's running RMS, ``> 0`` (30: only elements
        far outside the tensor's usual range are bent; at 3 heavy-tailed gradients lost
        accuracy); ``None``: no dampening (ALRC alone).
      exponent: :math:`p \ge 1`, how fast the factor of a step above the threshold
        falls (1: the paper's cap at the threshold).
      curve: ``"linlog"`` (the identity below the knee) or ``"log1p"`` (the seed's
        :math:`s \log(1 + m / s)`, which bends every element).
      decay: :math:`\beta \in (0, 1)` of ALRC's moving averages.
      knee_decay: :math:`\in (0, 1)`, the decay of each tensor's running mean square.
      warmup_steps: ALRC's warm-up, an integer ``>= 0``.
      normalize_steps: for this many steps from the start, also rescale each step
        toward the running mean :math:`\mu_G` of the norm, by
        :math:`\min(1 + n, \mu_G / G)^{1 - k / K}` at step :math:`k < K`: fully at
        first, fading out by step :math:`K`. A unit-free stand-in for what a fixed
        clip does early in training. 0 (the default): never. Needs the norm as a
        signal.
      axis_name: the ``pmap``/``shard_map`` axis over which ALRC averages its signals.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SpikeGuardState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import spike_guard
      >>> tx = optax.chain(spike_guard(), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> for _ in range(10):
      ...   _, state = tx.update({"w": jnp.full(3, 1e-3)}, state, params)
      >>> updates, state = tx.update({"w": jnp.array([1e-3, -3e-3, 1.0])}, state, params)
      >>> updates["w"]  # norm 144x its threshold (4x its mean in warm-up): factor 144**-2
      Array([-4.7999531e-08,  1.4399859e-07, -4.7999529e-05], dtype=float32)
      >>> optax.tree.get(state, "num_clipped")
      Array(1, dtype=int32)

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, 2020. D. MacDonald, `A
      Magnetosphere for Neural Networks: the LogAdam optimizer
      <https://torontoai.org/2018/03/31/a-magnetosphere-for-neural-networks/>`_, 2018.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}.")
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a string or None, got {axis_name!r}.")
    normalizing = _check_normalize_steps(normalize_steps, signal)
    rule = _make_rule(num_stddev, decay, None, None, warmup_steps)
    power = _check_exponent(exponent)
    _check_curve(curve)
    curve = default_curve("auto", curve)  # None: an automatic knee's default, linlog
    if knee is not None:
        check_positive("knee", knee)
        check_not_half_precision("knee_decay", knee_decay)
        check_open_unit_interval("knee_decay", knee_decay)
    uses_loss = signal in ("loss", "both")
    uses_norm = signal in ("grad_norm", "both")

    def init_fn(params):
        return SpikeGuardState(
            loss=_init_state(rule, None, None) if uses_loss else optax.EmptyState(),
            grad_norm=_init_state(rule, None, None) if uses_norm else optax.EmptyState(),
            knee=init_knees(params) if knee is not None else optax.EmptyState(),
        )

    transform = "spike_guard" if signal == "loss" else f'spike_guard(signal="{signal}")'

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        check_params_match("spike_guard", updates, params)
        check_state_type("spike_guard", state, SpikeGuardState)
        check_inexact_leaves("spike_guard", updates)
        leaves, treedef = jax.tree.flatten(updates)
        sums = [sum_of_squares(g) for g in leaves]  # once, for the norm and the knees
        statistics, states = {}, {}
        if uses_loss:
            statistics["loss"] = scalar_loss(transform, value)
            states["loss"] = state.loss
        if uses_norm:
            statistics["grad_norm"] = norm_of_sums(sums)
            states["grad_norm"] = state.grad_norm
        statistics = average_signals(statistics, axis_name)  # for the caps and the gain
        factor, finite, states = cap_signals(rule, statistics, states, power)
        if normalizing:
            factor = factor * _gain(
                rule, statistics["grad_norm"], state.grad_norm, states["grad_norm"], normalize_steps
            )
        capped = _zero_if_skipped(updates, finite, factor)
        knee_state: Any = state.knee
        if knee is not None:
            log_steps = treedef.unflatten(
                [
                    _log_mean_square(s, g.size, factor, finite)
                    for s, g in zip(sums, leaves, strict=True)
                ]
            )
            capped, knee_state = dampen_at_knees(
                capped, state.knee, log_steps, knee, knee_decay, curve
            )
        new_state = SpikeGuardState(
            loss=states.get("loss", optax.EmptyState()),
            grad_norm=states.get("grad_norm", optax.EmptyState()),
            knee=knee_state,
        )
        return capped, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_normalize_steps(normalize_steps: Any, signal: str) -> bool:
    """Validates ``normalize_steps``; whether the gain is computed at all.

    A concrete 0 leaves the step bitwise as without it. A traced value (under
    ``optax.inject_hyperparams``) is checked where it is concrete, at ``init``, so it
    can only be > 0 with the norm as a signal.
    """
    if isinstance(normalize_steps, bool):
        raise TypeError(f"normalize_steps must be an integer >= 0, got {normalize_steps!r}.")
    check_scalar("normalize_steps", normalize_steps)
    steps = as_float(normalize_steps)
    if steps is not None and not (steps >= 0 and steps == int(steps)):
        raise ValueError(f"normalize_steps must be an integer >= 0, got {normalize_steps!r}.")
    if steps is not None and steps > 0 and signal == "loss":
        raise ValueError(
            "normalize_steps > 0 rescales toward the running mean of the gradient norm: it "
            'needs signal="grad_norm" or signal="both", got signal="loss".'
        )
    return signal != "loss" and (steps is None or steps > 0)


def _gain(
    rule,
    norm: jax.Array,
    before: ALRCState,
    after: ALRCState,
    num_steps: Any,
) -> jax.Array:
    """``normalize_steps``' factor ``min(1 + n, mean / norm) ** (1 - k / K)`` at step ``k < K``.

    ``after`` is the state just folded, so its mean includes this step's (capped) norm:
    the first step's factor is exactly 1. ``k`` counts the finite steps before this
    one (``before.num_steps``). 1 from step ``K`` on, and where the norm is 0 or not
    finite. ``norm`` is the step's statistic, averaged over the data-parallel axis.
    """
    num_steps = jnp.asarray(num_steps, jnp.float32)
    weight = jnp.where(
        num_steps > 0, 1 - before.num_steps.astype(jnp.float32) / jnp.maximum(num_steps, 1), 0.0
    )
    usable = jnp.isfinite(norm) & (norm > 0) & jnp.isfinite(after.mean) & (weight > 0)
    ratio = jnp.clip(after.mean / jnp.where(usable, norm, 1.0), 0.0, 1 + rule.num_stddev)
    return jnp.where(usable, jnp.where(weight < 1, ratio**weight, ratio), 1.0)


def _log_mean_square(
    sum_of_squares: jax.Array, size: int, factor: jax.Array, finite: jax.Array
) -> jax.Array:
    """``log(mean((factor * g)**2))`` from ``g``'s sum of squares; ``-inf`` for a zeroed step.

    ``2 log(factor) + log(mean(g**2))``: ``-inf`` (not folded) when the factor is 0 or
    ``g`` all zero, as the chain's all-zero updates are; a skipped step is ``-inf`` too.
    At ``factor == 1`` it is the chain's value bit for bit.
    """
    mean_square = (sum_of_squares / max(size, 1)).astype(jnp.float32)
    log_step = 2 * jnp.log(factor) + jnp.log(mean_square)
    return jnp.where(finite, log_step, -jnp.inf)
