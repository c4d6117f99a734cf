"""Smoke test of benchmarks/spike_benchmark.py: a tiny run produces the table and figure."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "spike_benchmark.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from spike_benchmark import CONTENDERS  # noqa: E402

from reporting import Label, best_of_sweep, markdown_table, method_rows  # noqa: E402

SCENARIOS = ("quartic_high_lr", "mse_stable", "mse_corrupt", "mse_high_lr")


def test_tiny_benchmark_writes_table_and_figure(tmp_path):
    # Low XLA optimisation: ten small programs compile ~3x faster; 30 steps run fast anyway.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    command = [sys.executable, str(SCRIPT), "--steps", "30", "--seeds", "2"]
    command += ["--batch-sizes", "2", "--out", str(tmp_path), "--quiet"]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=300)

    table = (tmp_path / "spike_benchmark.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line[:2] == "| "}
    for name in CONTENDERS:
        assert name in rows, f"{name} missing from the table"
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert len(cells) == len(SCENARIOS)
        assert all("±" in c or c.startswith("diverged") for c in cells), rows[name]
    header = next(line for line in table.splitlines() if line.startswith("| batch 2 |"))
    assert all(s in header for s in SCENARIOS)
    assert "Machine:" in table and "threshold tuned by a sweep" in table
    assert "## Targets" in table and "SPEC" not in table

    figure = (tmp_path / "spike_benchmark.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure) > 10_000  # a real plot, not an empty canvas


def test_default_output_is_ignored_by_git(monkeypatch):
    """The README's main command must leave a clone clean: by default the report goes
    to a directory git ignores; the committed results are rewritten only on request."""
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "rev-parse"], capture_output=True, check=False).returncode:
        pytest.skip("not a git checkout")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its helpers, as for `python SCRIPT`
    spec = importlib.util.spec_from_file_location("spike_benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look it up
    spec.loader.exec_module(benchmark)
    calls = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda **kwargs: calls.append(kwargs))
    benchmark.main([])  # the README's command: no flags
    benchmark.main(["--out", "benchmarks/results"])  # regenerate the committed report
    default_out, requested_out = (call["out_dir"] for call in calls)
    for name in ("spike_benchmark.md", "spike_benchmark.png"):
        ignored = subprocess.run([*git, "check-ignore", "-q", os.path.join(default_out, name)])
        assert ignored.returncode == 0, f"{default_out}/{name} is not ignored by git"
    assert requested_out == "benchmarks/results"


def test_the_sweep_chooses_the_lowest_mean_and_never_a_diverged_value():
    labels = [Label("clean", seed, None, h) for h in (0.1, 1.0, 3.0) for seed in (0, 1)]
    finals = np.array([2.0, 2.2, 1.0, np.nan, 2.1, 2.0], np.float32)
    best, means = best_of_sweep(labels, finals, "hyper")
    assert best == 3.0 and means[1.0] == np.inf
    assert list(means) == [0.1, 1.0, 3.0] and means[0.1] == pytest.approx(2.1)


def test_a_method_that_ran_nothing_has_no_row():
    cells = {("a", "x"): "1.0", ("b", "x"): "—", ("c", "x"): ""}
    rows = method_rows(["a", "b", "c"], ["x", "y"], lambda n, s: cells.get((n, s), "—"))
    assert rows == [["`a`", "1.0", "—"]]
    assert markdown_table(["method", "x", "y"], rows) == (
        "| method | x | y |\n|---|---|---|\n| `a` | 1.0 | — |"
    )
