"""What the two Flax digits examples share: data, flags and the training loop.

Each example only says how its framework builds the model, takes a step and scores
the test set; this module loads scikit-learn's digits, parses the flags, samples the
batches, corrupts one in ``--corrupt-every``, shows a progress bar and prints the ALRC
diagnostics and the test accuracy.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from optax_logdamp import to_python_numbers

Batch = tuple[np.ndarray, np.ndarray]
StepFn = Callable[[np.ndarray, np.ndarray], tuple[jax.Array, dict[str, jax.Array]]]


def load_data(seed: int = 0):
    """Digits as float32 images in [0, 1] (flattened) and int32 labels, split 75/25."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return train_test_split(images, labels, test_size=0.25, random_state=seed)


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--corrupt-every", type=int, default=50, help="corrupt one batch in N (0: never)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(args: argparse.Namespace, train_set: Batch, step: StepFn, name: str) -> None:
    """Runs ``args.steps`` calls of ``step(images, labels) -> (loss, diagnostics)``.

    Every ``args.corrupt_every``-th batch has its images multiplied by 100 (a loss
    spike). The loss, ALRC threshold and clip count are shown on the progress bar, and
    the last diagnostics are printed at the end.
    """
    train_images, train_labels = train_set
    rng = np.random.default_rng(args.seed)
    # Counted with update(), not by iterating the bar: set_postfix redraws the bar, and
    # an iterated bar redraws the count it last printed (1, after the compiling first
    # step), which is all a log that is not a terminal ever shows.
    progress = tqdm(total=args.steps, desc=name, mininterval=0.5)
    for step_index in range(1, args.steps + 1):
        index = rng.integers(0, len(train_images), args.batch_size)
        images = train_images[index]
        if args.corrupt_every and step_index % args.corrupt_every == 0:
            images = images * 100.0  # a corrupted batch: a loss spike
        loss, diagnostics = step(images, train_labels[index])
        if step_index % 25 == 0 or step_index == args.steps:
            progress.set_postfix(
                loss=f"{float(loss):.3f}",
                threshold=f"{float(diagnostics['threshold']):.3f}",
                clipped=int(diagnostics["num_clipped"]),
                refresh=False,  # shown at the next redraw, with the count of that step
            )
        progress.update()
    progress.close()
    print("ALRC diagnostics:", to_python_numbers(diagnostics))


def report(test_accuracy: jax.Array) -> float:
    """Prints and returns the test accuracy."""
    test_accuracy = float(test_accuracy)
    print(f"test accuracy: {test_accuracy:.4f}")
    return test_accuracy
