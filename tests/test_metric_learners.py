"""Matching, Relation and Siamese networks, Baseline, Baseline++ and SimpleShot on tiny synthetic data:
support order invariance, no query-label leaks, falling losses, checkpoint round trips, short Trainer runs."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from kshot.data.dataset import ClassDataset
from kshot.data.sampler import EpisodeSampler, EpisodeSet
from kshot.data.supervised import SupervisedStream
from kshot.episode import Episode
from kshot.evaluation import evaluate
from kshot.learners import Learner, build_learner
from kshot.learners.base import EpisodeShape
from kshot.training.checkpoint import load_learner, save_checkpoint
from kshot.training.trainer import TrainConfig, Trainer

IMAGE_SHAPE = (1, 16, 16)
CONV = {"name": "conv4", "hidden": 8}
SPECS = {
    "matching": ("matching", CONV, {}),
    "matching-fce": ("matching", CONV, {"fce": True, "processing_steps": 2}),
    "matching-scaled": ("matching", CONV, {"scale": 10.0, "learn_scale": True}),
    "relation": ("relation", {**CONV, "flatten": False}, {"relation_channels": 8}),
    "siamese-bce": ("siamese", CONV, {"head": "bce", "batch_size": 16}),
    "siamese-contrastive": ("siamese", CONV, {"head": "contrastive", "batch_size": 16}),
    "baseline": ("baseline", CONV, {"batch_size": 16, "adapt_steps": 20}),
    "baseline++": ("baseline++", CONV, {"batch_size": 16, "adapt_steps": 20}),
    "simpleshot": ("simpleshot", CONV, {"batch_size": 16}),
}



def tiny_dataset(classes: int = 10, per_class: int = 6, seed: int = 0, rotations=(0,)) -> ClassDataset:
    """Random uint8 images whose classes differ in mean brightness, so a tiny network can learn them."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(classes, 1, *IMAGE_SHAPE, generator=generator)
    noise = torch.rand(classes, per_class, *IMAGE_SHAPE, generator=generator)
    images = ((0.7 * base + 0.3 * noise) * 255).to(torch.uint8).reshape(-1, *IMAGE_SHAPE)
    offsets = torch.arange(0, classes * per_class + 1, per_class)
    return ClassDataset(images, offsets, [f"c{i}" for i in range(classes)], rotations=rotations, name="tiny")


def make(key: str, dataset: ClassDataset | None = None, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    learner_name, backbone, options = SPECS[key]
    learner = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    learner.prepare(dataset or tiny_dataset())
    return learner


def warm_up(learner: Learner, dataset: ClassDataset, steps: int = 3) -> None:
    """A few training steps, so batch-norm running statistics (and SimpleShot's mean) are not initial."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    learner.train()
    for batch in islice(learner.training_stream(dataset, EpisodeShape(5, 2, 2), seed=0), steps):
        loss, _ = learner.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.eval()


def predict(learner: Learner, episode: Episode) -> torch.Tensor:
    with torch.no_grad():
        return learner.adapt(episode.support_x, episode.support_y)(episode.query_x)


@pytest.mark.parametrize("key", SPECS)
def test_predictions_do_not_depend_on_support_order(key):
    dataset = tiny_dataset()
    learner = make(key, dataset)
    warm_up(learner, dataset)
    episode = EpisodeSampler(dataset, ways=4, shots=3, queries=2, seed=1).sample()
    reference = predict(learner, episode)
    assert reference.shape == (8, 4)
    for seed in range(3):
        order = torch.randperm(len(episode.support_y), generator=torch.Generator().manual_seed(seed))
        shuffled = Episode(episode.support_x[order], episode.support_y[order], episode.query_x,
                           episode.query_y, episode.classes)
        torch.testing.assert_close(predict(learner, shuffled), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", SPECS)
def test_query_labels_never_reach_the_learner(key):
    dataset = tiny_dataset()
    learner = make(key, dataset)
    warm_up(learner, dataset)
    episode = EpisodeSampler(dataset, ways=4, shots=2, queries=3, seed=2).sample()
    reference = predict(learner, episode)
    # Shuffled query labels: the same predictions (the learner never sees them).
    scrambled = episode.query_y[torch.randperm(len(episode.query_y))]
    torch.testing.assert_close(predict(learner, Episode(episode.support_x, episode.support_y, episode.query_x,
                                                        scrambled, episode.classes)), reference)
    # Each query is scored on its own: scoring a subset of the queries gives the same rows.
    with torch.no_grad():
        predictor = learner.adapt(episode.support_x, episode.support_y)
        torch.testing.assert_close(predictor(episode.query_x[3:7]), reference[3:7], atol=1e-5, rtol=1e-5)


def test_episode_support_and_query_images_are_disjoint():
    dataset = tiny_dataset()
    episodes = EpisodeSet(dataset, ways=5, shots=2, queries=4, count=20, seed=0)
    picks = torch.as_tensor(episodes.picks)
    support, query = picks[..., :2], picks[..., 2:]
    assert not bool((support.unsqueeze(-1) == query.unsqueeze(-2)).any())


@pytest.mark.parametrize("key", SPECS)
def test_loss_decreases_on_a_fixed_task(key):
    dataset = tiny_dataset()
    learner = make(key, dataset)
    batch = next(learner.training_stream(dataset, EpisodeShape(5, 2, 3), seed=0))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    learner.train()
    losses = []
    for _ in range(25):
        loss, metrics = learner.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(0.0 <= value <= 100.0 for value in metrics.values())  # percent
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("key", SPECS)
def test_checkpoint_round_trip_rebuilds_the_learner(key, tmp_path):
    dataset = tiny_dataset()
    learner = make(key, dataset)
    warm_up(learner, dataset)
    save_checkpoint(tmp_path / "ckpt", learner, {"note": "test"})
    loaded, info = load_learner(tmp_path / "ckpt")
    assert type(loaded) is type(learner)
    assert loaded.options == learner.options
    assert info["model"]["options"] == learner.options
    loaded.eval()
    episode = EpisodeSampler(dataset, ways=3, shots=2, queries=2, seed=3).sample()
    torch.testing.assert_close(predict(loaded, episode), predict(learner, episode))


@pytest.mark.parametrize("key", SPECS)
def test_three_trainer_steps_then_evaluate(key, tmp_path):
    dataset = tiny_dataset(rotations=(0, 180))
    learner_name, backbone, options = SPECS[key]
    learner = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    config = TrainConfig(ways=5, shots=1, queries=2, steps=3, val_every=2, val_ways=3, val_shots=1,
                         val_queries=2, val_episodes=4, log_every=1)
    history = Trainer(learner, config, tmp_path / "run", progress=False).fit(dataset, dataset)
    assert [row["step"] for row in history] == [2, 3]
    assert "val_accuracy" in history[-1]
    loaded, info = load_learner(tmp_path / "run" / "checkpoints" / "last")
    assert info["step"] == 3
    result = evaluate(loaded, EpisodeSet(dataset, 3, 1, 2, 4, seed=0), progress=False)
    assert 0.0 <= result.accuracy <= 100.0


@pytest.mark.parametrize("key", ["siamese-bce", "baseline++"])
def test_training_resumes_exactly(key, tmp_path):
    dataset = tiny_dataset()
    learner_name, backbone, options = SPECS[key]
    config = TrainConfig(steps=4, val_every=2, val_ways=3, val_queries=2, val_episodes=2, log_every=1)
    torch.manual_seed(0)
    straight = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    Trainer(straight, config, tmp_path / "a", progress=False).fit(dataset, dataset)
    torch.manual_seed(0)
    first = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    halfway = TrainConfig(**{**config.__dict__, "steps": 2})
    Trainer(first, halfway, tmp_path / "b", progress=False).fit(dataset, dataset)
    torch.manual_seed(1)
    resumed = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    Trainer(resumed, config, tmp_path / "b", progress=False).fit(dataset, dataset, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_supervised_stream_labels_match_images():
    per_class, classes = 5, 6
    images = torch.arange(classes * per_class, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    images = images.contiguous()
    dataset = ClassDataset(images, torch.arange(0, classes * per_class + 1, per_class),
                           [str(i) for i in range(classes)]).with_rotations((0, 90))
    stream = SupervisedStream(dataset, batch_size=64, seed=0)
    x, y = next(stream)
    assert x.shape == (64, 1, 2, 2) and y.max() < dataset.num_classes
    value = (x[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(value // per_class, y // 2)  # the image belongs to the base class of its label
    again = SupervisedStream(dataset, batch_size=64, seed=0)
    assert torch.equal(next(again)[1], y)


def test_matching_learned_temperature_starts_at_scale_and_is_trained():
    dataset = tiny_dataset()
    learner = make("matching-scaled", dataset)
    assert learner.log_scale is not None and learner.log_scale.exp().item() == pytest.approx(10.0)
    batch = next(learner.training_stream(dataset, EpisodeShape(5, 2, 2), seed=0))
    loss, _ = learner.loss(batch)
    loss.backward()
    assert learner.log_scale.grad is not None and learner.log_scale.grad.abs().item() > 0
    fixed = make("matching", dataset)
    assert fixed.log_scale is None and "log_scale" not in dict(fixed.named_parameters())


def test_unknown_options_and_bad_backbones_are_clear_errors():
    with pytest.raises(ValueError, match=r"options.scale: input should be greater than 0 \(got 0\)"):
        build_learner("matching", IMAGE_SHAPE, CONV, {"scale": 0})
    with pytest.raises(ValueError, match="options.fcee: unknown setting; did you mean 'fce'"):
        build_learner("matching", IMAGE_SHAPE, CONV, {"fcee": True})
    with pytest.raises(ValueError, match="flatten: false"):
        build_learner("relation", IMAGE_SHAPE, CONV)
    with pytest.raises(ValueError, match="feature vectors"):
        build_learner("siamese", IMAGE_SHAPE, {**CONV, "flatten": False})
    with pytest.raises(ValueError, match="head"):
        build_learner("siamese", IMAGE_SHAPE, CONV, {"head": "triplet"})
    learner = build_learner("baseline", IMAGE_SHAPE, CONV, {"num_classes": 3})
    with pytest.raises(ValueError, match="classes"):
        learner.prepare(tiny_dataset(classes=4))


# ----------------------------------------------------------------- learners that adapt on fixed backbone features
FEATURE_SPECS = {**SPECS, "r2d2": ("r2d2", CONV, {"scale_init": 1.0})}


def previous_adapt(learner: Learner, support_x: torch.Tensor, support_y: torch.Tensor,
                   query_x: torch.Tensor) -> torch.Tensor:
    """What each learner's `adapt` computed before it was split into `embed` + `adapt_embedded` (the bodies of
    commit 42cb2cf, written out), as an independent reference for the query logits."""
    import torch.nn.functional as F

    from kshot.learners.baseline import fit_head
    from kshot.learners.metric import class_means, squared_euclidean
    from kshot.learners.r2d2 import ridge_weights

    backbone, ways = learner.backbone, int(support_y.max()) + 1
    if learner.name == "simpleshot":
        centroids = class_means(learner.transform(backbone(support_x)), support_y, ways)
        return -squared_euclidean(learner.transform(backbone(query_x)), centroids)
    if learner.name == "r2d2":
        weights = ridge_weights(backbone(support_x).flatten(1), F.one_hot(support_y, ways).float(),
                                learner.log_lambda.exp(), learner.options["double"])
        return learner.scale * (backbone(query_x).flatten(1) @ weights) + learner.bias
    if learner.name in ("baseline", "baseline++"):
        head = learner.new_head(ways)
        fit_head(head, backbone(support_x), support_y, learner.options["adapt_epochs"], learner.options["adapt_lr"],
                 learner.options["adapt_batch_size"], learner.options["adapt_seed"])
        return head(backbone(query_x))
    if learner.name == "matching":
        return learner.log_probs(backbone(support_x), support_y, backbone(query_x), ways)
    if learner.name == "relation":
        return learner.scores(backbone(support_x), support_y, backbone(query_x), ways)
    assert learner.name == "siamese"
    shots = F.one_hot(support_y, ways).float()
    scores = learner.similarity(backbone(query_x).unsqueeze(1), backbone(support_x).unsqueeze(0))
    return scores @ (shots / shots.sum(0, keepdim=True))


def make_feature_learner(key: str, dataset: ClassDataset) -> Learner:
    torch.manual_seed(0)
    learner_name, backbone, options = FEATURE_SPECS[key]
    learner = build_learner(learner_name, IMAGE_SHAPE, backbone, options)
    learner.prepare(dataset)
    warm_up(learner, dataset, steps=2)
    return learner


@pytest.mark.parametrize("key", FEATURE_SPECS)
def test_adapt_embedded_on_embed_gives_the_logits_adapt_gave(key):
    dataset = tiny_dataset()
    learner = make_feature_learner(key, dataset)
    assert learner.works_on_features and not learner.transductive
    episode = EpisodeSampler(dataset, ways=4, shots=2, queries=3, seed=5).sample()
    with torch.no_grad():
        reference = previous_adapt(learner, episode.support_x, episode.support_y, episode.query_x)
        adapted = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
        embedded = learner.adapt_embedded(learner.embed(episode.support_x), episode.support_y)(
            learner.embed(episode.query_x))
    assert reference.shape == (12, 4)
    torch.testing.assert_close(adapted, reference)
    torch.testing.assert_close(embedded, reference)


@pytest.mark.parametrize("key", FEATURE_SPECS)
def test_episodes_embedded_together_keep_each_episode_logits(key):
    """In inference mode an image's features do not depend on its batch: embedding three episodes' images in one
    pass and fitting each on its slice gives what adapting each episode alone gives (the evaluator's batched path)."""
    dataset = tiny_dataset()
    learner = make_feature_learner(key, dataset)
    batch = EpisodeSet(dataset, ways=3, shots=2, queries=2, count=3, seed=6).gather([0, 1, 2])
    with torch.no_grad():
        features = learner.embed(torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)]))
        support, query = features[:18].unflatten(0, (3, 6)), features[18:].unflatten(0, (3, 6))
        for e, task in enumerate(batch.unbind()):
            expected = learner.adapt(task.support_x, task.support_y)(task.query_x)
            torch.testing.assert_close(learner.adapt_embedded(support[e], task.support_y)(query[e]), expected,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", FEATURE_SPECS)
def test_evaluation_batched_through_the_fast_backbone_matches_episode_by_episode_adapt(key):
    dataset = tiny_dataset()
    learner = make_feature_learner(key, dataset)
    episodes = EpisodeSet(dataset, ways=3, shots=2, queries=2, count=4, seed=7)
    outputs = []

    def record(output, target):
        outputs.append(output)
        return 0.0

    evaluate(learner, episodes, progress=False, metric=record, episodes_per_batch=3)
    assert len(outputs) == 4
    with torch.no_grad():
        for output, index in zip(outputs, range(4), strict=True):
            task = episodes[index]
            expected = learner.adapt(task.support_x, task.support_y)(task.query_x)
            torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)
