"""The transforms inside optax's wrappers: MultiSteps, apply_if_finite, masked, ..."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import alrc, alrc_per_example, log_dampen, logadam

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}


def transforms():
    return {
        "log_dampen": log_dampen(0.5),
        "alrc": alrc(),
        "alrc_per_example": alrc_per_example(),
        "logadam": logadam(1e-2),
        "full": optax.chain(alrc(), logadam(1e-2)),
        "paper": optax.chain(alrc(mu1_init=1.0, mu2_init=2.0), optax.adam(1e-2)),
    }


def grads_and_loss(step):
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1 * (step + 1), p.dtype), PARAMS)
    loss = jnp.asarray([1.0, 1.2, 50.0, 0.9, 1.1, 1.0][step % 6], jnp.float32)
    return grads, loss


def value_for(name, loss):
    return jnp.stack([loss, loss * 0.5]) if name == "alrc_per_example" else loss


@pytest.mark.parametrize("name", list(transforms()))
def test_eval_shape_of_init_matches_init(name):
    tx = transforms()[name]
    abstract = jax.eval_shape(tx.init, PARAMS)
    concrete = tx.init(PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)


LOSS_CLIPPERS = ("alrc", "full", "paper")  # batch ALRC: it judges the loss of each call


def assert_trees_close(actual, expected):
    """Leaf by leaf, to the precision of the leaf's dtype (bfloat16: about 3 digits)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        rtol = 1e-2 if a.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol)


@pytest.mark.parametrize("name", [name for name in transforms() if name not in LOSS_CLIPPERS])
def test_multi_steps_accumulates_and_forwards_the_loss(name):
    """Every 3rd call applies the inner transform once, to the window's mean gradient and
    with the last micro-step's value; the calls between emit zeros and keep the state."""
    inner = transforms()[name]
    tx = optax.MultiSteps(inner, every_k_schedule=3)
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s, v: tx.update(g, s, PARAMS, value=v))
    expected_state = inner.init(PARAMS)
    window_mean = optax.tree.zeros_like(PARAMS, jnp.float32)  # MultiSteps' accumulator
    for i in range(6):
        grads, loss = grads_and_loss(i)
        updates, state = step(grads, state, value_for(name, loss))
        count = i % 3 + 1  # MultiSteps' running mean: m + (g - m) / count
        window_mean = jax.tree.map(lambda g, m, n=count: m + (g - m) / n, grads, window_mean)
        if i % 3 != 2:
            for leaf in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
            continue
        mean_grads = optax.tree.cast_like(window_mean, grads)
        expected, expected_state = optax.with_extra_args_support(inner).update(
            mean_grads, expected_state, PARAMS, value=value_for(name, loss)
        )
        assert all(bool(jnp.all(leaf != 0)) for leaf in jax.tree.leaves(updates))
        assert_trees_close(updates, expected)
        window_mean = optax.tree.zeros_like(PARAMS, jnp.float32)
    assert int(state.gradient_step) == 2
    assert_trees_close(state.inner_opt_state, expected_state)  # the inner state ran twice


INSIDE_REFUSED = {
    "inject_hyperparams": lambda: optax.inject_hyperparams(alrc)(num_stddev=3.0),
    "signal_both": lambda: alrc(signal="both"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", [*LOSS_CLIPPERS, *INSIDE_REFUSED])
def test_alrc_inside_multi_steps_is_refused_with_the_fix(name, jit):
    """Inside, only the last micro-step's call is kept: it sees the last micro-batch's
    loss alone, and a spike at micro-step 0, 1 or 2 of 4 went into the average unclipped."""
    inner = transforms()[name] if name in LOSS_CLIPPERS else INSIDE_REFUSED[name]()
    tx = optax.MultiSteps(optax.chain(inner, optax.sgd(0.1)), every_k_schedule=4)
    update = jax.jit(tx.update) if jit else tx.update
    grads, loss = grads_and_loss(0)
    with pytest.raises(ValueError, match=r"inside optax\.MultiSteps.*optax\.chain\(alrc\("):
        update(grads, tx.init(PARAMS), PARAMS, value=loss)


def test_alrc_on_the_gradient_norm_runs_inside_multi_steps():
    """signal="grad_norm" needs no loss: inside, it judges the accumulated gradient."""
    tx = optax.MultiSteps(optax.chain(alrc(signal="grad_norm"), optax.sgd(0.1)), 3)
    state = tx.init(PARAMS)
    for i in range(6):
        grads, _ = grads_and_loss(i)
        _, state = jax.jit(tx.update)(grads, state, PARAMS)
    assert int(optax.tree.get(state, "num_steps")) == 2  # once per window


MICRO_STEPS = 4


@pytest.mark.parametrize("spike_micro_step", range(MICRO_STEPS))
def test_alrc_outside_multi_steps_clips_a_spike_at_any_micro_step(spike_micro_step):
    """The recommended composition: ALRC caps each micro-batch by its own loss.

    The gradient is proportional to the loss, so a x100 loss spike left alone would
    make the window's average gradient about 26x a clean one.
    """
    accumulate = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=MICRO_STEPS)
    tx = optax.chain(alrc(), accumulate.gradient_transformation())
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(lambda s, loss: tx.update({"w": jnp.full(3, loss)}, s, params, value=loss))
    rng = np.random.default_rng(spike_micro_step)
    clean_windows = 10  # 40 micro-batches: past ALRC's 20-step warm-up
    for micro_step in range(MICRO_STEPS * (clean_windows + 1)):
        loss = np.float32(1.0 + 0.1 * rng.standard_normal())
        if micro_step == MICRO_STEPS * clean_windows + spike_micro_step:
            loss *= 100.0
        updates, state = step(state, loss)
    alrc_state = state[0]
    assert int(alrc_state.num_clipped) == 1  # the spike, whichever micro-step it was
    window_update = -float(updates["w"][0])  # sgd(1.0): minus the window's mean gradient
    assert 0.9 < window_update < 1.2, window_update  # about a clean window's, not 26x


def test_apply_if_finite_skips_nan_gradients_and_keeps_alrc_statistics():
    tx = optax.apply_if_finite(optax.chain(alrc(), logadam(1e-2)), max_consecutive_errors=3)
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s, v: tx.update(g, s, PARAMS, value=v))
    grads, loss = grads_and_loss(0)
    _, state = step(grads, state, loss)
    before = optax.tree.get(state, "mean")
    nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    updates, state = step(nan_grads, state, jnp.float32(jnp.nan))
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
    assert int(state.notfinite_count) == 1
    assert float(optax.tree.get(state, "mean")) == float(before)
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)) | np.isinf(np.asarray(leaf)))


def test_masked_dampens_only_the_selected_leaves():
    tx = optax.masked(log_dampen(), {"w": True, "b": False})
    grads = {"w": jnp.full((3, 2), 1e6), "b": jnp.full((2,), 1e6, jnp.bfloat16)}
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.log1p(1e6), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), np.asarray(grads["b"]))


def test_masked_alrc_scales_only_the_selected_leaves():
    tx = optax.masked(alrc(mu1_init=1.0, mu2_init=1.25), {"w": True, "b": False})
    grads, _ = grads_and_loss(0)
    updates, state = tx.update(grads, tx.init(PARAMS), PARAMS, value=10.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), 0.1 * 0.25, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), np.asarray(grads["b"]))
    assert int(optax.tree.get(state, "num_clipped")) == 1


def test_tree_map_params_reaches_adam_moments_but_not_alrc_scalars():
    tx = optax.chain(alrc(), logadam(1e-2))
    state = tx.init(PARAMS)
    doubled = optax.tree_map_params(tx, lambda p: p * 2 + 1, state)
    np.testing.assert_array_equal(np.asarray(optax.tree.get(doubled, "mu")["w"]), 1.0)
    assert float(optax.tree.get(doubled, "mean")) == 0.0
    chex.assert_trees_all_equal_shapes_and_dtypes(doubled, state)


def test_full_chain_trains_and_survives_a_spike():
    """A least-squares fit: one spike step (loss and gradient x1e4) is contained."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    w_true = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    y = x @ w_true

    def loss_fn(w, corrupt):
        target = jnp.where(corrupt, y * 1e4, y)
        return jnp.mean((x @ w - target) ** 2)

    def train(tx):
        w = jnp.zeros(4)
        state = tx.init(w)

        @jax.jit
        def step(w, state, corrupt):
            loss, grads = jax.value_and_grad(loss_fn)(w, corrupt)
            updates, state = tx.update(grads, state, w, value=loss)
            return optax.apply_updates(w, updates), state

        for i in range(400):
            w, state = step(w, state, i == 300)
        return float(jnp.linalg.norm(w - w_true))

    errors = {
        "sgd": train(optax.sgd(0.05)),
        "alrc+sgd": train(optax.chain(alrc(), optax.sgd(0.05))),
        "log_dampen+sgd": train(optax.chain(log_dampen(), optax.sgd(0.05))),
        "full": train(optax.chain(alrc(), logadam(0.05))),
    }
    print(errors)
    assert errors["alrc+sgd"] < 1e-3 and errors["full"] < 0.05 and errors["log_dampen+sgd"] < 0.01
    assert not errors["sgd"] < 1.0  # plain SGD is wrecked by the one spike (or diverges)
