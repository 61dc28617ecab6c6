"""Keeping a long training process's native memory flat.

What grew (measured on the shipped MiniGrid-MemoryS7 config, lstm, 16 envs; docs/BENCHMARKS.md,
"Memory of a long run"): the resident set went from 0.5 GB to 1-2 GB within 50k-200k steps while
Python-level allocations stayed near 2 MB. Two native causes, found by switching each off:

1. **glibc's heap keeps what tensors free.** Training allocates and frees many tensors of
   0.1-30 MB whose shapes change from batch to batch (padded sequence lengths vary). glibc's
   ``malloc`` raises its mmap threshold after such a block is freed (the dynamic threshold, up to
   32 MB), so later blocks of that size come from the heap, and freed heap pages stay resident
   (fragmented, not at the top, so never trimmed). ``malloc_trim(0)`` at rollout boundaries gave
   the same resident set as a fixed small mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``):
   0.41-0.49 GB instead of 0.49-0.98 GB over 60k steps. The fixed threshold costs ~40% of the
   training speed (a fresh zeroed mapping per large tensor); two trims per PPO iteration cost
   nothing measurable, so :func:`release` is what the training loop calls.
2. **oneDNN's primitive cache.** PyTorch's CPU convolutions go through oneDNN, which caches one
   compiled primitive per input shape (default capacity 1024). With batch shapes that vary, the
   cache fills with primitives for shapes seen once. Capacity 0 made the trimmed resident set
   flat (+7% over 70k steps instead of +20%) at no measured speed cost at these sizes, so
   :func:`configure` sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (unless the user did) before the
   first convolution runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

#: the oneDNN primitive-cache capacity a training process uses unless
#: ``$ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set (see the module docstring, cause 2)
ONEDNN_CACHE_CAPACITY = "0"


def configure() -> None:
    """Set process-wide allocator settings for training. Call before the first convolution
    (oneDNN reads its cache capacity once); an environment variable the user set wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (macOS, Windows, musl: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release() -> bool:
    """Give the memory the C heap holds but no longer uses back to the system (glibc's
    ``malloc_trim(0)``, which also releases free pages inside the heap). Returns whether anything
    could be called. Costs about a millisecond at a few hundred MB of heap."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


__all__ = ["ONEDNN_CACHE_CAPACITY", "configure", "release"]
