"""The ablation of spike_guard's parts: one table from the runs that measured them.

Reads the finished runs of ``lm_spike_benchmark.py`` (the standard recipe and plain
Adam, from their ``cache/`` folders) and the digits report of ``spike_benchmark.py``,
and writes ``ablation.md``: for every variant and scenario the held-out loss relative
to the recipe's clean run of the same seed (mean ± std over seeds), and the paired
difference to the variant that is the reference of the ablation (mean ± standard
error over seeds; ``*`` where it exceeds two standard errors). Run it from the commit
that made the runs: the caches are keyed by the code's digest.

Usage::

  python benchmarks/ablation.py --runs benchmarks/results/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from lm_spike_benchmark import ALL, RECIPES, Cache
from reporting import markdown_table, paired_difference

VARIANTS = (
    "spike_guard(knee=None)",
    "spike_guard(knee=None, exponent=1)",
    "spike_guard(knee=3)",
    "spike_guard(knee=10)",
    "spike_guard(knee=30)",
)
REFERENCE = "spike_guard(knee=None)"
RUNS = {  # recipe: the scenarios it ran (--scenarios), in the benchmark's order
    "standard": ("clean", "repeated_byte", "loss x0.1, repeated_byte"),
    "adam": ("clean", "repeated_byte", "random_bytes"),
}


def finals(runs_dir: str, recipe: str, steps: int, seeds: Sequence[int]) -> dict:
    """``{(contender, scenario): final held-out loss per seed}`` of one recipe's run."""
    settings = dict(recipe=recipe, steps=steps, seeds=list(seeds), windows=1024)
    cache = Cache(os.path.join(runs_dir, recipe, "cache"), settings)
    scenarios = [s for s in ALL if s in RUNS[recipe]]
    found = {}
    for name in ("base", *VARIANTS):
        key = dict(contender=name, scenarios=scenarios, peak=RECIPES[recipe].peak_lr, hyper=0.0)
        cached = cache.get(**key)
        if cached is None:
            raise SystemExit(f"no cached run of {name!r} ({recipe}) in {runs_dir}")
        for scenario, result in cached[0].items():
            found[name, scenario] = np.asarray(result.final, np.float64)
    return found


def cell(values: np.ndarray, reference: np.ndarray, clean: np.ndarray) -> str:
    """Excess over the recipe's clean run (%, mean ± std), then the paired difference."""
    excess = (values / clean - 1) * 100
    text = f"{excess.mean():+.2f} ± {excess.std(ddof=1):.2f}"
    if values is reference:
        return text
    diff, stderr = paired_difference(excess, (reference / clean - 1) * 100)
    mark = "*" if abs(diff) > 2 * stderr else ""
    return f"{text} ({diff:+.2f} ± {stderr:.2f}{mark})"


def lm_table(found: dict, recipe: str) -> str:
    rows = []
    for name in ("base", *VARIANTS):
        clean = found["base", "clean"]
        cells = [cell(found[name, s], found[REFERENCE, s], clean) for s in RUNS[recipe]]
        rows.append([f"`{name}`", *cells])
    return markdown_table(["variant", *RUNS[recipe]], rows)


def report(runs_dir: str, found: dict, command: str) -> str:
    digits = os.path.join(runs_dir, "digits", "spike_benchmark.md")
    lines = [
        "# Ablation of `spike_guard`",
        "",
        "Held-out loss relative to the recipe's clean run of the same seed, % (mean ± std "
        "over 3 seeds, 1500 steps), and in parentheses the paired difference to "
        f"`{REFERENCE}` (mean ± standard error over seeds; `*`: beyond two standard "
        "errors). Every variant is `spike_guard` in front of the recipe, which keeps its "
        "clip. `knee=k`: each tensor dampened above k times its running RMS on the linlog "
        "curve; `exponent=p`: a capped step's factor is `(t / G) ** p`; unless named, "
        "the exponent is 2.",
    ]
    for recipe in RUNS:
        lines += ["", f"## {RECIPES[recipe].title}", "", lm_table(found[recipe], recipe)]
        lines += ["", f"Report of the run: [{recipe}/lm_{recipe}.md]({recipe}/lm_{recipe}.md)"]
    lines += [
        "",
        "## Digits (10 000 steps, 5 seeds, batch 1 and 8)",
        "",
        f"The run's report, with the paired no-harm test against Adam: [digits/spike_benchmark.md]"
        f"(digits/spike_benchmark.md){'' if os.path.exists(digits) else ' (missing)'}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="benchmarks/results/ablation")
    args = parser.parse_args(argv)
    found = {recipe: finals(args.runs, recipe, 1500, [0, 1, 2]) for recipe in RUNS}
    command = " ".join(["python benchmarks/ablation.py", *(argv or sys.argv[1:])])
    text = report(args.runs, found, command)
    with open(os.path.join(args.runs, "ablation.md"), "w") as f:
        f.write(text)
    per_seed = {
        recipe: {f"{n} | {s}": v.tolist() for (n, s), v in values.items()}
        for recipe, values in found.items()
    }
    with open(os.path.join(args.runs, "finals.json"), "w") as f:
        json.dump(per_seed, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
