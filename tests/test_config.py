"""Typed configuration: every setting checked, in one line, before anything trains or is deleted."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import synthetic_dataset

from kshot import FewShotModel
from kshot.backbones import register_backbone
from kshot.config import ConfigError, EvalSetting, TrainConfig, parse_yaml
from kshot.learners import LEARNERS
from kshot.recipe import Recipe, RecipeError, load_recipe
from kshot.training import optim


def test_set_values_are_read_with_yaml_1_2_rules():
    assert parse_yaml("1e-4") == 1e-4 and isinstance(parse_yaml("1e-4"), float)
    assert parse_yaml("yes") == "yes" and parse_yaml("off") == "off"  # YAML 1.1 would make these booleans
    assert parse_yaml("true") is True and parse_yaml("0x10") == 16 and parse_yaml("-3") == -3
    recipe = load_recipe("protonet-omniglot-quick", ["train.lr=1e-4", "train.steps=7"])
    assert recipe.train.lr == 1e-4 and recipe.train.steps == 7


@pytest.mark.parametrize("override, where, what", [
    ("train.lr=fast", "train.lr", "valid number"),
    ("train.steps=abc", "train.steps", "valid integer"),
    ("train.steps=2.5", "train.steps", "fractional"),
    ("train.lr=-1", "train.lr", "greater than 0"),
    ("train.stepz=3", "train.stepz", "did you mean 'steps'"),
    ("backbone.hiden=32", "backbone.hiden", "did you mean 'hidden'"),
    ("dataset.imagesize=32", "dataset.imagesize", "did you mean 'image_size'"),
    ("options.temperatur=2", "options.temperatur", "unknown setting"),
    ("bn_mode=transductiv", "bn_mode", "'inference' or 'transductive'"),
    ("train.val_bn_mode=transductiv", "train.val_bn_mode", "'inference' or 'transductive'"),
    ("evaluate=[{ways: 0, shots: 1}]", "evaluate[0].ways", "greater than or equal to 1"),
    ("learner=protonett", "learner", "did you mean 'protonet'"),
    ("train.optimizer=adamw", "train.optimizer", "'adam' or 'sgd'"),
])
def test_every_bad_setting_is_one_line_naming_it(override, where, what):
    with pytest.raises(RecipeError) as caught:
        load_recipe("protonet-omniglot-quick", [override])
    message = str(caught.value)
    assert message.startswith(where) and what in message and "\n" not in message


def test_unknown_recipe_sections_and_malformed_overrides_are_refused():
    with pytest.raises(RecipeError, match="did you mean 'train'"):
        load_recipe("protonet-omniglot-quick", ["trian.steps=3"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("protonet-omniglot-quick", ["train.steps"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe("protonet-omniglot-quick", ["train.steps.x=3"])


def test_reptile_declares_plain_sgd_and_refuses_momentum_optimisers():
    recipe = load_recipe("reptile-omniglot-5way-1shot")
    assert optim.optimizer_settings(recipe.train, LEARNERS["reptile"]) == ("sgd", 0.0)
    with pytest.raises(RecipeError, match="reptile needs 'sgd'"):
        load_recipe("reptile-omniglot-5way-1shot", ["train.optimizer=adam"])
    with pytest.raises(RecipeError, match="momentum"):
        load_recipe("reptile-omniglot-5way-1shot", ["train.momentum=0.9"])


def test_api_fit_uses_the_learners_outer_optimiser(monkeypatch):
    built = []
    original = optim.build_optimizer

    def spy(config, learner):
        optimizer = original(config, learner)
        built.append(optimizer)
        return optimizer

    monkeypatch.setattr("kshot.training.trainer.build_optimizer", spy)
    data = synthetic_dataset(classes=6, per_class=6, size=16)
    model = FewShotModel("reptile", backbone={"name": "conv4", "hidden": 8}, device="cpu", ways=3, inner_steps=1,
                         test_inner_steps=1)
    model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False)
    assert isinstance(built[0], torch.optim.SGD) and built[0].param_groups[0]["momentum"] == 0.0
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False)
    assert isinstance(built[1], torch.optim.Adam)


def test_api_settings_are_checked_before_training():
    data = synthetic_dataset(classes=6, per_class=6, size=16)
    with pytest.raises(ConfigError, match="options.temperatur"):
        FewShotModel("protonet", temperatur=2)
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    with pytest.raises(ConfigError, match="train.lr"):
        model.fit(data, lr="fast", progress=False)
    with pytest.raises(ValueError, match="classes"):
        model.fit(data, ways=50, progress=False)
    assert model.learner is None  # nothing was built or trained


def test_fit_leaves_no_temporary_folder_and_ends_on_the_best_weights(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = synthetic_dataset(classes=8, per_class=6, size=16)
    val = synthetic_dataset(classes=5, per_class=6, size=16, seed=4)
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    history = model.fit(data, val=val, ways=3, shots=1, queries=2, steps=6, val_every=2, val_ways=3,
                        val_queries=2, val_episodes=4, progress=False)
    assert list(tmp_path.iterdir()) == []
    best = max(history, key=lambda row: row["val_accuracy"])
    again = model.evaluate(val, ways=3, shots=1, queries=2, episodes=4, seed=1 + 0, progress=False)
    assert again.accuracy == pytest.approx(best["val_accuracy"])


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(width))

    def forward(self, x):
        return self.net(x)


def tiny_factory(width: int = 4, image_shape=(1, 16, 16)) -> torch.nn.Module:
    c, h, w = image_shape
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, width))


def test_a_users_backbone_is_rebuilt_on_load_or_refused_before_training(tmp_path):
    data = synthetic_dataset(classes=6, per_class=6, size=16)
    model = FewShotModel("protonet", backbone=tiny_factory(), device="cpu")
    with pytest.raises(ConfigError, match="register_backbone"):
        model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False)
    register_backbone("tiny-test", lambda shape, width=4: tiny_factory(width, shape))
    for spec in ({"name": "tiny-test"}, {"name": "import", "target": f"{__name__}:tiny_factory",
                                         "kwargs": {"width": 5}}):
        model = FewShotModel("protonet", backbone=spec, device="cpu")
        model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False)
        model.save(tmp_path / spec["name"])
        loaded = FewShotModel.load(tmp_path / spec["name"], device="cpu")
        images, labels = data.all_images()
        assert torch.equal(model.adapt(images[:12], labels[:12].tolist()).scores(images[12:]),
                           loaded.adapt(images[:12], labels[:12].tolist()).scores(images[12:]))
    with pytest.raises(ConfigError, match="cannot import"):
        FewShotModel("protonet", backbone={"name": "import", "target": "no_such_module:f"})._build((1, 16, 16))


def test_recipe_round_trips_through_its_record():
    recipe = load_recipe("maml-omniglot-5way-1shot")
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and dataclasses.asdict(again.train) == dataclasses.asdict(recipe.train)
    assert isinstance(recipe.train, TrainConfig) and isinstance(recipe.evaluate[0], EvalSetting)


@pytest.mark.parametrize("schedule, expected", [
    ({"lr_schedule": "multistep", "lr_milestones": [6, 8], "lr_decay": 0.1}, [1, 1, 1, 1, 1, 1, .1, .1, .01, .01]),
    ({"lr_schedule": "cosine"}, [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]),
    ({"lr_schedule": "linear"}, [1 - s / 10 for s in range(10)]),
])
def test_learning_rate_schedules(schedule, expected):
    config = TrainConfig.from_dict({"lr": 1.0, "steps": 10, **schedule})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = optim.build_scheduler(config, optimizer)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)
    with pytest.raises(ConfigError, match="lr_milestones"):
        optim.build_scheduler(TrainConfig.from_dict({"lr_schedule": "multistep"}), optimizer)


def test_api_fit_takes_a_checked_augmentation():
    data = synthetic_dataset(classes=6, per_class=6, size=16, channels=3)
    model = FewShotModel("protonet", backbone={"name": "conv4", "hidden": 8}, device="cpu")
    with pytest.raises(ConfigError, match="augment.flipp"):
        model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False, augment={"flipp": 0.5})
    model.fit(data, ways=3, shots=1, queries=1, steps=1, val_every=0, progress=False, augment={"flip": 0.5})
