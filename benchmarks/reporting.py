"""Reporting helpers shared by the benchmark scripts: summaries, verdicts, the machine."""

from __future__ import annotations

import os
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
