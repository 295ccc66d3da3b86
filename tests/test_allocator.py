"""glibc malloc tuning: applied by kshot's entry points, never against a user's own MALLOC_* settings."""

from __future__ import annotations

import platform
import sys

import pytest

from kshot import allocator
from kshot import cli as kshot_cli


def test_user_settings_and_the_switch_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000")
    assert allocator.tune_malloc() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("KSHOT_MALLOC_TUNING", "0")
    assert allocator.tune_malloc() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_mallopt_is_applied_on_glibc(monkeypatch):
    for name in allocator.USER_VARIABLES + ("KSHOT_MALLOC_TUNING",):
        monkeypatch.delenv(name, raising=False)
    calls = []
    real = allocator.ctypes.CDLL

    class Spy:
        def __init__(self, name):
            self.libc = real(name)

        @property
        def mallopt(self):
            function = self.libc.mallopt

            class Recorder:
                argtypes = restype = None

                def __call__(self, option, value):
                    calls.append((option, value))
                    function.argtypes, function.restype = self.argtypes, self.restype
                    return function(option, value)

            return Recorder()

    monkeypatch.setattr(allocator.ctypes, "CDLL", Spy)
    assert allocator.tune_malloc() is True
    assert (allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD) in calls
    assert any(option == allocator.M_TRIM_THRESHOLD and value >= 2**31 - 1 for option, value in calls)


def test_the_kshot_command_tunes_malloc(monkeypatch, capsys):
    called = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["kshot", "recipes"])
    kshot_cli.main()
    assert called
