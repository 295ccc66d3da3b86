"""Transductive inference (kshot/transductive, kshot/learners/transductive.py): each method's formulas against
an independent reference computation, the behaviour the papers promise (TIM's objective and LaplacianShot's
energy go down, PT-MAP's transport has the required marginals), every method beating nearest centroid when
the query set is shifted, query-order invariance, and the transductive flag reaching results, the API and CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_dataset
from test_cli_errors import run_cli

from kshot import FewShotModel
from kshot.config import ConfigError
from kshot.data.sampler import EpisodeSet
from kshot.evaluation import evaluate
from kshot.learners import Learner, build_learner
from kshot.learners.base import EpisodeShape
from kshot.learners.transductive import TRANSDUCTIVE, base_class_mean, transductive_learner
from kshot.training.checkpoint import load_learner, save_checkpoint
from kshot.transductive import bd_cspn as bd_cspn_module
from kshot.transductive import laplacianshot as laplacianshot_module
from kshot.transductive import pt_map as pt_map_module
from kshot.transductive import tim as tim_module
from kshot.transductive.bd_cspn import bd_cspn, rectified_prototypes
from kshot.transductive.laplacianshot import knn_affinity, laplacianshot, laplacianshot_trace
from kshot.transductive.pt_map import power_transform, preprocess, pt_map, sinkhorn
from kshot.transductive.tim import tim, tim_logits, tim_objective, tim_trace

IMAGE_SHAPE = (1, 12, 12)
CONV = {"name": "conv4", "hidden": 8, "depth": 3}


def shifted_task(seed: int, ways: int = 5, shots: int = 1, queries: int = 15, dim: int = 16, spread: float = 0.8,
                 shift: float = 4.0) -> tuple[torch.Tensor, ...]:
    """Well-separated Gaussian classes (random centres, unit scale) whose queries are all moved by one vector of
    length `shift`: a nearest centroid misplaces many queries, a method that looks at the query set need not."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, dim, generator=generator)
    direction = torch.randn(dim, generator=generator)
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    support = centres[support_y] + spread * torch.randn(len(support_y), dim, generator=generator)
    query = centres[query_y] + spread * torch.randn(len(query_y), dim, generator=generator) \
        + shift * direction / direction.norm()
    return support, support_y, query, query_y


def nearest_centroid(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    centroids = torch.stack([support[support_y == c].mean(0) for c in range(ways)])
    return -torch.cdist(query, centroids).pow(2)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.argmax(1) == labels).double().mean().item()


# --------------------------------------------------------------------------------------------------- TIM
def test_tim_defaults_are_the_authors():
    assert tim_module.DEFAULTS == {"temperature": 15.0, "ce_weight": 0.1, "marginal_weight": 1.0,
                                   "conditional_weight": 0.1, "iterations": 1000, "lr": 1e-4}
    options = TRANSDUCTIVE["tim"].Options()
    assert {key: getattr(options, key) for key in tim_module.DEFAULTS} == tim_module.DEFAULTS
    assert options.normalize == "l2n"


def test_tim_objective_decreases_at_every_step_and_the_labels_improve():
    support, support_y, query, query_y = shifted_task(0)
    support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
    log_probs, objective = tim_trace(support, support_y, query, 5)
    assert objective.shape == (1001,)
    assert bool((objective[1:] <= objective[:-1] + 1e-6).all())
    assert objective[-1] < objective[0] - 0.1
    assert accuracy(log_probs, query_y) > accuracy(nearest_centroid(support, support_y, query, 5), query_y) + 0.2
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(query)))


def test_tim_closed_form_gradient_and_adam_steps_match_autograd_and_torch_adam():
    support, support_y, query, _ = shifted_task(1)
    support, query = F.normalize(support, dim=1).double(), F.normalize(query, dim=1).double()
    settings = {"temperature": 15.0, "ce_weight": 0.7, "marginal_weight": 1.3, "conditional_weight": 0.4}
    weights = torch.stack([support[support_y == c].mean(0) for c in range(5)]).requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=1e-3)
    objective = []
    for _ in range(30):  # the reference: autograd through tim_objective, torch's Adam
        loss = tim_objective(weights, support, support_y, query, **settings)
        objective.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    objective.append(tim_objective(weights, support, support_y, query, **settings).item())
    log_probs, trace = tim_trace(support, support_y, query, 5, iterations=30, lr=1e-3, **settings)
    torch.testing.assert_close(trace, torch.tensor(objective, dtype=torch.float64), atol=1e-10, rtol=1e-9)
    expected = torch.log_softmax(tim_logits(query, weights.detach(), 15.0), dim=1)
    torch.testing.assert_close(log_probs, expected, atol=1e-9, rtol=1e-9)


def test_tim_with_zero_query_weights_is_plain_softmax_classifier_fitting():
    support, support_y, query, _ = shifted_task(2)
    support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
    weights = torch.stack([support[support_y == c].mean(0) for c in range(5)]).requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=1e-3)
    for _ in range(60):  # the reference: autograd, torch's Adam, torch's cross-entropy on -T/2 |x - w|^2
        loss = F.cross_entropy(-7.5 * torch.cdist(support, weights).pow(2), support_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reference = torch.log_softmax(-7.5 * torch.cdist(query, weights.detach()).pow(2), dim=1)
    fitted = tim(support, support_y, query, 5, ce_weight=1.0, marginal_weight=0.0, conditional_weight=0.0,
                 iterations=60, lr=1e-3)
    torch.testing.assert_close(fitted, reference, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(fitted, tim(support, support_y, query, 5, iterations=60, lr=1e-3), atol=1e-3)


def test_tim_logits_are_half_temperature_squared_distances():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    torch.testing.assert_close(tim_logits(x, w, 15.0), -7.5 * torch.cdist(x, w).pow(2), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- BD-CSPN
def bd_cspn_reference(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                      eps: float, top: int | None) -> tuple[list[list[float]], list[list[float]]]:
    """The paper's formulas with Python loops and floats: shift, basic prototypes, pseudo labels (top Z by
    predicted probability), softmax(eps cos) weights within each class, rectified prototypes."""
    s, q, y = support.tolist(), query.tolist(), support_y.tolist()
    dim = len(s[0])

    def cos(a: list[float], b: list[float]) -> float:
        return sum(i * j for i, j in zip(a, b)) / math.sqrt(sum(i * i for i in a) * sum(j * j for j in b))

    xi = [sum(r[d] for r in s) / len(s) - sum(r[d] for r in q) / len(q) for d in range(dim)]
    shifted = [[r[d] + xi[d] for d in range(dim)] for r in q]
    basic = [[sum(s[i][d] for i in range(len(s)) if y[i] == c) / y.count(c) for d in range(dim)]
             for c in range(ways)]
    prototypes = []
    for c in range(ways):
        members = [s[i] for i in range(len(s)) if y[i] == c]
        mine = []
        for x in shifted:
            sims = [cos(x, basic[k]) for k in range(ways)]
            if max(range(ways), key=lambda k: sims[k]) == c:
                probability = math.exp(eps * sims[c]) / sum(math.exp(eps * v) for v in sims)
                mine.append((probability, x))
        mine.sort(key=lambda pair: -pair[0])
        members += [x for _, x in (mine if top is None else mine[:top])]
        scores = [math.exp(eps * cos(x, basic[c])) for x in members]
        prototypes.append([sum(w * x[d] for w, x in zip(scores, members)) / sum(scores) for d in range(dim)])
    return prototypes, shifted


@pytest.mark.parametrize("top", [None, 1])
def test_bd_cspn_rectified_prototypes_match_the_papers_formulas(top):
    generator = torch.Generator().manual_seed(3)
    support = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    query = torch.randn(9, 4, generator=generator, dtype=torch.float64) + 0.5
    expected, shifted_expected = bd_cspn_reference(support, support_y, query, 3, 10.0, top)
    prototypes, shifted = rectified_prototypes(support, support_y, query, 3, 10.0, top)
    torch.testing.assert_close(prototypes, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(shifted, torch.tensor(shifted_expected, dtype=torch.float64))
    log_probs = bd_cspn(support, support_y, query, 3, pseudo_per_class=top)
    cosines = F.normalize(shifted, dim=1) @ F.normalize(prototypes, dim=1).t()
    torch.testing.assert_close(log_probs, torch.log_softmax(10 * cosines, dim=1))
    if top is not None:  # keeping fewer queries changes the prototypes
        assert not torch.allclose(prototypes, rectified_prototypes(support, support_y, query, 3, 10.0)[0])


# ------------------------------------------------------------------------------------------------ PT-MAP
def test_pt_map_power_transform_is_the_papers_formula_and_keeps_the_sign_of_negatives():
    values = torch.tensor([0.0, 0.25, 4.0, -0.25], dtype=torch.float64)
    expected = [(0.0 + 1e-6) ** 0.5, (0.25 + 1e-6) ** 0.5, (4.0 + 1e-6) ** 0.5, -((0.25 + 1e-6) ** 0.5)]
    torch.testing.assert_close(power_transform(values, 0.5), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(power_transform(values[:3], 0.3), (values[:3] + 1e-6).pow(0.3))


def test_pt_map_sinkhorn_plan_has_the_required_marginals_and_the_gibbs_form():
    generator = torch.Generator().manual_seed(0)
    cost = torch.rand(12, 4, generator=generator, dtype=torch.float64) * 3
    rows, columns = torch.ones(12, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.float64)
    plan = sinkhorn(cost, rows, columns, lam=10.0, tolerance=1e-9)
    torch.testing.assert_close(plan.sum(0), columns, atol=1e-12, rtol=0)  # it ends on the column scaling
    torch.testing.assert_close(plan.sum(1), rows, atol=1e-6, rtol=0)
    loose = sinkhorn(cost, rows, columns, lam=10.0, tolerance=1e-2)
    assert (loose.sum(1) - rows).abs().max() > (plan.sum(1) - rows).abs().max()
    # An entropic transport plan is diag(a) exp(-lam cost) diag(b): log P + lam cost is a sum of a row term
    # and a column term, so its double differences vanish.
    additive = plan.log() + 10.0 * cost
    torch.testing.assert_close(additive - additive[:, :1] - additive[:1, :] + additive[0, 0],
                               torch.zeros_like(additive), atol=1e-9, rtol=0)


def pt_map_reference(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, ways: int) -> np.ndarray:
    """The authors' test_standard.py for one run, in NumPy: power transform, unit norm, centerDatas, then
    GaussianModel / MAP with compute_optimal_transport's while loop, 20 epochs, lam 10, alpha 0.2."""
    data = np.concatenate([support, query]) + 1e-6
    data = np.power(data, 0.5)
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    n_l = len(support)
    for part in (slice(0, n_l), slice(n_l, None)):
        data[part] = data[part] - data[part].mean(0, keepdims=True)
        data[part] = data[part] / np.linalg.norm(data[part], axis=1, keepdims=True)
    mus = np.stack([data[:n_l][support_y == c].mean(0) for c in range(ways)])

    def probas(mus: np.ndarray) -> np.ndarray:
        dist = ((data[:, None, :] - mus[None, :, :]) ** 2).sum(2)
        transport = np.exp(-10 * dist[n_l:])
        transport /= transport.sum()
        r, c = np.ones(len(query)), np.ones(ways) * len(query) / ways
        u = np.zeros(len(query))
        iters = 1
        while np.max(np.abs(u - transport.sum(1))) > 1e-6:
            u = transport.sum(1)
            transport *= (r / u)[:, None]
            transport *= (c / transport.sum(0))[None, :]
            if iters == 1000:
                break
            iters += 1
        mask = np.zeros((len(data), ways))
        mask[np.arange(n_l), support_y] = 1
        mask[n_l:] = transport
        return mask

    for _ in range(20):
        mask = probas(mus)
        estimate = mask.T @ data / mask.sum(0)[:, None]
        mus = mus + 0.2 * (estimate - mus)
    return probas(mus)[n_l:]


def test_pt_map_matches_the_authors_algorithm():
    support, support_y, query, _ = shifted_task(4, dim=8)
    support, query = support.double().relu(), query.double().relu()  # post-ReLU features, as the paper's
    reference = pt_map_reference(support.numpy(), support_y.numpy(), query.numpy(), 5)
    probabilities = pt_map(support, support_y, query, 5).exp()
    torch.testing.assert_close(probabilities, torch.from_numpy(reference / reference.sum(1, keepdims=True)),
                               atol=1e-6, rtol=1e-5)
    assert preprocess(support, query)[0].norm(dim=1).allclose(torch.ones(5, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- LaplacianShot
def test_laplacianshot_knn_affinity_links_each_query_to_its_nearest_others():
    points = torch.tensor([[0.0], [0.1], [0.25], [5.0], [5.3]])
    affinity = knn_affinity(points, knn=3)
    expected = torch.zeros(5, 5)
    for q in range(5):  # the knn - 1 = 2 nearest other points, by a plain sort
        others = sorted((abs(points[q, 0] - points[p, 0]).item(), p) for p in range(5) if p != q)
        for _, p in others[:2]:
            expected[q, p] = 1
    assert torch.equal(affinity, expected)
    assert torch.equal(knn_affinity(points[:2], knn=5), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_laplacianshot_energy_never_increases_with_a_symmetric_psd_affinity():
    support, support_y, query, _ = shifted_task(5)
    support, query = F.normalize(support, dim=1).double(), F.normalize(query, dim=1).double()
    kernel = torch.exp(-torch.cdist(query, query).pow(2) / 0.5)  # a Gaussian kernel: symmetric, PSD
    assert torch.linalg.eigvalsh(kernel).min() > -1e-9
    _, energy = laplacianshot_trace(support, support_y, query, 5, lam=2.0, affinity=kernel, iterations=50)
    assert len(energy) > 3
    assert bool((energy[1:] <= energy[:-1] + 1e-9).all()), energy
    assert energy[-1] < energy[0]


def test_laplacianshot_with_lambda_zero_is_the_nearest_prototype():
    support, support_y, query, _ = shifted_task(6)
    log_probs = laplacianshot(support, support_y, query, 5, lam=0.0, rectify=False)
    nearest = nearest_centroid(support, support_y, query, 5)
    torch.testing.assert_close(log_probs, torch.log_softmax(nearest, dim=1), atol=1e-4, rtol=1e-4)
    rectified = laplacianshot(support, support_y, query, 5, lam=0.0)  # the rectified prototypes differ
    assert not torch.allclose(rectified, log_probs, atol=1e-2)


def test_laplacianshot_rectified_prototypes_follow_the_authors_code():
    generator = torch.Generator().manual_seed(7)
    support = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    # Their metric_class_type: shift, members = support + shifted queries, predict by cosine to support means,
    # W = softmax over classes of 10 cos, prototype = mean over members predicted c of W[:, c] * x.
    shifted = query + (support.mean(0) - query.mean(0))
    members = torch.cat([support, shifted]).numpy()
    means = np.stack([support.numpy()[support_y.numpy() == c].mean(0) for c in range(3)])
    cos = np.array([[m @ g / np.linalg.norm(m) / np.linalg.norm(g) for g in means] for m in members])
    weights = np.exp(10 * cos) / np.exp(10 * cos).sum(1, keepdims=True)
    predict = cos.argmax(1)
    expected = np.stack([(weights[predict == c, c][:, None] * members[predict == c]).mean(0) for c in range(3)])
    prototypes, moved = laplacianshot_module.rectified_prototypes(support, support_y, query, 3)
    torch.testing.assert_close(prototypes, torch.from_numpy(expected))
    torch.testing.assert_close(moved, shifted)


# ------------------------------------------------------------------------------------------ all methods
METHODS = {  # each method on the features its learner gives it
    "tim": lambda s, y, q, n: tim(F.normalize(s, dim=1), y, F.normalize(q, dim=1), n),
    "bd-cspn": lambda s, y, q, n: bd_cspn(F.normalize(s, dim=1), y, F.normalize(q, dim=1), n),
    "pt-map": lambda s, y, q, n: pt_map(s, y, q, n),
    "laplacianshot": lambda s, y, q, n: laplacianshot(F.normalize(s, dim=1), y, F.normalize(q, dim=1), n),
}


def test_method_defaults_match_their_learners_options():
    for module, name in ((bd_cspn_module, "bd-cspn"), (pt_map_module, "pt-map"),
                         (laplacianshot_module, "laplacianshot")):
        options = TRANSDUCTIVE[name].Options()
        assert {key: getattr(options, key) for key in module.DEFAULTS} == module.DEFAULTS, name
        assert TRANSDUCTIVE[name].method_options == tuple(module.DEFAULTS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_beats_nearest_centroid_on_shifted_queries(method):
    tasks = [shifted_task(seed) for seed in range(3)]
    baseline = np.mean([accuracy(nearest_centroid(s, y, q, 5), qy) for s, y, q, qy in tasks])
    ours = np.mean([accuracy(METHODS[method](s, y, q, 5), qy) for s, y, q, qy in tasks])
    assert baseline < 0.8 and ours > baseline + 0.1, (baseline, ours)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_predictions_follow_the_queries_when_they_are_reordered(method):
    support, support_y, query, _ = shifted_task(8, shots=2, queries=6)
    order = torch.randperm(len(query), generator=torch.Generator().manual_seed(0))
    log_probs = METHODS[method](support, support_y, query, 5)
    torch.testing.assert_close(METHODS[method](support, support_y, query[order], 5), log_probs[order],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(query)), atol=1e-5, rtol=0)


def test_a_bad_task_is_a_clear_error():
    with pytest.raises(ValueError, match="cover 0..2"):
        bd_cspn(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(5, 4), 3)
    with pytest.raises(ValueError, match="at least one query"):
        pt_map(torch.rand(3, 4), torch.tensor([0, 1, 2]), torch.rand(0, 4), 3)


# ---------------------------------------------------------------------------------- learners, API, CLI
DATASET = synthetic_dataset(classes=12, per_class=8, size=12, seed=0)


def trained(name: str, **options) -> Learner:
    """The learner `name` after one training step (so batch norm and SimpleShot's mean are not at their start)."""
    torch.manual_seed(0)
    learner = build_learner(name, IMAGE_SHAPE, CONV, options)
    learner.prepare(DATASET)
    learner.train()
    loss, _ = learner.loss(next(iter(learner.training_stream(DATASET, EpisodeShape(5, 2, 3), seed=0))))
    loss.backward()
    learner.eval()
    return learner


def test_results_say_they_are_transductive():
    learner = trained("laplacianshot", batch_size=16)
    assert learner.transductive and learner.works_on_features
    result = evaluate(learner, EpisodeSet(DATASET, 5, 1, 3, count=2, seed=1), progress=False)
    assert result.transductive and result.as_row()["transductive"] is True
    assert "transductive: queries predicted together" in result.summary()
    inductive = evaluate(trained("simpleshot", batch_size=16), EpisodeSet(DATASET, 5, 1, 3, count=2, seed=1),
                         progress=False)
    assert not inductive.transductive and "transductive" not in inductive.summary()


def test_transductive_learner_on_a_protonet_shares_its_backbone_and_round_trips(tmp_path):
    protonet = trained("protonet")
    protonet.backbone_spec = dict(CONV)
    learner = transductive_learner(protonet, "tim", iterations=20)
    assert learner.backbone is protonet.backbone and learner.trained_as == "protonet"
    assert learner.config()["backbone"]["hidden"] == 8 and learner.options["normalize"] == "l2n"
    task = EpisodeSet(DATASET, 5, 1, 3, count=1, seed=2)[0]
    with torch.no_grad():
        logits = learner.adapt(task.support_x, task.support_y)(task.query_x)
    save_checkpoint(tmp_path / "tim", learner, {"step": 0})
    loaded, _ = load_learner(tmp_path / "tim")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded.adapt(task.support_x, task.support_y)(task.query_x), logits)
    with pytest.raises(ConfigError, match="unknown method 'tmi'; choose one of tim, bd-cspn, pt-map, laplacianshot"):
        transductive_learner(protonet, "tmi")


def test_the_base_class_mean_is_copied_or_computed_or_its_absence_is_an_error():
    simpleshot = trained("simpleshot", batch_size=16)
    copied = transductive_learner(simpleshot, "laplacianshot")
    assert torch.equal(copied.feature_mean, simpleshot.feature_mean) and copied.options["normalize"] == "cl2n"
    protonet = trained("protonet")
    with pytest.raises(ConfigError, match=r"does not keep; give the training set \(base=...\)"):
        transductive_learner(protonet, "laplacianshot")
    assert transductive_learner(protonet, "laplacianshot", normalize="l2n").options["normalize"] == "l2n"
    computed = transductive_learner(protonet, "laplacianshot", base=DATASET)
    images, _ = DATASET.all_images()
    with torch.no_grad():
        direct = protonet.backbone(DATASET.to_model(images)).mean(0)
    torch.testing.assert_close(computed.feature_mean, direct, atol=1e-5, rtol=1e-5)  # 96 images < 10,000: all
    subset = base_class_mean(protonet, DATASET, images=40)
    assert not torch.allclose(subset, direct, atol=1e-6) and torch.equal(subset, base_class_mean(protonet, DATASET,
                                                                                                 images=40))


def test_api_transductive_model_evaluates_transductively():
    model = FewShotModel(trained("simpleshot", batch_size=16), device="cpu")
    result = model.transductive("pt-map", epochs=3).evaluate(DATASET, ways=5, shots=1, queries=3, episodes=3,
                                                              progress=False)
    assert result.transductive and "transductive" in result.summary()
    assert not model.evaluate(DATASET, ways=5, shots=1, queries=3, episodes=3, progress=False).transductive


def test_cli_evaluate_transductive_and_a_wrong_method_name(monkeypatch, capsys, tmp_path):
    from test_api_cli import write_folder

    folder = write_folder(tmp_path / "images")
    run = tmp_path / "run"
    code, output = run_cli(monkeypatch, capsys, "train", "protonet-omniglot-quick", "--data", str(folder), "--out",
                           str(run), "--no-eval", "--device", "cpu", "--set", "train.steps=2",
                           "--set", "train.val_every=0")
    assert code == 0, output
    code, output = run_cli(monkeypatch, capsys, "evaluate", str(run), "--ways", "2", "--queries", "2",
                           "--episodes", "2", "--device", "cpu", "--transductive", "laplacianshot")
    assert code == 0, output
    assert "computing it from" in output and "laplacianshot on the backbone of this protonet run" in output
    assert "transductive: queries predicted together" in output.splitlines()[-1]
    code, output = run_cli(monkeypatch, capsys, "evaluate", str(run), "--transductive", "tmi")
    assert code == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert "'tmi' is not one of 'tim', 'bd-cspn', 'pt-map', 'laplacianshot'" in output
