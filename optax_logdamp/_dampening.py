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
    check_not_half_precision,
    check_open_unit_interval,
    check_params_match,
    check_positive,
    check_state_type,
    check_trees_match,
)


def _check_scale(scale: chex.Numeric, name: str = "scale") -> None:
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


CURVES = ("log1p", "linlog")
Curve = Literal["log1p", "linlog"]


def _check_curve(curve: str | None, name: str = "curve") -> None:
    """Refuses a dampening curve other than ``"log1p"`` (the seed's), ``"linlog"`` or None."""
    if curve is not None and curve not in CURVES:
        raise ValueError(
            f'{name} must be one of {CURVES} ("log1p": s*log1p(|g|/s), the seed\'s; "linlog": '
            f"the identity up to the knee s, s*(1 + log(|g|/s)) above) or None (linlog with "
            f'"auto", log1p with a number), got {curve!r}.'
        )


def default_curve(scale: chex.Numeric | str, curve: Curve | None) -> Curve:
    """``curve``, or when it is None the default of ``scale``'s kind.

    A numeric knee keeps the seed's ``"log1p"`` (bitwise the original LogAdam); the
    automatic knee, which sits at a few RMS, bends ordinary elements on ``"log1p"`` (at
    3x RMS an element at 1x RMS loses 14 %), so ``"auto"`` takes ``"linlog"``, the
    identity below its knee.
    """
    if curve is not None:
        return curve
    return "linlog" if isinstance(scale, str) else "log1p"


def _cast_scale(scale: chex.Numeric, dtype: jnp.dtype) -> jax.Array | float:
    """A Python number stays weakly typed; an array is cast to the compute dtype."""
    return scale if isinstance(scale, (int, float)) else jnp.asarray(scale, dtype)


def dampen(g: jax.Array, scale: chex.Numeric = 1.0, *, curve: Curve | None = "log1p") -> jax.Array:
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
      curve: ``"log1p"`` or ``"linlog"`` (the identity up to the knee; see
        :func:`log_dampen`); None is ``"log1p"``, the default of a numeric knee.

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
    _check_scale(scale)
    _check_curve(curve)
    return _dampen(g, scale, curve=default_curve(scale, curve))


def _dampen(
    g: jax.Array, scale: chex.Numeric, power_of_two: bool = False, curve: Curve = "log1p"
) -> jax.Array:
    """:func:`dampen` without the check of ``scale``; see :func:`dampen_magnitude`."""
    magnitude_map = _MAGNITUDE_MAPS[curve]
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


_MAGNITUDE_MAPS = {"log1p": dampen_magnitude, "linlog": linlog_magnitude}


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


def log_dampen(
    scale: chex.Numeric | Literal["auto"] = 1.0,
    *,
    auto_multiple: chex.Numeric = 3.0,
    auto_decay: chex.Numeric = 0.999,
    curve: Curve | None = None,
) -> optax.GradientTransformation:
    r"""Compresses every update element logarithmically (the "LogAdam" dampening).

    Each element :math:`g` of the updates becomes

    .. math::
      s \cdot \operatorname{sign}(g) \cdot \log\left(1 + \frac{|g|}{s}\right),

    where the knee :math:`s` is ``scale`` (:math:`s = 1`: the original
    ``sign(g) * log(1 + |g|)``). The map is odd, monotone, has slope 1 at the origin,
    never increases a magnitude and maps every finite input to a finite output, so a
    spike is compressed, its direction kept; NaN stays NaN. With ``scale="auto"`` each
    tensor :math:`T` (leaf) gets at its :math:`t`-th step the knee

    .. math::
      s_T = \operatorname{pow2}\!\left(k \exp\frac{\lambda_T}{2 (1 - \beta^{t-1})}\right),
      \qquad
      \lambda_T \leftarrow \beta \lambda_T + (1 - \beta) \log \operatorname{mean}_T(g^2),

    :math:`k` times its running geometric-mean RMS, rounded to a power of two; a tensor's
    updates pass unchanged until it has a scale. Dtypes, accuracy, the knee's details:
    :doc:`the log-dampening guide </guide/log_dampen>`.

    Args:
      scale: the knee :math:`s`, in the units of the gradient, in ``[1e-20, 1e20]``, or
        ``"auto"``. May be a traced array (``optax.inject_hyperparams``), then unchecked.
      auto_multiple: with ``"auto"``, :math:`k > 0`, the knee in units of the RMS.
      auto_decay: with ``"auto"``, :math:`\beta \in (0, 1)`, the decay of :math:`\lambda_T`.
      curve: ``"log1p"`` (the formula above) or ``"linlog"``: :math:`|g|` up to the knee
        and :math:`s (1 + \log(|g| / s))` above it (slope 1 at the knee: ordinary updates
        below it pass bitwise unchanged). None (default): ``"log1p"`` with a numeric
        ``scale``, ``"linlog"`` with ``"auto"``.

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
    _check_curve(curve)
    curve = default_curve(scale, curve)
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f'scale must be a number or "auto", got {scale!r}.')
        return _log_dampen_auto(auto_multiple, auto_decay, curve)
    _check_scale(scale)

    def update_fn(updates, state, params=None):
        check_params_match("log_dampen", updates, params)
        check_inexact_leaves("log_dampen", updates)
        leaves, treedef = jax.tree.flatten(updates)
        damped = map_leaves(lambda g: _dampen(g, scale, curve=curve), leaves)
        return treedef.unflatten(damped), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _mean_square(g: jax.Array) -> jax.Array:
    """The mean of ``|g|**2``, as float32 (ALRC's per-tensor sum of squares, averaged)."""
    return (sum_of_squares(g) / max(g.size, 1)).astype(jnp.float32)


_AUTO = 'log_dampen("auto")'


def _log_dampen_auto(
    multiple: chex.Numeric, decay: chex.Numeric, curve: Curve = "log1p"
) -> optax.GradientTransformation:
    """``log_dampen(scale="auto")``: each tensor's knee follows its running RMS."""
    check_positive("auto_multiple", multiple)
    check_not_half_precision("auto_decay", decay)
    check_open_unit_interval("auto_decay", decay)

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
        return dampen_at_knees(updates, state, log_steps, multiple, decay, curve)

    return optax.GradientTransformation(init_knees, update_fn)


def init_knees(params: Any) -> LogDampenState:
    """The :class:`LogDampenState` of ``params``: no step folded into any tensor's scale."""
    return LogDampenState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        log_mean_square=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
    )


def dampen_at_knees(
    updates: Any,
    state: LogDampenState,
    log_steps: Any,
    multiple: chex.Numeric,
    decay: chex.Numeric,
    curve: Curve = "log1p",
) -> tuple[Any, LogDampenState]:
    """Dampens each tensor at its knee on ``curve``, then folds the step's ``log(mean(g**2))`` in.

    The knee is ``multiple`` x the tensor's running geometric-mean RMS (from ``state``,
    before this step), rounded to a power of two; a tensor with no step folded in yet
    passes unchanged. ``log_steps`` holds, per tensor, the log mean square of this
    step's updates; a non-finite one (all-zero or non-finite updates) is not folded.
    The knee and the dampening are traced once per group of small tensors
    (:func:`optax_logdamp._grouping.map_leaves`); the fold stays tensor by tensor, with
    the reduction it follows (XLA's float32 ``log`` can differ by an ulp between a
    reduction's fusion and a loop's, and the state is bitwise that of the ungrouped path).
    """
    decay = jnp.asarray(decay, jnp.float32)

    def knee(count, log_mean_square):
        """``multiple`` x the running geometric-mean RMS, rounded to a power of two."""
        log_rms = 0.5 * log_mean_square / (1 - lax.pow(decay, jnp.maximum(count, 1)))
        return nearest_power_of_two(multiple * jnp.exp(log_rms))

    def dampen_leaf(g, count, log_mean_square):
        damped = _dampen(g, knee(count, log_mean_square), power_of_two=True, curve=curve)
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
