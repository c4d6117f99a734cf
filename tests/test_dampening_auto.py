"""Tests of ``log_dampen(scale="auto")`` and ``logadam(dampen_scale="auto")``.

The float64 reference below is written from the documented rule: each tensor's knee is
``auto_multiple`` times the running geometric mean of its RMS over the previous steps
(an exponential moving average of ``log(mean(g**2))``, bias-corrected), rounded to the
nearest power of two; a tensor with no scale yet passes unchanged.
"""

import flax.serialization
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import LogDampenState, dampen, log_dampen, logadam


def nearest_power_of_two(x):
    """2**round(log2(x)), in float64."""
    return 2.0 ** np.round(np.log2(x))


def auto_reference(grads, multiple=3.0, decay=0.999):
    """The rule in float64 for one tensor: the dampened updates of every step."""
    count, log_mean_square, outputs = 0, 0.0, []
    for g in grads:
        g = np.asarray(g, np.float64)
        if count > 0:
            log_rms = 0.5 * log_mean_square / (1 - decay**count)
            knee = nearest_power_of_two(multiple * np.exp(log_rms))
            out = knee * np.sign(g) * np.log1p(np.abs(g) / knee)
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
    first = jax.tree.map(lambda g: g[0], grads)
    state = tx.init(first)

    def step(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    state, outputs = jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(state, grads)
    return outputs, state


@pytest.mark.parametrize(("multiple", "decay"), [(3.0, 0.999), (1.0, 0.99), (10.0, 0.9)])
def test_matches_a_float64_reference_over_a_long_sequence(multiple, decay):
    grads = {"w": gradient_sequence(2000, seed=1), "b": gradient_sequence(2000, 2, (3, 5))}
    tx = log_dampen("auto", auto_multiple=multiple, auto_decay=decay, curve="log1p")
    outputs, _ = run(tx, grads)
    for name, g in grads.items():
        want = auto_reference(g, multiple, decay)
        np.testing.assert_allclose(np.asarray(outputs[name]), want, rtol=2e-5, atol=0)
        compressed = np.abs(want) < 0.5 * np.abs(g.astype(np.float64))
        assert compressed.any(axis=tuple(range(1, g.ndim))).mean() > 0.01  # spikes are cut


@pytest.mark.parametrize("factor", [2.0**-20, 0.5, 2.0**20])
def test_each_tensor_is_dampened_in_its_own_units(factor):
    """Multiplying one tensor's gradients by 2**j multiplies its dampened updates by 2**j."""
    grads = {"w": gradient_sequence(400, seed=3), "b": gradient_sequence(400, 4, (8,))}
    base, _ = run(log_dampen("auto"), grads)
    scaled_grads = {"w": grads["w"] * np.float32(factor), "b": grads["b"]}
    scaled, _ = run(log_dampen("auto"), scaled_grads)
    np.testing.assert_allclose(scaled["w"], np.asarray(base["w"]) * factor, rtol=1e-6)
    np.testing.assert_array_equal(scaled["b"], base["b"])


@pytest.mark.parametrize("factor", [1e-6, 3.0, 1e4])
def test_the_knee_follows_any_unit_change_within_sqrt2(factor):
    """For any c > 0 the knee scales with c up to the power-of-two rounding."""
    grads = gradient_sequence(400, seed=3)
    _, base = run(log_dampen("auto"), {"w": grads})
    _, scaled = run(log_dampen("auto"), {"w": grads * np.float32(factor)})
    # The running log mean square shifts by (1 - decay**t) * 2 log(c): the knee scales by c.
    shift = scaled.log_mean_square["w"] - base.log_mean_square["w"]
    correction = 1 - 0.999 ** int(base.count["w"])
    np.testing.assert_allclose(np.exp(0.5 * shift / correction), factor, rtol=1e-3)


def test_first_step_and_all_zero_tensors_pass_unchanged():
    tx = log_dampen("auto")
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(2)}
    state = tx.init(params)
    spike = {"w": jnp.array([1e6, -1.0, 3.0, 0.0]), "frozen": jnp.zeros(2)}
    updates, state = tx.update(spike, state)  # no scale yet: unchanged
    jax.tree.map(np.testing.assert_array_equal, updates, spike)
    for _ in range(5):
        updates, state = tx.update({"w": jnp.ones(4), "frozen": jnp.zeros(2)}, state)
    wakes = {"w": jnp.ones(4), "frozen": jnp.array([5.0, -7.0])}
    updates, state = tx.update(wakes, state)  # zeros so far: still no scale for "frozen"
    np.testing.assert_array_equal(updates["frozen"], wakes["frozen"])


def test_a_spike_is_compressed_and_barely_moves_the_knee():
    rng = np.random.default_rng(0)
    grads = (1e-3 * rng.standard_normal((300, 256))).astype(np.float32)
    grads[200] *= 100.0
    outputs, _ = run(log_dampen("auto"), {"w": grads})
    rms = np.sqrt(np.mean(np.square(np.asarray(outputs["w"])), axis=1))
    assert rms[200] < 20 * np.median(rms)  # 100x in, about 13x out (knee near 3-4 RMS)
    assert rms[201] > 0.9 * rms[199]  # the next ordinary step is judged as before


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    values=st.lists(
        st.floats(-(2.0**127), 2.0**127, width=32, allow_subnormal=False), min_size=1, max_size=16
    ),
    warm_rms=st.floats(1e-8, 1e8),
)
def test_odd_monotone_never_amplifies_and_finite(values, warm_rms):
    """After warm-up, one step on arbitrary values keeps every SPEC 1.1 property."""
    tx = log_dampen("auto")
    params = jnp.zeros(len(values))
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jnp.full(len(values), warm_rms, jnp.float32), state)
    g = jnp.asarray(values, jnp.float32)
    out = np.asarray(tx.update(g, state)[0])
    mirrored = np.asarray(tx.update(-g, state)[0])
    g = np.asarray(g)
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out) <= np.abs(g))
    np.testing.assert_array_equal(mirrored, -out)
    order = np.argsort(g, kind="stable")
    assert np.all(np.diff(out[order]) >= 0)


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
    assert new_state.count["w"] == state.count["w"]
    assert new_state.log_mean_square["w"] == state.log_mean_square["w"]
    assert new_state.count["b"] == state.count["b"] + 1
    assert all(np.isfinite(leaf) for leaf in jax.tree.leaves(new_state))


@pytest.mark.parametrize(
    ("curve", "want"),
    # After two steps of ones the knee is pow2(3 * 1) = 4: 50 -> 4 log(1 + 50 / 4) on
    # log1p, 4 (1 + log(50 / 4)) on linlog (the default with "auto").
    [("log1p", 4 * np.log1p(12.5)), (None, 4 * (1 + np.log(12.5)))],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_kept_and_statistics_are_float32(dtype, curve, want):
    tx = log_dampen("auto", curve=curve)
    params = {"w": jnp.zeros(8, dtype)}
    state = tx.init(params)
    for value in (1.0, 1.0, 50.0):
        updates, state = tx.update({"w": jnp.full(8, value, dtype)}, state)
    assert updates["w"].dtype == dtype
    assert state.log_mean_square["w"].dtype == jnp.float32
    assert state.count["w"].dtype == jnp.int32
    np.testing.assert_allclose(float(updates["w"][0]), want, rtol=1e-2)


def test_complex_updates_keep_their_phase():
    tx = log_dampen("auto")
    params = jnp.zeros(3, jnp.complex64)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jnp.full(3, 1 + 1j, jnp.complex64), state)
    g = jnp.array([100 + 100j, -3j, 0.5], jnp.complex64)
    out = np.asarray(tx.update(g, state)[0])
    np.testing.assert_allclose(np.angle(out), np.angle(np.asarray(g)), atol=1e-6)
    assert np.all(np.abs(out) <= np.abs(np.asarray(g)))


def test_logadam_auto_is_the_chain_bitwise():
    grads = {"w": gradient_sequence(200, seed=5, shape=(4, 4)), "b": gradient_sequence(200, 6)}
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
    fused = logadam(1e-3, dampen_scale="auto")
    chain = optax.chain(log_dampen("auto"), optax.adam(1e-3))
    for tx_a, tx_b in [(fused, chain)]:
        state_a, state_b = tx_a.init(params), tx_b.init(params)
        for i in range(200):
            g = jax.tree.map(lambda a, i=i: a[i], grads)
            u_a, state_a = tx_a.update(g, state_a, params)
            u_b, state_b = tx_b.update(g, state_b, params)
            jax.tree.map(np.testing.assert_array_equal, u_a, u_b)


def test_a_numeric_scale_stays_stateless_and_unchanged():
    g = jnp.asarray(gradient_sequence(1, seed=7, shape=(1000,))[0]) * 1e3
    for scale in (1.0, 0.3, 2.0**-5):
        tx = log_dampen(scale)
        assert tx.init(g) == optax.EmptyState()
        np.testing.assert_array_equal(tx.update(g, optax.EmptyState())[0], dampen(g, scale))


def test_inject_hyperparams_matches_plain():
    grads = gradient_sequence(50, seed=8)
    tx = optax.inject_hyperparams(log_dampen)(scale="auto", auto_multiple=2.0)
    plain = log_dampen("auto", auto_multiple=2.0)
    params = jnp.zeros(64)
    state, plain_state = tx.init(params), plain.init(params)
    for g in grads:
        u1, state = tx.update(jnp.asarray(g), state, params)
        u2, plain_state = plain.update(jnp.asarray(g), plain_state, params)
        # Traced, 1 - auto_decay is taken in float32 (1.3e-5 off 0.001): not bitwise.
        np.testing.assert_allclose(u1, u2, rtol=1e-4)


def test_state_structure_and_checkpoint_round_trip():
    tx = logadam(1e-3, dampen_scale="auto")
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    for i in range(4):
        _, state = tx.update({"w": jnp.full((3, 2), i + 1.0), "b": jnp.ones(2)}, state, params)
    dampen_state = state[0]
    assert isinstance(dampen_state, LogDampenState)
    for field in dampen_state:
        assert jax.tree.structure(field) == jax.tree.structure(params)
        assert all(leaf.shape == () for leaf in jax.tree.leaves(field))
    restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: log_dampen("adaptive"), 'scale must be a number or "auto"'),
        (lambda: logadam(1e-3, dampen_scale="Auto"), 'dampen_scale must be a number or "auto"'),
        (lambda: log_dampen("auto", auto_multiple=0.0), "auto_multiple must be"),
        (lambda: log_dampen("auto", auto_decay=1.0), "auto_decay must lie"),
    ],
)
def test_bad_arguments_name_themselves(make, match):
    with pytest.raises(ValueError, match=match):
        make()


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
        r"updates has structure PyTreeDef\(\{'w': \*\}\), state\.count has "
        r"PyTreeDef\(\{'b': \*, 'w': \*\}\)\. Only in state\.count: \['b'\]\.",
    ):
        tx.update({"w": jnp.ones(3)}, state)
