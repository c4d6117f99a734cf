"""diagnostics (``_diagnostics.py``): how often the defences in an optimizer state acted."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import (
    alrc,
    alrc_per_example,
    diagnostics,
    log_dampen,
    logadam,
    spike_guard,
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
def bare_alrc_numbers():
    return diagnostics(run(alrc()))


def test_single_state_plain_names_and_values():
    state = run(optax.chain(alrc(), logadam(1e-2)))
    numbers = diagnostics(state)
    assert set(numbers) == NAMES
    alrc_state = state[0]
    assert int(numbers["num_steps"]) == sum(np.isfinite(LOSSES))
    assert int(numbers["num_nonfinite"]) == 1
    assert int(numbers["num_clipped"]) == 2  # the two spikes, 50 and 40
    np.testing.assert_allclose(float(numbers["clip_rate"]), 2 / sum(np.isfinite(LOSSES)), 1e-6)
    np.testing.assert_allclose(float(numbers["std"]), math.sqrt(float(alrc_state.var)))
    assert float(numbers["threshold"]) == float(alrc_state.threshold)
    assert float(numbers["mean"]) == float(alrc_state.mean)
    assert 0.0 < float(numbers["scale"]) <= 1.0  # last loss 1.1: not capped
    assert all(jnp.shape(value) == () for value in numbers.values())


def test_clip_rate_is_zero_before_any_loss():
    numbers = diagnostics(alrc().init(jnp.zeros(2)))
    assert float(numbers["clip_rate"]) == 0.0
    assert math.isinf(float(numbers["threshold"]))
    assert int(numbers["num_steps"]) == 0


def test_last_scale_of_a_capped_step():
    state = run(alrc(), [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0, 100.0])
    threshold_before = run(alrc(), [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0]).threshold
    scale = float(diagnostics(state)["scale"])
    np.testing.assert_allclose(scale, float(threshold_before) / 100.0)


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
    reference = bare_alrc_numbers()
    numbers = diagnostics(run(wrap()))
    assert set(numbers) == NAMES
    for name in NAMES:
        np.testing.assert_allclose(numbers[name], reference[name], rtol=1e-6, err_msg=name)


def test_several_states_of_one_signal_are_keyed_by_path():
    strict = optax.inject_hyperparams(alrc)(num_stddev=0.5)
    numbers = diagnostics(run(optax.chain(alrc(), strict, optax.sgd(0.1))))
    assert set(numbers) == {f"0/{name}" for name in NAMES} | {
        f"1/inner_state/{name}" for name in NAMES
    }
    for prefix, alone in [
        ("0/", bare_alrc_numbers()),
        ("1/inner_state/", diagnostics(run(alrc(num_stddev=0.5)))),
    ]:
        for name in NAMES:
            np.testing.assert_allclose(numbers[prefix + name], alone[name], err_msg=name)
    assert float(numbers["1/inner_state/threshold"]) < float(numbers["0/threshold"])


def test_the_gradient_norm_statistics_are_prefixed():
    tx = optax.chain(alrc(signal="both"), optax.adam(1e-3))
    params = jnp.zeros(3)
    state = tx.init(params)
    _, state = tx.update(jnp.full(3, 2.0), state, params, value=5.0)
    numbers = diagnostics(state)
    assert set(numbers) == {prefix + name for prefix in ("", "grad_norm/") for name in NAMES}
    assert float(numbers["mean"]) == 5.0  # the loss keeps the plain names
    np.testing.assert_allclose(float(numbers["grad_norm/mean"]), np.sqrt(12.0), rtol=1e-6)
    for tx in (alrc(signal="grad_norm"), spike_guard()):
        assert set(diagnostics(tx.init(params))) == {f"grad_norm/{name}" for name in NAMES}
    # Two states of the same signal: full paths disambiguate.
    two = optax.chain(spike_guard(), alrc(signal="grad_norm")).init(params)
    assert set(diagnostics(two)) == {f"{i}/grad_norm/{name}" for i in ("0", "1") for name in NAMES}


def test_per_example_clip_rate_counts_examples():
    tx = alrc_per_example()
    params = jnp.zeros(2)
    state = tx.init(params)
    for losses in [[1.0, 1.2, 0.8, 1.0]] * 5 + [[1.0, 1.1, 90.0, 0.9]]:
        threshold = float(state.losses.threshold)  # the cap applied at this step
        _, state = tx.update(jnp.zeros(2), state, params, value=jnp.array(losses))
    numbers = diagnostics(state)
    assert set(numbers) == NAMES
    assert int(numbers["num_clipped"]) == 1
    np.testing.assert_allclose(float(numbers["clip_rate"]), 1 / 24)
    np.testing.assert_allclose(float(numbers["scale"]), (3 + threshold / 90) / 4, rtol=1e-6)


def test_works_inside_jit_and_returns_arrays():
    tx = optax.chain(alrc(), logadam(1e-2))
    params = jnp.zeros(3)

    @jax.jit
    def step(state, loss):
        _, state = tx.update(jnp.ones(3), state, params, value=loss)
        return state, diagnostics(state)

    state = tx.init(params)
    for loss in LOSSES:
        state, inside = step(state, jnp.float32(loss))
    assert set(inside) == NAMES
    assert all(isinstance(value, jax.Array) for value in inside.values())
    outside = diagnostics(state)
    for name in NAMES:
        assert float(inside[name]) == float(outside[name])


@pytest.mark.parametrize(
    "tx",
    [optax.adam(1e-3), logadam(1e-3, dampen_scale="auto"), log_dampen()],
    ids=["adam", "logadam_auto", "log_dampen"],
)
def test_no_defence_acting_gives_an_empty_dict(tx):
    """A baseline without ALRC (toggled by a config) logs nothing, with no try/except;
    without ``grads`` the automatic knee adds nothing either."""
    opt_state = tx.init(jnp.zeros(2))
    assert diagnostics(opt_state) == {}
    assert jax.jit(diagnostics)(opt_state) == {}
    assert to_python_numbers(diagnostics(opt_state)) == {}
    assert diagnostics(optax.adam(1e-3).init(jnp.zeros(2)), grads=jnp.ones(2)) == {}


# ----------------------------------------------------------------- the automatic knee


def knees_after_ones(tx, params, steps=2):
    """The state after ``steps`` steps of ones: every tensor's knee is pow2(3 * 1) = 4."""
    tx = optax.with_extra_args_support(tx)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        _, state = update(jax.tree.map(jnp.ones_like, params), state, params, value=1.0)
    return state


def test_bent_fraction_counts_the_elements_above_their_knee():
    params = {"w": jnp.zeros(4), "b": jnp.zeros(2), "c": jnp.zeros(3)}
    tx = optax.chain(spike_guard(), logadam(1e-3, dampen_scale="auto"))
    state = knees_after_ones(tx, params)
    grads = {"w": jnp.array([1.0, 5.0, -10.0, 4.0]), "b": jnp.array([0.5, -0.5]), "c": -jnp.ones(3)}
    numbers = diagnostics(state, grads)
    assert set(numbers) == {f"grad_norm/{name}" for name in NAMES} | {
        "dampen/bent_fraction",
        "dampen/tensors_bent",
    }
    np.testing.assert_allclose(float(numbers["dampen/bent_fraction"]), 2 / 9)  # 5 and -10
    assert int(numbers["dampen/tensors_bent"]) == 1
    assert numbers["dampen/bent_fraction"].dtype == jnp.float32
    jitted = jax.jit(diagnostics)(state, grads)
    assert float(jitted["dampen/bent_fraction"]) == float(numbers["dampen/bent_fraction"])
    assert int(jitted["dampen/tensors_bent"]) == 1


def test_bent_fraction_is_zero_before_a_tensor_has_a_knee():
    params = {"w": jnp.zeros(4), "b": jnp.zeros(2)}
    tx = log_dampen("auto")
    state = tx.init(params)
    spike = {"w": jnp.full(4, 1e6), "b": jnp.full(2, 1e6)}
    numbers = diagnostics(state, spike)  # no knee yet: passed unchanged, not bent
    assert set(numbers) == {"dampen/bent_fraction", "dampen/tensors_bent"}
    assert float(numbers["dampen/bent_fraction"]) == 0.0
    assert int(numbers["dampen/tensors_bent"]) == 0
    state = knees_after_ones(tx, params)
    numbers = diagnostics(state, spike)
    assert float(numbers["dampen/bent_fraction"]) == 1.0
    assert int(numbers["dampen/tensors_bent"]) == 2


def test_bent_fraction_for_half_precision_gradients():
    params = {"w": jnp.zeros(4, jnp.bfloat16)}
    state = knees_after_ones(log_dampen("auto"), params)
    grads = {"w": jnp.asarray([1.0, 4.0, 4.5, -300.0], jnp.bfloat16)}
    np.testing.assert_allclose(float(diagnostics(state, grads)["dampen/bent_fraction"]), 0.5)


# ----------------------------------------------------------------- to_python_numbers


def test_to_python_numbers_under_jit_says_to_call_it_outside():
    state = run(alrc(), [1.0, 2.0])
    with pytest.raises(
        TypeError,
        match=r"to_python_numbers: 'threshold' is a traced value.*Call it outside jit, on the "
        r"returned state",
    ):
        jax.jit(lambda s: to_python_numbers(diagnostics(s)))(state)


def test_to_python_numbers_gives_ints_and_shortest_float32_decimals():
    state = run(alrc(), [1.0] * 99 + [100.0])  # one clip in 100 losses
    arrays = diagnostics(state)
    numbers = to_python_numbers(arrays)
    assert set(numbers) == set(arrays) == NAMES
    assert numbers["clip_rate"] == 0.01  # float() would give 0.009999999776482582
    assert type(numbers["num_clipped"]) is int and numbers["num_clipped"] == 1
    assert type(numbers["num_steps"]) is int and numbers["num_steps"] == 100
    for name, value in numbers.items():
        assert np.float32(value) == np.float32(arrays[name]), name  # exact
    assert "0.0099999" not in str(numbers)
    with pytest.raises(ValueError, match="not a scalar"):
        to_python_numbers({"x": np.ones(2)})
