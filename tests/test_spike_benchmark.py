"""Smoke test of benchmarks/spike_benchmark.py: a tiny run produces the table and figure."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "spike_benchmark.py"
CONTENDERS = (
    "adam",
    "clip_by_global_norm + adam",
    "adaptive_grad_clip + adam",
    "zclip + adam",
    "skip-step + adam",
    "logadam",
    "alrc + adam",
    "alrc + logadam",
    "alrc_per_example + adam",
)
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
    assert "## Targets" in table

    figure = (tmp_path / "spike_benchmark.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure) > 10_000  # a real plot, not an empty canvas
