"""spike_guard: gradient-norm ALRC and the auto knee fused into one front transform."""

import flax.training.train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from optax_logdamp import (
    ALRCState,
    LogDampenState,
    SpikeGuardState,
    alrc,
    alrc_diagnostics,
    log_dampen,
    spike_guard,
)

NUM_STEPS = 400
SHAPES = {"w": (16, 8), "b": (8,), "emb": (5, 4), "dead": (3,)}
UNITS = {"w": 1e-3, "b": 1.0, "emb": 30.0, "dead": 1.0}
NONFINITE_STEP, ZERO_STEP = 150, 200


def gradient_sequence(seed=0):
    """``NUM_STEPS`` gradients: tensors in different units, spikes, a NaN and a zero step.

    Every 23rd step one tensor (in turn) is 10**2..10**4 times its usual size, so ALRC
    caps the norm and the knees compress it; ``dead`` is zero on even steps (not folded
    into its knee); one step holds a NaN, one is all zero.
    """
    rng = np.random.default_rng(seed)
    grads = {
        name: (UNITS[name] * rng.standard_normal((NUM_STEPS, *shape))).astype(np.float32)
        for name, shape in SHAPES.items()
    }
    names = list(SHAPES)
    for step in range(30, NUM_STEPS, 23):
        grads[names[step % len(names)]][step] *= 10.0 ** rng.uniform(2, 4)
    grads["dead"][::2] = 0.0
    grads["w"][NONFINITE_STEP, 3, 2] = np.nan
    for name in names:
        grads[name][ZERO_STEP] = 0.0
    return grads


def run_sequence(tx, grads, value=None):
    """Updates at every step and the final state, one jitted scan."""
    params = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}

    def step(state, g):
        updates, state = tx.update(g, state, params, value=value)
        return state, updates

    state, updates = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(tx.init(params), grads)
    return jax.device_get(updates), jax.device_get(state)


TODAY = dict(exponent=1.0, curve="log1p", knee=3.0)  # the chain the README recommended before


def chain_of_today():
    return optax.chain(alrc(signal="grad_norm"), log_dampen("auto", curve="log1p"))


def chain_of_defaults():
    return optax.chain(
        alrc(signal="grad_norm", exponent=2.0),
        log_dampen("auto", auto_multiple=30.0, curve="linlog"),
    )


def test_equals_the_recommended_chain_over_a_long_sequence():
    """ALRC's statistics and the knees' counts are the chain's bit for bit.

    A tensor's log mean square may differ in its last bits on capped steps: the chain
    squares the rounded capped gradient ``fl(f * g)``, spike_guard adds ``2 log f`` to
    the log mean square of ``g`` (a few float32 roundings apart, measured below 8 ulp).
    The knees are powers of two taken from it, so the updates are the chain's bit for
    bit unless a knee lands within those ulp of a rounding boundary (not in this run).
    """
    grads = gradient_sequence()
    got_updates, got = run_sequence(spike_guard(**TODAY), grads)
    want_updates, (want_alrc, want_knee) = run_sequence(chain_of_today(), grads)
    assert isinstance(got, SpikeGuardState)
    assert isinstance(got.loss, optax.EmptyState)
    for field in ALRCState._fields:
        np.testing.assert_array_equal(
            getattr(got.grad_norm, field), getattr(want_alrc.grad_norm, field), err_msg=field
        )
    assert int(got.grad_norm.num_clipped) >= 10  # the spikes were capped ...
    assert int(got.grad_norm.num_nonfinite) == 1  # ... and the NaN step skipped
    assert isinstance(got.knee, LogDampenState)
    for name in SHAPES:
        np.testing.assert_array_equal(got.knee.count[name], want_knee.count[name], err_msg=name)
        np.testing.assert_array_max_ulp(
            got.knee.log_mean_square[name], want_knee.log_mean_square[name], maxulp=8
        )
        np.testing.assert_array_equal(got_updates[name], want_updates[name], err_msg=name)
    # The NaN and the zero steps are not folded; dead's zero steps are not either.
    assert int(got.knee.count["w"]) == NUM_STEPS - 2
    assert int(got.knee.count["dead"]) == NUM_STEPS // 2  # the odd steps
    for name in SHAPES:
        assert np.all(got_updates[name][NONFINITE_STEP] == 0)
    # Not a no-op: the knees compress the spikes beyond what ALRC does alone.
    alrc_only, _ = run_sequence(spike_guard(**dict(TODAY, knee=None)), grads)
    assert not np.array_equal(alrc_only["w"], got_updates["w"])


def test_defaults_equal_the_chain_of_their_rules():
    """The defaults (exponent 2, a knee of 30 RMS on the linlog curve) are the chain of
    those two rules."""
    grads = gradient_sequence(seed=6)
    got_updates, got = run_sequence(spike_guard(), grads)
    want_updates, (want_alrc, want_knee) = run_sequence(chain_of_defaults(), grads)
    jax.tree.map(np.testing.assert_array_equal, got.grad_norm, want_alrc.grad_norm)
    assert int(got.grad_norm.num_clipped) >= 10
    for name in SHAPES:
        np.testing.assert_array_equal(got.knee.count[name], want_knee.count[name], err_msg=name)
        np.testing.assert_array_max_ulp(
            got.knee.log_mean_square[name], want_knee.log_mean_square[name], maxulp=8
        )
        np.testing.assert_array_max_ulp(got_updates[name], want_updates[name], maxulp=2)
    # Both rules act: today's chain gives other updates on the capped steps, and a
    # spike too small for the norm's cap still meets the knee at 30 RMS.
    today, _ = run_sequence(spike_guard(**TODAY), grads)
    assert not np.array_equal(today["w"], got_updates["w"])
    alrc_only, _ = run_sequence(spike_guard(knee=None), grads)
    assert not np.array_equal(alrc_only["w"], got_updates["w"])


def test_knee_none_is_alrc_alone_bitwise():
    grads = gradient_sequence(seed=1)
    got_updates, got = run_sequence(spike_guard(knee=None), grads)
    want_updates, want = run_sequence(alrc(signal="grad_norm", exponent=2.0), grads)
    assert isinstance(got.knee, optax.EmptyState)
    jax.tree.map(np.testing.assert_array_equal, got_updates, want_updates)
    jax.tree.map(np.testing.assert_array_equal, got.grad_norm, want.grad_norm)


@pytest.mark.parametrize("signal", ["loss", "both"])
def test_loss_signals_equal_the_chain(signal):
    """With the loss as a signal, a non-finite loss skips the step as the chain does."""
    grads = gradient_sequence(seed=2)
    params = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
    losses = np.exp(np.random.default_rng(3).normal(size=NUM_STEPS)).astype(np.float32)
    losses[::31] *= 100.0
    losses[77] = np.inf

    def run(tx):
        def step(state, inputs):
            g, loss = inputs
            updates, state = tx.update(g, state, params, value=loss)
            return state, updates

        scan = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))
        return jax.device_get(scan(tx.init(params), (grads, losses)))

    got, updates = run(spike_guard(signal=signal, **TODAY))
    (want_alrc, want_knee), want_updates = run(
        optax.chain(alrc(signal=signal), log_dampen("auto", curve="log1p"))
    )
    want_loss = want_alrc if signal == "loss" else want_alrc.loss
    jax.tree.map(np.testing.assert_array_equal, got.loss, want_loss)
    assert int(got.loss.num_clipped) > 0 and int(got.loss.num_nonfinite) >= 1
    if signal == "loss":
        assert isinstance(got.grad_norm, optax.EmptyState)
    else:
        jax.tree.map(np.testing.assert_array_equal, got.grad_norm, want_alrc.grad_norm)
    jax.tree.map(np.testing.assert_array_equal, got.knee.count, want_knee.count)
    for name in SHAPES:
        np.testing.assert_array_max_ulp(
            got.knee.log_mean_square[name], want_knee.log_mean_square[name], maxulp=8
        )
        np.testing.assert_array_equal(updates[name], want_updates[name])
        assert np.all(updates[name][77] == 0)


def test_default_ignores_value_and_loss_signal_needs_it():
    params = {"w": jnp.ones(3)}
    tx = spike_guard()
    a, _ = tx.update(params, tx.init(params), params)
    b, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1e9))
    np.testing.assert_array_equal(a["w"], b["w"])
    tx = spike_guard(signal="loss")
    with pytest.raises(TypeError, match="value"):
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

    initial_structure = jax.tree.structure(state)
    initial_types = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), state)
    losses = []
    for i in range(num_steps):
        params, state, loss = step(params, state, x[i], y[i])
        losses.append(float(loss))
        assert jax.tree.structure(state) == initial_structure
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


def test_inside_multi_steps_equals_the_chain_inside():
    def make(front):
        return optax.MultiSteps(optax.chain(front, optax.adam(1e-2)), every_k_schedule=3)

    got, got_state, _ = train(make(spike_guard()))
    want, _, _ = train(make(chain_of_defaults()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert int(optax.tree.get(got_state, "num_steps")) == 10  # once per window


def test_loss_signal_is_refused_inside_multi_steps():
    tx = optax.MultiSteps(optax.chain(spike_guard(signal="both"), optax.sgd(1.0)), 2)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="MultiSteps"):
        tx.update(params, tx.init(params), params, value=jnp.float32(1.0))


def test_inject_hyperparams_traces_num_stddev_and_knee():
    grads = gradient_sequence(seed=4)
    injected = optax.inject_hyperparams(spike_guard)(num_stddev=3.0, knee=30.0)
    got_updates, got = run_sequence(injected, grads)
    want_updates, want = run_sequence(spike_guard(), grads)
    # Not bitwise, as alrc's own results under inject_hyperparams are not: with a traced
    # num_stddev XLA rounds the threshold mean + n * std differently in its last bit
    # (measured: on 48 of 400 steps), so the factor of a capped step can differ by an ulp.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6)  # noqa: E731
    jax.tree.map(close, got.inner_state, want)
    jax.tree.map(close, got_updates, want_updates)
    # The traced value is used: a tighter n caps more often.
    _, tight_state = run_sequence(optax.inject_hyperparams(spike_guard)(num_stddev=0.5), grads)
    assert int(tight_state.inner_state.grad_norm.num_clipped) > int(want.grad_norm.num_clipped)


def test_diagnostics_and_tree_get_find_the_statistics():
    grads = gradient_sequence(seed=5)
    _, state = run_sequence(optax.chain(spike_guard(), optax.adam(1e-3)), grads)
    diagnostics = alrc_diagnostics(state)
    assert set(diagnostics) == {
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
    assert int(diagnostics["grad_norm/num_clipped"]) == int(optax.tree.get(state, "num_clipped"))
    both = spike_guard(signal="both").init(mlp_params())
    assert {"threshold", "grad_norm/threshold"} <= set(alrc_diagnostics(both))


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
        ({"decay": 1.0}, ValueError, r"^decay must lie strictly between 0 and 1"),
        ({"decay": jnp.bfloat16(0.9)}, ValueError, r"^decay must be float32 or wider"),
        ({"knee": -1.0}, ValueError, r"^knee must be a finite number > 0"),
        ({"knee": float("inf")}, ValueError, r"^knee must be a finite number > 0"),
        ({"knee_decay": 0.0}, ValueError, r"^knee_decay must lie strictly between 0 and 1"),
        ({"knee_decay": jnp.float16(0.5)}, ValueError, r"^knee_decay must be float32 or wider"),
        ({"warmup_steps": 2.5}, ValueError, r"^warmup_steps must be an integer >= 0"),
        ({"warmup_steps": -1}, ValueError, r"^warmup_steps must be an integer >= 0"),
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
        TypeError, match=r"spike_guard: state must be the SpikeGuardState.*tx\.init"
    ):
        tx.update(params, state, params)
