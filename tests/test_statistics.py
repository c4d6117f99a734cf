"""Tests of ``alrc(signal="grad_norm" | "both")``: the ALRC rule on the gradient norm.

The float64 reference below is written from the documented rule, independently of the
implementation: bias-corrected moving averages of the capped statistic, a threshold of
mean + n std with a floor of (1 + n) mean during warm-up, and a restart of the
statistics from a statistic below mean / (1 + n) during warm-up.
"""

import flax.serialization
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _alrc_sequences import noisy_training_losses

from optax_logdamp import ALRCSignalsState, ALRCState, alrc, alrc_diagnostics

WARMUP = 20


def from_data_reference(xs, num_stddev=3.0, decay=0.999, warmup=WARMUP):
    """The from-data ALRC rule in float64: the threshold and factor of every step."""
    count, mean, var = 0, 0.0, 0.0
    thresholds, scales = [], []
    for step, x in enumerate(xs):
        if count == 0:
            threshold = np.inf
        else:
            threshold = mean + num_stddev * np.sqrt(var)
            if step < warmup:
                threshold = max(threshold, (1 + num_stddev) * mean)
        capped = x > threshold and x > 0
        scale = threshold / x if capped else 1.0
        value = threshold if capped else x
        restart = step < warmup and count > 0 and mean > 0 and value * (1 + num_stddev) < mean
        count += 1
        if restart:
            count, mean, var = 1, value, 0.0
        else:
            rate = min(1.0, (1 - decay) / (1 - decay**count))
            delta = value - mean
            mean += rate * delta
            var = (1 - rate) * (var + rate * delta**2)
        thresholds.append(threshold)
        scales.append(scale)
    return np.asarray(thresholds), np.asarray(scales)


def spiky_norms(num_steps, seed, *, level=1.0, spike_rate=0.02):
    """A drifting, noisy gradient-norm sequence with spikes of 3x to 1000x."""
    rng = np.random.default_rng(seed)
    norms = level * noisy_training_losses(num_steps, seed, start=2.0, end=0.7, noise=0.15)
    spikes = rng.random(num_steps) < spike_rate
    norms[spikes] *= 10.0 ** rng.uniform(0.5, 3, spikes.sum())
    return norms


def gradients_with_norms(norms, seed=0, dtype=jnp.float32):
    """Gradient trees (two leaves, 7 elements) whose global norms are ``norms``."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(norms), 7))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    grads = directions * np.asarray(norms)[:, None]
    return {
        "w": jnp.asarray(grads[:, :4].reshape(-1, 2, 2), dtype),
        "b": jnp.asarray(grads[:, 4:], dtype),
    }


def run_gradients(tx, grads, losses=None, params=None):
    """Feeds one gradient (and loss) per step to ``tx`` in one jitted scan.

    Returns per-step ``factor`` (the applied scale, read off the updates), the
    grad-norm threshold used, and the final state.
    """
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    losses = jnp.ones(jax.tree.leaves(grads)[0].shape[0]) if losses is None else losses

    def step(state, inputs):
        g, loss = inputs
        norm_state = optax.tree.get(state, "grad_norm")
        threshold = jnp.nan if norm_state is None else norm_state.threshold
        updates, state = tx.update(g, state, params, value=loss)
        ratio = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(g), 1e-30)
        return state, (ratio, threshold)

    scan = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))
    state, (factors, thresholds) = scan(tx.init(params), (grads, jnp.asarray(losses, jnp.float32)))
    return {"factor": np.asarray(factors), "threshold": np.asarray(thresholds), "state": state}


@pytest.mark.parametrize(("num_stddev", "decay"), [(3.0, 0.999), (2.0, 0.99), (3.0, 0.9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_grad_norm_rule_matches_a_float64_reference(num_stddev, decay, seed):
    norms = spiky_norms(3000, seed)
    norms[2] *= 300.0  # an early spike too: warm-up floor and restart are exercised
    grads = gradients_with_norms(norms, seed)
    exact_norms = np.linalg.norm(
        np.concatenate([np.asarray(g).reshape(len(norms), -1) for g in grads.values()], 1), axis=1
    )
    expected_thresholds, expected_scales = from_data_reference(exact_norms, num_stddev, decay)
    got = run_gradients(alrc(num_stddev, decay, signal="grad_norm"), grads)
    np.testing.assert_allclose(got["threshold"][1:], expected_thresholds[1:], rtol=2e-4)
    assert np.isinf(got["threshold"][0])
    clear = np.abs(exact_norms - expected_thresholds) > 1e-3 * exact_norms  # no near-ties
    np.testing.assert_array_equal((got["factor"] < 1)[clear], (expected_scales < 1)[clear])
    np.testing.assert_allclose(got["factor"], expected_scales, rtol=2e-4)
    assert 0.01 < np.mean(expected_scales < 1) < 0.3  # clipping is exercised


def test_both_takes_the_smaller_factor_of_two_independent_statistics():
    norms = spiky_norms(1500, seed=3)
    losses = noisy_training_losses(1500, 4, noise=0.2)
    losses[[100, 700, 1200]] *= 50.0
    grads = gradients_with_norms(norms, seed=3)
    both = run_gradients(alrc(signal="both"), grads, losses)
    norm_only = run_gradients(alrc(signal="grad_norm"), grads, losses)
    loss_only = run_gradients(alrc(signal="loss"), grads, losses)["state"]
    # Each statistic evolves as it does alone (nothing here is non-finite).
    state = both["state"]
    assert isinstance(state, ALRCSignalsState)
    for got, want in ((state.grad_norm, norm_only["state"].grad_norm), (state.loss, loss_only)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    loss_factors = run_loss_factors(losses)
    np.testing.assert_allclose(
        both["factor"], np.minimum(norm_only["factor"], loss_factors), rtol=1e-5
    )
    assert np.sum(loss_factors < norm_only["factor"]) >= 3  # both sources of the min occur
    assert np.sum(norm_only["factor"] < loss_factors) >= 3


def run_loss_factors(losses):
    """The factors of ``alrc(signal="loss")`` over a loss sequence."""
    tx = alrc()
    params = jnp.ones(1)

    def step(state, loss):
        updates, state = tx.update(jnp.ones(1), state, params, value=loss)
        return state, updates[0]

    _, factors = jax.lax.scan(step, tx.init(params), jnp.asarray(losses, jnp.float32))
    return np.asarray(factors)


@pytest.mark.parametrize("factor", [1e-6, 2.0**-10, 3.0, 1e4])
@pytest.mark.parametrize("signal", ["grad_norm", "both"])
def test_clip_decisions_are_invariant_to_the_gradient_scale(factor, signal):
    norms = spiky_norms(1500, seed=5)
    norms[:3] = [1.0, 80.0, 1.1]
    losses = noisy_training_losses(1500, 6, noise=0.2)
    base = run_gradients(alrc(signal=signal), gradients_with_norms(norms), losses)
    scaled = run_gradients(alrc(signal=signal), gradients_with_norms(norms * factor), losses)
    np.testing.assert_array_equal(scaled["factor"] < 1, base["factor"] < 1)
    np.testing.assert_allclose(scaled["factor"], base["factor"], rtol=1e-4)
    assert np.sum(base["factor"] < 1) > 20


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spike_step", [11, 15, 40, 300])
def test_a_100x_gradient_after_step_10_is_clipped(seed, spike_step):
    norms = noisy_training_losses(400, seed, start=2.0, end=1.0, noise=0.3)
    norms[spike_step - 1] *= 100.0
    factor = run_gradients(alrc(signal="grad_norm"), gradients_with_norms(norms, seed))["factor"]
    assert factor[spike_step - 1] < 0.1


@pytest.mark.parametrize("spike_step", [1, 2, 5])
def test_an_early_huge_gradient_does_not_disable_clipping_later(spike_step):
    norms = noisy_training_losses(600, seed=spike_step, start=1.0, end=1.5, noise=0.1)
    later = np.asarray([30, 100, 500])
    norms[later - 1] *= 100.0
    baseline = run_gradients(alrc(signal="grad_norm"), gradients_with_norms(norms))["factor"]
    norms[spike_step - 1] *= 1e6
    factor = run_gradients(alrc(signal="grad_norm"), gradients_with_norms(norms))["factor"]
    assert np.all(factor[later - 1] < 0.05)  # later 100x spikes are still cut hard
    assert np.all(baseline[later - 1] < 0.05)
    clean = np.ones(600, bool)
    clean[: spike_step + 1] = False
    clean[later - 1] = False
    assert np.mean(factor[clean] < 1) <= np.mean(baseline[clean] < 1) + 0.005


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
@pytest.mark.parametrize("signal", ["grad_norm", "both"])
def test_non_finite_gradient_skips_the_step_and_keeps_statistics(bad, signal):
    """A NaN or inf element, or a norm beyond float32 (1e30**2 overflows): zero updates."""
    tx = alrc(signal=signal)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    good = {"w": jnp.ones(3), "b": jnp.ones(2)}
    for _ in range(30):
        _, state = tx.update(good, state, params, value=1.0)
    broken = {"w": jnp.array([1.0, bad, 1.0]), "b": jnp.ones(2)}
    updates, new_state = tx.update(broken, state, params, value=1.0)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    for stats_before, stats_after in zip(
        _signal_states(state), _signal_states(new_state), strict=True
    ):
        for field in ("count", "mean", "var", "threshold", "num_steps", "num_clipped"):
            assert getattr(stats_after, field) == getattr(stats_before, field), field
        assert stats_after.num_nonfinite == stats_before.num_nonfinite + 1
        assert stats_after.scale == 0.0
        for leaf in jax.tree.leaves(stats_after):
            assert np.all(np.isfinite(leaf))


def test_both_skips_a_non_finite_loss_even_with_a_finite_gradient():
    tx = alrc(signal="both")
    params = jnp.zeros(3)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(jnp.ones(3), state, params, value=1.0)
    updates, new_state = tx.update(jnp.ones(3), state, params, value=jnp.nan)
    np.testing.assert_array_equal(updates, 0.0)
    assert new_state.grad_norm.mean == state.grad_norm.mean
    assert new_state.grad_norm.num_nonfinite == 1 and new_state.loss.num_nonfinite == 1


def _signal_states(state):
    return [s for s in state if isinstance(s, ALRCState)]


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    norms=st.lists(
        st.floats(0.0, 2.0**50, allow_subnormal=False, width=32), min_size=2, max_size=30
    )
)
def test_factor_is_in_the_unit_interval_and_never_flips_a_sign(norms):
    grads = gradients_with_norms(np.asarray(norms, np.float64))
    got = run_gradients(alrc(signal="grad_norm"), grads)
    assert np.all(got["factor"] >= 0) and np.all(got["factor"] <= 1 + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_statistics_are_float32_and_updates_keep_their_dtype(dtype):
    tx = alrc(signal="both")
    params = {"w": jnp.zeros((4, 4), dtype)}
    state = tx.init(params)
    grads = {"w": jnp.full((4, 4), 300.0, dtype)}  # float16: 300**2 * 16 would overflow
    updates, state = tx.update(grads, state, params, value=jnp.asarray(2.0, dtype))
    assert updates["w"].dtype == dtype
    for stats in _signal_states(state):
        assert stats.mean.dtype == jnp.float32 and stats.var.dtype == jnp.float32
    np.testing.assert_allclose(state.grad_norm.mean, 1200.0, rtol=1e-6)


def test_grad_norm_needs_no_value_and_both_names_it():
    params = jnp.zeros(2)
    tx = alrc(signal="grad_norm")
    updates, _ = tx.update(jnp.ones(2), tx.init(params), params)  # no value at all
    np.testing.assert_array_equal(updates, 1.0)
    tx = alrc(signal="both")
    with pytest.raises(TypeError, match=r"value=loss"):
        tx.update(jnp.ones(2), tx.init(params), params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"signal": "norm"}, "signal must be one of"),
        ({"signal": "grad_norm", "mu1_init": 25.0, "mu2_init": 900.0}, 'signal="loss" only'),
    ],
)
def test_bad_signal_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alrc(**kwargs)


def test_state_structure_and_tree_get():
    params = jnp.zeros(2)
    norm_state = alrc(signal="grad_norm").init(params)
    assert isinstance(norm_state.loss, optax.EmptyState)
    assert isinstance(norm_state.grad_norm, ALRCState)
    chain = optax.chain(alrc(signal="grad_norm"), optax.adam(1e-3)).init(params)
    assert optax.tree.get(chain, "mean") == 0.0  # one statistic: unambiguous
    both = alrc(signal="both").init(params)
    assert isinstance(both.loss, ALRCState) and both.loss is not both.grad_norm


def test_diagnostics_are_named_per_signal():
    tx = optax.chain(alrc(signal="both"), optax.adam(1e-3))
    params = jnp.zeros(3)
    state = tx.init(params)
    _, state = tx.update(jnp.full(3, 2.0), state, params, value=5.0)
    diagnostics = alrc_diagnostics(state)
    assert float(diagnostics["mean"]) == 5.0  # the loss keeps the names of 0.1
    np.testing.assert_allclose(float(diagnostics["grad_norm/mean"]), np.sqrt(12.0), rtol=1e-6)
    names = ["threshold", "scale", "num_clipped", "clip_rate", "mean", "std", "num_steps"]
    names.append("num_nonfinite")
    assert set(diagnostics) == {prefix + name for prefix in ("", "grad_norm/") for name in names}
    only_norm = alrc_diagnostics(alrc(signal="grad_norm").init(params))
    assert all(name.startswith("grad_norm/") for name in only_norm)
    # Two states of the same signal: full paths disambiguate.
    two = optax.chain(alrc(signal="grad_norm"), alrc(signal="grad_norm")).init(params)
    assert "0/grad_norm/threshold" in alrc_diagnostics(two)


def test_inject_hyperparams_with_a_static_signal():
    tx = optax.inject_hyperparams(alrc, static_args=("signal",))(num_stddev=2.0, signal="both")
    plain = alrc(2.0, signal="both")
    grads = gradients_with_norms(spiky_norms(60, seed=7))
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
    state, plain_state = tx.init(params), plain.init(params)
    for i in range(60):
        g = jax.tree.map(lambda a, i=i: a[i], grads)
        u1, state = tx.update(g, state, params, value=1.0 + 0.01 * i)
        u2, plain_state = plain.update(g, plain_state, params, value=1.0 + 0.01 * i)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, plain_state)


def test_flax_serialization_round_trip():
    tx = optax.chain(alrc(signal="grad_norm"), optax.adam(1e-3))
    params = jnp.zeros(3)
    state = tx.init(params)
    for i in range(5):
        _, state = tx.update(jnp.full(3, 1.0 + i), state, params)
    restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert isinstance(restored[0], ALRCSignalsState)


def test_inside_multisteps_the_window_gradient_is_clipped():
    """Inside MultiSteps the norm is that of the accumulated gradient: one statistic per step."""
    inner = optax.chain(alrc(signal="grad_norm"), optax.sgd(1.0))
    tx = optax.MultiSteps(inner, every_k_schedule=4)
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update)  # eager, 800 calls of MultiSteps take minutes
    rng = np.random.default_rng(0)
    applied = []
    for step in range(200):
        for micro in range(4):
            g = jnp.asarray(1.0 + 0.1 * rng.standard_normal(3), jnp.float32)
            if step == 150 and micro == 1:
                g = g * 100.0
            updates, state = update(g, state, params)  # no value needed
        applied.append(float(optax.tree.norm(updates)))
    stats = optax.tree.get(state, "grad_norm")
    assert int(stats.num_steps) == 200  # one fold per emitted step, not per micro-batch
    assert int(stats.num_clipped) >= 1
    assert applied[150] < 1.5 * np.median(applied)  # the window's update was capped
