"""Language-model spike benchmark: bad batches in a small transformer LM, and the defences.

Task: next-byte prediction on the source text of Python's own standard library (every
machine with Python has it, offline; the report gives its size and SHA-256). The
top-level ``*.py`` files of the running interpreter's standard library are read in
sorted order; every tenth file is held out and never trained on. The model is a
decoder-only transformer in plain JAX: byte tokens, learned positions, pre-LayerNorm
blocks with causal multi-head attention and a GELU MLP, tied input and output
embeddings (2 layers, width 96, 4 heads, about 250k parameters), context 64, batch 16.

Recipes (``--recipe``):

- ``standard`` (the default): what nanoGPT, OLMo, MaxText and Levanter train with. AdamW
  (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices only), linear warm-up from 0
  over the first 10 % of the steps, cosine decay to 10 % of the peak, and
  ``clip_by_global_norm(1.0)``. The peak learning rate is the best of a sweep on clean
  data (``--full``; the quick run takes the rate that sweep chose);
- ``adam``: plain Adam at 1e-3, no warm-up, no clip: the worst case for
  spikes. Its ``tuned clip`` contender gets its threshold from a sweep on clean data.

Contenders come from the one registry, ``contenders.py``: the recipe (``base``), this
package's defences in front of it or replacing its clip, and the anchors at their
published defaults. Scenarios (the same seeds, data and bad steps for every contender):

- ``clean``;
- ``repeated_byte`` / ``random_bytes``: 1 % of the steps, spread over the run, train on
  a batch of one byte repeated (the repeated n-gram of LLM data) or of random bytes (a
  corrupted shard); ``..., late``: the same bad batches, in the last half of the run only;
- ``loss x0.1`` / ``loss x10`` (clean, and with repeated-byte batches): the loss
  multiplied by a constant, as a codebase that sums instead of averaging does. Adam is
  nearly invariant to it; a fixed clip threshold is not;
- ``lr x3`` / ``lr x10`` / ``lr x30``: clean, at a multiple of the recipe's peak rate
  (the learning-rate sensitivity of Wortsman et al., 2023).

Metrics: the held-out loss (nats per byte over fixed held-out windows) at the end,
relative to the recipe's clean run of the same seed (mean ± std over seeds); the damage
recovered, ``(recipe_bad - method_bad) / (recipe_bad - recipe_clean)``; how often each
defence intervened; natural loss spikes (a training loss above 1.5x the median of the
previous 50 steps, on a step without a bad batch); the LR sensitivity, the mean over the
rates of ``min(loss, loss at init) - best loss``; and the whole training step's time
relative to the recipe's. Each contender's runs are one jitted, vmapped ``lax.scan``.
Finished contenders are kept in ``OUT/cache/`` (keyed by the code and the settings), so
a run that was stopped resumes, and a report can grow by a contender.

The script reads top to bottom: data, model, contenders (the recipes), scenarios (and
the plan of what runs where), training, report, main. What it shares with
``spike_benchmark.py`` (flags, seeds, stacked runs, the sweep, tables, verdicts, the
machine) is in ``reporting.py``.

Usage::

  python benchmarks/lm_spike_benchmark.py                  # quick: 60 steps, 1 seed (~4 min)
  python benchmarks/lm_spike_benchmark.py --full --out benchmarks/results/lm
  python benchmarks/lm_spike_benchmark.py --recipe adam --full --out benchmarks/results/lm
  python benchmarks/lm_spike_benchmark.py --steps 300 --seeds 2 --contenders base,spike_guard
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from anchors import count_interventions
from contenders import Base, build, contender
from reporting import (
    Label,
    add_common_flags,
    base_first,
    best_of_sweep,
    command_line,
    count_cell,
    curve_styles,
    init_key,
    logger,
    markdown_table,
    met,
    method_rows,
    paired_difference,
    pyplot,
    ratio_cell,
    record_lines,
    rows_by_scenario,
    section,
    seed_rng,
    source_digest,
    stack_runs,
    steps_and_seeds,
    summarize,
    sweep_text,
    write_report,
)

Params = dict[str, Any]

VOCAB = 256  # bytes
CONTEXT = 64
BATCH = 16
WIDTH = 96
LAYERS = 2
HEADS = 4
BAD_FRACTION = 0.01
HELDOUT_WINDOWS = 1024  # the final held-out loss: 1024 windows of 64 predicted bytes
QUICK_HELDOUT_WINDOWS = 256  # in the quick run
CURVE_WINDOWS = 64  # the held-out curve in the figure, every eval_every(steps) steps
EVAL_EVERY = 50  # in runs of at least 10 * EVAL_EVERY steps; shorter runs every 10
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 50  # a natural loss spike: 1.5x the median of 50 steps
TRAINING_VERSION = 2  # bump when training changes, so cached results are not reused


# ----------------------------------------------------------------------------- data


class Corpus(NamedTuple):
    """Byte tokens of the training and held-out text, and what they are."""

    train: np.ndarray  # shape=(n_train,), uint8
    heldout: np.ndarray  # shape=(n_heldout,), uint8
    description: str


def load_stdlib_corpus() -> Corpus:
    """The top-level ``*.py`` files of this Python's standard library, split by file.

    Files are read in sorted order; every tenth (indices 9, 19, ...) is held out.

    Returns:
      A :class:`Corpus`; its description names the files, sizes and SHA-256.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(
        os.path.join(stdlib, name) for name in os.listdir(stdlib) if name.endswith(".py")
    )
    train, heldout = [], []
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        with open(path, "rb") as f:
            text = f.read()
        digest.update(text)
        (heldout if index % 10 == 9 else train).append(text)
    train_bytes, heldout_bytes = b"".join(train), b"".join(heldout)
    description = (
        f"{len(paths)} top-level `*.py` files of the Python {sys.version.split()[0]} "
        f"standard library ({stdlib}), {len(train_bytes):,} training and "
        f"{len(heldout_bytes):,} held-out bytes (every tenth file), "
        f"SHA-256 {digest.hexdigest()[:16]}"
    )
    as_array = lambda b: np.frombuffer(b, np.uint8).copy()  # noqa: E731
    return Corpus(as_array(train_bytes), as_array(heldout_bytes), description)


def eval_every(steps: int) -> int:
    """How often the figure's held-out curve is evaluated in a run of ``steps`` steps."""
    return EVAL_EVERY if steps >= 10 * EVAL_EVERY else 10


def window_starts(length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced starts of ``CONTEXT + 1``-byte windows in a text."""
    return np.linspace(0, length - CONTEXT - 1, count).astype(np.int32)


def gather_windows(text: jax.Array, starts: jax.Array) -> jax.Array:
    """The windows ``text[s : s + CONTEXT + 1]`` for each start, as int32 tokens."""
    return text[starts[..., None] + jnp.arange(CONTEXT + 1)].astype(jnp.int32)


def corpus_arrays(corpus: Corpus, heldout_windows: int) -> dict[str, jax.Array]:
    """The training text and the fixed held-out windows, as device arrays."""
    heldout = jnp.asarray(corpus.heldout)
    starts = jnp.asarray(window_starts(len(corpus.heldout), heldout_windows))
    curve_starts = starts[:: heldout_windows // CURVE_WINDOWS]
    return {
        "train": jnp.asarray(corpus.train),
        "heldout": gather_windows(heldout, starts),
        "curve": gather_windows(heldout, curve_starts),
    }


# ---------------------------------------------------------------------------- model


def init_gpt(key: jax.Array, layers: int | None = None, width: int | None = None) -> Params:
    """GPT-2-style initialisation: normal(0.02), residual projections scaled by depth."""
    layers, width = layers or LAYERS, width or WIDTH  # read at call time (tests shrink them)
    keys = iter(jax.random.split(key, 2 + 4 * layers))

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape)

    def norm():
        return {"scale": jnp.ones(width), "bias": jnp.zeros(width)}

    residual_std = 0.02 / math.sqrt(2 * layers)
    blocks = [
        {
            "ln1": norm(),
            "qkv": normal((width, 3 * width)),
            "proj": normal((width, width), residual_std),
            "ln2": norm(),
            "fc": normal((width, 4 * width)),
            "out": normal((4 * width, width), residual_std),
        }
        for _ in range(layers)
    ]
    embed, positions = normal((VOCAB, width)), normal((CONTEXT, width))
    return {"embed": embed, "positions": positions, "blocks": blocks, "ln_f": norm()}


def layer_norm(p: Params, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def attention(block: Params, x: jax.Array, heads: int | None = None) -> jax.Array:
    """Causal multi-head self-attention (``heads``: default :data:`HEADS`)."""
    heads = heads or HEADS
    batch, length, width = x.shape
    q, k, v = jnp.split(x @ block["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(batch, length, heads, width // heads) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return mixed @ block["proj"]


def gpt(params: Params, tokens: jax.Array, heads: int | None = None) -> jax.Array:
    """Next-byte logits for each position, shape ``tokens.shape + (VOCAB,)``."""
    x = params["embed"][tokens] + params["positions"][: tokens.shape[-1]]
    for block in params["blocks"]:
        x = x + attention(block, layer_norm(block["ln1"], x), heads)
        x = x + jax.nn.gelu(layer_norm(block["ln2"], x) @ block["fc"]) @ block["out"]
    return layer_norm(params["ln_f"], x) @ params["embed"].T


def lm_loss(params: Params, windows: jax.Array, heads: int | None = None) -> jax.Array:
    """Mean next-byte cross-entropy (nats) over a batch of ``CONTEXT + 1``-byte windows."""
    logits = gpt(params, windows[:, :-1], heads)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def heldout_loss(params: Params, windows: jax.Array) -> jax.Array:
    """The mean loss over many windows, evaluated ``BATCH * 4`` windows at a time."""
    chunks = windows.reshape(-1, BATCH * 4, CONTEXT + 1)
    return lax.map(lambda chunk: lm_loss(params, chunk), chunks).mean()


@jax.jit
@jax.vmap
def initial_params(init_key: jax.Array) -> Params:
    """Every run's initial parameters, from its key (the same for every contender).

    One program outside the training programs: compiling the initialisation into each of
    them cost about 3.5 s of compilation per contender (measured on 2 CPU cores).
    """
    return init_gpt(jax.random.wrap_key_data(init_key))


# ----------------------------------------------------------------------- contenders


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: the base optimizer every defence is added to.

    Attributes:
      name: ``standard`` or ``adam``.
      title: how the report names it.
      peak_lr: the peak learning rate (the standard recipe's is swept with ``--full``;
        1e-2 is what that sweep chose, over 3 seeds of 1500 steps).
      peak_sweep: the peak rates of that sweep (empty: not swept).
      clip_sweep: thresholds swept for the ``tuned clip`` contender (empty: none).
    """

    name: str
    title: str
    peak_lr: float
    peak_sweep: tuple[float, ...] = ()
    clip_sweep: tuple[float, ...] = ()

    def base(self, learning_rate: jax.Array, steps: int) -> Base:
        """The recipe's :class:`~contenders.Base` at a (traced) peak rate, for ``steps``."""
        if self.name == "adam":
            return Base(learning_rate)
        # The schedule at peak 1, times the (traced, vmapped) peak: optax's schedule
        # branches in Python on its peak value.
        shape = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=1.0,
            warmup_steps=max(1, steps // 10),
            decay_steps=steps,
            end_value=0.1,
        )
        schedule = lambda count: learning_rate * shape(count)  # noqa: E731
        return Base(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)

    def describe(self) -> str:
        if self.name == "adam":
            return f"Adam, learning rate {self.peak_lr:g}, no warm-up, no weight decay, no clip"
        return (
            f"AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices), peak learning "
            f"rate {self.peak_lr:g}, linear warm-up from 0 over the first 10 % of the steps, "
            "cosine decay to 10 % of the peak, `clip_by_global_norm(1.0)`"
        )


RECIPES = {
    "standard": Recipe(
        "standard", "the standard recipe", 1e-2, peak_sweep=(1e-3, 3e-3, 1e-2, 3e-2)
    ),
    "adam": Recipe("adam", "plain Adam", 1e-3, clip_sweep=(0.1, 0.3, 1.0, 3.0)),
}

# The anchors (``anchors.py``), each at its published defaults.
ANCHORS = ("zclip", "skip-step", "adagc", "spam", "update clipping")


# ------------------------------------------------------------------------ scenarios


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What one training run sees: its bad batches, the loss's units, the learning rate."""

    name: str
    bad: str = "none"  # "none", "repeated_byte" or "random_bytes"
    late: bool = False  # bad steps in the last half of the run only
    loss_scale: float = 1.0  # the training loss (and so the gradient) multiplied by this
    lr_multiple: float = 1.0  # the recipe's peak rate multiplied by this


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("clean"),
        Scenario("repeated_byte", "repeated_byte"),
        Scenario("random_bytes", "random_bytes"),
        Scenario("repeated_byte, late", "repeated_byte", late=True),
        Scenario("random_bytes, late", "random_bytes", late=True),
        Scenario("loss x0.1", loss_scale=0.1),
        Scenario("loss x0.1, repeated_byte", "repeated_byte", loss_scale=0.1),
        Scenario("loss x10", loss_scale=10.0),
        Scenario("loss x10, repeated_byte", "repeated_byte", loss_scale=10.0),
        Scenario("lr x3", lr_multiple=3.0),
        Scenario("lr x10", lr_multiple=10.0),
        Scenario("lr x30", lr_multiple=30.0),
    )
}
BAD = ("repeated_byte", "random_bytes", "repeated_byte, late", "random_bytes, late")
CORE = ("clean", *BAD)
UNITS = ("loss x0.1", "loss x0.1, repeated_byte", "loss x10", "loss x10, repeated_byte")
RATES = ("clean", "lr x3", "lr x10", "lr x30")  # "clean" is the rate x1
ALL = (*CORE, *UNITS, *RATES[1:])

# What each run covers: (contender, scenarios). The recipe and spike_guard run every
# scenario; the anchors the clean and the repeated-byte scenarios (what they do on the others
# runs with --contenders and --scenarios). A run of 1500 steps takes 35-50 s on 2 CPU cores.
PLANS: dict[str, dict[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "standard": {
        "full": (
            ("base", ALL),
            ("spike_guard", ALL),
            *((name, CORE[:2]) for name in ANCHORS),
        ),
        "quick": (
            ("base", ALL),
            ("spike_guard", ALL),
            *((name, CORE) for name in ANCHORS),
            ("base (no clip)", BAD),
        ),
    },
    "adam": {
        "full": (
            ("base", CORE),
            ("tuned clip", CORE),
            ("spike_guard", CORE),
            ("log_dampen(auto)", CORE),
            ("alrc + log_dampen", CORE),
            *((name, CORE) for name in ANCHORS),
        ),
        "quick": (
            ("base", CORE[:3]),
            ("tuned clip", CORE[:3]),
            ("spike_guard", CORE[:3]),
            ("log_dampen(auto)", CORE[:3]),
            ("zclip", CORE[:3]),
            ("skip-step", CORE[:3]),
        ),
    },
}


class Runs(NamedTuple):
    """One row per training run (scenario x seed [x swept value]), leading axis R."""

    init_key: jax.Array  # shape=(R, 2), uint32: parameter initialisation
    starts: jax.Array  # shape=(R, steps, BATCH), int32: training windows of each step
    bad: jax.Array  # shape=(R, steps), bool: steps that train on a bad batch
    bad_slot: jax.Array  # shape=(R, steps), int32: which of bad_batches a bad step uses
    bad_batches: jax.Array  # shape=(R, num_bad, BATCH, CONTEXT + 1), uint8: the bad batches
    learning_rate: jax.Array  # shape=(R,), float32: the peak rate of this run
    loss_scale: jax.Array  # shape=(R,), float32
    hyper: jax.Array  # shape=(R,), float32: the contender's swept value, if any


def seed_streams(seed: int, steps: int, n_train: int, scenario: Scenario) -> dict[str, Any]:
    """A seed's initial parameters, data order, bad steps and bad batches.

    The same for every contender and every scenario of a seed: the bad steps of the
    spread scenarios are spread over the whole run; the late ones are drawn from the
    last half of the run by a second generator, so the spread ones do not change.
    """
    rng = seed_rng(seed, offset=2000)
    starts = rng.integers(0, n_train - CONTEXT - 1, size=(steps, BATCH), dtype=np.int32)
    num_bad = max(1, round(BAD_FRACTION * steps))
    bad_steps = np.sort(rng.choice(steps, size=num_bad, replace=False))
    shape = (num_bad, BATCH, CONTEXT + 1)
    repeated = np.broadcast_to(rng.integers(0, VOCAB, size=(num_bad, 1, 1)), shape)
    random_bytes = rng.integers(0, VOCAB, size=shape)
    if scenario.late:
        late_rng = seed_rng(seed, offset=3000)
        bad_steps = np.sort(late_rng.choice(np.arange(steps // 2, steps), num_bad, replace=False))
    bad = np.zeros(steps, bool)
    bad[bad_steps] = scenario.bad != "none"
    slot = np.zeros(steps, np.int32)
    slot[bad_steps] = np.arange(num_bad)
    bad_batches = random_bytes if scenario.bad == "random_bytes" else repeated
    return {
        "init_key": init_key(seed),
        "starts": starts,
        "bad": bad,
        "bad_slot": slot,
        "bad_batches": bad_batches.astype(np.uint8),
    }


def make_runs(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    n_train: int,
    peak_lr: float,
    learning_rates: Sequence[float] | None = None,
    hypers: Sequence[float] = (0.0,),
) -> tuple[Runs, list[Label]]:
    """All (scenario, rate, swept value, seed) runs, stacked, and their labels.

    ``learning_rates`` (a sweep) replaces ``peak_lr``; each scenario multiplies it.
    """

    def row(scenario: Scenario, label: Label) -> dict[str, Any]:
        return dict(
            seed_streams(label.seed, steps, n_train, scenario),
            learning_rate=np.float32(label.rate * scenario.lr_multiple),
            loss_scale=np.float32(scenario.loss_scale),
            hyper=np.float32(label.hyper),
        )

    rates = tuple(learning_rates or (peak_lr,))
    named = [SCENARIOS[name] for name in scenarios]
    return stack_runs(Runs, named, seeds, row, rates=rates, hypers=hypers)


def training_batch(train: jax.Array, run: Runs, bad, starts, slot) -> jax.Array:
    """The step's batch of windows: real text, or the scenario's bad batch."""
    windows = gather_windows(train, starts)
    return jnp.where(bad, run.bad_batches[slot].astype(jnp.int32), windows)


# ------------------------------------------------------------------------- training


class RunResult(NamedTuple):
    """What one training run records (leading axis R once vmapped)."""

    train_loss: jax.Array  # shape=(steps,): the raw batch loss of every step (unscaled)
    grad_norm: jax.Array  # shape=(steps,): the global norm of the raw gradient
    curve: jax.Array  # shape=(steps // eval_every(steps),): held-out loss (curve subset)
    final: jax.Array  # shape=(): held-out loss at the end (all held-out windows)
    interventions: jax.Array  # shape=(): clips, caps or skips (-1: not counted)


class Trained(NamedTuple):
    """What a training program returns (leading axis R once vmapped)."""

    train_loss: jax.Array  # shape=(steps,)
    grad_norm: jax.Array  # shape=(steps,)
    snapshots: Params  # leading axis steps // eval_every(steps): params after each chunk
    interventions: jax.Array  # shape=()


def train_one(
    name: str, recipe: Recipe, corpus: dict[str, jax.Array], run: Runs, params: Params
) -> Trained:
    """One full training run from ``params`` (traced; vmapped over runs by :func:`train_many`).

    The parameters are kept every ``eval_every(steps)`` steps and evaluated afterwards by
    :func:`evaluate`, one program for every contender.
    """
    steps = run.bad.shape[0]
    base = recipe.base(run.learning_rate, steps)
    tx = build(name, base, run.hyper)
    opt_state = tx.init(params)

    def scaled_loss(params, windows):
        return run.loss_scale * lm_loss(params, windows)

    def step(carry, inputs):
        params, opt_state = carry
        bad, starts, slot = inputs
        windows = training_batch(corpus["train"], run, bad, starts, slot)
        loss, grads = jax.value_and_grad(scaled_loss)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss / run.loss_scale, optax.tree.norm(grads))

    def chunk(carry, inputs):
        carry, (losses, norms) = lax.scan(step, carry, inputs)
        return carry, (losses, norms, carry[0])

    inputs = (run.bad, run.starts, run.bad_slot)
    every = eval_every(steps)
    by_chunk = jax.tree.map(lambda a: a.reshape(-1, every, *a.shape[1:]), inputs)
    (_, opt_state), (losses, norms, snapshots) = lax.scan(chunk, (params, opt_state), by_chunk)
    norms = norms.reshape(-1)
    if contender(name).tuned:  # the tuned clip: steps whose norm exceeded its threshold
        interventions = jnp.sum(norms > run.hyper, dtype=jnp.int32)
    else:
        interventions = count_interventions(opt_state)
    return Trained(
        train_loss=losses.reshape(-1),
        grad_norm=norms,
        snapshots=snapshots,
        interventions=interventions,
    )


@jax.jit
def evaluate(snapshots: Params, corpus: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Held-out losses of parameter snapshots shaped ``(R, chunks, ...)``.

    Returns the curve (every snapshot on the curve windows), shape ``(R, chunks)``, and
    the final loss (the last snapshot on all held-out windows), shape ``(R,)``.
    """
    num_runs, num_chunks = jax.tree.leaves(snapshots)[0].shape[:2]
    flat = jax.tree.map(lambda a: a.reshape(num_runs * num_chunks, *a.shape[2:]), snapshots)
    curve = lax.map(lambda p: heldout_loss(p, corpus["curve"]), flat)
    last = jax.tree.map(lambda a: a[:, -1], snapshots)
    final = lax.map(lambda p: heldout_loss(p, corpus["heldout"]), last)
    return curve.reshape(num_runs, num_chunks), final


class Timing(NamedTuple):
    """Seconds spent compiling a contender's training program, and per training step."""

    compile_s: float
    step_s: float  # wall time of the whole compiled run / (steps x runs)


def train_many(
    name: str, recipe: Recipe, corpus: dict[str, jax.Array], runs: Runs
) -> tuple[RunResult, Timing]:
    """All runs of one contender: one compiled, vmapped scan, then their evaluation.

    The training program is compiled ahead of time and holds no evaluation, so its wall
    time is the cost of the training steps alone (forward, backward, update).
    """
    params = initial_params(runs.init_key)
    start = time.perf_counter()
    program = jax.jit(jax.vmap(lambda run, p: train_one(name, recipe, corpus, run, p)))
    compiled = program.lower(runs, params).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    trained = jax.block_until_ready(compiled(runs, params))
    num_runs, steps = runs.bad.shape
    step_s = (time.perf_counter() - start) / (steps * num_runs)
    curve, final = evaluate(trained.snapshots, corpus)
    result = RunResult(
        train_loss=trained.train_loss,
        grad_norm=trained.grad_norm,
        curve=curve,
        final=final,
        interventions=trained.interventions,
    )
    return jax.tree.map(np.asarray, result), Timing(compile_s=compile_s, step_s=step_s)


def split_by_scenario(
    outcome: RunResult, labels: Sequence[Label], scenarios: Sequence[str]
) -> dict[str, RunResult]:
    """``{scenario: RunResult over its seeds}`` from the rows of one program."""
    rows = rows_by_scenario(labels, scenarios)
    return {s: jax.tree.map(lambda a, r=r: a[r], outcome) for s, r in rows.items()}


def names_of(plan: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """The contenders of a plan, in its order, once each."""
    return list(dict.fromkeys(name for name, _ in plan))


class Cache:
    """Finished contenders on disk, keyed by the code and every setting of their runs."""

    def __init__(self, directory: str | None, settings: dict[str, Any]):
        self.directory = directory
        code = source_digest(["optax_logdamp", "benchmarks/anchors.py", "benchmarks/contenders.py"])
        self.settings = dict(settings, code=code, training_version=TRAINING_VERSION)

    def _path(self, key: dict[str, Any]) -> str | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{digest}.npz")

    def get(self, **key: Any) -> tuple[dict[str, RunResult], Timing] | None:
        path = self._path(dict(self.settings, **key))
        if path is None or not os.path.exists(path):
            return None
        with np.load(path) as data:
            results = {
                s: RunResult(**{f: data[f"{s}/{f}"] for f in RunResult._fields})
                for s in key["scenarios"]
            }
            timing = Timing(compile_s=float(data["compile_s"]), step_s=float(data["step_s"]))
            return results, timing

    def put(self, results: dict[str, RunResult], timing: Timing, **key: Any) -> None:
        path = self._path(dict(self.settings, **key))
        if path is None:
            return
        os.makedirs(self.directory, exist_ok=True)  # pyright: ignore[reportArgumentType]
        arrays = {f"{s}/{f}": getattr(r, f) for s, r in results.items() for f in RunResult._fields}
        np.savez(path, compile_s=timing.compile_s, step_s=timing.step_s, **arrays)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every training program of one benchmark run shares."""

    recipe: Recipe  # with the peak rate in use
    corpus: Corpus
    arrays: dict[str, jax.Array]  # the training text and the held-out windows
    steps: int
    seeds: list[int]
    heldout_windows: int  # the final loss's
    cache: Cache
    log: Callable[..., None]

    @property
    def n_train(self) -> int:
        return len(self.corpus.train)

    def runs(self, scenarios: Sequence[str], **sweep: Any) -> tuple[Runs, list[Label]]:
        """:func:`make_runs` of these scenarios, every seed, at the recipe's peak rate."""
        return make_runs(
            scenarios, self.seeds, self.steps, self.n_train, self.recipe.peak_lr, **sweep
        )


def prepare(
    recipe_name: str,
    steps: int,
    seeds: Sequence[int],
    heldout_windows: int,
    cache_dir: str | None,
    quiet: bool,
) -> Setup:
    """The recipe, the corpus on the device and the cache of finished contenders."""
    corpus = load_stdlib_corpus()
    settings = dict(recipe=recipe_name, steps=steps, seeds=list(seeds), windows=heldout_windows)
    return Setup(
        recipe=RECIPES[recipe_name],
        corpus=corpus,
        arrays=corpus_arrays(corpus, heldout_windows),
        steps=steps,
        seeds=list(seeds),
        heldout_windows=heldout_windows,
        cache=Cache(cache_dir, settings),
        log=logger(quiet),
    )


def sweep(
    name: str, setup: Setup, swept: str, values: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """The swept value with the lowest mean clean loss, and every value's.

    ``swept`` is ``"rate"`` (the peak learning rate) or ``"hyper"`` (the contender's).
    """
    key = dict(sweep=name, values=tuple(values), scenarios=["clean"])
    grid = {"learning_rates": values} if swept == "rate" else {"hypers": values}
    runs, labels = setup.runs(["clean"], **grid)
    cached = setup.cache.get(**key)
    if cached is None:
        outcome, timing = train_many(name, setup.recipe, setup.arrays, runs)
        setup.cache.put({"clean": outcome}, timing, **key)
    else:
        outcome = cached[0]["clean"]
    best, means = best_of_sweep(labels, outcome.final.astype(np.float64), swept)
    setup.log(f"sweep of {name}: {means}; chosen {best:g}")
    return best, means


class Tuning(NamedTuple):
    """What was swept on clean data, and what the sweeps chose."""

    peak_sweep: dict | None  # {peak rate: clean loss}, if swept
    clip_sweep: dict | None  # {threshold: clean loss}, if swept
    threshold: float  # the tuned clip's (0: not run)


def tune(
    setup: Setup, plan: Sequence[tuple[str, Sequence[str]]], sweep_peak: bool
) -> tuple[Setup, Tuning]:
    """Sweeps what a user would sweep, on clean data: the peak rate, the clip's threshold.

    Returns the setup at the chosen peak rate, and the :class:`Tuning`.
    """
    peak_sweep = clip_sweep = None
    if sweep_peak and setup.recipe.peak_sweep:
        peak, peak_sweep = sweep("base", setup, "rate", setup.recipe.peak_sweep)
        setup = dataclasses.replace(setup, recipe=dataclasses.replace(setup.recipe, peak_lr=peak))
    threshold = 0.0
    if setup.recipe.clip_sweep and any(name == "tuned clip" for name, _ in plan):
        threshold, clip_sweep = sweep("tuned clip", setup, "hyper", setup.recipe.clip_sweep)
    return setup, Tuning(peak_sweep=peak_sweep, clip_sweep=clip_sweep, threshold=threshold)


def train_contender(
    setup: Setup, name: str, scenarios: Sequence[str], threshold: float
) -> dict[str, RunResult]:
    """One contender on its scenarios, every seed: from the cache, or trained and kept."""
    key = dict(
        contender=name, scenarios=list(scenarios), peak=setup.recipe.peak_lr, hyper=threshold
    )
    cached = setup.cache.get(**key)
    if cached is None:
        runs, labels = setup.runs(scenarios, hypers=(threshold,))
        outcome, timing = train_many(name, setup.recipe, setup.arrays, runs)
        by_scenario = split_by_scenario(outcome, labels, scenarios)
        setup.cache.put(by_scenario, timing, **key)
    else:
        by_scenario, timing = cached
    finals = ", ".join(f"{s} {np.mean(r.final):.4f}" for s, r in by_scenario.items())
    setup.log(f"{name}{' (cached)' if cached else ''}: {finals} ({timing})")
    return by_scenario


def train_plan(
    setup: Setup, plan: Sequence[tuple[str, Sequence[str]]], threshold: float
) -> dict[tuple[str, str], RunResult]:
    """Every contender of the plan on its scenarios: ``{(contender, scenario): RunResult}``."""
    results = {}
    for name, scenarios in plan:
        for scenario, result in train_contender(setup, name, scenarios, threshold).items():
            results[name, scenario] = result
    return results


TIMING_REPEATS = 2  # each contender's timing program runs twice; the faster run counts


def time_steps(names: Sequence[str], setup: Setup, steps: int) -> dict[str, Timing]:
    """Whole training-step time of each contender, measured side by side in this process.

    One clean run of ``steps`` steps (seed 0) per contender, each program compiled and
    then run ``TIMING_REPEATS`` times (the faster counts), one contender after another,
    and the recipe once more at the end: the faster of its two is the reference, their
    spread the noise of the measurement. The training runs themselves are not timed for
    the report: they are cached and may come from another session or a busier moment.
    """
    runs, _ = make_runs(["clean"], setup.seeds[:1], steps, setup.n_train, setup.recipe.peak_lr)
    timings: dict[str, Timing] = {}
    for name in [*names, "base"]:
        best = None
        for _ in range(TIMING_REPEATS):
            _, timing = train_many(name, setup.recipe, setup.arrays, runs)
            best = timing if best is None or timing.step_s < best.step_s else best
        key = "base (again, last)" if name in timings else name
        timings[key] = best  # pyright: ignore[reportArgumentType]
    times = ", ".join(f"{n} {t.step_s * 1e3:.2f}" for n, t in timings.items())
    setup.log(f"step times (ms): {times}")
    return timings


def loss_at_init(setup: Setup) -> np.ndarray:
    """Each seed's held-out loss at initialisation (the cap of the LR sensitivity)."""
    init = initial_params(setup.runs(["clean"])[0].init_key)
    return np.asarray(lax.map(lambda p: heldout_loss(p, setup.arrays["heldout"]), init))


def bad_steps(setup: Setup) -> dict[str, np.ndarray]:
    """Each scenario's bad-step masks, shape ``(seeds, steps)``."""
    n_train = setup.n_train
    return {
        name: np.stack([seed_streams(seed, setup.steps, n_train, s)["bad"] for seed in setup.seeds])
        for name, s in SCENARIOS.items()
    }


# --------------------------------------------------------------------------- report


def natural_spikes(result: RunResult, bad: np.ndarray) -> np.ndarray:
    """Per run: steps whose training loss exceeds 1.5x the median of the previous 50.

    Steps that train on a bad batch are not counted (their loss is the bad batch's).
    """
    losses = result.train_loss
    counts = np.zeros(len(losses), int)
    for step in range(SPIKE_WINDOW, losses.shape[1]):
        median = np.median(losses[:, step - SPIKE_WINDOW : step], axis=1)
        counts += (losses[:, step] > SPIKE_FACTOR * median) & ~bad[:, step]
    return counts


def lr_sensitivity(results: dict, name: str, loss_at_init: np.ndarray) -> np.ndarray | None:
    """Per seed, Wortsman et al.'s LR sensitivity over the rates ``RATES``.

    ``mean over rates of min(loss, loss at init) - min over rates of loss``.
    """
    if not all((name, s) in results for s in RATES):
        return None
    finals = np.stack([results[name, s].final for s in RATES])  # (rates, seeds)
    finals = np.where(np.isfinite(finals), finals, np.inf)
    capped = np.minimum(finals, loss_at_init)
    return capped.mean(axis=0) - capped.min(axis=0)


def damage_cell(method: np.ndarray, recipe_bad: np.ndarray, recipe_clean: np.ndarray) -> str:
    """``(recipe_bad - method_bad) / (recipe_bad - recipe_clean)``, from the seed means.

    The ratio means something only where the recipe was damaged: where its paired
    damage over seeds is within two standard errors of zero, the cell says so.
    """
    if not np.all(np.isfinite(method)):
        return "diverged"
    damage, stderr = paired_difference(recipe_bad, recipe_clean)
    if damage <= 2 * stderr:
        scale = np.mean(recipe_clean)
        return f"no damage to recover ({damage / scale:+.2%} ± {stderr / scale:.2%})"
    return f"{(np.mean(recipe_bad) - np.mean(method)) / damage:.0%}"


def role(name: str, recipe: Recipe) -> str:
    """Where a contender sits relative to the recipe, for the tables."""
    if name == "base":
        return "the recipe" if recipe.name == "standard" else "plain Adam"
    if name == "tuned clip":
        return "clip, threshold tuned"
    if contender(name).anchor:
        return "anchor (wraps the recipe)" if name == "skip-step" else "anchor (replaces the clip)"
    if name.endswith(" (no clip)") or recipe.name == "adam":
        return "replaces the clip" if recipe.name == "standard" else "in front of Adam"
    return "in front of the recipe"


def scenario_rows(
    results: dict,
    names: Sequence[str],
    scenarios: Sequence[str],
    cell: Callable[[str, str], str],
    lead: Callable[[str], list[str]] = lambda name: [f"`{name}`"],
) -> list[list[str]]:
    """A row per method (``lead``), a cell per scenario it ran (``cell``), ``—`` elsewhere."""
    ran = lambda name, s: cell(name, s) if (name, s) in results else "—"  # noqa: E731
    return method_rows(names, scenarios, ran, lead)


def results_table(results: dict, names: Sequence[str], scenarios: Sequence[str], recipe) -> str:
    """Held-out loss relative to the recipe's clean run of the same seed."""
    reference = results["base", "clean"].final
    rows = scenario_rows(
        results,
        names,
        scenarios,
        lambda name, s: ratio_cell(results[name, s].final, reference),
        lead=lambda name: [f"`{name}`", role(name, recipe)],
    )
    return markdown_table(["method", "where", *scenarios], rows)


def loss_table(results: dict, names: Sequence[str], scenarios: Sequence[str]) -> str:
    """Held-out loss, mean ± std over seeds."""
    rows = scenario_rows(results, names, scenarios, lambda n, s: summarize(results[n, s].final))
    return markdown_table(["method", *scenarios], rows)


def damage_table(results: dict, names: Sequence[str], scenarios: Sequence[str]) -> str:
    """How much of the recipe's bad-batch damage each method takes away."""
    clean = results["base", "clean"].final

    def cell(name: str, s: str) -> str:
        if ("base", s) not in results:
            return "—"
        return damage_cell(results[name, s].final, results["base", s].final, clean)

    rows = scenario_rows(results, [n for n in names if n != "base"], scenarios, cell)
    return markdown_table(["method", *scenarios], rows)


def rates_table(results: dict, names: Sequence[str], loss_at_init: np.ndarray, recipe) -> str:
    """Final held-out loss at each multiple of the peak rate, and the LR sensitivity."""
    rows = []
    for name in names:
        sensitivity = lr_sensitivity(results, name, loss_at_init)
        if sensitivity is None:
            continue
        cells = [summarize(results[name, s].final) for s in RATES]
        rows.append([f"`{name}`", role(name, recipe), *cells, summarize(sensitivity)])
    header = ["method", "where", "x1", "x3", "x10", "x30", "LR sensitivity"]
    return markdown_table(header, rows)


def step_time_table(timings: dict[str, Timing], names: Sequence[str]) -> str:
    """Per-step training time of each contender, its ratio to the recipe's, and compile time."""
    reference = min(t.step_s for n, t in timings.items() if n.startswith("base"))
    rows = [
        [
            f"`{name}`",
            f"{timings[name].step_s * 1e3:.2f}",
            f"{timings[name].step_s / reference:.3f}",
            f"{timings[name].compile_s:.1f}",
        ]
        for name in [*names, "base (again, last)"]
        if name in timings
    ]
    return markdown_table(["method", "ms per step", "× recipe", "compile s"], rows)


TARGETS = {
    # The targets: (method, bad-batch bound %, clean bound %), relative to the recipe's clean.
    "standard": (("spike_guard", 0.5, 0.2),),
    "adam": (("spike_guard", 1.5, 0.3), ("log_dampen(auto)", 3.0, 0.3)),
}


def excess(results: dict, name: str, scenario: str) -> float:
    """Mean over seeds of the held-out loss relative to the recipe's clean run, in %."""
    reference = results["base", "clean"].final
    return float(np.mean(results[name, scenario].final / reference - 1) * 100)


def target_row(name: str, what: str, value: str, target: str, holds: bool) -> list[str]:
    """The start of a row of the targets table: method, what, value, target, verdict."""
    return [f"`{name}`", what, value, target, met(holds)]


def bound_rows(results: dict, name: str, bad_bound: float, clean_bound: float) -> list:
    """A method's loss on clean data and on bad batches, against its bounds."""
    rows = []
    for scenario in (*CORE, "loss x0.1, repeated_byte", "loss x10, repeated_byte"):
        if (name, scenario) not in results:
            continue
        bound = clean_bound if scenario == "clean" else bad_bound
        value = excess(results, name, scenario)
        recipe_value = (
            excess(results, "base", scenario) if ("base", scenario) in results else np.nan
        )
        row = target_row(name, scenario, f"{value:+.2f} %", f"≤ {bound:g} %", value <= bound)
        rows.append([*row, f"{recipe_value:+.2f} %"])
    return rows


def lr_sensitivity_rows(results: dict, name: str, loss_at_init: np.ndarray) -> list:
    """A method's LR sensitivity against the recipe's, where both ran every rate."""
    mine = lr_sensitivity(results, name, loss_at_init)
    theirs = lr_sensitivity(results, "base", loss_at_init)
    if mine is None or theirs is None:
        return []
    mean, recipe_mean = np.mean(mine), np.mean(theirs)
    row = target_row(name, "LR sensitivity", f"{mean:.4f}", "≤ the recipe's", mean <= recipe_mean)
    return [[*row, f"{recipe_mean:.4f}"]]


def units_rows(results: dict, name: str) -> list:
    """A method's loss in other units against the recipe's, where both ran them."""
    rows = []
    for scenario in UNITS:
        if (name, scenario) in results and ("base", scenario) in results:
            value, recipe_value = excess(results, name, scenario), excess(results, "base", scenario)
            row = target_row(
                name, scenario, f"{value:+.2f} %", "below the recipe", value < recipe_value
            )
            rows.append([*row, f"{recipe_value:+.2f} %"])
    return rows


def target_report(results: dict, recipe: Recipe, loss_at_init: np.ndarray) -> str:
    """The targets, measured: each bound, the value, and whether it holds."""
    rows = []
    for name, bad_bound, clean_bound in TARGETS[recipe.name]:
        rows += bound_rows(results, name, bad_bound, clean_bound)
        if recipe.name == "standard":
            rows += lr_sensitivity_rows(results, name, loss_at_init)
            rows += units_rows(results, name)
    header = ["method", "scenario", "vs the recipe's clean", "target", "met", "the recipe"]
    return markdown_table(header, rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measured:
    """Everything a report is written from: the runs' results and how they were made."""

    results: dict  # {(contender, scenario): RunResult over seeds}
    timings: dict  # {contender: Timing}
    names: list  # contenders, in the plan's order
    recipe: Recipe  # with the peak rate that was used
    steps: int
    seeds: list
    corpus: Corpus
    heldout_windows: int
    bad_steps: dict  # {scenario: bad-step masks, (seeds, steps)}
    loss_at_init: np.ndarray  # per seed
    tuning: Tuning
    command: str
    elapsed: float  # seconds

    def ran(self, group: Sequence[str]) -> list[str]:
        """The scenarios of ``group`` that some contender ran."""
        return [s for s in group if any((n, s) in self.results for n in self.names)]

    def ran_every_rate(self) -> bool:
        """Whether some contender ran every learning rate (the sensitivity has a row)."""
        return any(all((n, s) in self.results for s in RATES) for n in self.names)

    @property
    def reference(self) -> str:
        """How the text names the base: the recipe, or plain Adam."""
        return "the recipe" if self.recipe.name == "standard" else "plain Adam"


def tuning_text(m: Measured) -> str:
    """What was tuned, and how."""
    recipe, tuning = m.recipe, m.tuning
    if tuning.peak_sweep:
        text = (
            "The peak rate was chosen by a sweep on clean data (held-out loss per peak: "
            f"{sweep_text(tuning.peak_sweep, digits=4)}; chosen: {recipe.peak_lr:g})."
        )
    elif recipe.name == "standard":
        text = (
            f"The peak rate {recipe.peak_lr:g} was not swept in this run: it is what the "
            "`--full` sweep over 1e-3, 3e-3, 1e-2 and 3e-2 chose."
        )
    else:
        text = ""
    if tuning.clip_sweep:
        text += (
            " `tuned clip`: threshold chosen by a sweep on clean data ("
            f"{sweep_text(tuning.clip_sweep, digits=4)}; chosen: {tuning.threshold:g})."
        )
    return text


def introduction(m: Measured) -> list[str]:
    """The title and what the tables hold."""
    num_bad = int(m.bad_steps["repeated_byte"][0].sum())
    seeds = f"{len(m.seeds)} seeds" if len(m.seeds) > 1 else "1 seed (no spread to show)"
    return [
        f"# Language-model spike benchmark: {m.recipe.title}",
        "",
        f"Held-out loss after {m.steps} steps, {seeds}, relative to {m.reference}'s "
        "clean run of the same seed (mean ± std over seeds of the per-seed ratio; lower is "
        f"better). Recipe: {m.recipe.describe()}. {tuning_text(m)} Every other method runs at "
        f"its defaults, nothing tuned. In the bad-batch scenarios {BAD_FRACTION:.0%} of the "
        f"steps ({num_bad} per run) train on a bad batch, spread over the run or (`late`) in "
        "its last half. `—`: not run (see the plan in `lm_spike_benchmark.py`).",
    ]


def bad_batch_sections(m: Measured) -> list[str]:
    """The held-out loss under bad batches, and the share of the damage recovered."""
    return [
        *section(
            "Bad batches",
            results_table(m.results, m.names, m.ran(CORE), m.recipe),
            "Held-out loss (nats per byte), mean ± std over seeds:",
            loss_table(m.results, m.names, m.ran(CORE)),
        ),
        *section(
            "Damage recovered",
            "`(recipe_bad - method_bad) / (recipe_bad - recipe_clean)`, from the means over "
            f"seeds: the share of {m.reference}'s bad-batch damage that the method takes away "
            "(100 %: none left; above 100 %: better than the clean recipe; negative: worse "
            "than the recipe). Where the recipe's own damage, paired over seeds, is within "
            "two standard errors of zero there is nothing to recover, and the cell says so.",
            damage_table(m.results, m.names, m.ran(BAD)),
        ),
    ]


def units_and_rates_sections(m: Measured) -> list[str]:
    """The loss in other units, and the learning-rate sensitivity, where they ran."""
    lines = []
    if m.ran(UNITS):
        lines += section(
            "The gradient's units",
            "The training loss multiplied by 0.1 or 10 (so is its gradient), relative to "
            f"{m.reference}'s clean run at the usual scale (the held-out loss is the usual "
            "one). Adam is nearly invariant to the scale; a fixed clip threshold is not.",
            results_table(m.results, m.names, m.ran(UNITS), m.recipe),
        )
    if m.ran_every_rate():
        lines += section(
            "Learning-rate sensitivity",
            "Final held-out loss on clean data at 1x, 3x, 10x and 30x the peak rate, and the "
            "LR sensitivity of Wortsman et al. (2023): the mean over the rates of "
            "`min(loss, loss at init) - best loss` (lower is more robust; the loss at "
            f"initialisation is {np.mean(m.loss_at_init):.3f}).",
            rates_table(m.results, m.names, m.loss_at_init, m.recipe),
            f"The figure `lm_{m.recipe.name}_lr.png` plots these losses against the rate.",
        )
    return lines


def counts_sections(m: Measured) -> list[str]:
    """How often each defence acted, and the natural loss spikes."""

    def interventions(name: str, scenario: str) -> str:
        return count_cell(m.results[name, scenario].interventions)

    def spikes(name: str, scenario: str) -> str:
        counts = natural_spikes(m.results[name, scenario], m.bad_steps[scenario])
        return f"{np.mean(counts):.1f}"

    def table(cell: Callable[[str, str], str]) -> str:
        scenarios = m.ran(ALL)
        return markdown_table(
            ["method", *scenarios], scenario_rows(m.results, m.names, scenarios, cell)
        )

    return section(
        "Interventions and natural loss spikes",
        "Mean count per run of the steps each defence acted on: clipped (`tuned clip`: norm "
        "above the threshold; ZClip; AdaGC and update clipping: a step where some tensor was "
        "clipped; SPAM: some coordinate), capped (ALRC, `spike_guard`; with two signals the "
        "caps of both, summed) or skipped (skip-step). The recipe's own clip and the "
        "dampening are not counted.",
        table(interventions),
        f"Natural loss spikes: steps whose training loss exceeds {SPIKE_FACTOR:g}x the median "
        f"of the previous {SPIKE_WINDOW}, on a step without a bad batch (mean per run).",
        table(spikes),
    )


def step_time_section(m: Measured) -> list[str]:
    """The whole training step's time, side by side."""
    return section(
        "Whole training-step time",
        "Measured side by side after the training runs, in the process that wrote this "
        f"report: one clean run of {min(m.steps, 200)} steps per contender (forward, backward "
        f"and update; the compiled program run {TIMING_REPEATS} times, the faster counts), "
        "one contender after another, the recipe first and again last. The ratio is to the "
        "faster of the recipe's two; their spread is the noise of the measurement.",
        step_time_table(m.timings, m.names),
    )


def setup_section(m: Measured) -> list[str]:
    """The corpus, the model, the held-out windows, the plan and the record."""
    num_params = sum(a.size for a in jax.tree.leaves(init_gpt(jax.random.key(0))))
    plan = "; ".join(f"`{n}`: {len([s for s in ALL if (n, s) in m.results])}" for n in m.names)
    lines = [
        f"Corpus: {m.corpus.description}.  ",
        f"Model: decoder-only transformer, {LAYERS} layers, width {WIDTH}, {HEADS} heads, "
        f"context {CONTEXT}, tied byte embeddings, {num_params:,} parameters; batch {BATCH}.  ",
        f"Held-out loss: {m.heldout_windows} fixed windows ({m.heldout_windows * CONTEXT:,} "
        f"predicted bytes); the figure's curve: {CURVE_WINDOWS} of them every "
        f"{eval_every(m.steps)} steps.  ",
        f"Plan (contender: scenarios): {plan}.  ",
        *record_lines(m.command),
        f"Wall time: {m.elapsed:.0f} s (training and compilation; cached contenders cost none)",
    ]
    return section("Setup", "\n".join(lines))


def format_report(m: Measured) -> str:
    """The Markdown report; every number in it comes from ``m``."""
    targets = section(
        "Targets",
        "Mean over seeds, relative to the recipe's clean run; nothing tuned per scenario.",
        target_report(m.results, m.recipe, m.loss_at_init),
    )
    return "\n".join(
        [
            *introduction(m),
            *bad_batch_sections(m),
            *units_and_rates_sections(m),
            *targets,
            *counts_sections(m),
            *step_time_section(m),
            *setup_section(m),
            "",
        ]
    )


# The contenders the figures draw with thick lines.
EMPHASIS = ("base", "spike_guard")


def plot_curves(results: dict, names: Sequence[str], bad_steps: dict, path: str) -> None:
    """Held-out loss of seed 0 over training, one panel per bad-batch scenario."""
    plt = pyplot()

    panels = [
        s
        for s in ("clean", "repeated_byte", "random_bytes", "repeated_byte, late")
        if ("base", s) in results
    ]
    names = [n for n in names if any((n, s) in results for s in panels)]
    style = curve_styles(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.4), sharey=True)
    axes = np.atleast_1d(axes)
    handles = {}
    reference = results["base", "clean"].curve[0][-1]
    for ax, scenario in zip(axes, panels, strict=True):
        for name in names:
            if (name, scenario) not in results:
                continue
            curve = results[name, scenario].curve[0]
            x = (np.arange(len(curve)) + 1) * (len(bad_steps[scenario]) // len(curve))
            color, ls = style[name]
            lw = 2.6 if name in EMPHASIS else 1.3
            (handles[name],) = ax.plot(x, curve, color=color, ls=ls, lw=lw, label=name)
        for step in np.flatnonzero(bad_steps[scenario]):
            ax.axvline(step, color="red", alpha=0.35, lw=0.8, zorder=0)
        ax.set_ylim(reference * 0.97, reference * 1.35)
        ax.set_title(f"{scenario} (seed 0)" + ("" if scenario == "clean" else ", red: bad steps"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    ordered = [handles[n] for n in names if n in handles]
    fig.legend(handles=ordered, loc="lower center", ncol=min(len(ordered), 5), fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_rates(results: dict, names: Sequence[str], peak_lr: float, path: str) -> None:
    """Final held-out loss against the peak learning rate, one curve per contender."""
    plt = pyplot()

    names = [n for n in names if all((n, s) in results for s in RATES)]
    style = curve_styles(names)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    rates = [peak_lr * SCENARIOS[s].lr_multiple for s in RATES]
    for name in names:
        means = [np.mean(results[name, s].final) for s in RATES]
        stds = [np.std(results[name, s].final) for s in RATES]
        color, ls = style[name]
        ax.errorbar(
            rates,
            means,
            yerr=stds,
            color=color,
            ls=ls,
            marker="o",
            capsize=3,
            lw=2.4 if name in EMPHASIS else 1.3,
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final held-out loss (nats per byte)")
    ax.set_title("Learning-rate sensitivity (clean data, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


QUICK = (60, 1)  # steps, seeds: ~4 min on 2 cores (5 at most)
FULL = (1500, 3)


def check_plan(plan: Sequence[tuple[str, Sequence[str]]], steps: int) -> None:
    """Refuses a run the report could not be written from."""
    if steps % eval_every(steps):
        raise ValueError(f"steps must be a multiple of {eval_every(steps)}, got {steps}.")
    if ("base", "clean") not in [(n, s) for n, ss in plan for s in ss]:
        raise ValueError("the plan must run 'base' on 'clean': it is the reference.")


def measure(
    setup: Setup, names: list[str], results: dict, tuning: Tuning, command: str, elapsed: float
) -> Measured:
    """The record a report is written from.

    With the results: the step times (measured now, side by side), the bad steps, the
    loss at initialisation and how the run was made.
    """
    return Measured(
        results=results,
        timings=time_steps(names, setup, min(setup.steps, 200)),
        names=names,
        recipe=setup.recipe,
        steps=setup.steps,
        seeds=setup.seeds,
        corpus=setup.corpus,
        heldout_windows=setup.heldout_windows,
        bad_steps=bad_steps(setup),
        loss_at_init=loss_at_init(setup),
        tuning=tuning,
        command=command,
        elapsed=elapsed,
    )


def write_outputs(m: Measured, out_dir: str) -> dict[str, Any]:
    """Writes the report and the figures; returns their paths."""
    stem = os.path.join(out_dir, f"lm_{m.recipe.name}")
    report = format_report(m)
    write_report(report, f"{stem}.md")
    plot_curves(m.results, m.names, {s: b[0] for s, b in m.bad_steps.items()}, f"{stem}.png")
    figures = [f"{stem}.png"]
    if m.ran_every_rate():
        plot_rates(m.results, m.names, m.recipe.peak_lr, f"{stem}_lr.png")
        figures.append(f"{stem}_lr.png")
    return {"report": report, "markdown": f"{stem}.md", "figures": figures}


def run_benchmark(
    recipe_name: str,
    steps: int,
    seeds: Sequence[int],
    out_dir: str,
    plan: Sequence[tuple[str, Sequence[str]]],
    heldout_windows: int = HELDOUT_WINDOWS,
    sweep_peak: bool = False,
    cache_dir: str | None = None,
    quiet: bool = False,
    command: str = "python benchmarks/lm_spike_benchmark.py",
) -> dict:
    """Load, sweep, train every contender of ``plan``, time, report, write.

    Args:
      recipe_name: ``"standard"`` or ``"adam"``.
      steps: training steps per run, a multiple of ``eval_every(steps)``.
      seeds: the seeds (initial parameters, data order, bad steps and bytes).
      out_dir: where ``lm_<recipe>.md``, ``lm_<recipe>.png`` (and ``lm_<recipe>_lr.png``) go.
      plan: ``(contender, scenarios)`` pairs; ``base`` with ``clean`` must be among them.
      heldout_windows: how many held-out windows give the final loss (a multiple of 64).
      sweep_peak: sweep the standard recipe's peak rate on clean data first.
      cache_dir: where finished contenders are kept (``None``: nowhere).
      quiet: print nothing.
      command: the command line, for the record.

    Returns:
      ``{(contender, scenario): RunResult over seeds}``, plus ``"markdown"``.
    """
    check_plan(plan, steps)
    start = time.perf_counter()
    setup = prepare(recipe_name, steps, seeds, heldout_windows, cache_dir, quiet)
    setup, tuning = tune(setup, plan, sweep_peak)
    results = train_plan(setup, plan, tuning.threshold)
    elapsed = time.perf_counter() - start
    measured = measure(setup, names_of(plan), results, tuning, command, elapsed)
    written = write_outputs(measured, out_dir)
    setup.log(written["report"])
    setup.log(f"Wrote {written['markdown']} and {', '.join(written['figures'])}")
    return {
        **results,
        "markdown": written["markdown"],
        "figures": written["figures"],
        "peak_lr": setup.recipe.peak_lr,
        "clip_threshold": tuning.threshold,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, QUICK, FULL)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="standard")
    parser.add_argument(
        "--heldout-windows",
        type=int,
        default=None,
        help=f"held-out windows, a multiple of 64 (default {QUICK_HELDOUT_WINDOWS}; "
        f"{HELDOUT_WINDOWS} with --full)",
    )
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma-separated registry names to run (default: the plan of the recipe); "
        "each runs the scenarios the plan gives it, or every core scenario (every one "
        "--scenarios names)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=None,
        metavar="SCENARIO",
        help="run only these scenarios of each contender's plan (the recipe always runs clean)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not keep or reuse results")
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The recipe's plan, narrowed by ``--contenders`` and ``--scenarios``."""
    plan = PLANS[args.recipe]["full" if args.full else "quick"]
    if args.contenders:
        given = dict(plan)
        default = ALL if args.scenarios else CORE
        plan = tuple(
            (contender(n).name, given.get(n, default)) for n in base_first(args.contenders)
        )
    if args.scenarios:
        keep = lambda name, s: s in args.scenarios or (name, s) == ("base", "clean")  # noqa: E731
        plan = tuple((n, tuple(s for s in ss if keep(n, s))) for n, ss in plan)
    return plan


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    args = parse_args(argv)
    steps, seeds = steps_and_seeds(args, QUICK, FULL)
    windows = args.heldout_windows or (HELDOUT_WINDOWS if args.full else QUICK_HELDOUT_WINDOWS)
    run_benchmark(
        args.recipe,
        steps,
        seeds,
        args.out,
        plan_of(args),
        heldout_windows=windows,
        sweep_peak=args.full,
        cache_dir=None if args.no_cache else os.path.join(args.out, "cache"),
        quiet=args.quiet,
        command=command_line("lm_spike_benchmark.py", argv),
    )


if __name__ == "__main__":
    main()
