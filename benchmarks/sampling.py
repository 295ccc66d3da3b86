"""Episode sampling speed on Omniglot (Vinyals train split, rotations as classes), against the learn2learn
figures measured on this machine kind and quoted in issue 2.  Run: python benchmarks/sampling.py"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "sampling"
TITLE = "Episode sampling speed (Omniglot train split, 28x28, float32 episodes)"

# learn2learn's Omniglot pipeline (TaskDataset with NWays/KShots/LoadData/RemapLabels), episodes per second
# on this 2-core machine kind, as measured and reported in issue 2.
LEARN2LEARN = {(5, 2): 98.0, (60, 10): 1.9}


def measure(dataset, ways: int, images_per_class: int, seconds: float, batch: int = 1) -> float:
    """Episodes per second drawing single episodes (or meta-batches of `batch`) for about `seconds`."""
    from kshot.data import EpisodeSampler

    shots = images_per_class // 2
    sampler = EpisodeSampler(dataset, ways, shots, images_per_class - shots, seed=0)
    for _ in range(20):
        sampler.sample()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if batch == 1:
            sampler.sample()
        else:
            sampler.sample_batch(batch)
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from kshot.data import omniglot
    from kshot.pipeline import current_commit

    dataset = omniglot("train", progress=False)
    rows = []
    for (ways, images), baseline in LEARN2LEARN.items():
        for batch in (1, 32):
            rate = measure(dataset, ways, images, args.seconds, batch)
            rows.append({"dataset": dataset.name, "ways": ways, "images_per_class": images, "meta_batch": batch,
                         "episodes_per_second": round(rate, 1), "learn2learn_episodes_per_second": baseline,
                         "speedup": round(rate / baseline, 1), "threads": args.threads,
                         "cpu": platform.processor() or platform.machine(), "commit": current_commit(),
                         "command": "python benchmarks/sampling.py"})
            print(f"{ways}-way, {images} images/class, drawn {batch} at a time: {rate:,.0f} episodes/s "
                  f"({rate / baseline:,.0f}x learn2learn's {baseline})", flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "sampling.json").write_text(json.dumps(rows, indent=2) + "\n")
    from report import write_report

    write_report()


def section(rows: list[dict]) -> str:
    lines = ["| episode | drawn | kshot episodes/s | learn2learn episodes/s | speed-up | threads | commit |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        drawn = "one at a time" if r["meta_batch"] == 1 else f"meta-batches of {r['meta_batch']}"
        lines.append(f"| {r['ways']}-way, {r['images_per_class']} images a class | {drawn} | "
                     f"{r['episodes_per_second']:,.0f} | {r['learn2learn_episodes_per_second']} | "
                     f"{r['speedup']:,.0f}x | {r['threads']} | {r['commit']} |")
    lines += ["", "The learn2learn figures are the ones measured on this machine kind and quoted in issue 2 "
              "(learn2learn itself does not install here). Command: `python benchmarks/sampling.py`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
