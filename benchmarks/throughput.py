"""Data-path and training throughput at miniImageNet's shape (issue 11): images per second DELIVERED by the data
path (5-way 1-shot 15-query episode sampling + to_model + training augmentation) and TRAINED (forward + backward
+ Adam step of ProtoNet episodes) for Conv-4 and ResNet-12, at 1 and 2 threads, with channels_last and bf16
autocast measured against float32 (and bf16's loss difference on the same batch).

The data is a synthetic uint8 ClassDataset of miniImageNet's train split (64 classes x 600 RGB 84x84 images;
pixel values do not change the speed), or the real miniImageNet cache when $KSHOT_MINIIMAGENET is set.

On CUDA (`--device cuda`), the dataset is kept on the GPU, as `kshot.pipeline.train_recipe` does; `--pin` adds
the alternative for data that does not fit there: episodes gathered on the CPU, pinned, and copied with
`non_blocking=True`. Run: python benchmarks/throughput.py [--threads 1 2] [--backbones conv4 resnet12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "throughput"
TITLE = "Data-path and training throughput at miniImageNet's shape (5-way 1-shot 15-query, 84x84 RGB)"
RESULTS_FILE = HERE / "results" / "throughput.json"

WAYS, SHOTS, QUERIES = 5, 1, 15
IMAGES_PER_EPISODE = WAYS * (SHOTS + QUERIES)
RFS_AUGMENT = {"crop": {"kind": "random_resized"}, "flip": 0.5, "jitter": {}}
PAD_AUGMENT = {"crop": {"kind": "pad", "padding": 8}, "flip": 0.5, "jitter": {}}
IMAGENET_NORMALISATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def dataset(normalised: bool = False):
    """miniImageNet's train split (real when $KSHOT_MINIIMAGENET is set, else synthetic uint8 of its shape),
    optionally with an ImageNet mean/std contract (to measure augmentation's un-normalise/normalise)."""
    from kshot.data import ClassDataset, InputContract

    if os.environ.get("KSHOT_MINIIMAGENET"):
        from kshot.data.miniimagenet import miniimagenet

        data = miniimagenet("train", progress=False)
    else:
        images = torch.randint(0, 256, (64 * 600, 3, 84, 84), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        data = ClassDataset(images, torch.arange(0, 64 * 600 + 1, 600), [f"class{c}" for c in range(64)],
                            name="synthetic-miniimagenet-train", contract=InputContract(channels=3, image_size=84))
    if normalised:
        data = ClassDataset(data.images, data.offsets, data.base_names, data.rotations, data.name,
                            data.contract.replace(**IMAGENET_NORMALISATION))
    return data


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def delivered(data, augment: dict | None, seconds: float, device, pin: bool = False, rounds: int = 5
              ) -> tuple[float, float]:
    """Images per second of training episodes ready on `device` (sampled, scaled by to_model, augmented): the
    best and the median of `rounds` rounds of seconds / rounds each (the best is what the code can do on a
    shared machine, the median what it did)."""
    from kshot.data import EpisodeSampler
    from kshot.data.augment import BatchAugmenter

    contract = data.contract
    augmenter = BatchAugmenter(augment, seed=0, mean=contract.mean, std=contract.std) if augment else None
    if device.type == "cuda" and not pin:
        data = data.to(device)  # the pipeline's way: the whole uint8 dataset on the GPU
    sampler = EpisodeSampler(data, WAYS, SHOTS, QUERIES, seed=0)

    def step() -> None:
        episode = sampler.sample()
        if pin:
            episode = type(episode)(*(t.pin_memory() for t in (episode.support_x, episode.support_y,
                                                                 episode.query_x, episode.query_y, episode.classes)))
            episode = episode.to(device, non_blocking=True)
        if augmenter is not None:
            augmenter(episode)

    with torch.no_grad():
        for _ in range(5):
            step()
        rates = []
        for _ in range(rounds):
            synchronize(device)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                step()
                count += 1
            synchronize(device)
            rates.append(count * IMAGES_PER_EPISODE / (time.perf_counter() - start))
    return max(rates), statistics.median(rates)


def trained(backbone: str, variant: str, steps: int, device, data) -> tuple[float, float, float, float]:
    """Images per second through forward + backward + Adam of ProtoNet on fixed augmented episodes (the best and
    the median step), the float32 loss of the first batch, and the absolute difference of the variant's loss
    from it (same batch and weights, dropout off).

    Variants: float32; channels_last (weights and images); bf16 (the whole loss under CPU/CUDA autocast);
    bf16-backbone (only the backbone under autocast, its features and the distances in float32)."""
    from kshot.backbones import DropBlock
    from kshot.data import EpisodeSampler
    from kshot.data.augment import BatchAugmenter
    from kshot.learners import build_learner

    torch.manual_seed(0)
    learner = build_learner("protonet", data.image_shape, {"name": backbone}).to(device).train()
    sampler = EpisodeSampler(data, WAYS, SHOTS, QUERIES, seed=0)
    augmenter = BatchAugmenter(RFS_AUGMENT, seed=0)
    episodes = [augmenter(sampler.sample().to(device)) for _ in range(2)]

    def first_loss(context) -> float:
        """The loss of the first batch with batch norm in training mode but dropout and DropBlock off: their
        masks depend on memory layout and dtype, so they would differ between variants whatever the seed."""
        droppers = [m for m in learner.modules() if isinstance(m, (torch.nn.Dropout, DropBlock))]
        for module in droppers:
            module.eval()
        with torch.no_grad(), context:
            loss = learner.loss(episodes[0])[0].float().item()
        for module in droppers:
            module.train()
        return loss

    exact = first_loss(contextlib.nullcontext())
    if "channels_last" in variant:
        learner = learner.to(memory_format=torch.channels_last)
        episodes = [type(e)(e.support_x.contiguous(memory_format=torch.channels_last), e.support_y,
                            e.query_x.contiguous(memory_format=torch.channels_last), e.query_y, e.classes)
                    for e in episodes]
    if "bf16-backbone" in variant:
        learner.backbone = AutocastBackbone(learner.backbone, device.type)
    whole_bf16 = "bf16" in variant and "bf16-backbone" not in variant

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if whole_bf16 else contextlib.nullcontext()

    loss_difference = abs(first_loss(autocast()) - exact)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(episode) -> None:
        with autocast():
            loss, _ = learner.loss(episode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(episodes[0])  # warm-up (oneDNN primitives, allocator)
    rates = []
    for i in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step(episodes[i % len(episodes)])
        synchronize(device)
        rates.append(IMAGES_PER_EPISODE / (time.perf_counter() - start))
    return max(rates), statistics.median(rates), exact, loss_difference


class AutocastBackbone(torch.nn.Module):
    """A backbone run under bf16 autocast, its features returned in float32 (for the float32 distances)."""

    def __init__(self, inner: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner, self.device_type = inner, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(x).float()


def available_backbones(wanted: list[str]) -> list[str]:
    from kshot.backbones import BACKBONES

    missing = [name for name in wanted if name not in BACKBONES]
    if missing:
        print(f"skipping {', '.join(missing)}: not in kshot.backbones here", flush=True)
    return [name for name in wanted if name in BACKBONES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per data-path measurement")
    parser.add_argument("--backbones", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 2],
                        help="timed training episodes per backbone (in --backbones order)")
    parser.add_argument("--variants", nargs="+", default=["float32", "channels_last", "bf16", "bf16-backbone"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pin", action="store_true", help="CUDA only: also measure pinned CPU episodes")
    args = parser.parse_args()
    from kshot.pipeline import current_commit

    device = torch.device(args.device)
    plain, normalised = dataset(), dataset(normalised=True)
    backbones = available_backbones(args.backbones)
    steps = dict(zip(args.backbones, args.steps + [args.steps[-1]] * len(args.backbones)))
    rows: list[dict] = []
    command = (f"python benchmarks/throughput.py --threads {' '.join(map(str, args.threads))} --backbones "
               f"{' '.join(args.backbones)} --steps {' '.join(map(str, args.steps))} --variants "
               f"{' '.join(args.variants)}")

    def record(row: dict, load_before: float) -> None:
        row.update(device=str(device), dataset=plain.name, commit=current_commit(),
                   load_1min=round((load_before + os.getloadavg()[0]) / 2, 2), command=command,
                   date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        print(json.dumps(row), flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        paths = [("sample + to_model", plain, None, False), ("+ RFS augmentation (random resized)", plain,
                 RFS_AUGMENT, False), ("+ RFS augmentation (pad crop)", plain, PAD_AUGMENT, False),
                 ("+ RFS augmentation, mean/std contract", normalised, RFS_AUGMENT, False)]
        if args.pin and device.type == "cuda":
            paths.append(("+ RFS augmentation, pinned CPU episodes", plain, RFS_AUGMENT, True))
        for name, data, augment, pin in paths:
            load = os.getloadavg()[0]
            best, median = delivered(data, augment, args.seconds, device, pin)
            record({"measure": "delivered", "variant": name, "threads": threads,
                    "images_per_second": round(best, 1), "median_images_per_second": round(median, 1)}, load)
        for backbone in backbones:
            for variant in args.variants:
                load = os.getloadavg()[0]
                best, median, loss, difference = trained(backbone, variant, steps[backbone], device, plain)
                record({"measure": "trained", "backbone": backbone, "variant": variant, "threads": threads,
                        "images_per_second": round(best, 2), "median_images_per_second": round(median, 2),
                        "episodes": steps[backbone], "float32_loss": round(loss, 4),
                        "loss_difference": float(f"{difference:.3g}")}, load)
    save(rows)


def row_key(row: dict) -> tuple:
    return row["measure"], row.get("backbone"), row["variant"], row["threads"], row["device"]


def save(rows: list[dict]) -> None:
    """Write the rows to results/throughput.json, replacing earlier rows of the same measurement and keeping the
    others (so a part can be measured again on its own)."""
    kept = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else []
    fresh = {row_key(row) for row in rows}
    merged = [row for row in kept if row_key(row) not in fresh] + rows
    merged.sort(key=lambda r: (r["device"], r["measure"] != "delivered", r.get("backbone") or "", r["threads"]))
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {RESULTS_FILE}")


def section(rows: list[dict]) -> str:
    """BENCHMARKS.md's section: delivered and trained images per second, with the machine load measured."""
    lines = ["| measure | what | threads | images/s best (median) | loss difference from float32 | "
             "1-min load | device | commit |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = r["variant"] if r["measure"] == "delivered" else f"ProtoNet {r['backbone']}, {r['variant']}"
        difference = "" if r.get("loss_difference") is None else \
            f"{r['loss_difference']:g} of {r['float32_loss']:g} ({100 * r['loss_difference'] / r['float32_loss']:.2g}%)"
        rate = f"{r['images_per_second']:,.1f} ({r.get('median_images_per_second', 0):,.1f})"
        lines.append(f"| {r['measure']} | {what} | {r['threads']} | {rate} | {difference} | "
                     f"{r.get('load_1min', '')} | {r['device']} | {r['commit']} |")
    lines += ["", f"Episodes of {IMAGES_PER_EPISODE} images (5-way 1-shot 15-query) from {rows[0]['dataset']}; "
              "'delivered' is the data path alone (sampling, to_model, augmentation), 'trained' is forward + "
              "backward + Adam on pre-drawn episodes; best and median of the timed rounds or steps. Load is the "
              "machine's 1-minute load average (2 cores, shared)."]
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


if __name__ == "__main__":
    main()
