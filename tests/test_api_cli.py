"""The Keras-like API and the command line, on a user's own folder of images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_dataset
from PIL import Image

from kshot import FewShotModel
from kshot.cli import cli
from kshot.data import image_folder, load_dataset


def write_folder(root: Path, classes: int = 9, per_class: int = 6, size: int = 16) -> Path:
    data = synthetic_dataset(classes=classes, per_class=per_class, size=size, seed=5)
    images, labels = data.all_images()
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{index}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "images")


def test_image_folder_loads_classes_and_splits(folder):
    data = image_folder(folder, image_size=16, channels=1)
    assert data.num_classes == 9 and data.image_shape == (1, 16, 16) and (data.counts() == 6).all()
    splits = {s: load_dataset({"name": "folder", "path": str(folder), "image_size": 16, "channels": 1}, s)
              for s in ("train", "val", "test")}
    names = [set(d.base_names) for d in splits.values()]
    assert sum(len(n) for n in names) == 9 and not (names[0] & names[1] or names[0] & names[2])


def test_image_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no sub-folders"):
        image_folder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_folder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        image_folder(tmp_path / "flat")


def test_keras_like_api_fit_evaluate_adapt_predict_save_load(tmp_path):
    data = synthetic_dataset(classes=10, per_class=8, size=16, seed=1)
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    history = model.fit(data, val=data, ways=5, shots=1, queries=3, steps=30, val_every=15, val_episodes=10,
                        val_queries=3, run_dir=tmp_path / "run", progress=False)
    assert [row["step"] for row in history] == [15, 30]
    result = model.evaluate(data, ways=5, shots=1, queries=3, episodes=40, progress=False)
    assert result.accuracy > 60  # toy classes are easy; chance is 20%
    support, labels = data.subset([0, 1, 2]).all_images()
    names = ["cat", "dog", "owl"]
    classifier = model.adapt(support[::2], [names[i] for i in labels[::2].tolist()])
    predictions = classifier.predict(support[1::2])
    agreement = sum(p == names[i] for p, i in zip(predictions, labels[1::2].tolist())) / len(predictions)
    assert set(predictions) <= set(names) and agreement > 0.6
    assert classifier.predict_proba(support[:2]).sum(-1).allclose(torch.ones(2))
    model.save(tmp_path / "saved")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "saved")
    loaded = FewShotModel.load(tmp_path / "saved", device="cpu")
    assert loaded.adapt(support[::2], labels[::2]).predict(support[1::2]) == \
        model.adapt(support[::2], labels[::2]).predict(support[1::2])
    with pytest.raises(ValueError, match="model was built for"):
        loaded.adapt(torch.zeros(2, 1, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="one label per image"):
        loaded.adapt(support[:3], [0, 1])


def tiny_recipe(path: Path, train: str) -> Path:
    """A ProtoNet recipe on a folder dataset, training with `train` (YAML flow mapping items)."""
    path.write_text(f"""
learner: protonet
backbone: {{name: conv4, hidden: 8}}
dataset: {{name: folder, image_size: 16, channels: 1}}
train: {{ways: 3, shots: 1, queries: 2, val_ways: 2, val_queries: 2, val_episodes: 5, {train}}}
evaluate:
  - {{ways: 2, shots: 1, queries: 2, episodes: 10}}
""")
    return path


def test_cli_trains_evaluates_and_predicts_on_a_folder(folder, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", "steps: 6, val_every: 3")
    runner = CliRunner()
    run = tmp_path / "run"
    out = runner.invoke(cli, ["train", str(recipe), "--data", str(folder), "--out", str(run), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "2-way 1-shot" in out.output and (run / "results.json").is_file()
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    out = runner.invoke(cli, ["evaluate", str(run), "--ways", "2", "--shots", "1", "--queries", "2",
                              "--episodes", "10", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "2-way 1-shot" in out.output and "batch norm: inference" in out.output
    out = runner.invoke(cli, ["predict", str(run), "--support", str(folder), "--query",
                              str(folder / "class03"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[1].startswith("class") for line in lines)
    out = runner.invoke(cli, ["plot", str(run)])
    assert out.exit_code == 0, out.output
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    again = runner.invoke(cli, ["train", str(recipe), "--data", str(folder), "--out", str(run), "--device", "cpu"])
    assert again.exit_code != 0 and "already holds a training run" in str(again.exception)


def test_cli_errors_are_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kshot.cli", "train", "no-such-recipe"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "error: no recipe named 'no-such-recipe'" in result.stderr and "Traceback" not in result.stderr
    listed = subprocess.run([sys.executable, "-m", "kshot.cli", "recipes"], capture_output=True, text=True)
    assert "protonet-omniglot-1shot" in listed.stdout


def test_cli_trains_on_two_processes_under_torchrun(folder, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", "meta_batch: 2, steps: 4, val_every: 2")
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "kshot", "train", str(recipe),
               "--data", str(folder), "--out", str(run), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("2-way 1-shot") == 1, "only the main process evaluates"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    rows = json.loads((run / "results.json").read_text())
    assert rows[0]["device"].endswith("x 2 processes") and rows[0]["episodes"] == 10
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4], "one validation row each 2 steps, from the main process only"


def test_evaluate_defaults_to_the_batch_norm_mode_the_run_was_trained_with(folder, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli, ["train", "protonet-omniglot-quick", "--data", str(folder), "--out", str(run),
                                 "--no-eval", "--device", "cpu", "--set", "bn_mode=transductive",
                                 "--set", "train.val_bn_mode=transductive", "--set", "train.steps=2",
                                 "--set", "train.val_every=1", "--set", "train.val_episodes=2"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--ways", "2", "--queries", "2", "--episodes", "2",
                                 "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0 and "batch norm: transductive" in result.output, result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--ways", "2", "--queries", "2", "--episodes", "2",
                                 "--device", "cpu", "--bn-mode", "inference"], catch_exceptions=False)
    assert "batch norm: inference" in result.output
    assert FewShotModel.load(run, device="cpu").bn_mode == "transductive"
