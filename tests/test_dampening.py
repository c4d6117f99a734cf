"""log_dampen and dampen (``_dampening.py``): both curves and the automatic knee.

A numeric scale ``s`` dampens with the post's curve, ``s sign(g) log1p(|g| / s)``
("log1p"). ``scale="auto"`` uses the "linlog" curve, the identity up to each tensor's
knee and ``s (1 + log(|g| / s))`` above it, with the knee at 3x the tensor's running
RMS. Both curves are checked at fixed scales against float64 references and for their
properties (the linlog one through ``dampen_above_knee``, at the powers of two the knee
takes); the automatic knee through ``log_dampen("auto")``.
"""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import LogDampenState, dampen, log_dampen
from optax_logdamp._dampening import (
    NO_STATISTIC,
    auto_knee,
    dampen_above_knee,
    knee_exponent,
)

F32 = np.finfo(np.float32)
CURVES = ("log1p", "linlog")
POWER_OF_TWO_SCALES = [1.0, 0.5, 2.0**-10, 2.0**40, 2.0**-66, 2.0**66]
OTHER_SCALES = [3.0, 0.1, 1e-3, 0.37, 7.1e-9, 123456.7, 0.999, 1e-20, 1e20]
# Within this many float32 ulps of float64 (measured: log1p 0.8 ulp for a power of two,
# 1.45 for any other scale; linlog 0.67 ulp at its power-of-two knees).
MAX_ULP = {"log1p": 2.0, "linlog": 1.0}
# The scales each curve takes: linlog's knee is always a power of two.
SCALES = {"log1p": POWER_OF_TWO_SCALES + OTHER_SCALES, "linlog": POWER_OF_TWO_SCALES}


def exponent_of(scale):
    """``k`` for a knee ``2.0**k``."""
    k = int(np.log2(float(scale)))
    assert 2.0**k == float(scale), f"the automatic knee is a power of two, not {scale}"
    return k


def curve(name):
    """The float32 curve ``(g, scale) -> dampened``: the public ``dampen`` for log1p."""
    if name == "log1p":
        return dampen
    return lambda g, s: dampen_above_knee(g, jnp.int32(exponent_of(s)))


def traced_curve(name):
    """The curve jitted with its scale (log1p) or knee exponent (linlog) an argument."""
    if name == "log1p":
        return lambda g, s: jax.jit(dampen)(g, jnp.float32(s))
    return lambda g, s: jax.jit(dampen_above_knee)(g, jnp.int32(exponent_of(s)))


def reference(name, g, scale, scale_dtype=np.float32):
    """The curve in float64, for the scale the arithmetic of ``scale_dtype`` sees."""
    g = np.asarray(g, np.float64)
    s = float(np.asarray(scale, scale_dtype))
    m = np.abs(g)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # m / s may overflow
        if name == "log1p":
            ratio = m / s
            out = s * np.where(np.isinf(ratio), np.log(m) - np.log(s), np.log1p(ratio))
        else:
            out = np.where(m <= s, m, s * (1 + np.log(m) - np.log(s)))
    return np.sign(g) * out


def ulps(got, want):
    """|got - want| in float32 ulps of ``want`` (normal-range ulps below the normals)."""
    spacing = np.spacing(np.maximum(np.abs(want).astype(np.float32), F32.tiny))
    return np.abs(got.astype(np.float64) - want) / spacing.astype(np.float64)


def magnitudes(scale, seed=0):
    """Float32 magnitudes over the whole range (random bit patterns), a dense band from 0
    to 8 scales, a band just above the scale, and edge values."""
    rng = np.random.default_rng(seed)
    s = np.float32(scale)
    bits = rng.integers(0, 0x7F800000, size=200_000, dtype=np.int64).astype(np.uint32)
    dense = s * np.linspace(0.0, 8.0, 50_001)
    near = s * (1 + 10.0 ** rng.uniform(-8, 1.5, 50_000))
    edges = [0.0, F32.smallest_subnormal, F32.tiny, 1e-30, 0.41421357 * s, s, 2 * s, 1e30]
    edges += [np.nextafter(s, np.float32(np.inf)), np.nextafter(s, np.float32(0))]
    edges += [F32.max / 2, np.nextafter(F32.max, 0, dtype=np.float32), F32.max]
    values = np.concatenate([bits.view(np.float32), dense, near, edges]).astype(np.float32)
    return values[np.isfinite(values)]


# ----------------------------------------------------------------- accuracy of the curves


@pytest.mark.parametrize("traced", [False, True], ids=["python_scale", "traced_scale"])
@pytest.mark.parametrize("name", CURVES)
def test_within_a_few_ulp_of_float64(name, traced):
    """Every float32 magnitude, both signs, every scale: against the float64 curve."""
    run = traced_curve(name) if traced else curve(name)
    for scale in SCALES[name]:
        m = magnitudes(scale)
        g = np.concatenate([m, -m])
        got = np.asarray(run(g, scale))
        # A power of two scales exactly: only log1p's own error (below 1 ulp) is left,
        # where the ratio g / s does not overflow (there log(g) - log(s) rounds twice).
        exact = name == "log1p" and scale in POWER_OF_TWO_SCALES
        ratio_finite = np.abs(g.astype(np.float64)) / np.float32(scale) < F32.max
        bound = np.where(exact & ratio_finite, 1.0, MAX_ULP[name])
        # XLA on CPU flushes subnormal inputs to zero: a flushed input may give zero.
        flushed = (np.abs(g) < F32.tiny) & (got == 0)
        excess = np.where(flushed, 0.0, ulps(got, reference(name, g, scale)) / bound)
        worst = int(np.argmax(excess))
        assert excess[worst] <= 1.0, (
            f"scale={scale}: {excess[worst] * bound[worst]:.2f} ulp (bound {bound[worst]}) at "
            f"g={g[worst]!r}: got {got[worst]!r}"
        )
        assert np.all(np.signbit(got) == np.signbit(g))


def runners(name, scale):
    """The curve at ``scale``: eager, jitted with the scale a constant, and traced."""
    fn = curve(name)
    return {
        "eager": lambda g: fn(g, scale),
        "jit": jax.jit(lambda g: fn(g, scale)),
        "traced": lambda g: traced_curve(name)(g, scale),
    }


@pytest.mark.parametrize(
    ("name", "scale"),
    [("log1p", s) for s in (1.0, 0.5, 3.0, 1e-3, 1e-20, 7.1e-9, 1e20)]
    + [("linlog", s) for s in (1.0, 0.5, 4.0, 2.0**-10, 2.0**-66, 2.0**66)],
)
def test_huge_inputs_stay_finite_and_nan_stays_nan(name, scale):
    g = np.float32([np.nan, -np.nan, F32.max, -F32.max, 3e38, 2.2e38, 1e38])
    for run in runners(name, scale).values():
        # Tiled: XLA vectorises as in training (a fused m * hi + m * lo once gave -inf).
        got = np.asarray(run(jnp.tile(g, 64)))[: len(g)]
        assert np.isnan(got[0]) and np.isnan(got[1])
        assert np.all(np.isfinite(got[2:]))
        assert ulps(got[2:], reference(name, g[2:], scale)).max() <= MAX_ULP[name]
    if scale == 1.0 and name == "log1p":
        assert 88.6 < float(curve(name)(jnp.float32(F32.max), 1.0)) < 88.8  # about 88.7 s


@pytest.mark.parametrize(
    ("name", "scale", "how"),
    [
        ("log1p", 1.0, "eager"),
        ("log1p", 0.25, "jit"),
        ("log1p", 1e-20, "eager"),
        ("log1p", 1.7, "traced"),
        ("log1p", 3.0, "eager"),  # 1 / 3 rounds up: the ratio of inf is NaN
        ("log1p", 7.0, "jit"),
        ("log1p", 1.0, "traced"),  # a traced reciprocal's low part times inf is NaN
        ("linlog", 1.0, "eager"),
        ("linlog", 4.0, "jit"),
        ("linlog", 1.0, "traced"),
        ("linlog", 2.0**-66, "traced"),
    ],
)
def test_infinities_pass_through(name, scale, how):
    g = jnp.tile(jnp.float32([np.inf, -np.inf, 1.0]), 64)
    got = np.asarray(runners(name, scale)[how](g))[:3]
    assert got[0] == np.inf and got[1] == -np.inf and np.isfinite(got[2])


@pytest.mark.parametrize("name", CURVES)
def test_float64_inputs_match_the_reference_under_x64(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        g = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-30, 300, 20_000)
        g = np.concatenate([g, [1e-300, -3.5, np.finfo(np.float64).max]])
        for scale in [1.0, 0.37, 1e-20] if name == "log1p" else [1.0, 0.5, 2.0**-66]:
            got = np.asarray(curve(name)(jnp.asarray(g), scale))
            assert got.dtype == np.float64
            want = reference(name, g, scale, scale_dtype=np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-14)
            assert np.all(np.isfinite(got)) and np.all(np.abs(got) <= np.abs(g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", CURVES)
def test_half_precision_is_computed_in_float32_and_rounded_once(name, dtype):
    g = jnp.asarray(np.random.default_rng(2).standard_normal(4096) * 100, dtype)
    scale = 0.3 if name == "log1p" else 0.25
    out = curve(name)(g, scale)
    assert out.dtype == dtype
    once = curve(name)(g.astype(jnp.float32), scale).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(once, np.float32))
    if name == "log1p":
        # Rounding every intermediate to half precision would differ: the check is sharp.
        # (numpy, since XLA may drop a float32 -> half -> float32 round trip.)
        half = np.asarray(g)
        ratio = (np.abs(half).astype(np.float32) / 0.3).astype(half.dtype)
        log = np.log1p(ratio.astype(np.float32)).astype(half.dtype)
        twice = (np.sign(half).astype(np.float32) * 0.3 * log.astype(np.float32)).astype(half.dtype)
        assert not np.array_equal(np.asarray(twice, np.float32), np.asarray(once, np.float32))


@pytest.mark.parametrize("name", CURVES)
def test_complex_dampens_the_modulus_and_keeps_the_phase(name):
    rng = np.random.default_rng(3)
    z = (rng.standard_normal(512) + 1j * rng.standard_normal(512)) * 10.0 ** rng.uniform(-4, 6, 512)
    z = np.concatenate([z, [0j]]).astype(np.complex64)
    scale = 0.37 if name == "log1p" else 0.5
    out = np.asarray(curve(name)(jnp.asarray(z), scale))
    assert out.dtype == np.complex64
    modulus = np.abs(z)
    np.testing.assert_allclose(np.abs(out), reference(name, modulus, scale), rtol=1e-5)
    nonzero = modulus > 0
    np.testing.assert_allclose(np.angle(out[nonzero]), np.angle(z[nonzero]), atol=1e-5)
    assert out[-1] == 0
    if name == "linlog":
        below = modulus <= np.float32(scale)
        assert below.any()
        np.testing.assert_array_equal(out[below], z[below])


# ----------------------------------------------------------------- properties of the curves

finite_f32 = st.floats(-F32.max, F32.max, allow_nan=False, width=32)
scales = st.sampled_from([1.0, 1e-3, 0.37, 3.0, 1e4, 2.0**-20, 1e-20, 1e20])
powers_of_two = st.sampled_from([1.0, 2.0**-20, 2.0**-66, 2.0**40, 2.0**66])


def variant_scale(name, data):
    return data.draw(powers_of_two if name == "linlog" else scales)


@pytest.mark.parametrize("name", CURVES)
@hypothesis.given(g=finite_f32, data=st.data())
@hypothesis.settings(deadline=None, max_examples=200)
def test_odd_never_amplifies_keeps_the_sign_and_finite(name, g, data):
    scale = variant_scale(name, data)
    x = jnp.asarray([g, -g], jnp.float32)
    out = np.asarray(curve(name)(x, scale))
    assert np.all(np.isfinite(out))
    assert out[0] == -out[1]
    assert np.all(np.abs(out) <= np.abs(np.asarray(x)))
    assert np.sign(out[0]) == np.sign(np.float32(g)) or out[0] == 0.0


@pytest.mark.parametrize("name", CURVES)
@hypothesis.given(a=finite_f32, b=finite_f32, data=st.data())
@hypothesis.settings(deadline=None, max_examples=200)
def test_monotone(name, a, b, data):
    scale = variant_scale(name, data)
    lo, hi = sorted([a, b])
    out = np.asarray(curve(name)(jnp.asarray([lo, hi], jnp.float32), scale))
    assert out[0] <= out[1]


@pytest.mark.parametrize(
    ("name", "scale"),
    [("log1p", 1.0), ("log1p", 0.37), ("log1p", 1e-3), ("linlog", 1.0), ("linlog", 2.0**-10)],
)
def test_monotone_on_dense_grids_across_the_knee(name, scale):
    s = np.float32(scale)
    rng = np.random.default_rng(3)
    g = np.sort(
        np.concatenate(
            [
                s * rng.uniform(-3, 3, 200_000),
                s * 10.0 ** rng.uniform(-3, 20, 100_000),
                np.arange(-2000, 2000) * np.spacing(s) + s,  # every float32 around the knee
            ]
        ).astype(np.float32)
    )
    out = np.asarray(jax.jit(lambda g: curve(name)(g, scale))(g))
    assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 10.0])
def test_log1p_has_slope_one_at_the_origin(scale):
    g = jnp.asarray([1e-7, -1e-6, 1e-5], jnp.float32) * scale
    np.testing.assert_allclose(dampen(g, scale), g, rtol=1e-5)
    # And clearly not the identity beyond the knee.
    assert float(dampen(jnp.float32(10 * scale), scale)) < 0.25 * 10 * scale


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0**-66, 2.0**15])
def test_linlog_is_the_identity_below_the_knee_bitwise(scale):
    s = np.float32(scale)
    rng = np.random.default_rng(2)
    m = (s * rng.uniform(0, 1, 50_000)).astype(np.float32)
    m = np.concatenate([m, [0.0, s, np.nextafter(s, np.float32(0))]]).astype(np.float32)
    g = np.concatenate([m, -m, [-0.0]]).astype(np.float32)
    got = np.asarray(jax.jit(lambda g: curve("linlog")(g, scale))(g))
    normal = np.abs(g) >= F32.tiny  # XLA on CPU may flush a subnormal input to zero
    np.testing.assert_array_equal(got.view(np.uint32)[normal], g.view(np.uint32)[normal])
    assert np.all(np.signbit(got) == np.signbit(g))


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0**-8])
def test_linlog_has_slope_one_on_both_sides_of_the_knee(scale):
    """C1: the numerical derivative is 1 just below and just above the knee."""
    with jax.enable_x64(True):
        s = float(np.float32(scale))
        f = jax.jit(lambda g: curve("linlog")(g, scale))
        for h in (1e-4 * s, 1e-6 * s):
            knee = np.float64(s)
            left = (f(knee) - f(knee - h)) / h
            right = (f(knee + h) - f(knee)) / h
            np.testing.assert_allclose(float(left), 1.0, rtol=1e-9)
            np.testing.assert_allclose(float(right), 1.0, atol=h / s)  # 1 - h / 2s + ...
    h = np.float32(1e-3 * scale)  # float32, coarser: both slopes within 1e-3 of 1
    s32 = np.float32(scale)
    x = jnp.float32([s32 - h, s32, s32 + h])
    y = np.asarray(curve("linlog")(x, scale), np.float64)
    np.testing.assert_allclose(np.diff(y) / np.diff(np.asarray(x, np.float64)), 1.0, atol=2e-3)


@pytest.mark.parametrize("name", CURVES)
def test_signed_zero_is_kept(name):
    out = np.asarray(curve(name)(jnp.asarray([0.0, -0.0], jnp.float32), 0.5))
    assert out[0] == 0 and not np.signbit(out[0])
    assert out[1] == 0 and np.signbit(out[1])


@pytest.mark.parametrize("scale", [1.0, 0.5, 4.0, 2.0**-12])
@pytest.mark.parametrize("c", [2.0**-20, 2.0**-1, 2.0**13])
def test_linlog_scale_invariance_is_exact_for_powers_of_two(scale, c):
    """f_{c s}(c m) = c f_s(m), bitwise for c a power of two (no overflow, no subnormals):
    what makes ``"auto"`` work in any units."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal(50_000) * scale * 10.0 ** rng.uniform(-3, 6, 50_000)
    g = g.astype(np.float32)
    base = np.asarray(curve("linlog")(g, scale))
    got = np.asarray(curve("linlog")(g * np.float32(c), scale * c))
    np.testing.assert_array_equal(got, base * np.float32(c))


@pytest.mark.parametrize("name", CURVES)
def test_no_log_or_division_on_full_size_arrays(name):
    """The float32 curves are built from fusible operations (see ``_log1p_kernel``)."""
    programs = [
        jax.jit(lambda g, s=scale: curve(name)(g, s)).lower(jnp.ones(1000))
        for scale in ((0.37, 1.0, 1e-3) if name == "log1p" else (1.0, 2.0**-10))
    ]
    traced = dampen if name == "log1p" else dampen_above_knee  # a traced scale or knee
    programs.append(jax.jit(traced).lower(jnp.ones(1000), 0.25 if name == "log1p" else 3))
    for program in programs:
        lines = program.as_text().splitlines()
        assert any("tensor<1000x" in line for line in lines)
        for line in lines:
            if any(f"stablehlo.{op} " in line for op in ("log", "log_plus_one", "divide")):
                assert "tensor<1000x" not in line, line


# ----------------------------------------------------------------- the scale


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf, np.ones(2), "1", "adaptive"])
def test_a_bad_scale_is_refused(scale):
    with pytest.raises(ValueError, match="scale"):
        log_dampen(scale)
    with pytest.raises(ValueError, match="scale"):
        dampen(jnp.ones(3), scale)


@pytest.mark.parametrize("scale", [1e-21, 1e-30, 1e21, 1e38, np.float32(1e-25)])
def test_a_scale_outside_the_accurate_range_is_refused(scale):
    with pytest.raises(ValueError, match=r"scale must lie in \[1e-20, 1e\+20\]"):
        log_dampen(scale)
    with pytest.raises(ValueError, match=r"scale must lie in \[1e-20, 1e\+20\]"):
        dampen(jnp.ones(3), scale)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_scales_at_the_ends_of_the_range_are_accepted(scale):
    g = jnp.asarray([1e-30, 1e-10, 1.0, 1e10, 1e30], jnp.float32)
    np.testing.assert_allclose(dampen(g, scale), reference("log1p", g, scale), rtol=3e-7)
    log_dampen(scale)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_input_is_refused(dtype):
    with pytest.raises(TypeError, match="floating-point or complex"):
        dampen(jnp.ones(3, dtype))


# ----------------------------------------------------------------- log_dampen(scale)


def test_the_transform_dampens_every_leaf_keeps_dtypes_and_is_stateless():
    params = {
        "w": jnp.zeros((3, 2), jnp.float32),
        "b": jnp.zeros((2,), jnp.bfloat16),
        "c": jnp.zeros((), jnp.float16),
        "z": jnp.zeros((2,), jnp.complex64),
    }
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e4, p.dtype), params)
    grads["w"] = jnp.asarray(np.random.default_rng(7).standard_normal((3, 2)) * 1e3, jnp.float32)
    tx = log_dampen(2.0)
    state = tx.init(params)
    assert state == optax.EmptyState()
    with jax.numpy_dtype_promotion("strict"):
        updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert new_state == state
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
    updates, _ = tx.update(grads, state, params)  # eager, as dampen: bitwise the same
    chex.assert_trees_all_equal(updates, jax.tree.map(lambda g: dampen(g, 2.0), grads))
    np.testing.assert_allclose(float(updates["c"]), reference("log1p", 1e4, 2.0), rtol=1e-3)


def test_a_traced_scale_under_inject_hyperparams():
    tx = optax.inject_hyperparams(log_dampen)(scale=0.37)
    g = jnp.asarray(np.random.default_rng(10).standard_normal(1000) * 5, jnp.float32)
    state = tx.init(g)
    got, state = jax.jit(tx.update)(g, state)
    assert ulps(np.asarray(got), reference("log1p", g, 0.37)).max() <= MAX_ULP["log1p"]
    state.hyperparams["scale"] = jnp.asarray(1e-3)  # a scale below 1 takes the guarded path
    updates, _ = jax.jit(tx.update)(jnp.full(3, F32.max), state)
    assert np.all(np.isfinite(np.asarray(updates)))


def test_in_front_of_sgd_a_spike_is_compressed():
    params = jnp.zeros(4)
    spike = jnp.asarray([1.0, 1.0, 1.0, 1e8])
    plain, damped = optax.sgd(1.0), optax.chain(log_dampen(), optax.sgd(1.0))
    u_plain, _ = plain.update(spike, plain.init(params), params)
    u_damped, _ = damped.update(spike, damped.init(params), params)
    assert float(jnp.max(jnp.abs(u_plain))) == 1e8
    assert float(jnp.max(jnp.abs(u_damped))) < 19.0  # log1p(1e8) = 18.42


# ----------------------------------------------------------------- log_dampen("auto")


def auto_reference(grads, multiple=3.0, decay=0.999):
    """The automatic knee in float64 for one tensor: the dampened updates of every step.

    The knee is ``multiple`` times the running geometric mean of the tensor's RMS over
    the previous steps (an exponential moving average of ``log(mean(g**2))``,
    bias-corrected), rounded to the nearest power of two; the curve is linlog; a
    tensor with no scale yet passes unchanged.
    """
    count, log_mean_square, outputs = 0, 0.0, []
    for g in grads:
        g = np.asarray(g, np.float64)
        if count > 0:
            log_rms = 0.5 * log_mean_square / (1 - decay**count)
            knee = 2.0 ** np.round(np.log2(multiple * np.exp(log_rms)))
            out = reference("linlog", g, knee, scale_dtype=np.float64)
        else:
            out = g
        mean_square = np.mean(g**2)
        if 0 < mean_square < np.inf:
            log_mean_square = decay * log_mean_square + (1 - decay) * np.log(mean_square)
            count += 1
        outputs.append(out)
    return np.asarray(outputs)


def gradient_sequence(num_steps, seed, shape=(64,), spike_rate=0.02):
    """Heavy-tailed gradients with a drifting scale and occasional 10x-1000x spikes."""
    rng = np.random.default_rng(seed)
    scale = 1e-3 * np.exp(np.cumsum(0.01 * rng.standard_normal(num_steps)))
    per_step = (-1,) + (1,) * len(shape)
    grads = rng.standard_t(4, size=(num_steps, *shape)) * scale.reshape(per_step)
    spikes = rng.random(num_steps) < spike_rate
    grads[spikes] *= 10.0 ** rng.uniform(1, 3, spikes.sum()).reshape(per_step)
    return grads.astype(np.float32)


def run(tx, grads):
    """Feeds a sequence of update trees to ``tx`` in one jitted scan; returns the outputs."""
    state = tx.init(jax.tree.map(lambda g: g[0], grads))

    def step(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    state, outputs = jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(state, grads)
    return outputs, state


def test_auto_matches_a_float64_reference_over_a_long_sequence():
    grads = {"w": gradient_sequence(2000, seed=1), "b": gradient_sequence(2000, 2, (3, 5))}
    outputs, _ = run(log_dampen("auto"), grads)
    for name, g in grads.items():
        want = auto_reference(g)
        np.testing.assert_allclose(np.asarray(outputs[name]), want, rtol=2e-5, atol=0)
        bent = np.abs(want) < 0.5 * np.abs(g.astype(np.float64))
        assert bent.any(axis=tuple(range(1, g.ndim))).mean() > 0.01  # spikes are cut
        unchanged = want == g
        assert unchanged.mean() > 0.9  # ordinary elements pass unchanged


def test_auto_is_linlog_at_the_knee_its_state_gives():
    """Each tensor is dampened by the linlog curve at ``auto_knee`` of its state (before
    the step), bitwise; elements below that knee pass bitwise unchanged."""
    rng = np.random.default_rng(11)
    params = {"w": jnp.zeros(64), "b": jnp.zeros(8)}
    tx = log_dampen("auto")
    state = tx.init(params)
    for step in range(12):
        size = 1e-3 * (100.0 if step == 9 else 1.0)  # one spike
        grads = {
            key: jnp.asarray(rng.standard_normal(p.shape) * size, jnp.float32)
            for key, p in params.items()
        }
        knees = jax.tree.map(auto_knee, state.log_mean_square)
        state_before = state
        out, state = tx.update(grads, state)
        for key in params:
            if step == 0:
                np.testing.assert_array_equal(out[key], grads[key])  # no knee yet
                continue
            knee = knees[key]
            exponent = knee_exponent(state_before.log_mean_square[key])
            want = dampen_above_knee(grads[key], exponent)
            np.testing.assert_array_equal(out[key], want)
            below = np.abs(np.asarray(grads[key])) <= float(knee)
            np.testing.assert_array_equal(
                np.asarray(out[key])[below], np.asarray(grads[key])[below]
            )
        if step == 9:  # the spike is dampened
            peak = np.abs(np.asarray(grads["w"])).max()
            assert np.all(np.abs(np.asarray(out["w"])) < 0.1 * peak)


@pytest.mark.parametrize("factor", [2.0**-20, 0.5, 2.0**20])
def test_auto_dampens_each_tensor_in_its_own_units(factor):
    """Multiplying one tensor's gradients by 2**j multiplies its dampened updates by 2**j."""
    grads = {"w": gradient_sequence(400, seed=3), "b": gradient_sequence(400, 4, (8,))}
    base, _ = run(log_dampen("auto"), grads)
    scaled, _ = run(log_dampen("auto"), {"w": grads["w"] * np.float32(factor), "b": grads["b"]})
    np.testing.assert_allclose(scaled["w"], np.asarray(base["w"]) * factor, rtol=1e-6)
    np.testing.assert_array_equal(scaled["b"], base["b"])


def test_the_knee_is_the_nearest_power_of_two_to_three_running_rms():
    rng = np.random.default_rng(2)
    rms = 10.0 ** rng.uniform(-19, 19, 100_000)  # 3 x rms within 2**+-66
    log_mean_square = jnp.asarray(2 * np.log(rms), jnp.float32)
    k = np.asarray(jax.jit(knee_exponent)(log_mean_square))
    target = np.log2(3 * rms)
    assert np.all(np.abs(k - target) <= 0.5 + 1e-4)  # the nearest on a log scale
    knee = np.asarray(auto_knee(log_mean_square), np.float64)
    np.testing.assert_array_equal(knee, 2.0**k)
    # Beyond 2**+-66 the knee stops (within [1e-20, 1e20], where the curve is accurate).
    edges = jnp.float32([2 * np.log(1e-30), 2 * np.log(1e30)])
    np.testing.assert_array_equal(knee_exponent(edges), [-66, 66])


@pytest.mark.parametrize("factor", [1e-6, 3.0, 1e4])
def test_the_auto_knee_follows_any_unit_change_within_sqrt2(factor):
    """For any c > 0 the knee scales with c up to the power-of-two rounding."""
    grads = gradient_sequence(400, seed=3)
    _, base = run(log_dampen("auto"), {"w": grads})
    _, scaled = run(log_dampen("auto"), {"w": grads * np.float32(factor)})
    # The running log mean square shifts by 2 log(c): the knee scales by c.
    shift = scaled.log_mean_square["w"] - base.log_mean_square["w"]
    np.testing.assert_allclose(np.exp(0.5 * shift), factor, rtol=1e-3)
    ratio = float(auto_knee(scaled.log_mean_square["w"])) / float(
        auto_knee(base.log_mean_square["w"])
    )
    assert factor / 2 <= ratio <= factor * 2  # each knee within sqrt(2) of its 3 RMS


def test_first_step_and_all_zero_tensors_pass_unchanged():
    tx = log_dampen("auto")
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(2)}
    state = tx.init(params)
    spike = {"w": jnp.array([1e6, -1.0, 3.0, 0.0]), "frozen": jnp.zeros(2)}
    updates, state = tx.update(spike, state)  # no scale yet: unchanged
    chex.assert_trees_all_equal(updates, spike)
    for _ in range(5):
        updates, state = tx.update({"w": jnp.ones(4), "frozen": jnp.zeros(2)}, state)
    wakes = {"w": jnp.ones(4), "frozen": jnp.array([5.0, -7.0])}
    updates, state = tx.update(wakes, state)  # zeros so far: still no scale for "frozen"
    np.testing.assert_array_equal(updates["frozen"], wakes["frozen"])
    assert int(state.count) == 7
    # Its first folded step is taken as is: log(mean([25, 49])).
    assert float(state.log_mean_square["frozen"]) == pytest.approx(np.log(37.0))


def test_a_spike_is_compressed_and_barely_moves_the_knee():
    rng = np.random.default_rng(0)
    grads = (1e-3 * rng.standard_normal((300, 256))).astype(np.float32)
    grads[200] *= 100.0
    outputs, _ = run(log_dampen("auto"), {"w": grads})
    rms = np.sqrt(np.mean(np.square(np.asarray(outputs["w"])), axis=1))
    assert rms[200] < 20 * np.median(rms)  # 100x in, about 13x out (knee near 3-4 RMS)
    assert rms[201] > 0.9 * rms[199]  # the next ordinary step is judged as before


def test_non_finite_updates_stay_non_finite_and_do_not_touch_the_scale():
    tx = log_dampen("auto")
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    for _ in range(4):
        _, state = tx.update({"w": jnp.ones(3), "b": jnp.ones(2)}, state)
    broken = {"w": jnp.array([np.nan, np.inf, -np.inf]), "b": jnp.ones(2)}
    updates, new_state = tx.update(broken, state)
    np.testing.assert_array_equal(updates["w"], [np.nan, np.inf, -np.inf])
    # The broken tensor's scale is untouched; the other tensor's folds as usual.
    assert new_state.log_mean_square["w"] == state.log_mean_square["w"]
    assert new_state.count == state.count + 1
    assert all(np.isfinite(leaf) for leaf in jax.tree.leaves(new_state))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_auto_keeps_dtypes_and_its_statistics_are_float32(dtype):
    tx = log_dampen("auto")
    params = {"w": jnp.zeros(8, dtype)}
    state = tx.init(params)
    for value in (1.0, 1.0, 50.0):
        updates, state = tx.update({"w": jnp.full(8, value, dtype)}, state)
    assert updates["w"].dtype == dtype
    assert state.log_mean_square["w"].dtype == jnp.float32
    assert state.count.dtype == jnp.int32
    # After two steps of ones the knee is pow2(3 * 1) = 4: 50 -> 4 (1 + log(50 / 4)).
    np.testing.assert_allclose(float(updates["w"][0]), 4 * (1 + np.log(12.5)), rtol=1e-2)


def test_auto_on_complex_updates_keeps_their_phase():
    tx = log_dampen("auto")
    state = tx.init(jnp.zeros(3, jnp.complex64))
    for _ in range(3):
        _, state = tx.update(jnp.full(3, 1 + 1j, jnp.complex64), state)
    g = jnp.array([100 + 100j, -3j, 0.5], jnp.complex64)
    out = np.asarray(tx.update(g, state)[0])
    np.testing.assert_allclose(np.angle(out), np.angle(np.asarray(g)), atol=1e-6)
    assert np.all(np.abs(out) <= np.abs(np.asarray(g)))
    assert np.abs(out[0]) < 0.5 * np.abs(np.asarray(g)[0])  # the large one is bent


def test_a_traced_scale_dampens_every_tensor_as_dampen_does():
    """``inject_hyperparams``: the scale is traced, shared by the tensors of one shape."""
    rng = np.random.default_rng(5)
    grads = {
        name: jnp.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape))
        for name, shape in [("a", (4, 3)), ("b", (4, 3)), ("c", (7,))]
    }
    tx = optax.inject_hyperparams(log_dampen)(scale=0.3)
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    for name, g in grads.items():
        want = jax.jit(dampen)(g, jnp.float32(0.3))
        np.testing.assert_array_equal(updates[name], want)


def test_auto_under_inject_hyperparams_is_the_plain_transform():
    grads = {"w": gradient_sequence(50, seed=8)}
    got, got_state = run(optax.inject_hyperparams(log_dampen)(scale="auto"), grads)
    want, want_state = run(log_dampen("auto"), grads)
    np.testing.assert_array_equal(got["w"], want["w"])
    chex.assert_trees_all_equal(got_state.inner_state, want_state)


def test_the_auto_state_holds_one_scalar_per_tensor():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2), "nested": [jnp.zeros(4)]}
    state = log_dampen("auto").init(params)
    assert isinstance(state, LogDampenState) and LogDampenState._fields == (
        "count",
        "log_mean_square",
    )
    assert state.count.shape == () and state.count.dtype == jnp.int32
    assert jax.tree.structure(state.log_mean_square) == jax.tree.structure(params)
    assert all(jnp.shape(leaf) == () for leaf in jax.tree.leaves(state.log_mean_square))
    assert all(leaf == NO_STATISTIC for leaf in jax.tree.leaves(state.log_mean_square))


@pytest.mark.parametrize(
    "state",
    [None, optax.EmptyState(), optax.adam(1e-3).init({"w": jnp.ones(3)})],
    ids=["None", "EmptyState", "adam"],
)
def test_a_state_not_from_init_is_refused_with_the_fix(state):
    tx = log_dampen("auto")
    with pytest.raises(
        TypeError,
        match=r'log_dampen\("auto"\): state must be the LogDampenState that this transform\'s '
        r"init returns, got .*opt_state = tx\.init\(params\)",
    ):
        tx.update({"w": jnp.ones(3)}, state)


def test_a_state_initialised_for_another_tree_names_state_and_updates():
    tx = log_dampen("auto")
    state = tx.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"state was initialised for a tree of another structure.*"
        r"updates has structure PyTreeDef\(\{'w': \*\}\), state\.log_mean_square has "
        r"PyTreeDef\(\{'b': \*, 'w': \*\}\)\. Only in state\.log_mean_square: \['b'\]\.",
    ):
        tx.update({"w": jnp.ones(3)}, state)
