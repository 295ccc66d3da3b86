"""benchmarks/compare.py: several runs scored on identical episodes, and its BENCHMARKS.md section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import train_tiny_run, write_image_folders

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402


def test_runs_are_compared_on_identical_episodes(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folders(data / "train", classes=6, per_class=4, seed=0)
    write_image_folders(data / "test", classes=5, per_class=4, seed=1)
    runs = [str(train_tiny_run(data, "matching", tmp_path / "matching", {})),
            str(train_tiny_run(data, "simpleshot", tmp_path / "simpleshot", {"batch_size": 8})),
            str(train_tiny_run(data, "relation", tmp_path / "relation", {"relation_channels": 8},
                               {"name": "conv4", "hidden": 8, "flatten": False}) / "checkpoints" / "best")]
    rows = compare.compare(runs, compare.parse_settings("3x1,5x2"), episodes=4, queries=2, progress=False)
    assert len(rows) == 6
    assert {r["run"] for r in rows} == {"matching", "simpleshot", "relation"}
    for setting in ((3, 1), (5, 2)):
        same = [r for r in rows if (r["ways"], r["shots"]) == setting]
        assert len({r["episodes_digest"] for r in same}) == 1
    assert len({r["dataset_fingerprint"] for r in rows}) == 1
    assert rows[0]["dataset_fingerprint"] in capsys.readouterr().out
    text = compare.section([{**r, "comparison": "comparison-test", "command": "cmd"} for r in rows])
    assert "| 3-way 1-shot | 5-way 2-shot |" in text and rows[0]["episodes_digest"] in text


def test_runs_are_scored_on_their_recipes_settings_and_share_a_row_per_method(tmp_path):
    data = tmp_path / "data"
    write_image_folders(data / "train", classes=6, per_class=4, seed=0)
    write_image_folders(data / "test", classes=5, per_class=4, seed=1)
    one = {"ways": 3, "shots": 1, "queries": 2, "episodes": 4}
    two = {"ways": 3, "shots": 2, "queries": 2, "episodes": 4}
    runs = [str(train_tiny_run(data, "protonet", tmp_path / "proto-1shot", {}, evaluate=[one])),
            str(train_tiny_run(data, "protonet", tmp_path / "proto-2shot", {}, evaluate=[two]))]
    rows = compare.compare(runs, compare.parse_settings("3x1,3x2"), episodes=4, queries=2, progress=False)
    assert [(r["run"], r["shots"]) for r in rows] == [("proto-1shot", 1), ("proto-2shot", 2)]
    text = compare.section([{**r, "comparison": "comparison-test", "command": "cmd"} for r in rows])
    assert "| protonet | proto-1shot, proto-2shot |" in text
    import kshot.evaluation

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a row for the same weights and episodes should have been reused")

    original, kshot.evaluation.evaluate = kshot.evaluation.evaluate, no_evaluation
    try:
        again = compare.compare(runs, compare.parse_settings("3x1,3x2"), episodes=4, queries=2, progress=False,
                                previous=rows)
    finally:
        kshot.evaluation.evaluate = original
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    every = compare.compare(runs, compare.parse_settings("3x1,3x2"), episodes=4, queries=2, progress=False,
                            all_settings=True)
    assert len(every) == 4
    text = compare.section([{**r, "comparison": "comparison-test", "command": "cmd"} for r in every])
    assert "| protonet | proto-1shot |" in text and "| protonet | proto-2shot |" in text


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="NxK"):
        compare.parse_settings("5-1")
    with pytest.raises(FileNotFoundError, match="run folder"):
        compare.checkpoint_folder(tmp_path)


def test_a_runs_backbone_is_scored_with_transductive_methods_beside_it(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folders(data / "train", classes=6, per_class=4, seed=0)
    write_image_folders(data / "test", classes=5, per_class=4, seed=1)
    run = str(train_tiny_run(data, "protonet", tmp_path / "proto", {}))
    runs = [run, f"{run}@bd-cspn", f"{run}@laplacianshot", f"{run}@pt-map"]
    rows = compare.compare(runs, compare.parse_settings("3x1"), episodes=3, queries=2, progress=False)
    assert [(r["run"], r["method"], r["transductive"]) for r in rows] == [
        ("proto", "protonet", False), ("proto@bd-cspn", "bd-cspn", True),
        ("proto@laplacianshot", "laplacianshot", True), ("proto@pt-map", "pt-map", True)]
    assert len({r["episodes_digest"] for r in rows}) == 1 and len({r["weights_digest"] for r in rows}) == 1
    assert rows[1]["trained_as"] == "protonet" and rows[1]["method_options"]["scale"] == 10.0
    assert "computing it from" in capsys.readouterr().out  # a ProtoNet keeps no base-class mean
    text = compare.section([{**r, "comparison": "comparison-test", "command": "cmd"} for r in rows])
    assert "| method | runs | transductive |" in text
    assert "| protonet | proto | no |" in text and "| laplacianshot | proto@laplacianshot | yes |" in text
    # A row is reused only for the same method and method settings (the same weights serve all four).
    import kshot.evaluation

    calls = []
    original = kshot.evaluation.evaluate
    kshot.evaluation.evaluate = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        for previous, evaluations in ((rows[:1], 1), (rows, 0)):
            calls.clear()
            again = compare.compare([f"{run}@bd-cspn"], compare.parse_settings("3x1"), episodes=3, queries=2,
                                    progress=False, previous=previous)
            assert len(calls) == evaluations and again[0]["accuracy"] == rows[1]["accuracy"]
    finally:
        kshot.evaluation.evaluate = original
    assert compare.reusable(rows, {**rows[1], "method_options": {**rows[1]["method_options"], "scale": 5.0}}) is None
    with pytest.raises(ValueError, match="unknown transductive method 'tmi' after '@'; choose one of tim"):
        compare.split_method(f"{run}@tmi")
    assert compare.split_method(f"{run}@tim") == (run, "tim") and compare.split_method(run) == (run, None)
