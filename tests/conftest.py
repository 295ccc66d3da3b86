"""Shared fixtures: small synthetic datasets (no download) and the local Omniglot archives when available."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kshot.data import ClassDataset


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors, for which one thread is faster than two (and steadier on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_dataset(classes: int = 12, per_class: int | list[int] = 8, size: int = 12, channels: int = 1,
                      seed: int = 0, noise: int = 40) -> ClassDataset:
    """Learnable toy data: each class is a fixed random pattern plus per-image noise."""
    generator = torch.Generator().manual_seed(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * classes
    patterns = torch.randint(0, 256, (classes, channels, size, size), generator=generator)
    images = []
    for c, count in enumerate(counts):
        jitter = torch.randint(-noise, noise + 1, (count, channels, size, size), generator=generator)
        images.append((patterns[c] + jitter).clamp(0, 255))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
    return ClassDataset(torch.cat(images).to(torch.uint8), offsets, [f"class{c:02d}" for c in range(classes)],
                        name="synthetic")


def write_image_folders(root: Path, classes: int, per_class: int, seed: int) -> None:
    """root/classNN/i.png: `classes` folders of `per_class` 16x16 grey PNGs, each class a random pattern plus
    noise (the on-disk data of the tests that train and compare real run folders)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, (16, 16))
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-20, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def train_tiny_run(data: Path, learner: str, out: Path, options: dict, backbone: dict | None = None,
                   evaluate: list | None = None) -> Path:
    """A two-step training run of `learner` on the image folders data/train and data/test (3-way 1-shot, no
    validation), written to the run folder `out`; its recipe evaluates `evaluate` (default: nothing)."""
    from kshot.pipeline import train_recipe
    from kshot.recipe import Recipe

    recipe = Recipe.from_dict({
        "learner": learner, "backbone": backbone or {"name": "conv4", "hidden": 8}, "options": options,
        "dataset": {"name": "folder", "path": str(data), "image_size": 16, "channels": 1},
        "splits": {"train": "train", "val": "", "test": "test"},
        "train": {"ways": 3, "shots": 1, "queries": 2, "steps": 2, "val_every": 0, "val_shots": 1},
        "evaluate": evaluate or [],
    }, name=learner)
    train_recipe(recipe, out, progress=False)
    return out


def losses_before_and_after_training(learner: torch.nn.Module, batches: list, epochs: int = 5,
                                     lr: float = 0.01) -> tuple[float, float]:
    """The learner's mean loss over `batches` (without gradients) before and after `epochs` passes of Adam over
    them, one step a batch: the learner tests' check that a short run lowers the loss."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(learner.loss(b)[0].item() for b in batches) / len(batches)

    before = mean_loss()
    for _ in range(epochs):
        for b in batches:
            loss, _ = learner.loss(b)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return before, mean_loss()


@pytest.fixture
def toy() -> ClassDataset:
    return synthetic_dataset()


@pytest.fixture(scope="session")
def omniglot_archives() -> Path:
    """The folder of local Omniglot archives named by KSHOT_OMNIGLOT_ARCHIVES (skips when unset)."""
    folder = os.environ.get("KSHOT_OMNIGLOT_ARCHIVES")
    if not folder or not (Path(folder) / "images_background.zip").is_file():
        pytest.skip("set KSHOT_OMNIGLOT_ARCHIVES to a folder holding the Omniglot archives")
    return Path(folder)


def files_under(root: Path) -> list[Path]:
    """Every file below `root` (none if it does not exist): what a failed download or conversion left behind."""
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def serve_folder(folder: Path):
    """A local HTTP server for the files in `folder`, as a context manager giving its base URL: download code is
    tested against it, never against the internet."""
    import contextlib
    import functools
    import http.server
    import threading

    @contextlib.contextmanager
    def running():
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            httpd.server_close()

    return running()
