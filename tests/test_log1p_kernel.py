"""The cheap-op float32 ``log1p`` kernel on its own (``optax_logdamp._log1p_kernel``).

``tests/test_dampening.py`` checks both curves built on it end to end; these tests pin
the kernel's own contract, so a change to it fails here first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optax_logdamp._log1p_kernel import _log1p_f32, power_of_two, with_sign_of

F32 = np.finfo(np.float32)


def _inputs() -> np.ndarray:
    """Non-negative normal float32 values over the whole range, plus edges."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0x00800000, 0x7F800000, size=200_000, dtype=np.int64).astype(np.uint32)
    dense = np.linspace(0.0, 4.0, 20_001, dtype=np.float32)
    edges = np.float32([0.0, F32.tiny, 1e-8, 0.41421354, 0.41421357, 1.0, 2.0**24, F32.max])
    return np.concatenate([bits.view(np.float32), dense, edges])


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    spacing = np.spacing(np.maximum(np.abs(want).astype(np.float32), F32.tiny))
    return np.abs(got.astype(np.float64) - want) / spacing.astype(np.float64)


def test_rounded_log1p_is_within_one_ulp_of_float64():
    x = _inputs()
    parts = jax.jit(_log1p_f32)(jnp.asarray(x))
    want = np.log1p(x.astype(np.float64))
    assert _ulps(np.asarray(parts.rounded()), want).max() < 1.0


def test_split_parts_sum_to_log1p_within_half_an_ulp():
    x = _inputs()
    head, tail = jax.jit(lambda v: _log1p_f32(v).split())(jnp.asarray(x))
    total = np.asarray(head, np.float64) + np.asarray(tail, np.float64)
    want = np.log1p(x.astype(np.float64))
    assert _ulps(total, want).max() < 0.5  # unrounded: scale * (head + tail) rounds once


def test_delta_is_log1p_minus_x_within_half_an_ulp_of_x():
    x = np.concatenate([np.geomspace(1e-30, 1e-3, 20_001), np.linspace(1e-3, 0.414, 50_001)])
    x = x.astype(np.float32)
    delta = np.asarray(jax.jit(lambda v: _log1p_f32(v).delta)(jnp.asarray(x)), np.float64)
    x64 = x.astype(np.float64)
    error = np.abs(delta - (np.log1p(x64) - x64)) / np.spacing(x).astype(np.float64)
    assert error.max() < 0.5


def test_take_log_gives_log_where_asked():
    x = np.float32([1e-30, 1e-3, 1.0, 3.0, 1e30, F32.max])
    got = jax.jit(lambda v: _log1p_f32(v, jnp.ones(v.shape, bool)).rounded())(jnp.asarray(x))
    assert _ulps(np.asarray(got), np.log(x.astype(np.float64))).max() < 1.0


def test_nan_gives_nan_parts():
    parts = _log1p_f32(jnp.float32([np.nan, 1.0, np.nan]))
    np.testing.assert_array_equal(np.isnan(np.asarray(parts.rounded())), [True, False, True])


def test_with_sign_of_is_copysign_for_every_sign():
    magnitude = jnp.float32([0.0, 1.5, np.inf, np.nan, 0.0, 2.0])
    g = jnp.float32([-0.0, -3.0, -1.0, -2.0, 0.0, np.nan])
    got = np.asarray(with_sign_of(magnitude, g))
    want = np.copysign(np.asarray(magnitude), np.asarray(g))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(got, want)


def test_power_of_two_is_exact_in_both_widths():
    exponents = np.arange(-126, 128, dtype=np.int32)
    got = np.asarray(jax.jit(power_of_two)(jnp.asarray(exponents)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.ldexp(np.float32(1), exponents))
    with jax.enable_x64(True):
        got = np.asarray(power_of_two(jnp.asarray(exponents), jnp.float64))
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, np.ldexp(1.0, exponents))
