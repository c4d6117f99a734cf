"""Equinox + spike_guard: a small byte-level language model with bad batches.

A one-block causal transformer, written with Equinox, learns to predict the next byte
of this library's own source code (no download). Every ``--bad-every`` steps one batch
is a single byte repeated, the kind of garbage a broken shard feeds a language model.
The optimizer is the standard recipe with the library's defence in front of it::

    optax.chain(spike_guard(), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))

with a linear warm-up and a cosine decay. ``spike_guard()`` caps each step's gradient
norm at its running mean + 3 standard deviations and dampens each tensor's gradient
above 30 times its running RMS; it needs no ``value`` (no loss), so the training step is
the plain Equinox one:

- ``eqx.filter_value_and_grad`` differentiates with respect to the model's arrays,
- ``tx.init(eqx.filter(model, eqx.is_array))`` and
  ``tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))`` see only those
  arrays (the activation functions and other static fields are not parameters),
- ``eqx.apply_updates(model, updates)`` returns the updated model.

Run (a few seconds on a laptop CPU)::

    python examples/equinox_lm.py --steps 200
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_logdamp
from optax_logdamp import diagnostics, spike_guard, to_python_numbers

VOCAB = 256  # bytes


class Block(eqx.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    attention_norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, width: int, heads: int, key: jax.Array):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=attention_key)
        self.mlp_norm = eqx.nn.LayerNorm(width)
        self.mlp = eqx.nn.MLP(width, width, 4 * width, depth=1, activation=jax.nn.gelu, key=mlp_key)

    def __call__(self, x: jax.Array) -> jax.Array:  # (length, width)
        h = jax.vmap(self.attention_norm)(x)
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        x = x + self.attention(h, h, h, mask=causal)
        return x + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x))


class ByteLM(eqx.Module):
    """Byte embedding plus learnt positions, one block, and logits over the 256 bytes."""

    embedding: eqx.nn.Embedding
    positions: jax.Array
    block: Block
    norm: eqx.nn.LayerNorm
    unembedding: eqx.nn.Linear

    def __init__(self, length: int, width: int, heads: int, key: jax.Array):
        keys = jax.random.split(key, 4)
        self.embedding = eqx.nn.Embedding(VOCAB, width, key=keys[0])
        self.positions = 0.02 * jax.random.normal(keys[1], (length, width))
        self.block = Block(width, heads, keys[2])
        self.norm = eqx.nn.LayerNorm(width)
        self.unembedding = eqx.nn.Linear(width, VOCAB, key=keys[3])

    def __call__(self, tokens: jax.Array) -> jax.Array:  # (length,) -> (length, VOCAB)
        x = jax.vmap(self.embedding)(tokens) + self.positions[: tokens.shape[0]]
        return jax.vmap(self.unembedding)(jax.vmap(self.norm)(self.block(x)))


def loss_fn(model: ByteLM, batch: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy of a (batch, length + 1) array of bytes."""
    logits = jax.vmap(model)(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(steps: int, peak_lr: float) -> optax.GradientTransformation:
    """The standard recipe (AdamW, warm-up and cosine decay), spike_guard in front."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=max(steps // 10, 1),
        decay_steps=steps,
        end_value=peak_lr / 10,
    )
    decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_matrices)
    return optax.chain(spike_guard(), adamw)


def load_bytes() -> tuple[np.ndarray, np.ndarray]:
    """This library's Python sources as bytes: the first 90 % to train, the rest held out."""
    sources = sorted(Path(optax_logdamp.__file__).parent.glob("*.py"))
    data = np.frombuffer(b"\n".join(path.read_bytes() for path in sources), np.uint8)
    split = int(0.9 * data.size)
    return data[:split].astype(np.int32), data[split:].astype(np.int32)


def sample(rng: np.random.Generator, data: np.ndarray, batch: int, length: int) -> np.ndarray:
    starts = rng.integers(0, data.size - length - 1, batch)
    return np.stack([data[start : start + length + 1] for start in starts])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="bytes of context")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--peak-lr", type=float, default=3e-3)
    parser.add_argument("--bad-every", type=int, default=50, help="a repeated-byte batch")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Trains, prints the loss and spike_guard's diagnostics; returns the final numbers."""
    args = parse_args(argv)
    train_data, held_out = load_bytes()
    model = ByteLM(args.length, args.width, heads=4, key=jax.random.key(args.seed))
    tx = make_optimizer(args.steps, args.peak_lr)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, batch):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    evaluate = eqx.filter_jit(loss_fn)
    rng = np.random.default_rng(args.seed)
    eval_batch = jnp.asarray(sample(np.random.default_rng(1), held_out, 64, args.length))
    first_loss = float(evaluate(model, eval_batch))
    print(f"held-out loss before training: {first_loss:.3f} (uniform: {np.log(VOCAB):.3f})")
    for step in range(1, args.steps + 1):
        batch = sample(rng, train_data, args.batch, args.length)
        bad = step % args.bad_every == 0
        if bad:  # a bad batch: one byte, repeated
            batch = np.full_like(batch, rng.integers(VOCAB))
        model, opt_state, loss = train_step(model, opt_state, jnp.asarray(batch))
        if bad or step % args.log_every == 0 or step == args.steps:
            numbers = to_python_numbers(diagnostics(opt_state))
            print(
                f"step {step}{' (bad batch)' if bad else ''}: train loss {float(loss):.3f}, "
                f"gradient scaled by {numbers['grad_norm/scale']:.3f}, "
                f"steps clipped {numbers['grad_norm/num_clipped']}"
            )
    numbers = to_python_numbers(diagnostics(opt_state))
    numbers["held_out_loss"] = float(evaluate(model, eval_batch))
    print(f"held-out loss after {args.steps} steps: {numbers['held_out_loss']:.3f}")
    print("spike_guard:", numbers)
    return numbers


if __name__ == "__main__":
    main()
