"""spike_guard: the recommended defence, one transform in front of any optimizer."""

from __future__ import annotations

import chex
import optax

from optax_logdamp._statistics import SIGNALS, Signal, check_exponent, make_rule, signal_transform

EXPONENT = 2.0
"""A capped step's factor is ``(t / G) ** EXPONENT``: a step far above the threshold
counts for less than a threshold-sized one."""


def spike_guard(
    *,
    num_stddev: chex.Numeric = 3.0,
    signal: Signal = "grad_norm",
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The recommended defence against spikes, as one transform in front of any optimizer.

    ``optax.chain(spike_guard(), optax.adamw(...))``: the global L2 norm :math:`G` of each
    step's gradient is judged against its running mean :math:`\mu` and standard
    deviation :math:`\sigma` (:func:`alrc` on the gradient norm), and a step above the
    threshold :math:`t = \mu + n\sigma` is scaled down:

    .. math::
      u \leftarrow u \cdot \min\left(1, \frac{t}{G}\right)^2 .

    The square makes a step far above the threshold count for less than a
    threshold-sized one (a bad batch's gradient points the wrong way, not only too far).
    The statistics start from the data (no scale to guess, whatever the units of the
    loss) and fold in the capped norm, so a spike does not raise the threshold that
    judges the next one. A step whose gradient is not finite is zeroed and leaves the
    statistics unchanged. It needs no loss; with ``signal="both"`` it also caps the loss,
    given as ``tx.update(..., value=loss)``, and applies the smaller factor.

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
      >>> updates["w"]  # norm 144x its threshold (4x its mean in warm-up): factor 144**-2
      Array([-4.7999531e-08,  1.4399859e-07, -4.7999529e-05], dtype=float32)
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
    rule = make_rule(num_stddev, 0.999, None, None, 20)
    return signal_transform(
        "spike_guard", "grad_norm", rule, signal, check_exponent(EXPONENT), axis_name
    )
