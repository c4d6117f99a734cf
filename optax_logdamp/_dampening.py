"""Log dampening: compress every gradient element logarithmically."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_logdamp._validation import as_float, check_positive

# Cephes ``logf``: log(1 + f) = f - f**2 / 2 + f**3 * P(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1].
_LOG_POLY = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_LN2_HI = 0.693359375  # exact in float32; _LN2_HI + _LN2_LO = log(2)
_LN2_LO = -2.12194440e-4
_SQRT_HALF_BITS = 0x3F3504F3  # float32 bits of sqrt(1/2)
_ONE_BITS = 0x3F800000
_SQRT2_MINUS_1 = 0.41421354  # float32 just below sqrt(2) - 1, where k == 0 ends


def _pow2(exponent: jax.Array) -> jax.Array:
    """``2.0 ** exponent`` as float32, for integer exponents in ``[-126, 127]``."""
    return lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _log1p_f32(x: jax.Array, take_log: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``log1p(x)`` for float32 ``x >= 0`` (``log(x)`` where ``take_log``), cheap ops only.

    XLA counts ``log1p``, ``log`` and ``divide`` as expensive and never duplicates
    them into several consumers. Before Adam, the dampened gradient feeds two
    consumers (the first and the second moment), so with ``jnp.log1p`` XLA
    materialises it in a full-size temporary buffer every step, which made the
    step 3-4x slower than Adam on CPU. Built from adds, multiplies, selects and bit
    operations, it is fused into both moment updates instead, like a plain gradient.

    The method is that of fdlibm/musl ``log1pf``: ``u = 1 + x = 2**k * m`` with ``m``
    in ``[sqrt(1/2), sqrt(2))``, the Cephes polynomial for ``log(m)``, and the
    rounding error of ``1 + x`` added back as ``c / u``. Error below 1 ulp over all
    normal float32 inputs (``jnp.log1p`` on CPU: up to 2.5 ulp). NaN stays NaN and
    ``+inf`` stays ``+inf``.

    Args:
      x: float32 array, ``>= 0`` (or NaN).
      take_log: optional boolean mask; where true the result is ``log(x)``.

    Returns:
      ``log1p(x)`` (float32, same shape), and ``log1p(x) - x`` accurate to a few ulp
      where ``x < sqrt(2) - 1`` (elsewhere meaningless).
    """
    u = x + 1.0 if take_log is None else jnp.where(take_log, x, x + 1.0)
    shifted = lax.bitcast_convert_type(u, jnp.int32) + (_ONE_BITS - _SQRT_HALF_BITS)
    k = (shifted >> 23) - 127
    m = lax.bitcast_convert_type((shifted & 0x007FFFFF) + _SQRT_HALF_BITS, jnp.float32)
    f = m - 1.0
    # c = (1 + x) - u exactly. u is rebuilt as m * 2**k: XLA's algebraic simplifier
    # rewrites ``(x + 1) - 1`` to ``x``, which would lose c.
    # k >= 0 since u >= 1, except where take_log.
    k_small = jnp.minimum(k, 25) if take_log is None else jnp.clip(k, 0, 25)
    u_exact = m * _pow2(k_small)
    c = jnp.where(k >= 2, 1.0 - (u_exact - x), x - (u_exact - 1.0))
    inv_m = 1.0 - f * (1.0 - f)  # 1 / m to ~7 %: enough for c / u
    use_c = k < 25 if take_log is None else (k < 25) & ~take_log
    correction = jnp.where(use_c, c * _pow2(-k_small) * inv_m, 0.0)
    z = f * f
    poly = jnp.full_like(f, _LOG_POLY[0])
    for coefficient in _LOG_POLY[1:]:
        poly = poly * f + coefficient
    k_float = k.astype(jnp.float32)
    y = poly * f * z + (k_float * _LN2_LO + correction) - 0.5 * z
    result = (f + y) + k_float * _LN2_HI
    # Where k == 0, f + c == x exactly, so log1p(x) - x == y - c.
    return jnp.where(u < jnp.inf, result, u), y - c  # +inf and NaN pass through


def _ratio(magnitude: jax.Array, scale: jax.Array | float, concrete: float | None) -> jax.Array:
    """``magnitude / scale`` in float32, without an elementwise division.

    A division cannot be duplicated into the Adam moment fusions, and XLA rewrites a
    division by a constant into a multiplication by its rounded reciprocal anyway.
    For a concrete scale the reciprocal is split into a float32 pair ``hi + lo`` (from
    float64), so ``m * hi + m * lo`` is within about half an ulp of the quotient; a
    traced scale (``optax.inject_hyperparams``) multiplies by ``1 / scale``.
    """
    if concrete is None:
        return magnitude * (1.0 / scale)
    if concrete == 1.0:
        return magnitude
    inverse = 1.0 / concrete
    inverse_hi = float(np.float32(inverse))
    inverse_lo = float(np.float32(inverse - inverse_hi))
    if inverse_lo == 0.0:  # a power of two: the product is exact
        return magnitude * inverse_hi
    return magnitude * inverse_hi + magnitude * inverse_lo


def _dampen_magnitude(magnitude: jax.Array, scale: jax.Array | float) -> jax.Array:
    """``scale * log1p(magnitude / scale)`` for ``magnitude >= 0``, overflow-safe.

    The ratio ``magnitude / scale`` is computed by :func:`_ratio`. It overflows to ``inf``
    only when ``scale < 1`` and the magnitude is within a factor ``scale`` of the
    largest float; there ``log1p(m / s) = log(m) - log(s)`` to far below rounding. The
    guard is left out of the compiled step when ``scale`` is a concrete number ``>= 1``.
    """
    concrete_scale = as_float(scale)
    if magnitude.dtype != jnp.float32:  # float64: XLA's own log1p, speed matters less
        ratio = magnitude / scale
        compressed = jnp.log1p(ratio)
        if concrete_scale is None or concrete_scale < 1.0:
            compressed = jnp.where(
                jnp.isinf(ratio) & jnp.isfinite(magnitude),
                jnp.log(magnitude) - jnp.log(scale),
                compressed,
            )
        # log1p(x) <= x in exact arithmetic; the minimum keeps |out| <= |g| after rounding.
        return jnp.minimum(scale * compressed, magnitude)

    ratio = _ratio(magnitude, scale, concrete_scale)
    if concrete_scale is not None and concrete_scale >= 1.0:
        compressed, small_delta = _log1p_f32(ratio)
    else:
        # inf, or NaN from inf + (-inf) in the hi + lo product of a tiny scale.
        overflow = ~(ratio < jnp.inf) & (magnitude < jnp.inf)
        log_scale = math.log(concrete_scale) if concrete_scale is not None else jnp.log(scale)
        compressed, small_delta = _log1p_f32(jnp.where(overflow, magnitude, ratio), overflow)
        compressed = compressed - jnp.where(overflow, log_scale, 0.0)
    out = jnp.minimum(scale * compressed, magnitude)  # |out| <= |g| after rounding
    if concrete_scale != 1.0:
        # Below sqrt(2) - 1, m + s * (log1p(r) - r) does not carry the two roundings
        # of r = m * (1 / s) into the result (nor a flush of a subnormal r to zero).
        near_identity = magnitude + scale * small_delta
        out = jnp.where(ratio < _SQRT2_MINUS_1, jnp.minimum(near_identity, magnitude), out)
    return out


def _with_sign_of(magnitude: jax.Array, g: jax.Array) -> jax.Array:
    """``copysign(magnitude, g)`` for ``magnitude >= 0`` (or NaN).

    For float32, the sign bit of ``g`` is OR-ed in: 3 operations instead of the 6 of
    ``jnp.copysign``, which XLA repeats in both Adam moment updates.
    """
    if magnitude.dtype != jnp.float32:
        return jnp.copysign(magnitude, g)
    sign = lax.bitcast_convert_type(g, jnp.uint32) & jnp.uint32(0x80000000)
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32) | sign
    return lax.bitcast_convert_type(bits, jnp.float32)


def _cast_scale(scale: jax.Array | float, dtype: jnp.dtype) -> jax.Array | float:
    """A Python number stays weakly typed; an array is cast to the compute dtype."""
    return scale if isinstance(scale, (int, float)) else jnp.asarray(scale, dtype)


def dampen(g: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """Log-dampens one array: ``scale * sign(g) * log1p(|g| / scale)``.

    Real inputs keep their sign; complex inputs keep their phase and have their
    modulus dampened. Half-precision inputs are computed in float32 and rounded
    once; the output has the input's dtype and shape.

    Args:
      g: the array to dampen.
      scale: the knee, a number ``> 0``; the map is close to the identity for
        ``|g| << scale`` and logarithmic above it.

    Returns:
      The dampened array, same shape and dtype as ``g``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_logdamp import dampen
      >>> dampen(jnp.array([-1e6, -1.0, 0.0, 1e-3, 1e6]))
      Array([-1.3815512e+01, -6.9314718e-01,  0.0000000e+00,  9.9950039e-04,
              1.3815512e+01], dtype=float32)
    """
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        magnitude = jnp.abs(g)
        damped = _dampen_magnitude(magnitude, _cast_scale(scale, magnitude.dtype))
        # g * (damped / |g|) keeps the phase; at g == 0 the factor is taken as 1.
        factor = jnp.where(magnitude > 0, damped / jnp.where(magnitude > 0, magnitude, 1), 1)
        out = g * factor.astype(g.dtype)
    elif jnp.issubdtype(g.dtype, jnp.floating):
        compute_dtype = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        wide = g.astype(compute_dtype)
        damped = _dampen_magnitude(jnp.abs(wide), _cast_scale(scale, compute_dtype))
        out = _with_sign_of(damped, wide).astype(g.dtype)
    else:
        raise TypeError(
            f"log_dampen expects floating-point or complex updates, got dtype {g.dtype}."
        )
    chex.assert_equal_shape((out, g))
    chex.assert_type(out, g.dtype)
    return out


def log_dampen(scale: chex.Numeric = 1.0) -> optax.GradientTransformation:
    r"""Compresses every update element logarithmically (the "LogAdam" dampening).

    Each element :math:`g` of the updates becomes

    .. math::
      s \cdot \operatorname{sign}(g) \cdot \log\left(1 + \frac{|g|}{s}\right),

    where :math:`s` is ``scale``. With :math:`s = 1` this is the original
    ``sign(g) * log(1 + |g|)``. The map is odd, monotone, has slope 1 at the origin
    (near-identity for :math:`|g| \ll s`), never increases a magnitude, and maps every
    finite input to a finite output (float32's largest value to about
    :math:`88.7 s`), so a gradient spike is compressed instead of applied. It needs no
    threshold: :math:`s` only sets the knee where compression starts.

    NaN stays NaN and infinities stay infinite: a broken step is not hidden (wrap the
    optimizer in :func:`optax.apply_if_finite` to skip such steps). Half-precision
    updates are dampened in float32 and rounded once; the dtype of every leaf is
    kept. Complex updates keep their phase and have their modulus dampened.

    Args:
      scale: the knee :math:`s > 0`, in the units of the gradient. Gradients much
        smaller than ``scale`` pass almost unchanged. May be a traced array
        (``optax.inject_hyperparams``).

    Returns:
      A stateless :class:`optax.GradientTransformation`.

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
    check_positive("scale", scale)

    def update_fn(updates, state, params=None):
        if params is not None:
            chex.assert_trees_all_equal_shapes(updates, params)
        return jax.tree.map(lambda g: dampen(g, scale), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
