"""The transforms inside optax's wrappers: MultiSteps, apply_if_finite, masked, ..."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import alrc, alrc_per_example, diagnostics, log_dampen, logadam

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


def assert_trees_close(actual, expected):
    """Leaf by leaf, to the precision of the leaf's dtype (bfloat16: about 3 digits)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        rtol = 1e-2 if a.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol)


@pytest.mark.parametrize("name", list(transforms()))
def test_multi_steps_accumulates_and_forwards_the_loss(name):
    """Every 3rd call applies the inner transform once, to the window's mean gradient and
    with the last micro-step's value; the calls between emit zeros and keep the state.
    For batch ALRC inside (alrc, full, paper) this is the documented behaviour: the
    window is judged by the loss of its last micro-step."""
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
            assert_trees_close(updates, optax.tree.zeros_like(PARAMS))
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


MICRO_STEPS = 4


@pytest.mark.parametrize("spike_micro_step", range(MICRO_STEPS))
@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("signal", ["loss", "both"])
def test_a_loss_spike_is_judged_per_micro_batch_outside_multi_steps_and_once_inside(
    signal, where, spike_micro_step
):
    """Outside MultiSteps (the recommended composition) ALRC caps each micro-batch by its
    own loss. Inside, MultiSteps gives its inner transform the loss of the window's last
    micro-step only: a spike on an earlier micro-step goes into the window's mean
    gradient uncapped, one on the last micro-step has the whole window scaled.

    The gradient is proportional to the loss, so a x100 loss spike left alone makes the
    window's mean gradient about 26x a clean one.
    """
    accumulate = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=MICRO_STEPS)
    if where == "outside":
        tx = optax.chain(alrc(signal=signal), accumulate.gradient_transformation())
    else:
        tx = optax.MultiSteps(optax.chain(alrc(signal=signal), optax.sgd(1.0)), MICRO_STEPS)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(lambda s, loss: tx.update({"w": jnp.full(3, loss)}, s, params, value=loss))
    rng = np.random.default_rng(spike_micro_step)
    clean_windows = 25  # past ALRC's 20-step warm-up inside too
    for micro_step in range(MICRO_STEPS * (clean_windows + 1)):
        loss = np.float32(1.0 + 0.1 * rng.standard_normal())
        if micro_step == MICRO_STEPS * clean_windows + spike_micro_step:
            loss *= 100.0
        updates, state = step(state, loss)
    judged = where == "outside" or spike_micro_step == MICRO_STEPS - 1
    assert int(diagnostics(state)["num_clipped"]) == int(judged)  # the loss's statistics
    if signal == "loss":  # ("both" also caps the window's 26x gradient norm inside)
        window_update = -float(updates["w"][0])  # sgd(1.0): minus the window's mean gradient
        if where == "outside":
            assert 0.9 < window_update < 1.2, window_update  # about a clean window's
        elif judged:
            assert window_update < 0.5, window_update  # the whole window scaled down
        else:
            assert window_update > 10.0, window_update  # the spike went in uncapped


def test_grad_norm_inside_multi_steps_judges_the_window_gradient_once_per_window():
    """signal="grad_norm" needs no loss: inside, it judges the accumulated gradient."""
    tx = optax.MultiSteps(optax.chain(alrc(signal="grad_norm"), optax.sgd(1.0)), 4)
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    applied = []
    for window in range(60):
        for micro in range(4):
            g = jnp.asarray(1.0 + 0.1 * rng.standard_normal(3), jnp.float32)
            if window == 50 and micro == 1:
                g = g * 100.0
            updates, state = update(g, state, params)  # no value needed
        applied.append(float(optax.tree.norm(updates)))
    stats = optax.tree.get(state, "grad_norm")
    assert int(stats.num_steps) == 60  # one fold per emitted step, not per micro-batch
    assert int(stats.num_clipped) >= 1
    assert applied[50] < 1.5 * np.median(applied)  # the window's update was capped


def test_apply_if_finite_skips_nan_gradients_and_keeps_alrc_statistics():
    tx = optax.apply_if_finite(optax.chain(alrc(), logadam(1e-2)), max_consecutive_errors=3)
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s, v: tx.update(g, s, PARAMS, value=v))
    grads, loss = grads_and_loss(0)
    _, state = step(grads, state, loss)
    before = optax.tree.get(state, "mean")
    nan_grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    updates, state = step(nan_grads, state, jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(updates, optax.tree.zeros_like(PARAMS))
    assert int(state.notfinite_count) == 1
    assert float(optax.tree.get(state, "mean")) == float(before)
    leaves = [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(state)]
    assert leaves and all(np.all(~np.isnan(leaf)) for leaf in leaves)  # inf: a threshold


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
