"""The anchors: defences users would pick instead of this package, as Optax transforms.

One definition of each, shared by every benchmark script (``spike_benchmark.py`` on
digits, ``lm_spike_benchmark.py`` on a byte-level language model) and pinned by
``tests/test_anchors.py``:

- :func:`zclip`: ZClip's z-score clipping of the global gradient norm (Kumar et al.,
  2025, https://github.com/bluorion-com/ZClip), ``zscore`` mode with its
  ``adaptive_scaling`` clip;
- :func:`skip_step_on_spikes`: the skip-step rule of Levanter's ``SkipStepConfig`` and
  MaxText's ``skip_step_on_spikes``.

``optax.clip_by_global_norm`` and ``optax.adaptive_grad_clip`` are Optax's own and are
used as they are. :func:`count_interventions` reads how often any defence (these
anchors or this package's ALRC) acted, from a final optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optax_logdamp as old


class ZClipState(NamedTuple):
    """State of :func:`zclip`: running statistics of the global gradient norm."""

    count: jax.Array  # shape=(), int32: norms seen
    mean: jax.Array  # shape=(), float32: EMA (exact mean during warm-up) of the norm
    var: jax.Array  # shape=(), float32: EMA (exact variance during warm-up) of the norm
    num_clipped: jax.Array  # shape=(), int32: steps clipped


def zclip(
    alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6
) -> optax.GradientTransformation:
    """ZClip-style z-score clipping of the global gradient norm (Kumar et al., 2025).

    The first ``warmup_steps`` norms set the mean and variance exactly, unclipped.
    Afterwards a norm with z-score ``z = (norm - mean) / std > z_threshold`` is
    rescaled to ``mean + (z_threshold**2 / z) * std`` (ZClip's "adaptive scaling"),
    and the statistics are updated with the (clipped) norm as ZClip does:
    ``mean <- alpha*mean + (1-alpha)*norm``, ``var <- alpha*var + (1-alpha)*(norm-mean)**2``.

    Args:
      alpha: EMA decay of the statistics.
      z_threshold: z-score above which the gradient is clipped.
      warmup_steps: steps whose norms initialise the statistics.
      eps: added to the standard deviation.

    Returns:
      An :class:`optax.GradientTransformation`.
    """

    def init_fn(params):
        del params
        zero, zero_int = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)
        return ZClipState(zero_int, zero, zero, zero_int)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates).astype(jnp.float32)
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        in_warmup = state.count < warmup_steps
        clip = (~in_warmup) & (z > z_threshold)
        threshold = state.mean + z_threshold**2 / jnp.where(clip, z, 1.0) * std
        clipped_norm = jnp.where(clip, threshold, norm)
        scale = jnp.where(clip, threshold / jnp.where(clip, norm, 1.0), 1.0)
        # warm-up: Welford's exact mean and population variance of the first norms
        n = state.count.astype(jnp.float32)
        warm_mean = state.mean + (norm - state.mean) / (n + 1)
        warm_var = (n * state.var + (norm - state.mean) * (norm - warm_mean)) / (n + 1)
        ema_mean = alpha * state.mean + (1 - alpha) * clipped_norm
        ema_var = alpha * state.var + (1 - alpha) * jnp.square(clipped_norm - ema_mean)
        new_state = ZClipState(
            count=optax.safe_increment(state.count),
            mean=jnp.where(in_warmup, warm_mean, ema_mean),
            var=jnp.where(in_warmup, warm_var, ema_var),
            num_clipped=state.num_clipped + clip.astype(jnp.int32),
        )
        updates = jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


class SkipStepState(NamedTuple):
    """State of :func:`skip_step_on_spikes`: the inner state and windows of history."""

    inner: Any
    losses: jax.Array  # shape=(window,), float32: last losses (ring buffer)
    grad_norms: jax.Array  # shape=(window,), float32: last global gradient norms
    count: jax.Array  # shape=(), int32: steps seen
    num_skipped: jax.Array  # shape=(), int32


def _band(history: jax.Array, valid: jax.Array, num_stddev: float) -> jax.Array:
    """``mean + num_stddev * std`` of the valid entries (std at least 1e-6)."""
    mean = jnp.mean(history, where=valid)
    std = jnp.maximum(jnp.std(history, where=valid), 1e-6)
    return mean + num_stddev * std


def skip_step_on_spikes(
    inner: optax.GradientTransformation, window: int = 128, num_stddev: float = 6.0
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose loss or gradient norm exceeds its rolling mean + 6 std.

    The rule of Levanter's ``SkipStepConfig`` (after OLMo-core's ``SkipStepOptimizer``;
    MaxText's ``skip_step_on_spikes`` is alike): mean and standard deviation over the
    last ``window`` steps; once ``window // 2`` steps are known, a step whose loss or
    global gradient norm is above the band (or not finite) gets zero updates and leaves
    the inner optimizer's state untouched. Every step's loss and norm enter the
    window, skipped or not, as in Levanter.

    Args:
      inner: the optimizer whose steps may be skipped.
      window: how many past steps the statistics cover.
      num_stddev: the band's width in standard deviations.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` taking the loss as ``value``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero, history = jnp.zeros([], jnp.int32), jnp.zeros([window], jnp.float32)
        return SkipStepState(inner.init(params), history, history, zero, zero)

    def update_fn(updates, state, params=None, *, value, **extra_args):
        loss = jnp.asarray(value, jnp.float32)
        norm = optax.tree.norm(updates).astype(jnp.float32)
        valid = jnp.arange(window) < state.count
        spike = (loss > _band(state.losses, valid, num_stddev)) | (
            norm > _band(state.grad_norms, valid, num_stddev)
        )
        skip = ~jnp.isfinite(loss) | ((state.count >= window // 2) & spike)
        new_updates, new_inner = inner.update(
            updates, state.inner, params, value=value, **extra_args
        )
        updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        inner_state = jax.tree.map(lambda a, b: jnp.where(skip, a, b), state.inner, new_inner)
        slot = state.count % window
        new_state = SkipStepState(
            inner=inner_state,
            losses=state.losses.at[slot].set(loss),
            grad_norms=state.grad_norms.at[slot].set(norm),
            count=optax.safe_increment(state.count),
            num_skipped=state.num_skipped + skip.astype(jnp.int32),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def count_interventions(opt_state: Any) -> jax.Array:
    """Losses capped (ALRC), norms clipped (ZClip) or steps skipped in a final state; -1 if none.

    Found as the ``num_clipped`` / ``num_skipped`` fields of the states in the tree
    (for ``alrc_per_example`` these count examples, not steps).
    """
    counted = (old.ALRCState, ZClipState, SkipStepState)
    total = jnp.asarray(-1, jnp.int32)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, counted)):
        if isinstance(node, (old.ALRCState, ZClipState)):
            total = jnp.maximum(total, 0) + node.num_clipped
        elif isinstance(node, SkipStepState):
            total = jnp.maximum(total, 0) + node.num_skipped
    return total
