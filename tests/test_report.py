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


def test_headline_takes_each_cells_best_row_gpu_first_and_marks_what_is_below_the_paper():
    import headline

    rows = [row("protonet-omniglot-1shot", 5, 1, 99.1, paper=98.8),  # the best accuracy, but on the CPU
            row("protonet-omniglot-1shot", 5, 1, 97.0, device="NVIDIA H100", paper=98.8),
            row("protonet-omniglot-1shot-trainval", 5, 1, 98.5, device="NVIDIA H100", ece=1.234),
            row("protonet-omniglot-1shot", 20, 1, 95.7, device="NVIDIA H100", paper=96.0),  # paper within the CI
            row("protonet-omniglot-5shot", 5, 5, 99.9, device="NVIDIA H100", episodes=600),  # too few episodes
            row("matching-fce-omniglot-1shot", 5, 1, 90.0),  # a method of its own, without a paper figure
            {**row("protonet-miniimagenet-1shot", 5, 1, 60.0), "dataset": "miniimagenet-test"}]
    recipes = {("protonet", 5, 5): ["protonet-omniglot-5shot"], ("r2d2", 5, 1): ["r2d2-omniglot-5way-1shot"]}
    table = headline.headline_table(rows, recipes)
    lines = table.splitlines()
    assert lines[0].startswith("| method | setting | paper % | kshot % (95% CI) | vs paper | ECE % | device |")
    assert lines[2] == ("| protonet | 5-way 1-shot | 98.8 | 98.50 +- 0.50 | -0.30 | 1.23 | NVIDIA H100 | 7.0 min, "
                        "40 steps | protonet-omniglot-1shot-trainval |")
    assert lines[3].startswith("| protonet | 20-way 1-shot | 96.0 | 95.70 +- 0.50 | -0.30 |")
    assert lines[4].startswith("| matching-fce | 5-way 1-shot |  | 90.00 +- 0.50 |  |  | cpu (1 threads) |")
    assert len([line for line in lines if line.startswith("| ")]) == 4  # the header and 3 cells
    assert lines[-1] == ("Not scored yet on 1,000 episodes, though a shipped recipe evaluates it: protonet 5-way "
                         "5-shot (protonet-omniglot-5shot); r2d2 5-way 1-shot (r2d2-omniglot-5way-1shot).")
    below = headline.headline_table([row("maml-omniglot-5way-1shot", 5, 1, 93.58, paper=98.7)], {})
    assert "| **-5.12 below** |" in below
    assert headline.headline_table([row("x-omniglot", 5, 1, 90.0, episodes=200)], {}) == ""


def test_report_puts_the_headline_first(tmp_path, monkeypatch):
    import json

    import headline

    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "REPORT", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(headline, "recipe_cells", lambda: {})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "protonet-omniglot-1shot-gpu.json").write_text(
        json.dumps([row("protonet-omniglot-1shot", 5, 1, 98.7, device="NVIDIA H100", paper=98.8)]))
    text = report.write_report().read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles[:2] == [f"## {headline.TITLE}", "## Few-shot classification accuracy"]
    assert "| protonet | 5-way 1-shot | 98.8 | 98.70 +- 0.50 | -0.10 |" in text
