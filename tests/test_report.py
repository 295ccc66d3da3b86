"""benchmarks/report.py: the tables BENCHMARKS.md is generated from."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402


def row(recipe: str, ways: int, shots: int, accuracy: float, device: str = "cpu (1 threads)", **extra) -> dict:
    return {"method": recipe.split("-")[0], "recipe": recipe, "dataset": "omniglot-test-28px", "ways": ways,
            "shots": shots, "queries": 15, "episodes": 1000, "accuracy": accuracy, "ci95": 0.5,
            "bn_mode": "transductive", "train_steps": 40, "train_seconds": 420.0, "device": device, **extra}


def test_curve_points_keep_first_and_last_and_at_most_the_count():
    rows = [{"step": s} for s in range(1, 20)]
    picked = report.curve_points(rows, count=6)
    assert len(picked) == 6
    assert picked[0]["step"] == 1 and picked[-1]["step"] == 19
    assert [r["step"] for r in picked] == sorted(r["step"] for r in picked)
    assert report.curve_points(rows[:3], count=6) == rows[:3]


def test_settings_table_one_line_per_learner_by_device_and_setting():
    rows = [row("maml-omniglot-5way-1shot", 5, 1, 92.8, paper=98.7),
            row("fomaml-omniglot-20way-5shot", 20, 5, 71.0),
            row("maml-omniglot-20way-1shot", 20, 1, 82.7, device="NVIDIA H100"),
            row("maml-omniglot-5way-5shot", 5, 5, 50.0, episodes=200),  # too few episodes to report
            row("protonet-omniglot-1shot", 5, 1, 97.7)]  # not a gradient-based learner
    table = report.settings_table(rows, ("maml", "fomaml"), "cpu")
    lines = table.splitlines()
    assert lines[0] == "| learner | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | 20-way 5-shot |"
    maml, fomaml = lines[2], lines[3]
    assert maml.startswith("| maml | 92.80 +- 0.50 (40 steps, 7 min; paper 98.7) | not run | not run | not run |")
    assert fomaml == "| fomaml | not run | not run | not run | 71.00 +- 0.50 (40 steps, 7 min) |"
    assert "82.70" not in table and "97.70" not in table
    assert report.settings_table(rows, ("reptile",), "cpu") == ""


def test_maml_speed_states_the_baselines_own_thread_gain():
    import maml_speed

    rows = [{"method": maml_speed.BASELINE, "queries": 1, "ms": 1200.0, "threads": 2, "baseline_one_thread_ms": 1600.0},
            {"method": maml_speed.DISTRIBUTED, "queries": 1, "ms": 800.0, "threads": 2},
            {"method": maml_speed.BASELINE, "queries": 15, "ms": 4000.0, "threads": 2}]  # no one-thread time
    text = maml_speed.thread_gain_text(rows)
    assert "1.33x with 1 query a class" in text and "15 queries" not in text
    assert maml_speed.thread_gain_text(rows[1:]) == ""
