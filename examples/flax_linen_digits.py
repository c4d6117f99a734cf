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

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from optax_logdamp import alrc, alrc_diagnostics, logadam
from optax_logdamp.flax import TrainState


def load_data(seed: int = 0):
    """Digits as float32 images in [0, 1] (flattened) and int32 labels, split 75/25."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(images, labels, test_size=0.25, random_state=seed)


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
    return state, loss, alrc_diagnostics(state.opt_state)


@jax.jit
def accuracy(state: TrainState, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


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
    model = MLP()
    params = model.init(jax.random.key(args.seed), train_images[:1])["params"]
    tx = optax.chain(alrc(), logadam(args.learning_rate))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    rng = np.random.default_rng(args.seed)
    progress = tqdm(range(1, args.steps + 1), desc="linen", mininterval=0.5)
    for step in progress:
        index = rng.integers(0, len(train_images), args.batch_size)
        images = train_images[index]
        if args.corrupt_every and step % args.corrupt_every == 0:
            images = images * 100.0  # a corrupted batch: a loss spike
        state, loss, diagnostics = train_step(state, images, train_labels[index])
        if step % 25 == 0 or step == args.steps:
            progress.set_postfix(
                loss=f"{float(loss):.3f}",
                threshold=f"{float(diagnostics['threshold']):.3f}",
                clipped=int(diagnostics["num_clipped"]),
            )
    progress.close()
    print("ALRC diagnostics:", {name: float(value) for name, value in diagnostics.items()})
    test_accuracy = float(accuracy(state, test_images, test_labels))
    print(f"test accuracy: {test_accuracy:.4f}")
    return test_accuracy


if __name__ == "__main__":
    main()
