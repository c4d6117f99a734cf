"""sum_of_squares and global_norm (``_numerics.py``): the reductions ALRC and the knees share."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp._numerics import global_norm, norm_of_sums, sum_of_squares


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        (jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32),
        (jnp.complex64, jnp.float32),
    ],
)
def test_sum_of_squares_is_float32_for_float32_and_narrower(dtype, want):
    g = jnp.asarray([3.0, -4.0, 0.0], dtype)
    total = sum_of_squares(g)
    assert total.dtype == want and total.shape == ()
    assert float(total) == 25.0


def test_float64_stays_float64_under_x64():
    with jax.enable_x64(True):
        g = jnp.asarray([1e30, 1.0], jnp.float64)  # 1e60 overflows float32
        assert sum_of_squares(g).dtype == jnp.float64
        np.testing.assert_allclose(float(sum_of_squares(g)), 1e60, rtol=1e-15)
        z = jnp.asarray([3e30 + 4e30j], jnp.complex128)
        assert sum_of_squares(z).dtype == jnp.float64
        np.testing.assert_allclose(float(sum_of_squares(z)), 25e60, rtol=1e-15)
        norm = global_norm({"g": g, "z": z})  # the norm itself is float32
        assert norm.dtype == jnp.float32
        np.testing.assert_allclose(float(norm), np.sqrt(26e60), rtol=1e-7)


def test_half_precision_is_widened_before_squaring():
    """float16 squares overflow above 256 and underflow below 2**-12: widened, they do not."""
    big = jnp.full(16, 300.0, jnp.float16)  # 300**2 = 90000 > float16 max 65504
    np.testing.assert_allclose(float(sum_of_squares(big)), 16 * 300.0**2, rtol=1e-6)
    small = jnp.full(16, 1e-4, jnp.float16)  # 1e-8 is below float16's smallest subnormal
    want = 16 * float(np.float16(1e-4)) ** 2
    np.testing.assert_allclose(float(sum_of_squares(small)), want, rtol=1e-6)
    bf16 = jnp.full(4, 3e19, jnp.bfloat16)  # squares beyond float32: inf, not NaN
    assert float(sum_of_squares(bf16)) == np.inf


def test_complex_is_the_squared_modulus():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal(100) + 1j * rng.standard_normal(100)).astype(np.complex64)
    np.testing.assert_allclose(float(sum_of_squares(z)), np.sum(np.abs(z) ** 2), rtol=1e-5)
    assert float(global_norm({"z": jnp.asarray([3 + 4j], jnp.complex64)})) == 5.0


def test_global_norm_agrees_with_optax():
    """optax.tree.norm (formerly optax.global_norm) on a float32 tree."""
    rng = np.random.default_rng(1)
    tree = {
        "w": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(16) * 1e3, jnp.float32),
        "layers": [jnp.asarray(rng.standard_normal((4, 4)) * 1e-3, jnp.float32)],
    }
    got = global_norm(tree)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), float(optax.tree.norm(tree)), rtol=1e-6)
    leaves = [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)]
    np.testing.assert_allclose(float(got), np.linalg.norm(np.concatenate(leaves)), rtol=1e-6)


def test_global_norm_of_a_mixed_tree_is_float32():
    tree = {"a": jnp.full(4, 300.0, jnp.float16), "b": jnp.ones(2, jnp.bfloat16), "c": 2.0}
    got = global_norm(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np.sqrt(4 * 300.0**2 + 2 + 4), rtol=1e-6)


def test_global_norm_of_an_empty_tree_is_zero_and_norm_of_sums_adds_the_sums():
    assert float(global_norm({})) == 0.0 and global_norm({}).dtype == jnp.float32
    sums = [sum_of_squares(jnp.asarray([3.0])), sum_of_squares(jnp.asarray([4.0]))]
    assert float(norm_of_sums(sums)) == 5.0


def test_global_norm_works_under_jit_and_vmap():
    grads = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((3, 2))}
    per_row = jax.jit(jax.vmap(global_norm))(grads)
    want = np.sqrt(np.sum(np.arange(12.0).reshape(3, 4) ** 2, axis=1) + 2)
    np.testing.assert_allclose(per_row, want, rtol=1e-6)
