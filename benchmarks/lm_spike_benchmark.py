"""Language-model spike benchmark: bad batches in a small transformer LM, and the defences.

Task: next-byte prediction on the source text of Python's own standard library (every
machine with Python has it, offline; the report gives its size and SHA-256). The
top-level ``*.py`` files of the running interpreter's standard library are read in
sorted order; every tenth file is held out and never trained on. The model is a
decoder-only transformer in plain JAX: byte tokens, learned positions, pre-LayerNorm
blocks with causal multi-head attention and a GELU MLP, tied input and output
embeddings (2 layers, width 96, 4 heads, about 250k parameters), context 64, batch 16,
Adam at learning rate 1e-3 with no warm-up, as in SPEC section 1.4.

Scenarios (the same bad steps for every contender of a seed):

- ``clean``: no bad batch, the "no harm" check;
- ``repeated_byte``: 1 % of the steps train on a batch that is one byte repeated over
  the whole batch (the repeated n-gram failure of LLM pretraining data);
- ``random_bytes``: 1 % of the steps train on uniformly random bytes (a corrupted shard).

Contenders: ``optax.adam``; ``clip_by_global_norm`` + adam with its threshold tuned by a
sweep on the clean scenario (what a user would do); the ZClip and skip-step anchors
(``anchors.py``); this package's defences with their defaults, nothing tuned.

Metric: the held-out loss (mean cross-entropy in nats per byte over a fixed set of
held-out windows) at the end of training, mean and spread over seeds, and its ratio to
clean Adam's of the same seed; how often each method intervened; and the time of a
whole training step (forward, backward and update) relative to Adam's, from the
compiled training program itself. Each contender's runs (scenarios x seeds) are one
jitted ``lax.scan``, vmapped.

Usage::

  python benchmarks/lm_spike_benchmark.py            # quick run: 60 steps, 1 seed (~4 min)
  python benchmarks/lm_spike_benchmark.py --full     # 600 steps, 3 seeds (~46 min, 2 cores)
  python benchmarks/lm_spike_benchmark.py --full --steps 1500   # SPEC 1.4's length
  python benchmarks/lm_spike_benchmark.py --steps 300 --seeds 2 --out /tmp/lm
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

import optax_logdamp as old

from anchors import count_interventions, skip_step_on_spikes, zclip
from reporting import curve_styles, machine_line, summarize

Params = dict[str, Any]

VOCAB = 256  # bytes
CONTEXT = 64
BATCH = 16
WIDTH = 96
LAYERS = 2
HEADS = 4
LEARNING_RATE = 1e-3
BAD_FRACTION = 0.01
CLIP_SWEEP = (0.1, 0.3, 1.0, 3.0)
HELDOUT_WINDOWS = 1024  # the final held-out loss: 1024 windows of 64 predicted bytes
QUICK_HELDOUT_WINDOWS = 256  # in the quick run
CURVE_WINDOWS = 64  # the held-out curve in the figure, every eval_every(steps) steps
EVAL_EVERY = 50  # in runs of at least 10 * EVAL_EVERY steps; shorter runs every 10


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


# ---------------------------------------------------------------------------- model


def init_gpt(key: jax.Array) -> Params:
    """GPT-2-style initialisation: normal(0.02), residual projections scaled by depth."""
    keys = iter(jax.random.split(key, 2 + 4 * LAYERS))

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape)

    def norm():
        return {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)}

    residual_std = 0.02 / math.sqrt(2 * LAYERS)
    blocks = [
        {
            "ln1": norm(),
            "qkv": normal((WIDTH, 3 * WIDTH)),
            "proj": normal((WIDTH, WIDTH), residual_std),
            "ln2": norm(),
            "fc": normal((WIDTH, 4 * WIDTH)),
            "out": normal((4 * WIDTH, WIDTH), residual_std),
        }
        for _ in range(LAYERS)
    ]
    embed, positions = normal((VOCAB, WIDTH)), normal((CONTEXT, WIDTH))
    return {"embed": embed, "positions": positions, "blocks": blocks, "ln_f": norm()}


def layer_norm(p: Params, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def attention(block: Params, x: jax.Array) -> jax.Array:
    """Causal multi-head self-attention."""
    batch, length, _ = x.shape
    q, k, v = jnp.split(x @ block["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(batch, length, HEADS, WIDTH // HEADS) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(WIDTH // HEADS)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, WIDTH)
    return mixed @ block["proj"]


def gpt(params: Params, tokens: jax.Array) -> jax.Array:
    """Next-byte logits for each position, shape ``tokens.shape + (VOCAB,)``."""
    x = params["embed"][tokens] + params["positions"][: tokens.shape[-1]]
    for block in params["blocks"]:
        x = x + attention(block, layer_norm(block["ln1"], x))
        x = x + jax.nn.gelu(layer_norm(block["ln2"], x) @ block["fc"]) @ block["out"]
    return layer_norm(params["ln_f"], x) @ params["embed"].T


def lm_loss(params: Params, windows: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) over a batch of ``CONTEXT + 1``-byte windows."""
    logits = gpt(params, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def heldout_loss(params: Params, windows: jax.Array) -> jax.Array:
    """The mean loss over many windows, evaluated ``BATCH * 4`` windows at a time."""
    chunks = windows.reshape(-1, BATCH * 4, CONTEXT + 1)
    return lax.map(lambda chunk: lm_loss(params, chunk), chunks).mean()


# ---------------------------------------------------------------------- contenders


@dataclasses.dataclass(frozen=True)
class Contender:
    """A method under test: ``make(hyperparameter) -> optimizer``."""

    name: str
    make: Callable[[jax.Array], optax.GradientTransformationExtraArgs]
    clips_norm_at_hyper: bool = False  # interventions: steps whose norm exceeded it


def _adam() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


def _auto() -> optax.GradientTransformation:
    return old.logadam(LEARNING_RATE, dampen_scale="auto")


CLIP = Contender(
    "clip_by_global_norm + adam",
    lambda hp: optax.chain(optax.clip_by_global_norm(hp), _adam()),
    clips_norm_at_hyper=True,
)
RECOMMENDED = "alrc(grad_norm) + logadam(auto)"  # the chain the README recommends
CONTENDERS: tuple[Contender, ...] = (
    Contender("adam", lambda hp: _adam()),
    CLIP,
    Contender("zclip + adam", lambda hp: optax.chain(zclip(), _adam())),
    Contender("skip-step + adam", lambda hp: skip_step_on_spikes(_adam())),
    Contender("logadam", lambda hp: old.logadam(LEARNING_RATE)),
    Contender("alrc + adam", lambda hp: optax.chain(old.alrc(), _adam())),
    Contender("alrc + logadam", lambda hp: optax.chain(old.alrc(), old.logadam(LEARNING_RATE))),
    Contender(
        "alrc(grad_norm) + adam", lambda hp: optax.chain(old.alrc(signal="grad_norm"), _adam())
    ),
    Contender("logadam(auto)", lambda hp: _auto()),
    Contender(RECOMMENDED, lambda hp: optax.chain(old.alrc(signal="grad_norm"), _auto())),
    Contender(
        "alrc(both) + logadam(auto)", lambda hp: optax.chain(old.alrc(signal="both"), _auto())
    ),
)


# ----------------------------------------------------------------------- scenarios

SCENARIOS = ("clean", "repeated_byte", "random_bytes")


class Runs(NamedTuple):
    """One row per training run (scenario x seed [x hyperparameter]), leading axis R."""

    init_key: jax.Array  # shape=(R, 2), uint32: parameter initialisation
    starts: jax.Array  # shape=(R, steps, BATCH), int32: training windows of each step
    bad: jax.Array  # shape=(R, steps), bool: steps that train on a bad batch
    kind: jax.Array  # shape=(R,), int32: index into SCENARIOS
    bad_slot: jax.Array  # shape=(R, steps), int32: which of bad_batches a bad step uses
    bad_batches: jax.Array  # shape=(R, num_bad, BATCH, CONTEXT + 1), uint8: the bad batches
    hyper: jax.Array  # shape=(R,), float32: the contender's hyperparameter, if any


def seed_streams(seed: int, steps: int, n_train: int, scenario: str) -> dict[str, np.ndarray]:
    """A seed's initial parameters, data order, bad steps and bad batches.

    The same for every contender; the bad steps are the same in both bad scenarios.
    """
    rng = np.random.default_rng(2000 + seed)
    starts = rng.integers(0, n_train - CONTEXT - 1, size=(steps, BATCH), dtype=np.int32)
    num_bad = max(1, round(BAD_FRACTION * steps))
    bad_steps = np.sort(rng.choice(steps, size=num_bad, replace=False))
    shape = (num_bad, BATCH, CONTEXT + 1)
    repeated = np.broadcast_to(rng.integers(0, VOCAB, size=(num_bad, 1, 1)), shape)
    random_bytes = rng.integers(0, VOCAB, size=shape)
    bad = np.zeros(steps, bool)
    bad[bad_steps] = scenario != "clean"
    slot = np.zeros(steps, np.int32)
    slot[bad_steps] = np.arange(num_bad)
    return {
        "init_key": np.asarray(jax.random.key_data(jax.random.key(seed))),
        "starts": starts,
        "bad": bad,
        "bad_slot": slot,
        "bad_batches": (repeated if scenario == "repeated_byte" else random_bytes).astype(np.uint8),
    }


def make_runs(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    n_train: int,
    hypers: Sequence[float] = (0.0,),
) -> tuple[Runs, list[tuple[str, int, float]]]:
    """All (scenario, hyperparameter, seed) runs, stacked, and their labels."""
    rows, labels = [], []
    for scenario in scenarios:
        for hyper in hypers:
            for seed in seeds:
                stream = seed_streams(seed, steps, n_train, scenario)
                stream["kind"] = np.int32(SCENARIOS.index(scenario))
                stream["hyper"] = np.float32(hyper)
                rows.append(stream)
                labels.append((scenario, seed, hyper))
    stacked = {field: jnp.asarray(np.stack([r[field] for r in rows])) for field in Runs._fields}
    return Runs(**stacked), labels


def training_batch(train: jax.Array, run: Runs, bad, starts, slot) -> jax.Array:
    """The step's batch of windows: real text, or the scenario's bad batch."""
    windows = gather_windows(train, starts)
    return jnp.where(bad, run.bad_batches[slot].astype(jnp.int32), windows)


# ------------------------------------------------------------------------ training


class RunResult(NamedTuple):
    """What one training run records (leading axis R once vmapped)."""

    train_loss: jax.Array  # shape=(steps,): the raw batch loss of every step
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
    contender: Contender, corpus: dict[str, jax.Array], run: Runs, params: Params
) -> Trained:
    """One full training run from ``params`` (traced; vmapped over runs by :func:`train_many`).

    The parameters are kept every ``eval_every(steps)`` steps and evaluated afterwards by
    :func:`evaluate`, one program for every contender.
    """
    tx = contender.make(run.hyper)
    opt_state = tx.init(params)

    def step(carry, inputs):
        params, opt_state = carry
        bad, starts, slot = inputs
        windows = training_batch(corpus["train"], run, bad, starts, slot)
        loss, grads = jax.value_and_grad(lm_loss)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss, optax.tree.norm(grads))

    def chunk(carry, inputs):
        carry, (losses, norms) = lax.scan(step, carry, inputs)
        return carry, (losses, norms, carry[0])

    inputs = (run.bad, run.starts, run.bad_slot)
    every = eval_every(run.bad.shape[0])
    by_chunk = jax.tree.map(lambda a: a.reshape(-1, every, *a.shape[1:]), inputs)
    (_, opt_state), (losses, norms, snapshots) = lax.scan(chunk, (params, opt_state), by_chunk)
    norms = norms.reshape(-1)
    if contender.clips_norm_at_hyper:
        interventions = jnp.sum(norms > run.hyper, dtype=jnp.int32)
    else:
        interventions = count_interventions(opt_state)
    return Trained(losses.reshape(-1), norms, snapshots, interventions)


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


class Timing(NamedTuple):
    """Seconds spent compiling a contender's training program, and per training step."""

    compile_s: float
    step_s: float  # wall time of the whole compiled run / (steps x runs)


@jax.jit
@jax.vmap
def initial_params(init_key: jax.Array) -> Params:
    """Every run's initial parameters, from its key (the same for every contender).

    One program outside the training programs: compiling the initialisation into each of
    them cost about 3.5 s of compilation per contender (measured on 2 CPU cores).
    """
    return init_gpt(jax.random.wrap_key_data(init_key))


def train_many(
    contender: Contender, corpus: dict[str, jax.Array], runs: Runs
) -> tuple[RunResult, Timing, Any]:
    """All runs of one contender: one compiled, vmapped scan, then their evaluation.

    The training program is compiled ahead of time and holds no evaluation, so its wall
    time is the cost of the training steps alone (forward, backward, update). The
    compiled program is returned to be run again.
    """
    params = initial_params(runs.init_key)
    start = time.perf_counter()
    program = jax.jit(jax.vmap(lambda run, p: train_one(contender, corpus, run, p)))
    compiled = program.lower(runs, params).compile()
    compile_s = time.perf_counter() - start
    trained, step_s = run_compiled(compiled, runs, params)
    curve, final = evaluate(trained.snapshots, corpus)
    result = RunResult(trained.train_loss, trained.grad_norm, curve, final, trained.interventions)
    return RunResult(*(np.asarray(a) for a in result)), Timing(compile_s, step_s), compiled


def run_compiled(compiled: Any, runs: Runs, params: Params) -> tuple[Trained, float]:
    """Runs a compiled training program; returns its output and seconds per step and run."""
    start = time.perf_counter()
    trained = jax.block_until_ready(compiled(runs, params))
    num_runs, steps = runs.bad.shape
    return trained, (time.perf_counter() - start) / (steps * num_runs)


def sweep_clip_threshold(
    corpus: dict[str, jax.Array], steps: int, seeds: Sequence[int], n_train: int
) -> tuple[float, dict[float, float]]:
    """The clip threshold with the lowest mean clean held-out loss, and the sweep."""
    runs, labels = make_runs(["clean"], seeds, steps, n_train, CLIP_SWEEP)
    final = train_many(CLIP, corpus, runs)[0].final
    by_threshold: dict[float, list[float]] = {h: [] for h in CLIP_SWEEP}
    for (_, _, hyper), value in zip(labels, final, strict=True):
        by_threshold[hyper].append(value)
    means = {h: float(np.mean(v)) for h, v in by_threshold.items()}
    means = {h: (m if np.isfinite(m) else np.inf) for h, m in means.items()}
    return min(means, key=means.get), means


# ------------------------------------------------------------------------- report


def ratio_cell(values: np.ndarray, reference: np.ndarray) -> str:
    """Per-seed ratio to the reference, as ``+x.x % ± y.y`` (mean ± std over seeds).

    One seed has no spread, and its cell is the ratio alone.
    """
    ratios = (values / reference - 1) * 100
    if not np.isfinite(ratios).all():
        return "diverged"
    if len(ratios) == 1:
        return f"{ratios[0]:+.1f} %"
    return f"{np.mean(ratios):+.1f} % ± {np.std(ratios, ddof=1):.1f}"


def results_tables(results: dict, names: Sequence[str]) -> str:
    """Held-out loss (mean ± std) and the ratio to clean Adam, contenders x scenarios."""
    reference = results["adam", "clean"].final
    lines = ["| method | " + " | ".join(SCENARIOS) + " |", "|---" * (len(SCENARIOS) + 1) + "|"]
    for name in names:
        cells = [ratio_cell(results[name, s].final, reference) for s in SCENARIOS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out loss (nats per byte), mean ± std over seeds:", ""]
    lines += ["| method | " + " | ".join(SCENARIOS) + " |", "|---" * (len(SCENARIOS) + 1) + "|"]
    for name in names:
        cells = [summarize(results[name, s].final) for s in SCENARIOS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interventions_table(results: dict, names: Sequence[str], steps: int) -> str:
    """Mean count per run of clipped, capped or skipped steps; "—" where not counted."""
    lines = ["| method | " + " | ".join(SCENARIOS) + " |", "|---" * (len(SCENARIOS) + 1) + "|"]
    for name in names:
        counts = [results[name, s].interventions for s in SCENARIOS]
        if np.min(counts[0]) < 0:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(c):.1f}" for c in counts) + " |")
    return "\n".join(lines)


TARGETS = {RECOMMENDED: 2.0, "logadam(auto)": 3.0}  # SPEC 4: % above clean Adam, bad batches
CLEAN_TARGET = 0.5  # SPEC 4: % above clean Adam on clean data (no harm)


def target_report(results: dict) -> str:
    """SPEC section 4 checks: bad batches and clean data against clean Adam, and the clip."""
    reference = results["adam", "clean"].final

    def excess(name: str, scenario: str) -> float:
        return float(np.mean(results[name, scenario].final / reference - 1) * 100)

    lines = [
        "| method | scenario | vs clean Adam | target | met | tuned clip | ahead of clip |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for name, bad_target in TARGETS.items():
        if (name, "clean") not in results:
            continue
        for scenario in SCENARIOS:
            target = CLEAN_TARGET if scenario == "clean" else bad_target
            value, clip = excess(name, scenario), excess(CLIP.name, scenario)
            ahead = "—" if scenario == "clean" else ("yes" if value < clip else "NO")
            lines.append(
                f"| {name} | {scenario} | {value:+.2f} % | ≤ {target:g} % | "
                f"{'yes' if value <= target else 'NO'} | {clip:+.2f} % | {ahead} |"
            )
    return "\n".join(lines)


def step_time_table(timings: dict[str, Timing]) -> str:
    """Per-step training time of each contender and its ratio to Adam's, and compile time."""
    reference = min(
        timings["adam"].step_s, timings.get("adam (again, last)", timings["adam"]).step_s
    )
    lines = ["| method | ms per step | × adam | compile s |", "|---|---:|---:|---:|"]
    for name, timing in timings.items():
        lines.append(
            f"| {name} | {timing.step_s * 1e3:.2f} | {timing.step_s / reference:.3f} | "
            f"{timing.compile_s:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict, names: Sequence[str], bad_steps: np.ndarray, path: str) -> None:
    """Held-out loss of seed 0 over training, one panel per scenario, bad steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = curve_styles(names)
    emphasis = {RECOMMENDED, CLIP.name}  # the recommended chain and the tuned anchor
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(17, 5.2), sharey=True)
    handles = []
    for ax, scenario in zip(axes, SCENARIOS, strict=True):
        for name in names:
            curve = results[name, scenario].curve[0]
            x = (np.arange(len(curve)) + 1) * (len(bad_steps) // len(curve))
            color, ls = style[name]
            lw = 2.6 if name in emphasis else 1.3
            (line,) = ax.plot(x, curve, color=color, ls=ls, lw=lw, label=name)
            if scenario == SCENARIOS[0]:
                handles.append(line)
        if scenario != "clean":
            for step in np.flatnonzero(bad_steps):
                ax.axvline(step, color="red", alpha=0.35, lw=0.8, zorder=0)
        final = results["adam", "clean"].curve[0][-1]
        ax.set_ylim(final * 0.97, final * 1.35)
        ax.set_title(f"{scenario} (seed 0)" + ("" if scenario == "clean" else ", red: bad steps"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 5), fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def run_benchmark(
    steps: int,
    seeds: Sequence[int],
    out_dir: str,
    contenders: Sequence[Contender] = CONTENDERS,
    heldout_windows: int = HELDOUT_WINDOWS,
    quiet: bool = False,
    command: str = "python benchmarks/lm_spike_benchmark.py",
) -> dict:
    """Runs every contender on every scenario; writes the Markdown report and the figure.

    Args:
      steps: training steps per run, a multiple of ``eval_every(steps)``.
      seeds: the seeds (initial parameters, data order, bad steps and bytes).
      out_dir: where ``lm_spike_benchmark.md`` and ``lm_spike_benchmark.png`` go.
      contenders: the methods, ``adam`` first.
      heldout_windows: how many held-out windows give the final loss (a multiple of 64).
      quiet: print nothing.
      command: the command line, for the record.

    Returns:
      ``{(contender, scenario): RunResult over seeds}``, plus ``"markdown"`` and
      ``"figure"`` paths and the chosen ``"clip_threshold"``.
    """
    if steps % eval_every(steps):
        raise ValueError(f"steps must be a multiple of {eval_every(steps)}, got {steps}.")
    start = time.perf_counter()
    corpus = load_stdlib_corpus()
    arrays = corpus_arrays(corpus, heldout_windows)
    n_train = len(corpus.train)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    threshold, sweep = sweep_clip_threshold(arrays, steps, seeds, n_train)
    log(f"clip sweep (clean held-out loss): {sweep}; chosen {threshold:g}")
    results: dict[Any, Any] = {}
    timings: dict[str, Timing] = {}
    runs, labels = make_runs(SCENARIOS, seeds, steps, n_train, (threshold,))
    adam_program = None
    for contender in contenders:
        outcome, timings[contender.name], compiled = train_many(contender, arrays, runs)
        if contender.name == "adam":
            adam_program = compiled
        for scenario in SCENARIOS:
            rows = [i for i, label in enumerate(labels) if label[0] == scenario]
            results[contender.name, scenario] = RunResult(*(a[rows] for a in outcome))
        finals = [f"{np.mean(results[contender.name, s].final):.4f}" for s in SCENARIOS]
        log(f"{contender.name}: {' / '.join(finals)} ({timings[contender.name]})")
    # Adam again, last: the first program to run can be slower; the spread of the two is
    # the timing noise of this run, and the faster one is the reference.
    if adam_program is not None:
        params = initial_params(runs.init_key)
        timings["adam (again, last)"] = Timing(0.0, run_compiled(adam_program, runs, params)[1])
    elapsed = time.perf_counter() - start

    names = [c.name for c in contenders]
    bad_steps = seed_streams(seeds[0], steps, n_train, "random_bytes")["bad"]
    num_params = sum(a.size for a in jax.tree.leaves(init_gpt(jax.random.key(0))))
    num_runs = runs.bad.shape[0]
    seeds_text = f"{len(seeds)} seeds" if len(seeds) > 1 else "1 seed (no spread to show)"
    sweep_text = ", ".join(f"{h:g} → {m:.4f}" for h, m in sweep.items())
    report = "\n".join(
        [
            "# Language-model spike benchmark",
            "",
            f"Held-out loss after {steps} steps, {seeds_text}, relative to clean Adam of "
            "the same seed (mean ± std over seeds of the per-seed ratio; lower is "
            f"better). {BAD_FRACTION:.0%} of the steps ({int(bad_steps.sum())} per run) "
            "train on a bad batch in `repeated_byte` and `random_bytes`.",
            "",
            results_tables(results, names),
            "",
            f"`clip_by_global_norm`: threshold tuned by a sweep on the clean scenario "
            f"(clean held-out loss per threshold: {sweep_text}; chosen: {threshold:g}). "
            "Every other method: defaults, nothing tuned.",
            "",
            "## Targets (SPEC section 4)",
            "",
            "Mean over seeds of the held-out loss relative to clean Adam of the same seed. "
            "Nothing is tuned per scenario.",
            "",
            target_report(results),
            "",
            "## Interventions",
            "",
            "Mean count per run of steps clipped (`clip_by_global_norm`: norm above the "
            'threshold; ZClip), capped (ALRC; with `signal="both"` the caps of both '
            "signals, summed) or skipped (skip-step). The dampening acts on every step "
            "and is not counted.",
            "",
            interventions_table(results, names, steps),
            "",
            "## Whole training-step time",
            "",
            "What a user pays per step: the wall time of each contender's compiled training "
            "program (forward, backward and update of every step, all its runs vmapped; the "
            "held-out evaluation runs afterwards, in a separate program) divided by steps x "
            "runs, and its ratio to Adam's (the faster of Adam's two runs, first and last; "
            "their spread is the noise of the measurement). The contenders run one after "
            f"another, each timed over one run of its program ({steps} steps x {num_runs} "
            f"runs, about {timings['adam'].step_s * steps * num_runs:.0f} s here), so a busy "
            "moment of the machine inflates one contender alone: compare ratios from a quiet "
            "machine and a long run (the committed `--full` results).",
            "",
            step_time_table(timings),
            "",
            "## Setup",
            "",
            f"Corpus: {corpus.description}.  ",
            f"Model: decoder-only transformer, {LAYERS} layers, width {WIDTH}, {HEADS} heads, "
            f"context {CONTEXT}, tied byte embeddings, {num_params:,} parameters; batch "
            f"{BATCH}; Adam, learning rate {LEARNING_RATE:g}, no warm-up.  ",
            f"Held-out loss: {heldout_windows} fixed windows ({heldout_windows * CONTEXT:,} "
            f"predicted bytes); the figure's curve: {CURVE_WINDOWS} of them every "
            f"{eval_every(steps)} steps.  ",
            f"Command: `{command}`  ",
            f"Machine: {machine_line()}  ",
            f"Wall time: {elapsed:.0f} s (everything above, compilation included)",
            "",
        ]
    )
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "lm_spike_benchmark.md")
    png_path = os.path.join(out_dir, "lm_spike_benchmark.png")
    with open(md_path, "w") as f:
        f.write(report)
    plot(results, names, bad_steps, png_path)
    log(report)
    log(f"Wrote {md_path} and {png_path}")
    results.update(markdown=md_path, figure=png_path, clip_threshold=threshold)
    return results


QUICK_STEPS, QUICK_SEEDS = 60, 1  # ~4 min on 2 cores (5 at most), 90 s of it compiling
FULL_STEPS, FULL_SEEDS = 600, 3  # 1500 steps, as in SPEC 1.4: about 2.2 h on 2 cores


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full", action="store_true", help=f"{FULL_STEPS} steps, {FULL_SEEDS} seeds"
    )
    parser.add_argument("--steps", type=int, default=None, help=f"default {QUICK_STEPS}")
    parser.add_argument("--seeds", type=int, default=None, help=f"default {QUICK_SEEDS}")
    parser.add_argument(
        "--heldout-windows",
        type=int,
        default=None,
        help=f"held-out windows, a multiple of 64 (default {QUICK_HELDOUT_WINDOWS}; "
        f"{HELDOUT_WINDOWS} with --full)",
    )
    parser.add_argument("--out", default="results", help="output directory (default results/)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    steps = args.steps or (FULL_STEPS if args.full else QUICK_STEPS)
    num_seeds = args.seeds or (FULL_SEEDS if args.full else QUICK_SEEDS)
    windows = args.heldout_windows or (HELDOUT_WINDOWS if args.full else QUICK_HELDOUT_WINDOWS)
    command = " ".join(["python benchmarks/lm_spike_benchmark.py", *(argv or sys.argv[1:])])
    run_benchmark(
        steps,
        list(range(num_seeds)),
        args.out,
        heldout_windows=windows,
        quiet=args.quiet,
        command=command,
    )


if __name__ == "__main__":
    main()
