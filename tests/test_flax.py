"""optax_logdamp.flax (``flax.py``): the Linen TrainState forwards the loss; NNX already does."""

import importlib
import re
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state

from optax_logdamp import alrc, alrc_per_example, cap_losses, diagnostics, logadam
from optax_logdamp.flax import TrainState

SPIKE_STEP = 12


def batch(step):
    """A regression batch; at ``SPIKE_STEP`` the targets are corrupted by 1000."""
    rng = np.random.default_rng(step)
    inputs = rng.normal(size=(16, 3)).astype(np.float32)
    targets = inputs @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    return inputs, targets + (1000.0 if step == SPIKE_STEP else 0.0)


def linen_state(tx, cls=TrainState, **fields):
    model = nn.Dense(1)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    return cls.create(apply_fn=model.apply, params=params, tx=tx, **fields)


def mse(state, params, inputs, targets):
    return jnp.mean((state.apply_fn({"params": params}, inputs) - targets) ** 2)


@jax.jit
def linen_step(state, inputs, targets):
    loss, grads = jax.value_and_grad(lambda p: mse(state, p, inputs, targets))(state.params)
    return state.apply_gradients(grads=grads, value=loss), loss


def test_linen_train_state_is_a_drop_in_subclass():
    state = linen_state(optax.chain(alrc(), logadam(1e-2)))
    assert isinstance(state, flax_train_state.TrainState)
    assert int(state.step) == 0


def test_linen_forwards_the_loss_and_matches_plain_optax():
    tx = optax.chain(alrc(), logadam(1e-2))
    state = linen_state(tx)
    params, opt_state = state.params, state.opt_state
    update = jax.jit(tx.update)
    for step in range(20):
        inputs, targets = batch(step)
        state, _ = linen_step(state, inputs, targets)
        loss, grads = jax.value_and_grad(mse, argnums=1)(state, params, inputs, targets)
        updates, opt_state = update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
    assert int(state.step) == 20
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state.params, params)
    numbers = diagnostics(state.opt_state)
    assert int(numbers["num_steps"]) == 20
    assert int(numbers["num_clipped"]) == 1  # the corrupted batch
    assert float(numbers["scale"]) == 1.0  # the last, clean batch


@pytest.mark.parametrize("cls", [TrainState, flax_train_state.TrainState], ids=["ours", "flax"])
def test_without_the_loss_alrc_says_to_pass_value(cls):
    state = linen_state(optax.chain(alrc(), logadam(1e-2)), cls=cls)
    grads = jax.tree.map(jnp.ones_like, state.params)
    with pytest.raises(TypeError, match=r"alrc needs the loss of this step.*value=loss"):
        state.apply_gradients(grads=grads)


def test_flax_own_train_state_given_the_loss_points_to_ours():
    """Flax's TrainState drops ``value=loss``: the error must name the drop-in fix."""
    state = linen_state(optax.chain(alrc(), logadam(1e-2)), cls=flax_train_state.TrainState)
    grads = jax.tree.map(jnp.ones_like, state.params)
    with pytest.raises(TypeError, match=r"use `optax_logdamp\.flax\.TrainState`"):
        state.apply_gradients(grads=grads, value=jnp.float32(1.0))


class StateWithStats(TrainState):
    batch_stats: Any = None


def test_field_kwargs_are_replaced_and_other_kwargs_reach_tx():
    seen = {}

    def record_update(updates, opt_state, params=None, *, value=None, **extra_args):
        seen.update(value=value, **extra_args)
        return updates, opt_state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), record_update)
    state = linen_state(tx, cls=StateWithStats, batch_stats={"mean": jnp.zeros(2)})
    grads = jax.tree.map(jnp.zeros_like, state.params)
    new_stats = {"mean": jnp.ones(2)}
    state = state.apply_gradients(grads=grads, value=3.0, batch_stats=new_stats, foo="bar")
    assert seen == {"value": 3.0, "foo": "bar"}  # batch_stats is a field, not an extra arg
    np.testing.assert_array_equal(state.batch_stats["mean"], np.ones(2))
    assert int(state.step) == 1


def test_plain_transform_ignores_value():
    state = linen_state(optax.sgd(0.1))
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads=grads, value=1.0)
    expected = jax.tree.map(lambda p: p - 0.1, state.params)
    jax.tree.map(np.testing.assert_allclose, new.params, expected)


def test_linen_per_example_alrc_reads_threshold_from_state():
    state = linen_state(optax.chain(alrc_per_example(), logadam(1e-2)))

    @jax.jit
    def step(state, inputs, targets):
        def loss_fn(params):
            predictions = state.apply_fn({"params": params}, inputs)
            losses = jnp.mean((predictions - targets) ** 2, axis=-1)
            return cap_losses(losses, state.opt_state).mean(), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, value=losses)

    for i in range(SPIKE_STEP + 1):
        inputs, targets = batch(i)
        if i == SPIKE_STEP:
            targets[3] -= 1000.0  # one clean example in the corrupted batch
            before = diagnostics(state.opt_state)
        state = step(state, inputs, targets)
    after = diagnostics(state.opt_state)
    assert int(after["num_clipped"]) - int(before["num_clipped"]) == 15  # the corrupted ones
    assert int(after["num_steps"]) == SPIKE_STEP + 1


class NNXLinear(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def test_nnx_optimizer_forwards_the_loss():
    tx = optax.chain(alrc(), logadam(1e-2))
    model = NNXLinear(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    opt_state = tx.init(params)
    update = jax.jit(tx.update)

    @nnx.jit
    def step(model, optimizer, inputs, targets):
        def loss_fn(model):
            return jnp.mean((model(inputs) - targets) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, value=loss)
        return loss

    for i in range(20):
        inputs, targets = batch(i)
        step(model, optimizer, inputs, targets)

        def pure_loss(p, inputs=inputs, targets=targets):
            out = inputs @ p["dense"]["kernel"] + p["dense"]["bias"]
            return jnp.mean((out - targets) ** 2)

        loss, grads = jax.value_and_grad(pure_loss)(params)
        updates, opt_state = update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), trained, params)
    numbers = diagnostics(optimizer.opt_state)
    assert int(numbers["num_steps"]) == 20
    assert int(numbers["num_clipped"]) == 1
    assert int(optimizer.step[...]) == 20


def test_core_package_does_not_import_flax():
    code = "import sys, optax_logdamp; sys.exit('flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_import_without_flax_says_how_to_install_it(monkeypatch):
    flax_modules = [m for m in sys.modules if m == "flax" or m.startswith("flax.")]
    assert flax_modules  # imported above: each is hidden below
    for name in flax_modules:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    monkeypatch.delitem(sys.modules, "optax_logdamp.flax")
    with pytest.raises(ModuleNotFoundError, match=re.escape('pip install "optax_logdamp[flax]"')):
        importlib.import_module("optax_logdamp.flax")
