"""Spike-protection benchmark: ALRC and log dampening against the alternatives.

Task: image super-sampling on scikit-learn's digits (shipped with the package, no
download), as in the ALRC paper's CIFAR-10 experiment at a smaller scale: a 2x2
average-pooled 4x4 digit goes in, the 8x8 digit (pixels in [0, 1]) comes out, through
a small MLP (16 -> 128 -> 128 -> 64, ReLU) in plain JAX.

Scenarios (each at batch size 1 and 8):

- ``quartic_high_lr``: mean quartic error at an unstably high learning rate (the
  ALRC paper's headline setting);
- ``mse_stable``: mean squared error at a stable learning rate (the "no harm" check);
- ``mse_corrupt``: ``mse_stable`` with 0.5 % of the steps given corrupted targets
  (the batch's targets multiplied by 100, a batch in the wrong units);
- ``mse_high_lr``: mean squared error at an unstably high learning rate.

Contenders share the model, the initial parameters, the data order and the corrupted
steps of each seed. ``clip_by_global_norm`` gets its threshold from a small sweep on
the clean ``mse_stable`` scenario (printed); every other method runs with its
published defaults. The ZClip and skip-step anchors are Optax transforms from
``anchors.py``, shared with the language-model benchmark. Every training run of a
contender is one jitted ``lax.scan``, vmapped over scenarios and seeds.

Usage::

  python benchmarks/spike_benchmark.py            # quick run, about 4 minutes on 2 cores
  python benchmarks/spike_benchmark.py --full     # longer run for publication
  python benchmarks/spike_benchmark.py --steps 500 --seeds 3 --out /tmp/bench

The report and figure go to ``results/`` at the top of the repository, which git
ignores, so a run leaves the clone clean. The committed results are regenerated only
on request: ``--out benchmarks/results`` (quick) or ``--full --out
benchmarks/results/full``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_logdamp as old

from anchors import count_interventions
from contenders import AGC_CLIPPING, Base, build, contender, split_names
from reporting import (
    add_common_flags,
    curve_styles,
    machine_line,
    no_harm_verdict,
    paired_difference,
    smooth,
    summarize,
)

Params = dict[str, jax.Array]

STABLE_LR = 1e-3
HIGH_LR = 1e-1
CORRUPT_FRACTION = 0.005
CORRUPT_FACTOR = 100.0
CLIP_SWEEP = (0.03, 0.1, 0.3, 1.0, 3.0)
HIDDEN = 128


# ----------------------------------------------------------------------------- data


class Data(NamedTuple):
    """Train and test split of the super-sampling task (float32 arrays)."""

    x_train: jax.Array  # shape=(n_train, 16): 4x4 inputs
    y_train: jax.Array  # shape=(n_train, 64): 8x8 targets
    x_test: jax.Array  # shape=(n_test, 16)
    y_test: jax.Array  # shape=(n_test, 64)


def load_digits_supersampling(test_fraction: float = 0.2) -> Data:
    """The digits as 4x4 -> 8x8 super-sampling pairs, split once with a fixed seed.

    Args:
      test_fraction: the share of the 1797 images held out for the test error.

    Returns:
      A :class:`Data` with pixels scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    small = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    large = images.reshape(-1, 64)
    order = np.random.default_rng(0).permutation(len(images))
    n_test = round(test_fraction * len(images))
    test, train = order[:n_test], order[n_test:]
    return Data(*(jnp.asarray(a) for a in (small[train], large[train], small[test], large[test])))


# ---------------------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: Sequence[int] = (16, HIDDEN, HIDDEN, 64)) -> Params:
    """He-normal weights and zero biases for an MLP with the given layer sizes."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(k, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,))
    return params


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """ReLU MLP; the last layer is linear."""
    num_layers = len(params) // 2
    for i in range(num_layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            x = jax.nn.relu(x)
    return x


def per_example_losses(params: Params, x, y, quartic: jax.Array) -> jax.Array:
    """Mean squared (``quartic == 0``) or mean quartic (``quartic == 1``) error per example."""
    squared = jnp.square(mlp(params, x) - y)
    return jnp.mean(squared * jnp.where(quartic > 0, squared, 1.0), axis=-1)


# ---------------------------------------------------------------------- contenders


# The registry names (``contenders.py``) this benchmark runs, with plain Adam as the base.
CONTENDERS: tuple[str, ...] = (
    "base",
    "tuned clip",
    "adaptive_grad_clip",
    "zclip",
    "skip-step",
    "log_dampen",
    "alrc",
    "alrc + log_dampen",
    "alrc(grad_norm)",
    "log_dampen(auto)",
    "alrc(both) + log_dampen(auto)",
    "spike_guard",
    "alrc_per_example",
)


def min_batch(name: str) -> int:
    """The smallest batch a contender runs at: per-example ALRC needs two examples."""
    return 2 if contender(name).per_example else 1


# ----------------------------------------------------------------------- scenarios


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A training setting: loss, learning rate and whether batches get corrupted."""

    name: str
    quartic: bool
    learning_rate: float
    corrupt: bool


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("quartic_high_lr", quartic=True, learning_rate=HIGH_LR, corrupt=False),
    Scenario("mse_stable", quartic=False, learning_rate=STABLE_LR, corrupt=False),
    Scenario("mse_corrupt", quartic=False, learning_rate=STABLE_LR, corrupt=True),
    Scenario("mse_high_lr", quartic=False, learning_rate=HIGH_LR, corrupt=False),
)


class Runs(NamedTuple):
    """One row per training run (scenario x seed), the leading axis of every field."""

    init_key: jax.Array  # shape=(R, 2), uint32: parameter initialisation
    batches: jax.Array  # shape=(R, steps, batch), int32: training indices per step
    corrupt: jax.Array  # shape=(R, steps), bool: steps whose targets are corrupted
    quartic: jax.Array  # shape=(R,), float32: 1 for the quartic loss
    learning_rate: jax.Array  # shape=(R,), float32
    hyper: jax.Array  # shape=(R,), float32: the contender's hyperparameter, if any


def seed_streams(seed: int, steps: int, batch: int, n_train: int):
    """Initial-parameter key, data order and corrupted steps of one seed (all contenders)."""
    rng = np.random.default_rng(1000 + seed)
    batches = rng.integers(0, n_train, size=(steps, batch), dtype=np.int32)
    num_bad = max(1, round(CORRUPT_FRACTION * steps))
    corrupt = np.zeros(steps, bool)
    corrupt[rng.choice(steps, size=num_bad, replace=False)] = True
    return np.asarray(jax.random.key_data(jax.random.key(seed))), batches, corrupt


def make_runs(
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    steps: int,
    batch: int,
    n_train: int,
    hypers: Sequence[float] = (0.0,),
) -> tuple[Runs, list[tuple[str, int, float]]]:
    """All (scenario, hyperparameter, seed) runs of one batch size, and their labels."""
    rows, labels = [], []
    for scenario in scenarios:
        for hyper in hypers:
            for seed in seeds:
                key, batches, corrupt = seed_streams(seed, steps, batch, n_train)
                rows.append(
                    (
                        key,
                        batches,
                        corrupt & scenario.corrupt,
                        np.float32(scenario.quartic),
                        np.float32(scenario.learning_rate),
                        np.float32(hyper),
                    )
                )
                labels.append((scenario.name, seed, hyper))
    stacked = [jnp.asarray(np.stack(column)) for column in zip(*rows, strict=True)]
    return Runs(*stacked), labels


# ------------------------------------------------------------------------ training


def train_one(name: str, data: Data, run: Runs) -> tuple[jax.Array, ...]:
    """One full training run (traced; vmapped over runs by :func:`train_many`).

    Returns:
      The training loss of every step (the raw batch loss, before any capping), the
      final test mean squared error and the count of interventions (or -1).
    """
    params = init_mlp(jax.random.wrap_key_data(run.init_key))
    tx = build(name, Base(run.learning_rate), run.hyper)
    per_example = contender(name).per_example
    opt_state = tx.init(params)

    def step(carry, inputs):
        params, opt_state = carry
        indices, bad = inputs
        x, y = data.x_train[indices], data.y_train[indices]
        y = jnp.where(bad, CORRUPT_FACTOR * y, y)

        def loss_fn(p):
            losses = per_example_losses(p, x, y, run.quartic)
            if per_example:
                return old.cap_losses(losses, opt_state).mean(), losses
            return losses.mean(), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        value = losses if per_example else losses.mean()
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return (optax.apply_updates(params, updates), opt_state), losses.mean()

    (params, opt_state), train_losses = lax.scan(
        step, (params, opt_state), (run.batches, run.corrupt)
    )
    test_mse = jnp.mean(jnp.square(mlp(params, data.x_test) - data.y_test))
    return train_losses, test_mse, count_interventions(opt_state)


def train_many(name: str, data: Data, runs: Runs) -> tuple[np.ndarray, ...]:
    """All runs of one contender at one batch size: one compiled, vmapped scan.

    Returns:
      Training losses ``(R, steps)``, final test MSE ``(R,)`` and interventions ``(R,)``.
    """
    fn = jax.jit(jax.vmap(lambda run: train_one(name, data, run)))
    return tuple(np.asarray(a) for a in fn(runs))


# ------------------------------------------------------------------------ analysis


def markdown_table(
    results: dict, batch_sizes: Sequence[int], contender_names: Sequence[str]
) -> str:
    """Final test MSE (mean ± std over seeds): contenders x scenarios, one block per batch."""
    lines = []
    for batch in batch_sizes:
        header = [f"batch {batch}"] + [s.name for s in SCENARIOS]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name in contender_names:
            if (name, batch, SCENARIOS[0].name) not in results:
                continue
            cells = [summarize(results[name, batch, s.name]) for s in SCENARIOS]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


TARGET_METHODS = (
    "base",
    "alrc",
    "alrc + log_dampen",
    "alrc_per_example",
    "alrc(grad_norm)",
    "log_dampen(auto)",
    "alrc(both) + log_dampen(auto)",
    "spike_guard",
)


def target_report(results: dict, batch_sizes: Sequence[int], names: Sequence[str]) -> str:
    """The targets: corrupted vs clean within 2 %, clean vs Adam within noise."""
    lines = [
        "| batch | method | corrupt / clean, same method | corrupt / clean Adam | "
        "within 2 % | clean − Adam (paired mean ± se) | no harm |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in batch_sizes:
        adam_clean = results["base", batch, "mse_stable"]
        for name in names:
            if (name, batch, "mse_stable") not in results:
                continue
            clean = results[name, batch, "mse_stable"]
            corrupt = results[name, batch, "mse_corrupt"]
            ratio = float(np.mean(corrupt) / np.mean(clean))
            ratio_adam = float(np.mean(corrupt) / np.mean(adam_clean))
            diff, stderr = paired_difference(clean, adam_clean)
            verdict = "—" if name == "base" else no_harm_verdict(diff, stderr)
            lines.append(
                f"| {batch} | {name} | {ratio:.4f} | {ratio_adam:.4f} | "
                f"{'yes' if ratio <= 1.02 else 'NO'} | {diff:+.5f} ± {stderr:.5f} | {verdict} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figure


def plot(curves: dict, results: dict, batch_sizes, contender_names, path: str) -> None:
    """Training-loss curves (seed 0, log scale) per scenario and batch, and final errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = curve_styles(contender_names)
    nrows = len(batch_sizes) + 1
    fig, axes = plt.subplots(nrows, len(SCENARIOS), figsize=(18, 4.2 * nrows), squeeze=False)
    for row, batch in enumerate(batch_sizes):
        for col, scenario in enumerate(SCENARIOS):
            ax = axes[row, col]
            for name in contender_names:
                curve = curves.get((name, batch, scenario.name))
                if curve is None:
                    continue
                width = max(1, len(curve) // 250)
                x, y = smooth(np.where(np.isfinite(curve), curve, np.nan), width)
                ax.plot(x, y, lw=0.9, color=style[name][0], ls=style[name][1], label=name)
            ax.set_yscale("log")
            ax.set_title(f"{scenario.name}, batch {batch} (seed 0)", fontsize=10)
            ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel("training loss")
    for col, scenario in enumerate(SCENARIOS):
        ax = axes[-1, col]
        width = 0.8 / len(batch_sizes)
        for i, batch in enumerate(batch_sizes):
            names = [n for n in contender_names if (n, batch, scenario.name) in results]
            means = [np.nanmean(results[n, batch, scenario.name]) for n in names]
            stds = [np.nanstd(results[n, batch, scenario.name]) for n in names]
            pos = [
                contender_names.index(n) + (i - (len(batch_sizes) - 1) / 2) * width for n in names
            ]
            ax.bar(pos, means, width, yerr=stds, label=f"batch {batch}", alpha=0.8)
        ax.set_xticks(range(len(contender_names)))
        ax.set_xticklabels(contender_names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{scenario.name}: final test MSE", fontsize=10)
        ax.legend(fontsize=7)
    handles, labels = axes[len(batch_sizes) - 1, 0].get_legend_handles_labels()  # every method
    ncol = 7
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=10, frameon=False)
    legend_rows = -(-len(labels) // ncol)  # the legend's height, above the panels' titles
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.22 * legend_rows + 0.2) / (4.2 * nrows)))
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def intervention_table(interventions: dict, batch_sizes: Sequence[int], names) -> str:
    """Mean count per run of capped losses / clipped norms / skipped steps."""
    lines = ["| batch | method | " + " | ".join(s.name for s in SCENARIOS) + " |"]
    lines.append("|" + "---|" * (len(SCENARIOS) + 2))
    for batch in batch_sizes:
        for name in names:
            counts = [interventions.get((name, batch, s.name)) for s in SCENARIOS]
            if counts[0] is None or np.min(counts[0]) < 0:
                continue
            cells = [f"{np.mean(c):.1f}" for c in counts]
            lines.append(f"| {batch} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(
    results, interventions, sweeps, thresholds, steps, num_seeds, batch_sizes, command
) -> str:
    """The Markdown report: results, tuning, interventions, targets, machine."""
    names = list(dict.fromkeys(key[0] for key in results))  # in the order they ran
    sweep_text = "; ".join(
        f"batch {b}: "
        + ", ".join(f"{h:g} → {m:.5f}" for h, m in sweeps[b].items())
        + f" (chosen: {thresholds[b]:g})"
        for b in batch_sizes
    )
    return "\n".join(
        [
            "# Spike-protection benchmark",
            "",
            f"Final held-out (test) MSE, mean ± std over {num_seeds} seeds, after {steps} "
            "steps. Lower is better. Names are those of `contenders.py`: `base` is Adam at "
            "the scenario's learning rate, and every other method is that defence in front "
            "of it (`log_dampen` in front of Adam is `logadam`; `tuned clip` is "
            "`clip_by_global_norm` with a swept threshold).",
            f"Learning rates: stable {STABLE_LR:g}, high {HIGH_LR:g}; {CORRUPT_FRACTION:.1%} "
            f"of the steps in `mse_corrupt` have their targets multiplied by {CORRUPT_FACTOR:g}.",
            "",
            markdown_table(results, batch_sizes, names),
            "`clip_by_global_norm`: threshold tuned by a sweep on clean `mse_stable` "
            f"(test MSE per threshold): {sweep_text}. "
            f"`adaptive_grad_clip`: clipping = {AGC_CLIPPING:g}. All other methods: "
            "defaults, nothing tuned.",
            "",
            "## Interventions",
            "",
            "Mean count per run of losses capped (ALRC; examples for `alrc_per_example`), "
            "norms clipped (ZClip) or steps skipped (skip-step).",
            "",
            intervention_table(interventions, batch_sizes, names),
            "",
            "## Targets",
            "",
            target_report(
                results,
                batch_sizes,
                [n for n in names if n in TARGET_METHODS or n.startswith("spike_guard")],
            ),
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine_line()}  ",
            "",
        ]
    )


def sweep_clip_threshold(data: Data, steps: int, batch: int, seeds: Sequence[int]) -> tuple:
    """The clip_by_global_norm threshold with the lowest clean test error, and the sweep."""
    clean = [s for s in SCENARIOS if s.name == "mse_stable"]
    runs, labels = make_runs(clean, seeds, steps, batch, len(data.x_train), CLIP_SWEEP)
    _, test_mse, _ = train_many("tuned clip", data, runs)
    by_threshold = {h: [] for h in CLIP_SWEEP}
    for (_, _, hyper), value in zip(labels, test_mse, strict=True):
        by_threshold[hyper].append(value)
    means = {h: float(np.mean(v)) for h, v in by_threshold.items()}
    means = {h: (m if np.isfinite(m) else np.inf) for h, m in means.items()}
    best = min(means, key=means.get)
    return best, means


def run_benchmark(
    steps: int,
    seeds: Sequence[int],
    batch_sizes: Sequence[int],
    out_dir: str,
    quiet: bool = False,
    command: str = "python benchmarks/spike_benchmark.py",
    contenders: Sequence[str] = CONTENDERS,
) -> dict:
    """Runs every contender on every scenario; writes the Markdown table and the figure.

    Args:
      steps: training steps per run.
      seeds: the seeds (parameter initialisation, data order, corrupted steps).
      batch_sizes: the batch sizes to run.
      out_dir: where ``spike_benchmark.md`` and ``spike_benchmark.png`` go.
      quiet: print nothing (no progress bar, no table).
      command: the command line, for the record.
      contenders: the registry names to run (``base`` first).

    Returns:
      ``{(contender, batch, scenario): final test MSE per seed}``, plus the paths
      under the keys ``"markdown"`` and ``"figure"``.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    data = load_digits_supersampling()
    names = list(contenders)
    jobs = [(c, b) for b in batch_sizes for c in names if b >= min_batch(c)]
    results, curves, interventions, thresholds, sweeps = {}, {}, {}, {}, {}
    with tqdm(total=len(jobs) + len(batch_sizes), disable=quiet, desc="spike benchmark") as bar:
        for batch in batch_sizes:
            bar.set_postfix_str(f"clip sweep, batch {batch}")
            thresholds[batch], sweeps[batch] = sweep_clip_threshold(data, steps, batch, seeds)
            bar.update()
            for contender in [c for c, b in jobs if b == batch]:
                bar.set_postfix_str(f"{contender}, batch {batch}")
                runs, labels = make_runs(
                    SCENARIOS, seeds, steps, batch, len(data.x_train), (thresholds[batch],)
                )
                losses, test_mse, counts = train_many(contender, data, runs)
                for scenario in SCENARIOS:
                    rows = [i for i, lab in enumerate(labels) if lab[0] == scenario.name]
                    key = (contender, batch, scenario.name)
                    results[key] = test_mse[rows]
                    curves[key] = losses[rows[0]]
                    interventions[key] = counts[rows]
                bar.update()
    elapsed = time.perf_counter() - start

    report = format_report(
        results, interventions, sweeps, thresholds, steps, len(seeds), batch_sizes, command
    )
    report += f"Wall time: {elapsed:.0f} s (all of the above, compilation included)\n"
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "spike_benchmark.md")
    png_path = os.path.join(out_dir, "spike_benchmark.png")
    with open(md_path, "w") as f:
        f.write(report)
    plot(curves, results, batch_sizes, names, png_path)
    if not quiet:
        print(report)
        print(f"Wrote {md_path} and {png_path}")
    results["markdown"], results["figure"] = md_path, png_path
    return results


QUICK_STEPS, QUICK_SEEDS = 2000, 3
FULL_STEPS, FULL_SEEDS = 10000, 5


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, QUICK_STEPS, QUICK_SEEDS, FULL_STEPS, FULL_SEEDS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma-separated registry names to run (default: all of CONTENDERS); base first",
    )
    args = parser.parse_args(argv)
    names = CONTENDERS
    if args.contenders:
        names = ("base", *(n for n in split_names(args.contenders) if n != "base"))
    steps = args.steps or (FULL_STEPS if args.full else QUICK_STEPS)
    num_seeds = args.seeds or (FULL_SEEDS if args.full else QUICK_SEEDS)
    command = " ".join(["python benchmarks/spike_benchmark.py", *(argv or sys.argv[1:])])
    run_benchmark(
        steps,
        list(range(num_seeds)),
        args.batch_sizes,
        args.out,
        args.quiet,
        command.strip(),
        names,
    )


if __name__ == "__main__":
    main()
