"""Training augmentation for natural images (issue 11): batched, seeded, resumable, training batches only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_dataset

from kshot.config import ConfigError
from kshot.data import EpisodeSampler, EpisodeSet, InputContract
from kshot.data.augment import BatchAugmenter, parse_augment_spec
from kshot.evaluation import evaluate
from kshot.learners import build_learner
from kshot.recipe import Recipe, RecipeError
from kshot.training import TrainConfig, Trainer
from kshot.training.trainer import ResumeSettingsError

BACKBONE = {"name": "conv4", "hidden": 8}
RFS = {"crop": {"kind": "random_resized"}, "flip": 0.5, "jitter": {"hue": 0.1}}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture
def data():
    return synthetic_dataset(classes=10, per_class=6, size=16, channels=3, seed=2)


def images(count=6, size=16, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make(data):
    torch.manual_seed(0)
    return build_learner("protonet", data.image_shape, BACKBONE)


def config(steps):
    return TrainConfig(ways=3, shots=1, queries=2, steps=steps, val_every=3, val_ways=3, val_queries=2,
                       val_episodes=4, log_every=1, checkpoint_every_s=0)


# ------------------------------------------------------------------------------------------- the images
def test_the_same_seed_gives_the_same_augmentation_and_another_seed_another():
    x = images()
    first, again, other = (BatchAugmenter(RFS, seed=s).images(x) for s in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_each_image_of_a_batch_gets_its_own_crop():
    x = images(1).expand(8, -1, -1, -1)  # eight copies of one image
    for crop in ({"kind": "random_resized"}, {"kind": "pad", "padding": 4}):
        out = BatchAugmenter({"crop": crop}, seed=0).images(x)
        distinct = {tuple(image.flatten()[:64].tolist()) for image in out}
        assert len(distinct) >= 7, crop


def test_shape_dtype_and_range_are_kept_for_uint8_float_and_meta_batches():
    augmenter = BatchAugmenter(RFS, seed=0)
    raw = (images(12) * 255).to(torch.uint8).view(2, 6, 3, 16, 16)  # a meta-batch: [tasks, images, C, H, W]
    out = augmenter.images(raw)
    assert out.dtype == torch.uint8 and out.shape == raw.shape and not torch.equal(out, raw)
    floats = augmenter.images(images(12))
    assert floats.dtype == torch.float32 and floats.shape == (12, 3, 16, 16)
    assert float(floats.min()) >= 0 and float(floats.max()) <= 1


def test_nothing_switched_on_or_zero_strengths_leave_images_unchanged():
    x = images()
    assert BatchAugmenter({}).images(x) is x
    zero = {"crop": {"kind": "pad", "padding": 0}, "flip": 0.0,
            "jitter": {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}}
    assert torch.equal(BatchAugmenter(zero).images(x), x)


def test_flip_mirrors_left_and_right_exactly():
    x = images()
    assert torch.equal(BatchAugmenter({"flip": 1.0}).images(x), x.flip(-1))
    cropped = BatchAugmenter({"flip": 1.0, "crop": {"kind": "pad", "padding": 0}}).images(x)
    assert torch.equal(cropped, x.flip(-1))  # folded into the crop's sampling grid
    grey = (images() * 255).to(torch.uint8)[:, :1]
    assert torch.equal(BatchAugmenter({"flip": 1.0}).images(grey), grey.flip(-1))


def test_pad_crop_shifts_whole_pixels_and_fills_with_black():
    x = images(64)
    out = BatchAugmenter({"crop": {"kind": "pad", "padding": 2}}, seed=1).images(x)
    for image, source in zip(out, x):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(image, shifted(source, dy, dx))]
        assert len(found) == 1


def shifted(image, dy, dx):
    """`image` [C, H, W] read at (y + dy, x + dx), black outside."""
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    height, width = image.shape[-2:]
    return padded[:, 2 + dy:2 + dy + height, 2 + dx:2 + dx + width]


def test_jitter_acts_on_colours_before_normalisation():
    contract = InputContract(channels=3, image_size=16, **IMAGENET)
    raw = images()
    jitter = {"jitter": {"hue": 0.2}}
    plain = BatchAugmenter(jitter, seed=5).images(raw)
    normalised = BatchAugmenter(jitter, seed=5, **IMAGENET).images(contract.to_model(raw))
    assert torch.allclose(normalised, contract.to_model(plain), atol=1e-5)


# ------------------------------------------------------------------------------------------ the batches
def test_episodes_supervised_and_pair_batches_have_their_images_augmented_only():
    augmenter = BatchAugmenter({"flip": 1.0})
    episode = EpisodeSampler(synthetic_dataset(channels=3), 3, 1, 2, seed=0).sample_batch(2)
    out = augmenter(episode)
    assert torch.equal(out.support_x, episode.support_x.flip(-1)) and torch.equal(out.query_x,
                                                                                  episode.query_x.flip(-1))
    assert out.query_y is episode.query_y and out.classes is episode.classes
    labels = torch.arange(6)
    flipped, same = augmenter((images(), labels))
    assert torch.equal(flipped, images().flip(-1)) and same is labels
    first, second, target = augmenter((images(seed=1), images(seed=2), torch.ones(6)))
    assert torch.equal(first, images(seed=1).flip(-1)) and torch.equal(second, images(seed=2).flip(-1))
    with pytest.raises(ConfigError, match="hold no images"):
        augmenter((torch.rand(5, 1), torch.rand(5, 1)))  # regression tasks: nothing to augment


def test_unknown_augment_setting_in_a_recipe_is_refused_in_one_line():
    recipe = {"learner": "protonet", "dataset": {"name": "omniglot"}, "augment": {"flip": 0.5, "jiter": {}}}
    with pytest.raises(RecipeError) as refused:
        Recipe.from_dict(recipe)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("augment.jiter: unknown setting; did you mean 'jitter'?")
    with pytest.raises(RecipeError, match="augment.crop.kind"):
        Recipe.from_dict({**recipe, "augment": {"crop": {"kind": "centre"}}})
    assert Recipe.from_dict({**recipe, "augment": RFS}).augment["crop"]["scale"] == [0.08, 1.0]
    assert Recipe.from_dict({k: v for k, v in recipe.items() if k != "augment"}).augment is None


# ------------------------------------------------------------------------------------------- the trainer
def test_training_batches_are_augmented_but_validation_and_evaluate_never(data, tmp_path, monkeypatch):
    seen: list[int] = []
    original = BatchAugmenter.images

    def spy(self, x):
        seen.append(x.shape[:-3].numel())
        return original(self, x)

    monkeypatch.setattr(BatchAugmenter, "images", spy)
    learner = make(data)
    Trainer(learner, config(3), tmp_path / "run", progress=False, augment=RFS).fit(data, data)
    assert seen == [3 * 1, 3 * 2] * 3  # support then query images of each training step, nothing for validation
    seen.clear()
    evaluate(learner, EpisodeSet(data, 3, 1, 2, count=4, seed=0), progress=False)
    assert seen == []


def test_resumed_run_continues_the_augmentation_stream_exactly(data, tmp_path):
    straight = make(data)
    Trainer(straight, config(6), tmp_path / "straight", progress=False, augment=RFS).fit(data, data)
    Trainer(make(data), config(3), tmp_path / "resumed", progress=False, augment=RFS).fit(data, data)
    resumed = make(data)
    Trainer(resumed, config(6), tmp_path / "resumed", progress=False, augment=RFS).fit(data, data, resume=True)
    plain = make(data)
    Trainer(plain, config(6), tmp_path / "plain", progress=False).fit(data, data)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert any(not torch.equal(value, plain.state_dict()[name]) for name, value in straight.state_dict().items())
    info = json.loads((tmp_path / "resumed" / "checkpoints" / "last" / "checkpoint.json").read_text())
    assert info["train_augmentation"] == parse_augment_spec(RFS)  # recorded beside the model, not in its contract


def test_resume_with_another_augmentation_is_refused(data, tmp_path):
    Trainer(make(data), config(3), tmp_path, progress=False, augment=RFS).fit(data, data)
    with pytest.raises(ResumeSettingsError, match="augment.flip was 0.5, now 0.0"):
        Trainer(make(data), config(6), tmp_path, progress=False, augment={**RFS, "flip": 0.0}).fit(data, data,
                                                                                                  resume=True)
