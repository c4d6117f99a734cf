"""What the benchmark scripts share: command-line flags, summaries, tables, the machine."""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import optax_logdamp as old


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header, a rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def add_common_flags(
    parser: argparse.ArgumentParser,
    quick_steps: int,
    quick_seeds: int,
    full_steps: int,
    full_seeds: int,
) -> None:
    """The flags of every benchmark: --full, --steps, --seeds, --out and --quiet."""
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


def machine_line() -> str:
    """Platform, CPU count and library versions, for the record."""
    device = jax.devices()[0]
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({device.platform}), "
        f"optax {optax.__version__}, optax_logdamp {old.__version__}, "
        f"Python {platform.python_version()}"
    )


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
