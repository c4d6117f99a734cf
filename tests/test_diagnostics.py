"""alrc_diagnostics: every ALRC state in an optimizer state, as loggable scalars."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import (
    alrc,
    alrc_diagnostics,
    alrc_per_example,
    log_dampen,
    logadam,
    to_python_numbers,
)

NAMES = {
    "threshold",
    "scale",
    "num_clipped",
    "clip_rate",
    "mean",
    "std",
    "num_steps",
    "num_nonfinite",
}
LOSSES = [1.0, 1.2, 0.9, 1.1, 1.0, 50.0, 1.05, 0.95, np.nan, 1.0, 40.0, 1.1]


def run(tx, losses=LOSSES, params=None):
    """Feeds ``losses`` through ``tx`` with unit gradients; returns the final state."""
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())} if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    for loss in losses:
        grads = jax.tree.map(jnp.ones_like, params)
        _, state = update(grads, state, params, value=jnp.float32(loss))
    return state


@functools.cache
def bare_alrc_diagnostics():
    return alrc_diagnostics(run(alrc()))


def test_single_state_plain_names_and_values():
    state = run(optax.chain(alrc(), logadam(1e-2)))
    diagnostics = alrc_diagnostics(state)
    assert set(diagnostics) == NAMES
    alrc_state = state[0]
    assert int(diagnostics["num_steps"]) == sum(np.isfinite(LOSSES))
    assert int(diagnostics["num_nonfinite"]) == 1
    assert int(diagnostics["num_clipped"]) == 2  # the two spikes, 50 and 40
    np.testing.assert_allclose(
        float(diagnostics["clip_rate"]), 2 / sum(np.isfinite(LOSSES)), rtol=1e-6
    )
    np.testing.assert_allclose(float(diagnostics["std"]), math.sqrt(float(alrc_state.var)))
    assert float(diagnostics["threshold"]) == float(alrc_state.threshold)
    assert float(diagnostics["mean"]) == float(alrc_state.mean)
    assert 0.0 < float(diagnostics["scale"]) <= 1.0  # last loss 1.1: not capped
    for value in diagnostics.values():
        assert jnp.shape(value) == ()


def test_clip_rate_is_zero_before_any_loss():
    diagnostics = alrc_diagnostics(alrc().init(jnp.zeros(2)))
    assert float(diagnostics["clip_rate"]) == 0.0
    assert math.isinf(float(diagnostics["threshold"]))
    assert int(diagnostics["num_steps"]) == 0


def test_last_scale_of_a_capped_step():
    state = run(alrc(), [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0, 100.0])
    diagnostics = alrc_diagnostics(state)
    threshold_before = run(alrc(), [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0]).threshold
    np.testing.assert_allclose(float(diagnostics["scale"]), float(threshold_before) / 100.0)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda: optax.inject_hyperparams(alrc)(num_stddev=3.0),
        lambda: optax.chain(
            alrc(), optax.MultiSteps(optax.sgd(0.1), every_k_schedule=1).gradient_transformation()
        ),
        lambda: optax.masked(alrc(), {"w": True, "b": False}),
        lambda: optax.chain(log_dampen(), optax.inject_hyperparams(alrc)(), optax.adam(1e-3)),
    ],
    ids=["inject_hyperparams", "MultiSteps_outside", "masked", "chain"],
)
def test_found_anywhere_with_the_values_of_a_bare_alrc(wrap):
    reference = bare_alrc_diagnostics()
    diagnostics = alrc_diagnostics(run(wrap()))
    assert set(diagnostics) == NAMES
    for name in NAMES:
        np.testing.assert_allclose(diagnostics[name], reference[name], rtol=1e-6, err_msg=name)


def test_several_states_are_keyed_by_path():
    strict = optax.inject_hyperparams(alrc)(num_stddev=0.5)
    state = run(optax.chain(alrc(), strict, optax.sgd(0.1)))
    diagnostics = alrc_diagnostics(state)
    assert set(diagnostics) == {f"0/{name}" for name in NAMES} | {
        f"1/inner_state/{name}" for name in NAMES
    }
    for prefix, alone in [
        ("0/", bare_alrc_diagnostics()),
        ("1/inner_state/", alrc_diagnostics(run(alrc(num_stddev=0.5)))),
    ]:
        for name in NAMES:
            np.testing.assert_allclose(diagnostics[prefix + name], alone[name], err_msg=name)
    assert float(diagnostics["1/inner_state/threshold"]) < float(diagnostics["0/threshold"])


def test_per_example_clip_rate_counts_examples():
    tx = alrc_per_example()
    params = jnp.zeros(2)
    state = tx.init(params)
    for losses in [[1.0, 1.2, 0.8, 1.0]] * 5 + [[1.0, 1.1, 90.0, 0.9]]:
        threshold = float(state.threshold)  # the cap applied at this step
        _, state = tx.update(jnp.zeros(2), state, params, value=jnp.array(losses))
    diagnostics = alrc_diagnostics(state)
    assert int(diagnostics["num_clipped"]) == 1
    np.testing.assert_allclose(float(diagnostics["clip_rate"]), 1 / 24)
    np.testing.assert_allclose(float(diagnostics["scale"]), (3 + threshold / 90) / 4, rtol=1e-6)


def test_works_inside_jit_and_returns_arrays():
    tx = optax.chain(alrc(), logadam(1e-2))
    params = jnp.zeros(3)

    @jax.jit
    def step(state, loss):
        _, state = tx.update(jnp.ones(3), state, params, value=loss)
        return state, alrc_diagnostics(state)

    state = tx.init(params)
    for loss in LOSSES:
        state, diagnostics = step(state, jnp.float32(loss))
    assert all(isinstance(value, jax.Array) for value in diagnostics.values())
    outside = alrc_diagnostics(state)
    for name in NAMES:
        assert float(diagnostics[name]) == float(outside[name])


@pytest.mark.parametrize(
    "tx",
    [optax.adam(1e-3), logadam(1e-3, dampen_scale="auto"), log_dampen()],
    ids=["adam", "logadam_auto", "log_dampen"],
)
def test_no_alrc_state_gives_an_empty_dict(tx):
    """A baseline without ALRC (toggled by a config) logs nothing, with no try/except."""
    opt_state = tx.init(jnp.zeros(2))
    assert alrc_diagnostics(opt_state) == {}
    assert jax.jit(alrc_diagnostics)(opt_state) == {}
    assert to_python_numbers(alrc_diagnostics(opt_state)) == {}


def test_to_python_numbers_under_jit_says_to_call_it_outside():
    state = run(alrc(), [1.0, 2.0])
    with pytest.raises(
        TypeError,
        match=r"to_python_numbers: 'threshold' is a traced value.*Call it outside jit, on the "
        r"returned state",
    ):
        jax.jit(lambda s: to_python_numbers(alrc_diagnostics(s)))(state)


def test_to_python_numbers_gives_ints_and_shortest_float32_decimals():
    state = run(alrc(), [1.0] * 99 + [100.0])  # one clip in 100 losses
    numbers = to_python_numbers(alrc_diagnostics(state))
    assert numbers["clip_rate"] == 0.01  # float() would give 0.009999999776482582
    assert type(numbers["num_clipped"]) is int and numbers["num_clipped"] == 1
    assert type(numbers["num_steps"]) is int and numbers["num_steps"] == 100
    for name, value in numbers.items():
        assert np.float32(value) == np.float32(alrc_diagnostics(state)[name]), name  # exact
    assert "0.0099999" not in str(numbers)
    with pytest.raises(ValueError, match="not a scalar"):
        to_python_numbers({"x": np.ones(2)})
