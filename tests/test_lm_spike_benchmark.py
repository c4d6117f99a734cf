"""Smoke test of benchmarks/lm_spike_benchmark.py: tiny runs write the whole report.

The model is shrunk (width 16, one layer, context 16) and XLA's optimisation lowered so
that the contenders compile quickly; the code path is the benchmark's own.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_spike_benchmark as lm  # noqa: E402
from reporting import ratio_cell, summarize  # noqa: E402

TINY_RUN = """
import sys
sys.path.insert(0, "benchmarks")
import lm_spike_benchmark as lm
lm.WIDTH, lm.LAYERS, lm.HEADS, lm.CONTEXT = 16, 1, 2, 16
lm.CURVE_WINDOWS = 64
lm.main(sys.argv[1:])
"""
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def tiny(out, *flags):
    command = [sys.executable, "-c", TINY_RUN, "--steps", "40", "--heldout-windows", "128"]
    command += ["--out", str(out), *flags]
    return subprocess.run(
        command, check=True, env=ENV, cwd=ROOT, timeout=600, capture_output=True, text=True
    )


def run_result(**fields):
    """A :class:`RunResult` with the given fields, the others None."""
    return lm.RunResult(**{f: fields.get(f) for f in lm.RunResult._fields})


def table_rows(report: str, name: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in report.splitlines()
        if line.startswith(f"| `{name}` |")
    ]


def test_tiny_standard_recipe_writes_every_table_and_both_figures(tmp_path):
    tiny(tmp_path, "--seeds", "2", "--quiet")
    report = (tmp_path / "lm_standard.md").read_text()
    plan = lm.PLANS["standard"]["quick"]
    for name, scenarios in plan:
        rows = table_rows(report, name)
        assert rows, f"{name}: missing from the tables"
        first = rows[0]  # the bad-batch table: method, where, then the core scenarios
        assert len(first) == 2 + len(lm.CORE)
        ran = [c for s, c in zip(lm.CORE, first[2:], strict=True) if s in scenarios]
        assert all(c.endswith(tuple("0123456789")) or c == "diverged" for c in ran), first
    for section in (
        "## Bad batches",
        "## Damage recovered",
        "## The gradient's units",
        "## Learning-rate sensitivity",
        "## Targets",
        "## Interventions and natural loss spikes",
        "## Whole training-step time",
    ):
        assert section in report, section
    assert "SHA-256" in report and "Machine:" in report and "was not swept" in report
    assert "SPEC" not in report
    targets = [r for r in table_rows(report, "spike_guard") if r[1] == "LR sensitivity"]
    assert targets and targets[0][4] in ("yes", "NO")
    for figure in ("lm_standard.png", "lm_standard_lr.png"):
        data = (tmp_path / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 20_000  # curves, not an empty canvas


def test_tiny_plain_adam_recipe_tunes_its_clip_and_reuses_the_cache(tmp_path):
    tiny(tmp_path, "--recipe", "adam", "--contenders", "tuned clip", "--quiet")
    report = (tmp_path / "lm_adam.md").read_text()
    assert "`tuned clip`: threshold chosen by a sweep" in report
    assert table_rows(report, "tuned clip") and table_rows(report, "base")
    assert "## Learning-rate sensitivity" not in report  # the plan runs no rates here
    again = tiny(tmp_path, "--recipe", "adam", "--contenders", "tuned clip")
    assert again.stdout.count("(cached)") == 2, again.stdout  # base and tuned clip
    assert "step times (ms): base" in again.stdout and "base (again, last)" in again.stdout
    # Every number but the step times (measured afresh by each run) is the cached one.
    timed = "## Whole training-step time"
    assert (tmp_path / "lm_adam.md").read_text().split(timed)[0] == report.split(timed)[0]


def test_late_bad_steps_fall_in_the_last_half_and_spread_ones_do_not_move():
    spread = lm.seed_streams(0, 1000, 10_000, lm.SCENARIOS["repeated_byte"])
    late = lm.seed_streams(0, 1000, 10_000, lm.SCENARIOS["repeated_byte, late"])
    clean = lm.seed_streams(0, 1000, 10_000, lm.SCENARIOS["clean"])
    assert spread["bad"].sum() == late["bad"].sum() == 10 and clean["bad"].sum() == 0
    assert np.flatnonzero(late["bad"]).min() >= 500
    assert np.flatnonzero(spread["bad"]).min() < 500  # spread over the run (this seed)
    np.testing.assert_array_equal(spread["starts"], late["starts"])
    np.testing.assert_array_equal(spread["bad_batches"], late["bad_batches"])


def test_lr_sensitivity_is_wortsmans_metric():
    finals = {"clean": [2.0], "lr x3": [1.8], "lr x10": [2.5], "lr x30": [9.0]}
    results = {("m", s): run_result(final=np.array(v)) for s, v in finals.items()}
    got = lm.lr_sensitivity(results, "m", np.array([5.0]))
    # mean(min(L, 5)) - min(L) = (2.0 + 1.8 + 2.5 + 5.0) / 4 - 1.8
    np.testing.assert_allclose(got, [(2.0 + 1.8 + 2.5 + 5.0) / 4 - 1.8])
    assert lm.lr_sensitivity(results, "other", np.array([5.0])) is None


def test_natural_spikes_count_only_steps_without_a_bad_batch():
    losses = np.full((1, 120), 2.0)
    losses[0, [70, 90]] = 4.0  # 2x the running median
    bad = np.zeros((1, 120), bool)
    bad[0, 90] = True
    result = run_result(train_loss=losses)
    np.testing.assert_array_equal(lm.natural_spikes(result, bad), [1])


def test_one_seed_shows_no_spread_and_several_show_it():
    assert ratio_cell(np.array([1.02]), np.array([1.0])) == "+2.00 %"
    assert ratio_cell(np.array([1.01, 1.03]), np.array([1.0, 1.0])) == "+2.00 % ± 1.41"
    assert ratio_cell(np.array([np.nan]), np.array([1.0])) == "diverged"
    assert summarize(np.array([1.5])) == "1.50000"
    assert summarize(np.array([1.0, 2.0])) == "1.50000 ± 0.70711"
    assert summarize(np.array([1.0, np.inf])) == "1.00000 (1 diverged)"
