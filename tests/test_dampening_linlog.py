"""Tests of the ``"linlog"`` dampening curve (issue 19): the identity up to the knee ``s``,
``s * (1 + log(|g| / s))`` above it, against a float64 reference and its properties.
"""

import _multidevice_runs as mdr
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import alrc, dampen, log_dampen, logadam, logadamw, spike_guard
from optax_logdamp._dampening import _dampen
from optax_logdamp._log1p_kernel import dampen_magnitude, nearest_power_of_two, with_sign_of

F32 = np.finfo(np.float32)
MAX_ULP = 1.5  # measured: 1.29 ulp (scale 1e-20), below 1 ulp for most scales
POWER_OF_TWO_SCALES = [1.0, 2.0**-10, 2.0**40, 2.0**-66, 2.0**66]
OTHER_SCALES = [1e-20, 1e20, 1e-3, 0.37, 3.0, 1e4, 7.1e-9, 123456.7, 0.999]
SCALES = POWER_OF_TWO_SCALES + OTHER_SCALES


def reference(g, scale):
    """The linlog curve in float64 numpy, for the scale float32 arithmetic sees."""
    g = np.asarray(g, np.float64)
    s = float(np.float32(scale))
    m = np.abs(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        above = s * (1 + np.log(m / s))
    return np.sign(g) * np.where(m <= s, m, above)


def magnitudes(scale, n=100_000, seed=0):
    """Random magnitudes over 1e-30..3.4e38, a dense band above the knee, and edges."""
    rng = np.random.default_rng(seed)
    s = np.float32(scale)
    wide = 10.0 ** rng.uniform(-30, np.log10(3.4e38), n)
    near = s * (1 + 10.0 ** rng.uniform(-8, 1.5, n // 2))
    edges = [s, np.nextafter(s, np.float32(np.inf)), np.nextafter(s, np.float32(0)), 2 * s, F32.max]
    return np.concatenate([wide, near, edges]).astype(np.float32)


def ulps(got, want):
    spacing = np.spacing(np.maximum(np.abs(want).astype(np.float32), F32.tiny)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing


@pytest.mark.parametrize("traced", [False, True], ids=["python_scale", "traced_scale"])
@pytest.mark.parametrize("scale", SCALES)
def test_within_one_and_a_half_ulp_of_float64(scale, traced):
    m = magnitudes(scale)
    g = np.concatenate([m, -m])
    run = jax.jit(lambda g, s: dampen(g, s, curve="linlog"))
    got = np.asarray(run(g, jnp.float32(scale)) if traced else dampen(g, scale, curve="linlog"))
    error = ulps(got, reference(g, scale))
    worst = int(np.argmax(error))
    assert error[worst] <= MAX_ULP, f"{error[worst]:.2f} ulp at g={g[worst]!r}"
    assert np.all(np.signbit(got) == np.signbit(g))


@pytest.mark.parametrize("scale", POWER_OF_TWO_SCALES)
def test_power_of_two_path_of_the_auto_knee_is_accurate(scale):
    """``scale="auto"`` passes a traced power of two with ``power_of_two=True``."""
    m = magnitudes(scale, seed=1)
    run = jax.jit(lambda g, s: _dampen(g, s, power_of_two=True, curve="linlog"))
    got = np.asarray(run(m, jnp.float32(scale)))
    assert ulps(got, reference(m, scale)).max() <= 1.0


@pytest.mark.parametrize("scale", [1.0, 0.37, 1e-20, 3e4])
def test_identity_below_the_knee_bitwise(scale):
    s = np.float32(scale)
    rng = np.random.default_rng(2)
    m = (s * rng.uniform(0, 1, 50_000)).astype(np.float32)
    m = np.concatenate([m, [0.0, s, np.nextafter(s, np.float32(0))]]).astype(np.float32)
    g = np.concatenate([m, -m, [-0.0]]).astype(np.float32)
    got = np.asarray(jax.jit(lambda g: dampen(g, scale, curve="linlog"))(g))
    normal = np.abs(g) >= F32.tiny  # XLA on CPU may flush a subnormal input to zero
    np.testing.assert_array_equal(got.view(np.uint32)[normal], g.view(np.uint32)[normal])
    assert np.all(np.signbit(got) == np.signbit(g))


finite_f32 = st.floats(-F32.max, F32.max, allow_nan=False, width=32)
scales = st.sampled_from([1.0, 1e-3, 0.37, 3.0, 1e4, 2.0**-20, 1e-20, 1e20])


@hypothesis.given(g=finite_f32, scale=scales)
@hypothesis.settings(deadline=None, max_examples=300)
def test_odd_never_amplifies_and_finite(g, scale):
    x = jnp.asarray([g, -g], jnp.float32)
    out = np.asarray(dampen(x, scale, curve="linlog"))
    assert np.all(np.isfinite(out))
    assert out[0] == -out[1]
    assert np.all(np.abs(out) <= np.abs(np.asarray(x)))


@hypothesis.given(a=finite_f32, b=finite_f32, scale=scales)
@hypothesis.settings(deadline=None, max_examples=300)
def test_monotone(a, b, scale):
    lo, hi = sorted([a, b])
    out = np.asarray(dampen(jnp.asarray([lo, hi], jnp.float32), scale, curve="linlog"))
    assert out[0] <= out[1]


@pytest.mark.parametrize("scale", [1.0, 0.37, 1e-3])
def test_monotone_on_dense_grids_across_the_knee(scale):
    s = np.float32(scale)
    rng = np.random.default_rng(3)
    g = np.sort(
        np.concatenate(
            [
                s * rng.uniform(-3, 3, 200_000),
                s * 10.0 ** rng.uniform(-3, 20, 100_000),
                # every float32 around the knee
                np.arange(-2000, 2000) * np.spacing(s) + s,
            ]
        ).astype(np.float32)
    )
    out = np.asarray(jax.jit(lambda g: dampen(g, scale, curve="linlog"))(g))
    assert np.all(np.diff(out) >= 0)


@pytest.mark.parametrize("scale", [1.0, 0.37, 3e-3])
def test_slope_one_on_both_sides_of_the_knee(scale):
    """C1: the numerical derivative is 1 just below and just above the knee."""
    with jax.enable_x64(True):
        s = float(np.float32(scale))
        f = jax.jit(lambda g: dampen(g, scale, curve="linlog"))
        for h in (1e-4 * s, 1e-6 * s):
            knee = np.float64(s)
            left = (f(knee) - f(knee - h)) / h
            right = (f(knee + h) - f(knee)) / h
            np.testing.assert_allclose(float(left), 1.0, rtol=1e-9)
            np.testing.assert_allclose(float(right), 1.0, atol=h / s)  # 1 - h / 2s + ...
    h = np.float32(1e-3 * scale)  # float32, coarser: both slopes within 1e-3 of 1
    s32 = np.float32(scale)
    x = jnp.float32([s32 - h, s32, s32 + h])
    y = np.asarray(dampen(x, scale, curve="linlog"), np.float64)
    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.diff(y) / np.diff(xs), 1.0, atol=2e-3)


def test_float64_inputs_match_the_reference_under_x64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        g = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-30, 300, 20_000)
        for scale in [1.0, 0.37, 1e-20]:
            got = np.asarray(dampen(jnp.asarray(g), scale, curve="linlog"))
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, _ref64(g, scale), rtol=1e-14)
            assert np.all(np.abs(got) <= np.abs(g))


def _ref64(g, scale):
    """The linlog curve in float64 for a float64 scale."""
    m = np.abs(g)
    with np.errstate(divide="ignore"):  # log(m) - log(s): m / s may overflow
        return np.sign(g) * np.where(m <= scale, m, scale * (1 + np.log(m) - np.log(scale)))


@pytest.mark.parametrize("scale", [1.0, 0.37, 3.0, 2.0**-12])
@pytest.mark.parametrize("c", [2.0**-20, 2.0**-1, 2.0**13])
def test_scale_invariance_is_exact_for_powers_of_two(scale, c):
    """f_{c s}(c m) = c f_s(m), bitwise for c a power of two (no overflow, no subnormals)."""
    rng = np.random.default_rng(5)
    g = (rng.standard_normal(50_000) * scale * 10.0 ** rng.uniform(-3, 6, 50_000)).astype(
        np.float32
    )
    base = np.asarray(dampen(g, scale, curve="linlog"))
    got = np.asarray(dampen(g * np.float32(c), scale * c, curve="linlog"))
    np.testing.assert_array_equal(got, base * np.float32(c))


@pytest.mark.parametrize("c", [1e-7, 37.0, 3e5])
def test_scale_invariance_for_any_factor(c):
    rng = np.random.default_rng(6)
    g = (rng.standard_normal(20_000) * 10.0 ** rng.uniform(-3, 6, 20_000)).astype(np.float32)
    base = np.asarray(dampen(g, 0.37, curve="linlog"), np.float64)
    got = np.asarray(dampen(g * np.float32(c), 0.37 * c, curve="linlog"), np.float64)
    np.testing.assert_allclose(got, base * c, rtol=6e-7)


@pytest.mark.parametrize("scale", [1.0, 0.5, 1e-3, 1e-20, 7.1e-9, 1e20])
def test_non_finite_input_is_not_hidden_and_huge_input_stays_finite(scale):
    g = jnp.float32([np.nan, -np.nan, np.inf, -np.inf, F32.max, -F32.max, 3e38, 1e38])
    for run in (
        lambda g: dampen(g, scale, curve="linlog"),
        jax.jit(lambda g: dampen(g, scale, curve="linlog")),
    ):
        got = np.asarray(run(jnp.tile(g, 64)))[:8]  # tiled: XLA vectorises as in training
        assert np.isnan(got[0]) and np.isnan(got[1])
        assert got[2] == np.inf and got[3] == -np.inf
        assert np.all(np.isfinite(got[4:]))
        assert ulps(got[4:], reference(np.asarray(g)[4:], scale)).max() <= MAX_ULP


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32_and_rounded_once(dtype):
    g = np.float32(np.random.default_rng(7).standard_normal(4096) * 10.0)
    half = jnp.asarray(g, dtype)
    got = dampen(half, 0.3, curve="linlog")
    assert got.dtype == dtype
    want = dampen(half.astype(jnp.float32), 0.3, curve="linlog").astype(dtype)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_complex_keeps_phase_and_dampens_the_modulus():
    rng = np.random.default_rng(8)
    z = (rng.standard_normal(1000) + 1j * rng.standard_normal(1000)) * 10.0 ** rng.uniform(
        -2, 4, 1000
    )
    z = jnp.asarray(z, jnp.complex64)
    got = dampen(z, 0.37, curve="linlog")
    assert got.dtype == jnp.complex64
    modulus = np.abs(np.asarray(z)).astype(np.float32)
    want = np.asarray(dampen(jnp.asarray(modulus), 0.37, curve="linlog"))
    np.testing.assert_allclose(np.abs(np.asarray(got)), want, rtol=3e-6)
    np.testing.assert_allclose(np.angle(np.asarray(got)), np.angle(np.asarray(z)), atol=1e-5)
    below = modulus <= np.float32(0.37)
    np.testing.assert_array_equal(np.asarray(got)[below], np.asarray(z)[below])


def test_no_log_or_division_on_full_size_arrays():
    """The float32 curve is built from fusible operations (see ``_log1p_kernel``)."""
    lowered = [
        jax.jit(lambda g, s=scale: dampen(g, s, curve="linlog")).lower(jnp.ones(1000))
        for scale in (0.37, 1.0, 1e-3)
    ]
    lowered.append(jax.jit(lambda g, s: dampen(g, s, curve="linlog")).lower(jnp.ones(1000), 0.3))
    for program in lowered:
        for line in program.as_text().splitlines():
            if any(f"stablehlo.{op} " in line for op in ("log", "log_plus_one", "divide")):
                assert "tensor<1000x" not in line, line


def test_default_curves_log1p_for_a_number_linlog_for_auto():
    """A numeric knee's default is bitwise the seed's log1p; "auto"'s is bitwise linlog."""
    rng = np.random.default_rng(9)
    g = jnp.asarray(rng.standard_normal(10_000) * 10.0 ** rng.uniform(-8, 8, 10_000), jnp.float32)
    for scale in (1.0, 0.37, 2.0**-8):
        plain = np.asarray(dampen(g, scale))
        kernel = np.asarray(with_sign_of(dampen_magnitude(jnp.abs(g), scale), g))
        np.testing.assert_array_equal(plain, kernel)
        np.testing.assert_array_equal(np.asarray(dampen(g, scale, curve="log1p")), plain)
        for tx in (log_dampen(scale), log_dampen(scale, curve="log1p")):
            np.testing.assert_array_equal(np.asarray(tx.update(g, tx.init(g))[0]), plain)
    auto, auto_log1p = log_dampen("auto"), log_dampen("auto", curve="linlog")
    state_a, state_b = auto.init(g), auto_log1p.init(g)
    for step in range(5):
        grads = g * (1 + step)
        out_a, state_a = auto.update(grads, state_a)
        out_b, state_b = auto_log1p.update(grads, state_b)
        np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
    # curve=None spelled out is each default: log1p for dampen, linlog for spike_guard.
    np.testing.assert_array_equal(
        np.asarray(dampen(g, 0.37, curve=None)), np.asarray(dampen(g, 0.37))
    )
    guard, guard_none = spike_guard(), spike_guard(curve=None)
    state_a, state_b = guard.init(g), guard_none.init(g)
    for step in range(5):
        out_a, state_a = guard.update(g * (1 + step), state_a)
        out_b, state_b = guard_none.update(g * (1 + step), state_b)
        np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


@pytest.mark.parametrize("curve", ["linear", "log", "", "LINLOG"])
def test_bad_curve_is_refused(curve):
    with pytest.raises(ValueError, match="curve"):
        log_dampen(curve=curve)
    with pytest.raises(ValueError, match="curve"):
        log_dampen("auto", curve=curve)
    with pytest.raises(ValueError, match="curve"):
        dampen(jnp.ones(2), curve=curve)
    with pytest.raises(ValueError, match="dampen_curve"):
        logadam(0.1, dampen_curve=curve)
    with pytest.raises(ValueError, match="dampen_curve"):
        logadamw(0.1, dampen_curve=curve)


def test_transform_keeps_structure_dtypes_and_empty_state():
    tx = log_dampen(0.5, curve="linlog")
    tree = {"a": jnp.float32([0.1, -3.0]), "b": jnp.bfloat16([7.0]), "c": jnp.complex64([4j])}
    out, state = tx.update(tree, tx.init(tree))
    assert state == optax.EmptyState()
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, tree)
    np.testing.assert_array_equal(np.asarray(out["a"])[0], np.float32(0.1))
    np.testing.assert_allclose(float(out["a"][1]), -0.5 * (1 + np.log(6.0)), rtol=1e-6)


def test_traced_scale_under_inject_hyperparams():
    g = jnp.asarray(np.random.default_rng(10).standard_normal(1000) * 5, jnp.float32)
    tx = optax.inject_hyperparams(log_dampen, static_args=("curve",))(scale=0.37, curve="linlog")
    got, _ = jax.jit(tx.update)(g, tx.init(g))
    want = dampen(g, 0.37, curve="linlog")
    assert ulps(np.asarray(got), np.asarray(want, np.float64)).max() <= 1.0


def test_auto_knee_uses_the_curve_and_keeps_the_same_state():
    rng = np.random.default_rng(11)
    params = {"w": jnp.zeros(64), "b": jnp.zeros(8)}
    linlog, log1p = log_dampen("auto", curve="linlog"), log_dampen("auto", curve="log1p")
    state_l, state_p = linlog.init(params), log1p.init(params)
    for step in range(30):
        size = 1e-3 * (100.0 if step == 25 else 1.0)  # one spike
        grads = {
            key: jnp.asarray(rng.standard_normal(p.shape) * size, jnp.float32)
            for key, p in params.items()
        }
        knees = jax.tree.map(
            lambda c, lms: nearest_power_of_two(
                3.0 * jnp.exp(0.5 * lms / (1 - jnp.float32(0.999) ** jnp.maximum(c, 1)))
            ),
            state_l.count,
            state_l.log_mean_square,
        )
        out_l, state_l = linlog.update(grads, state_l)
        _, state_p = log1p.update(grads, state_p)
        jax.tree.map(np.testing.assert_array_equal, state_l, state_p)  # knee state: no curve
        for key in params:
            if step == 0:
                np.testing.assert_array_equal(out_l[key], grads[key])  # no knee yet
                continue
            want = dampen(grads[key], float(knees[key]), curve="linlog")
            np.testing.assert_array_equal(out_l[key], want)
            below = np.abs(np.asarray(grads[key])) <= float(knees[key])
            np.testing.assert_array_equal(
                np.asarray(out_l[key])[below], np.asarray(grads[key])[below]
            )
        if step == 25:  # the spike is dampened
            assert np.all(
                np.abs(np.asarray(out_l["w"])) < 0.1 * np.abs(np.asarray(grads["w"])).max()
            )


@pytest.mark.parametrize("scale", [0.05, "auto"])
def test_logadam_passes_the_curve_through(scale):
    params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), "b": jnp.zeros(5)}
    keys = jax.random.split(jax.random.key(3), 5)
    grads_seq = [
        jax.tree.map(lambda p, k=k: 3.0 * jax.random.normal(k, p.shape) ** 3, params) for k in keys
    ]

    def run(tx):
        p, state = params, tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p

    fused = run(logadam(0.1, dampen_scale=scale, dampen_curve="linlog"))
    chained = run(optax.chain(log_dampen(scale, curve="linlog"), optax.adam(0.1)))
    jax.tree.map(np.testing.assert_array_equal, fused, chained)
    # The default curve: log1p with a numeric knee, linlog with "auto".
    default = run(logadam(0.1, dampen_scale=scale))
    log1p = run(logadam(0.1, dampen_scale=scale, dampen_curve="log1p"))
    jax.tree.map(np.testing.assert_array_equal, default, fused if scale == "auto" else log1p)
    assert not np.array_equal(np.asarray(log1p["w"]), np.asarray(fused["w"]))
    fused_w = run(logadamw(0.1, weight_decay=0.1, dampen_scale=scale, dampen_curve="linlog"))
    chained_w = run(
        optax.chain(log_dampen(scale, curve="linlog"), optax.adamw(0.1, weight_decay=0.1))
    )
    jax.tree.map(np.testing.assert_array_equal, fused_w, chained_w)
    default_w = run(logadamw(0.1, weight_decay=0.1, dampen_scale=scale))
    log1p_w = run(logadamw(0.1, weight_decay=0.1, dampen_scale=scale, dampen_curve="log1p"))
    jax.tree.map(np.testing.assert_array_equal, default_w, fused_w if scale == "auto" else log1p_w)


MULTI = {
    "log_dampen": mdr.Case(
        lambda axis: optax.chain(log_dampen(0.5, curve="linlog"), optax.sgd(0.01)), False
    ),
    "alrc_both+logadam_auto": mdr.Case(
        lambda axis: optax.chain(
            alrc(signal="both", axis_name=axis),
            logadam(0.05, dampen_scale="auto", dampen_curve="linlog"),
        ),
        False,
    ),
}


@mdr.needs_eight_devices
@pytest.mark.parametrize("name", list(MULTI))
def test_multi_device_agrees_with_single_device(name):
    mdr.assert_agrees_on_every_layout(MULTI[name])
