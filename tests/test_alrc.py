"""Tests of batch-level ALRC (SPEC 1.2): the paper's rule, robustness, state, errors."""

import collections
import pydoc

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _alrc_sequences import noisy_training_losses, run_losses

from optax_logdamp import ALRCSignalsState, ALRCState, alrc
from optax_logdamp._alrc import loss_scale
from optax_logdamp._docs import document_fields


def paper_reference(losses, num_stddev, decay, mu1, mu2):
    """The paper's rule with raw moments, written independently in float64.

    Returns the threshold used at each step and the gradient factor t/L (or 1).
    """
    thresholds, scales = [], []
    for loss in losses:
        sigma = np.sqrt(mu2 - mu1**2 + 1e-8)
        threshold = mu1 + num_stddev * sigma
        if loss >= threshold:
            capped, scale = threshold, threshold / loss
        else:
            capped, scale = loss, 1.0
        mu1 = decay * mu1 + (1 - decay) * capped
        mu2 = decay * mu2 + (1 - decay) * capped**2
        thresholds.append(threshold)
        scales.append(scale)
    return np.asarray(thresholds), np.asarray(scales)


def spiky_losses(num_steps, seed, *, level=25.0, spike_rate=0.02):
    rng = np.random.default_rng(seed)
    losses = level * np.exp(0.3 * rng.standard_normal(num_steps))
    spikes = rng.random(num_steps) < spike_rate
    losses[spikes] *= 10.0 ** rng.uniform(0.5, 4, spikes.sum())
    return losses


@pytest.mark.parametrize(
    ("num_stddev", "decay", "mu1", "mu2"),
    [(3.0, 0.999, 25.0, 30.0**2), (2.0, 0.9, 25.0, 30.0**2), (3.0, 0.99, 75.0, 9 * 30.0**2)],
)
def test_paper_rule_reproduced_step_by_step(num_stddev, decay, mu1, mu2):
    losses = spiky_losses(3000, seed=int(decay * 1000))
    expected_thresholds, expected_scales = paper_reference(losses, num_stddev, decay, mu1, mu2)
    tx = alrc(num_stddev, decay, mu1_init=mu1, mu2_init=mu2)
    got = run_losses(tx, losses)
    np.testing.assert_allclose(got["threshold_used"], expected_thresholds, rtol=1e-4)
    clear = np.abs(losses - expected_thresholds) > 1e-3 * expected_thresholds  # no near-ties
    np.testing.assert_array_equal((got["scale"] < 1)[clear], (expected_scales < 1)[clear])
    np.testing.assert_allclose(got["scale"], expected_scales, rtol=1e-4)
    assert 0.01 < np.mean(expected_scales < 1) < 0.5  # the sequence does exercise clipping


def test_paper_initial_state():
    state = alrc(mu1_init=25.0, mu2_init=900.0).init(jnp.zeros(2))
    assert isinstance(state, ALRCState)
    assert float(state.mean) == 25.0 and float(state.var) == 275.0
    np.testing.assert_allclose(float(state.threshold), 25 + 3 * np.sqrt(275 + 1e-8), rtol=1e-7)


@pytest.mark.parametrize("factor", [1e-5, 1e-2, 3.0, 1e3, 1e5])
def test_clip_decisions_are_invariant_to_the_loss_scale(factor):
    losses = spiky_losses(1500, seed=4, level=1.0, spike_rate=0.03)
    losses[:3] = [1.0, 50.0, 1.2]  # an early spike as well
    base = run_losses(alrc(), losses)
    scaled = run_losses(alrc(), losses * factor)
    np.testing.assert_array_equal(scaled["scale"] < 1, base["scale"] < 1)
    np.testing.assert_allclose(scaled["scale"], base["scale"], rtol=1e-4)
    assert np.sum(base["scale"] < 1) > 20


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spike_step", [11, 12, 15, 40, 300])
def test_a_100x_spike_after_step_10_is_clipped(seed, spike_step):
    losses = noisy_training_losses(400, seed, noise=0.3)
    losses[spike_step - 1] *= 100.0
    scale = run_losses(alrc(), losses)["scale"][spike_step - 1]
    assert scale < 0.1


@pytest.mark.parametrize("spike_step", [1, 2, 3, 5])
@pytest.mark.parametrize("magnitude", [1e3, 1e8])
def test_an_early_huge_spike_does_not_disable_clipping_later(spike_step, magnitude):
    losses = noisy_training_losses(600, seed=spike_step, noise=0.2)
    later_spikes = np.asarray([30, 100, 500])
    losses[later_spikes - 1] *= 100.0
    baseline = run_losses(alrc(), losses)["scale"]
    losses[spike_step - 1] *= magnitude
    scale = run_losses(alrc(), losses)["scale"]
    assert scale[spike_step - 1] < 0.1 or spike_step == 1  # nothing to compare at step 1
    # Later spikes are clipped about as hard as without the early spike.
    assert np.all(scale[later_spikes - 1] < 2 * baseline[later_spikes - 1])
    assert np.all(baseline[later_spikes - 1] < 0.2)
    clean = np.ones(600, bool)
    clean[: spike_step + 1] = False
    clean[later_spikes - 1] = False
    assert np.mean(scale[clean] < 1) < 0.02


@pytest.mark.parametrize("seed", range(3))
def test_clean_losses_are_rarely_clipped(seed):
    rates = []
    for noise in (0.05, 0.2, 0.3):
        scale = run_losses(alrc(), noisy_training_losses(3000, seed, noise=noise))["scale"]
        rates.append(np.mean(scale < 1))
    stationary = 1.0 + 0.1 * np.random.default_rng(seed).standard_normal(5000)
    rates.append(np.mean(run_losses(alrc(), stationary)["scale"] < 1))
    assert max(rates) < 0.01, rates


def test_threshold_is_right_for_large_losses_with_tiny_spread():
    """Losses of 1000 +- 0.1: raw float32 moments cancel, the stable recurrence does not."""
    rng = np.random.default_rng(0)
    losses = 1000.0 + 0.1 * rng.standard_normal(4000)
    state = run_losses(alrc(), losses)["state"]
    std = np.sqrt(float(state.var))
    assert 0.07 < std < 0.13
    assert 1000.2 < float(state.threshold) < 1000.45
    # The same data through float32 raw moments (the original formulation) is wrong.
    mu1, mu2 = np.float32(losses[0]), np.float32(losses[0]) ** 2
    for loss in losses[1:].astype(np.float32):
        mu1 = np.float32(0.999) * mu1 + np.float32(0.001) * loss
        mu2 = np.float32(0.999) * mu2 + np.float32(0.001) * loss * loss
    naive_std = np.sqrt(max(float(mu2 - mu1 * mu1), 0.0))
    assert abs(naive_std - std) > 0.5 * std


def test_statistics_are_float32_whatever_the_params():
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        params = {"w": jnp.ones((2, 2), dtype)}
        tx = alrc()
        state = tx.init(params)
        _, state = tx.update(params, state, params, value=jnp.asarray(2.0, dtype))
        assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["data", "paper"])
def test_non_finite_loss_skips_the_step_and_keeps_statistics(bad, mode):
    kwargs = {} if mode == "data" else {"mu1_init": 1.0, "mu2_init": 2.0}
    tx = alrc(**kwargs)
    params = {"w": jnp.ones(3), "b": jnp.ones((), jnp.bfloat16)}
    state = tx.init(params)
    for loss in (1.0, 1.1, 0.9):
        _, state = tx.update(params, state, params, value=loss)
    grads = {"w": jnp.asarray([np.nan, 1.0, np.inf]), "b": jnp.asarray(np.nan, jnp.bfloat16)}
    updates, new_state = jax.jit(tx.update)(grads, state, params, value=bad)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
        assert not np.any(np.signbit(np.asarray(leaf, np.float32)))
    for name in ("count", "mean", "var", "threshold", "num_steps", "num_losses", "num_clipped"):
        np.testing.assert_array_equal(getattr(new_state, name), getattr(state, name))
    assert int(new_state.num_nonfinite) == 1 and float(new_state.scale) == 0.0
    assert all(
        np.all(np.isfinite(np.asarray(x))) for x in new_state if x is not new_state.threshold
    )


normal_f32 = st.floats(
    min_value=float(np.float32(-1e30)),
    max_value=float(np.float32(1e30)),
    width=32,
    allow_nan=False,
    allow_subnormal=False,
)


@hypothesis.given(
    loss=normal_f32,
    threshold=normal_f32 | st.just(np.inf),
)
@hypothesis.settings(deadline=None, max_examples=400)
def test_scale_is_always_in_unit_interval(loss, threshold):
    # (No subnormals: XLA on CPU flushes them to zero, so 1e-39 > 0 is false there.)
    loss, threshold = np.float32(loss), np.float32(threshold)
    scale, capped = loss_scale(jnp.float32(loss), jnp.float32(threshold))
    assert 0.0 <= float(scale) <= 1.0
    assert bool(capped) == (loss > threshold and loss > 0)
    if loss > 0:
        assert float(scale) * loss <= max(threshold, 0.0) * (1 + 1e-6) or not bool(capped)


def test_signed_losses_never_amplify_or_flip_gradients():
    rng = np.random.default_rng(5)
    losses = rng.standard_normal(2000) * 3.0 - 1.0  # mostly negative, thresholds <= 0 too
    losses[::97] = 50.0
    grads = jnp.asarray([1.0, -2.0, 3.0])
    got = run_losses(alrc(), losses, params=jnp.zeros(3))
    scale = got["scale"]
    assert np.all((scale >= 0) & (scale <= 1))
    assert np.any(scale < 1) and np.any(got["threshold_used"] <= 0)
    tx = alrc(mu1_init=-1.0, mu2_init=2.0)  # a negative mean from the first step
    state = tx.init(grads)
    for loss in losses[:50]:
        updates, state = tx.update(grads, state, value=loss)
        assert np.all(np.asarray(updates) * np.asarray(grads) >= 0)
        assert np.all(np.abs(np.asarray(updates)) <= np.abs(np.asarray(grads)))


def test_updates_are_scaled_by_threshold_over_loss():
    tx = alrc(mu1_init=1.0, mu2_init=1.25)  # threshold 1 + 3 * 0.5 = 2.5
    grads = {"a": jnp.asarray([2.0, -4.0]), "b": jnp.asarray(1.0, jnp.bfloat16)}
    state = tx.init(grads)
    updates, state = tx.update(grads, state, value=10.0)
    np.testing.assert_allclose(np.asarray(updates["a"]), [0.5, -1.0], rtol=1e-6)
    assert updates["b"].dtype == jnp.bfloat16
    assert float(state.scale) == pytest.approx(0.25) and int(state.num_clipped) == 1
    # The capped loss (2.5), not 10, entered the statistics.
    assert float(state.mean) == pytest.approx(0.999 * 1.0 + 0.001 * 2.5)


def test_state_fields_and_tree_get_in_a_chain():
    tx = optax.chain(alrc(), optax.adam(1e-3))
    state = tx.init({"w": jnp.ones(2)})
    assert set(ALRCState._fields) >= {"count", "mean", "var", "threshold", "scale", "num_clipped"}
    assert float(optax.tree.get(state, "mean")) == 0.0
    assert float(optax.tree.get(state, "threshold")) == np.inf
    for leaf in jax.tree.leaves(state[0]):
        assert leaf.shape == ()


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


def test_state_fields_are_documented_where_help_shows_them():
    assert ALRCState._fields == FIELDS  # names and order are part of the checkpoint format
    text = pydoc.render_doc(ALRCState, renderer=pydoc.plaintext)
    assert "Alias for field number" not in text
    signals_text = pydoc.render_doc(ALRCSignalsState, renderer=pydoc.plaintext)
    assert "Alias for field number" not in signals_text
    for name in FIELDS:
        doc = getattr(ALRCState, name).__doc__
        assert doc.split(":")[0] in ("int32", "float32"), (name, doc)  # dtype first
        assert f"{name}\n |      {doc}" in text  # under "Data descriptors", by help()
        assert f"\n      {name}: {doc.split()[0]}" in ALRCState.__doc__  # Attributes: entry


def test_a_state_field_without_an_attributes_entry_is_an_error():
    def state_class(*fields):
        cls = collections.namedtuple("Documented", fields)
        cls.__doc__ = (
            "A state.\n\n    Attributes:\n      a: the first field,\n        on two lines.\n"
        )
        return cls

    assert document_fields(state_class("a")).a.__doc__ == "the first field, on two lines."
    with pytest.raises(ValueError, match=r"\['b'\] have no entry under 'Attributes:'"):
        document_fields(state_class("a", "b"))


def test_missing_value_names_it_and_shows_the_fix():
    tx = optax.chain(alrc(), optax.sgd(1.0))
    params = jnp.ones(2)
    with pytest.raises(TypeError, match=r"value=loss"):
        tx.update(params, tx.init(params), params)


def test_unknown_extra_arguments_are_ignored():
    tx = alrc()
    params = jnp.ones(2)
    updates, _ = tx.update(params, tx.init(params), params, value=1.0, rng=3, step=1)
    np.testing.assert_array_equal(updates, params)


@pytest.mark.parametrize("value", [jnp.ones(4), jnp.ones((1,)), jnp.ones((2, 2))])
def test_non_scalar_loss_is_refused_with_a_pointer(value):
    tx = alrc()
    with pytest.raises(ValueError, match="alrc_per_example"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=value)


def test_complex_loss_is_refused():
    tx = alrc()
    with pytest.raises(TypeError, match="real loss"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=1.0 + 1j)


def test_updates_shapes_must_match_params_and_the_error_names_both():
    tx = alrc()
    params = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"updates\['w'\] has shape \(3,\), params\['w'\] has shape \(2,\)"
    ):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params, value=1.0)


@pytest.mark.parametrize("signal", ["loss", "grad_norm", "both"])
def test_a_params_tree_unlike_the_updates_is_named_with_both_structures(signal):
    tx = alrc(signal=signal)
    params = {"w": jnp.ones(2), "b": jnp.ones(())}
    updates = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError,
        match=r"params must have the tree structure of updates.*"
        r"updates has structure PyTreeDef\(\{'w': \*\}\), "
        r"params has PyTreeDef\(\{'b': \*, 'w': \*\}\)\. Only in params: \['b'\]\.",
    ):
        tx.update(updates, tx.init(params), params, value=1.0)


STATES_FROM_ELSEWHERE = {
    "None": None,
    "EmptyState": optax.EmptyState(),
    "adam": optax.adam(1e-3).init(jnp.ones(2)),
    "chain": optax.chain(alrc(), optax.sgd(1.0)).init(jnp.ones(2)),
    "dict": {"count": jnp.zeros([], jnp.int32)},
}


@pytest.mark.parametrize("state", STATES_FROM_ELSEWHERE.values(), ids=STATES_FROM_ELSEWHERE)
@pytest.mark.parametrize(
    ("signal", "expected"), [("loss", "ALRCState"), ("grad_norm", "ALRCSignalsState")]
)
def test_a_state_not_from_init_is_refused_with_the_expected_type(signal, expected, state):
    tx = alrc(signal=signal)
    name = "alrc" if signal == "loss" else r'alrc\(signal="grad_norm"\)'
    with pytest.raises(
        TypeError,
        match=rf"{name}: state must be the {expected} that this transform's init returns, got "
        rf"{type(state).__name__ if state is not None else None}\. "
        r"Create it with opt_state = tx\.init\(params\)",
    ):
        tx.update(jnp.ones(2), state, value=1.0)


def test_a_state_of_another_signal_is_refused():
    params = jnp.ones(2)
    with pytest.raises(TypeError, match=r"state must be the ALRCState .* got ALRCSignalsState"):
        alrc().update(params, alrc(signal="both").init(params), value=1.0)
    with pytest.raises(
        TypeError, match=r'alrc\(signal="both"\): state\.loss must be an ALRCState.*"grad_norm"'
    ):
        alrc(signal="both").update(params, alrc(signal="grad_norm").init(params), value=1.0)


def test_a_restored_dict_state_gets_the_checkpoint_hint():
    with pytest.raises(TypeError, match=r"restored without a target comes back as dicts"):
        alrc().update(jnp.ones(2), alrc().init(jnp.ones(2))._asdict(), value=1.0)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("1.0", "str '1.0'"),
        (b"1.0", "bytes b'1.0'"),
        (object(), "object <object"),
        (True, "dtype bool"),
    ],
    ids=["str", "bytes", "object", "bool"],
)
def test_a_value_that_is_not_a_number_names_value(value, got):
    tx = alrc()
    with pytest.raises(
        TypeError, match=rf"alrc: value must be a real loss.*value=loss\)\), got {got}"
    ):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_stddev": 0.0}, "num_stddev"),
        ({"num_stddev": -1.0}, "num_stddev"),
        ({"num_stddev": np.nan}, "num_stddev"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"mu1_init": 25.0}, "mu1_init and mu2_init"),
        ({"mu2_init": 900.0}, "mu1_init and mu2_init"),
        ({"mu1_init": 25.0, "mu2_init": 625.0}, "mu2_init must exceed"),
        ({"mu1_init": 25.0, "mu2_init": 100.0}, "mu2_init must exceed"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"num_stddev": jnp.ones(2)}, "num_stddev"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alrc(**kwargs)


def test_inject_hyperparams_with_traced_arrays_matches_plain():
    losses = spiky_losses(200, seed=7, level=2.0, spike_rate=0.05)
    plain = run_losses(alrc(2.5, 0.99), losses)
    injected_tx = optax.inject_hyperparams(alrc)(num_stddev=2.5, decay=0.99)
    injected = run_losses(injected_tx, losses)
    np.testing.assert_allclose(injected["scale"], plain["scale"], rtol=1e-6)
    paper = optax.inject_hyperparams(alrc)(mu1_init=2.0, mu2_init=5.0)
    np.testing.assert_allclose(
        run_losses(paper, losses)["scale"],
        run_losses(alrc(mu1_init=2.0, mu2_init=5.0), losses)["scale"],
        rtol=1e-6,
    )


def test_bfloat16_hyperparameters_that_round_to_one_get_a_hint():
    tx = optax.inject_hyperparams(alrc)(decay=0.999)
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):
        tx.init({"w": jnp.ones(2, jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):  # traced: no value
        jax.jit(tx.init)({"w": jnp.ones(2, jnp.bfloat16)})
    tx = optax.inject_hyperparams(alrc, hyperparam_dtype=jnp.float32)(decay=0.999)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2, jnp.bfloat16)), value=1.0)
    assert np.isfinite(float(state.inner_state.mean))


def test_hyperparameters_can_change_between_steps():
    tx = optax.inject_hyperparams(alrc)(num_stddev=3.0)
    params = jnp.ones(2)
    state = tx.init(params)
    step = jax.jit(lambda s, v: tx.update(params, s, params, value=v))
    for loss in [1.0, 1.1, 0.9] * 10:
        _, state = step(state, loss)
    loose = float(state.inner_state.threshold)
    state.hyperparams["num_stddev"] = jnp.asarray(1.0)
    _, state = step(state, 1.0)
    assert float(state.inner_state.threshold) < loose


def test_jit_does_not_retrace_across_steps():
    traces = []
    tx = optax.chain(alrc(), optax.adam(1e-2))

    @jax.jit
    def step(params, state, loss):
        traces.append(1)
        updates, state = tx.update(params, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones(3), "b": jnp.ones((), jnp.bfloat16)}
    state = tx.init(params)
    for loss in [1.0, 2.0, 100.0, 1.5, np.nan, 1.0]:
        params, state = step(params, state, jnp.float32(loss))
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shapes_and_dtypes_are_stable_inside_lax_cond(dtype):
    tx = optax.chain(alrc(), optax.adam(1e-2))
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros((3,), dtype)}
    state = tx.init(params)

    @jax.jit
    def maybe_step(pred, state, loss):
        return jax.lax.cond(
            pred,
            lambda s: tx.update(params, s, params, value=loss),
            lambda s: (params, s),
            state,
        )

    for pred, loss in [(True, 1.0), (False, 2.0), (True, 3.0)]:
        _, new_state = maybe_step(pred, state, jnp.asarray(loss, dtype))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
