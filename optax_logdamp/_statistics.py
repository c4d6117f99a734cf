"""The statistics engine of ALRC: running mean and variance of a signal, and its cap.

Every transform that caps a statistic at its running mean plus ``num_stddev`` standard
deviations shares this engine: :func:`~optax_logdamp.alrc` (the loss, the gradient norm
or both), :func:`~optax_logdamp.alrc_per_example` (each example's loss) and
:func:`~optax_logdamp.spike_guard`. :func:`cap_and_fold` caps values at the threshold
held in an :class:`ALRCState` and folds the capped values into that state;
:func:`cap_signals` does it for several scalar signals at once and returns the smallest
factor.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_logdamp._docs import document_fields
from optax_logdamp._numerics import global_norm
from optax_logdamp._validation import (
    as_float,
    check_inexact_leaves,
    check_not_half_precision,
    check_open_unit_interval,
    check_params_match,
    check_positive,
    check_scalar,
    check_state_type,
    loss_array,
)

_PAPER_EPS = 1e-8  # added to the variance under the square root in the paper's rule
_INT32_MAX = jnp.iinfo(jnp.int32).max


@document_fields
class ALRCState(NamedTuple):
    """State of :func:`alrc`: statistics of the loss (or gradient norm), diagnostics.

    :func:`alrc_per_example` keeps one, of individual losses, in an
    :class:`ALRCPerExampleState`.
    Every field is a scalar array; the state is the same size whatever the model.
    Counters saturate at the int32 maximum instead of wrapping around.

    Attributes:
      count: int32: steps folded into ``mean`` and ``var`` since the statistics
        (re)started; a restart during warm-up sets it back to 1.
      mean: float32: running mean of the capped loss.
      var: float32: running variance of the capped loss.
      threshold: float32: the cap for the NEXT loss, ``mean + num_stddev * std``
        (``+inf`` before the first loss when the statistics start from the data).
      scale: float32: the gradient factor applied at the last step, in ``[0, 1]``
        (the mean over examples for :func:`alrc_per_example`; 0 after a skipped step).
      num_steps: int32: steps with a finite loss.
      num_losses: int32: losses seen in those steps (one per step for :func:`alrc`;
        every example, or token, for :func:`alrc_per_example`).
      num_clipped: int32: losses capped so far (examples for :func:`alrc_per_example`).
      num_nonfinite: int32: steps skipped because the loss was not finite.
    """

    # Each field is documented once, under Attributes: above; @document_fields makes that
    # entry the field's docstring (what help() and the API reference show).
    # `count`, as in optax's states; as a field it shadows tuple.count.
    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    mean: jax.Array
    var: jax.Array
    threshold: jax.Array
    scale: jax.Array
    num_steps: jax.Array
    num_losses: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array


@document_fields
class ALRCSignalsState(NamedTuple):
    """State of ``alrc(signal="grad_norm")`` and ``alrc(signal="both")``.

    One :class:`ALRCState` per signal, under the signal's name: the statistics of the
    global gradient norm in ``grad_norm``, those of the loss in ``loss``
    (``optax.EmptyState()`` when the loss is not a signal).

    Attributes:
      loss: the :class:`ALRCState` of the loss (``signal="both"``), or
        ``optax.EmptyState()`` (``signal="grad_norm"``).
      grad_norm: the :class:`ALRCState` of the global L2 norm of the updates.
    """

    loss: ALRCState | optax.EmptyState
    grad_norm: ALRCState


Signal = Literal["loss", "grad_norm", "both"]
SIGNALS: tuple[str, ...] = ("loss", "grad_norm", "both")


class Rule(NamedTuple):
    """Hyperparameters of the clipping rule, as float32/int32 arrays."""

    num_stddev: jax.Array
    decay: jax.Array
    warmup_steps: jax.Array
    from_data: bool  # static: True unless the paper's mu1_init/mu2_init were given


def _saturating_add(total: jax.Array, amount: jax.Array) -> jax.Array:
    """``total + amount`` for non-negative int32 values, stopping at the int32 maximum."""
    amount = jnp.asarray(amount, jnp.int32)
    return jnp.where(total > _INT32_MAX - amount, _INT32_MAX, total + amount)


def loss_scale(loss: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ALRC's gradient factor for ``loss`` under ``threshold``, and whether it caps.

    A positive loss above the threshold is capped: its gradient is multiplied by
    ``threshold / loss``, clamped to ``[0, 1]`` so that ALRC never amplifies a
    gradient nor flips its sign (a threshold ``<= 0`` gives 0: the step is dropped).
    A loss ``<= 0`` is never capped: scaling cannot cap it. Non-finite losses are
    not capped either (factor 1), so they stay non-finite and the callers skip them.
    """
    capped = (loss > threshold) & (loss > 0) & jnp.isfinite(loss)
    safe_loss = jnp.where(capped, loss, 1.0)
    scale = jnp.where(capped, jnp.clip(threshold / safe_loss, 0.0, 1.0), 1.0)
    return lax.stop_gradient(scale), lax.stop_gradient(capped)


def _next_threshold(rule: Rule, count, mean, var, num_steps) -> jax.Array:
    """The cap for the next loss: ``mean + num_stddev * sigma``.

    From data, sigma is ``sqrt(var)``; during warm-up the cap is at least
    ``(1 + num_stddev) * mean``, and there is no cap before the first loss. With the
    paper's initial moments, sigma is ``sqrt(var + 1e-8)`` from the first step.
    """
    if not rule.from_data:
        return mean + rule.num_stddev * jnp.sqrt(jnp.maximum(var, 0.0) + _PAPER_EPS)
    threshold = mean + rule.num_stddev * jnp.sqrt(jnp.maximum(var, 0.0))
    in_warmup = num_steps < rule.warmup_steps
    threshold = jnp.where(
        in_warmup, jnp.maximum(threshold, (1 + rule.num_stddev) * mean), threshold
    )
    return jnp.where(count > 0, threshold, jnp.inf)


def _fold(rule: Rule, state: ALRCState, batch_mean, batch_var):
    """Folds one step's capped losses (mean and variance) into the statistics.

    Exponential moving averages of the first two moments, in the stable form
    ``var <- (1 - a) * (var + a * (x - mean)**2) + a * s2``, ``mean <- mean + a * (x - mean)``,
    which equals the paper's raw-moment recurrence with ``a = 1 - decay``. From data,
    ``a = (1 - decay) / (1 - decay**count)``: the bias-corrected (Adam-style) average,
    exact from the first step. During warm-up a step whose loss is below
    ``mean / (1 + num_stddev)`` restarts the statistics from it: the earlier losses
    were a spike (or a steep start) and must not set the scale of what follows.
    """
    count = jnp.asarray(optax.safe_increment(state.count))
    if rule.from_data:
        alpha = jnp.minimum(1.0, (1 - rule.decay) / (1 - lax.pow(rule.decay, count)))
    else:
        alpha = 1 - rule.decay
    delta = batch_mean - state.mean
    mean = state.mean + alpha * delta
    var = (1 - alpha) * (state.var + alpha * jnp.square(delta)) + alpha * batch_var
    if rule.from_data:
        restart = (
            (state.num_steps < rule.warmup_steps)
            & (state.count > 0)
            & (state.mean > 0)
            & (batch_mean * (1 + rule.num_stddev) < state.mean)
        )
        count = jnp.where(restart, jnp.ones_like(count), count)
        mean = jnp.where(restart, batch_mean, mean)
        var = jnp.where(restart, batch_var, var)
    return count, mean, var


def _advance(rule, state, *, finite, batch_mean, batch_var, scale, num_losses, num_clipped):
    """The next state; a step with a non-finite loss only counts itself as skipped."""
    count, mean, var = _fold(rule, state, batch_mean, batch_var)
    num_steps = jnp.asarray(optax.safe_increment(state.num_steps))
    advanced = ALRCState(
        count=count,
        mean=mean,
        var=var,
        threshold=_next_threshold(rule, count, mean, var, num_steps),
        scale=scale,
        num_steps=num_steps,
        num_losses=_saturating_add(state.num_losses, num_losses),
        num_clipped=_saturating_add(state.num_clipped, num_clipped),
        num_nonfinite=state.num_nonfinite,
    )
    skipped = state._replace(
        scale=jnp.zeros_like(state.scale),
        num_nonfinite=optax.safe_increment(state.num_nonfinite),
    )
    new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), advanced, skipped)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    return new_state


def cap_and_fold(rule, state, values, *, finite=None, axis_name=None):
    """Caps ``values`` at ``state.threshold`` and folds the capped values into the state.

    ``values`` is one statistic (a scalar, :func:`alrc`) or one loss per example (any
    shape, :func:`alrc_per_example`). A value above the threshold is capped to it, with
    gradient factor ``threshold / value``; the mean and variance of the capped values are
    what is folded, so a spike does not inflate the statistics that judge the next one.
    With ``axis_name`` the values are shards of one batch split over that axis, and the
    exact global mean and variance (of equal-sized shards) are folded. The step is taken
    where ``finite`` (default: where the folded mean and variance are finite).

    Returns the mean gradient factor, ``finite``, and the next state.
    """
    scale, capped = loss_scale(values, state.threshold)
    capped_values = jnp.where(capped, state.threshold, values)
    if values.ndim == 0:  # one value: its own mean, no spread (a literal 0 for XLA to fold)
        batch_mean, batch_var = capped_values, jnp.zeros([], jnp.float32)
    else:
        batch_mean = jnp.mean(capped_values)
        batch_var = jnp.mean(jnp.square(capped_values - batch_mean))
    mean_scale = jnp.mean(scale)
    num_clipped = jnp.sum(capped, dtype=jnp.int32)
    num_values = jnp.asarray(values.size, jnp.int32)
    if axis_name is not None:
        global_mean = lax.pmean(batch_mean, axis_name)
        batch_var = lax.pmean(batch_var + jnp.square(batch_mean - global_mean), axis_name)
        batch_mean = global_mean
        mean_scale = lax.pmean(mean_scale, axis_name)
        num_clipped = lax.psum(num_clipped, axis_name)
        num_values = lax.psum(num_values, axis_name)
    if finite is None:
        finite = jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    new_state = _advance(
        rule,
        state,
        finite=finite,
        batch_mean=batch_mean,
        batch_var=batch_var,
        scale=mean_scale,
        num_losses=num_values,
        num_clipped=num_clipped,
    )
    return mean_scale, finite, new_state


def average_signals(statistics: dict, axis_name: str | None) -> dict:
    """The step's statistics averaged over ``axis_name`` (``pmap``/``shard_map``), or as given."""
    if axis_name is None:
        return statistics
    return {name: lax.pmean(x, axis_name) for name, x in statistics.items()}


def cap_signals(rule: Rule, statistics: dict, states: dict):
    """Caps every signal at its state's threshold: the factor, finiteness, next states.

    ``statistics`` and ``states`` map signal names to the step's scalar (already
    averaged over the data-parallel axis: ``average_signals``) and its
    :class:`ALRCState`. A step counts as finite only if every statistic is; the factor
    applied to the updates is the smallest of the signals' factors.
    """
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in statistics.values()])
    factor = jnp.ones([], jnp.float32)
    new_states = {}
    for name, statistic in statistics.items():
        scale, _, new_states[name] = cap_and_fold(rule, states[name], statistic, finite=finite)
        factor = jnp.minimum(factor, scale)
    return factor, finite, new_states


def make_rule(num_stddev, decay, mu1_init, mu2_init, warmup_steps) -> Rule:
    """Validates hyperparameters (values if concrete, dtypes always) and packs the rule."""
    check_positive("num_stddev", num_stddev)
    check_not_half_precision("decay", decay)
    check_open_unit_interval(
        "decay",
        decay,
        hint="(Under optax.inject_hyperparams with bfloat16 parameters, 0.999 rounds to 1: "
        "pass hyperparam_dtype=jnp.float32.)",
    )
    check_scalar("warmup_steps", warmup_steps)
    steps = as_float(warmup_steps)
    if steps is not None and not (steps >= 0 and steps == int(steps)):
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
    if (mu1_init is None) != (mu2_init is None):
        raise ValueError(
            "Give both mu1_init and mu2_init (the paper's initial loss moments, e.g. "
            "mu1_init=25.0, mu2_init=900.0) or neither (statistics start from the data); "
            f"got mu1_init={mu1_init!r}, mu2_init={mu2_init!r}."
        )
    if mu1_init is not None:
        check_scalar("mu1_init", mu1_init)
        check_scalar("mu2_init", mu2_init)
        mu1, mu2 = as_float(mu1_init), as_float(mu2_init)
        if mu1 is not None and mu2 is not None and not (mu2 > mu1 * mu1):
            raise ValueError(
                "mu2_init must exceed mu1_init**2 (the initial variance mu2 - mu1**2 must "
                f"be positive); got mu1_init={mu1_init!r}, mu2_init={mu2_init!r}."
            )
    return Rule(
        num_stddev=jnp.asarray(num_stddev, jnp.float32),
        decay=jnp.asarray(decay, jnp.float32),
        warmup_steps=jnp.asarray(warmup_steps, jnp.int32),
        from_data=mu1_init is None,
    )


def init_state(rule: Rule, mu1_init: Any = None, mu2_init: Any = None) -> ALRCState:
    """The state before the first step: from the data, or from the paper's initial moments."""
    zero_int = jnp.zeros([], jnp.int32)
    if rule.from_data:
        mean = jnp.zeros([], jnp.float32)
        var = jnp.zeros([], jnp.float32)
    else:
        mu1 = as_float(mu1_init)
        mu2 = as_float(mu2_init)
        if mu1 is not None and mu2 is not None:  # exact variance, then one rounding
            mean = jnp.asarray(mu1, jnp.float32)
            var = jnp.asarray(mu2 - mu1 * mu1, jnp.float32)
        else:
            mean = jnp.asarray(mu1_init, jnp.float32)
            var = jnp.asarray(mu2_init, jnp.float32) - jnp.square(mean)
    return ALRCState(
        count=zero_int,
        mean=mean,
        var=var,
        threshold=_next_threshold(rule, zero_int, mean, var, zero_int),
        scale=jnp.ones([], jnp.float32),
        # Distinct buffers: one array in several fields cannot be donated to a jitted step.
        num_steps=jnp.zeros([], jnp.int32),
        num_losses=jnp.zeros([], jnp.int32),
        num_clipped=jnp.zeros([], jnp.int32),
        num_nonfinite=jnp.zeros([], jnp.int32),
    )


def zero_if_skipped(updates, finite, scale=None):
    """Updates times ``scale`` (if given), or exactly zero where the loss was not finite."""

    def leaf(g):
        scaled = g if scale is None else g * scale.astype(g.dtype)
        return jnp.where(finite, scaled, jnp.zeros_like(g))

    return jax.tree.map(leaf, updates)


def scalar_loss(transform: str, value: Any) -> jax.Array:
    """The batch loss given as ``value``, checked to be a real scalar, as float32.

    ``transform`` names the caller in errors (``alrc``, ``spike_guard(signal="both")``).
    """
    loss = loss_array(transform, value).astype(jnp.float32)
    if loss.ndim != 0:
        raise ValueError(
            f"{transform} expects value to be the scalar loss of the batch, got shape "
            f"{loss.shape}. Pass loss.mean(), or use alrc_per_example() to cap "
            "each example's loss."
        )
    return loss


def find_alrc_states(tree: Any) -> list[tuple[tuple[Any, ...], ALRCState]]:
    """Every :class:`ALRCState` in ``tree`` (an optimizer state), with its key path."""
    is_state = lambda node: isinstance(node, ALRCState)  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)
    return [(path, node) for path, node in leaves if is_state(node)]


def signal_of(path: tuple[Any, ...]) -> str:
    """The signal whose statistics an :class:`ALRCState` at ``path`` holds.

    ``"grad_norm"`` for the ``grad_norm`` field of an :class:`ALRCSignalsState`,
    ``"loss"`` for every other state (batch or per-example ALRC of the loss).
    """
    last = path[-1] if path else None
    return "grad_norm" if getattr(last, "name", None) == "grad_norm" else "loss"


def signal_transform(
    name: str,
    default_signal: str,
    rule: Rule,
    signal: str,
    axis_name: str | None,
    mu1_init: Any = None,
    mu2_init: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """ALRC on the loss (given as ``value``), the global gradient norm, or both.

    The transform behind :func:`~optax_logdamp.alrc` and
    :func:`~optax_logdamp.spike_guard`: each step's statistics are averaged over
    ``axis_name``, capped by :func:`cap_signals`, and the updates scaled by the smallest
    factor (zeroed if a statistic is not finite). Its state is an :class:`ALRCState` for
    ``signal="loss"`` and an :class:`ALRCSignalsState` otherwise. Errors name the
    transform as ``name``, with its signal where that is not ``default_signal``.
    """
    uses_loss = signal in ("loss", "both")
    uses_norm = signal in ("grad_norm", "both")
    transform = name if signal == default_signal else f'{name}(signal="{signal}")'

    def init_fn(params):
        del params
        if signal == "loss":
            return init_state(rule, mu1_init, mu2_init)
        loss_state = init_state(rule) if uses_loss else optax.EmptyState()
        return ALRCSignalsState(loss=loss_state, grad_norm=init_state(rule))

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        check_params_match(transform, updates, params)
        _check_signals_state(name, transform, state, signal)
        check_inexact_leaves(transform, updates)
        statistics, states = {}, {}
        if uses_loss:
            statistics["loss"] = scalar_loss(transform, value)
            states["loss"] = state if signal == "loss" else state.loss
        if uses_norm:
            statistics["grad_norm"] = global_norm(updates)
            states["grad_norm"] = state.grad_norm
        statistics = average_signals(statistics, axis_name)
        factor, finite, states = cap_signals(rule, statistics, states)
        if signal == "loss":
            new_state = states["loss"]
        else:
            new_state = ALRCSignalsState(
                loss=states.get("loss", optax.EmptyState()), grad_norm=states["grad_norm"]
            )
        return zero_if_skipped(updates, finite, factor), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_signals_state(name: str, transform: str, state: Any, signal: str) -> None:
    """Refuses a state that this transform's init did not make, naming the fix.

    The states of two signals differ in which fields hold an :class:`ALRCState`: the
    state of ``signal="both"`` given to ``signal="grad_norm"`` would drop the loss's
    statistics, and the other way round fail deep inside.
    """
    if signal == "loss":
        check_state_type(transform, state, ALRCState)
        return
    check_state_type(transform, state, ALRCSignalsState)
    loss_type = ALRCState if signal == "both" else optax.EmptyState
    for field, expected in (("loss", loss_type), ("grad_norm", ALRCState)):
        node = getattr(state, field)
        if type(node) is not expected:
            other = "grad_norm" if signal == "both" else "both"
            raise TypeError(
                f"{transform}: state.{field} must be an {expected.__name__}, got "
                f'{type(node).__name__}: this is the state of {name}(signal="{other}"). Create '
                "the state with this transform's init: opt_state = tx.init(params)."
            )
