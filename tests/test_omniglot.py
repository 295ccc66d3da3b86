"""Omniglot: the Vinyals split against the published files, and the download / verify / convert path on small
fake archives served from a local HTTP server (corrupt, truncated or wrong archives must be refused)."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kshot.data.download import DownloadError, download
from kshot.data.omniglot import OmniglotError, load_omniglot, omniglot

omniglot_module = importlib.import_module("kshot.data.omniglot")


# ----------------------------------------------------------------------------------------- the real archives
@pytest.mark.omniglot
@pytest.mark.parametrize("split,characters", [("train", 1028), ("val", 172), ("test", 423), ("trainval", 1200)])
def test_vinyals_split_matches_published_files(omniglot_archives, split, characters):
    data = omniglot(split, archives=omniglot_archives, progress=False)
    published = (omniglot_archives / "splits" / "vinyals" / f"{split}.txt").read_text().split()
    assert data.num_base_classes == characters and data.num_classes == 4 * characters
    assert sorted(data.class_names()) == sorted(published)
    assert data.image_shape == (1, 28, 28) and len(data.images) == 20 * characters


@pytest.mark.omniglot
def test_omniglot_images_are_bright_strokes_on_dark(omniglot_archives):
    full = load_omniglot(archives=omniglot_archives, progress=False)
    assert full.num_base_classes == 1623 and (full.counts() == 20).all()
    assert full.images.float().mean() < 60  # mostly background, which is dark after inversion
    assert len(set(full.base_names[:964]) & set(full.base_names[964:])) == 0
    assert len(omniglot("evaluation", archives=omniglot_archives).base_names) == 659


# ------------------------------------------------------------------------------------- small fake archives
SMALL = {"images_background": (None, 2, 3), "images_evaluation": (None, 1, 2)}


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_archive(path: Path, name: str, alphabets: int, characters: int, drawings: int = 2) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        count = 0
        for a in range(alphabets):
            for c in range(characters // alphabets + (a < characters % alphabets)):
                for d in range(drawings):
                    handle.writestr(f"{name}/Alpha{name[7:10]}{a}/character{c + 1:02d}/{count}_{d}.png",
                                    _png(40 * d + 10 * c))
                count += 1
    return path


@pytest.fixture
def small_omniglot(monkeypatch, tmp_path):
    """Shrink the expected layout to 3 + 2 characters of 2 drawings, and make matching archives."""
    folder = tmp_path / "archives"
    folder.mkdir()
    archives = {}
    for name, (_, alphabets, characters) in SMALL.items():
        path = _fake_archive(folder / f"{name}.zip", name, alphabets, characters)
        archives[name] = (hashlib.md5(path.read_bytes()).hexdigest(), alphabets, characters)
    monkeypatch.setattr(omniglot_module, "ARCHIVES", archives)
    monkeypatch.setattr(omniglot_module, "DRAWINGS_PER_CHARACTER", 2)
    monkeypatch.delenv("KSHOT_OMNIGLOT_ARCHIVES", raising=False)
    return folder


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial") or p.suffix == ".safetensors"]


def test_local_archives_are_verified_and_converted(small_omniglot, tmp_path):
    data = load_omniglot(tmp_path / "root", image_size=8, archives=small_omniglot, progress=False)
    assert data.num_base_classes == 5 and data.images.shape == (10, 1, 8, 8)
    assert data.base_names[0].startswith("Alphabac0/character01")
    # drawing 0 of the first character is value 0 -> 255 after inversion
    assert data.images[0].min() == 255 and data.images[1].max() == 255 - 40


def test_corrupt_archive_is_refused_and_nothing_is_cached(small_omniglot, tmp_path):
    path = small_omniglot / "images_background.zip"
    raw = bytearray(path.read_bytes())
    member = raw.find(b"IDAT")  # inside the first PNG's compressed data
    raw[member + 8] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(OmniglotError, match="CRC|corrupt|readable"):
        load_omniglot(tmp_path / "root", image_size=8, archives=small_omniglot, progress=False)
    assert _leftovers(tmp_path / "root") == []


def test_truncated_archive_is_refused(small_omniglot, tmp_path):
    path = small_omniglot / "images_evaluation.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OmniglotError, match="not a readable zip"):
        load_omniglot(tmp_path / "root", image_size=8, archives=small_omniglot, progress=False)


def test_archive_with_wrong_contents_is_refused(small_omniglot, tmp_path):
    _fake_archive(small_omniglot / "images_background.zip", "images_background", 2, 2)  # one character short
    with pytest.raises(OmniglotError, match="expected 2 and 3"):
        load_omniglot(tmp_path / "root", image_size=8, archives=small_omniglot, progress=False)


def test_failed_conversion_leaves_no_half_written_cache(small_omniglot, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = omniglot_module._decode

    def failing(data, size):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return real(data, size)

    monkeypatch.setattr(omniglot_module, "_decode", failing)
    with pytest.raises(OSError, match="disk full"):
        load_omniglot(tmp_path / "root", image_size=8, archives=small_omniglot, progress=False)
    assert _leftovers(tmp_path / "root") == []


def test_missing_archives_without_download_say_what_to_do(small_omniglot, tmp_path):
    with pytest.raises(OmniglotError, match="download=False"):
        load_omniglot(tmp_path / "root", image_size=8, download=False, progress=False)


# ------------------------------------------------------------------------------------ downloads over HTTP
class _Server:
    """Serve files from a folder on 127.0.0.1; `lie_about_length` announces more bytes than it sends."""

    def __init__(self, folder: Path, lie_about_length: bool = False) -> None:
        lie = lie_about_length

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = folder / self.path.lstrip("/").split("/")[-1]
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if lie else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(small_omniglot):
    running = _Server(small_omniglot)
    yield running
    running.close()


def test_download_checks_md5(server, small_omniglot, tmp_path):
    md5 = hashlib.md5((small_omniglot / "images_background.zip").read_bytes()).hexdigest()
    target = download(f"{server.url}/images_background.zip", tmp_path / "dl" / "a.zip", md5=md5, progress=False)
    assert target.read_bytes() == (small_omniglot / "images_background.zip").read_bytes()
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server.url}/images_background.zip", tmp_path / "dl" / "b.zip", md5="0" * 32, progress=False)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["a.zip"]


def test_cut_short_download_is_refused(small_omniglot, tmp_path):
    liar = _Server(small_omniglot, lie_about_length=True)
    try:
        with pytest.raises(DownloadError):
            download(f"{liar.url}/images_background.zip", tmp_path / "dl" / "c.zip", md5=None, progress=False)
    finally:
        liar.close()
    assert list((tmp_path / "dl").iterdir()) == []


def test_missing_url_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="could not download"):
        download(f"{server.url}/nothing.zip", tmp_path / "dl" / "d.zip", md5=None, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_full_download_path_downloads_verifies_and_converts(server, tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot_module, "BASE_URL", server.url)
    data = load_omniglot(tmp_path / "root", image_size=8, progress=False)
    assert data.num_base_classes == 5
    raw = sorted(p.name for p in (tmp_path / "root" / "omniglot" / "raw").iterdir())
    assert raw == ["images_background.zip", "images_evaluation.zip"]
    again = load_omniglot(tmp_path / "root", image_size=8, download=False, progress=False)  # from the cache
    assert torch.equal(again.images, data.images)
