"""Smoke test of benchmarks/lm_spike_benchmark.py: a tiny run writes the whole report.

The model is shrunk (width 16, one layer, context 16) and XLA's optimisation lowered so
that the eleven contenders compile quickly; the code path is the benchmark's own.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCENARIOS = ("clean", "repeated_byte", "random_bytes")
TINY_RUN = """
import sys
sys.path.insert(0, "benchmarks")
import lm_spike_benchmark as lm
lm.WIDTH, lm.LAYERS, lm.HEADS, lm.CONTEXT = 16, 1, 2, 16
lm.CURVE_WINDOWS = 64
lm.CLIP_SWEEP = (0.3, 3.0)
lm.main(sys.argv[1:])
"""


def test_tiny_benchmark_writes_table_figure_and_targets(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    command = [sys.executable, "-c", TINY_RUN, "--steps", "40", "--seeds", "2"]
    command += ["--heldout-windows", "128"]
    command += ["--out", str(tmp_path), "--quiet"]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=600)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lm_spike_benchmark as lm

    report = (tmp_path / "lm_spike_benchmark.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for contender in lm.CONTENDERS:
        cells = [r for r in rows if r.startswith(f"| {contender.name} |")]
        assert len(cells) >= 3, f"{contender.name}: missing from the tables"
        ratio_cells = [c.strip() for c in cells[0].split("|")[2:-1]]
        assert len(ratio_cells) == len(SCENARIOS)
        assert all(c.endswith(tuple("0123456789")) or c == "diverged" for c in ratio_cells)
    header = next(r for r in rows if r.startswith("| method | clean"))
    assert all(s in header for s in SCENARIOS)
    for section in ("## Targets", "## Interventions", "## Whole training-step time"):
        assert section in report
    assert "SHA-256" in report and "Machine:" in report and "chosen:" in report
    assert f"| {lm.RECOMMENDED} | random_bytes |" in report

    figure = (tmp_path / "lm_spike_benchmark.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure) > 20_000  # three panels of curves, not an empty canvas


def test_one_seed_shows_no_spread_and_several_show_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from lm_spike_benchmark import ratio_cell

    from reporting import summarize

    assert ratio_cell(np.array([1.02]), np.array([1.0])) == "+2.0 %"
    assert ratio_cell(np.array([1.01, 1.03]), np.array([1.0, 1.0])) == "+2.0 % ± 1.4"
    assert ratio_cell(np.array([np.nan]), np.array([1.0])) == "diverged"
    assert summarize(np.array([1.5])) == "1.50000"
    assert summarize(np.array([1.0, 2.0])) == "1.50000 ± 0.70711"
    assert summarize(np.array([1.0, np.inf])) == "1.00000 (1 diverged)"
