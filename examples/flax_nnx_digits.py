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

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from optax_logdamp import alrc, alrc_diagnostics, logadam


def load_data(seed: int = 0):
    """Digits as float32 images in [0, 1] (flattened) and int32 labels, split 75/25."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(images, labels, test_size=0.25, random_state=seed)


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
    return loss, alrc_diagnostics(optimizer.opt_state)


@nnx.jit
def accuracy(model: MLP, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(images), axis=-1) == labels)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--corrupt-every", type=int, default=50, help="corrupt one batch in N (0: never)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Trains, logs the ALRC diagnostics, and returns the test accuracy."""
    args = parse_args(argv)
    train_images, test_images, train_labels, test_labels = load_data(args.seed)
    model = MLP(128, nnx.Rngs(args.seed))
    tx = optax.chain(alrc(), logadam(args.learning_rate))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    progress = tqdm(range(1, args.steps + 1), desc="nnx", mininterval=0.5)
    for step in progress:
        index = rng.integers(0, len(train_images), args.batch_size)
        images = train_images[index]
        if args.corrupt_every and step % args.corrupt_every == 0:
            images = images * 100.0  # a corrupted batch: a loss spike
        loss, diagnostics = train_step(model, optimizer, images, train_labels[index])
        if step % 25 == 0 or step == args.steps:
            progress.set_postfix(
                loss=f"{float(loss):.3f}",
                threshold=f"{float(diagnostics['threshold']):.3f}",
                clipped=int(diagnostics["num_clipped"]),
            )
    progress.close()
    print("ALRC diagnostics:", {name: float(value) for name, value in diagnostics.items()})
    test_accuracy = float(accuracy(model, test_images, test_labels))
    print(f"test accuracy: {test_accuracy:.4f}")
    return test_accuracy


if __name__ == "__main__":
    main()
