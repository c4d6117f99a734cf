"""Spike demo: one corrupted batch against Adam, and what ALRC and log dampening do.

A small MLP learns to regress scikit-learn's 8x8 digit images from a 4x4
downsampled copy (a tiny super-sampling task). At a few steps the targets of the
batch are corrupted (x1000), as a bad shard or a broken label file would. Each
optimizer sees the same data in the same order. Runs in well under a minute on CPU:

    python examples/spike_demo.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from optax_logdamp import alrc, logadam


def load_data(seed: int):
    """Digits as (4x4 input, 8x8 target) pairs in [0, 1], split into train and test."""
    images = load_digits().images.astype(np.float32) / 16.0
    inputs = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    targets = images.reshape(-1, 64)
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:1400], order[1400:]
    return (inputs[train], targets[train]), (inputs[test], targets[test])


def init_mlp(key, sizes=(16, 128, 64)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mse(params, x, y):
    return jnp.mean((mlp(params, x) - y) ** 2)


def train(tx, data, *, steps, batch_size, corrupt_steps, seed):
    (x_train, y_train), (x_test, y_test) = jax.tree.map(jnp.asarray, data)
    params = init_mlp(jax.random.key(seed))
    opt_state = tx.init(params)
    corrupt = np.zeros(steps, bool)
    corrupt[list(corrupt_steps)] = True
    batches = np.random.default_rng(seed).integers(0, len(x_train), (steps, batch_size))

    def step(carry, inputs):
        params, opt_state = carry
        index, bad = inputs
        x, y = x_train[index], y_train[index]
        y = jnp.where(bad, y * 1000.0, y)
        loss, grads = jax.value_and_grad(mse)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return (optax.apply_updates(params, updates), opt_state), loss

    run = jax.jit(lambda c, xs: jax.lax.scan(step, c, xs))
    (params, opt_state), losses = run((params, opt_state), (batches, corrupt))
    return float(mse(params, x_test, y_test)), np.asarray(losses), opt_state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_data(args.seed)
    lr = args.learning_rate
    corrupt_steps = [s for s in (args.steps // 3, 2 * args.steps // 3) if s > 0]
    contenders = {
        "adam": optax.adam(lr),
        "logadam": logadam(lr),
        "alrc + adam": optax.chain(alrc(), optax.adam(lr)),
        "alrc + logadam": optax.chain(alrc(), logadam(lr)),
    }
    print(f"{args.steps} steps, batch {args.batch_size}, corrupted steps {corrupt_steps}")
    clean_error, _, _ = train(
        optax.adam(lr), data, steps=args.steps, batch_size=args.batch_size,
        corrupt_steps=[], seed=args.seed,
    )  # fmt: skip
    print(f"{'optimizer':<16}{'test MSE':>12}{'vs clean adam':>15}{'clipped steps':>15}")
    print(f"{'adam (clean)':<16}{clean_error:>12.5f}{1.0:>15.2f}{'-':>15}")
    for name, tx in contenders.items():
        error, _, state = train(
            tx, data, steps=args.steps, batch_size=args.batch_size,
            corrupt_steps=corrupt_steps, seed=args.seed,
        )  # fmt: skip
        clipped = optax.tree.get(state, "num_clipped") if "alrc" in name else "-"
        print(f"{name:<16}{error:>12.5f}{error / clean_error:>15.2f}{clipped!s:>15}")


if __name__ == "__main__":
    main()
