"""The anchors: defences users would pick instead of this package, as Optax transforms.

One definition of each, shared by every benchmark script (``spike_benchmark.py`` on
digits, ``lm_spike_benchmark.py`` on a byte-level language model) and pinned by
``tests/test_anchors.py``:

- :func:`zclip`: ZClip's z-score clipping of the global gradient norm (Kumar et al.,
  2025, https://github.com/bluorion-com/ZClip), ``zscore`` mode with its
  ``adaptive_scaling`` clip;
- :func:`skip_step_on_spikes`: the skip-step rule of Levanter's ``SkipStepConfig`` and
  MaxText's ``skip_step_on_spikes``;
- :func:`adagc`: AdaGC's per-tensor adaptive clipping (Wang et al., 2025,
  arXiv 2502.11034);
- :func:`update_clipping`: StableAdamW's update clipping (Wortsman et al., 2023,
  arXiv 2304.13013), each tensor's learning rate divided by ``max(1, RMS(g**2 / v_hat))``;
- :func:`spam`: SPAM's spike-aware clipping and momentum reset (Huang et al., ICLR
  2025, arXiv 2501.06842).

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


class AdaGCState(NamedTuple):
    """State of :func:`adagc`: each tensor's EMA of its clipped gradient norms."""

    count: jax.Array  # shape=(), int32: steps seen
    norm_ema: Any  # like the updates, one float32 scalar per tensor (+inf before any)
    num_clipped: jax.Array  # shape=(), int32: steps where some tensor was clipped


def adagc(
    relative: float = 1.05, decay: float = 0.98, absolute: float = 1.0, warmup_steps: int = 100
) -> optax.GradientTransformation:
    """AdaGC: each tensor's gradient norm clipped to ``relative`` x an EMA of its own.

    During the first ``warmup_steps`` steps the gradient is clipped globally to norm
    ``absolute`` (``clip_by_global_norm``), and each tensor's reference ``gamma`` is the
    running minimum of its clipped norms. Afterwards a tensor whose norm exceeds
    ``relative * gamma`` is scaled down to it, and ``gamma <- decay * gamma + (1 - decay)
    * clipped_norm``. The defaults are the paper's (lambda_rel 1.05, beta 0.98,
    lambda_abs 1.0, 100 warm-up steps).

    Returns:
      An :class:`optax.GradientTransformation`.
    """

    def init_fn(params):
        norm_ema = jax.tree.map(lambda _: jnp.full([], jnp.inf, jnp.float32), params)
        return AdaGCState(jnp.zeros([], jnp.int32), norm_ema, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        in_warmup = state.count < warmup_steps
        global_norm = optax.tree.norm(updates).astype(jnp.float32)
        global_factor = jnp.minimum(1.0, absolute / jnp.maximum(global_norm, 1e-30))

        def leaf(g, gamma):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            limit = relative * gamma
            local_factor = jnp.where(norm > limit, limit / jnp.maximum(norm, 1e-30), 1.0)
            factor = jnp.where(in_warmup, global_factor, local_factor)
            clipped_norm = factor * norm
            new_gamma = jnp.where(
                in_warmup,
                jnp.minimum(gamma, clipped_norm),
                decay * gamma + (1 - decay) * clipped_norm,
            )
            return g * factor.astype(g.dtype), new_gamma, (~in_warmup) & (norm > limit)

        out = jax.tree.map(leaf, updates, state.norm_ema)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        clipped = jnp.any(jnp.stack(jax.tree.leaves(pick(2))))
        new_state = AdaGCState(
            optax.safe_increment(state.count),
            pick(1),
            state.num_clipped + clipped.astype(jnp.int32),
        )
        return pick(0), new_state

    return optax.GradientTransformation(init_fn, update_fn)


class UpdateClippingState(NamedTuple):
    """State of :func:`update_clipping`: Adam's moments, and how often it clipped."""

    count: jax.Array  # shape=(), int32
    mu: Any
    nu: Any
    num_clipped: jax.Array  # shape=(), int32: steps where some tensor's rate was lowered


def update_clipping(
    b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam's direction with StableAdamW's update clipping (Wortsman et al., 2023).

    Per tensor, ``RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))`` with ``v_hat`` the
    bias-corrected second moment after this step's gradient; the tensor's update
    ``m_hat / (sqrt(v_hat) + eps)`` is divided by ``max(1, RMS)``: a tensor whose
    gradient is far above what its second moment expects (the cause of Adam's own
    spikes) takes a smaller step. Put ``optax.add_decayed_weights`` and the learning
    rate after it; StableAdamW scales the weight decay by the same factor, which this
    anchor does not (the decay is small at these rates).

    Returns:
      An :class:`optax.GradientTransformation` (use it in place of ``scale_by_adam``).
    """

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return UpdateClippingState(jnp.zeros([], jnp.int32), zeros, zeros, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)

        def leaf(g, m, v):
            rms = jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v, eps**2)))
            factor = 1.0 / jnp.maximum(1.0, rms)
            return factor * m / (jnp.sqrt(v) + eps), rms > 1.0

        out = jax.tree.map(leaf, updates, mu_hat, nu_hat)
        new_updates = jax.tree.map(lambda _, o: o[0], updates, out)
        clipped = jnp.any(jnp.stack(jax.tree.leaves(jax.tree.map(lambda _, o: o[1], updates, out))))
        new_state = UpdateClippingState(
            count, mu, nu, state.num_clipped + clipped.astype(jnp.int32)
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


class SpamState(NamedTuple):
    """State of :func:`spam`: Adam's moments, the step and the clip count."""

    count: jax.Array  # shape=(), int32: steps seen (not reset: bias correction continues)
    mu: Any
    nu: Any
    num_clipped: jax.Array  # shape=(), int32: steps where some coordinate was clipped


def spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    threshold: float = 5000.0,
    reset_every: int = 500,
    warmup_steps: int = 150,
) -> optax.GradientTransformation:
    """SPAM: spike-aware clipping and momentum reset (Huang et al., ICLR 2025).

    Each coordinate with ``g**2 > threshold * v`` (``v`` the second moment before this
    step, where it is positive) is clipped to ``sign(g) * sqrt(threshold * v)``; every
    ``reset_every`` steps both moments are set to zero, and the update is scaled by a
    cosine ramp from 0 to 1 over the ``warmup_steps`` steps after each reset, as the
    reference code does (its step count, and so Adam's bias correction, is not reset).
    Defaults are the paper's (theta 5000, Delta T 500, 150 warm-up steps).

    Returns:
      An :class:`optax.GradientTransformation` (use it in place of ``scale_by_adam``).
    """

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return SpamState(jnp.zeros([], jnp.int32), zeros, zeros, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        reset = (state.count > 0) & (state.count % reset_every == 0)
        keep = lambda tree: jax.tree.map(lambda a: jnp.where(reset, jnp.zeros_like(a), a), tree)  # noqa: E731
        mu_old, nu_old = keep(state.mu), keep(state.nu)

        def clip(g, v):
            limit = threshold * v
            spike = (jnp.square(g) > limit) & (v > 0)
            return jnp.where(spike, jnp.sign(g) * jnp.sqrt(limit), g), jnp.any(spike)

        out = jax.tree.map(clip, updates, nu_old)
        clipped_updates = jax.tree.map(lambda _, o: o[0], updates, out)
        clipped = jnp.any(jnp.stack(jax.tree.leaves(jax.tree.map(lambda _, o: o[1], updates, out))))
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(clipped_updates, mu_old, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(clipped_updates, nu_old, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        since_reset = (count - 1) % reset_every  # 0 at the step of a reset
        ramp = jnp.where(
            (count > reset_every) & (since_reset < warmup_steps),
            0.5 * (1 - jnp.cos(jnp.pi * (since_reset + 1) / warmup_steps)),
            1.0,
        )
        new_updates = jax.tree.map(lambda m, v: ramp * m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        new_state = SpamState(count, mu, nu, state.num_clipped + clipped.astype(jnp.int32))
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def count_interventions(opt_state: Any) -> jax.Array:
    """Losses capped (ALRC), norms clipped (ZClip) or steps skipped in a final state; -1 if none.

    Found as the ``num_clipped`` / ``num_skipped`` fields of the states in the tree
    (for ``alrc_per_example`` these count examples, not steps).
    """
    counted = (old.ALRCState, ZClipState, SkipStepState, AdaGCState, UpdateClippingState, SpamState)
    total = jnp.asarray(-1, jnp.int32)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, counted)):
        if isinstance(
            node, (old.ALRCState, ZClipState, AdaGCState, UpdateClippingState, SpamState)
        ):
            total = jnp.maximum(total, 0) + node.num_clipped
        elif isinstance(node, SkipStepState):
            total = jnp.maximum(total, 0) + node.num_skipped
    return total
