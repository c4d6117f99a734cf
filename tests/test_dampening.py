"""Tests of log_dampen and dampen against SPEC 1.1: float64 references and properties."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import dampen, log_dampen, logadam

FLOAT32_MAX = float(np.finfo(np.float32).max)


def reference(g, scale=1.0):
    """The formula of SPEC 1.1 in float64 numpy."""
    g = np.asarray(g, np.float64)
    return scale * np.sign(g) * np.log1p(np.abs(g) / scale)


finite_f32 = st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, allow_nan=False, width=32)
scales = st.sampled_from([1.0, 1e-3, 0.5, 3.0, 1e4])


@pytest.mark.parametrize("scale", [1.0, 1e-3, 0.37, 3.0, 1e4])
def test_matches_float64_reference(scale):
    rng = np.random.default_rng(0)
    g = np.concatenate(
        [
            rng.standard_normal(2000) * 10.0 ** rng.uniform(-30, 30, 2000),
            [0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, FLOAT32_MAX, -FLOAT32_MAX],
        ]
    ).astype(np.float32)
    out = np.asarray(dampen(jnp.asarray(g), scale))
    expected = reference(g, scale)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-44)


@hypothesis.given(g=finite_f32, scale=scales)
@hypothesis.settings(deadline=None, max_examples=300)
def test_odd_bounded_and_finite(g, scale):
    x = jnp.asarray([g, -g], jnp.float32)
    out = np.asarray(dampen(x, scale))
    assert np.all(np.isfinite(out))
    assert out[0] == -out[1]
    assert np.all(np.abs(out) <= np.abs(np.asarray(x)))
    assert np.sign(out[0]) == np.sign(np.float32(g)) or out[0] == 0.0


@hypothesis.given(a=finite_f32, b=finite_f32, scale=scales)
@hypothesis.settings(deadline=None, max_examples=300)
def test_monotone(a, b, scale):
    lo, hi = sorted([a, b])
    out = np.asarray(dampen(jnp.asarray([lo, hi], jnp.float32), scale))
    assert out[0] <= out[1]


def test_monotone_on_a_dense_grid():
    g = np.sort(np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 1e3)
    out = np.asarray(dampen(jnp.asarray(g)))
    assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 10.0])
def test_slope_one_at_origin(scale):
    g = jnp.asarray([1e-7, -1e-6, 1e-5], jnp.float32) * scale
    np.testing.assert_allclose(dampen(g, scale), g, rtol=1e-5)
    # And clearly not the identity beyond the knee.
    assert float(dampen(jnp.float32(10 * scale), scale)) < 0.25 * 10 * scale


@pytest.mark.parametrize("scale", [1.0, 0.5, 1e-3, 1e-20])
def test_float32_max_stays_finite(scale):
    out = dampen(jnp.asarray([FLOAT32_MAX, -FLOAT32_MAX], jnp.float32), scale)
    expected = scale * (np.log(FLOAT32_MAX) - np.log(scale))
    np.testing.assert_allclose(np.asarray(out), [expected, -expected], rtol=1e-6)
    if scale == 1.0:
        assert 88.6 < float(out[0]) < 88.8  # "float32 max maps to about 88.7*s"


def test_nan_and_inf_are_not_hidden():
    out = np.asarray(dampen(jnp.asarray([np.nan, np.inf, -np.inf, 1.0], jnp.float32)))
    assert np.isnan(out[0])
    assert out[1] == np.inf and out[2] == -np.inf
    out = np.asarray(dampen(jnp.asarray([np.nan, np.inf], jnp.float32), 0.25))
    assert np.isnan(out[0]) and out[1] == np.inf


def test_signed_zero_is_kept():
    out = np.asarray(dampen(jnp.asarray([0.0, -0.0], jnp.float32)))
    assert out[0] == 0 and not np.signbit(out[0])
    assert out[1] == 0 and np.signbit(out[1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32_and_rounded_once(dtype):
    g = jnp.asarray(np.random.default_rng(2).standard_normal(4096) * 100, dtype)
    out = dampen(g, 0.3)
    assert out.dtype == dtype
    once = dampen(g.astype(jnp.float32), 0.3).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(once, np.float32))
    # Rounding every intermediate to half precision would differ: the check is sharp.
    # (numpy, since XLA may drop a float32 -> half -> float32 round trip.)
    half = np.asarray(g)
    ratio = (np.abs(half).astype(np.float32) / 0.3).astype(half.dtype)
    log = np.log1p(ratio.astype(np.float32)).astype(half.dtype)
    twice = (np.sign(half).astype(np.float32) * 0.3 * log.astype(np.float32)).astype(half.dtype)
    assert not np.array_equal(np.asarray(twice, np.float32), np.asarray(once, np.float32))


def test_float64_inputs_are_exact_under_x64():
    with jax.enable_x64(True):
        g = jnp.asarray([1e-300, -3.5, 1e300, np.finfo(np.float64).max], jnp.float64)
        out = dampen(g, 0.5)
        assert out.dtype == jnp.float64
        expected = reference(np.asarray(g)[:3], 0.5)
        np.testing.assert_allclose(np.asarray(out)[:3], expected, rtol=1e-15)
        assert np.isfinite(np.asarray(out)[3])


def test_complex_dampens_modulus_and_keeps_phase():
    rng = np.random.default_rng(3)
    g = (rng.standard_normal(512) + 1j * rng.standard_normal(512)) * 10.0 ** rng.uniform(-4, 6, 512)
    g = np.concatenate([g, [0j]]).astype(np.complex64)
    out = np.asarray(dampen(jnp.asarray(g), 2.0))
    assert out.dtype == np.complex64
    np.testing.assert_allclose(np.abs(out), reference(np.abs(g), 2.0), rtol=1e-5)
    nonzero = np.abs(g) > 0
    np.testing.assert_allclose(np.angle(out[nonzero]), np.angle(g[nonzero]), atol=1e-5)
    assert out[-1] == 0


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_updates_are_refused(dtype):
    with pytest.raises(TypeError, match="floating-point or complex"):
        dampen(jnp.ones(3, dtype))


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf, np.ones(2), "1"])
def test_bad_scale_is_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        log_dampen(scale)


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e21, 1e38, np.float32(1e-25)])
def test_scale_outside_the_accurate_range_is_refused(scale):
    for make in (log_dampen, lambda s: dampen(jnp.ones(3), s)):
        with pytest.raises(ValueError, match=r"scale must lie in \[1e-20, 1e\+20\]"):
            make(scale)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_scales_at_the_ends_of_the_range_are_accepted(scale):
    g = jnp.asarray([1e-30, 1e-10, 1.0, 1e10, 1e30], jnp.float32)
    out = np.asarray(dampen(g, scale))
    want = scale * np.log1p(np.float64(g) / np.float64(np.float32(scale)))
    np.testing.assert_allclose(out, want, rtol=3e-7)
    log_dampen(scale)


def test_transform_on_a_tree_keeps_structure_dtypes_and_empty_state():
    params = {
        "w": jnp.zeros((3, 2), jnp.float32),
        "b": jnp.zeros((2,), jnp.bfloat16),
        "c": jnp.zeros((), jnp.float16),
    }
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e4, p.dtype), params)
    tx = log_dampen(2.0)
    state = tx.init(params)
    assert state == optax.EmptyState()
    with jax.numpy_dtype_promotion("strict"):
        updates, new_state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(leaf, np.float32), reference(1e4, 2.0), rtol=1e-2)
    assert new_state == state


def test_structure_mismatch_with_params_is_an_error_that_names_both():
    tx = log_dampen()
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(4,\), params\['w'\]"):
        tx.update({"w": jnp.zeros(4)}, tx.init(params), params)


@pytest.mark.parametrize(
    "tx", [log_dampen(), log_dampen("auto"), logadam(1e-3)], ids=["numeric", "auto", "logadam"]
)
def test_a_params_tree_unlike_the_updates_names_params_and_updates(tx):
    params = [jnp.zeros(3), jnp.zeros(2)]
    grads = {"w": jnp.zeros(3)}
    with pytest.raises(
        ValueError,
        match=r"log_dampen.*: params must have the tree structure of updates.*"
        r"updates has structure PyTreeDef\(\{'w': \*\}\), params has PyTreeDef\(\[\*, \*\]\)\."
        r" Only in updates: \['w'\]\. Only in params: \[0\], \[1\]\.",
    ):
        tx.update(grads, tx.init(grads), params)


def test_traced_scale_under_inject_hyperparams():
    tx = optax.inject_hyperparams(log_dampen)(scale=0.5)
    params = jnp.zeros(3)
    state = tx.init(params)
    grads = jnp.asarray([1e-3, 1.0, 1e30])
    updates, state = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates), reference(grads, 0.5), rtol=1e-6)
    state.hyperparams["scale"] = jnp.asarray(1e-3)  # a scale below 1 takes the guarded path
    updates, _ = jax.jit(tx.update)(jnp.full(3, FLOAT32_MAX), state, params)
    assert np.all(np.isfinite(np.asarray(updates)))


def test_chain_with_adam_damps_a_spike():
    params = jnp.zeros(4)
    spike = jnp.asarray([1.0, 1.0, 1.0, 1e8])
    plain = optax.sgd(1.0)
    damped = optax.chain(log_dampen(), optax.sgd(1.0))
    u_plain, _ = plain.update(spike, plain.init(params), params)
    u_damped, _ = damped.update(spike, damped.init(params), params)
    assert float(jnp.max(jnp.abs(u_plain))) == 1e8
    assert float(jnp.max(jnp.abs(u_damped))) < 19.0  # log1p(1e8) = 18.42


def test_a_non_float_leaf_is_named():
    grads = {"w": jnp.ones(3), "buffers": {"count": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError, match=r"updates\['buffers'\]\['count'\] has dtype int32"):
        log_dampen().update(grads, log_dampen().init(grads))
    with pytest.raises(TypeError, match=r"updates\['buffers'\]\['count'\]"):
        jax.jit(logadam(1e-3).update)(grads, logadam(1e-3).init(grads))
