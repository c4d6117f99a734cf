"""benchmarks/natural_spikes.py: the slingshot task's data, its training and its report."""

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import natural_spikes as ns  # noqa: E402


def test_the_training_images_are_few_fixed_and_never_tested_on():
    data = ns.load_digits()
    assert data.x_train.shape == (ns.TRAIN, 64) and data.x_test.shape == (1797 - ns.TRAIN, 64)
    again = ns.load_digits()
    np.testing.assert_array_equal(data.x_train, again.x_train)
    train = {row.tobytes() for row in np.asarray(data.x_train)}
    test = [row.tobytes() for row in np.asarray(data.x_test)]
    # Digits holds a few duplicate images; a held-out image equal to a training one is
    # a duplicate of the data set, not a leak of the split (there are fewer than 1 %).
    assert sum(t in train for t in test) < 0.01 * len(test)
    assert set(np.asarray(data.y_train).tolist()) == set(range(10))


def test_a_short_run_trains_and_records_every_step(monkeypatch, tmp_path):
    monkeypatch.setattr(ns, "CONTENDERS", ("base", "spike_guard (on the update)"))
    monkeypatch.setattr(ns, "RATE_CONTENDERS", ("base",))
    monkeypatch.setattr(ns, "RATE_MULTIPLES", (1.0, 3.0))
    ns.main(["--steps", "150", "--seeds", "2", "--out", str(tmp_path), "--quiet"])
    report = (tmp_path / "natural_spikes.md").read_text()
    assert "## Adam's own spikes: the slingshot" in report
    assert "`spike_guard (on the update)`" in report and "LR sensitivity" in report
    record = json.loads((tmp_path / "natural_spikes.json").read_text())
    losses = record["slingshot"]["base | 1x"]["test_loss"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and max(losses) < np.log(10)
    figure = (tmp_path / "slingshot.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n"
