"""The float32 dampening curves built from cheap operations, so XLA fuses them into Adam.

Why this module exists: XLA counts ``log1p``, ``log`` and ``divide`` as expensive and
never duplicates them into several consumers. Before Adam, the dampened gradient feeds
two consumers (the first and the second moment), so with ``jnp.log1p`` XLA
materialises it in a full-size temporary buffer every step: in front of Adam, the
optimizer step of a 10M-parameter transformer then takes 3.0x Adam's time on CPU,
against 1.6x for ``logadam`` (``benchmarks/results/cost/step_overhead.md``). Built here
from adds, multiplies, selects and bit operations, the dampening is fused into both
moment updates like a plain gradient.

:func:`dampen_magnitude` is the post's ``s * log1p(m / s)`` for any scale: more accurate
than ``jnp.log1p`` on CPU (below 1 ulp against 2.5 ulp), with the product with the
scale formed from unrounded parts, so the dampened value is within 2 ulp of the float64
formula for every scale in ``[MIN_SCALE, MAX_SCALE]`` (below 1 ulp for a power of two).
:func:`linlog_magnitude` is the automatic knee's curve, whose knee is always a power of
two: the log is read off the exponent bits, so it needs no ratio, no overflow guard and
no correction terms: 50 operations per element, against 95 for the post's curve at a
traced scale (62 at scale 1). :func:`with_sign_of` puts the sign back; the rest are their parts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_logdamp._validation import as_float

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
# Outside this range some float32 intermediates (s * (log1p(r) - r), the two-term
# reciprocal of s) fall below the normal range, and XLA on CPU flushes them to zero:
# measured errors from 10 ulp (s = 1e-26) to millions of ulp (s = 1e38).
MIN_SCALE, MAX_SCALE = 1e-20, 1e20


class _Log1p(NamedTuple):
    """``log1p(x) = k_ln2 + f + y`` in parts, from :func:`_log1p_f32`.

    ``k_ln2 = k * LN2_HI`` is exact and, where ``k != 0``, larger than ``|f|``; ``f``
    is exact; ``y`` is small (``|y| < |f| / 4`` where ``k == 0``). ``delta`` is
    ``log1p(x) - x`` to within half an ulp of ``x`` where ``x < sqrt(2) - 1``
    (elsewhere meaningless).
    """

    f: jax.Array
    y: jax.Array
    k_ln2: jax.Array
    delta: jax.Array

    def rounded(self) -> jax.Array:
        """``log1p(x)`` rounded to float32 (below 1 ulp)."""
        return (self.f + self.y) + self.k_ln2

    def split(self) -> tuple[jax.Array, jax.Array]:
        """``(head, tail)`` with ``head + tail = log1p(x)`` to within half an ulp.

        A fast two-sum (``|k_ln2| >= |f|`` or ``k_ln2 == 0``) keeps the rounding error
        of ``k_ln2 + f`` in the tail, so ``scale * head + scale * tail`` rounds about
        once, not twice.
        """
        head = self.k_ln2 + self.f
        return head, (self.f - (head - self.k_ln2)) + self.y


def _pow2_biased(biased_exponent: jax.Array) -> jax.Array:
    """``2.0 ** (biased_exponent - 127)`` as float32, for biased exponents in ``[1, 254]``."""
    return lax.bitcast_convert_type(biased_exponent << 23, jnp.float32)


def _split_exponent(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(k + 127, m)`` with ``u = 2**k * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``, for float32
    ``u > 0`` normal: the biased exponent (int32) and the mantissa, from the bits."""
    shifted = lax.bitcast_convert_type(u, jnp.int32) + (_ONE_BITS - _SQRT_HALF_BITS)
    m = lax.bitcast_convert_type((shifted & 0x007FFFFF) + _SQRT_HALF_BITS, jnp.float32)
    return shifted >> 23, m


def _log_cubic(f: jax.Array, z: jax.Array) -> jax.Array:
    """``f**3 * P(f)`` (``z = f**2``), Cephes' ``log(1 + f) = f - f**2 / 2 + f**3 P(f)``."""
    poly = jnp.full_like(f, _LOG_POLY[0])
    for coefficient in _LOG_POLY[1:]:
        poly = poly * f + coefficient
    return poly * f * z


def _log1p_f32(x: jax.Array, take_log: jax.Array | None = None) -> _Log1p:
    """``log1p(x)`` for float32 ``x >= 0`` (``log(x)`` where ``take_log``), cheap ops only.

    The method is that of fdlibm/musl ``log1pf``: ``u = 1 + x = 2**k * m`` with ``m``
    in ``[sqrt(1/2), sqrt(2))``, the Cephes polynomial for ``log(m)``, and the
    rounding error ``c = (1 + x) - u`` added back as ``c / u``. Error below 1 ulp over
    all normal float32 inputs (``jnp.log1p`` on CPU: up to 2.5 ulp).

    The result is returned in parts (see :class:`_Log1p`), so that a caller that
    multiplies it by a scale can keep it unrounded. The parts are NaN for NaN input
    and meaningless for ``+inf``; the caller passes both through.

    Args:
      x: float32 array, ``>= 0`` (or NaN).
      take_log: optional boolean mask; where true the result is ``log(x)``.

    Returns:
      The parts of ``log1p(x)``.
    """
    u = x + 1.0 if take_log is None else jnp.where(take_log, x, x + 1.0)
    biased_k, m = _split_exponent(u)  # u = 2**k * m, biased_k = k + 127
    f = m - 1.0
    # c * 2**-k = x * 2**-k - (m - 2**-k), both subtractions exact for 0 <= k <= 23
    # (XLA's simplifier rewrites (x + 1) - 1 to x, so c is not computed from u).
    inverse_pow2 = _pow2_biased(254 - biased_k)
    scaled_c = x * inverse_pow2 - (m - inverse_pow2)
    inv_m = 1.0 - f * (1.0 - f)  # 1 / m to ~7 %: enough for c / u
    use_c = biased_k < 127 + 24
    if take_log is not None:
        use_c = use_c & ~take_log
    correction = jnp.where(use_c, scaled_c * inv_m, 0.0)  # c / u
    z = f * f
    k_float = (biased_k - 127).astype(jnp.float32)
    y = _log_cubic(f, z) + (k_float * _LN2_LO + correction) - 0.5 * z
    # Where k == 0, f + c == x exactly, so log1p(x) - x == y - c.
    return _Log1p(f=f, y=y, k_ln2=k_float * _LN2_HI, delta=y - scaled_c)


def _ratio(magnitude: jax.Array, scale: jax.Array | float, concrete: float | None) -> jax.Array:
    """``magnitude / scale`` in float32, without an elementwise division.

    A division cannot be duplicated into the Adam moment fusions, and XLA rewrites a
    division by a constant into a multiplication by its rounded reciprocal anyway.
    The reciprocal is split into a float32 pair ``hi + lo`` (from float64 for a
    concrete scale; for a traced one, ``optax.inject_hyperparams``, by an exact
    product on the scalar), so ``m * hi + m * lo`` is within about an ulp of the
    quotient; a power of two needs only ``hi`` and the product is exact.
    """
    if concrete is None:
        inverse_hi, inverse_lo = _reciprocal_pair(jnp.asarray(scale, jnp.float32))
        return magnitude * inverse_hi + magnitude * inverse_lo
    if concrete == 1.0:
        return magnitude
    inverse = 1.0 / float(np.float32(concrete))  # the scale float32 arithmetic sees
    inverse_hi = float(np.float32(inverse))
    inverse_lo = float(np.float32(inverse - inverse_hi))
    if inverse_lo == 0.0:  # a power of two: the product is exact
        return magnitude * inverse_hi
    return magnitude * inverse_hi + magnitude * inverse_lo


def _reciprocal_pair(scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` with ``hi + lo = 1 / scale`` to about 2**-45, for a float32 scalar.

    Dekker's exact product gives the residual ``1 - scale * hi``; scalar work, paid
    once per step. Where the splitting of ``scale`` or ``hi`` could overflow (``scale``
    outside ``[1e-30, 1e30]``, or not finite), ``lo`` is 0.
    """
    hi = 1.0 / scale
    product = scale * hi
    scale_hi, scale_lo = _split(scale)
    hi_hi, hi_lo = _split(hi)
    error = ((scale_hi * hi_hi - product) + scale_hi * hi_lo + scale_lo * hi_hi) + scale_lo * hi_lo
    residual = (1.0 - product) - error
    lo = jnp.where((scale > 1e-30) & (scale < 1e30), residual * hi, 0.0)
    return hi, lo


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dekker's split of a float32 into two 12-bit halves, ``hi + lo == a`` exactly."""
    t = a * 4097.0
    hi = t - (t - a)
    return hi, a - hi


def _high_bits(a: jax.Array) -> jax.Array:
    """``a`` with the low 12 of its 23 mantissa bits cleared (12 significant bits)."""
    bits = lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _scale_sum(
    scale: jax.Array | float, concrete: float | None, head: jax.Array, tail: jax.Array
) -> jax.Array:
    """``scale * (head + tail)`` rounded about once, for a float32 ``scale``.

    ``scale * head`` rounded on its own can land in the binade above the result and
    cost a whole ulp of it. Both factors are cut to 12 significant bits instead, so
    the leading product is exact, and the small rest is added to it in one rounding.
    """
    if concrete is None:
        scale = jnp.asarray(scale, jnp.float32)
        scale_hi = _high_bits(scale)
        scale_lo = scale - scale_hi
    else:
        scale = float(np.float32(concrete))
        bits = np.array(concrete, np.float32).view(np.uint32) & np.uint32(0xFFFFF000)
        scale_hi = float(bits.view(np.float32))
        scale_lo = scale - scale_hi  # exact
    head_hi = _high_bits(head)
    rest = (head - head_hi) + tail
    return scale_hi * head_hi + (scale_lo * head_hi + scale * rest)


def _is_power_of_two(value: float) -> bool:
    """True for ``2.0 ** k``: then ``m / s`` and ``s * log1p`` are exact scalings."""
    return math.frexp(value)[0] == 0.5


def _guard_overflow(ratio, magnitude, scale, concrete_scale):
    """``(x, overflow, log_scale)``: the ratio, or the magnitude where the ratio overflowed.

    ``ratio`` is a magnitude divided by ``scale`` (:func:`_ratio`). It overflows only for a
    scale below 1 and a magnitude within a factor ``scale`` of the largest float: to
    ``inf``, to NaN (``inf + -inf`` in the two-term product of a tiny scale) or to
    ``-inf`` (XLA fusing ``m * hi + m * lo``, seen under ``jit``). There the caller takes
    ``log(m) - log(s)`` instead: ``x`` is ``m``, ``overflow`` says where (for
    :func:`_log1p_f32`'s ``take_log``) and ``log_scale`` is ``log(s)`` there, 0 elsewhere.
    The guard is left out of the compiled step when the scale is a concrete number ``>= 1``.
    """
    if concrete_scale is not None and concrete_scale >= 1.0:
        return ratio, None, 0.0
    overflow = ~((ratio >= 0.0) & (ratio < jnp.inf)) & (magnitude < jnp.inf)
    log_scale = math.log(concrete_scale) if concrete_scale is not None else jnp.log(scale)
    return jnp.where(overflow, magnitude, ratio), overflow, jnp.where(overflow, log_scale, 0.0)


def dampen_magnitude(magnitude: jax.Array, scale: jax.Array | float) -> jax.Array:
    """``scale * log1p(magnitude / scale)`` for ``magnitude >= 0``, overflow-safe.

    The ratio ``magnitude / scale`` is computed by :func:`_ratio`. It overflows to ``inf``
    only when ``scale < 1`` and the magnitude is within a factor ``scale`` of the
    largest float; there ``log1p(m / s) = log(m) - log(s)`` to far below rounding. The
    guard is left out of the compiled step when ``scale`` is a concrete number ``>= 1``.

    For float32 the result is within 2 ulp of the float64 formula for every scale in
    ``[MIN_SCALE, MAX_SCALE]`` (below 1 ulp for a concrete power of two, where the ratio
    and the product are exact).
    """
    concrete_scale = as_float(scale)
    exact = concrete_scale is not None and _is_power_of_two(concrete_scale)
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
    x, overflow, log_scale = _guard_overflow(ratio, magnitude, scale, concrete_scale)
    parts = _log1p_f32(x, overflow)
    if exact:
        out = scale * (parts.rounded() - log_scale)  # exact scaling: one rounding
    else:
        # Rounding log1p first and then the product would cost up to an ulp more
        # where the two land at opposite ends of their binades.
        head, tail = parts.split()
        out = _scale_sum(scale, concrete_scale, head, tail - log_scale)
    out = jnp.where(magnitude < jnp.inf, out, magnitude)  # +inf and NaN pass through
    out = jnp.minimum(out, magnitude)  # |out| <= |g| after rounding
    if concrete_scale != 1.0:
        # Below sqrt(2) - 1, m + s * (log1p(r) - r) does not carry the two roundings
        # of r = m * (1 / s) into the result (nor a flush of a subnormal r to zero).
        near_identity = magnitude + scale * parts.delta
        small = (ratio >= 0) & (ratio < _SQRT2_MINUS_1)  # not the -inf of a fused overflow
        out = jnp.where(small, jnp.minimum(near_identity, magnitude), out)
    return out


def with_sign_of(magnitude: jax.Array, g: jax.Array) -> jax.Array:
    """``copysign(magnitude, g)`` for ``magnitude >= 0`` (or NaN).

    For float32, the sign bit of ``g`` is OR-ed in: 3 operations instead of the 6 of
    ``jnp.copysign``, which XLA repeats in both Adam moment updates.
    """
    if magnitude.dtype != jnp.float32:
        return jnp.copysign(magnitude, g)
    sign = lax.bitcast_convert_type(g, jnp.uint32) & jnp.uint32(0x80000000)
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32) | sign
    return lax.bitcast_convert_type(bits, jnp.float32)


def power_of_two(exponent: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``2.0 ** exponent``, exactly, for an int32 ``exponent`` in ``[-126, 127]``."""
    if dtype == jnp.float64:
        return lax.bitcast_convert_type((exponent.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return _pow2_biased(exponent + 127)


def linlog_magnitude(magnitude: jax.Array, exponent: jax.Array) -> jax.Array:
    """``m`` for ``m <= s``, else ``s (1 + log(m / s))``, for ``m >= 0`` and ``s = 2**exponent``.

    The identity below the knee (bitwise) and logarithmic above it, with slope 1 at the
    knee. ``exponent`` is an int32 in ``[-66, 66]``. For float32 the log is read off the
    bits of ``m = 2**e * M``, ``M`` in ``[sqrt(1/2), sqrt(2))``:
    ``log(m / s) = (e - exponent) log(2) + log(M)``, with the Cephes polynomial for
    ``log(M)``; no division, no overflow, and the product with ``s`` is exact. The
    result is within 1 ulp of the float64 formula (measured: 0.67 ulp,
    ``tests/test_dampening.py``);
    NaN and ``+inf`` pass through. float64 uses XLA's ``log``.
    """
    scale = power_of_two(exponent, magnitude.dtype)
    if magnitude.dtype != jnp.float32:
        ratio = magnitude / scale  # exact; it can overflow only for huge m and s < 1
        log_ratio = jnp.where(
            jnp.isinf(ratio),
            jnp.log(magnitude) - exponent.astype(magnitude.dtype) * math.log(2.0),
            jnp.log(ratio),
        )
        out = jnp.minimum(scale * (1.0 + log_ratio), magnitude)
    else:
        biased_e, mantissa = _split_exponent(magnitude)  # m = 2**e * M
        f = mantissa - 1.0  # exact
        z = f * f
        y = _log_cubic(f, z) - 0.5 * z  # log(M) = f + y
        j = (biased_e - 127 - exponent).astype(jnp.float32)  # >= 0 above the knee
        # 1 + j * LN2_HI is exact (j < 256), so the sum rounds about once.
        log_part = (1.0 + j * _LN2_HI) + (f + (y + j * _LN2_LO))
        out = jnp.minimum(scale * log_part, magnitude)  # |out| <= |g| after rounding
    # Below the knee (zeros and subnormals included) the identity; +inf and NaN pass.
    return jnp.where((magnitude <= scale) | (magnitude == jnp.inf), magnitude, out)
