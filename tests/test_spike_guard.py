"""spike_guard: ALRC on the global gradient norm, the recommended front transform."""

import flax.training.train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from _alrc_sequences import from_data_reference, noisy_training_losses

from optax_logdamp import ALRCSignalsState, alrc, diagnostics, spike_guard


def spiky_norms(num_steps, seed):
    """A drifting, noisy positive sequence with 2 % spikes of 3x to 1000x, one early."""
    rng = np.random.default_rng(seed)
    xs = noisy_training_losses(num_steps, seed, start=2.0, end=0.7, noise=0.15)
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


def run(tx, grads, losses=None):
    """Updates of every step and the final state, one jitted scan."""
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    steps = len(jax.tree.leaves(grads)[0])
    losses = jnp.ones(steps, jnp.float32) if losses is None else jnp.asarray(losses, jnp.float32)

    def step(state, inputs):
        g, loss = inputs
        updates, state = tx.update(g, state, params, value=loss)
        return state, updates

    state, updates = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
        tx.init(params), (grads, losses)
    )
    return jax.device_get(updates), jax.device_get(state)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_float64_reference_of_the_rule(seed):
    """Each step's factor is ``min(1, t / G)`` with ``t`` of the float64 rule."""
    grads = gradients_with_norms(spiky_norms(600, seed), seed)
    norms = exact_norms(grads)
    updates, state = run(spike_guard(), grads)
    assert isinstance(state, ALRCSignalsState) and isinstance(state.loss, optax.EmptyState)
    _, want, _, _ = from_data_reference(norms)
    got = exact_norms(updates) / norms
    np.testing.assert_allclose(got, want, rtol=2e-5)
    capped = want < 1
    assert capped.sum() >= 5 and int(state.grad_norm.num_clipped) == capped.sum()


def test_is_alrc_on_the_gradient_norm_bitwise():
    grads = gradients_with_norms(spiky_norms(400, 3), 3)
    got_updates, got = run(spike_guard(), grads)
    want_updates, want = run(alrc(signal="grad_norm"), grads)
    jax.tree.map(np.testing.assert_array_equal, got_updates, want_updates)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert int(got.grad_norm.num_clipped) >= 5


def test_never_amplifies_nor_flips_a_gradient():
    grads = gradients_with_norms(spiky_norms(300, 4), 4)
    updates, _ = run(spike_guard(), grads)
    for name in grads:
        g, u = np.asarray(grads[name]), np.asarray(updates[name])
        assert np.all(np.abs(u) <= np.abs(g))
        assert np.all(u * g >= 0)


@pytest.mark.parametrize("c", [2.0**-12, 2.0**10])
def test_gradient_units_do_not_matter(c):
    """A power-of-two factor on every gradient scales the updates by it, bit for bit."""
    grads = gradients_with_norms(spiky_norms(300, 5), 5)
    base, state = run(spike_guard(), grads)
    scaled, scaled_state = run(spike_guard(), jax.tree.map(lambda g: g * c, grads))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a * c, b), base, scaled)
    assert int(scaled_state.grad_norm.num_clipped) == int(state.grad_norm.num_clipped) > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_step_is_zeroed_and_the_statistics_unchanged(bad):
    tx = spike_guard()
    params = jnp.ones(3)
    state = tx.init(params)
    for scale in (1.0, 1.1, 50.0, 0.9):
        _, state = tx.update(jnp.full(3, scale), state, params)
    updates, new_state = tx.update(jnp.array([1.0, bad, 1.0]), state, params)
    np.testing.assert_array_equal(np.asarray(updates), np.zeros(3))
    unchanged = ("count", "mean", "var", "threshold", "num_steps", "num_clipped")
    for field in unchanged:
        assert getattr(new_state.grad_norm, field) == getattr(state.grad_norm, field), field
    assert int(new_state.grad_norm.num_nonfinite) == 1


@pytest.mark.parametrize("signal", ["loss", "both"])
def test_loss_signals_equal_alrc_s(signal):
    """With the loss as a signal the statistics are alrc's; a non-finite loss skips."""
    grads = gradients_with_norms(spiky_norms(300, 6), 6)
    losses = np.exp(np.random.default_rng(3).normal(size=300)).astype(np.float32)
    losses[::31] *= 100.0
    losses[77] = np.inf
    got_updates, got = run(spike_guard(signal=signal), grads, losses)
    want_updates, want = run(alrc(signal=signal), grads, losses)
    got_loss = got if signal == "loss" else got.loss
    want_loss = want if signal == "loss" else want.loss
    for field in ("count", "mean", "var", "threshold", "num_clipped", "num_nonfinite"):
        np.testing.assert_array_equal(getattr(got_loss, field), getattr(want_loss, field))
    assert int(got_loss.num_clipped) > 0 and int(got_loss.num_nonfinite) == 1
    for name in grads:
        assert np.all(got_updates[name][77] == 0)
        assert np.all(np.abs(got_updates[name]) <= np.abs(want_updates[name]))


def test_default_ignores_value_and_loss_signal_needs_it():
    params = {"w": jnp.ones(3)}
    tx = spike_guard()
    a, _ = tx.update(params, tx.init(params), params)
    b, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1e9))
    np.testing.assert_array_equal(a["w"], b["w"])
    tx = spike_guard(signal="loss")
    with pytest.raises(TypeError, match=r"spike_guard.*needs the loss.*value"):
        tx.update(params, tx.init(params), params)


def mlp_params():
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(0.3 * rng.standard_normal((4, 16)), jnp.float32),
        "b1": jnp.zeros(16),
        "w2": jnp.asarray(0.3 * rng.standard_normal((16, 2)), jnp.float32),
    }


def mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.square(hidden @ params["w2"] - y))


def train(tx, num_steps=30, spike_step=20):
    """A small regression MLP; one batch's targets are 1000x off."""
    params = mlp_params()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((num_steps, 32, 4)).astype(np.float32)
    y = np.stack([np.sin(x[..., 0]), np.cos(x[..., 1])], axis=-1).astype(np.float32)
    y[spike_step] *= 1000.0
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    initial_types = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), state)
    losses = []
    for i in range(num_steps):
        params, state, loss = step(params, state, x[i], y[i])
        losses.append(float(loss))
    assert jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), state) == initial_types
    assert step._cache_size() == 1  # a stable state pytree: compiled once  # pyright: ignore
    return params, state, np.array(losses)


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "muon": lambda: optax.contrib.muon(1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_front_of_optimizers(name):
    params, state, losses = train(optax.chain(spike_guard(), OPTIMIZERS[name]()))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert np.all(np.isfinite(losses))
    clean = [i for i in range(len(losses)) if i != 20]
    assert losses[clean][-1] < losses[0]  # it trains
    assert int(optax.tree.get(state, "num_clipped")) >= 1  # the bad batch was capped


def test_inside_multi_steps_judges_each_window_once():
    tx = optax.MultiSteps(optax.chain(spike_guard(), optax.adam(1e-2)), every_k_schedule=3)
    params, state, _ = train(tx)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert int(optax.tree.get(state, "num_steps")) == 10  # once per window


def test_inject_hyperparams_traces_num_stddev():
    grads = gradients_with_norms(spiky_norms(400, 7), 7)
    got_updates, got = run(optax.inject_hyperparams(spike_guard)(num_stddev=3.0), grads)
    want_updates, want = run(spike_guard(), grads)
    # Not bitwise: with a traced num_stddev XLA may round mean + n * std differently in
    # its last bit, so the factor of a capped step can differ by an ulp.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5)  # noqa: E731
    jax.tree.map(close, got.inner_state, want)
    jax.tree.map(close, got_updates, want_updates)
    _, tight = run(optax.inject_hyperparams(spike_guard)(num_stddev=0.5), grads)
    assert int(tight.inner_state.grad_norm.num_clipped) > int(want.grad_norm.num_clipped)


def test_diagnostics_count_the_capped_and_the_skipped_steps():
    grads = gradients_with_norms(spiky_norms(200, 8), 8)
    grads["w"] = grads["w"].at[150, 0, 0].set(jnp.nan)
    _, state = run(optax.chain(spike_guard(), optax.adam(1e-3)), grads)
    found = diagnostics(state)
    assert set(found) == {
        f"grad_norm/{key}"
        for key in (
            "threshold",
            "scale",
            "num_clipped",
            "clip_rate",
            "mean",
            "std",
            "num_steps",
            "num_nonfinite",
        )
    }
    assert int(found["grad_norm/num_clipped"]) == int(optax.tree.get(state, "num_clipped")) > 0
    assert int(found["grad_norm/num_nonfinite"]) == 1
    both = spike_guard(signal="both").init(mlp_params())
    assert {"threshold", "grad_norm/threshold"} <= set(diagnostics(both))


def test_flax_stock_train_state_needs_no_value():
    state = flax.training.train_state.TrainState.create(
        apply_fn=None, params=mlp_params(), tx=optax.chain(spike_guard(), optax.adam(1e-2))
    )
    grads = jax.grad(mlp_loss)(state.params, jnp.ones((2, 4)), jnp.zeros((2, 2)))
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    assert int(optax.tree.get(state.opt_state, "num_steps")) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_stddev": 0.0}, ValueError, r"^num_stddev must be a finite number > 0"),
        ({"num_stddev": "3"}, ValueError, r"^num_stddev must be a real scalar"),
        ({"signal": "norm"}, ValueError, r"^signal must be one of"),
        ({"axis_name": 3}, TypeError, r"^axis_name must be a string or None"),
    ],
)
def test_bad_arguments_are_refused_under_their_own_names(kwargs, error, match):
    with pytest.raises(error, match=match):
        spike_guard(**kwargs)


def test_integer_updates_are_refused_naming_the_leaf():
    params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    tx = spike_guard()
    with pytest.raises(TypeError, match=r"updates\['step'\]"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("state", [None, optax.EmptyState(), (), "adam"])
def test_a_state_not_from_init_names_the_state_and_the_fix(state):
    tx = spike_guard()
    params = {"w": jnp.ones(3)}
    if state == "adam":
        state = optax.adam(1e-3).init(params)
    with pytest.raises(
        TypeError, match=r"spike_guard: state must be the ALRCSignalsState.*tx\.init"
    ):
        tx.update(params, state, params)


def test_the_state_of_another_signal_is_refused():
    """The state of ``signal="both"`` would lose its loss statistics silently."""
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r'state\.loss.*spike_guard\(signal="both"\)'):
        spike_guard().update(params, spike_guard(signal="both").init(params), params)
    with pytest.raises(TypeError, match=r'state\.loss.*spike_guard\(signal="grad_norm"\)'):
        tx = spike_guard(signal="both")
        tx.update(params, spike_guard().init(params), params, value=1.0)


def test_a_gradient_of_another_shape_than_its_parameter_is_refused():
    params = {"w": jnp.ones((4, 3))}
    tx = spike_guard()
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(5, 3\)"):
        tx.update({"w": jnp.ones((5, 3))}, tx.init(params), params)
