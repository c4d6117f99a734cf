"""spike_guard: the recommended defence, one transform in front of any optimizer."""

from __future__ import annotations

import chex
import optax

from optax_logdamp._statistics import SIGNALS, Signal, make_rule, signal_transform


def spike_guard(
    *,
    num_stddev: chex.Numeric = 3.0,
    signal: Signal = "grad_norm",
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The recommended defence against spikes, as one transform in front of any optimizer.

    ``optax.chain(spike_guard(), optax.adamw(...))``: the global L2 norm :math:`G` of each
    step's gradient is judged against its running mean :math:`\mu` and standard
    deviation :math:`\sigma`, and a step above the threshold :math:`t = \mu + n\sigma` is
    scaled down to it, ALRC's rule (Ede & Beanland) on the gradient norm:

    .. math::
      u \leftarrow u \cdot \min\left(1, \frac{t}{G}\right).

    The statistics start from the data (no scale to guess, whatever the units of the
    loss) and fold in the capped norm, so a spike does not raise the threshold that
    judges the next one. A step whose gradient is not finite is zeroed and leaves the
    statistics unchanged. It needs no loss; with ``signal="both"`` it also caps the loss,
    given as ``tx.update(..., value=loss)``, and applies the smaller factor. It is
    :func:`alrc` with ``signal="grad_norm"`` and its defaults: the one setting that
    measured best (:doc:`the benchmarks </benchmarks/index>`).

    Args:
      num_stddev: :math:`n > 0`, how many standard deviations above the mean to cap.
      signal: ``"grad_norm"`` (needs no ``value`` and ignores it), ``"both"`` or
        ``"loss"`` (need the loss as ``value``; see :func:`alrc`).
      axis_name: the ``pmap``/``shard_map`` axis over which to average the statistics,
        so that every replica takes the same decision.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is an
      :class:`ALRCSignalsState` (an :class:`ALRCState` for ``signal="loss"``).

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
      >>> updates["w"]  # norm 144x its threshold (4x its mean in warm-up): factor 1 / 144
      Array([-6.9281696e-06,  2.0784508e-05, -6.9281692e-03], dtype=float32)
      >>> optax.tree.get(state, "num_clipped")
      Array(1, dtype=int32)

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, 2020.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}.")
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a string or None, got {axis_name!r}.")
    # alrc's defaults: statistics from the data, decay 0.999, a 20-step warm-up.
    rule = make_rule(num_stddev, decay=0.999, mu1_init=None, mu2_init=None, warmup_steps=20)
    return signal_transform("spike_guard", "grad_norm", rule, signal, axis_name)
