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

The script reads top to bottom: data, model, contenders, scenarios, training, report,
main. What it shares with ``lm_spike_benchmark.py`` (flags, seeds, stacked runs, the
sweep, tables, verdicts, the machine) is in ``reporting.py``.

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
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_logdamp as old

from anchors import count_interventions
from contenders import AGC_CLIPPING, Base, build, contender
from reporting import (
    Label,
    add_common_flags,
    base_first,
    best_of_sweep,
    command_line,
    count_cell,
    curve_styles,
    init_key,
    markdown_table,
    met,
    method_rows,
    no_harm_verdict,
    paired_difference,
    pyplot,
    record_lines,
    rows_by_scenario,
    section,
    seed_rng,
    smooth,
    stack_runs,
    steps_and_seeds,
    summarize,
    sweep_text,
    write_report,
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
    return Data(
        x_train=jnp.asarray(small[train]),
        y_train=jnp.asarray(large[train]),
        x_test=jnp.asarray(small[test]),
        y_test=jnp.asarray(large[test]),
    )


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
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


class Runs(NamedTuple):
    """One row per training run (scenario x seed), the leading axis of every field."""

    init_key: jax.Array  # shape=(R, 2), uint32: parameter initialisation
    batches: jax.Array  # shape=(R, steps, batch), int32: training indices per step
    corrupt: jax.Array  # shape=(R, steps), bool: steps whose targets are corrupted
    quartic: jax.Array  # shape=(R,), float32: 1 for the quartic loss
    learning_rate: jax.Array  # shape=(R,), float32
    hyper: jax.Array  # shape=(R,), float32: the contender's hyperparameter, if any


def seed_streams(seed: int, steps: int, batch: int, n_train: int) -> dict[str, np.ndarray]:
    """Initial-parameter key, data order and corrupted steps of one seed (all contenders)."""
    rng = seed_rng(seed, offset=1000)
    batches = rng.integers(0, n_train, size=(steps, batch), dtype=np.int32)
    num_bad = max(1, round(CORRUPT_FRACTION * steps))
    corrupt = np.zeros(steps, bool)
    corrupt[rng.choice(steps, size=num_bad, replace=False)] = True
    return {"init_key": init_key(seed), "batches": batches, "corrupt": corrupt}


def make_runs(
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    steps: int,
    batch: int,
    n_train: int,
    hypers: Sequence[float] = (0.0,),
) -> tuple[Runs, list[Label]]:
    """All (scenario, hyperparameter, seed) runs of one batch size, and their labels."""

    def row(scenario: Scenario, label: Label) -> dict[str, Any]:
        stream = seed_streams(label.seed, steps, batch, n_train)
        return dict(
            stream,
            corrupt=stream["corrupt"] & scenario.corrupt,
            quartic=np.float32(scenario.quartic),
            learning_rate=np.float32(scenario.learning_rate),
            hyper=np.float32(label.hyper),
        )

    return stack_runs(Runs, scenarios, seeds, row, hypers=hypers)


# ------------------------------------------------------------------------ training


class Trained(NamedTuple):
    """What the runs of a contender record (leading axis R once vmapped)."""

    train_loss: Any  # shape=(steps,): the raw batch loss of every step, before any capping
    test_mse: Any  # shape=(): the final test mean squared error
    interventions: Any  # shape=(): capped losses, clipped norms or skipped steps (-1: none)


def train_one(name: str, data: Data, run: Runs) -> Trained:
    """One full training run (traced; vmapped over runs by :func:`train_many`)."""
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
    return Trained(
        train_loss=train_losses, test_mse=test_mse, interventions=count_interventions(opt_state)
    )


def train_many(name: str, data: Data, runs: Runs) -> Trained:
    """All runs of one contender at one batch size: one compiled, vmapped scan."""
    trained = jax.jit(jax.vmap(lambda run: train_one(name, data, run)))(runs)
    return Trained(*(np.asarray(field) for field in trained))


def sweep_clip_threshold(
    data: Data, steps: int, batch: int, seeds: Sequence[int]
) -> tuple[float, dict[float, float]]:
    """The clip_by_global_norm threshold with the lowest clean test error, and the sweep."""
    clean = [s for s in SCENARIOS if s.name == "mse_stable"]
    runs, labels = make_runs(clean, seeds, steps, batch, len(data.x_train), CLIP_SWEEP)
    return best_of_sweep(labels, train_many("tuned clip", data, runs).test_mse, "hyper")


@dataclasses.dataclass
class Measured:
    """What the report is written from; results are keyed ``(contender, batch, scenario)``."""

    steps: int
    seeds: list[int]
    batch_sizes: list[int]
    results: dict = dataclasses.field(default_factory=dict)  # final test MSE per seed
    curves: dict = dataclasses.field(default_factory=dict)  # seed 0's training loss
    interventions: dict = dataclasses.field(default_factory=dict)  # per seed
    thresholds: dict = dataclasses.field(default_factory=dict)  # {batch: the tuned clip's}
    sweeps: dict = dataclasses.field(default_factory=dict)  # {batch: {threshold: clean MSE}}
    command: str = ""
    elapsed: float = 0.0  # seconds, compilation included


def train_contender(name: str, batch: int, data: Data, measured: Measured) -> None:
    """Every scenario and seed of one contender at one batch size, into ``measured``."""
    runs, labels = make_runs(
        SCENARIOS,
        measured.seeds,
        measured.steps,
        batch,
        len(data.x_train),
        (measured.thresholds[batch],),
    )
    trained = train_many(name, data, runs)
    for scenario, rows in rows_by_scenario(labels, SCENARIO_NAMES).items():
        key = (name, batch, scenario)
        measured.results[key] = trained.test_mse[rows]
        measured.curves[key] = trained.train_loss[rows[0]]
        measured.interventions[key] = trained.interventions[rows]


def train_all(data: Data, names: Sequence[str], measured: Measured, quiet: bool) -> None:
    """At each batch size: the clip sweep, then every contender that runs at that size."""
    from tqdm import tqdm

    jobs = [(c, b) for b in measured.batch_sizes for c in names if b >= min_batch(c)]
    total = len(jobs) + len(measured.batch_sizes)
    with tqdm(total=total, disable=quiet, desc="spike benchmark") as bar:
        for batch in measured.batch_sizes:
            bar.set_postfix_str(f"clip sweep, batch {batch}")
            measured.thresholds[batch], measured.sweeps[batch] = sweep_clip_threshold(
                data, measured.steps, batch, measured.seeds
            )
            bar.update()
            for name in [c for c, b in jobs if b == batch]:
                bar.set_postfix_str(f"{name}, batch {batch}")
                train_contender(name, batch, data, measured)
                bar.update()


# -------------------------------------------------------------------------- report


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


def results_tables(measured: Measured, names: Sequence[str]) -> str:
    """Final test MSE (mean ± std over seeds): methods x scenarios, one table per batch."""
    tables = []
    for batch in measured.batch_sizes:

        def cell(name: str, scenario: str, batch: int = batch) -> str:
            key = (name, batch, scenario)
            return summarize(measured.results[key]) if key in measured.results else "—"

        rows = method_rows(names, SCENARIO_NAMES, cell, lead=lambda name: [name])
        tables.append(markdown_table([f"batch {batch}", *SCENARIO_NAMES], rows))
    return "\n\n".join(tables) + "\n"


def intervention_table(measured: Measured, names: Sequence[str]) -> str:
    """Mean count per run of capped losses / clipped norms / skipped steps."""
    rows = []
    for batch in measured.batch_sizes:

        def cell(name: str, scenario: str, batch: int = batch) -> str:
            return count_cell(measured.interventions.get((name, batch, scenario)))

        rows += method_rows(names, SCENARIO_NAMES, cell, lambda name, b=batch: [str(b), name])
    return markdown_table(["batch", "method", *SCENARIO_NAMES], rows)


def target_table(measured: Measured, names: Sequence[str]) -> str:
    """The targets: corrupted vs clean within 2 %, clean vs Adam within noise."""
    rows = []
    for batch in measured.batch_sizes:
        adam_clean = measured.results["base", batch, "mse_stable"]
        for name in names:
            if (name, batch, "mse_stable") not in measured.results:
                continue
            clean = measured.results[name, batch, "mse_stable"]
            corrupt = measured.results[name, batch, "mse_corrupt"]
            ratio = float(np.mean(corrupt) / np.mean(clean))
            ratio_adam = float(np.mean(corrupt) / np.mean(adam_clean))
            diff, stderr = paired_difference(clean, adam_clean)
            verdict = "—" if name == "base" else no_harm_verdict(diff, stderr)
            rows.append(
                [
                    str(batch),
                    name,
                    f"{ratio:.4f}",
                    f"{ratio_adam:.4f}",
                    met(ratio <= 1.02),
                    f"{diff:+.5f} ± {stderr:.5f}",
                    verdict,
                ]
            )
    header = ["batch", "method", "corrupt / clean, same method", "corrupt / clean Adam"]
    header += ["within 2 %", "clean − Adam (paired mean ± se)", "no harm"]
    return markdown_table(header, rows)


def introduction(measured: Measured) -> list[str]:
    """The title and what the tables hold."""
    return [
        "# Spike-protection benchmark",
        "",
        f"Final held-out (test) MSE, mean ± std over {len(measured.seeds)} seeds, after "
        f"{measured.steps} steps. Lower is better. Names are those of `contenders.py`: `base` "
        "is Adam at the scenario's learning rate, and every other method is that defence in "
        "front of it (`log_dampen` in front of Adam is `logadam`; `tuned clip` is "
        "`clip_by_global_norm` with a swept threshold).",
        f"Learning rates: stable {STABLE_LR:g}, high {HIGH_LR:g}; {CORRUPT_FRACTION:.1%} "
        f"of the steps in `mse_corrupt` have their targets multiplied by {CORRUPT_FACTOR:g}.",
        "",
    ]


def tuning_text(measured: Measured) -> str:
    """What was tuned, and how: the clip's sweep at each batch size."""
    sweeps = "; ".join(
        f"batch {b}: {sweep_text(measured.sweeps[b], digits=5)} "
        f"(chosen: {measured.thresholds[b]:g})"
        for b in measured.batch_sizes
    )
    return (
        "`clip_by_global_norm`: threshold tuned by a sweep on clean `mse_stable` "
        f"(test MSE per threshold): {sweeps}. "
        f"`adaptive_grad_clip`: clipping = {AGC_CLIPPING:g}. All other methods: "
        "defaults, nothing tuned."
    )


def format_report(measured: Measured) -> str:
    """The Markdown report: results, tuning, interventions, targets, the record."""
    names = list(dict.fromkeys(key[0] for key in measured.results))  # in the order they ran
    targeted = [n for n in names if n in TARGET_METHODS or n.startswith("spike_guard")]
    return "\n".join(
        [
            *introduction(measured),
            results_tables(measured, names),
            tuning_text(measured),
            *section(
                "Interventions",
                "Mean count per run of losses capped (ALRC; examples for `alrc_per_example`), "
                "norms clipped (ZClip) or steps skipped (skip-step).",
                intervention_table(measured, names),
            ),
            *section("Targets", target_table(measured, targeted)),
            "",
            *record_lines(measured.command),
            f"Wall time: {measured.elapsed:.0f} s (all of the above, compilation included)",
            "",
        ]
    )


def plot_curves(axes, measured: Measured, names: Sequence[str]) -> None:
    """One row of panels per batch: training loss of seed 0 per scenario (log scale)."""
    style = curve_styles(names)
    for row, batch in enumerate(measured.batch_sizes):
        for col, scenario in enumerate(SCENARIOS):
            ax = axes[row, col]
            for name in names:
                curve = measured.curves.get((name, batch, scenario.name))
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


def plot_finals(axes, measured: Measured, names: Sequence[str]) -> None:
    """The last row of panels: final test MSE per method, one bar per batch size."""
    batch_sizes, results = measured.batch_sizes, measured.results
    for ax, scenario in zip(axes, SCENARIOS, strict=True):
        width = 0.8 / len(batch_sizes)
        for i, batch in enumerate(batch_sizes):
            ran = [n for n in names if (n, batch, scenario.name) in results]
            means = [np.nanmean(results[n, batch, scenario.name]) for n in ran]
            stds = [np.nanstd(results[n, batch, scenario.name]) for n in ran]
            offset = (i - (len(batch_sizes) - 1) / 2) * width
            pos = [names.index(n) + offset for n in ran]
            ax.bar(pos, means, width, yerr=stds, label=f"batch {batch}", alpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{scenario.name}: final test MSE", fontsize=10)
        ax.legend(fontsize=7)


def plot(measured: Measured, names: list[str], path: str) -> None:
    """The figure: training-loss curves per scenario and batch, then the final errors."""
    plt = pyplot()
    nrows = len(measured.batch_sizes) + 1
    fig, axes = plt.subplots(nrows, len(SCENARIOS), figsize=(18, 4.2 * nrows), squeeze=False)
    plot_curves(axes, measured, names)
    plot_finals(axes[-1], measured, names)
    handles, labels = axes[nrows - 2, 0].get_legend_handles_labels()  # every method
    ncol = 7
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=10, frameon=False)
    legend_rows = -(-len(labels) // ncol)  # the legend's height, above the panels' titles
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.22 * legend_rows + 0.2) / (4.2 * nrows)))
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


QUICK = (2000, 3)  # steps, seeds
FULL = (10000, 5)


def run_benchmark(
    steps: int,
    seeds: Sequence[int],
    batch_sizes: Sequence[int],
    out_dir: str,
    quiet: bool = False,
    command: str = "python benchmarks/spike_benchmark.py",
    contenders: Sequence[str] = CONTENDERS,
) -> dict:
    """Runs every contender on every scenario; writes the Markdown report and the figure.

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
    start = time.perf_counter()
    measured = Measured(steps=steps, seeds=list(seeds), batch_sizes=list(batch_sizes))
    train_all(load_digits_supersampling(), list(contenders), measured, quiet)
    measured.command, measured.elapsed = command, time.perf_counter() - start

    md_path = os.path.join(out_dir, "spike_benchmark.md")
    png_path = os.path.join(out_dir, "spike_benchmark.png")
    report = format_report(measured)
    write_report(report, md_path)
    plot(measured, list(contenders), png_path)
    if not quiet:
        print(report)
        print(f"Wrote {md_path} and {png_path}")
    return {**measured.results, "markdown": md_path, "figure": png_path}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, QUICK, FULL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma-separated registry names to run (default: all of CONTENDERS); base first",
    )
    args = parser.parse_args(argv)
    steps, seeds = steps_and_seeds(args, QUICK, FULL)
    run_benchmark(
        steps=steps,
        seeds=seeds,
        batch_sizes=args.batch_sizes,
        out_dir=args.out,
        quiet=args.quiet,
        command=command_line("spike_benchmark.py", argv),
        contenders=tuple(base_first(args.contenders)) if args.contenders else CONTENDERS,
    )


if __name__ == "__main__":
    main()
