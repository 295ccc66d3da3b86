"""benchmarks/gpu_session.py: recipes run inside a call's deadline, resumed in the next call from the packed state,
finished runs skipped, training time summed over the calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  (imported here, as a process's first optimiser does, not in a timed call)
from conftest import synthetic_dataset
from PIL import Image

import kshot.pipeline  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_session  # noqa: E402
from gpu_session import Spec, run_worker  # noqa: E402

STEPS = 100_000  # never reached: the runs below end by their time budget or the call's deadline


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A ProtoNet recipe on a folder of 16x16 images (9 classes), evaluated at two settings."""
    data = synthetic_dataset(classes=9, per_class=6, size=16, seed=3)
    images = tmp_path / "images"
    for label in range(9):
        folder = images / f"class{label:02d}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(data.images[int(data.offsets[label]) + i, 0].numpy()).save(folder / f"{i}.png")
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
learner: protonet
backbone: {{name: conv4, hidden: 8}}
dataset: {{name: folder, path: {images}, image_size: 16, channels: 1}}
train: {{ways: 3, shots: 1, queries: 2, val_ways: 2, val_queries: 2, val_episodes: 4, steps: {STEPS},
         val_every: 40, log_every: 1}}
evaluate:
  - {{ways: 2, shots: 1, queries: 2, episodes: 10}}
  - {{ways: 2, shots: 2, queries: 2, episodes: 10}}
""")
    return path


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_spec_reads_a_budget_and_a_step_cap_after_the_recipe():
    assert Spec.parse("protonet-omniglot-1shot:420") == Spec("protonet-omniglot-1shot:420", "protonet-omniglot-1shot",
                                                             420.0)
    assert Spec.parse("protonet-omniglot-1shot", 300.0).budget == 300.0
    reptile = Spec.parse("reptile-omniglot-5way-1shot:900:20000")
    assert (reptile.recipe, reptile.budget, reptile.steps) == ("reptile-omniglot-5way-1shot", 900.0, 20000)
    assert "train.steps=20000" in reptile.overrides([], 60.0) and reptile.canonical == reptile.text
    capped = Spec.parse("maml-omniglot-5way-1shot::5000", 600.0)  # the --budget default, written out for rows
    assert (capped.budget, capped.steps, capped.canonical) == (600.0, 5000, "maml-omniglot-5way-1shot:600:5000")
    assert Spec.parse("dir:x/recipe.yaml").recipe == "dir:x/recipe.yaml"  # no number after the colon
    with pytest.raises(SystemExit, match="positive number of seconds"):
        Spec.parse("protonet-omniglot-1shot:0")
    with pytest.raises(SystemExit, match="positive whole number"):
        Spec.parse("protonet-omniglot-1shot:60:2.5")


def test_run_cut_by_the_deadline_resumes_and_sums_its_training_time(recipe, tmp_path):
    results = tmp_path / "results"
    # Call 1: a budget far off, but the call's stop 0.8 s away: training pauses with a checkpoint, no rows.
    first = run_worker(Spec.parse(f"{recipe}:60"), tmp_path / "machine1" / "state", stop_at=time.time() + 0.8,
                       margin=0.0, results=results)
    assert first["state"] == "paused" and 0 < first["steps"] < STEPS
    assert not (results / "tiny-gpu.json").exists()
    # What comes back from the call and is carried into the next, on a fresh machine.
    (packed,) = gpu_session.pack(tmp_path / "machine1" / "state", tmp_path / "out")
    with tarfile.open(packed) as tar:
        tar.extractall(tmp_path / "machine2", filter="data")
    state = tmp_path / "machine2" / "state"
    paths = gpu_session.StatePaths(state, "tiny-gpu")
    checkpoint = gpu_session.last_checkpoint(paths.run)
    assert checkpoint["step"] == first["steps"] and checkpoint["train_seconds"] == pytest.approx(first["train_seconds"])
    t1 = first["train_seconds"]
    # Call 2 (another budget is a resumable change): trains 0.25 s more, then evaluates and writes rows.
    second = run_worker(Spec.parse(f"{recipe}:{t1 + 0.25}"), state, results=results)
    assert second["state"] == "done" and second["training_calls"] == 2
    rows = json.loads(paths.results.read_text())
    assert rows == json.loads((results / "tiny-gpu.json").read_text())
    assert [(r["ways"], r["shots"]) for r in rows] == [(2, 1), (2, 2)]
    assert all(r["train_steps"] > first["steps"] and 0 <= r["accuracy"] <= 100 for r in rows)
    assert rows[0]["train_seconds"] == pytest.approx(t1 + 0.25, abs=0.15)  # both calls' training (rows round to 0.1)
    assert "trained over 2 calls" in rows[0]["command"]
    # The log goes on where the checkpoint was: steps once each, the training clock going on from call 1's.
    log = [r for r in logged(paths.run) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, rows[0]["train_steps"] + 1))
    assert log[first["steps"]]["seconds"] > t1
    assert (results / "logs" / "tiny-gpu.metrics.jsonl").read_text() == (paths.run / "metrics.jsonl").read_text()
    resumed = json.loads((paths.run / "checkpoints" / "last" / "checkpoint.json").read_text())["resumed"]
    assert any("train.time_budget_s" in change["changed"] for change in resumed)


def test_trained_run_whose_evaluation_was_cut_is_only_evaluated(recipe, tmp_path):
    state = tmp_path / "state"
    run_worker(Spec.parse(f"{recipe}:0.3"), state, results=tmp_path / "results")
    paths = gpu_session.StatePaths(state, "tiny-gpu")
    rows = json.loads(paths.results.read_text())
    paths.results.unlink()  # as if the call had ended during evaluation
    status = json.loads(paths.status.read_text())
    status["state"] = "evaluating"
    paths.status.write_text(json.dumps(status))
    last = (paths.run / "checkpoints" / "last" / "checkpoint.json").read_text()
    again = run_worker(Spec.parse(f"{recipe}:0.3"), state, results=tmp_path / "results")
    assert again["state"] == "done" and again["training_calls"] == 1
    assert (paths.run / "checkpoints" / "last" / "checkpoint.json").read_text() == last  # not trained again
    assert [r["accuracy"] for r in json.loads(paths.results.read_text())] == [r["accuracy"] for r in rows]


def test_session_skips_finished_runs_and_packs_what_resumes(recipe, tmp_path, monkeypatch, capsys):
    state, out = tmp_path / ".gpu-session", tmp_path / "out"
    run_worker(Spec.parse(f"{recipe}:0.3"), state, results=tmp_path / "results")
    (state / "runs" / "tiny-gpu" / "checkpoints" / ".last.123.partial").mkdir()  # a killed save's leftovers

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(gpu_session, "launch", refuse)
    gpu_session.main([f"{recipe}:0.3", "--device", "cpu", "--state", str(state), "--out", str(out),
                      "--results", str(tmp_path / "results")])
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("tiny-gpu"))
    assert " done " in line and "2-way 1-shot" in line and "2-way 2-shot" in line and "+-" in line
    assert "1 of 1 runs finished; all done" in printed
    with tarfile.open(out / gpu_session.PACK) as tar:
        names = set(tar.getnames())
    assert {".gpu-session/results/tiny-gpu.json", ".gpu-session/status/tiny-gpu.json",
            ".gpu-session/runs/tiny-gpu/metrics.jsonl",
            ".gpu-session/runs/tiny-gpu/checkpoints/best/model.safetensors"} <= names
    # a finished run needs no optimiser state to go on; locks and half-written saves are never packed
    assert not any("checkpoints/last" in name or name.endswith(".lock") or ".partial" in name for name in names)


def test_collect_copies_finished_rows_and_logs_and_regenerates_the_report(recipe, tmp_path, monkeypatch, capsys):
    import headline
    import report

    state = tmp_path / "unpacked" / ".gpu-session"
    run_worker(Spec.parse(f"{recipe}:0.3"), state, results=tmp_path / "device-results")  # as on the device
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "REPORT", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(headline, "recipe_cells", lambda: {})
    gpu_session.main(["--collect", "--state", str(state)])
    assert json.loads((tmp_path / "results" / "tiny-gpu.json").read_text()) == \
        json.loads((state / "results" / "tiny-gpu.json").read_text())
    assert (tmp_path / "results" / "logs" / "tiny-gpu.metrics.jsonl").is_file()
    assert "| protonet | tiny | images-test | 2-way 1-shot |" in (tmp_path / "BENCHMARKS.md").read_text()
    assert " done " in capsys.readouterr().out


def test_large_state_is_split_into_parts_that_join_back(tmp_path, monkeypatch):
    state = tmp_path / "state"
    (state / "runs").mkdir(parents=True)
    (state / "runs" / "weights.bin").write_bytes(os.urandom(16384))  # random: gzip cannot shrink it
    monkeypatch.setattr(gpu_session, "FILE_LIMIT", 4096)
    parts = gpu_session.pack(state, tmp_path / "out")
    assert len(parts) >= 4 and all(p.stat().st_size <= 4096 for p in parts)
    joined = tmp_path / "joined.tgz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    assert (tmp_path / "back" / "state" / "runs" / "weights.bin").read_bytes() == \
        (state / "runs" / "weights.bin").read_bytes()


REAL_POPEN = subprocess.Popen


class InProcess:
    """Stands in for a worker's process: runs the `gpu_session.py --worker ...` command line it is given here
    (other commands, such as git's, run as usual)."""

    def __new__(cls, command, *args, **kwargs):
        if len(command) < 3 or Path(command[1]).name != "gpu_session.py":
            return REAL_POPEN(command, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, command: list[str], *args, **kwargs) -> None:
        assert command[2] == "--worker"
        self.returncode = gpu_session.main(command[2:])

    def poll(self) -> int:
        return self.returncode


def test_session_runs_each_recipe_through_the_worker_command_line(recipe, tmp_path, monkeypatch, capsys):
    import kshot.allocator

    monkeypatch.setattr(subprocess, "Popen", InProcess)
    monkeypatch.setattr(kshot.allocator, "tune_malloc", lambda: False)  # not this test process's malloc
    state, results = tmp_path / "state", tmp_path / "results"
    gpu_session.main([str(recipe), "--budget", "0.3", "--device", "cpu", "--state", str(state), "--results",
                      str(results), "--deadline", "120", "--out", str(tmp_path / "out"), "--set", "train.val_every=5"])
    printed = capsys.readouterr().out
    assert "tiny-gpu: done" in printed and "1 of 1 runs finished; all done" in printed
    rows = json.loads((results / "tiny-gpu.json").read_text())
    assert rows[0]["train_seconds"] == pytest.approx(0.3, abs=0.15)
    assert rows[0]["command"] == f"python benchmarks/gpu_session.py --device cpu --tag gpu --set train.val_every=5 " \
        f"{recipe}:0.3"
    validated = [r["step"] for r in logged(state / "runs" / "tiny-gpu") if "val_accuracy" in r]
    assert validated[0] == 5 and all(step % 5 == 0 for step in validated[:-1])  # the --set reached the worker
    calls = json.loads((state / "session.json").read_text())
    assert calls[-1]["pending"] == ["tiny-gpu"] and (tmp_path / "out" / gpu_session.PACK).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the session put the handler back


def test_worker_stopped_mid_training_resumes_from_its_cadence_checkpoint(recipe, tmp_path):
    """The backstop for a run still training at the stop: SIGTERM raises StopSession in the worker; the run
    folder stays resumable and loses at most `checkpoint_every` seconds."""
    state = tmp_path / "state"
    paths = gpu_session.StatePaths(state, "tiny-gpu")

    def stop(signum, frame):
        raise gpu_session.StopSession(143)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 0.8)
    try:
        with pytest.raises(gpu_session.StopSession):
            run_worker(Spec.parse(f"{recipe}:60"), state, checkpoint_every=0.1, results=tmp_path / "results")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert json.loads(paths.status.read_text())["state"] == "stopped"
    checkpoint = gpu_session.last_checkpoint(paths.run)
    assert checkpoint["step"] > 0
    again = run_worker(Spec.parse(f"{recipe}:{checkpoint['train_seconds'] + 0.1}"), state,
                       results=tmp_path / "results")
    assert again["state"] == "done" and again["training_calls"] == 2
    rows = json.loads(paths.results.read_text())
    assert rows[0]["train_steps"] > checkpoint["step"]


def test_workers_still_going_at_the_stop_get_sigterm_then_sigkill(tmp_path):
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline() == "ready\n"
    jobs = [gpu_session.Job(Spec.parse("x"), gpu_session.StatePaths(tmp_path, "x"), {}, [], process)
            for process in (polite, stubborn)]
    began = time.perf_counter()
    gpu_session.stop_workers(jobs, grace=0.5)
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL
    assert time.perf_counter() - began < 5
    stubborn.stdout.close()
