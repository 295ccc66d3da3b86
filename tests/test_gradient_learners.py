"""MAML, first-order MAML, ANIL, Meta-SGD and Reptile: meta-gradients against plain reference loops, the
Reptile update, learning on a tiny task, adaptation under no_grad, checkpoints and the trainer."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from kshot.data.dataset import ClassDataset
from kshot.data.sampler import EpisodeSampler
from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.training.checkpoint import load_learner, save_checkpoint
from kshot.training.trainer import TrainConfig, Trainer

IMAGE = (1, 8, 8)
CONV = {"name": "conv4", "hidden": 4, "depth": 2}
MLP = {"name": "mlp", "hidden": [6]}



def tiny_dataset(classes: int = 6, per_class: int = 5, seed: int = 0) -> ClassDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes * per_class, *IMAGE), dtype=torch.uint8, generator=generator)
    return ClassDataset(images, torch.arange(0, classes * per_class + 1, per_class),
                        [f"c{i}" for i in range(classes)], name="tiny")


def meta_batch(tasks: int = 3, ways: int = 3, shots: int = 1, queries: int = 2, seed: int = 0) -> Episode:
    return EpisodeSampler(tiny_dataset(), ways, shots, queries, seed=seed).sample_batch(tasks)


def learner(name: str, backbone: dict = MLP, **options):
    torch.manual_seed(0)
    return build_learner(name, IMAGE, backbone, {"ways": 3, **options})


def meta_gradient(model, batch: Episode) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def reference_gradient(model, batch: Episode, steps: int, lr: float, first_order: bool = False,
                       head_only: bool = False, learned_lrs: bool = False) -> list[torch.Tensor]:
    """A plain per-task loop with torch.autograd.grad(create_graph=True), the textbook MAML."""
    names = [n for n, _ in model.named_parameters() if n.startswith(("backbone.", "head."))]
    adapt_names = [n for n in names if n.startswith("head.")] if head_only else names
    all_params = dict(model.named_parameters())
    total = 0.0
    for task in batch:
        params = {n: all_params[n] for n in names}
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(model, params, (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(loss, [params[n] for n in adapt_names], create_graph=not first_order)
            for n, g in zip(adapt_names, grads, strict=True):
                rate = all_params["learned_lrs." + n.replace(".", "__")] if learned_lrs else lr
                params[n] = params[n] - rate * g
        out = torch.func.functional_call(model, params, (task.query_x,))
        total = total + F.cross_entropy(out, task.query_y)
    grads = torch.autograd.grad(total / batch.batch_size, list(model.parameters()), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, model.parameters(), strict=True)]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_maml_meta_gradient_matches_reference_loop(strategy):
    model = learner("maml", inner_steps=2, inner_lr=0.3, strategy=strategy)
    batch = meta_batch()
    assert_close(meta_gradient(model, batch), reference_gradient(model, batch, steps=2, lr=0.3))


def test_maml_with_batch_norm_conv_and_every_backward_match_reference():
    model = learner("maml", CONV, inner_steps=2, inner_lr=0.3)
    assert model.options["backward"] == "auto" and model.tasks_alive(torch.device("cpu"), 3) == 1  # the default
    batch = meta_batch()
    reference = reference_gradient(model, batch, steps=2, lr=0.3)
    losses = []
    for backward in ("auto", "per_task", "whole_batch"):
        model.options["backward"] = backward
        assert_close(meta_gradient(model, batch), reference)
        losses.append(model.loss(batch)[0].item())
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)


def saved_activation_elements(model, batch: Episode) -> int:
    """Elements of the tensors that autograd has saved for backward and that are still alive when `loss`
    returns, parameters and buffers excluded: what the graph the trainer backpropagates keeps in memory."""
    saved = []
    own = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in own:
            saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = model.loss(batch)
    alive = {id(t): t.numel() for t in (ref() for ref in saved) if t is not None}
    del loss
    return sum(alive.values())


@pytest.mark.parametrize("name,options", [("maml", {}), ("maml", {"first_order": True}), ("anil", {}),
                                          ("metasgd", {})])
def test_default_backward_keeps_no_task_graph_alive_after_the_loss(name, options):
    batch = meta_batch(tasks=4, queries=3)
    model = learner(name, CONV, inner_steps=2, inner_lr=0.3, **options)
    kept = saved_activation_elements(model, batch)  # the surrogate's: one gradient per parameter at most
    assert kept <= sum(p.numel() for p in model.parameters())
    model.options["backward"] = "whole_batch"  # every task's graph alive until the trainer's backward
    assert saved_activation_elements(model, batch) > 4 * max(kept, 1)


def test_tasks_alive_and_the_memory_warnings_advice_follow_backward_and_strategy(monkeypatch):
    from kshot.backbones import memory

    cpu = torch.device("cpu")
    assert learner("maml", CONV).tasks_alive(cpu, 8) == 1
    assert learner("maml", CONV, backward="whole_batch").tasks_alive(cpu, 8) == 8
    assert learner("maml", CONV, strategy="vmap").tasks_alive(cpu, 8) == 8
    assert learner("maml", CONV, task_threads=2).tasks_alive(cpu, 8) == 2
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    messages = []
    for backward in ("auto", "whole_batch"):
        with pytest.warns(memory.MAMLMemoryWarning) as caught:
            learner("maml", CONV, backward=backward).loss(meta_batch())
        messages.append(str(caught[0].message))
    assert "backward: per_task" not in messages[0] and "set first_order: true" in messages[0]
    assert "set backward: per_task (one task in memory at a time), first_order: true" in messages[1]


def test_per_task_backward_of_old_checkpoints_keeps_what_it_ran(tmp_path):
    assert learner("maml", per_task_backward=True).options["backward"] == "per_task"
    assert learner("maml", per_task_backward=False).options["backward"] == "whole_batch"  # the old default
    old = learner("maml", MLP, per_task_backward=True, strategy="vmap")  # that always ran the loop
    assert old.options["strategy"] == "loop" and "per_task_backward" not in old.options
    assert learner("maml", MLP).task_strategy(torch.device("cpu")) == "vmap"  # auto: vmap for an MLP ...
    assert learner("maml", MLP, backward="per_task").task_strategy(torch.device("cpu")) == "loop"  # ... not here
    with pytest.raises(ValueError, match="options.per_task_backward: input should be a valid boolean"):
        learner("maml", per_task_backward="yes")
    with pytest.raises(ValueError, match="give backward only"):
        learner("maml", per_task_backward=True, backward="auto")
    with pytest.raises(ValueError, match="backward: per_task needs strategy loop or auto"):
        learner("maml", backward="per_task", strategy="vmap")
    with pytest.raises(ValueError, match=r"options.backward: input should be 'auto', 'per_task' or 'whole_batch'"):
        learner("maml", backward="each")


def loop_and_vmap(name: str, backbone: dict, batch: Episode, train: bool = True, **options) -> list[dict]:
    """Loss, meta-gradient and buffers after one meta-batch of the same learner under each strategy."""
    found = []
    for strategy in ("loop", "vmap"):
        model = learner(name, backbone, strategy=strategy, **options).train(train)
        loss, _ = model.loss(batch)
        loss.backward()
        found.append({"loss": loss.item(), "grads": [p.grad for p in model.parameters()],
                      "buffers": dict(model.named_buffers()), "model": model})
    return found


@pytest.mark.parametrize("name,options,reference_options", [
    ("maml", {}, {}),
    ("maml", {"first_order": True}, {"first_order": True}),
    ("anil", {}, {"head_only": True}),
    ("metasgd", {}, {"learned_lrs": True}),
])
def test_vmap_with_batch_norm_gives_the_loops_losses_gradients_and_running_stats(name, options, reference_options):
    batch = meta_batch(tasks=3)
    loop, vmap = loop_and_vmap(name, CONV, batch, inner_steps=2, inner_lr=0.3, **options)
    assert vmap["loss"] == pytest.approx(loop["loss"], rel=1e-5)
    assert_close(vmap["grads"], loop["grads"])
    reference = learner(name, CONV, inner_steps=2, inner_lr=0.3, **options).train()
    assert_close(vmap["grads"], reference_gradient(reference, batch, 2, 0.3, **reference_options))
    counts = {n: int(b) for n, b in vmap["buffers"].items() if n.endswith("num_batches_tracked")}
    calls = 2 if name == "anil" else 3  # per task: the support and query passes (+ 1 inner step for MAML)
    assert counts == {n: 3 * calls for n in counts} and len(counts) == 2
    for n, b in loop["buffers"].items():
        torch.testing.assert_close(vmap["buffers"][n], b, atol=1e-6, rtol=1e-5)
        if n.endswith("running_var"):  # they did move, with the unbiased variance
            assert not torch.allclose(b, torch.ones_like(b))


def test_vmap_running_stats_replay_cumulative_averages_and_eval_mode():
    def backbone() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.BatchNorm1d(5, momentum=None),
                                   torch.nn.ReLU(), torch.nn.BatchNorm1d(5, affine=False))
    batch = meta_batch(tasks=3)
    found = []
    for strategy in ("loop", "vmap"):
        model = build_learner("maml", IMAGE, backbone(), {"ways": 3, "inner_lr": 0.3, "strategy": strategy}).train()
        model.loss(batch)[0].backward()
        found.append(model)
    for (n, a), (m, b) in zip(found[0].named_buffers(), found[1].named_buffers(), strict=True):
        assert n == m
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert int(found[1].backbone[2].num_batches_tracked) == 6
    loop, vmap = loop_and_vmap("maml", CONV, batch, train=False, inner_lr=0.3)  # eval mode: running stats used
    assert_close(vmap["grads"], loop["grads"])
    assert all(torch.equal(b, torch.zeros_like(b)) for n, b in vmap["buffers"].items() if "num_batches" in n)


def test_vmap_refuses_layers_with_buffers_of_their_own_and_runs_random_layers_per_task():
    drop_ramp = {"name": "resnet12", "widths": [4, 4, 4, 4], "dropblock_ramp": 10}
    with pytest.raises(ValueError, match=r"strategy 'vmap' needs a network whose only buffers are batch norm's, "
                                         r"but it has backbone.blocks.2.drop.seen"):
        build_learner("maml", (1, 16, 16), drop_ramp, {"strategy": "vmap"})
    torch.manual_seed(0)
    model = build_learner("maml", (1, 16, 16), {"name": "resnet12", "widths": [4, 4, 4, 4], "drop_rate": 0.5},
                          {"ways": 3, "strategy": "vmap", "inner_lr": 0.01}).train()
    batch = EpisodeSampler(ClassDataset(torch.randint(0, 256, (30, 1, 16, 16), dtype=torch.uint8),
                                        torch.arange(0, 31, 5), [f"c{i}" for i in range(6)]), 3, 1, 2,
                           seed=0).sample_batch(2)
    loss, _ = model.loss(batch)
    loss.backward()  # dropout and DropBlock draw under vmap (randomness="different"), batch norm runs
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.backbone.parameters())


@pytest.mark.parametrize("name,backbone,options,reference_options", [
    ("maml", CONV, {}, {}),
    ("maml", CONV, {"first_order": True}, {"first_order": True}),
    ("anil", CONV, {}, {"head_only": True}),
    ("metasgd", MLP, {}, {"learned_lrs": True}),
])
def test_task_threads_give_the_reference_meta_gradient(name, backbone, options, reference_options):
    batch = meta_batch(tasks=5)
    model = learner(name, backbone, inner_steps=2, inner_lr=0.3, **options)
    reference = reference_gradient(model, batch, 2, 0.3, **reference_options)
    for threads in (1, 2, 3):
        model.options["task_threads"] = threads
        assert_close(meta_gradient(model, batch), reference)


def test_task_threads_follow_the_learners_mode_options_and_weights():
    batch = meta_batch(tasks=4)
    intra_op = torch.get_num_threads()
    model = learner("maml", CONV, inner_steps=1, inner_lr=0.3, task_threads=2)
    counters = [b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    meta_gradient(model, batch)  # makes the thread pool and its replicas; train mode updates running stats
    after = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert [int(b - a) for a, b in zip(counters, after)] == [4 * 2] * len(after)  # 4 tasks, support + query
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # an optimiser step
    model.options["first_order"] = True
    assert_close(meta_gradient(model, batch), reference_gradient(model, batch, 1, 0.3, first_order=True))
    before = [b.clone() for b in model.buffers()]
    model.eval()  # running statistics used, not updated
    model.options["first_order"] = False
    model.options["task_threads"] = 1
    single = meta_gradient(model, batch)
    model.options["task_threads"] = 2
    assert_close(meta_gradient(model, batch), single)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.get_num_threads() == intra_op  # the caller's intra-op threads are left as they were
    with pytest.raises(ValueError, match="task_threads"):
        learner("maml", task_threads=0)


def test_first_order_is_the_query_gradient_at_the_adapted_parameters():
    batch = meta_batch()
    second = learner("maml", inner_steps=2, inner_lr=0.3)
    first = learner("maml", inner_steps=2, inner_lr=0.3, first_order=True)
    assert_close(meta_gradient(first, batch), reference_gradient(first, batch, 2, 0.3, first_order=True))
    difference = max((a - b).abs().max().item() for a, b in zip(meta_gradient(first, batch),
                                                                  meta_gradient(second, batch), strict=True))
    assert difference > 1e-4  # the second-order terms are really dropped, not merely tiny


def test_anil_adapts_only_the_head_and_matches_reference():
    model = learner("anil", inner_steps=2, inner_lr=0.3)
    batch = meta_batch()
    assert_close(meta_gradient(model, batch), reference_gradient(model, batch, 2, 0.3, head_only=True))
    assert all(g.abs().sum() > 0 for g in meta_gradient(model, batch))  # the backbone learns in the outer loop


def test_metasgd_learning_rates_receive_gradients_and_match_reference():
    model = learner("metasgd", inner_steps=1, inner_lr=0.2)
    batch = meta_batch()
    grads = meta_gradient(model, batch)
    assert_close(grads, reference_gradient(model, batch, 1, 0.2, learned_lrs=True))
    lr_grads = [p.grad for n, p in model.named_parameters() if n.startswith("learned_lrs.")]
    assert len(lr_grads) == len(model.network_params())
    assert all(g is not None and g.abs().sum() > 0 for g in lr_grads)
    first_order = learner("metasgd", inner_steps=1, inner_lr=0.2, first_order=True)
    meta_gradient(first_order, batch)
    assert all(p.grad.abs().sum() > 0 for n, p in first_order.named_parameters() if n.startswith("learned_lrs."))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_moves_weights_toward_the_adapted_ones(optimizer):
    model = learner("reptile", inner_steps=3, inner_lr=0.05, inner_optimizer=optimizer)
    batch = meta_batch()
    before = {n: p.detach().clone() for n, p in model.network_params().items()}
    adapted = [model.fit(t.support_x, t.support_y, 3, 0.05) for t in batch]
    target = {n: torch.stack([a[n] for a in adapted]).mean(0) for n in before}
    outer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0)
    loss, _ = model.loss(batch)
    outer.zero_grad()
    loss.backward()
    outer.step()
    for n, p in model.network_params().items():
        torch.testing.assert_close(p.detach(), before[n] + 0.5 * (target[n] - before[n]), atol=1e-6, rtol=1e-5)
    assert any((target[n] - before[n]).abs().max() > 1e-4 for n in before)


def test_reptile_mini_batches_cover_the_support_set_in_reshuffled_passes():
    from kshot.learners.reptile import Reptile

    torch.manual_seed(0)
    batches = Reptile.mini_batches(50, 10, 5, torch.device("cpu"))  # the paper's 5 steps of 10 of 50 examples
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(50))
    spanning = torch.cat(Reptile.mini_batches(6, 4, 3, torch.device("cpu")))  # two passes over 6 examples
    assert sorted(spanning[:6].tolist()) == list(range(6)) and sorted(spanning[6:].tolist()) == list(range(6))
    assert Reptile.mini_batches(5, None, 2, torch.device("cpu")) == [None, None]
    assert Reptile.mini_batches(5, 8, 2, torch.device("cpu")) == [None, None]


def test_reptile_inner_steps_see_only_their_mini_batch():
    model = learner("reptile", inner_optimizer="sgd", inner_batch_size=2)
    task = next(iter(meta_batch(shots=2)))  # 6 support examples
    seen = []
    call = model.call
    model.call = lambda params, x: (seen.append(x.shape[0]), call(params, x))[1]
    model.fit(task.support_x, task.support_y, 4, 0.01, batch_size=2)
    assert seen == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="inner_batch_size"):
        learner("reptile", inner_batch_size=0)


@pytest.mark.parametrize("name,options", [("maml", {}), ("maml", {"first_order": True}), ("anil", {}),
                                          ("metasgd", {}), ("reptile", {"inner_lr": 0.01})])
def test_loss_decreases_on_a_tiny_fixed_task(name, options):
    model = learner(name, CONV, inner_lr=options.pop("inner_lr", 0.1), **options)
    batch = meta_batch(tasks=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0) if name == "reptile" else \
        torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    with torch.no_grad():
        start = [model.criterion(model(t.support_x), t.support_y).item() for t in batch]
    losses = []
    for _ in range(15):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if name == "reptile":  # the surrogate is a distance; the initialisation must come to fit the tasks better
        with torch.no_grad():
            fitted = [model.criterion(model(t.support_x), t.support_y).item() for t in batch]
        assert sum(fitted) < 0.8 * sum(start)
    else:
        assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "reptile"])
def test_adapt_works_inside_no_grad_and_leaves_weights_alone(name):
    model = learner(name, CONV, test_inner_steps=3)
    episode = meta_batch(tasks=1).unbind()[0]
    before = [p.detach().clone() for p in model.parameters()]
    model.eval()
    with torch.no_grad():
        predictor = model.adapt(episode.support_x, episode.support_y)
        logits = predictor(episode.query_x)
    assert logits.shape == (6, 3) and not logits.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with torch.enable_grad():  # adaptation really changes the predictions
        zero = learner(name, CONV, test_inner_steps=0)
        zero.load_state_dict(model.state_dict())
        zero.eval()
        assert not torch.allclose(zero.adapt(episode.support_x, episode.support_y)(episode.query_x), logits)


def test_wrong_ways_and_bad_options_raise_clear_errors():
    model = learner("maml")
    with pytest.raises(ValueError, match="3-way head"):
        model.loss(meta_batch(ways=4))
    with pytest.raises(ValueError, match="3-way head"):
        model.adapt(meta_batch(ways=4).support_x[0], meta_batch(ways=4).support_y[0])
    with pytest.raises(ValueError, match="options.inner_stepz: unknown setting; did you mean 'inner_steps'"):
        learner("maml", inner_stepz=2)
    with pytest.raises(ValueError, match="unknown strategy|input should be 'auto', 'loop' or 'vmap'"):
        learner("maml", CONV, strategy="vmapp")
    with pytest.raises(ValueError, match="classification"):
        learner("anil", task="regression")
    with pytest.raises(ValueError, match=r"options.inner_steps: input should be greater than or equal to 0 \(got -1\)"):
        learner("maml", inner_steps=-1)
    with pytest.raises(ValueError, match=r"options.test_inner_steps: input should be a valid integer \(got 1.5\)"):
        learner("maml", test_inner_steps=1.5)
    with pytest.raises(ValueError, match=r"options.test_inner_steps: input should be a valid integer \(got True\)"):
        learner("reptile", test_inner_steps=True)


@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile"])
def test_checkpoint_round_trip_rebuilds_learner_with_options(tmp_path, name):
    model = learner(name, CONV, inner_steps=2, test_inner_steps=4)
    meta_gradient(model, meta_batch())  # some state in the batch-norm buffers
    save_checkpoint(tmp_path / "ckpt", model, {"step": 1})
    loaded, info = load_learner(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.options == model.options and info["step"] == 1
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b)
    episode = meta_batch(tasks=1).unbind()[0]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.adapt(episode.support_x, episode.support_y)(episode.query_x),
                                   loaded.adapt(episode.support_x, episode.support_y)(episode.query_x))


def test_trainer_runs_maml_with_meta_batches_and_validation(tmp_path):
    model = learner("maml", CONV, inner_lr=0.1)
    config = TrainConfig(ways=3, shots=1, queries=2, meta_batch=2, steps=4, val_every=2, val_ways=3,
                         val_queries=2, val_episodes=3, val_bn_mode="transductive", log_every=1)
    history = Trainer(model, config, tmp_path / "run", progress=False).fit(tiny_dataset(), tiny_dataset(seed=1))
    assert [row["step"] for row in history] == [2, 4] and all("val_accuracy" in row for row in history)


def test_metasgd_rates_can_start_uniform_in_a_range():
    model = learner("metasgd", inner_lr_range=[0.005, 0.1])
    rates = torch.cat([p.detach().flatten() for p in model.learned_lrs.values()])
    assert rates.min() >= 0.005 and rates.max() <= 0.1 and rates.std() > 0.01
    constant = learner("metasgd", inner_lr=0.3)
    assert all(torch.all(p == 0.3) for p in constant.learned_lrs.values())
    with pytest.raises(ValueError, match="inner_lr_range"):
        learner("metasgd", inner_lr_range=[0.1, 0.01])
