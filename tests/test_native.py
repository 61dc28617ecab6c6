"""The native-kernel loader: settings, fallback when no compiler, caching."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_native

from memagents.cores import native

PROBE = """
extern "C" __attribute__((visibility("default"))) void add_one(int n, double* x) {
  for (int i = 0; i < n; ++i) x[i] += 1.0;
}
"""


@pytest.fixture
def probe_source(tmp_path, monkeypatch):
    """A one-function kernel in a private source dir and cache, forgotten by the loader after."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "probe.cpp").write_text(PROBE)
    monkeypatch.setattr(native, "CSRC", src)
    monkeypatch.setenv("MEMAGENTS_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_errors", {})
    return src


def test_mode_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("MEMAGENTS_NATIVE", "yes")
    with pytest.raises(ValueError, match=r"MEMAGENTS_NATIVE='yes'; allowed: auto, 0, 1"):
        native.mode()


def test_off_returns_none_without_building(probe_source, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMAGENTS_NATIVE", "0")
    assert native.load("probe") is None
    assert not (tmp_path / "cache").exists()


@needs_native
def test_builds_once_and_runs(probe_source, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMAGENTS_NATIVE", "1")
    lib = native.load("probe")
    assert lib is not None
    built = list((tmp_path / "cache").glob("probe-*.so"))
    assert len(built) == 1
    x = torch.zeros(5, dtype=torch.float64)
    lib.add_one(5, native.ptr(x))
    assert torch.equal(x, torch.ones(5, dtype=torch.float64))  # 0 + 1: exact anywhere
    # a second process-level load reuses the cached library instead of compiling again
    monkeypatch.setattr(native, "_libs", {})
    mtime = built[0].stat().st_mtime_ns
    assert native.load("probe") is not None
    assert built[0].stat().st_mtime_ns == mtime
    # editing the source builds a new library beside the old one
    (probe_source / "probe.cpp").write_text(PROBE + "\n// changed\n")
    monkeypatch.setattr(native, "_libs", {})
    assert native.load("probe") is not None
    assert len(list((tmp_path / "cache").glob("probe-*.so"))) == 2
    # so does editing a header of the folder (the kernels include csrc/common.h)
    (probe_source / "shared.h").write_text("// changed\n")
    monkeypatch.setattr(native, "_libs", {})
    assert native.load("probe") is not None
    assert len(list((tmp_path / "cache").glob("probe-*.so"))) == 3


def test_missing_compiler_falls_back_or_raises(probe_source, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("MEMAGENTS_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="native kernel 'probe' unavailable"):
        assert native.load("probe") is None
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv("MEMAGENTS_NATIVE", "1")
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
        native.load("probe")


@needs_native
def test_compile_error_is_reported(probe_source, monkeypatch):
    (probe_source / "probe.cpp").write_text("this is not C++")
    monkeypatch.setenv("MEMAGENTS_NATIVE", "1")
    with pytest.raises(RuntimeError, match=r"compiling probe\.cpp failed"):
        native.load("probe")


def test_usable_and_ptr():
    a = torch.zeros(3)
    assert native.usable(a, torch.ones(2))
    assert not native.usable(a, torch.ones(2, dtype=torch.float64))
    assert not native.usable(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        native.ptr(torch.zeros(4, 4).t())


@needs_native
def test_signatures_are_set_once_whoever_loads_first(probe_source, monkeypatch):
    """A library first loaded without signatures gets them from the first caller that passes
    them; ``_*`` names bind both dtype variants."""
    import ctypes

    monkeypatch.setenv("MEMAGENTS_NATIVE", "1")
    lib = native.load("probe")
    signatures = {"add_one": ([ctypes.c_int, ctypes.c_void_p], None)}
    assert native.load("probe", signatures) is lib
    assert lib.add_one.argtypes == [ctypes.c_int, ctypes.c_void_p]
    assert lib.add_one.restype is None
    x = torch.zeros(3, dtype=torch.float64)
    lib.add_one(3, native.ptr(x))
    assert torch.equal(x, torch.ones(3, dtype=torch.float64))  # 0 + 1: exact anywhere
    with pytest.raises(AttributeError, match="add_one_f32"):
        native.bind(lib, {"add_one_*": ([ctypes.c_int64], None)})
