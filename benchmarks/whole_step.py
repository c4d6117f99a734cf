"""Whole-step cost: the training step a user compiles, with and without the defence.

What a user sees is not the optimizer alone but the whole jitted training step: the
forward pass, the backward pass and the update. Each pair below compiles that step for
one model twice, without and with the defence, and times the first lower + compile and
the steady step:

- ``spike_guard()`` in front of the standard recipe (AdamW, warm-up and cosine decay,
  weight decay on matrices, ``clip_by_global_norm(1.0)``) against the recipe;
- ``logadam(lr, dampen_scale="auto")`` against ``optax.adam(lr)``;
- ``logadamw(lr)`` against ``optax.adamw(lr)``.

Models: the LM benchmark's byte-level GPT (2 layers, width 96, 19 tensors) and a
12-layer GPT written layer by layer (width 256, 8 heads, 100 tensors, 9.5M parameters,
not scanned: every tensor a leaf of its own, as most Flax and Equinox models keep them).
Batch 16 x 64 bytes. All steps of one model are compiled in one process, alternating
the two sides of every pair, ``--repeats`` times (11); a compile time is the smallest of
its repeats (the least disturbed), and the compile ratio is also given paired (the median
over repeats of with / without in the same repeat: the same compile varies by about 10 %
from one repeat to the next on a 2-core machine). Steady steps: the contenders take
turns, one step each, for ``--steps`` rounds after a warm-up; the time is the median,
and the ratio is also given paired (the median over rounds of with / without in the
same round).

Targets: ``spike_guard()`` compile at most 1.15x, step at most 1.03x; ``logadam(auto)``
and ``logadamw`` compile at most 1.5x, step at most 1.03x.

Usage::

  python benchmarks/whole_step.py --out benchmarks/results/whole_step
  python benchmarks/whole_step.py --models lm --repeats 1 --steps 5   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_logdamp as old
import optax_logdamp._grouping as grouping

from contenders import Base
from lm_spike_benchmark import BATCH, CONTEXT, VOCAB, init_gpt, lm_loss
from reporting import machine_line, markdown_table

PEAK_LR, TOTAL_STEPS = 1e-2, 1500


class Model(NamedTuple):
    """A model of the race: its parameters and its number of attention heads."""

    name: str
    params: Any
    heads: int


def models(names: Sequence[str]) -> list[Model]:
    """The LM benchmark's model and a 12-layer GPT written per layer."""
    known = {
        "lm": lambda: Model("LM benchmark GPT (2 layers)", init_gpt(jax.random.key(0)), 4),
        "gpt12": lambda: Model(
            "12-layer GPT, per layer", init_gpt(jax.random.key(0), layers=12, width=256), 8
        ),
    }
    return [known[name]() for name in names]


def recipe(*front: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """The standard recipe (``lm_spike_benchmark.py --recipe standard``), fronts first."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, PEAK_LR, TOTAL_STEPS // 10, TOTAL_STEPS, PEAK_LR / 10
    )
    base = Base(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)
    return optax.with_extra_args_support(base.recipe(*front))


# (pair, without, with): the optimizer a user has, and the same with the defence.
PAIRS: tuple[tuple[str, Callable[[], Any], Callable[[], Any]], ...] = (
    ("spike_guard() + recipe / recipe", recipe, lambda: recipe(old.spike_guard())),
    (
        "logadam(auto) / adam",
        lambda: optax.adam(1e-3),
        lambda: old.logadam(1e-3, dampen_scale="auto"),
    ),
    ("logadamw / adamw", lambda: optax.adamw(1e-3), lambda: old.logadamw(1e-3)),
)
# --per-tensor: these pairs again with grouping off (kernel and norm traced per tensor).
PER_TENSOR = ("spike_guard() + recipe / recipe", "logadam(auto) / adam", "logadamw / adamw")


def make_step(tx: optax.GradientTransformation, heads: int) -> Callable:
    """The jitted training step: loss and gradients, update, new parameters (donated)."""

    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(lm_loss)(params, windows, heads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class Runner:
    """One optimizer on one model: its compile times, its compiled step, its step times."""

    def __init__(self, tx, model: Model, windows: jax.Array, grouped: bool | None = None):
        self.tx, self.model, self.windows = tx, model, windows
        self.grouped = grouping.enabled() if grouped is None else grouped
        self.compile_s: list[float] = []
        self.step_s: list[float] = []
        self.compiled = self.params = self.state = None

    def compile(self) -> None:
        """One first lower + compile of a fresh jitted step (nothing cached in between)."""
        params = jax.tree.map(jnp.copy, self.model.params)
        state = self.tx.init(params)
        with mock.patch.object(grouping, "enabled", lambda: self.grouped):
            start = time.perf_counter()
            lowered = make_step(self.tx, self.model.heads).lower(params, state, self.windows)
            compiled = lowered.compile()
            self.compile_s.append(time.perf_counter() - start)
        self.compiled, self.params, self.state = compiled, params, state

    def run(self, record: bool) -> None:
        start = time.perf_counter()
        self.params, self.state, loss = self.compiled(self.params, self.state, self.windows)
        jax.block_until_ready((self.params, self.state, loss))
        if record:
            self.step_s.append(time.perf_counter() - start)


def race_model(
    model: Model, repeats: int, steps: int, warmup: int, per_tensor: bool
) -> list[list[str]]:
    """The table rows of one model: each pair's compile and step times and ratios."""
    rng = np.random.default_rng(0)
    windows = jnp.asarray(rng.integers(0, VOCAB, (BATCH, CONTEXT + 1)), jnp.int32)
    pairs = [(name, a, b, None) for name, a, b in PAIRS]
    if per_tensor:
        pairs += [(f"{n}, per tensor", a, b, False) for n, a, b in PAIRS if n in PER_TENSOR]
    runners = [
        (Runner(a(), model, windows), Runner(b(), model, windows, grouped))
        for _, a, b, grouped in pairs
    ]
    flat = [runner for pair in runners for runner in pair]
    for _ in range(repeats):  # alternate: without, with, without, with, ...
        for runner in flat:
            runner.compile()
    for round_index in range(warmup + steps):
        shift = round_index % len(flat)
        for runner in flat[shift:] + flat[:shift]:
            runner.run(record=round_index >= warmup)
    n = sum(p.size for p in jax.tree.leaves(model.params))
    tensors = len(jax.tree.leaves(model.params))
    rows = []
    for (name, *_), (without, with_) in zip(pairs, runners, strict=True):
        compile_a, compile_b = min(without.compile_s), min(with_.compile_s)
        compile_paired = statistics.median(
            b / a for a, b in zip(without.compile_s, with_.compile_s, strict=True)
        )
        step_a, step_b = statistics.median(without.step_s), statistics.median(with_.step_s)
        paired = statistics.median(b / a for a, b in zip(without.step_s, with_.step_s, strict=True))
        rows.append(
            [
                f"{model.name} ({tensors} tensors, {n / 1e6:.2f}M)",
                name,
                f"{compile_a:.2f} s",
                f"{compile_b:.2f} s",
                f"**{compile_b / compile_a:.2f}x** ({compile_paired:.2f}x paired)",
                f"{step_a * 1e3:.1f} ms",
                f"{step_b * 1e3:.1f} ms",
                f"{step_b / step_a:.3f}x ({paired:.3f}x paired)",
            ]
        )
    return rows


HEADER = (
    "model",
    "with / without",
    "compile without",
    "compile with",
    "compile ratio",
    "step without",
    "step with",
    "step ratio",
)


def report(rows: list[list[str]], repeats: int, steps: int, command: str) -> str:
    """The Markdown report: the table, how it was measured, the machine."""
    return "\n".join(
        [
            "# Whole-step cost",
            "",
            "The whole jitted training step (forward, backward, update, parameters and state "
            "donated), without and with the defence, side by side in one process. Compile: "
            f"the first lower + compile, smallest of {repeats} alternated repeats (and the "
            "median of the ratio within a repeat). Step: the "
            f"median of {steps} steps taken in turns (and the median of the per-round ratio).",
            "Targets: `spike_guard()` compile <= 1.15x, step <= 1.03x; `logadam(auto)` and "
            "`logadamw` compile <= 1.5x, step <= 1.03x.",
            "",
            markdown_table(HEADER, rows),
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine_line()}",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("lm", "gpt12"), default=["lm", "gpt12"])
    parser.add_argument("--repeats", type=int, default=11, help="compiles of each step (min)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each optimizer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write whole_step.md here")
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="also race the dampening pairs with the kernel traced per tensor (no grouping)",
    )
    args = parser.parse_args(argv)
    rows = []
    for model in models(args.models):
        rows += race_model(model, args.repeats, args.steps, args.warmup, args.per_tensor)
        print(markdown_table(HEADER, rows), flush=True)
    command = " ".join(["python benchmarks/whole_step.py", *(argv or sys.argv[1:])])
    text = report(rows, args.repeats, args.steps, command)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "whole_step.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
