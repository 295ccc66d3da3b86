"""The input contract: the same raw file gives the same tensor at training and at prediction, on every path."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_dataset
from PIL import Image

from kshot import FewShotModel
from kshot.cli import cli
from kshot.data import InputContract, InputError, image_folder, load_dataset, omniglot_contract
from kshot.data.contract import read_image

CONTRACT = InputContract(channels=1, image_size=16, resize="lanczos", invert=True)


def write_drawings(root: Path, classes: int = 6, per_class: int = 5, size: int = 20) -> Path:
    """Dark strokes on white paper, like raw Omniglot PNGs, larger than the model's input."""
    generator = torch.Generator().manual_seed(3)
    for c in range(classes):
        pattern = torch.rand(size, size, generator=generator) > 0.7
        for i in range(per_class):
            noise = torch.rand(size, size, generator=generator) > 0.95
            strokes = (pattern ^ noise).numpy()
            folder = root / f"char{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(strokes, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def trained_on(dataset, learner: str = "protonet", **settings) -> FewShotModel:
    model = FewShotModel(learner, backbone={"name": "conv4", "hidden": 8}, device="cpu")
    values = {"ways": 3, "shots": 1, "queries": 2, "steps": 2, "val_every": 0, "log_every": 1, **settings}
    model.fit(dataset, progress=False, **values)
    return model


def test_a_model_records_its_training_contract_and_decodes_files_with_it(tmp_path):
    folder = write_drawings(tmp_path / "drawings")
    train = image_folder(folder, contract=CONTRACT)
    assert train.contract == CONTRACT and float(train.images.float().mean()) < 128  # inverted: mostly dark
    model = trained_on(train)
    assert model.input_contract == CONTRACT
    model.save(tmp_path / "model")
    loaded = FewShotModel.load(tmp_path / "model", device="cpu")
    assert loaded.input_contract == CONTRACT
    files = sorted((folder / "char0").glob("*.png"))[:2] + sorted((folder / "char1").glob("*.png"))[:2]
    from_files = loaded.model_input(files)
    expected = train.to_model(torch.stack([train.images[0], train.images[1], train.images[5], train.images[6]]))
    assert torch.equal(from_files, expected)
    # adapt/predict on raw files, with no flag, give what the tensors of the dataset give
    by_files = loaded.adapt(files, ["a", "a", "b", "b"]).scores(files)
    by_tensors = loaded.adapt(expected, ["a", "a", "b", "b"]).scores(expected)
    assert torch.equal(by_files, by_tensors)
    # a folder decoded otherwise is refused with the fix
    other = image_folder(folder, image_size=16, channels=1)
    with pytest.raises(InputError, match="invert=False"):
        loaded.evaluate(other, ways=3, shots=1, queries=2, episodes=2, progress=False)
    assert loaded.evaluate(folder, ways=3, shots=1, queries=2, episodes=2, progress=False).episodes == 2


@pytest.mark.omniglot
def test_raw_omniglot_pngs_give_the_cached_dataset_tensors(omniglot_archives, tmp_path):
    test = load_dataset({"name": "omniglot", "archives": str(omniglot_archives)}, "evaluation")
    assert test.contract == omniglot_contract(28) and test.rotations == (0,)
    with zipfile.ZipFile(omniglot_archives / "images_evaluation.zip") as archive:
        name = test.base_names[0]
        members = sorted(m for m in archive.namelist()
                         if m.startswith(f"images_evaluation/{name}/") and m.endswith(".png"))
        files = []
        for member in members[:3]:
            path = tmp_path / Path(member).name
            path.write_bytes(archive.read(member))
            files.append(path)
    decoded = test.contract.decode_files(files)
    assert torch.equal(decoded, test.images[:3])
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    learner = model._build(test.image_shape)
    learner.input_contract = test.contract
    model.save(tmp_path / "model")
    loaded = FewShotModel.load(tmp_path / "model", device="cpu")
    assert torch.equal(loaded.model_input(files), test.to_model(test.images[:3]))


def test_cli_evaluate_and_predict_use_the_model_contract_on_a_one_channel_model(tmp_path):
    folder = write_drawings(tmp_path / "drawings")
    model = trained_on(image_folder(folder, contract=CONTRACT))
    model.save(tmp_path / "model")
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "model"), "--data", str(folder), "--split", "all",
                                 "--ways", "3", "--queries", "2", "--episodes", "3", "--device", "cpu"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "3-way 1-shot" in result.output
    support = tmp_path / "support"
    for c in ("char0", "char1"):
        (support / c).mkdir(parents=True)
        for f in sorted((folder / c).glob("*.png"))[:1]:
            (support / c / f.name).write_bytes(f.read_bytes())
    query = sorted((folder / "char1").glob("*.png"))[3]
    result = runner.invoke(cli, ["predict", str(tmp_path / "model"), "--support", str(support), "--query",
                                 str(query), "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(("char0", "char1"))


def test_training_rotations_never_reach_evaluation_splits(tmp_path):
    folder = write_drawings(tmp_path / "drawings", classes=10)
    spec = {"name": "folder", "path": str(folder), "rotations": [0, 90, 180, 270]}
    assert load_dataset(spec, "train", augment=True).rotations == (0, 90, 180, 270)
    assert load_dataset(spec, "test").rotations == (0,)
    assert load_dataset(spec, "all").rotations == (0,)


def save_array(path: Path, array: np.ndarray, mode: str) -> Path:
    image = Image.fromarray(array)
    assert image.mode == mode
    image.save(path)
    return path


def test_sixteen_bit_and_float_images_keep_their_values(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.float64).reshape(8, 8)
    png = save_array(tmp_path / "deep.png", ramp.astype(np.uint16), "I;16")
    grey = read_image(png, 1)[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 30  # not all 255
    tiff = save_array(tmp_path / "float.tiff", (ramp / 65535).astype(np.float32), "F")
    grey_float = read_image(tiff, 1)[..., 0]
    assert grey_float.max() == 255 and np.abs(grey_float.astype(int) - grey.astype(int)).max() <= 1  # not all 0
    bad = (ramp / 65535).astype(np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        read_image(save_array(tmp_path / "nan.tiff", bad, "F"), 1)
    with pytest.raises(InputError, match=r"\[0, 1\] or \[0, 255\]"):
        read_image(save_array(tmp_path / "big.tiff", (ramp * 10).astype(np.float32), "F"), 1)


def test_tensor_inputs_are_checked_not_guessed():
    data = synthetic_dataset(classes=5, per_class=4, size=16)
    model = trained_on(data)
    images, labels = data.all_images()
    good = model.adapt(images[:10], labels[:10].tolist())
    assert len(good.predict(images[10:12])) == 2
    with pytest.raises(InputError, match="divide them by 255"):
        model.adapt(images[:10].float(), labels[:10].tolist())
    nan = images[:10].float() / 255
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        good.predict(nan)
    with pytest.raises(InputError, match="shape"):
        good.predict(torch.zeros(2, 1, 20, 20, dtype=torch.uint8))
    with pytest.raises(Exception, match="no input contract"):
        good.predict(["some.png"])
