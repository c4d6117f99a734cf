"""Smoke test of benchmarks/step_overhead.py: it runs and prints its table (no timings checked)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
sys.path.insert(0, str(SCRIPT.parent))
from step_overhead import RACED  # noqa: E402

CONTENDERS = ["base", *RACED]


# Low XLA optimisation: the programs compile faster, and no timing is checked.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


@pytest.mark.parametrize(
    "extra",
    [
        ["--layouts", "mlp", "--blocks", "3", "--cpu-vector-width", "512"],
        ["--layouts", "grid,transformer,scanned", "--grid", "4"],
    ],
    ids=["mlp", "layouts"],
)
def test_step_overhead_prints_a_row_per_contender(extra):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2e4", "--steps", "2", "--warmup", "1", *extra],
        capture_output=True,
        text=True,
        timeout=300,  # the layouts case takes about half a minute on 2 idle cores
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    wide_header = (
        "compiler_options={'xla_cpu_prefer_vector_width': 512} (every step, Adam included)"
    )
    assert (wide_header in lines) == ("--cpu-vector-width" in extra), result.stdout
    assert any(line.startswith("| contender | ms/step | x adam") for line in lines), result.stdout
    if "grid,transformer,scanned" in extra:
        assert any("grid: 0.02M parameters in 4 tensors" in line for line in lines), result.stdout
        assert any("transformer:" in line and "in 100 tensors" in line for line in lines)
        assert any("scanned:" in line and "in 12 tensors" in line for line in lines)
    else:  # 3 blocks of 7 tensors
        assert any(f"mlp: {0.02:.2f}M parameters in 21 tensors" in line for line in lines)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    for name in CONTENDERS:
        assert name in rows, f"no row for {name}:\n{result.stdout}"
    # The reference is the faster of the two identical Adam runners.
    adam_ratios = [float(rows[name].split("|")[3]) for name in ("base", "base (control)")]
    assert min(adam_ratios) == 1.0 and max(adam_ratios) >= 1.0, adam_ratios
    assert rows["base"].split("|")[8].strip() == "0"  # no extra state bytes over itself
    for name in CONTENDERS:
        cells = [cell.strip() for cell in rows[name].split("|")[1:-1]]
        assert float(cells[1]) > 0 and float(cells[5]) > 0  # ms/step, compile seconds
        assert float(cells[3]) > 0  # paired ratio
    # The last table: state Adam's plus O(1) scalars (ALRC's 36 bytes, 8 per tensor).
    tensors = int(
        next(line for line in reversed(lines) if "parameters in" in line)
        .split(" in ")[1]
        .split()[0]
    )
    for name in CONTENDERS:
        extra = int(rows[name].split("|")[8].strip().replace(",", ""))
        assert 0 <= extra <= 64 + 8 * tensors, rows[name]


def test_step_overhead_races_the_per_tensor_kernel_beside_the_grouped():
    command = [sys.executable, str(SCRIPT), "--layouts", "grid", "--grid", "4", "--steps", "2"]
    command += ["--warmup", "1", "--only", "log_dampen,spike_guard,tuned clip", "--per-tensor"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=ENV, check=False
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line[:2] == "| "]
    expected = ["log_dampen", "spike_guard", "log_dampen (per tensor)", "spike_guard (per tensor)"]
    assert all(name in rows for name in expected), result.stdout
    assert "tuned clip (per tensor)" not in rows  # no kernel to group


def test_step_overhead_refuses_fewer_than_one_block():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2e4", "--blocks", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--blocks must be at least 1, got 0" in result.stderr
