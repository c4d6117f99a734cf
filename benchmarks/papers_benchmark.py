"""The papers, reproduced: ALRC's super-sampling experiment and LogAdam's deep GAN.

Each defence of this package comes from a paper with an experiment of its own; this
benchmark runs both, on natural images that ship with scikit-learn (``photos.py``),
scaled down only as far as a 2-core CPU requires, and writes a verdict for each claim.

1. ALRC (Ede & Beanland): 2x super-sampling with a residual conv net, quartic and
   squared error at batch sizes 1, 4 and 16, and squared error at an unstably high
   learning rate (``supersampling.py``). The claims: ALRC lowers the error of unstable
   quartic-error training, leaves stable squared-error training unaffected, and takes
   the spikes out of training at an unstable learning rate.
2. Log dampening (the LogAdam post): a 44-layer residual MLP GAN on flower crops,
   Adam with b1 0.5 at a rate where it trains with spikes and one where it fails
   (``flower_gan.py``). The claim: it works where Adam's training is unstable.

Every contender of a seed starts from the same initial parameters and sees the same
crops in the same order.

Usage::

  python benchmarks/papers_benchmark.py            # quick run, about 2 minutes on 2 cores
  python benchmarks/papers_benchmark.py --full     # the run the docs cite
  python benchmarks/papers_benchmark.py --part gan --steps 500 --seeds 2

The report (``papers.md``) and figures go to ``results/`` at the top of the repository
(git-ignored) unless ``--out`` says otherwise; the committed run is ``--full --out
benchmarks/results/papers``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np

import flower_gan as gan
import supersampling as ss
from reporting import (
    ROOT,
    command_line,
    count_spikes,
    curve_styles,
    logger,
    markdown_table,
    no_harm_verdict,
    paired_difference,
    pyplot,
    section,
    smooth,
    summarize,
    write_report_and_record,
)

QUICK = {"alrc": (300, 2), "gan": (300, 2)}  # (steps, seeds)
FULL = {"alrc": (1500, 3), "gan": (2000, 5)}
QUICK_BATCHES = (1,)
FULL_BATCHES = (1, 4, 16)
QUICK_ALRC_CONTENDERS = ("base", "alrc_per_example", "spike_guard")
QUICK_GAN_CONTENDERS = ("base", "log_dampen", "log_dampen(auto)", "spike_guard")
COLLAPSED = 0.1  # a GAN run collapsed: its samples' diversity below 0.1x the real crops'
LABELS = {
    "base": "Adam",
    "alrc_per_example": "ALRC per image (the paper's)",
    "alrc": "ALRC on the batch loss",
    "spike_guard": "spike_guard()",
    "tuned clip": "clip_by_global_norm (tuned)",
    "log_dampen": "logadam (the post's knee)",
    "log_dampen(auto)": "logadam(dampen_scale='auto')",
}


# ---------------------------------------------------------------------- ALRC's paper


def run_alrc(steps: int, seeds: list[int], batches: Sequence[int], names: Sequence[str], log):
    """Every contender in every setting; the clip's threshold swept on clean squared error.

    Returns ``{(name, setting): trained}`` (seeds stacked), the settings and the sweeps.
    """
    data = ss.load_data()
    settings = ss.settings(tuple(batches))
    results, sweeps, threshold = {}, {}, None
    for batch in batches:
        here = [s for s in settings if s.batch == batch]
        if "tuned clip" in names and batch <= 4:  # batch 16 keeps batch 4's threshold
            clean = next(s for s in here if not s.quartic)
            rows = [ss.make_run(seed, clean, h) for h in ss.CLIP_SWEEP for seed in seeds]
            errors = ss.train_runs("tuned clip", data, steps, batch, ss.stack(rows)).test_error
            per_threshold = errors.reshape(len(ss.CLIP_SWEEP), -1).mean(axis=1)
            means = dict(zip(ss.CLIP_SWEEP, per_threshold, strict=True))
            sweeps[batch] = {float(k): float(v) for k, v in means.items()}
            threshold = min(means, key=means.__getitem__)
            log(f"batch {batch}: clip sweep {sweeps[batch]} -> {threshold}")
        for name in names:
            todo = [s for s in here if ss.runs_contender(name, s)]
            if not todo:
                continue
            hyper = threshold if name == "tuned clip" else 0.0
            rows = [ss.make_run(seed, s, hyper) for s in todo for seed in seeds]
            start = time.perf_counter()
            trained = ss.train_runs(name, data, steps, batch, ss.stack(rows))
            for i, s in enumerate(todo):
                part = slice(i * len(seeds), (i + 1) * len(seeds))
                results[name, s.name] = ss.Trained(*(f[part] for f in trained))
            log(f"batch {batch}: {name} in {time.perf_counter() - start:.0f} s")
    return results, settings, sweeps


def alrc_tables(results, settings, names) -> list[str]:
    """The error table, the spike table and the verdicts of the paper's claims."""
    columns = [s.name for s in settings]

    def cell(name, column, field):
        if (name, column) not in results:
            return "—"
        trained = results[name, column]
        if field == "error":
            return summarize(trained.test_error)
        spikes = [count_spikes(curve) for curve in trained.train_loss]
        return f"{np.mean(spikes):.1f}"

    error_rows = [[LABELS[n], *(cell(n, c, "error") for c in columns)] for n in names]
    spike_rows = [[LABELS[n], *(cell(n, c, "spikes") for c in columns)] for n in names]
    return [
        markdown_table(["held-out error", *columns], error_rows),
        "Loss spikes per run (a step whose batch loss is above 10x the median of the 100 "
        "steps before it; consecutive steps count once):",
        markdown_table(["spikes per run", *columns], spike_rows),
    ]


def alrc_verdicts(results, settings) -> tuple[str, list[dict]]:
    """Each claim against Adam, per setting: the paired difference and its verdict."""
    claims = {
        True: "ALRC decreases errors for unstable quartic-error training",
        False: "stable squared-error training is unaffected",
    }
    rows, record = [], []
    for s in settings:
        if ("alrc_per_example", s.name) not in results:
            continue
        adam = results["base", s.name].test_error
        alrc = results["alrc_per_example", s.name].test_error
        diff, stderr = paired_difference(alrc / adam - 1, np.zeros_like(adam))
        verdict = no_harm_verdict(diff, stderr)
        if s.learning_rate == ss.UNSTABLE_LEARNING_RATE:
            claim = "ALRC takes the spikes out of training at an unstable learning rate"
            spikes = [
                np.mean([count_spikes(c) for c in results[n, s.name].train_loss])
                for n in ("base", "alrc_per_example")
            ]
            ours = f"spikes per run {spikes[0]:.1f} → {spikes[1]:.1f}; "
            ours += f"error {diff:+.1%} ± {stderr:.1%}"
            holds = spikes[1] < spikes[0] and verdict != "WORSE"
        else:
            claim = claims[s.quartic]
            ours = f"{diff:+.1%} ± {stderr:.1%} ({verdict})"
            holds = verdict == "better" if s.quartic else verdict == "within noise"
        rows.append([claim, s.name, ours, "reproduced" if holds else "not reproduced"])
        record.append({"claim": claim, "setting": s.name, "diff": diff, "stderr": stderr})
    header = ["the paper's claim", "setting", "ALRC per image vs Adam (paired, ± SE)", "verdict"]
    return markdown_table(header, rows), record


# ----------------------------------------------------------------------- the GAN


def run_gan(steps: int, seeds: list[int], names: Sequence[str], rates: Sequence[float], log):
    data = gan.load_data()
    results = {}
    for rate in rates:
        for name in names:
            start = time.perf_counter()
            results[name, rate] = gan.train_seeds(name, data, steps, rate, seeds)
            log(f"GAN, rate {rate:g}: {name} in {time.perf_counter() - start:.0f} s")
    return results, data


def gan_outcomes(trained: gan.Trained) -> dict[str, np.ndarray]:
    """Per seed: failed (non-finite or collapsed), spikes, KID and diversity."""
    finite = np.isfinite(trained.kid) & np.isfinite(trained.diversity)
    failed = ~finite | (np.nan_to_num(trained.diversity) < COLLAPSED)
    larger = np.maximum(trained.d_loss, trained.g_loss)
    spikes = np.array([count_spikes(losses, floor=10.0) for losses in larger])
    return {"failed": failed, "spikes": spikes, "kid": trained.kid, "diversity": trained.diversity}


def gan_table(results, names, rates) -> str:
    rows = []
    for rate in rates:
        for name in names:
            o = gan_outcomes(results[name, rate])
            rows.append(
                [
                    f"{rate:g}",
                    LABELS[name],
                    f"{int(o['failed'].sum())} of {len(o['failed'])}",
                    f"{np.mean(o['spikes']):.1f}",
                    f"{np.median(o['kid']):.0f}",
                    summarize(o["kid"]).split(" (")[0],
                    f"{np.median(o['diversity']):.2f}",
                ]
            )
    header = [
        "rate",
        "optimizer",
        "failed runs",
        "spikes per run",
        "KID median",
        "KID mean ± std",
        "diversity",
    ]
    return markdown_table(header, rows)


def gan_verdict(results, rates) -> str:
    """The post's claim against Adam at each rate: failed runs and the median KID."""
    rows = []
    for rate in rates:
        adam, log_adam = (gan_outcomes(results[n, rate]) for n in ("base", "log_dampen"))
        fewer_failures = log_adam["failed"].sum() < adam["failed"].sum()
        better = np.median(log_adam["kid"]) < np.median(adam["kid"])
        same_failures = log_adam["failed"].sum() == adam["failed"].sum()
        holds = fewer_failures or (
            same_failures and better and adam["failed"].sum() < len(adam["failed"])
        )
        rows.append(
            [
                f"{rate:g}",
                f"{int(adam['failed'].sum())} → {int(log_adam['failed'].sum())}",
                f"{np.median(adam['kid']):.0f} → {np.median(log_adam['kid']):.0f}",
                "reproduced" if holds else "not reproduced",
            ]
        )
    header = ["rate", "failed runs, Adam → logadam", "KID median, Adam → logadam", "verdict"]
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- figures


def plot_alrc(results, settings, path: str) -> None:
    plt = pyplot()
    shown = [s for s in settings if s.name in ("quartic, batch 1", "squared, batch 1, rate 2e-3")]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    names = [n for n in ss.CONTENDERS if (n, shown[0].name) in results]
    styles = curve_styles(names)
    for ax, s in zip(axes[0], shown, strict=True):
        for name in names:
            if (name, s.name) not in results:
                continue
            x, y = smooth(results[name, s.name].train_loss[0], 25)
            color, style = styles[name]
            ax.plot(x, y, style, color=color, label=LABELS[name], linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{s.name} (seed 0, 25-step means)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gan(results, names, data, path: str) -> None:
    plt = pyplot()
    rate = max(gan.LEARNING_RATES)
    fig = plt.figure(figsize=(14, 3 + 1.1 * (len(names) + 1)))
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1.1 * (len(names) + 1)])
    ax = fig.add_subplot(grid[0])
    styles = curve_styles(names)
    for name in names:
        color, style = styles[name]
        g = np.nan_to_num(results[name, rate].g_loss[0], nan=1e12, posinf=1e12)
        ax.plot(*smooth(g, 10), style, color=color, label=LABELS[name], linewidth=1)
    ax.set_yscale("log")
    ax.set_title(f"generator loss at rate {rate:g} (seed 0, 10-step means)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8, ncol=3)
    rows = [("held-out crops", np.asarray(data.test[:: len(data.test) // 12][:12]))]
    rows += [(LABELS[n], results[n, rate].samples[0][:12]) for n in names]
    strip = grid[1].subgridspec(len(rows), 13, width_ratios=[3] + [1] * 12)
    for r, (label, images) in enumerate(rows):
        title = fig.add_subplot(strip[r, 0])
        title.axis("off")
        title.text(1, 0.5, label, ha="right", va="center", fontsize=8)
        for c in range(12):
            a = fig.add_subplot(strip[r, c + 1])
            a.axis("off")
            if c < len(images):
                a.imshow(np.clip((np.nan_to_num(images[c]) + 1) / 2, 0, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the run the docs cite")
    parser.add_argument("--part", choices=("alrc", "gan", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="steps of every run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of every setting")
    parser.add_argument("--out", default=str(ROOT / "results"), help="report directory")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    log = logger(args.quiet)
    defaults = FULL if args.full else QUICK
    plan = {p: (args.steps or s, list(range(args.seeds or n))) for p, (s, n) in defaults.items()}
    lines = [
        "# The papers, reproduced",
        "",
        "ALRC's super-sampling experiment and log dampening's deep GAN, on the photographs "
        "scikit-learn ships. What each setting is and what was scaled down: "
        "`docs/benchmarks/papers.md`.",
    ]
    record: dict = {}
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    if args.part in ("alrc", "both"):
        steps, seeds = plan["alrc"]
        batches = FULL_BATCHES if args.full else QUICK_BATCHES
        names = ss.CONTENDERS if args.full else QUICK_ALRC_CONTENDERS
        results, settings, sweeps = run_alrc(steps, seeds, batches, names, log)
        verdicts, record["alrc"] = alrc_verdicts(results, settings)
        sweep_text = "; ".join(
            f"batch {b}: " + ", ".join(f"{k:g} → {v:.4f}" for k, v in s.items())
            for b, s in sweeps.items()
        )
        lines += section(
            "ALRC: 2x super-sampling",
            f"{steps} steps, seeds {seeds}. Held-out error in each run's own loss (quartic: "
            "25·mean(e⁴); squared: mean(e²)) on the standardized held-out crops, mean ± std "
            "over seeds.",
            *alrc_tables(results, settings, names),
            "Clip threshold swept on clean squared error (mean held-out error; batch 16 "
            f"keeps batch 4's): {sweep_text or 'not run'}.",
            "Verdicts (the paired difference over seeds, beyond 2 standard errors or not):",
            verdicts,
            "![Training loss](alrc_curves.png)",
        )
        plot_alrc(results, settings, os.path.join(args.out, "alrc_curves.png"))
        record["alrc_errors"] = {
            f"{n} | {s}": r.test_error.tolist() for (n, s), r in results.items()
        }
    if args.part in ("gan", "both"):
        steps, seeds = plan["gan"]
        names = gan.CONTENDERS if args.full else QUICK_GAN_CONTENDERS
        rates = gan.LEARNING_RATES if args.full else gan.LEARNING_RATES[-1:]
        results, data = run_gan(steps, seeds, names, rates, log)
        lines += section(
            "Log dampening: a 44-layer GAN",
            f"{steps} steps, seeds {seeds}, Adam b1 {gan.B1}. A run failed if its losses "
            f"stopped being finite or its samples collapsed (diversity below {COLLAPSED}x "
            "the held-out crops'). Spikes: a step where the larger of the two losses is "
            "above 10x the median of the 100 steps before it and above 10. KID: the "
            "kernel two-sample statistic (x1000, lower is better) between 512 samples and "
            "the held-out crops, on fixed random ReLU features.",
            gan_table(results, names, rates),
            "The post's claim (logadam at the post's knee against Adam):",
            gan_verdict(results, rates),
            "![Generator loss and samples](gan.png)",
        )
        plot_gan(results, list(names), data, os.path.join(args.out, "gan.png"))
        record["gan"] = {
            f"{n} | {r:g}": {k: v.tolist() for k, v in gan_outcomes(t).items()}
            for (n, r), t in results.items()
        }
    path = os.path.join(args.out, "papers.md")
    command = command_line("papers_benchmark.py", argv)
    write_report_and_record(lines, record, path, command, time.perf_counter() - start)
    log(f"report: {path}")


if __name__ == "__main__":
    main()
