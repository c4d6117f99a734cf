"""Smoke test of examples/spike_demo.py: it runs and ALRC catches the corrupted steps."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "spike_demo.py"


def test_spike_demo_runs_and_alrc_clips_the_corrupted_steps(capsys):
    spec = importlib.util.spec_from_file_location("spike_demo", EXAMPLE)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main(["--steps", "300", "--batch-size", "8"])
    rows = {
        line[:16].strip(): line[16:].split() for line in capsys.readouterr().out.splitlines()[2:]
    }
    assert set(rows) == {"adam (clean)", "adam", "logadam", "alrc + adam", "alrc + logadam"}
    for name in ("alrc + adam", "alrc + logadam"):
        _, ratio, clipped = rows[name]
        assert int(clipped) >= 2  # steps 100 and 200 are corrupted
        assert float(ratio) < float(rows["adam"][1])
