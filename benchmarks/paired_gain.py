"""The gain of one trained run over another, measured episode by episode on the same fixed test episodes.

    python benchmarks/paired_gain.py runs/pn-omniglot-quick runs/protonet-hallucination-omniglot-5way-1shot

The first run is the baseline, the second the candidate (each a run folder, whose checkpoints/best is used, or a
checkpoint folder). Both are scored on one `EpisodeSet` per N-way K-shot setting (by default the settings both
runs' recipes evaluate), built once with the same seed, exactly as `benchmarks/compare.py` does (its helpers are
reused: same checkpoint lookup, dataset check, episode and weights digests). Reported per setting: each run's
accuracy +- 95% CI and ECE, and the gain (candidate - baseline) as the mean of the per-episode accuracy
differences +- its 95% CI. Because both runs see the same episodes, most of the episode-to-episode variation
(easy and hard tasks) cancels in the differences, so the paired interval is usually much narrower than the one
obtained by treating the two accuracies as independent (sqrt(ci_a^2 + ci_b^2)), which is also recorded.
Rows go to benchmarks/results/paired-gain-<tag>.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from compare import (  # noqa: E402
    ece_cell,
    fixed_episodes,
    load_runs,
    parse_settings,
    recipe_settings,
    scored,
    shared_test_set,
    weights_digest,
)

RESULT_PREFIX = "paired-gain"
TITLE = "Paired gains on identical test episodes"
Z_95 = statistics.NormalDist().inv_cdf(0.975)  # 1.959964, as kshot.evaluation uses


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval, 1.96 * sample std / sqrt(n) (nan for one value):
    the interval kshot reports for accuracies, so gains and accuracies are on one footing."""
    if not values:
        raise ValueError("need at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, float("nan")
    return mean, Z_95 * statistics.stdev(values) / math.sqrt(len(values))


def paired_difference(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of the per-episode differences candidate[i] - baseline[i], in the units given:
    the paired comparison (both scored on episode i)."""
    if len(baseline) != len(candidate):
        raise ValueError(f"paired scores need the same episodes: got {len(baseline)} and {len(candidate)} scores")
    return mean_ci95([c - b for b, c in zip(baseline, candidate)])


def unpaired_ci95(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """The 95% CI half-width of the difference of the two means if the scores were independent samples,
    sqrt(ci_a^2 + ci_b^2): what the paired interval is compared with."""
    return math.hypot(mean_ci95(baseline)[1], mean_ci95(candidate)[1])


def wins_ties_losses(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[int, int, int]:
    """Episodes on which the candidate scored higher than, the same as, and lower than the baseline."""
    wins = sum(c > b for b, c in zip(baseline, candidate))
    ties = sum(c == b for b, c in zip(baseline, candidate))
    return wins, ties, len(baseline) - wins - ties


def shared_settings(infos: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """The (N-way, K-shot) settings every run's recipe evaluates, in order; an error if none is shared."""
    declared = [recipe_settings(info) for info in infos]
    known = [d for d in declared if d is not None]
    if not known:
        raise ValueError("no run's recipe names its test settings; pass --settings, e.g. --settings 5x1")
    common = set.intersection(*known)
    if not common:
        raise ValueError(f"the runs' recipes evaluate no setting in common ({' vs '.join(map(str, known))}); "
                         f"pass --settings to score both on the same ones")
    return sorted(common)


def paired_gain(baseline: str, candidate: str, settings: Sequence[tuple[int, int]] | None = None,
                episodes: int = 1000, queries: int = 15, seed: int = 0, device: str = "cpu",
                bn_mode: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Score both runs on the same episode set for each setting; two rows per setting (baseline, candidate),
    each carrying the pair's paired gain. bn_mode None: each run's recipe's batch-norm mode."""
    from kshot.pipeline import current_commit, device_name

    loaded = load_runs([baseline, candidate], device)
    infos = [info for *_, info in loaded]
    dataset, fingerprint = shared_test_set(loaded, device, purpose="a paired gain needs runs of one dataset")
    pair = f"{loaded[1][0]} vs {loaded[0][0]}"
    commit, today = current_commit(), time.strftime("%Y-%m-%d")
    rows = []
    for ways, shots in settings or shared_settings(infos):
        episode_set, digest = fixed_episodes(dataset, ways, shots, queries, episodes, seed)
        results = [scored(label, learner, episode_set, bn_mode or info["recipe"].get("bn_mode", "inference"),
                          device, progress) for label, _, learner, info in loaded]
        scores = [[100 * s for s in r.per_episode] for r in results]
        gain, gain_ci = paired_difference(*scores)
        wins, ties, losses = wins_ties_losses(*scores)
        shared = {"pair": pair, "gain": round(gain, 3), "gain_ci95": round(gain_ci, 3),
                  "unpaired_ci95": round(unpaired_ci95(*scores), 3), "wins": wins, "ties": ties, "losses": losses}
        print(f"  gain {shared['gain']:+.2f} +- {shared['gain_ci95']:.2f} (paired 95% CI; unpaired "
              f"{shared['unpaired_ci95']:.2f}); "
              f"candidate better on {wins}, equal on {ties}, worse on {losses} episodes", flush=True)
        for role, (label, folder, learner, info), result in zip(("baseline", "candidate"), loaded, results):
            rows.append({
                "method": learner.name, "run": label, "role": role, "checkpoint": str(folder),
                "recipe": (info.get("recipe") or {}).get("name", ""), "dataset": dataset.name,
                "dataset_fingerprint": fingerprint, "episodes_digest": digest,
                "weights_digest": weights_digest(folder), "ways": ways, "shots": shots, "queries": queries,
                "episodes": episodes, "seed": seed, "accuracy": round(result.accuracy, 3),
                "ci95": round(result.ci95, 3), "ece": None if result.ece is None else round(result.ece, 3),
                "bn_mode": result.bn_mode, "train_steps": info.get("step"),
                "train_seconds": round(info.get("train_seconds", 0.0), 1), "eval_seconds": round(result.seconds, 1),
                "device": device_name(device), "commit": commit, "date": today, **shared})
    return rows


def section(rows: list[dict[str, Any]]) -> str:
    """Markdown for BENCHMARKS.md: one line per (pair, setting), baseline and candidate side by side."""
    lines = ["Each line scores two runs on the same test episodes (same digest) and gives the gain of the candidate "
             "over the baseline as the mean per-episode accuracy difference with its paired 95% CI (1.96 x std of "
             "the differences / sqrt(episodes)); the unpaired CI, sqrt(ci_a^2 + ci_b^2), is shown for comparison. "
             "ECE in percent (15 bins, all queries pooled).", "",
             "| setting | baseline (run) | accuracy % | ECE % | candidate (run) | accuracy % | ECE % | gain, points "
             "(paired 95% CI) | unpaired CI | better / equal / worse episodes | episodes, digest | train time "
             "(baseline / candidate) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["pair"], r["ways"], r["shots"], r["episodes_digest"]) for r in rows}, key=lambda k: k[:3])
    for pair, ways, shots, digest in keys:
        members = {r["role"]: r for r in rows if (r["pair"], r["ways"], r["shots"], r["episodes_digest"]) ==
                   (pair, ways, shots, digest)}
        if set(members) != {"baseline", "candidate"}:
            continue
        base, cand = members["baseline"], members["candidate"]
        minutes = f"{(base.get('train_seconds') or 0) / 60:.1f} / {(cand.get('train_seconds') or 0) / 60:.1f} min"
        lines.append(
            f"| {ways}-way {shots}-shot | {base['method']} ({base['run']}) | {base['accuracy']:.2f} +- "
            f"{base['ci95']:.2f} | {ece_cell(base)} | {cand['method']} ({cand['run']}) | {cand['accuracy']:.2f} +- "
            f"{cand['ci95']:.2f} | {ece_cell(cand)} | {cand['gain']:+.2f} +- {cand['gain_ci95']:.2f} | "
            f"{cand['unpaired_ci95']:.2f} | {cand['wins']} / {cand['ties']} / {cand['losses']} | "
            f"{cand['episodes']}, `{digest}` | {minutes} | {cand.get('commit', '')} |")
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


def result_name(rows: list[dict[str, Any]], tag: str) -> str:
    """paired-gain-<tag>, or paired-gain-<candidate run>-vs-<baseline run> (file-name safe) without a tag."""
    if not tag:
        runs = {r["role"]: r["run"] for r in rows}
        tag = f"{runs.get('candidate', 'candidate')}-vs-{runs.get('baseline', 'baseline')}"
    return f"{RESULT_PREFIX}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def main() -> None:
    from kshot.allocator import tune_malloc

    tune_malloc()  # as the kshot command does (kshot/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="run folder or checkpoint folder of the baseline")
    parser.add_argument("candidate", help="run folder or checkpoint folder of the candidate")
    parser.add_argument("--settings", default=None, help="N-way K-shot settings (5x1,20x5); default: those both "
                                                         "runs' recipes evaluate")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bn-mode", choices=["inference", "transductive"], default=None,
                        help="for both runs (default: each run's recipe's)")
    parser.add_argument("--tag", default="", help="results file paired-gain-<tag>.json (default: the run names)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    from report import RESULTS, write_report

    settings = parse_settings(args.settings) if args.settings else None
    rows = paired_gain(args.baseline, args.candidate, settings, args.episodes, args.queries, args.seed,
                       args.device, args.bn_mode, progress=not args.no_progress)
    command = "python benchmarks/paired_gain.py " + " ".join(sys.argv[1:])
    for row in rows:
        row["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result_name(rows, args.tag)}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path} and {write_report()}")


if __name__ == "__main__":
    main()
