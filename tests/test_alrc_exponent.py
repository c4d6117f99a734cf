"""Tests of ``alrc(exponent=p)``: a capped step's factor is ``(t / x) ** p`` (issue 19).

The float64 reference below is the from-data ALRC rule written from its documentation
(as in ``tests/test_alrc_signals.py``), with the factor raised to the power ``p``; the
statistics fold in the capped value ``t`` whatever ``p`` is.
"""

import functools

import _multidevice_runs as mdr
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_multidevice as md
from _alrc_sequences import noisy_training_losses, run_losses

from optax_logdamp import alrc
from optax_logdamp._alrc import loss_scale

WARMUP = 20


def rule_steps(xs, num_stddev=3.0, decay=0.999, warmup=WARMUP):
    """The from-data ALRC rule in float64, step by step: ``(threshold, capped, mean)``.

    ``threshold`` is the cap the step's value ``x`` met, ``mean`` the running mean once
    the step's value (``threshold`` where capped: whatever the exponent) is folded in.
    """
    count, mean, var = 0, 0.0, 0.0
    for step, x in enumerate(xs):
        threshold = np.inf
        if count > 0:
            threshold = mean + num_stddev * np.sqrt(var)
            if step < warmup:
                threshold = max(threshold, (1 + num_stddev) * mean)
        capped = x > threshold and x > 0
        value = threshold if capped else x
        count += 1
        if step < warmup and count > 1 and mean > 0 and value * (1 + num_stddev) < mean:
            count, mean, var = 1, value, 0.0
        else:
            rate = min(1.0, (1 - decay) / (1 - decay**count))
            delta = value - mean
            mean += rate * delta
            var = (1 - rate) * (var + rate * delta**2)
        yield threshold, capped, mean


def reference(xs, exponent, num_stddev=3.0, decay=0.999, warmup=WARMUP):
    """The from-data ALRC rule in float64, with the factor ``(t / x) ** exponent``."""
    thresholds, factors = [], []
    for x, (threshold, capped, _) in zip(
        xs, rule_steps(xs, num_stddev, decay, warmup), strict=True
    ):
        factors.append((threshold / x) ** exponent if capped else 1.0)
        thresholds.append(threshold)
    return np.asarray(thresholds), np.asarray(factors)


def spiky(num_steps, seed, *, level=1.0):
    """A drifting, noisy positive sequence with 2 % spikes of 3x to 1000x, one early."""
    rng = np.random.default_rng(seed)
    xs = level * noisy_training_losses(num_steps, seed, start=2.0, end=0.7, noise=0.15)
    spikes = rng.random(num_steps) < 0.02
    xs[spikes] *= 10.0 ** rng.uniform(0.5, 3, spikes.sum())
    xs[2] *= 300.0  # warm-up floor and restart are exercised
    return xs


def gradients_with_norms(norms, seed=0):
    """Gradient trees (two leaves, 7 elements) whose global norms are ``norms``."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(norms), 7))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    grads = (directions * np.asarray(norms)[:, None]).astype(np.float32)
    return {"w": jnp.asarray(grads[:, :4].reshape(-1, 2, 2)), "b": jnp.asarray(grads[:, 4:])}


def exact_norms(grads):
    flat = [np.asarray(g, np.float64).reshape(len(g), -1) for g in jax.tree.leaves(grads)]
    return np.linalg.norm(np.concatenate(flat, 1), axis=1)


def run(tx, grads, losses):
    """One jitted scan: per step the factor applied (the smallest signal's), the final state."""
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)

    def step(state, inputs):
        g, loss = inputs
        updates, state = tx.update(g, state, params, value=loss)
        factor = functools.reduce(jnp.minimum, [s.scale for s in alrc_states(state)])
        expected = jax.tree.map(lambda leaf: leaf * factor, g)
        same = jnp.all(
            jnp.stack(
                [
                    jnp.all(a == b)
                    for a, b in zip(*map(jax.tree.leaves, (updates, expected)), strict=True)
                ]
            )
        )
        return state, (factor, same)

    scan = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))
    state, (factors, same) = scan(tx.init(params), (grads, jnp.asarray(losses, jnp.float32)))
    assert np.all(np.asarray(same))  # the updates are the gradients times the factor
    return np.asarray(factors), state


def alrc_states(state):
    """The :class:`ALRCState` of every signal in an optimizer state."""
    return [node for _, node in md.find_alrc_states(state)]


def without_scale(state):
    """Every ALRC statistic and counter of ``state``, without the applied factor."""
    return [s._replace(scale=None) for s in alrc_states(state)]


def statistics(state):
    """The statistics of every signal, without the factor and the skip counter."""
    return [s._replace(scale=None, num_nonfinite=None) for s in alrc_states(state)]


@pytest.mark.parametrize("exponent", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_grad_norm_rule_matches_a_float64_reference(exponent, seed):
    norms = spiky(3000, seed)
    grads = gradients_with_norms(norms, seed)
    xs = exact_norms(grads)
    expected_thresholds, expected = reference(xs, exponent)
    got, _ = run(alrc(signal="grad_norm", exponent=exponent), grads, np.ones(len(xs)))
    clear = np.abs(xs - expected_thresholds) > 1e-3 * xs  # no near-ties
    np.testing.assert_array_equal((got < 1)[clear], (expected < 1)[clear])
    np.testing.assert_allclose(got[clear], expected[clear], rtol=2e-4 * exponent)
    assert 0.01 < np.mean(expected < 1) < 0.3  # clipping is exercised
    assert np.all((got >= 0) & (got <= 1))


@pytest.mark.parametrize("exponent", [1.5, 2.0, 4.0])
def test_loss_rule_matches_a_float64_reference(exponent):
    losses = spiky(2000, seed=5)
    expected_thresholds, expected = reference(losses.astype(np.float32), exponent)
    got = run_losses(alrc(exponent=exponent), losses)
    used = got["threshold_used"].astype(np.float64)
    np.testing.assert_allclose(used[1:], expected_thresholds[1:], rtol=2e-4)
    clear = np.abs(losses - expected_thresholds) > 1e-3 * losses
    np.testing.assert_allclose(got["scale"][clear], expected[clear], rtol=2e-4 * exponent)
    # Against the float32 threshold it used, the factor is accurate to float32 rounding.
    capped = got["scale"] < 1
    x = losses.astype(np.float32).astype(np.float64)[capped]
    want = (np.float32(used[capped] / x).astype(np.float64)) ** exponent
    np.testing.assert_allclose(got["scale"][capped], want, rtol=3e-7 * (1 + exponent))


@pytest.mark.parametrize("signal", ["loss", "grad_norm", "both"])
@pytest.mark.parametrize("exponent", [1.5, 2.0, 3.0])
def test_statistics_do_not_depend_on_the_exponent(signal, exponent):
    norms = spiky(800, seed=2)
    losses = spiky(800, seed=3)
    grads = gradients_with_norms(norms, seed=2)
    f1, s1 = run(alrc(signal=signal), grads, losses)
    fp, sp = run(alrc(signal=signal, exponent=exponent), grads, losses)
    # The same statistic and fold; only XLA's fusion of a different program (signal "both")
    # may round the variance's update differently, by an ulp.
    chex.assert_trees_all_close(without_scale(sp), without_scale(s1), rtol=1e-6)
    assert np.sum(f1 < 1) > 5
    np.testing.assert_array_equal(fp < 1, f1 < 1)  # the same decisions
    np.testing.assert_allclose(fp, f1**exponent, rtol=2e-6 * exponent)


def test_paper_inits_take_the_exponent_too():
    losses = spiky(500, seed=4, level=20.0)
    plain = run_losses(alrc(mu1_init=25.0, mu2_init=900.0), losses)
    squared = run_losses(alrc(mu1_init=25.0, mu2_init=900.0, exponent=2.0), losses)
    jax.tree.map(
        np.testing.assert_array_equal,
        without_scale(squared["state"]),
        without_scale(plain["state"]),
    )
    assert np.sum(plain["scale"] < 1) > 3
    np.testing.assert_allclose(squared["scale"], plain["scale"] ** 2, rtol=4e-7)


@pytest.mark.parametrize("signal", ["loss", "grad_norm", "both"])
def test_default_is_bitwise_the_paper_factor(signal):
    """Exponent 1 (default, explicit, or traced) is the factor clip(t / x) of float32."""
    norms = spiky(600, seed=6)
    losses = spiky(600, seed=7)
    grads = gradients_with_norms(norms, seed=6)
    default, default_state = run(alrc(signal=signal), grads, losses)
    for tx in (
        alrc(signal=signal, exponent=1.0),
        alrc(signal=signal, exponent=1),
        alrc(signal=signal, exponent=np.float32(1.0)),
    ):
        factors, state = run(tx, grads, losses)
        np.testing.assert_array_equal(factors, default)
        chex.assert_trees_all_equal(alrc_states(state), alrc_states(default_state))
    # A traced 1 takes the paper's factor too; the program differs, so XLA may round
    # the statistics differently by an ulp.
    injected = optax.inject_hyperparams(alrc, static_args=("signal",))
    factors, state = run(injected(signal=signal, exponent=1.0), grads, losses)
    np.testing.assert_allclose(factors, default, rtol=1e-6)
    chex.assert_trees_all_close(alrc_states(state), alrc_states(default_state), rtol=1e-6)
    # The paper's float32 factor, computed here from the threshold the state held.
    got = run_losses(alrc(), losses)
    threshold = got["threshold_used"]
    x = losses.astype(np.float32)
    want = np.where(x > threshold, np.clip(threshold / x, 0, 1), 1).astype(np.float32)
    np.testing.assert_array_equal(got["scale"], want)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("c", [2.0**10, 1e-4, 37.0])
def test_scale_invariance(exponent, c):
    """Multiplying the gradients by c > 0 keeps the decisions and the factors."""
    norms = spiky(1500, seed=8)
    grads = gradients_with_norms(norms, seed=8)
    scaled = jax.tree.map(lambda g: g * np.float32(c), grads)
    ones = np.ones(len(norms))
    base, _ = run(alrc(signal="grad_norm", exponent=exponent), grads, ones)
    got, _ = run(alrc(signal="grad_norm", exponent=exponent), scaled, ones)
    np.testing.assert_array_equal(got < 1, base < 1)
    np.testing.assert_allclose(got, base, rtol=1e-4 * exponent)
    lbase = run_losses(alrc(exponent=exponent), norms)["scale"]
    lgot = run_losses(alrc(exponent=exponent), norms * c)["scale"]
    np.testing.assert_array_equal(lgot < 1, lbase < 1)
    np.testing.assert_allclose(lgot, lbase, rtol=1e-4 * exponent)


_floats = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


@hypothesis.given(
    loss=_floats | st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan]),
    threshold=_floats | st.sampled_from([0.0, np.inf, -np.inf]),
    exponent=st.floats(1.0, 50.0, width=32),
)
@hypothesis.settings(deadline=None, max_examples=300)
def test_factor_is_in_unit_interval_and_the_power_of_the_paper_factor(loss, threshold, exponent):
    loss, threshold = jnp.float32(loss), jnp.float32(threshold)
    paper, capped = loss_scale(loss, threshold)
    powered, capped_p = loss_scale(loss, threshold, jnp.float32(exponent))
    assert bool(capped_p) == bool(capped)
    assert 0.0 <= float(powered) <= 1.0
    assert float(powered) <= float(paper)
    want = float(paper) ** float(np.float32(exponent))
    np.testing.assert_allclose(float(powered), want, rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("exponent", [0.5, 0.0, -1.0, np.nan, np.inf, "2", [2.0, 3.0]])
def test_bad_exponent_is_refused(exponent):
    with pytest.raises(ValueError, match="exponent"):
        alrc(exponent=exponent)


def test_half_precision_exponent_is_refused():
    with pytest.raises(ValueError, match=r"exponent.*float32"):
        alrc(exponent=jnp.bfloat16(2.0))
    with pytest.raises(ValueError, match=r"exponent.*float32"):  # traced: the dtype is checked
        jax.eval_shape(lambda p: alrc(exponent=p).init(jnp.ones(2)), jnp.bfloat16(2.0))


def test_traced_exponent_matches_a_concrete_one():
    norms = spiky(400, seed=9)
    losses = spiky(400, seed=10)
    grads = gradients_with_norms(norms, seed=9)
    concrete, _ = run(alrc(signal="both", exponent=2.5), grads, losses)
    injected = optax.inject_hyperparams(alrc, static_args=("signal",))(signal="both", exponent=2.5)
    traced, _ = run(injected, grads, losses)
    np.testing.assert_allclose(traced, concrete, rtol=1e-6)
    assert np.sum(concrete < 1) > 3


def test_traced_exponent_below_one_acts_as_one():
    losses = spiky(300, seed=11)
    tx = optax.inject_hyperparams(alrc)(exponent=1.0)
    params = jnp.ones(3)
    state = tx.init(params)
    state.hyperparams["exponent"] = jnp.float32(0.25)  # what a schedule might produce
    baseline = run_losses(alrc(), losses)["scale"]

    def step(state, loss):
        updates, state = tx.update(jnp.ones(3), state, params, value=loss)
        return state, updates[0]

    _, got = jax.lax.scan(step, state, jnp.asarray(losses, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), baseline)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("signal", ["loss", "grad_norm", "both"])
def test_non_finite_step_is_skipped_and_statistics_unchanged(signal, bad):
    tx = alrc(signal=signal, exponent=2.0)
    params = jnp.ones(3)
    state = tx.init(params)
    for loss in (1.0, 1.1, 50.0, 0.9):
        _, state = tx.update(jnp.full(3, loss), state, params, value=loss)
    grads = jnp.array([1.0, bad, 1.0]) if signal != "loss" else jnp.ones(3)
    value = bad if signal != "grad_norm" else 1.0
    updates, new_state = tx.update(grads, state, params, value=value)
    np.testing.assert_array_equal(np.asarray(updates), np.zeros(3))
    leaves = jax.tree.leaves(new_state)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves if leaf.dtype.kind == "f")
    chex.assert_trees_all_equal(statistics(new_state), statistics(state))
    assert [int(s.num_nonfinite) for s in alrc_states(new_state)] == [1] * len(alrc_states(state))


# --------------------------------------------------------------------------- multi-device

MULTI = {
    "loss": mdr.Case(
        lambda axis: optax.chain(alrc(exponent=2.0, axis_name=axis), optax.sgd(0.01)), False
    ),
    "both": mdr.Case(
        lambda axis: optax.chain(
            alrc(signal="both", exponent=3.0, axis_name=axis), optax.sgd(0.01)
        ),
        False,
    ),
}


@mdr.needs_eight_devices
@pytest.mark.parametrize("name", list(MULTI))
def test_multi_device_agrees_with_single_device(name):
    reference = mdr.single_device(MULTI[name])
    clipped = [int(s.num_clipped) for s in alrc_states(reference[1])]
    assert clipped and all(n > 0 for n in clipped)  # the spike is capped: the exponent acts
    mdr.assert_agrees_on_every_layout(MULTI[name], reference)
