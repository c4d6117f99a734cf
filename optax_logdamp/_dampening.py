"""Log dampening: compress every gradient element logarithmically."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_logdamp._docs import document_fields
from optax_logdamp._grouping import map_leaves
from optax_logdamp._log1p_kernel import (
    MAX_SCALE,
    MIN_SCALE,
    dampen_magnitude,
    linlog_magnitude,
    nearest_power_of_two,
    with_sign_of,
)
from optax_logdamp._numerics import sum_of_squares
from optax_logdamp._validation import (
    as_float,
    check_inexact_leaves,
    check_params_match,
    check_positive,
    check_state_type,
    check_trees_match,
)


def check_scale(scale: chex.Numeric, name: str = "scale") -> None:
    """Refuses a concrete scale outside ``[MIN_SCALE, MAX_SCALE]`` (or not > 0).

    ``name`` is the argument the user gave it as (``dampen_scale`` for :func:`logadam`).
    """
    check_positive(name, scale)
    value = as_float(scale)
    if value is not None and not MIN_SCALE <= value <= MAX_SCALE:
        raise ValueError(
            f"{name} must lie in [{MIN_SCALE:g}, {MAX_SCALE:g}], got {value!r}: beyond it the "
            "float32 dampening loses accuracy (intermediates leave float32's normal range)."
        )


AUTO_MULTIPLE = 3.0
"""The automatic knee in units of each tensor's running RMS."""

AUTO_DECAY = 0.999
"""The decay of each tensor's running ``log(mean(g**2))``, for the automatic knee."""


def _cast_scale(scale: chex.Numeric, dtype: jnp.dtype) -> jax.Array | float:
    """A Python number stays weakly typed; an array is cast to the compute dtype."""
    return scale if isinstance(scale, (int, float)) else jnp.asarray(scale, dtype)


def dampen(g: jax.Array, scale: chex.Numeric = 1.0) -> jax.Array:
    r"""Log-dampens one array: ``scale * sign(g) * log1p(|g| / scale)``.

    .. math::
      g \mapsto s \cdot \operatorname{sign}(g) \cdot \log\left(1 + |g| / s\right)

    Real inputs keep their sign; complex inputs keep their phase and have their
    modulus dampened. Half-precision inputs are computed in float32 and rounded
    once. :func:`log_dampen` applies it to every leaf of the updates.

    Args:
      g: the array to dampen.
      scale: the knee :math:`s`, a number in ``[1e-20, 1e20]``; the map is close to the
        identity for ``|g| << scale`` and logarithmic above it.

    Returns:
      The dampened array, same shape and dtype as ``g``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_logdamp import dampen
      >>> dampen(jnp.array([-1e6, -1.0, 0.0, 1e-3, 1e6]))
      Array([-1.3815512e+01, -6.9314718e-01,  0.0000000e+00,  9.9950039e-04,
              1.3815512e+01], dtype=float32)

    References:
      D. MacDonald, `A Magnetosphere for Neural Networks: the LogAdam optimizer
      <https://torontoai.org/2018/03/31/a-magnetosphere-for-neural-networks/>`_,
      2018.
    """
    check_scale(scale)
    return dampen_unchecked(g, scale)


def dampen_unchecked(
    g: jax.Array, scale: chex.Numeric, power_of_two: bool = False, linlog: bool = False
) -> jax.Array:
    """:func:`dampen` without the check of ``scale``, on either curve.

    ``linlog``: the identity up to the knee and ``s (1 + log(|g| / s))`` above it (the
    automatic knee's curve), instead of ``s log1p(|g| / s)``. ``power_of_two``: ``scale``
    is known to be a power of two (see :func:`dampen_magnitude`).
    """
    magnitude_map = linlog_magnitude if linlog else dampen_magnitude
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        magnitude = jnp.abs(g)
        scale = _cast_scale(scale, magnitude.dtype)
        damped = magnitude_map(magnitude, scale, power_of_two=power_of_two)
        # g * (damped / |g|) keeps the phase; at g == 0 the factor is taken as 1.
        factor = jnp.where(magnitude > 0, damped / jnp.where(magnitude > 0, magnitude, 1), 1)
        out = g * factor.astype(g.dtype)
    elif jnp.issubdtype(g.dtype, jnp.floating):
        compute_dtype = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        wide = g.astype(compute_dtype)
        scale = _cast_scale(scale, compute_dtype)
        damped = magnitude_map(jnp.abs(wide), scale, power_of_two=power_of_two)
        out = with_sign_of(damped, wide).astype(g.dtype)
    else:
        raise TypeError(
            f"log_dampen expects floating-point or complex updates, got dtype {g.dtype}."
        )
    chex.assert_equal_shape((out, g))
    chex.assert_type(out, g.dtype)
    return out


@document_fields
class LogDampenState(NamedTuple):
    """State of ``log_dampen(scale="auto")``: the running scale of each tensor's updates.

    Both fields have the tree structure of the updates, one scalar per leaf (tensor).

    Attributes:
      count: int32 per tensor: steps folded into ``log_mean_square`` (steps where the
        tensor's updates were all zero or not finite are not).
      log_mean_square: float32 per tensor: the exponential moving average of
        ``log(mean(g**2))`` of its updates (not bias-corrected).
    """

    # Documented under Attributes: above (@document_fields makes each entry the field's
    # docstring). `count`, as in optax's states; as a field it shadows tuple.count.
    count: Any
    log_mean_square: Any


def log_dampen(scale: chex.Numeric | Literal["auto"] = 1.0) -> optax.GradientTransformation:
    r"""Compresses every update element logarithmically (the "LogAdam" dampening).

    Each element :math:`g` of the updates becomes

    .. math::
      s \cdot \operatorname{sign}(g) \cdot \log\left(1 + \frac{|g|}{s}\right),

    where the knee :math:`s` is ``scale`` (:math:`s = 1`: the original
    ``sign(g) * log(1 + |g|)``). The map is odd, monotone, has slope 1 at the origin,
    never increases a magnitude and maps every finite input to a finite output, so a
    spike is compressed, its direction kept; NaN stays NaN.

    With ``scale="auto"`` the knee follows each tensor's own scale, so it works whatever
    the units of the gradient: each tensor :math:`T` (leaf) gets at its :math:`t`-th
    step the knee

    .. math::
      s_T = \operatorname{pow2}\!\left(3 \exp\frac{\lambda_T}{2 (1 - \beta^{t-1})}\right),
      \qquad
      \lambda_T \leftarrow \beta \lambda_T + (1 - \beta) \log \operatorname{mean}_T(g^2),

    three times its running geometric-mean RMS (:math:`\beta = 0.999`), rounded to a
    power of two, and the curve is the identity up to the knee and logarithmic above
    it, :math:`s (1 + \log(|g| / s))`: ordinary elements pass unchanged, and a tensor's
    updates pass unchanged until it has a scale. Dtypes, accuracy, the knee's details:
    :doc:`the log-dampening guide </guide/log_dampen>`.

    Args:
      scale: the knee :math:`s`, in the units of the gradient, in ``[1e-20, 1e20]``, or
        ``"auto"``. May be a traced array (``optax.inject_hyperparams``), then unchecked.

    Returns:
      An :class:`optax.GradientTransformation`: stateless for a numeric ``scale``;
      with ``"auto"`` its state is a :class:`LogDampenState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import log_dampen
      >>> tx = optax.chain(log_dampen(), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([1e-3, 1.0, 1e6])}
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["w"]
      Array([-9.9950039e-04, -6.9314718e-01, -1.3815512e+01], dtype=float32)

    References:
      D. MacDonald, `A Magnetosphere for Neural Networks: the LogAdam optimizer
      <https://torontoai.org/2018/03/31/a-magnetosphere-for-neural-networks/>`_,
      2018.
    """
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f'scale must be a number or "auto", got {scale!r}.')
        return _log_dampen_auto()
    check_scale(scale)

    def update_fn(updates, state, params=None):
        check_params_match("log_dampen", updates, params)
        check_inexact_leaves("log_dampen", updates)
        leaves, treedef = jax.tree.flatten(updates)
        damped = map_leaves(lambda g: dampen_unchecked(g, scale), leaves)
        return treedef.unflatten(damped), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _mean_square(g: jax.Array) -> jax.Array:
    """The mean of ``|g|**2``, as float32 (ALRC's per-tensor sum of squares, averaged)."""
    return (sum_of_squares(g) / max(g.size, 1)).astype(jnp.float32)


_AUTO = 'log_dampen("auto")'


def _log_dampen_auto() -> optax.GradientTransformation:
    """``log_dampen(scale="auto")``: each tensor's knee follows its running RMS."""

    def update_fn(updates, state, params=None):
        check_params_match(_AUTO, updates, params)
        check_state_type(_AUTO, state, LogDampenState)
        check_trees_match(
            _AUTO,
            "updates",
            updates,
            "state.count",
            state.count,
            problem="the state was initialised for a tree of another structure",
            fix="init with the tree the updates have (tx.init(params), params the trainable "
            "leaves only)",
        )
        check_inexact_leaves("log_dampen", updates)
        log_steps = jax.tree.map(lambda g: jnp.log(_mean_square(g)), updates)
        return dampen_at_knees(updates, state, log_steps)

    return optax.GradientTransformation(init_knees, update_fn)


def init_knees(params: Any) -> LogDampenState:
    """The :class:`LogDampenState` of ``params``: no step folded into any tensor's scale."""
    return LogDampenState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        log_mean_square=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
    )


def auto_knee(count: jax.Array, log_mean_square: jax.Array) -> jax.Array:
    """A tensor's knee: :data:`AUTO_MULTIPLE` x its running geometric-mean RMS, a power of two.

    ``count`` and ``log_mean_square`` are the tensor's entries of a
    :class:`LogDampenState` (the moving average is bias-corrected here).
    """
    decay = jnp.float32(AUTO_DECAY)
    log_rms = 0.5 * log_mean_square / (1 - lax.pow(decay, jnp.maximum(count, 1)))
    return nearest_power_of_two(AUTO_MULTIPLE * jnp.exp(log_rms))


def dampen_at_knees(
    updates: Any,
    state: LogDampenState,
    log_steps: Any,
) -> tuple[Any, LogDampenState]:
    """Dampens each tensor above its knee, then folds the step's ``log(mean(g**2))`` in.

    The knee is :data:`AUTO_MULTIPLE` x the tensor's running geometric-mean RMS (from ``state``,
    before this step), rounded to a power of two; a tensor with no step folded in yet
    passes unchanged. ``log_steps`` holds, per tensor, the log mean square of this
    step's updates; a non-finite one (all-zero or non-finite updates) is not folded.
    The knee and the dampening are traced once per group of small tensors
    (:func:`optax_logdamp._grouping.map_leaves`); the fold stays tensor by tensor, with
    the reduction it follows (XLA's float32 ``log`` can differ by an ulp between a
    reduction's fusion and a loop's, and the state is bitwise that of the ungrouped path).
    """
    decay = jnp.float32(AUTO_DECAY)

    def dampen_leaf(g, count, log_mean_square):
        knee = auto_knee(count, log_mean_square)
        damped = dampen_unchecked(g, knee, power_of_two=True, linlog=True)
        return jnp.where(count > 0, damped, g)  # no scale yet: unchanged

    def fold(log_step, count, log_mean_square):
        ok = jnp.isfinite(log_step)  # all-zero (log 0) or non-finite updates: skipped
        new = decay * log_mean_square + (1 - decay) * log_step
        return (
            jnp.where(ok, optax.safe_increment(count), count),
            jnp.where(ok, new, log_mean_square),
        )

    leaves, treedef = jax.tree.flatten(updates)
    counts = treedef.flatten_up_to(state.count)
    log_mean_squares = treedef.flatten_up_to(state.log_mean_square)
    damped = treedef.unflatten(map_leaves(dampen_leaf, leaves, counts, log_mean_squares))
    folded = jax.tree.map(fold, log_steps, state.count, state.log_mean_square)
    count = jax.tree.map(lambda _, pair: pair[0], updates, folded)
    log_mean_square = jax.tree.map(lambda _, pair: pair[1], updates, folded)
    new_state = LogDampenState(count=count, log_mean_square=log_mean_square)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    return damped, new_state
