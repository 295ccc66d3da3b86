"""Training across processes (torch.distributed, Gloo on CPU): batch splitting, and two processes training the
same weights as one."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_dataset

from kshot.data.sampler import EpisodeSet
from kshot.distributed import ShardError, process_group, shard
from kshot.episode import Episode
from kshot.evaluation import evaluate
from kshot.learners import build_learner
from kshot.training import TrainConfig, Trainer, load_learner

BACKBONE = {"name": "conv4", "hidden": 8}


def meta_batch(tasks: int) -> Episode:
    return Episode(torch.arange(tasks * 3 * 2).reshape(tasks, 3, 2, 1, 1).float(),
                   torch.arange(3).repeat(tasks, 1), torch.zeros(tasks, 6, 2, 1, 1), torch.arange(3).repeat(tasks, 2),
                   torch.arange(tasks * 3).reshape(tasks, 3))


def test_shard_gives_each_process_an_equal_contiguous_part_of_a_meta_batch():
    batch = meta_batch(4)
    parts = [shard(batch, rank, 2) for rank in range(2)]
    assert [p.batch_size for p in parts] == [2, 2]
    assert torch.equal(torch.cat([p.classes for p in parts]), batch.classes)
    assert torch.equal(torch.cat([p.support_x for p in parts]), batch.support_x)


def test_shard_splits_tuples_of_tensors_row_wise():
    images, labels = torch.arange(8).reshape(4, 2), torch.arange(4)
    first, second = shard((images, labels), 0, 2), shard((images, labels), 1, 2)
    assert torch.equal(first[1], torch.tensor([0, 1])) and torch.equal(second[1], torch.tensor([2, 3]))
    assert torch.equal(second[0], images[2:])


def test_shard_explains_a_batch_that_cannot_be_split():
    with pytest.raises(ShardError, match="set train.meta_batch to a multiple of 2"):
        shard(meta_batch(1).unbind()[0], 0, 2)
    with pytest.raises(ShardError, match="3 tasks in the meta-batch .* cannot be split evenly between 2 processes"):
        shard(meta_batch(3), 0, 2)


# ------------------------------------------------------------------------------------- two real processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(**changes) -> TrainConfig:
    # SGD (not Adam) so that float-rounding differences in the summed gradients stay as small as they are.
    values = dict(ways=3, shots=1, queries=2, meta_batch=4, steps=4, optimizer="sgd", lr=0.05, momentum=0.0,
                  val_every=2, val_ways=3, val_queries=2, val_episodes=4, log_every=1)
    return TrainConfig(**{**values, **changes})


def train(learner_name: str, run_dir: Path, resume: bool = False, **changes) -> torch.nn.Module:
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    torch.manual_seed(0)
    learner = build_learner(learner_name, data.image_shape, BACKBONE,
                            {"ways": 3, "inner_steps": 1, "inner_lr": 0.1} if learner_name == "maml" else None)
    Trainer(learner, config(**changes), run_dir, progress=False).fit(data, data, resume=resume)
    return learner


def worker(rank: int, world_size: int, port: int, learner_name: str, run_dir: str, changes: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    learner = train(learner_name, Path(run_dir), **changes)
    torch.save(learner.state_dict(), Path(run_dir) / f"rank{rank}.pt")


def train_on_two_processes(learner_name: str, run_dir: Path, timeout: float = 120, **changes) -> None:
    """Train in two spawned processes; fails (instead of hanging) if they do not finish within `timeout`."""
    context = mp.start_processes(worker, args=(2, free_port(), learner_name, str(run_dir), changes), nprocs=2,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two training processes did not finish within {timeout} s")


def replicas(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run_dir / f"rank{rank}.pt") for rank in range(2)]


def assert_same_replicas(run_dir: Path) -> None:
    first, second = replicas(run_dir)
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name} differs between the processes"


@pytest.mark.parametrize("learner_name", ["maml", "protonet"])
def test_two_processes_stay_identical_and_match_one_process(learner_name, tmp_path):
    train(learner_name, tmp_path / "one")
    train_on_two_processes(learner_name, tmp_path / "two")
    # Every process ends with the same model, buffers (batch-norm running statistics) included.
    assert_same_replicas(tmp_path / "two")
    one, _ = load_learner(tmp_path / "one" / "checkpoints" / "last")
    two, _ = load_learner(tmp_path / "two" / "checkpoints" / "last")
    if learner_name == "maml":
        # MAML normalises task by task, so its meta-gradient is the sum of the same per-task gradients in either
        # case, and the weights match to float rounding. (Running statistics are averages over another sequence
        # of batches, so only the parameters are compared.) ProtoNet's batch norm normalises all tasks of a
        # meta-batch together, so each process's half gives other statistics, and only its replicas agree.
        for (name, a), b in zip(one.named_parameters(), two.parameters()):
            assert torch.allclose(a, b, atol=1e-5), f"{name} differs by {(a - b).abs().max():.2e}"
    logs = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]), "only the main process writes the training log"
    steps = [json.loads(line)["step"] for line in logs[1]]
    assert steps == [json.loads(line)["step"] for line in logs[0]]


def test_the_main_process_clock_stops_every_process_at_the_same_step(tmp_path):
    train_on_two_processes("protonet", tmp_path, steps=100000, time_budget_s=3.0, val_every=0)
    assert_same_replicas(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["step"] < 100000


def test_a_refused_run_folder_stops_every_process_with_an_error(tmp_path):
    train("protonet", tmp_path)  # the folder now holds a run
    with pytest.raises(mp.ProcessRaisedException, match="already holds a training run|could not claim"):
        train_on_two_processes("protonet", tmp_path)


def test_a_distributed_run_resumes_where_it_stopped(tmp_path):
    train_on_two_processes("maml", tmp_path / "straight")
    train_on_two_processes("maml", tmp_path / "resumed", steps=2)
    train_on_two_processes("maml", tmp_path / "resumed", steps=4, resume=True)
    assert_same_replicas(tmp_path / "resumed")
    straight, resumed = replicas(tmp_path / "straight")[0], replicas(tmp_path / "resumed")[0]
    for name, value in straight.items():
        assert torch.allclose(value.float(), resumed[name].float(), atol=1e-6), name


def evaluation_worker(rank: int, port: int, checkpoint: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    with process_group("cpu"):
        learner, _ = load_learner(checkpoint)
        data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
        result = evaluate(learner, EpisodeSet(data, 3, 1, 2, 9, seed=5), progress=False, across_processes=True)
        torch.save(result.per_episode, Path(out) / f"scores{rank}.pt")


def test_evaluation_across_processes_scores_every_episode_as_one_process_does(tmp_path):
    train("protonet", tmp_path)
    checkpoint = tmp_path / "checkpoints" / "last"
    learner, _ = load_learner(checkpoint)
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    alone = evaluate(learner, EpisodeSet(data, 3, 1, 2, 9, seed=5), progress=False, across_processes=True)
    mp.start_processes(evaluation_worker, args=(free_port(), str(checkpoint), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):  # 9 episodes: 5 scored by the first process, 4 by the second, all known to both
        assert torch.load(tmp_path / f"scores{rank}.pt") == alone.per_episode
