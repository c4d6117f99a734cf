"""Optimizer states round-trip through orbax and flax.serialization; resumed runs match."""

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from optax_logdamp import (
    ALRCState,
    alrc,
    alrc_per_example,
    cap_losses,
    log_dampen,
    logadam,
    spike_guard,
)
from optax_logdamp._dampening import has_knee
from optax_logdamp.flax import TrainState

TRANSFORMS = {
    # log_dampen alone takes no extra args; chain() would add the support too.
    "log_dampen": (lambda: optax.with_extra_args_support(log_dampen()), False),
    "alrc": (alrc, False),
    "alrc_per_example": (alrc_per_example, True),
    "logadam": (lambda: logadam(1e-2), False),
    "logadam_auto": (lambda: logadam(1e-2, dampen_scale="auto"), False),
    "chain": (lambda: optax.chain(alrc(), logadam(1e-2)), False),
    "chain_per_example": (lambda: optax.chain(alrc_per_example(), logadam(1e-2)), True),
    "inject_hyperparams": (
        lambda: optax.chain(
            optax.inject_hyperparams(alrc)(num_stddev=3.0),
            optax.inject_hyperparams(logadam)(learning_rate=1e-2),
        ),
        False,
    ),
    "spike_guard": (lambda: optax.chain(spike_guard(), optax.adamw(1e-2)), False),
    "spike_guard_injected": (
        lambda: optax.chain(
            optax.inject_hyperparams(spike_guard)(num_stddev=2.0), optax.adam(1e-2)
        ),
        False,
    ),
    "multi_steps": (  # ALRC outside: it caps every micro-batch
        lambda: optax.chain(
            alrc(), optax.MultiSteps(logadam(1e-2), every_k_schedule=3).gradient_transformation()
        ),
        False,
    ),
    "multi_steps_per_example": (
        lambda: optax.MultiSteps(
            optax.inject_hyperparams(alrc_per_example)(num_stddev=2.0), every_k_schedule=2
        ),
        True,
    ),
}
NUM_STEPS, CHECKPOINT_STEP = 12, 5


def batch(step):
    """Linear-regression data; step 8 has a corrupted example, step 10 a NaN one."""
    rng = np.random.default_rng(step)
    inputs = rng.normal(size=(8, 3)).astype(np.float32)
    targets = inputs @ np.array([1.0, -2.0, 0.5], np.float32)
    if step == 8:
        targets[2] += 100.0
    if step == 10:
        targets[5] = np.nan
    return inputs, targets


def make_step(tx, per_example):
    """A jitted training step on ``{"w", "b"}`` that feeds ALRC its loss(es)."""

    def losses_fn(params, inputs, targets):
        return jnp.square(inputs @ params["w"] + params["b"] - targets)

    def loss_fn(params, opt_state, inputs, targets):
        losses = losses_fn(params, inputs, targets)
        if per_example:
            return cap_losses(losses, opt_state).mean(), losses
        return losses.mean(), losses.mean()

    @jax.jit
    def step(params, opt_state, inputs, targets):
        (_, value), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, opt_state, inputs, targets
        )
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return optax.apply_updates(params, updates), opt_state

    return step


def train(step_fn, params, opt_state, steps):
    for step in steps:
        params, opt_state = step_fn(params, opt_state, *batch(step))
    return params, opt_state


def initial(tx):
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    return params, tx.init(params)


def assert_trees_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert jnp.asarray(a).dtype == jnp.asarray(b).dtype
        np.testing.assert_array_equal(a, b)


def orbax_round_trip(tree, directory):
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(directory, tree)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        return checkpointer.restore(directory, abstract)
    finally:
        checkpointer.close()


def flax_bytes_round_trip(tree):
    return flax.serialization.from_bytes(tree, flax.serialization.to_bytes(tree))


def flax_state_dict_round_trip(tree):
    return flax.serialization.from_state_dict(tree, flax.serialization.to_state_dict(tree))


class Run(NamedTuple):
    tx: optax.GradientTransformation
    step_fn: Callable
    start: tuple
    trained: tuple  # (params, opt_state) after NUM_STEPS uninterrupted steps


@functools.cache
def uninterrupted_run(name):
    """Each transform is compiled and trained once per test session."""
    factory, per_example = TRANSFORMS[name]
    tx = factory()
    step_fn = make_step(tx, per_example)
    start = initial(tx)
    return Run(tx, step_fn, start, train(step_fn, *start, range(NUM_STEPS)))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_state_round_trips(name, tmp_path):
    params, opt_state = uninterrupted_run(name).trained
    alrc_states = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ALRCState))
        if isinstance(node, ALRCState)
    ]
    dampening = name.startswith(("log_dampen", "logadam"))  # no ALRC statistics
    assert len(alrc_states) == (0 if dampening else 1)
    assert all(int(state.num_steps) > 0 for state in alrc_states)
    if name == "logadam_auto":  # the knees' running scales, one per tensor, all set
        knees = opt_state[0]
        assert int(knees.count) == NUM_STEPS
        scales = jax.tree.leaves(knees.log_mean_square)
        assert len(scales) == 2 and all(np.isfinite(s) and has_knee(s) for s in scales)
    tree = {"params": params, "opt_state": opt_state}
    assert_trees_identical(orbax_round_trip(tree, tmp_path / "checkpoint"), tree)
    assert_trees_identical(flax_bytes_round_trip(tree), tree)
    assert_trees_identical(flax_state_dict_round_trip(tree), tree)


def test_restoring_into_a_fresh_state_recovers_the_statistics():
    _, opt_state = uninterrupted_run("chain").trained
    fresh = optax.chain(alrc(), logadam(1e-2)).init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    restored = flax.serialization.from_bytes(fresh, flax.serialization.to_bytes(opt_state))
    assert_trees_identical(restored, opt_state)
    assert int(restored[0].num_steps) != int(fresh[0].num_steps)


@pytest.mark.parametrize("name", ["chain", "multi_steps", "chain_per_example", "spike_guard"])
@pytest.mark.parametrize("via", ["orbax", "flax"])
def test_resumed_training_is_bit_identical(name, via, tmp_path):
    _, step_fn, start, uninterrupted = uninterrupted_run(name)
    at_checkpoint = train(step_fn, *start, range(CHECKPOINT_STEP))
    if via == "orbax":
        restored = orbax_round_trip(at_checkpoint, tmp_path / "checkpoint")
    else:
        restored = flax_bytes_round_trip(at_checkpoint)
    resumed = train(step_fn, *restored, range(CHECKPOINT_STEP, NUM_STEPS))
    assert_trees_identical(resumed, uninterrupted)


def test_linen_train_state_resumes_bit_identically(tmp_path):
    def apply_fn(variables, inputs):
        return inputs @ variables["params"]["w"]

    tx = optax.chain(alrc(), logadam(1e-2))
    state = TrainState.create(apply_fn=apply_fn, params={"w": jnp.zeros(3)}, tx=tx)

    @jax.jit
    def step(state, inputs, targets):
        def loss_fn(params):
            return jnp.mean((state.apply_fn({"params": params}, inputs) - targets) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads, value=loss)

    def run(state, steps):
        for i in steps:
            state = step(state, *batch(i))
        return state

    uninterrupted = run(state, range(NUM_STEPS))
    at_checkpoint = run(state, range(CHECKPOINT_STEP))
    restored = orbax_round_trip(at_checkpoint, tmp_path / "checkpoint")
    assert isinstance(restored, TrainState) and restored.tx is tx
    resumed = run(restored, range(CHECKPOINT_STEP, NUM_STEPS))
    assert int(resumed.step) == NUM_STEPS
    assert_trees_identical(resumed, uninterrupted)
