"""Flax NNX + ALRC + LogAdam on scikit-learn's digits, with corrupted batches.

An MLP classifies the 8x8 digit images that ship with scikit-learn (no download).
Every ``--corrupt-every`` steps one batch has its images multiplied by 100, a loss
spike of the kind a bad shard or a numerical glitch produces. The optimizer is
``optax.chain(alrc(), logadam(lr))``: ALRC caps the spike's loss at its running
mean + 3 standard deviations, and log dampening compresses what is left.
``nnx.Optimizer.update(model, grads, value=loss)`` hands the loss to the optimizer:
NNX forwards keyword arguments to ``tx.update``, so no glue is needed.

Run (about 10 s on a laptop CPU)::

    python examples/flax_nnx_digits.py --steps 800
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from _digits import load_data, parse_args, report, train
from flax import nnx

from optax_logdamp import alrc, diagnostics, logadam


class MLP(nnx.Module):
    """A two-layer perceptron: 64 -> hidden -> 10 logits."""

    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


def cross_entropy(model: MLP, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array):
    """One step, in place; the loss goes to ALRC through ``update(..., value=loss)``."""
    loss, grads = nnx.value_and_grad(cross_entropy)(model, images, labels)
    optimizer.update(model, grads, value=loss)
    return loss, diagnostics(optimizer.opt_state)


@nnx.jit
def accuracy(model: MLP, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(images), axis=-1) == labels)


def main(argv: Sequence[str] | None = None) -> float:
    """Trains, logs the ALRC diagnostics, and returns the test accuracy."""
    args = parse_args(argv, __doc__.splitlines()[0])
    train_images, test_images, train_labels, test_labels = load_data(args.seed)
    model = MLP(128, nnx.Rngs(args.seed))
    tx = optax.chain(alrc(), logadam(args.learning_rate))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train(
        args,
        (train_images, train_labels),
        lambda images, labels: train_step(model, optimizer, images, labels),
        "nnx",
    )
    return report(accuracy(model, test_images, test_labels))


if __name__ == "__main__":
    main()
