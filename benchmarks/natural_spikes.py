"""Spikes nobody injected: where training spikes by itself, and what each defence does.

Every other benchmark here injects its spikes (bad batches, corrupted targets, a scaled
loss). This one looks for the spikes training makes on its own, and measures the
defences there.

1. ``--part lm``: the byte-level language model of ``lm_spike_benchmark.py`` at 1x to
   30x its learning rate, with plain Adam (b2 0.999) and with the standard recipe
   without weight decay (the model has no qk-layernorm). Spikes counted by that
   benchmark's rule and by this script's.
2. ``--part slingshot`` (the default): Adam's own spikes (Thilak et al. 2022, the
   "slingshot"; Bai et al. 2025): an MLP (64 -> 256 -> 256 -> 10, ReLU) classifying
   scikit-learn's digits from 256 training images, full batch, cross-entropy, Adam
   (b2 0.999) at 1e-3 without weight decay, for 20 000 steps. Once the training loss
   has fallen to ~1e-9 the gradient is tiny, Adam's second moment decays with it, and
   the next gradient of ordinary size makes a step far larger than usual: the loss
   jumps by many orders of magnitude, again and again. Every contender is measured
   there, and over learning rates 1x to 10x (Wortsman et al.'s LR sensitivity).

A spike (:func:`reporting.count_spikes`): a step whose training loss is above 10x the
median of the 100 steps before it and above 1e-3 (the floor keeps a loss of 1e-9
rising to 1e-8 out of the count); consecutive steps count once.

Usage::

  python benchmarks/natural_spikes.py                     # slingshot, 3 seeds (~15 min)
  python benchmarks/natural_spikes.py --part lm           # the LM's rates (~5 min)
  python benchmarks/natural_spikes.py --part both --out benchmarks/results/natural_spikes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from anchors import count_interventions
from contenders import Base, build
from reporting import (
    ROOT,
    command_line,
    count_spikes,
    curve_styles,
    logger,
    markdown_table,
    paired_difference,
    pyplot,
    section,
    smooth,
    summarize,
    write_report_and_record,
)

TRAIN = 256  # training images: few, so that the loss falls to ~0
HIDDEN = 256
LEARNING_RATE = 1e-3
B2 = 0.999
STEPS = 20_000
SEEDS = 3
SPIKE_FLOOR = 1e-3
RATE_MULTIPLES = (1.0, 3.0, 10.0)
CLIP = 1.0  # the clip runs at the usual threshold

# Registry names (``contenders.py``) on Adam (b2 0.999); ``tuned clip`` at CLIP.
CONTENDERS: tuple[str, ...] = (
    "base",
    "spike_guard",
    "spike_guard (on the update)",
    "tuned clip",
    "zclip",
    "skip-step",
    "adagc",
    "spam",
    "update clipping",
)
RATE_CONTENDERS: tuple[str, ...] = ("base", "spike_guard", "spike_guard (on the update)")
LABELS = {"base": "Adam", "tuned clip": f"clip_by_global_norm({CLIP:g})"}


# --------------------------------------------------------------------------- slingshot


class Digits(NamedTuple):
    x_train: jax.Array  # shape=(256, 64): pixels in [0, 1]
    y_train: jax.Array  # shape=(256,), int32
    x_test: jax.Array  # shape=(1541, 64): every other image
    y_test: jax.Array


def load_digits() -> Digits:
    """256 training images drawn once (fixed generator), the other 1541 held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    x = (digits.data / 16).astype(np.float32)
    y = digits.target.astype(np.int32)
    train, test = order[:TRAIN], order[TRAIN:]
    return Digits(*(jnp.asarray(a) for a in (x[train], y[train], x[test], y[test])))


def init_mlp(key: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    sizes = (64, HIDDEN, HIDDEN, 10)
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) * np.sqrt(2 / a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x: jax.Array) -> jax.Array:
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(params, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


class Trained(NamedTuple):
    train_loss: Any  # shape=(steps,)
    update_norm: Any  # shape=(steps,): the global norm of each step's parameter change
    test_loss: Any  # shape=()
    test_accuracy: Any  # shape=()
    interventions: Any  # shape=(): steps a defence acted on (-1: not counted)


def train_one(name: str, data: Digits, steps: int, learning_rate: float, seed: jax.Array):
    params = init_mlp(jax.random.fold_in(jax.random.key(0), seed))
    tx = build(name, Base(learning_rate, b2=B2), CLIP)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(cross_entropy)(params, data.x_train, data.y_train)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(updates))

    (params, opt_state), (losses, norms) = lax.scan(
        step, (params, tx.init(params)), None, length=steps
    )
    logits = mlp(params, data.x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == data.y_test)
    test_loss = optax.softmax_cross_entropy_with_integer_labels(logits, data.y_test).mean()
    return Trained(losses, norms, test_loss, accuracy, count_interventions(opt_state))


def train_seeds(name: str, data: Digits, steps: int, rate: float, seeds: Sequence[int]):
    """Every seed of one contender at one rate: one compiled, vmapped scan."""
    run = jax.jit(jax.vmap(lambda s: train_one(name, data, steps, rate, s)))
    return Trained(*(np.asarray(f) for f in run(jnp.asarray(seeds))))


def spikes_of(trained: Trained) -> np.ndarray:
    return np.array([count_spikes(c, floor=SPIKE_FLOOR) for c in trained.train_loss])


def peaks(trained: Trained) -> np.ndarray:
    """Per run: the highest training loss after the first 1000 steps (how high it
    spiked); after the first half in a run of fewer than 2000 steps."""
    losses = np.where(np.isfinite(trained.train_loss), trained.train_loss, np.inf)
    return losses[:, min(1000, losses.shape[1] // 2) :].max(axis=1)


def spike_steps(trained: Trained) -> np.ndarray:
    """Steps with a training loss above the floor after the first 1000 (in spikes)."""
    return np.sum(trained.train_loss[:, 1000:] > SPIKE_FLOOR, axis=1)


def slingshot_table(results: dict, names: Sequence[str]) -> str:
    base = results["base", 1.0]
    rows = []
    for name in names:
        t = results[name, 1.0]
        diff, stderr = paired_difference(t.test_loss, base.test_loss)
        rows.append(
            [
                LABELS.get(name, f"`{name}`"),
                f"{np.mean(spikes_of(t)):.1f}",
                f"{np.mean(spike_steps(t)):.0f}",
                ", ".join(f"{p:.2g}" for p in peaks(t)),
                summarize(t.test_loss),
                "" if name == "base" else f"{diff:+.3f} ± {stderr:.3f}",
                summarize(t.test_accuracy),
                "" if np.min(t.interventions) < 0 else f"{np.mean(t.interventions):.0f}",
            ]
        )
    header = [
        "method",
        "spikes per run",
        "steps above 1e-3",
        "highest loss after step 1000 (per seed)",
        "held-out loss",
        "vs Adam (paired ± SE)",
        "held-out accuracy",
        "steps acted on",
    ]
    return markdown_table(header, rows)


def rates_table(results: dict, names: Sequence[str], loss_at_init: float) -> str:
    """Final held-out loss per rate, spikes per run, and Wortsman et al.'s sensitivity."""
    rows = []
    for name in names:
        finals = np.stack([results[name, m].test_loss for m in RATE_MULTIPLES])  # (rates, seeds)
        finals = np.where(np.isfinite(finals), finals, np.inf)
        capped = np.minimum(finals, loss_at_init)
        sensitivity = capped.mean(axis=0) - capped.min(axis=0)
        cells = [
            f"{summarize(results[name, m].test_loss)} ({np.mean(spikes_of(results[name, m])):.1f})"
            for m in RATE_MULTIPLES
        ]
        rows.append([LABELS.get(name, f"`{name}`"), *cells, summarize(sensitivity)])
    header = [
        "method",
        *(f"{m:g}x: held-out loss (spikes)" for m in RATE_MULTIPLES),
        "LR sensitivity",
    ]
    return markdown_table(header, rows)


def run_slingshot(steps: int, seeds: list[int], log) -> tuple[dict, Digits]:
    data = load_digits()
    results = {}
    for name in CONTENDERS:
        for multiple in RATE_MULTIPLES if name in RATE_CONTENDERS else (1.0,):
            start = time.perf_counter()
            results[name, multiple] = train_seeds(
                name, data, steps, LEARNING_RATE * multiple, seeds
            )
            log(f"slingshot, {multiple:g}x: {name} in {time.perf_counter() - start:.0f} s")
    return results, data


def plot_slingshot(results: dict, names: Sequence[str], path: str) -> None:
    """Seed 0's training loss: Adam against each placement of the guard, side by side."""
    plt = pyplot()
    guards = [n for n in ("spike_guard", "spike_guard (on the update)") if (n, 1.0) in results]
    fig, axes = plt.subplots(1, len(guards), figsize=(7 * len(guards), 4.5), squeeze=False)
    styles = curve_styles(names)
    for ax, guard in zip(axes[0], guards, strict=True):
        for name in ("base", guard):
            losses = results[name, 1.0].train_loss[0]
            color, style = styles[name]
            ax.plot(
                *smooth(losses, 20), style, color=color, label=LABELS.get(name, name), linewidth=1
            )
            spikes = np.flatnonzero((losses[1:] > SPIKE_FLOOR) & (losses[:-1] <= SPIKE_FLOOR))
            ax.plot(spikes, losses[spikes + 1], "v", color=color, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (20-step means)")
        ax.set_title("seed 0; triangles: where the loss crosses 1e-3 upward")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- LM


LM_MULTIPLES = (1.0, 3.0, 10.0, 30.0)


def run_lm(steps: int, seeds: list[int], log) -> list[list[str]]:
    """The LM at 1x-30x its rate, plain Adam and the standard recipe without weight
    decay: the final held-out loss and the spikes of both rules, per rate."""
    import lm_spike_benchmark as lm

    class NoDecay(lm.Recipe):
        def base(self, learning_rate, steps):
            return dataclasses.replace(super().base(learning_rate, steps), weight_decay=0.0)

    standard = lm.RECIPES["standard"]
    recipes = {
        "plain Adam (b2 0.999)": lm.RECIPES["adam"],
        "standard recipe, no weight decay": NoDecay(
            **{f.name: getattr(standard, f.name) for f in dataclasses.fields(standard)}
        ),
    }
    corpus = lm.load_stdlib_corpus()
    arrays = lm.corpus_arrays(corpus, lm.QUICK_HELDOUT_WINDOWS)
    scenarios = []
    for multiple in LM_MULTIPLES:
        name = f"lr x{multiple:g}"
        lm.SCENARIOS.setdefault(name, lm.Scenario(name, lr_multiple=multiple))
        scenarios.append(name)
    rows = []
    for title, recipe in recipes.items():
        runs, labels = lm.make_runs(scenarios, seeds, steps, len(corpus.train), recipe.peak_lr)
        start = time.perf_counter()
        result, _ = lm.train_many("base", recipe, arrays, runs)
        log(f"LM, {title}: {time.perf_counter() - start:.0f} s")
        none = np.zeros((1, steps), bool)
        for scenario in scenarios:
            idx = [i for i, label in enumerate(labels) if label.scenario == scenario]
            one = lambda i, r=result: jax.tree.map(lambda a: a[i : i + 1], r)  # noqa: E731
            theirs = [int(lm.natural_spikes(one(i), none)[0]) for i in idx]
            ours = [count_spikes(result.train_loss[i], floor=SPIKE_FLOOR) for i in idx]
            rows.append(
                [
                    title,
                    scenario.replace("lr ", ""),
                    summarize(result.final[idx]),
                    f"{np.mean(theirs):.1f}",
                    f"{np.mean(ours):.1f}",
                    f"{np.max(result.grad_norm[idx]):.3g}",
                ]
            )
    return rows


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("slingshot", "lm", "both"), default="slingshot")
    parser.add_argument("--steps", type=int, default=None, help=f"default {STEPS} (LM: 1500)")
    parser.add_argument("--seeds", type=int, default=None, help=f"default {SEEDS} (LM: 1)")
    parser.add_argument("--out", default=str(ROOT / "results"), help="report directory")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    log = logger(args.quiet)
    os.makedirs(args.out, exist_ok=True)
    lines = ["# Natural spikes", ""]
    record: dict[str, Any] = {}
    start = time.perf_counter()
    if args.part in ("lm", "both"):
        steps, seeds = args.steps or 1500, list(range(args.seeds or 1))
        rows = run_lm(steps, seeds, log)
        header = [
            "recipe",
            "rate",
            "held-out loss",
            "spikes (1.5x median of 50)",
            "spikes (10x median of 100)",
            "largest gradient norm",
        ]
        lines += section(
            "The language model at 1x-30x its rate",
            f"{steps} steps, seeds {seeds}; the rate is a multiple of the recipe's (plain "
            "Adam 1e-3, the standard recipe's peak 1e-2).",
            markdown_table(header, rows),
        )
        record["lm"] = rows
    if args.part in ("slingshot", "both"):
        steps, seeds = args.steps or STEPS, list(range(args.seeds or SEEDS))
        results, data = run_slingshot(steps, seeds, log)
        loss_at_init = float(
            np.mean(
                [
                    cross_entropy(
                        init_mlp(jax.random.fold_in(jax.random.key(0), s)), data.x_test, data.y_test
                    )
                    for s in seeds
                ]
            )
        )
        lines += section(
            "Adam's own spikes: the slingshot",
            f"{steps} steps, seeds {seeds}, Adam (b2 {B2}) at {LEARNING_RATE:g}, full batch of "
            f"{TRAIN} digits, no weight decay.",
            slingshot_table(results, CONTENDERS),
            "Over learning rates (held-out loss, mean ± std; spikes per run in parentheses; "
            "LR sensitivity: the mean over the rates of min(loss, loss at init) minus the "
            "best, per seed):",
            rates_table(results, RATE_CONTENDERS, loss_at_init),
            "![Training loss](slingshot.png)",
        )
        plot_slingshot(results, CONTENDERS, os.path.join(args.out, "slingshot.png"))
        record["slingshot"] = {
            f"{n} | {m:g}x": {
                "test_loss": t.test_loss.tolist(),
                "spikes": spikes_of(t).tolist(),
                "steps_above_floor": spike_steps(t).tolist(),
                "peak": peaks(t).tolist(),
            }
            for (n, m), t in results.items()
        }
    path = os.path.join(args.out, "natural_spikes.md")
    command = command_line("natural_spikes.py", argv)
    write_report_and_record(lines, record, path, command, time.perf_counter() - start)
    log(f"report: {path}")


if __name__ == "__main__":
    main()
