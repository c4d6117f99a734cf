"""The transforms inside optax's wrappers: MultiSteps, apply_if_finite, masked, ..."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import ALRCState, alrc, alrc_per_example, log_dampen, logadam

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


@pytest.mark.parametrize("name", list(transforms()))
def test_multi_steps_accumulates_and_forwards_the_loss(name):
    inner = transforms()[name]
    tx = optax.MultiSteps(inner, every_k_schedule=3)
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s, v: tx.update(g, s, PARAMS, value=v))
    for i in range(6):
        grads, loss = grads_and_loss(i)
        updates, state = step(grads, state, value_for(name, loss))
        if i % 3 != 2:
            for leaf in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
    inner_steps = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ALRCState))]
    for alrc_state in (s for s in inner_steps if isinstance(s, ALRCState)):
        assert int(alrc_state.num_steps) == 2  # the inner transform ran twice


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
