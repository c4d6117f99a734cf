"""The harness the benchmark scripts share: flags, seeds and runs, sweeps, tables, the machine.

Both spike benchmarks (``spike_benchmark.py`` on digits, ``lm_spike_benchmark.py`` on a
byte-level language model) stack their training runs, sweep a hyperparameter on clean
data, and write a Markdown report with the same cells, tables, verdicts and closing
lines from here. Each script keeps what is its own: the data, the model, the scenarios
and what a run records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_logdamp as old

from contenders import split_names

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- command line


def add_common_flags(
    parser: argparse.ArgumentParser, quick: tuple[int, int], full: tuple[int, int]
) -> None:
    """The flags of every benchmark: --full, --steps, --seeds, --out and --quiet.

    ``quick`` and ``full`` are the (steps, seeds) of a run without and with ``--full``.
    """
    (quick_steps, quick_seeds), (full_steps, full_seeds) = quick, full
    parser.add_argument(
        "--full", action="store_true", help=f"{full_steps} steps, {full_seeds} seeds"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"default {quick_steps} ({full_steps} with --full)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"default {quick_seeds} ({full_seeds} with --full)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "results"),
        help="report directory (default: results/ at the repository top, ignored by git)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def steps_and_seeds(
    args: argparse.Namespace, quick: tuple[int, int], full: tuple[int, int]
) -> tuple[int, list[int]]:
    """The run's steps and seeds (0, 1, ...): the flags', else the quick or full default."""
    default_steps, default_seeds = full if args.full else quick
    return args.steps or default_steps, list(range(args.seeds or default_seeds))


def base_first(names: str) -> list[str]:
    """The names of a comma-separated ``--contenders`` flag, ``base`` (the reference) first."""
    return ["base", *(name for name in split_names(names) if name != "base")]


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How the script was called, for the record."""
    return " ".join([f"python benchmarks/{script}", *(argv or sys.argv[1:])]).strip()


def logger(quiet: bool) -> Callable[..., None]:
    """``print`` (flushed), or nothing when quiet."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))


def source_digest(paths: Sequence[str]) -> str:
    """SHA-256 (16 hex digits) of the Python sources under ``paths``, relative to the root.

    Keys cached benchmark results to the code that produced them.
    """
    digest = hashlib.sha256()
    for path in paths:
        full = ROOT / path
        files = sorted(full.rglob("*.py")) if full.is_dir() else [full]
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------- seeds and runs


def seed_rng(seed: int, offset: int) -> np.random.Generator:
    """A seed's generator of data order and bad steps; ``offset`` keeps the streams apart."""
    return np.random.default_rng(offset + seed)


def init_key(seed: int) -> np.ndarray:
    """A seed's parameter-initialisation key, as raw ``uint32`` data (the same everywhere)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


class Named(Protocol):
    name: str


class Label(NamedTuple):
    """Which run a row of stacked runs is."""

    scenario: str
    seed: int
    rate: float | None  # the (swept) peak learning rate; None: the scenario's own
    hyper: float  # the contender's hyperparameter (a swept one, or 0)


def stack_runs(
    runs_type: Any,
    scenarios: Sequence[Named],
    seeds: Sequence[int],
    row: Callable[[Any, Label], dict[str, Any]],
    rates: Sequence[float | None] = (None,),
    hypers: Sequence[float] = (0.0,),
) -> tuple[Any, list[Label]]:
    """Every (scenario, rate, hyperparameter, seed) run, stacked, and their labels.

    Args:
      runs_type: a NamedTuple whose every field has one row per run.
      scenarios: the scenarios, each with a ``name``.
      seeds: the seeds, innermost: a scenario's seeds are consecutive rows.
      row: the fields of one run (numpy), from its scenario and label.
      rates, hypers: the values swept (one each: no sweep).

    Returns:
      A ``runs_type`` of device arrays with leading axis R, and the R labels.
    """
    rows, labels = [], []
    for scenario in scenarios:
        for rate in rates:
            for hyper in hypers:
                for seed in seeds:
                    label = Label(scenario.name, seed, rate, hyper)
                    rows.append(row(scenario, label))
                    labels.append(label)
    fields = {f: jnp.asarray(np.stack([r[f] for r in rows])) for f in runs_type._fields}
    return runs_type(**fields), labels


def rows_by_scenario(labels: Sequence[Label], scenarios: Sequence[str]) -> dict[str, list[int]]:
    """The rows of each scenario (its seeds, in order) among stacked runs."""
    return {s: [i for i, label in enumerate(labels) if label.scenario == s] for s in scenarios}


def best_of_sweep(
    labels: Sequence[Label], finals: np.ndarray, swept: str
) -> tuple[float, dict[float, float]]:
    """The swept value with the lowest mean final error over seeds, and every value's mean.

    Args:
      labels: the runs of the sweep (clean data).
      finals: their final errors; the mean is taken in their dtype.
      swept: the label field swept, ``"rate"`` or ``"hyper"``.

    A value whose runs did not all end finite counts as infinitely bad.
    """
    by_value: dict[float, list] = {}
    for label, final in zip(labels, finals, strict=True):
        by_value.setdefault(getattr(label, swept), []).append(final)
    means = {
        v: float(np.mean(f)) if np.all(np.isfinite(f)) else np.inf for v, f in by_value.items()
    }
    return min(means, key=means.__getitem__), means


def sweep_text(means: dict[float, float], digits: int) -> str:
    """``value → mean, ...``: a sweep's mean final error per value, as a report gives it."""
    return ", ".join(f"{v:g} → {m:.{digits}f}" for v, m in means.items())


# ---------------------------------------------------------------------------- cells


def summarize(values: np.ndarray) -> str:
    """``mean ± std`` over seeds (the value alone for one seed), or how many diverged."""
    finite = np.isfinite(values)
    if not finite.any():
        return "diverged"
    text = f"{values[finite].mean():.5f}"
    if finite.sum() > 1:  # one seed has no spread to show, not a spread of 0
        text += f" ± {values[finite].std(ddof=1):.5f}"
    if not finite.all():
        text += f" ({(~finite).sum()} diverged)"
    return text


def ratio_cell(values: np.ndarray, reference: np.ndarray) -> str:
    """Per-seed ratio to the reference, as ``+x.x % ± y.y`` (mean ± std over seeds).

    One seed has no spread, and its cell is the ratio alone.
    """
    ratios = (values / reference - 1) * 100
    if not np.isfinite(ratios).all():
        return "diverged"
    if len(ratios) == 1:
        return f"{ratios[0]:+.2f} %"
    return f"{np.mean(ratios):+.2f} % ± {np.std(ratios, ddof=1):.2f}"


def count_cell(counts: np.ndarray | None) -> str:
    """Mean count per run; ``—`` where not run, empty where nothing is counted (-1)."""
    if counts is None:
        return "—"
    return "" if np.min(counts) < 0 else f"{np.mean(counts):.1f}"


# --------------------------------------------------------------------------- tables


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header, a rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, *blocks: str) -> list[str]:
    """A report's section: a blank line, ``## title``, then each block after a blank line."""
    lines = ["", f"## {title}"]
    for block in blocks:
        lines += ["", block]
    return lines


def method_rows(
    names: Sequence[str],
    columns: Sequence[str],
    cell: Callable[[str, str], str],
    lead: Callable[[str], list[str]] = lambda name: [f"`{name}`"],
) -> list[list[str]]:
    """One table row per method: ``lead(name)``, then ``cell(name, column)`` per column.

    A method none of whose cells holds a value (all ``—``, not run, or empty, not
    counted) has no row.
    """
    rows = []
    for name in names:
        cells = [cell(name, column) for column in columns]
        if any(c not in ("—", "") for c in cells):
            rows.append([*lead(name), *cells])
    return rows


# -------------------------------------------------------------------------- targets


def met(holds: bool) -> str:
    """A target's verdict: ``yes``, or ``NO`` to stand out."""
    return "yes" if holds else "NO"


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean paired difference ``a - b`` over seeds and its standard error."""
    diff = a - b
    stderr = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(np.mean(diff)), stderr


def no_harm_verdict(diff: float, stderr: float) -> str:
    """ "within noise", "better" or "WORSE": the paired difference against 2 standard errors."""
    if not np.isfinite(diff):
        return "WORSE"
    if abs(diff) <= 2 * stderr:
        return "within noise"
    return "better" if diff < 0 else "WORSE"


# --------------------------------------------------------------------------- spikes


def count_spikes(
    losses: np.ndarray, factor: float = 10.0, window: int = 100, floor: float = 0.0
) -> int:
    """Loss spikes of a run: the steps whose loss exceeds ``factor`` times the median of
    the ``window`` steps before it (and ``floor``), consecutive ones counted once.

    A non-finite loss counts as above any threshold; the first ``window`` steps, with no
    median to judge them by, are not counted.
    """
    losses = np.where(np.isfinite(losses), losses, np.inf)
    above = np.zeros(len(losses), bool)
    if len(losses) > window:
        before = np.lib.stride_tricks.sliding_window_view(losses[:-1], window)
        threshold = np.maximum(factor * np.median(before, axis=1), floor)
        above[window:] = losses[window:] > threshold
    return int(np.sum(above[1:] & ~above[:-1]) + above[0])


# --------------------------------------------------------------------- the record


def machine_line() -> str:
    """Platform, CPU count and library versions, for the record."""
    device = jax.devices()[0]
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({device.platform}), "
        f"optax {optax.__version__}, optax_logdamp {old.__version__}, "
        f"Python {platform.python_version()}"
    )


def record_lines(command: str) -> list[str]:
    """A report's closing lines: the command that wrote it and the machine it ran on."""
    return [f"Command: `{command}`  ", f"Machine: {machine_line()}  "]


def write_report_and_record(
    lines: list[str], record: Any, path: str, command: str, elapsed: float
) -> None:
    """The report ``path`` (``.md``: the lines, the elapsed time, the command and the
    machine) and its record beside it (``.json``)."""
    lines = [*lines, "", f"Elapsed: {elapsed:.0f} s  ", *record_lines(command)]
    write_report("\n".join(lines) + "\n", path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)


def write_report(report: str, path: str) -> None:
    """Writes the Markdown report, its directory made if need be."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(report)


# -------------------------------------------------------------------------- figures


def smooth(curve: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Means over consecutive windows of ``width`` steps (keeps spikes visible)."""
    usable = (len(curve) // width) * width
    means = curve[:usable].reshape(-1, width).mean(axis=1)
    return np.arange(len(means)) * width + width / 2, means


def curve_styles(names: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """A colour and a line style for each curve of a figure, in legend order.

    The ten dark colours of matplotlib's ``tab20`` come first and its light ones after
    (in ``tab20``'s own order, neighbours are a dark and a light shade of one hue), and
    the line styles take turns, so no two curves share both.
    """
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors  # pyright: ignore[reportAttributeAccessIssue]
    palette = tab20[::2] + tab20[1::2]
    styles = ("-", "--", "-.", ":")
    return {name: (palette[i % 20], styles[i % 4]) for i, name in enumerate(names)}


def pyplot() -> Any:
    """matplotlib's ``pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
