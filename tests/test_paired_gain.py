"""benchmarks/paired_gain.py: the paired 95% CI of per-episode differences, and two runs scored on the same
episodes end to end."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny_run, write_image_folders

from kshot.evaluation import mean_ci95 as kshot_mean_ci95

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paired_gain  # noqa: E402


def test_paired_ci_is_the_ci_of_the_per_episode_differences():
    baseline = [80.0, 60.0, 100.0, 40.0, 73.3]
    candidate = [86.7, 60.0, 100.0, 53.3, 80.0]
    differences = [6.7, 0.0, 0.0, 13.3, 6.7]
    mean = sum(differences) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)  # sample standard deviation
    gain, ci = paired_gain.paired_difference(baseline, candidate)
    assert gain == pytest.approx(mean) and ci == pytest.approx(1.959963984540054 * std / math.sqrt(5))
    # The same interval as kshot's evaluation gives accuracies (kshot.evaluation.mean_ci95, in torch).
    assert (gain, ci) == pytest.approx(kshot_mean_ci95(torch.tensor(differences)))
    assert paired_gain.wins_ties_losses(baseline, candidate) == (3, 2, 0)
    with pytest.raises(ValueError, match="same episodes"):
        paired_gain.paired_difference(baseline, candidate[:4])


def test_pairing_removes_the_variation_between_episodes():
    # Episodes of very different difficulty, and a candidate that is 2 points better on each, give or take 1:
    # the unpaired interval is dominated by the difficulty spread, the paired one only sees the +-1.
    generator = np.random.default_rng(0)
    difficulty = generator.uniform(40, 100, 200)
    baseline = list(difficulty)
    candidate = list(difficulty + 2 + generator.uniform(-1, 1, 200))
    gain, paired = paired_gain.paired_difference(baseline, candidate)
    unpaired = paired_gain.unpaired_ci95(baseline, candidate)
    assert gain == pytest.approx(2, abs=0.2)
    assert paired < 0.2 < 2 < unpaired  # significant when paired, not when the pairing is ignored
    assert unpaired == pytest.approx(math.hypot(paired_gain.mean_ci95(baseline)[1],
                                                paired_gain.mean_ci95(candidate)[1]))
    assert paired_gain.mean_ci95([5.0]) == (5.0, pytest.approx(float("nan"), nan_ok=True))
    assert paired_gain.mean_ci95([1.0, 3.0])[1] == pytest.approx(1.959963984540054 * statistics.stdev([1, 3])
                                                                 / math.sqrt(2))


def test_two_runs_are_scored_on_the_same_episodes_with_their_paired_gain(tmp_path):
    data = tmp_path / "data"
    write_image_folders(data / "train", classes=6, per_class=4, seed=0)
    write_image_folders(data / "test", classes=5, per_class=4, seed=1)
    setting = [{"ways": 3, "shots": 1, "queries": 2, "episodes": 4}]  # what both recipes evaluate
    baseline = train_tiny_run(data, "protonet", tmp_path / "proto", {}, evaluate=setting)
    candidate = train_tiny_run(data, "protonet-hallucination", tmp_path / "hall", {"hallucinate": 2},
                               evaluate=setting)
    rows = paired_gain.paired_gain(str(baseline), str(candidate), episodes=6, queries=2, progress=False)
    assert [(r["role"], r["method"], r["ways"], r["shots"]) for r in rows] == [
        ("baseline", "protonet", 3, 1), ("candidate", "protonet-hallucination", 3, 1)]  # the recipes' setting
    base, cand = rows
    assert base["episodes_digest"] == cand["episodes_digest"] and base["pair"] == cand["pair"] == "hall vs proto"
    assert cand["gain"] == pytest.approx(cand["accuracy"] - base["accuracy"], abs=2e-3)  # mean of differences
    assert cand["wins"] + cand["ties"] + cand["losses"] == 6
    for key in ("method", "dataset", "ways", "shots", "queries", "episodes", "accuracy", "ci95", "bn_mode",
                "train_seconds", "commit"):
        assert key in base and key in cand
    text = paired_gain.section([{**r, "command": "cmd"} for r in rows])
    assert f"| 3-way 1-shot | protonet (proto) | {base['accuracy']:.2f} +- " in text
    assert f"{cand['gain']:+.2f} +- {cand['gain_ci95']:.2f}" in text and "`cmd`" in text
    assert paired_gain.result_name(rows, "") == "paired-gain-hall-vs-proto"
    with pytest.raises(ValueError, match="no setting in common"):
        paired_gain.shared_settings([{"recipe": {"evaluate": [{"ways": 5, "shots": 1}]}},
                                     {"recipe": {"evaluate": [{"ways": 5, "shots": 5}]}}])
