"""Forward + backward time of each backbone on one 5-way 1-shot 15-query episode (80 images of 3x84x84): the cost
of a training episode's backbone passes, the part that grows from Conv-4 to WRN-28-10.

Training mode (batch statistics, dropout and DropBlock as trained), random images, the loss the mean of the squared
features. A warm-up pass on 4 images, then the median of `--repeats` timed episodes (fewer past `--budget-s` seconds:
WRN-28-10 takes minutes an episode on a CPU). The machine's load average is recorded before and after each
measurement (other work on a shared machine slows it).

    python benchmarks/backbone_speed.py                           # CPU, 1 and 2 threads
    python benchmarks/backbone_speed.py --device cuda --threads 1 --out benchmarks/results/backbone_speed-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "backbone_speed"
TITLE = "Backbone forward + backward time per 5-way 1-shot 15-query episode (80 images, 84x84)"
BACKBONES: dict[str, dict[str, Any]] = {
    "conv4": {"name": "conv4"},
    "conv4 hidden 32": {"name": "conv4", "hidden": 32},
    "resnet12": {"name": "resnet12"},
    "wrn-28-10": {"name": "wrn"},
}


def episode_ms(spec: dict[str, Any], images: int, size: int, repeats: int, budget_s: float, device: str
               ) -> tuple[float, int]:
    """Median ms of forward + backward over `images` random images after a small warm-up pass: `repeats` timed
    passes, or fewer (at least one) once `budget_s` seconds have gone; and how many were timed."""
    from kshot.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(spec, (3, size, size)).to(device).train()
    x = torch.randn(images, 3, size, size, device=device)

    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        backbone(x).pow(2).mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        backbone.zero_grad(set_to_none=True)
        return 1000 * (time.perf_counter() - start)

    backbone(x[:4]).sum().backward()  # warm-up (lazy initialisation; a full episode would cost WRN minutes)
    backbone.zero_grad(set_to_none=True)
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < 1000 * budget_s):
        times.append(once())
    return sorted(times)[len(times) // 2], len(times)


def section(rows: list[dict[str, Any]]) -> str:
    lines = ["| backbone | parameters | image | threads | ms / episode | load before / after | device | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['params']:,} | {r['image_size']} | {r['threads']} | "
                     f"{r['ms_per_episode']:.0f} | {r['load_before']:.2f} / {r['load_after']:.2f} | {r['device']} | "
                     f"{r['commit']} |")
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop repeating after this long")
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--out", default=str(HERE / "results" / f"{RESULT_PREFIX}.json"))
    args = parser.parse_args()
    from kshot.backbones import build_backbone

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip() or "unknown"
    command = "python benchmarks/backbone_speed.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        for name in args.backbones:
            spec = BACKBONES[name]
            load_before = os.getloadavg()[0]
            ms, timed = episode_ms(spec, 80, args.size, args.repeats, args.budget_s, args.device)
            params = sum(p.numel() for p in build_backbone(spec, (3, args.size, args.size)).parameters())
            row = {"backbone": name, "spec": spec, "params": params, "image_size": args.size, "threads": threads,
                   "ms_per_episode": round(ms, 1), "timed_episodes": timed, "load_before": load_before,
                   "load_after": os.getloadavg()[0], "device": device, "torch": torch.__version__, "commit": commit,
                   "date": time.strftime("%Y-%m-%d"), "command": command}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
