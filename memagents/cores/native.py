"""Native (C++) kernels for the cores' small per-step work, built on first use with the system
compiler and loaded through :mod:`ctypes`.

Why: at the sizes RL uses (B ≈ 8-64 episodes, N ≈ 16-256 slots) one memory step is a few
microseconds of arithmetic spread over ~60 eager torch ops forward and ~110 backward, each with
several microseconds of dispatch overhead. A kernel that does the whole step in one call removes
that overhead; the equations, their order and their gradients are those of the torch paths, which
stay the reference (tests compare both in float64).

How: each kernel is one self-contained C++ file in ``memagents/cores/csrc/`` with an
``extern "C"`` interface over raw pointers (no torch headers, so a build takes a second or two,
not a minute). :func:`load` compiles it with ``$CXX`` (default ``c++``) into a cache directory
(``$MEMAGENTS_NATIVE_CACHE``, default ``~/.cache/memagents/native``), keyed by a hash of the
source, the flags and the compiler, written atomically so parallel processes can race safely.

Control with ``MEMAGENTS_NATIVE``: unset or ``auto`` = use the kernels when they build (warn once
and fall back to torch when they do not), ``0`` = never (torch paths only), ``1`` = require them
(raise if a build fails; CI uses this so the native path cannot silently go untested).
Kernels run only on CPU tensors of dtype float32/float64; other devices use the torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).parent / "csrc"
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-fvisibility=hidden"]
#: tried first; dropped if the compiler rejects it. The library is then specific to this CPU, so
#: the cache key includes the CPU's description (a cache shared by different machines stays safe).
ARCHFLAGS = ["-march=native"]

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}

#: a function's ``(argtypes, restype)``; see :func:`load`.
Signature = tuple[list[Any], Any]


def mode() -> str:
    """``"auto"``, ``"0"`` or ``"1"`` from ``$MEMAGENTS_NATIVE``.

    :raises ValueError: any other value.
    """
    value = os.environ.get("MEMAGENTS_NATIVE", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"MEMAGENTS_NATIVE={value!r}; allowed: auto, 0, 1")
    return value


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "memagents" / "native"
    return Path(os.environ.get("MEMAGENTS_NATIVE_CACHE", default))


def compiler() -> str | None:
    """The path of the C++ compiler :func:`load` builds with (``$CXX``, default ``c++``), or
    ``None`` when it is not on ``PATH``."""
    return shutil.which(os.environ.get("CXX", "c++"))


def expected() -> bool:
    """Whether native kernels are meant to run here: ``MEMAGENTS_NATIVE=1`` (required, so a
    missing compiler or a failed build is an error, never a skip), or ``auto`` with the compiler
    :func:`load` would use. Tests skip their native-only checks exactly when this is false, so the
    skip and the loader agree on the compiler."""
    setting = mode()
    return setting == "1" or (setting == "auto" and compiler() is not None)


def _cpu_id() -> bytes:
    """What distinguishes this CPU for ``-march=native`` (model and feature flags on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}".encode()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep))).encode()


def _compile(cxx: str, flags: list[str], source: Path, out: str) -> subprocess.CompletedProcess:
    return subprocess.run([cxx, *flags, str(source), "-o", out], capture_output=True, text=True)


def _build(name: str) -> Path:
    source = CSRC / f"{name}.cpp"
    if not source.is_file():
        raise FileNotFoundError(f"no native kernel source {source}")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # what sources include
    key = hashlib.sha256(
        source.read_bytes()
        + headers
        + " ".join(CXXFLAGS + ARCHFLAGS).encode()
        + version.encode()
        + _cpu_id()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = _compile(cxx, CXXFLAGS + ARCHFLAGS, source, tmp)
        if result.returncode != 0:  # e.g. a compiler without -march=native: portable build
            result = _compile(cxx, CXXFLAGS, source, tmp)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: a racing process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def bind(lib: ctypes.CDLL, signatures: dict[str, Signature]) -> None:
    """Set the argument and result types of ``lib``'s functions. A name ending in ``_*`` stands
    for its two dtype variants, ``_f32`` and ``_f64`` (every kernel is compiled for both)."""
    for name, (argtypes, restype) in signatures.items():
        names = [name[:-1] + s for s in ("f32", "f64")] if name.endswith("_*") else [name]
        for n in names:
            fn = getattr(lib, n)
            fn.argtypes, fn.restype = list(argtypes), restype


_kernels: dict[tuple[int, str, torch.dtype], Any] = {}


def kernel(lib: ctypes.CDLL, name: str, dtype: torch.dtype) -> Any:
    """``lib``'s entry point ``<name>_f32`` or ``<name>_f64`` for ``dtype`` (every kernel is
    compiled for both; cached, as kernels look them up every step)."""
    key = (id(lib), name, dtype)
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = getattr(lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    return fn


def load(name: str, signatures: dict[str, Signature] | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library ``csrc/<name>.cpp``, or ``None`` when native kernels are off
    or cannot be built (``MEMAGENTS_NATIVE=1`` raises instead).

    :param signatures: ``{function: (argtypes, restype)}`` (see :func:`bind`), set when the
        library is first loaded. Every caller of one library passes the same table.
    :raises RuntimeError: the build failed and ``MEMAGENTS_NATIVE=1``.
    """
    setting = mode()
    if setting == "0":
        return None
    with _lock:
        if name not in _libs:
            try:
                _libs[name] = ctypes.CDLL(str(_build(name)))
            except Exception as exc:  # compiler missing, build error, unloadable library
                _libs[name] = None
                _errors[name] = str(exc)
                if setting != "1":
                    warnings.warn(
                        f"memagents: native kernel {name!r} unavailable, using the torch path "
                        f"(slower): {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        lib = _libs[name]
        if lib is not None and signatures and not getattr(lib, "_memagents_bound", False):
            bind(lib, signatures)  # once per library object, whoever loaded it first
            lib._memagents_bound = True
    if lib is None and setting == "1":
        raise RuntimeError(f"MEMAGENTS_NATIVE=1 but kernel {name!r} failed: {_errors[name]}")
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """True when the tensors can go to a native kernel: all on the CPU, one float dtype."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    return all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a contiguous tensor, for a kernel call."""
    if not t.is_contiguous():
        raise ValueError("native kernels take contiguous tensors")
    return ctypes.c_void_p(t.data_ptr())


__all__ = [
    "CSRC",
    "Signature",
    "bind",
    "cache_dir",
    "compiler",
    "expected",
    "kernel",
    "load",
    "mode",
    "ptr",
    "usable",
]

if __name__ == "__main__":  # python -m memagents.cores.native NAME...: build and report
    for kernel in sys.argv[1:] or sorted(p.stem for p in CSRC.glob("*.cpp")):
        print(kernel, _build(kernel))
