"""Log dampening: compress every gradient element logarithmically."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from optax_logdamp._log1p_kernel import MAX_SCALE, MIN_SCALE, dampen_magnitude, with_sign_of
from optax_logdamp._validation import as_float, check_inexact_leaves, check_positive


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


def _cast_scale(scale: chex.Numeric, dtype: jnp.dtype) -> jax.Array | float:
    """A Python number stays weakly typed; an array is cast to the compute dtype."""
    return scale if isinstance(scale, (int, float)) else jnp.asarray(scale, dtype)


def dampen(g: jax.Array, scale: chex.Numeric = 1.0) -> jax.Array:
    """Log-dampens one array: ``scale * sign(g) * log1p(|g| / scale)``.

    Real inputs keep their sign; complex inputs keep their phase and have their
    modulus dampened. Half-precision inputs are computed in float32 and rounded
    once; the output has the input's dtype and shape.

    Args:
      g: the array to dampen.
      scale: the knee, a number in ``[1e-20, 1e20]``; the map is close to the
        identity for ``|g| << scale`` and logarithmic above it.

    Returns:
      The dampened array, same shape and dtype as ``g``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_logdamp import dampen
      >>> dampen(jnp.array([-1e6, -1.0, 0.0, 1e-3, 1e6]))
      Array([-1.3815512e+01, -6.9314718e-01,  0.0000000e+00,  9.9950039e-04,
              1.3815512e+01], dtype=float32)
    """
    _check_scale(scale)
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        magnitude = jnp.abs(g)
        damped = dampen_magnitude(magnitude, _cast_scale(scale, magnitude.dtype))
        # g * (damped / |g|) keeps the phase; at g == 0 the factor is taken as 1.
        factor = jnp.where(magnitude > 0, damped / jnp.where(magnitude > 0, magnitude, 1), 1)
        out = g * factor.astype(g.dtype)
    elif jnp.issubdtype(g.dtype, jnp.floating):
        compute_dtype = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        wide = g.astype(compute_dtype)
        damped = dampen_magnitude(jnp.abs(wide), _cast_scale(scale, compute_dtype))
        out = with_sign_of(damped, wide).astype(g.dtype)
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
    kept. Complex updates keep their phase and have their modulus dampened. For
    float32 updates every result is within 2 ulp of the float64 formula (within 1 ulp
    when ``scale`` is a power of two, the default 1 included; XLA may flush a subnormal
    input to zero).

    Args:
      scale: the knee :math:`s`, in the units of the gradient, in ``[1e-20, 1e20]``
        (beyond, float32 intermediates would leave the normal range). Gradients much
        smaller than ``scale`` pass almost unchanged. May be a traced array
        (``optax.inject_hyperparams``); a traced value is not checked, and outside
        that range float32 results lose accuracy.

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
    _check_scale(scale)

    def update_fn(updates, state, params=None):
        if params is not None:
            chex.assert_trees_all_equal_shapes(updates, params)
        check_inexact_leaves("log_dampen", updates)
        return jax.tree.map(lambda g: dampen(g, scale), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
