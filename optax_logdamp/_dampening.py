"""Log dampening: compress every gradient element logarithmically."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_logdamp._docs import document_fields
from optax_logdamp._grouping import map_leaves
from optax_logdamp._log1p_kernel import (
    MAX_SCALE,
    MIN_SCALE,
    dampen_magnitude,
    linlog_magnitude,
    power_of_two,
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


def dampen_unchecked(g: jax.Array, scale: chex.Numeric) -> jax.Array:
    """:func:`dampen` without the check of ``scale``."""
    return _map_magnitude(g, lambda m: dampen_magnitude(m, _cast_scale(scale, m.dtype)))


# log_dampen's kernel per tensor, jitted once: one trace per kind of tensor (map_leaves).
_dampen_static = jax.jit(dampen_unchecked, static_argnums=1)
_dampen_traced = jax.jit(dampen_unchecked)


def dampen_above_knee(g: jax.Array, exponent: jax.Array) -> jax.Array:
    """The automatic knee's curve at the knee ``s = 2**exponent`` (:func:`linlog_magnitude`).

    The identity up to the knee, ``s (1 + log(|g| / s))`` above it; dtypes as :func:`dampen`.
    """
    return _map_magnitude(g, lambda m: linlog_magnitude(m, exponent))


def _map_magnitude(g: jax.Array, magnitude_map: Any) -> jax.Array:
    """``g`` with its magnitude mapped: the sign (phase, for complex) kept.

    Half-precision inputs are computed in float32 and rounded once.
    """
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        magnitude = jnp.abs(g)
        damped = magnitude_map(magnitude)
        # g * (damped / |g|) keeps the phase; at g == 0 the factor is taken as 1.
        factor = jnp.where(magnitude > 0, damped / jnp.where(magnitude > 0, magnitude, 1), 1)
        out = g * factor.astype(g.dtype)
    elif jnp.issubdtype(g.dtype, jnp.floating):
        compute_dtype = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        wide = g.astype(compute_dtype)
        out = with_sign_of(magnitude_map(jnp.abs(wide)), wide).astype(g.dtype)
    else:
        raise TypeError(
            f"log_dampen expects floating-point or complex updates, got dtype {g.dtype}."
        )
    chex.assert_equal_shape((out, g))
    chex.assert_type(out, g.dtype)
    return out


NO_STATISTIC = float(np.finfo(np.float32).max)
"""A tensor's ``log_mean_square`` before its first folded step: it has no knee yet."""


@document_fields
class LogDampenState(NamedTuple):
    """State of ``log_dampen(scale="auto")``: the step count and each tensor's running scale.

    Attributes:
      count: int32: the steps taken, as in optax's states; it bias-corrects the average.
      log_mean_square: float32 per tensor, with the tree structure of the updates: the
        exponential moving average of ``log(mean(g**2))`` of its updates, bias-corrected
        as Adam's moments are. Steps where the tensor's updates are all zero or not
        finite are not folded in; until its first folded step it is the largest float32
        (``np.finfo(np.float32).max``) and the tensor's updates pass unchanged.
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
    the units of the gradient: each tensor :math:`T` (leaf) gets at the :math:`t`-th
    step the knee

    .. math::
      s_T = \operatorname{pow2}\!\left(3 \exp\frac{\lambda_T}{2}\right),
      \qquad
      \lambda_T \leftarrow \lambda_T + \frac{1 - \beta}{1 - \beta^{t}}
        \left(\log \operatorname{mean}_T(g^2) - \lambda_T\right),

    three times its running geometric-mean RMS (:math:`\lambda_T` from the steps before,
    bias-corrected, :math:`\beta = 0.999`), rounded to a
    power of two, and the curve is the identity up to the knee and logarithmic above
    it, :math:`s (1 + \log(|g| / s))`: ordinary elements pass unchanged, and a tensor's
    updates pass unchanged until it has a scale (its first step of finite, not all-zero
    updates, which sets :math:`\lambda_T`). Dtypes, accuracy, the knee's details:
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
    # A number is part of the compiled kernel; an array (inject_hyperparams) is its input.
    dampen_leaf = _dampen_static if isinstance(scale, (int, float, np.generic)) else _dampen_traced

    def update_fn(updates, state, params=None):
        check_params_match("log_dampen", updates, params)
        check_inexact_leaves("log_dampen", updates)
        leaves, treedef = jax.tree.flatten(updates)
        damped = map_leaves(dampen_leaf, leaves, shared=(scale,))
        return treedef.unflatten(damped), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _mean_square(g: jax.Array) -> jax.Array:
    """The mean of ``|g|**2``, as float32."""
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
            "state.log_mean_square",
            state.log_mean_square,
            problem="the state was initialised for a tree of another structure",
            fix="init with the tree the updates have (tx.init(params), params the trainable "
            "leaves only)",
        )
        check_inexact_leaves("log_dampen", updates)
        leaves, treedef = jax.tree.flatten(updates)
        log_mean_squares = treedef.flatten_up_to(state.log_mean_square)
        count = optax.safe_increment(state.count)
        # The bias-corrected average: each step weighted as in Adam's moments.
        decay = jnp.float32(AUTO_DECAY)
        weight = (1 - decay) / (1 - lax.pow(decay, count))
        damped, log_mean_square = zip(
            *map_leaves(_dampen_and_fold, leaves, log_mean_squares, shared=(weight,)),
            strict=True,
        )
        new_state = LogDampenState(count=count, log_mean_square=treedef.unflatten(log_mean_square))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        return treedef.unflatten(damped), new_state

    return optax.GradientTransformation(init_knees, update_fn)


def init_knees(params: Any) -> LogDampenState:
    """The :class:`LogDampenState` of ``params``: no step taken, no tensor with a knee."""
    return LogDampenState(
        count=jnp.zeros([], jnp.int32),
        log_mean_square=jax.tree.map(lambda _: jnp.full([], NO_STATISTIC, jnp.float32), params),
    )


def has_knee(log_mean_square: jax.Array) -> jax.Array:
    """Whether a tensor has a knee: a step folded into its ``log_mean_square``."""
    return log_mean_square != NO_STATISTIC


def knee_exponent(log_mean_square: jax.Array) -> jax.Array:
    """A tensor's knee ``2**k``: the int32 ``k`` in ``[-66, 66]``.

    ``2**k`` is the power of two nearest (on a log scale) to :data:`AUTO_MULTIPLE` x the
    tensor's running geometric-mean RMS.

    ``log_mean_square`` is the tensor's entry of a :class:`LogDampenState`. Only cheap
    operations: XLA computes the knee inside the kernels that use it, not in a kernel
    of its own per tensor.
    """
    log2_knee = (0.5 * log_mean_square + math.log(AUTO_MULTIPLE)) * (1 / math.log(2.0))
    return jnp.clip(jnp.floor(log2_knee + 0.5), -66, 66).astype(jnp.int32)


def auto_knee(log_mean_square: jax.Array) -> jax.Array:
    """A tensor's knee, ``2.0 ** knee_exponent(log_mean_square)``, as float32."""
    return power_of_two(knee_exponent(log_mean_square))


@jax.jit
def _dampen_and_fold(
    g: jax.Array, log_mean_square: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One tensor's step: dampened above its knee, then its ``log(mean(g**2))`` folded in.

    The knee comes from the state before this step; a tensor with no knee yet passes
    unchanged, and its first folded step is taken as is. A step whose log mean square is
    not finite (all-zero or non-finite updates) is not folded. ``weight`` is this step's
    weight in the bias-corrected average.
    """
    known = has_knee(log_mean_square)
    damped = jnp.where(known, dampen_above_knee(g, knee_exponent(log_mean_square)), g)
    mean_square = _mean_square(g)
    # log(mean_square) is finite: tested on mean_square itself, so that the log is
    # computed only where it is folded (one kernel fewer per tensor to compile).
    ok = (mean_square > 0) & (mean_square < jnp.inf)
    log_ms = jnp.log(mean_square)
    folded = jnp.where(known, log_mean_square + weight * (log_ms - log_mean_square), log_ms)
    return damped, jnp.where(ok, folded, log_mean_square)
