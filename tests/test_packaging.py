"""Packaging: one version source and `kshot --version`, LICENSE and py.typed shipped, dependency lower bounds,
an sdist that carries its tests, progress bars quiet off a terminal, and a cache folder that follows the platform."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn

import kshot
from kshot.cli import cli
from kshot.data import EpisodeSet
from kshot.data.paths import data_root
from kshot.evaluation import evaluate
from kshot.learners.base import Learner
from kshot.progress import progress_bar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------------------- version
def test_version_has_one_source(pyproject):
    project = pyproject["project"]
    assert "version" not in project, "pyproject.toml must not repeat the version; it is read from kshot"
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kshot.__version__"}
    Version(kshot.__version__)  # a valid version string


def test_kshot_version_prints_the_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"kshot {kshot.__version__}\n"


# -------------------------------------------------------------------------------------- LICENSE, py.typed
def test_license_and_py_typed_exist_and_are_shipped(pyproject):
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the kshot authors" in license_text
    assert pyproject["project"]["license"] == "MIT"
    assert "LICENSE" in pyproject["project"]["license-files"]
    assert (ROOT / "kshot" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["kshot"]


# ------------------------------------------------------------------------------------------ lower bounds
def lower_bounds(pyproject) -> dict[str, Version]:
    bounds = {}
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        assert floors, f"{line!r} has no lower bound"
        bounds[requirement.name.lower()] = max(floors)
    return bounds


def test_dependency_lower_bounds_cover_the_apis_used(pyproject):
    bounds = lower_bounds(pyproject)
    assert bounds["pillow"] >= Version("9.1")  # PIL.Image.Resampling
    assert bounds["torch"] >= Version("2.0")  # torch.func, torch.optim.lr_scheduler.LRScheduler
    assert bounds["pydantic"] >= Version("2.6")  # kshot.config: pydantic v2 dataclasses and ConfigDict
    assert bounds["platformdirs"] >= Version("3")  # kshot.data.paths
    assert {"numpy", "safetensors", "tqdm", "pyyaml", "click"} <= bounds.keys()


# ------------------------------------------------------------------------------------------------- sdist
def sdist_files() -> set[str]:
    """The files MANIFEST.in adds to the sdist, evaluated the way setuptools does, without building."""
    filelist = pytest.importorskip("setuptools._distutils.filelist")
    skipped = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "build", "dist",
               ".kshot-cache"}
    found = filelist.FileList()
    found.allfiles = []
    for folder, names, files in os.walk(ROOT):
        names[:] = [n for n in names if n not in skipped and not n.endswith(".egg-info")]
        found.allfiles += [Path(folder, f).relative_to(ROOT).as_posix() for f in files]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            found.process_template_line(line)
    return set(found.files)


def test_sdist_carries_the_tests_and_their_conftest():
    files = sdist_files()
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert "tests/conftest.py" in files and tests <= files
    assert {"LICENSE", "README.md", "DEVELOPERS.md", "Makefile", "kshot/py.typed", "benchmarks/reproduce.py",
            "kshot/recipes/protonet-omniglot-quick.yaml"} <= files
    assert not any(f.startswith("benchmarks/results/logs/") for f in files)


# ------------------------------------------------------------------------------------------ progress bars
class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(stream: io.StringIO, enabled: bool) -> str:
    for _ in progress_bar(range(5), file=stream, enabled=enabled, mininterval=0):
        pass
    return stream.getvalue()


def test_progress_bar_draws_only_on_a_terminal_and_when_enabled():
    assert drawn(TerminalStream(), enabled=True)  # a terminal gets a bar
    assert drawn(io.StringIO(), enabled=True) == ""  # a log file or pipe gets nothing
    assert drawn(TerminalStream(), enabled=False) == ""  # switched off is off everywhere


class NearestMean(Learner):
    name = "nearest-mean"

    def loss(self, batch):
        raise NotImplementedError

    def adapt(self, support_x, support_y):
        means = torch.stack([support_x[support_y == c].float().mean(0) for c in range(int(support_y.max()) + 1)])
        return lambda query_x: -((query_x.float().unsqueeze(1) - means) ** 2).flatten(2).sum(-1)


def test_evaluation_progress_is_quiet_when_stderr_is_not_a_terminal(toy, capsys):
    assert not sys.stderr.isatty()
    evaluate(NearestMean(nn.Linear(1, 1), toy.image_shape), EpisodeSet(toy, 5, 1, 2, 4, seed=0), progress=True)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- cache folder
@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="XDG_CACHE_HOME is the Linux/BSD convention")
def test_cache_folder_follows_xdg_and_kshot_data_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("KSHOT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "kshot"
    assert data_root().is_dir()
    monkeypatch.setenv("KSHOT_DATA", str(tmp_path / "chosen"))
    assert data_root() == tmp_path / "chosen"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
