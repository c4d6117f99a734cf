"""The ALRC statistics engine (``_statistics.py``): the cap, the fold, the threshold.

The engine is driven directly here, one value (or one batch of values) per step:
:func:`make_rule` and :func:`init_state`, then :func:`cap_and_fold` in a jitted scan.
The float64 references below are written from the documented rules, independently of
the implementation. What every transform built on the engine adds (which statistic it
feeds, the updates it scales) is tested in ``test_alrc.py``.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _alrc_sequences import WARMUP, from_data_reference, noisy_training_losses, run_rule

from optax_logdamp import ALRCSignalsState, ALRCState, alrc, alrc_per_example
from optax_logdamp._statistics import (
    cap_and_fold,
    find_alrc_states,
    init_state,
    loss_scale,
    make_rule,
    signal_of,
    zero_if_skipped,
)

INT32_MAX = int(np.iinfo(np.int32).max)


def paper_reference(values, num_stddev, decay, mu1, mu2):
    """The paper's rule with raw moments and initial moments, in float64.

    Returns the threshold used at each step and the gradient factor t/x (or 1).
    """
    thresholds, scales = [], []
    for value in values:
        threshold = mu1 + num_stddev * np.sqrt(mu2 - mu1**2 + 1e-8)
        if value >= threshold:
            capped, scale = threshold, threshold / value
        else:
            capped, scale = value, 1.0
        mu1 = decay * mu1 + (1 - decay) * capped
        mu2 = decay * mu2 + (1 - decay) * capped**2
        thresholds.append(threshold)
        scales.append(scale)
    return np.asarray(thresholds), np.asarray(scales)


def spiky_values(num_steps, seed, *, level=25.0, spike_rate=0.02):
    """Log-normal values around ``level`` with spikes of 3x to 10000x."""
    rng = np.random.default_rng(seed)
    values = level * np.exp(0.3 * rng.standard_normal(num_steps))
    spikes = rng.random(num_steps) < spike_rate
    values[spikes] *= 10.0 ** rng.uniform(0.5, 4, spikes.sum())
    return values


def drifting_values(num_steps, seed, *, spike_rate=0.02):
    """A drifting, noisy sequence (like a gradient norm) with spikes of 3x to 1000x."""
    rng = np.random.default_rng(seed)
    values = noisy_training_losses(num_steps, seed, start=2.0, end=0.7, noise=0.15)
    spikes = rng.random(num_steps) < spike_rate
    values[spikes] *= 10.0 ** rng.uniform(0.5, 3, spikes.sum())
    return values


@pytest.mark.parametrize(
    ("num_stddev", "decay", "mu1", "mu2"),
    [(3.0, 0.999, 25.0, 30.0**2), (2.0, 0.9, 25.0, 30.0**2), (3.0, 0.99, 75.0, 9 * 30.0**2)],
)
def test_paper_rule_matches_a_float64_reference(num_stddev, decay, mu1, mu2):
    values = spiky_values(3000, seed=int(decay * 1000))
    want_thresholds, want_scales = paper_reference(values, num_stddev, decay, mu1, mu2)
    got = run_rule(values, num_stddev, decay, mu1=mu1, mu2=mu2)
    np.testing.assert_allclose(got["threshold"], want_thresholds, rtol=1e-4)
    clear = np.abs(values - want_thresholds) > 1e-3 * want_thresholds  # no near-ties
    np.testing.assert_array_equal((got["scale"] < 1)[clear], (want_scales < 1)[clear])
    np.testing.assert_allclose(got["scale"], want_scales, rtol=1e-4)
    assert 0.01 < np.mean(want_scales < 1) < 0.5  # the sequence does exercise capping


@pytest.mark.parametrize(("num_stddev", "decay"), [(3.0, 0.999), (2.0, 0.99), (3.0, 0.9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_data_rule_matches_a_float64_reference(num_stddev, decay, seed):
    values = drifting_values(3000, seed)
    values[[0, 5]] *= 300.0  # early spikes: a restart and the warm-up floor are exercised
    want_thresholds, want_scales, restarts, floored = from_data_reference(
        values.astype(np.float32).astype(np.float64), num_stddev, decay
    )
    got = run_rule(values, num_stddev, decay)
    assert np.isinf(got["threshold"][0])
    np.testing.assert_allclose(got["threshold"][1:], want_thresholds[1:], rtol=2e-4)
    clear = np.abs(values - want_thresholds) > 1e-3 * values  # no near-ties
    np.testing.assert_array_equal((got["scale"] < 1)[clear], (want_scales < 1)[clear])
    np.testing.assert_allclose(got["scale"], want_scales, rtol=2e-4)
    assert 0.01 < np.mean(want_scales < 1) < 0.3  # capping is exercised
    assert restarts.any() and floored.any()  # so are the restart and the warm-up floor


def test_warmup_floor_and_restart_on_a_short_sequence():
    """In warm-up the cap is at least (1 + n) mean; a value below mean / (1 + n) restarts
    the statistics from it. After warm-up neither applies."""
    got = run_rule([100.0, 100.0, 1.0, 1.0, 3.9, 50.0], warmup_steps=20)
    np.testing.assert_array_equal(got["threshold"][:3], [np.inf, 400.0, 400.0])
    assert got["threshold"][3] == 4.0  # restarted from 1: the floor (1 + 3) * 1
    np.testing.assert_array_equal(got["scale"][:5], 1.0)
    assert got["threshold"][5] == pytest.approx(4 * 1.9676, rel=1e-3)  # the floor again
    np.testing.assert_allclose(got["scale"][5], got["threshold"][5] / 50.0)
    assert int(got["state"].count) == 4 and int(got["state"].num_steps) == 6
    late = run_rule([100.0, 100.0, 1.0], warmup_steps=1)  # warm-up over at step 2
    assert late["threshold"][2] == 100.0  # no floor: mean 100, no spread
    assert int(late["state"].count) == 3  # no restart
    assert late["scale"][1] == 1.0  # 100 is not above a threshold of 100


@pytest.mark.parametrize("factor", [1e-6, 2.0**-10, 3.0, 1e4, 1e5])
@pytest.mark.parametrize("kind", ["spiky", "drifting"])
def test_capping_decisions_do_not_depend_on_the_units(kind, factor):
    values = spiky_values(1500, seed=4, level=1.0, spike_rate=0.03)
    if kind == "drifting":
        values = drifting_values(1500, seed=5)
    values[:3] = [1.0, 50.0, 1.2]  # an early spike as well
    base = run_rule(values)
    scaled = run_rule(values * factor)
    np.testing.assert_array_equal(scaled["scale"] < 1, base["scale"] < 1)
    np.testing.assert_allclose(scaled["scale"], base["scale"], rtol=1e-4)
    assert np.sum(base["scale"] < 1) > 20


@pytest.mark.parametrize("seed", range(4))
def test_a_100x_spike_after_step_10_is_capped(seed):
    values = noisy_training_losses(400, seed, noise=0.3)
    spike_steps = np.asarray([11, 12, 15, 40, 300])
    for spike_step in spike_steps:
        spiky = values.copy()
        spiky[spike_step - 1] *= 100.0
        assert run_rule(spiky)["scale"][spike_step - 1] < 0.1, spike_step


@pytest.mark.parametrize("spike_step", [1, 2, 3, 5])
@pytest.mark.parametrize("magnitude", [1e3, 1e8])
def test_an_early_huge_spike_does_not_disable_capping_later(spike_step, magnitude):
    values = noisy_training_losses(600, seed=spike_step, noise=0.2)
    later = np.asarray([30, 100, 500])
    values[later - 1] *= 100.0
    baseline = run_rule(values)["scale"]
    values[spike_step - 1] *= magnitude
    scale = run_rule(values)["scale"]
    assert scale[spike_step - 1] < 0.1 or spike_step == 1  # nothing to compare at step 1
    # Later spikes are capped about as hard as without the early spike.
    assert np.all(baseline[later - 1] < 0.2)
    assert np.all(scale[later - 1] < 2 * baseline[later - 1])
    clean = np.ones(600, bool)
    clean[: spike_step + 1] = False
    clean[later - 1] = False
    assert np.mean(scale[clean] < 1) <= np.mean(baseline[clean] < 1) + 0.005


@pytest.mark.parametrize("seed", range(3))
def test_clean_sequences_are_rarely_capped(seed):
    rates = []
    for noise in (0.05, 0.2, 0.3):
        scale = run_rule(noisy_training_losses(3000, seed, noise=noise))["scale"]
        rates.append(np.mean(scale < 1))
    stationary = 1.0 + 0.1 * np.random.default_rng(seed).standard_normal(3000)
    rates.append(np.mean(run_rule(stationary)["scale"] < 1))
    assert max(rates) < 0.01, rates


def test_threshold_is_right_for_large_values_with_tiny_spread():
    """Values of 1000 +- 0.1: raw float32 moments cancel, the stable recurrence does not."""
    rng = np.random.default_rng(0)
    values = 1000.0 + 0.1 * rng.standard_normal(4000)
    state = run_rule(values)["state"]
    std = np.sqrt(float(state.var))
    assert 0.07 < std < 0.13
    assert 1000.2 < float(state.threshold) < 1000.45
    # The same data through float32 raw moments (the paper's formulation) is wrong.
    mu1, mu2 = np.float32(values[0]), np.float32(values[0]) ** 2
    for value in values[1:].astype(np.float32):
        mu1 = np.float32(0.999) * mu1 + np.float32(0.001) * value
        mu2 = np.float32(0.999) * mu2 + np.float32(0.001) * value * value
    naive_std = np.sqrt(max(float(mu2 - mu1 * mu1), 0.0))
    assert abs(naive_std - std) > 0.5 * std


def test_the_capped_value_not_the_raw_one_is_folded():
    got = run_rule([10.0], mu1=1.0, mu2=1.25)  # threshold 1 + 3 * 0.5 = 2.5
    state = got["state"]
    assert got["threshold"][0] == 2.5 and got["scale"][0] == 0.25
    assert float(state.mean) == pytest.approx(0.999 * 1.0 + 0.001 * 2.5)
    assert int(state.num_clipped) == 1 and float(state.scale) == 0.25


def test_a_batch_folds_the_mean_and_variance_of_its_capped_values():
    """Per example: the batch's capped mean and variance enter as the paper's batch
    means of x' and x'**2 (here decay 0.5 and the paper's initial moments)."""
    batch = np.asarray([[1.0, 3.0, 100.0, 2.0]])
    got = run_rule(batch, decay=0.5, mu1=2.0, mu2=5.0)  # threshold 2 + 3 * 1 = 5
    capped = np.minimum(batch[0], 5.0)
    mu1 = 0.5 * 2.0 + 0.5 * capped.mean()
    mu2 = 0.5 * 5.0 + 0.5 * np.mean(capped**2)
    state = got["state"]
    np.testing.assert_allclose(float(state.mean), mu1, rtol=1e-6)
    np.testing.assert_allclose(float(state.var), mu2 - mu1**2, rtol=1e-6)
    np.testing.assert_allclose(got["scale"][0], (3 + 5.0 / 100.0) / 4, rtol=1e-6)
    assert int(state.num_losses) == 4 and int(state.num_clipped) == 1


normal_f32 = st.floats(
    min_value=float(np.float32(-1e30)),
    max_value=float(np.float32(1e30)),
    width=32,
    allow_nan=False,
    allow_subnormal=False,
)


@hypothesis.given(value=normal_f32, threshold=normal_f32 | st.just(np.inf))
@hypothesis.settings(deadline=None, max_examples=400)
def test_loss_scale_is_in_the_unit_interval_and_caps_at_the_threshold(value, threshold):
    # (No subnormals: XLA on CPU flushes them to zero, so 1e-39 > 0 is false there.)
    value, threshold = np.float32(value), np.float32(threshold)
    scale, capped = loss_scale(jnp.float32(value), jnp.float32(threshold))
    assert 0.0 <= float(scale) <= 1.0
    assert bool(capped) == (value > threshold and value > 0)
    if bool(capped):
        assert float(scale) * value <= max(threshold, 0.0) * (1 + 1e-6)
    else:
        assert float(scale) == 1.0


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    values=st.lists(
        st.floats(0.0, 2.0**50, allow_subnormal=False, width=32), min_size=2, max_size=30
    )
)
def test_the_factor_of_any_sequence_is_in_the_unit_interval(values):
    padded = np.zeros(30)  # one shape: one compilation for every example
    padded[: len(values)] = values
    scale = run_rule(padded)["scale"]
    assert np.all((scale >= 0) & (scale <= 1))


def test_signed_values_never_give_a_factor_outside_the_unit_interval():
    rng = np.random.default_rng(5)
    values = rng.standard_normal(2000) * 3.0 - 1.0  # mostly negative, thresholds <= 0 too
    values[::97] = 50.0
    from_data, paper = run_rule(values), run_rule(values, mu1=-1.0, mu2=2.0)  # mean < 0
    for got in (from_data, paper):
        assert np.all((got["scale"] >= 0) & (got["scale"] <= 1))
        assert np.any(got["scale"] < 1)
    assert np.any(from_data["threshold"] <= 0)
    # A threshold <= 0 drops a positive value's step; a negative value is never capped.
    scale, capped = loss_scale(jnp.float32([5.0, -5.0]), jnp.float32(-1.0))
    np.testing.assert_array_equal(scale, [0.0, 1.0])
    np.testing.assert_array_equal(capped, [True, False])


def test_counters_saturate_at_the_int32_maximum():
    rule = make_rule(3.0, 0.999, None, None, WARMUP)
    state = init_state(rule)._replace(
        num_steps=jnp.int32(INT32_MAX),
        num_losses=jnp.int32(INT32_MAX - 1),
        num_clipped=jnp.int32(INT32_MAX),
        count=jnp.int32(INT32_MAX),
    )
    state = state._replace(mean=jnp.float32(1.0), threshold=jnp.float32(1.0))
    _, _, new = cap_and_fold(rule, state, jnp.float32([5.0, 5.0, 5.0]))
    assert int(new.num_losses) == int(new.num_steps) == int(new.num_clipped) == INT32_MAX
    assert int(new.count) == INT32_MAX
    assert np.isfinite(float(new.mean)) and np.isfinite(float(new.threshold))


def test_initial_states():
    paper = init_state(make_rule(3.0, 0.999, 25.0, 900.0, WARMUP), 25.0, 900.0)
    assert float(paper.mean) == 25.0 and float(paper.var) == 275.0  # exact: no cancellation
    np.testing.assert_allclose(float(paper.threshold), 25 + 3 * np.sqrt(275 + 1e-8), rtol=1e-7)
    data = init_state(make_rule(3.0, 0.999, None, None, WARMUP))
    assert float(data.mean) == 0.0 and float(data.var) == 0.0 and float(data.scale) == 1.0
    assert float(data.threshold) == np.inf  # no cap before the first value
    for state in (paper, data):
        assert state.count.dtype == jnp.int32 and state.mean.dtype == jnp.float32
        assert all(jnp.shape(leaf) == () for leaf in state)


FIELDS = (
    "count",
    "mean",
    "var",
    "threshold",
    "scale",
    "num_steps",
    "num_losses",
    "num_clipped",
    "num_nonfinite",
)


def test_state_fields_are_the_checkpoint_format():
    """Names and order of the fields are part of every checkpoint that holds them."""
    assert ALRCState._fields == FIELDS
    assert ALRCSignalsState._fields == ("loss", "grad_norm")


def test_find_alrc_states_and_their_signals():
    params = jnp.zeros(2)
    tx = optax.chain(
        alrc(),
        optax.inject_hyperparams(alrc)(signal="both"),
        alrc_per_example(),
        optax.adam(1e-3),
    )
    found = find_alrc_states(tx.init(params))
    assert len(found) == 4
    paths = [jax.tree_util.keystr(path) for path, _ in found]
    assert paths == ["[0]", "[1].inner_state.loss", "[1].inner_state.grad_norm", "[2].losses"]
    assert [signal_of(path) for path, _ in found] == ["loss", "loss", "grad_norm", "loss"]
    assert all(type(state) is ALRCState for _, state in found)
    assert find_alrc_states(optax.adam(1e-3).init(params)) == []


def test_zero_if_skipped_gives_exact_positive_zeros_and_keeps_dtypes():
    updates = {"w": jnp.float32([np.nan, -1.0, np.inf]), "b": jnp.bfloat16([-2.0])}
    skipped = zero_if_skipped(updates, jnp.bool_(False), jnp.float32(0.5))
    kept = zero_if_skipped(updates, jnp.bool_(True), jnp.float32(0.5))
    assert jax.tree.map(lambda x: x.dtype, skipped) == jax.tree.map(lambda x: x.dtype, updates)
    assert jax.tree.map(lambda x: x.dtype, kept) == jax.tree.map(lambda x: x.dtype, updates)
    for name in updates:
        skipped_leaf = np.asarray(skipped[name], np.float32)
        np.testing.assert_array_equal(skipped_leaf, 0.0)
        assert not np.any(np.signbit(skipped_leaf))
    np.testing.assert_array_equal(kept["w"], [np.nan, -0.5, np.inf])
    np.testing.assert_array_equal(np.asarray(kept["b"], np.float32), [-1.0])
