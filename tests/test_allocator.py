"""Allocator hygiene of training processes (memagents/allocator.py): freed heap memory goes back
to the system at rollout boundaries, and the oneDNN cache setting defers to the user."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import pytest
import torch

from memagents import allocator


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(), reason="glibc only")
def test_release_returns_fragmented_heap_memory_to_the_system():
    """The failure mode it fixes: blocks of a few MB freed in an interleaved order stay resident
    (glibc raised its mmap threshold after the first free, so they live in the heap, and the
    heap's free pages are not at its top). ``release`` must hand most of them back."""
    torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # a freed 8 MB block raises the threshold
    blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range(60)]  # ~180 MB, heap
    keep = blocks[1::6]  # pins scattered blocks so that the heap cannot shrink from its top
    del blocks
    before = rss_mb()
    assert allocator.release()
    after = rss_mb()
    assert before - after > 100, (before, after)  # ~150 MB of the 180 MB were free
    assert all(int(b[0]) == 1 for b in keep)  # what is still used stays intact


def test_configure_sets_the_onednn_cache_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    allocator.configure()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == allocator.ONEDNN_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    allocator.configure()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
