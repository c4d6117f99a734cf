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
    _init_state,
    _make_rule,
    _zero_if_skipped,
    cap_signals,
    scalar_loss,
)
from optax_logdamp._dampening import LogDampenState, dampen_at_knees, init_knees
from optax_logdamp._docs import document_fields
from optax_logdamp._numerics import norm_of_sums, sum_of_squares
from optax_logdamp._validation import (
    check_inexact_leaves,
    check_not_half_precision,
    check_open_unit_interval,
    check_params_match,
    check_positive,
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
    knee: chex.Numeric | None = 3.0,
    decay: chex.Numeric = 0.999,
    knee_decay: chex.Numeric = 0.999,
    warmup_steps: int = 20,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The recommended defence against spikes, as one transform in front of any optimizer.

    ``optax.chain(spike_guard(), optax.adamw(...))`` equals
    ``optax.chain(alrc(signal="grad_norm"), log_dampen("auto"), optax.adamw(...))``
    (see the note below) at the cost of one reduction per tensor. First the global norm
    :math:`G` of the updates is capped at its running mean + :math:`n` standard
    deviations (:func:`alrc`), then each tensor :math:`T` is dampened at a knee
    :math:`s_T` of ``knee`` times its running RMS (:func:`log_dampen` with ``"auto"``):

    .. math::
      f = \min(1, t_G / G), \qquad
      u \leftarrow s_T \operatorname{sign}(u) \log\left(1 + \frac{f |u|}{s_T}\right),

    where the knee's statistic of the capped update is taken from the raw one,
    :math:`\log\operatorname{mean}_T((f u)^2) = 2 \log f + \log\operatorname{mean}_T(u^2)`.
    Non-finite input zeroes the step and leaves every statistic unchanged.

    Note: the ALRC statistics are those of the chain bit for bit; a tensor's log mean
    square can differ from the chain's in its last bits on a capped step (the chain
    squares the rounded capped updates), so the knee, a power of two, is the chain's
    except within a few ulp of a rounding boundary.

    Args:
      num_stddev: :math:`n > 0`, how many standard deviations above the mean to cap.
      signal: ``"grad_norm"`` (needs no ``value`` and ignores it), ``"loss"`` or
        ``"both"`` (need the loss as ``value``; see :func:`alrc`).
      knee: the knee in units of each tensor's running RMS, ``> 0``; ``None``: no
        dampening (ALRC alone).
      decay: :math:`\beta \in (0, 1)` of ALRC's moving averages.
      knee_decay: :math:`\in (0, 1)`, the decay of each tensor's running mean square.
      warmup_steps: ALRC's warm-up, an integer ``>= 0``.
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
      >>> updates["w"]  # norm capped at 4x its mean (warm-up), then knee 2**-8
      Array([-6.9220328e-06,  2.0729407e-05, -3.9849617e-03], dtype=float32)
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
    rule = _make_rule(num_stddev, decay, None, None, warmup_steps)
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
        factor, finite, states = cap_signals(rule, statistics, states, axis_name)
        capped = _zero_if_skipped(updates, finite, factor)
        knee_state: Any = state.knee
        if knee is not None:
            log_steps = treedef.unflatten(
                [
                    _log_mean_square(s, g.size, factor, finite)
                    for s, g in zip(sums, leaves, strict=True)
                ]
            )
            capped, knee_state = dampen_at_knees(capped, state.knee, log_steps, knee, knee_decay)
        new_state = SpikeGuardState(
            loss=states.get("loss", optax.EmptyState()),
            grad_norm=states.get("grad_norm", optax.EmptyState()),
            knee=knee_state,
        )
        return capped, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
