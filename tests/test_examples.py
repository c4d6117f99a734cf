"""Smoke tests: the Flax and Equinox examples train, clip the bad batches, and report.

Each example's ``main(argv)`` is what ``python examples/<script> ...`` runs; it is
called in-process here (with few steps) to save the interpreter and JAX start-up.
"""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(script):
    if str(EXAMPLES) not in sys.path:  # as for ``python examples/<script>``: its helpers
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(
        "example_" + script.removesuffix(".py"), EXAMPLES / script
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Linen modules) look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["flax_linen_digits.py", "flax_nnx_digits.py"])
def test_example_trains_and_logs_diagnostics(script, capsys):
    example = load_example(script)
    assert "__main__" in (EXAMPLES / script).read_text()  # runnable as a script
    accuracy = example.main(["--steps", "200", "--corrupt-every", "25"])
    out, err = capsys.readouterr()
    assert f"test accuracy: {accuracy:.4f}" in out
    num_clipped = float(re.search(r"'num_clipped': (\S+?),", out).group(1))
    assert accuracy > 0.85  # 200 steps of a small MLP: far above chance (0.1)
    assert 1 <= num_clipped <= 8  # some of the 8 corrupted batches, hardly any clean one
    assert "200/200" in err  # the tqdm progress bar ran to the end
    # Logged numbers are plain: counters are ints, float32 values their shortest decimal.
    assert re.search(r"'num_clipped': \d+, ", out) and re.search(r"'num_steps': 200, ", out)
    floats = re.findall(r"'(?:clip_rate|mean|std|threshold)': ([^,}]+)", out)
    assert floats
    for value in floats:
        assert value == str(np.float32(value)), value  # not 0.009999999776482582
    # Every redraw of the bar (capsys is not a terminal) shows the count of its own step:
    # a postfix first set at step 25 never appears next to a count below 25.
    frames = [frame for frame in err.split("\r") if "clipped=" in frame]
    counts = [int(re.search(r"(\d+)/200", frame).group(1)) for frame in frames]
    assert counts and min(counts) >= 25 and counts == sorted(counts), counts


def test_equinox_example_trains_and_guards_the_bad_batches(capsys):
    example = load_example("equinox_lm.py")
    assert "__main__" in (EXAMPLES / "equinox_lm.py").read_text()  # runnable as a script
    numbers = example.main(["--steps", "60", "--bad-every", "25"])
    out = capsys.readouterr().out
    bad_steps = [line for line in out.splitlines() if "(bad batch)" in line]
    assert [line.split()[1] for line in bad_steps] == ["25", "50"]
    for line in bad_steps:  # the repeated-byte batch's gradient is cut, not applied
        assert float(re.search(r"gradient scaled by ([\d.]+),", line).group(1)) < 0.5, line
    assert 2 <= numbers["grad_norm/num_clipped"] <= 3  # the bad batches, hardly a clean one
    before = float(re.search(r"held-out loss before training: ([\d.]+)", out).group(1))
    assert numbers["held_out_loss"] < before - 2.0  # it learned: about 5.7 -> 2.9
    assert f"held-out loss after 60 steps: {numbers['held_out_loss']:.3f}" in out
