"""Expected calibration error: the definition on hand-computed cases, pooled vs per-episode, and ECE in evaluate()
(classifiers, across processes, and regression learners that have none)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_dataset

from kshot.calibration import bin_counts, ece_from_counts, expected_calibration_error, is_class_logits
from kshot.data import EpisodeSet
from kshot.data.sinusoid import SinusoidTasks
from kshot.distributed import process_group
from kshot.evaluation import evaluate, mean_ci95
from kshot.learners import build_learner

# Confidences 0.9 (right), 0.78 (wrong), 0.5 (right), 0.42 (wrong); none on a bin edge for 3 or 15 bins.
TINY_PROBABILITIES = torch.tensor([[0.9, 0.05, 0.05], [0.78, 0.12, 0.10], [0.5, 0.3, 0.2], [0.42, 0.33, 0.25]])
TINY_TARGETS = torch.tensor([0, 1, 0, 2])


def test_hand_computed_ece_with_3_and_15_bins():
    # 3 bins: (1/3, 2/3] holds 0.5 and 0.42 (1 right): |1 - 0.92| = 0.08; (2/3, 1] holds 0.9 and 0.78 (1 right):
    # |1 - 1.68| = 0.68; ECE = (0.08 + 0.68) / 4.
    assert expected_calibration_error(TINY_PROBABILITIES, TINY_TARGETS, bins=3, probabilities=True) == \
        pytest.approx(0.19)
    # 15 bins: every query alone in its bin: (0.1 + 0.78 + 0.5 + 0.42) / 4.
    assert expected_calibration_error(TINY_PROBABILITIES, TINY_TARGETS, probabilities=True) == pytest.approx(0.45)
    # Logits are turned into probabilities by softmax: log-probabilities give the same ECE.
    assert expected_calibration_error(TINY_PROBABILITIES.log() + 3.0, TINY_TARGETS, bins=3) == pytest.approx(0.19)
    counts = bin_counts(TINY_PROBABILITIES, TINY_TARGETS, bins=3, probabilities=True)
    assert counts[:, 0].tolist() == [0, 2, 2] and counts[:, 2].tolist() == [0, 1, 1]


def calibrated_predictions(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities whose top class is right with exactly the probability it is given."""
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.2 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    probabilities = ((1 - confidence) / (classes - 1)).unsqueeze(1).repeat(1, classes)
    probabilities[:, 0] = confidence
    right = torch.rand(n, generator=generator, dtype=torch.float64) < confidence
    wrong = torch.randint(1, classes, (n,), generator=generator)
    return probabilities, torch.where(right, 0, wrong)


def test_calibrated_predictions_have_ece_near_zero_and_overconfident_ones_do_not():
    probabilities, targets = calibrated_predictions(100_000)
    assert expected_calibration_error(probabilities, targets, probabilities=True) < 0.01
    # The same predictions, but all confidences pushed up to 0.95 (accuracy ~0.6 stays): ECE ~0.95 - 0.6.
    sharpened = probabilities.clone()
    sharpened[:, 0], sharpened[:, 1:] = 0.95, 0.05 / 9
    accuracy = (targets == 0).double().mean().item()
    assert accuracy == pytest.approx(0.6, abs=0.01)
    assert expected_calibration_error(sharpened, targets, probabilities=True) == pytest.approx(0.95 - accuracy)


def test_overconfident_predictions_give_the_gap_between_confidence_and_accuracy():
    probabilities = torch.tensor([[0.95, 0.05]]).repeat(100, 1)
    targets = (torch.arange(100) >= 60).long()  # the top class (0) is right 60 times in 100
    assert expected_calibration_error(probabilities, targets, probabilities=True) == pytest.approx(0.35)
    # Two confidence levels, each 20 points above its accuracy: ECE 0.2 whatever the bins.
    probabilities = torch.tensor([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    targets = torch.tensor([0] * 7 + [1] * 3 + [0] * 4 + [1] * 6)
    for bins in (1, 3, 15):
        assert expected_calibration_error(probabilities, targets, bins=bins, probabilities=True) == \
            pytest.approx(0.2)


def test_pooled_ece_differs_from_the_mean_of_per_episode_eces():
    # Episode A: two queries at 0.9, both right (ECE 0.1); episode B: two at 0.9, both wrong (ECE 0.9).
    probabilities = torch.tensor([[0.9, 0.1]] * 2)
    a, b = (bin_counts(probabilities, torch.tensor([t, t]), probabilities=True) for t in (0, 1))
    per_episode = ece_from_counts(torch.stack([a, b]))
    assert per_episode.tolist() == pytest.approx([0.1, 0.9])
    # Pooled: four queries at 0.9, half right: |2 - 3.6| / 4 = 0.4, not the per-episode mean 0.5.
    assert ece_from_counts(a + b).item() == pytest.approx(0.4)
    pooled = expected_calibration_error(probabilities.repeat(2, 1), torch.tensor([0, 0, 1, 1]), probabilities=True)
    assert pooled == pytest.approx(0.4)


def test_only_class_scores_with_integer_labels_have_an_ece():
    assert is_class_logits(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    assert not is_class_logits(torch.zeros(4, 1), torch.zeros(4, 1))  # regression
    assert not is_class_logits(torch.zeros(4, 3), torch.zeros(4))  # float targets
    with pytest.raises(ValueError, match="integer class labels"):
        bin_counts(torch.zeros(4, 1), torch.zeros(4, 1))


def protonet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_learner("protonet", (1, 16, 16), {"name": "conv4", "hidden": 8})


def test_evaluate_reports_the_ece_of_the_same_episodes_logits():
    data = synthetic_dataset(size=16)
    episodes = EpisodeSet(data, 3, 1, 2, 6, seed=0)
    learner = protonet()
    result = evaluate(learner, episodes, progress=False)
    learner.eval()
    logits, targets, per_episode = [], [], []
    with torch.no_grad():
        for index in range(len(episodes)):
            episode = episodes[index]
            logits.append(learner.adapt(episode.support_x, episode.support_y)(episode.query_x))
            targets.append(episode.query_y)
            per_episode.append(expected_calibration_error(logits[-1], targets[-1]))
    expected = 100 * expected_calibration_error(torch.cat(logits), torch.cat(targets))
    assert 0 < result.ece <= 100 and result.ece == pytest.approx(expected)
    mean, ci = mean_ci95(per_episode)
    assert result.episode_ece == pytest.approx(100 * mean) and result.episode_ece_ci95 == pytest.approx(100 * ci)
    row = result.as_row()
    assert row["ece"] == result.ece and "ECE" in result.summary()


class SinusoidEpisodes:
    """Just enough of an EpisodeSet for evaluate(): fixed sinusoid regression tasks."""

    ways, shots, queries, seed = 1, 5, 10, 0

    def __init__(self, count: int) -> None:
        self.tasks = [SinusoidTasks().sample(5, 10, torch.Generator().manual_seed(i)) for i in range(count)]
        self.dataset = type("Named", (), {"name": "sinusoid"})()

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int):
        return self.tasks[index]


def test_regression_evaluation_has_no_ece():
    torch.manual_seed(0)
    learner = build_learner("maml", (1, 1, 1), {"name": "mlp", "hidden": [40, 40], "out_features": 1},
                            {"task": "regression", "inner_lr": 0.01})
    result = evaluate(learner, SinusoidEpisodes(3), progress=False,
                      metric=lambda output, target: ((output - target) ** 2).mean().item())
    assert result.episodes == 3 and math.isfinite(result.accuracy)
    assert result.ece is None and result.episode_ece is None and "ECE" not in result.summary()
    assert result.as_row()["ece"] is None


def evaluation_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    with process_group("cpu"):
        episodes = EpisodeSet(synthetic_dataset(size=16), 3, 1, 2, 5, seed=3)
        result = evaluate(protonet(), episodes, progress=False, across_processes=True)
        torch.save([result.ece, result.episode_ece, result.episode_ece_ci95], Path(out) / f"ece{rank}.pt")


def test_evaluation_across_processes_gives_the_same_ece(tmp_path):
    alone = evaluate(protonet(), EpisodeSet(synthetic_dataset(size=16), 3, 1, 2, 5, seed=3), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(evaluation_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):  # 5 episodes: 3 scored by the first process, 2 by the second
        assert torch.load(tmp_path / f"ece{rank}.pt") == [alone.ece, alone.episode_ece, alone.episode_ece_ci95]
