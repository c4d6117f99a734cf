"""Flax Linen + ALRC + LogAdam on scikit-learn's digits, with corrupted batches.

An MLP classifies the 8x8 digit images that ship with scikit-learn (no download).
Every ``--corrupt-every`` steps one batch has its images multiplied by 100, a loss
spike of the kind a bad shard or a numerical glitch produces. The optimizer is
``optax.chain(alrc(), logadam(lr))``: ALRC caps the spike's loss at its running
mean + 3 standard deviations, and log dampening compresses what is left.
:class:`optax_logdamp.flax.TrainState` hands the loss to the optimizer.

Run (about 10 s on a laptop CPU)::

    python examples/flax_linen_digits.py --steps 800
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _digits import load_data, parse_args, report, train

from optax_logdamp import alrc, diagnostics, logadam
from optax_logdamp.flax import TrainState


class MLP(nn.Module):
    """A two-layer perceptron: 64 -> hidden -> 10 logits."""

    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def cross_entropy(state: TrainState, params, images, labels) -> jax.Array:
    logits = state.apply_fn({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    """One step; the loss goes to ALRC through ``apply_gradients(value=...)``."""
    loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(state, state.params, images, labels)
    state = state.apply_gradients(grads=grads, value=loss)
    return state, loss, diagnostics(state.opt_state)


@jax.jit
def accuracy(state: TrainState, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def main(argv: Sequence[str] | None = None) -> float:
    """Trains, logs the ALRC diagnostics, and returns the test accuracy."""
    args = parse_args(argv, __doc__.splitlines()[0])
    train_images, test_images, train_labels, test_labels = load_data(args.seed)
    model = MLP()
    params = model.init(jax.random.key(args.seed), train_images[:1])["params"]
    tx = optax.chain(alrc(), logadam(args.learning_rate))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def step(images, labels):
        nonlocal state
        state, loss, diagnostics = train_step(state, images, labels)
        return loss, diagnostics

    train(args, (train_images, train_labels), step, "linen")
    return report(accuracy(state, test_images, test_labels))


if __name__ == "__main__":
    main()
