"""Every CLI mistake a new user makes ends in one line that says what was wrong and how to fix it (exit code
2), never a traceback; and nothing is created or deleted before the settings are known to be good. The
README's table "Bad input, and what kshot says" lists these cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_api_cli import write_folder

from kshot import cli as kshot_cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`kshot ARGS` through the real entry point (`kshot.cli.main`): exit code and everything printed."""
    monkeypatch.setattr(sys, "argv", ["kshot", *args])
    monkeypatch.delenv("KSHOT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        kshot_cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out + captured.err


@pytest.fixture
def photos(tmp_path) -> Path:
    return write_folder(tmp_path / "photos", classes=10, per_class=10, size=16)


QUICK = ["train", "protonet-omniglot-quick", "--no-eval"]
CASES = {
    "lr not a number": (QUICK + ["--set", "train.lr=fast"], "train.lr: input should be a valid number"),
    "steps not an integer": (QUICK + ["--set", "train.steps=abc"], "train.steps: input should be a valid integer"),
    "misspelt backbone option": (QUICK + ["--set", "backbone.hiden=32"], "did you mean 'hidden'"),
    "misspelt dataset option": (QUICK + ["--set", "dataset.imagesize=32"], "did you mean 'image_size'"),
    "unknown learner option": (QUICK + ["--set", "options.temperatur=2"], "options.temperatur: unknown setting"),
    "misspelt bn_mode": (QUICK + ["--set", "bn_mode=transductiv"], "'inference' or 'transductive'"),
    "unknown recipe": (["train", "protonet-omniglot-qiuck"], "no recipe named 'protonet-omniglot-qiuck'"),
    "override without =": (QUICK + ["--set", "train.steps"], "must look like key=value"),
    "cuda without a GPU": (QUICK + ["--device", "cuda:7"], "--device"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_settings_mistakes_are_one_line_with_exit_code_2(case, monkeypatch, capsys, tmp_path):
    args, expected = CASES[case]
    if "cuda" in case and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, output = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2, output
    assert expected in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "run").exists()  # nothing created


def test_own_folder_command_works_with_derived_defaults(photos, monkeypatch, capsys, tmp_path):
    """The README's own-folder command, on 10 classes x 10 images, with no --set but a short budget."""
    code, output = run_cli(monkeypatch, capsys, "train", "protonet-omniglot-quick", "--data", str(photos),
                           "--out", str(tmp_path / "mine"), "--set", "train.steps=2", "--set", "train.val_every=1",
                           "--set", "train.val_episodes=2", "--eval-episodes", "3", "--device", "cpu")
    assert code == 0, output
    assert "derived from the images: 1 channel" in output and "image_size 16" in output
    assert "train.ways 20 -> 6" in output and "evaluate[0].ways 5 -> 2" in output
    assert (tmp_path / "mine" / "results.json").is_file()


def test_infeasible_settings_fail_before_the_old_run_is_touched(photos, monkeypatch, capsys, tmp_path):
    out = tmp_path / "mine"
    common = ["train", "protonet-omniglot-quick", "--data", str(photos), "--out", str(out), "--device", "cpu",
              "--set", "train.steps=1", "--set", "train.val_every=1", "--set", "train.val_episodes=2", "--no-eval"]
    assert run_cli(monkeypatch, capsys, *common)[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for bad in (["--set", "train.ways=5000"], ["--set", "evaluate=[{ways: 500, shots: 1}]"]):
        code, output = run_cli(monkeypatch, capsys, *[a for a in common if a != "--no-eval"], "--overwrite", *bad)
        assert code == 2 and "Traceback" not in output and len(output.strip().splitlines()) == 1, output
        assert "500" in output
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the old run is intact


def test_data_mistakes_are_one_line(tmp_path, monkeypatch, capsys, photos):
    (tmp_path / "flat").mkdir()
    code, output = run_cli(monkeypatch, capsys, "train", "protonet-omniglot-quick", "--data", str(tmp_path / "flat"),
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "no sub-folders" in output and "Traceback" not in output
    (photos / "class00" / "broken.png").write_bytes(b"not an image")
    code, output = run_cli(monkeypatch, capsys, "train", "protonet-omniglot-quick", "--data", str(photos),
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "broken.png is not a readable image" in output and "Traceback" not in output
    code, output = run_cli(monkeypatch, capsys, "evaluate", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in output


def test_unexpected_failures_are_one_line_too(monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(kshot_cli, "load_recipe", explode)
    code, output = run_cli(monkeypatch, capsys, "train", "protonet-omniglot-quick")
    assert code == 1 and "boom second line" in output and "KSHOT_DEBUG=1" in output
    assert len(output.strip().splitlines()) == 1


def test_ctrl_c_during_training_says_where_the_checkpoint_is(monkeypatch, capsys, photos, tmp_path):
    """Ctrl-C reaches the trainer, which saves `last` and stops; click turns the interrupt into an Abort, and the
    user still reads the trainer's one line (where the checkpoint is, how to resume), with exit code 130."""
    import signal

    from kshot.learners.protonet import ProtoNet

    loss = ProtoNet.loss
    calls = {"n": 0}

    def interrupted_at_step_2(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return loss(self, batch)

    monkeypatch.setattr(ProtoNet, "loss", interrupted_at_step_2)
    run = tmp_path / "run"
    code, printed = run_cli(monkeypatch, capsys, *QUICK, "--data", str(photos), "--out", str(run), "--device", "cpu",
                            "--set", "train.steps=50", "--set", "train.val_every=0")
    assert code == 130
    assert "interrupted: training stopped by SIGINT at step 2; checkpoint saved in" in printed
    assert "Traceback" not in printed
    assert (run / "checkpoints" / "last" / "checkpoint.json").is_file()
