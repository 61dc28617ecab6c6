"""Sparse memory access of SAM: sparse reads and writes, LRU usage, kNN indexes, and a step
function whose forward and backward touch ``O(K·W)`` memory rows.

Paper: Rae et al. 2016, "Scaling Memory-Augmented Neural Networks with Sparse Reads and Writes"
(NIPS), section 3 (SAM). Shapes: ``B`` batch, ``N`` memory rows, ``W`` word size, ``R`` read heads,
``K`` = ``sparse_reads`` (non-zeros per read weighting), ``J = R·K + 1`` write locations (the rows
read at ``t - 1`` and the least-recently-used row).

Mechanisms, one function each:

- :func:`least_recently_used` ``I^U_t`` and :func:`usage_update` ``U_t`` (section 3.3): every row
  keeps the step at which it was last accessed (a read or write weight above
  :data:`ACCESS_THRESHOLD` ``δ``), counted per batch element, so each element resets on its own.
- :func:`sparse_write_weights` ``w^W_t = α_t (γ_t w̄^R_{t-1} + (1 - γ_t) I^U_t)`` (section 3.2).
- The write ``M_t = (1 - R_t) ∘ M_{t-1} + A_t`` with ``R_t = I^U_t 1^T`` (the LRU row erased) and
  ``A_t = w^W_t a_t^T``, then the sparse read: each head's ``K`` nearest rows by cosine similarity
  (found by a kNN index), ``w^R = softmax(β cos(q, M[i]))`` over those ``K`` rows, ``r = Σ w^R M``.

:class:`SparseAccessStep` does the write and the read as one autograd function that modifies the
memory in place and saves only the ``R·K`` read rows; its backward adds the sparse gradients into
the (single, dense) memory-gradient buffer in place and zeroes the erased rows, so no step keeps a
copy of the ``N×W`` memory. :func:`dense_access_step` is the same step in plain differentiable
torch (new memory per step): the reference the tests compare gradients against.

kNN indexes (:class:`ExactIndex`, :class:`IVFIndex`, :class:`FaissIndex`) are plain objects built
by the core for one ``forward`` call from the memory it was given, updated after every write and
rebuilt for elements whose episode restarts; they never live on the module or in the autograd
graph.

Native path: on CPU float32/float64 tensors the step, the exact search, the usage/LRU update and
the inverted-file index run as C++ kernels (``csrc/sparse_access.cpp``, built and loaded by
:mod:`memagents.cores.native`), one call per batch each; :class:`SAMAccessStep` is SAM's whole
post-controller step as one autograd node. The torch code is the reference and the path for
other devices (or ``MEMAGENTS_NATIVE=0``); tests compare both in float64.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import weakref
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from memagents.cores import native
from memagents.cores.addressing import EPSILON

try:  # FAISS is optional: the exact torch index gives the same reads on small memories.
    import faiss
except ImportError:  # pragma: no cover - exercised only without faiss-cpu
    faiss = None

#: ``δ`` of Rae et al. 2016 (section 3.3): a row counts as accessed at step ``t`` when its read or
#: write weight exceeds this.
ACCESS_THRESHOLD = 0.005

#: Lists probed per query by :class:`FaissIndex` and :class:`IVFIndex` (all lists when the index
#: has fewer). At N = 65,536 (256 lists) with 4,000 steps of 17 random rows written one step at
#: a time, recall@4 against exact search over 4,096 random keys was 0.957 with 32 probes, 0.987
#: with 48 and 0.997 with 64: 48 keeps a margin above the 0.95 that the carried rollouts promise.
FAISS_NPROBE = 48

#: ``index="auto"`` uses an inverted-file index (``"ivf"``, else ``"faiss"``) from this many rows on.
AUTO_FAISS_MIN_ROWS = 16_384

INDEX_KINDS = ("auto", "exact", "faiss", "ivf")


# -- the native kernels ----------------------------------------------------------------------------
_p, _n, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
#: the entry points of ``csrc/sparse_access.cpp`` (``_*``: the float32 and float64 variants).
SIGNATURES: dict[str, native.Signature] = {
    **{
        f"sa_{name}_*": (argtypes, None)
        for name, argtypes in {
            "write": [_p, _p, _n, _n, _n, _n, _p, _p, _p, _p],
            "sqnorm": [_p, _p, _n, _n],
            "search": [_p, _p, _n, _n, _n, _p, _n, _n, _p],
            "read": [_p, _n, _n, _n, _n, _n, _p, _p, _p, _p, _p, _p, _p, _n, _p, _p],
            "backward": [_p, _n, _n, _n, _n, _n, _n, _n] + [_p] * 18,
            "usage": [_p, _p, _p, _n, _n, _n, _p, _p, _n, _p, _p, _f, _p, _n, _p, _p],
            "lru_blocks": [_p, _n, _n, _n, _p, _p, _p],
            "lru": [_p, _n, _n, _p],
            "head": [_p, _n, _n, _n, _n, _n, _p, _p, _p, _p, _p, _p, _p, _p, _p],
            "head_backward": [_p, _n, _n, _n, _n, _n] + [_p] * 8,
            "ivf_reset": [_p, _p, _p],
            "ivf_update": [_p, _p, _p, _n],
            "ivf_search": [_p, _p, _p, _n, _n, _p],
        }.items()
    },
    "sa_ivf_new": ([_n, _n, _n, _n, _n, _p], _p),
    "sa_ivf_free": ([_p], None),
    "sa_ivf_clear": ([_p, _p], None),
}


def _load():
    """The compiled ``sparse_access`` library with its signatures set, or ``None``."""
    return native.load("sparse_access", SIGNATURES)


_UNLOADED = object()

#: The kernel library (``csrc/sparse_access.cpp``), loaded on first use; ``None``: torch paths
#: only. Tests set it to ``None`` to run the torch reference.
lib = _UNLOADED


def _kernel():
    """The native library when it can be used, else ``None``."""
    global lib
    if lib is _UNLOADED:
        lib = _load()
    return lib


def _fn(name: str, like: Tensor):
    """The kernel ``sa_<name>`` for the dtype of ``like``."""
    return native.kernel(lib, f"sa_{name}", like.dtype)


def _p(t: Tensor | None) -> int | None:
    """Data pointer of a contiguous tensor (``None`` -> null)."""
    return None if t is None else t.data_ptr()


def faiss_available() -> bool:
    """True when ``faiss`` (``faiss-cpu``) can be imported."""
    return faiss is not None


def resolve_index(index: str, memory_size: int) -> str:
    """Resolve ``"auto"``: ``"exact"`` below :data:`AUTO_FAISS_MIN_ROWS` rows; from there on
    ``"ivf"`` (the inverted-file index run by the native kernels) when they are available, else
    ``"faiss"`` when faiss is installed, else ``"exact"``.

    :raises ValueError: an unknown kind, ``"faiss"`` without faiss installed, or ``"ivf"`` without
        the native kernels.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {', '.join(map(repr, INDEX_KINDS))}; got {index!r}")
    if index == "faiss" and not faiss_available():
        raise ValueError("index='faiss' needs the faiss-cpu package; use index='exact' or 'auto'")
    if index == "ivf" and _kernel() is None:
        raise ValueError("index='ivf' needs the native kernels (a C++ compiler, MEMAGENTS_NATIVE)")
    if index == "auto":
        if memory_size < AUTO_FAISS_MIN_ROWS:
            return "exact"
        if _kernel() is not None:
            return "ivf"
        return "faiss" if faiss_available() else "exact"
    return index


# -- usage and the least-recently-used row (section 3.3) -------------------------------------------
def check_row_indices(
    name: str, indices: Tensor, memory_size: int, exempt: Tensor | None = None
) -> None:
    """Raise unless every entry of ``indices`` (a state field holding row numbers, stored as
    floats in the packed state) lies in ``[0, memory_size)``.

    The native kernels index memory with these values unchecked, so a corrupted or foreign
    state (e.g. one a user hands to ``predict``) would read or write outside the memory.
    Checked once per call on the incoming state; rows produced inside a call are valid by
    construction.

    :param indices: ``[B, ...]``.
    :param exempt: ``[B]`` bool, batch elements whose state is replaced by the initial state
        before it is used (an episode start at step 0): anything may be stored there.
    :raises ValueError: naming the field, the first bad value and the allowed range.
    """
    indices = indices.detach()
    if exempt is not None and bool(exempt.any()):
        indices = indices[~exempt]
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    low, high = low.item(), high.item()
    if not (0 <= low and high < memory_size):  # also False for NaN
        bad = low if not 0 <= low else high
        raise ValueError(
            f"state.{name} must hold row indices in [0, {memory_size}); got {bad!r} "
            "(a corrupted state, or one packed by a core with another memory_size?)"
        )


def least_recently_used(last_access: Tensor) -> Tensor:
    """``I^U_t``: the row accessed longest ago, ties to the lowest index.

    :param last_access: ``[B, N]`` step of each row's last access ``U_{t-1}`` (0 = never).
    :return: ``[B]`` long row indices.
    """
    if _kernel() is not None and native.usable(last_access) and last_access.is_contiguous():
        lru = torch.empty(last_access.shape[0], dtype=torch.long)
        B, N = last_access.shape
        _fn("lru", last_access)(_p(last_access), B, N, _p(lru))
        return lru
    return torch.argmin(last_access, dim=-1)  # torch returns the first minimum


def usage_update(
    last_access: Tensor,
    time: Tensor,
    accesses: list[tuple[Tensor, Tensor]],
    threshold: float = ACCESS_THRESHOLD,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """``U_t(i) = t`` if some weight of row ``i`` at step ``t`` exceeds ``δ``, else ``U_{t-1}(i)``.

    The step count ``t`` is per batch element (it restarts at 0 with the element's episode).
    No gradient flows through usage (it only selects the LRU row).

    :param last_access: ``[B, N]`` ``U_{t-1}``.
    :param time: ``[B, 1]`` steps taken so far in the element's episode, ``t - 1``.
    :param accesses: ``(indices [B, J] long, weights [B, J])`` pairs, e.g. the write and the read
        weightings in their sparse form; duplicate indices are allowed.
    :param threshold: ``δ``.
    :param inplace: update ``last_access`` in place (the caller owns it).
    :return: ``(U_t [B, N], t [B, 1])``.
    """
    if inplace and len(accesses) <= 2 and _native_usage(last_access, time, accesses):
        last_access, time, _ = _usage_native(last_access, time, accesses, threshold, lru=False)
        return last_access, time
    time = time + 1
    last_access = last_access if inplace else last_access.clone()
    for indices, weights in accesses:
        # new value: t where accessed, else the old value (<= t); "amax" merges duplicates
        stamp = torch.where(weights.detach() > threshold, time, last_access.gather(1, indices))
        last_access.scatter_reduce_(1, indices, stamp, reduce="amax", include_self=True)
    return last_access, time


def usage_update_lru(
    last_access: Tensor,
    time: Tensor,
    accesses: list[tuple[Tensor, Tensor]],
    threshold: float = ACCESS_THRESHOLD,
    scratch: StepScratch | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`usage_update` in place, then :func:`least_recently_used` of the result: the next
    step's ``I^U_{t+1}``. One kernel call on the native path, which finds the LRU row through
    the block minima of ``scratch`` (kept current) when it has them.

    :return: ``(U_t [B, N] (the same tensor), t [B, 1], I^U_{t+1} [B] long)``.
    """
    if len(accesses) <= 2 and _native_usage(last_access, time, accesses):
        blocks = None if scratch is None else scratch.blocks
        return _usage_native(last_access, time, accesses, threshold, lru=True, blocks=blocks)
    last_access, time = usage_update(last_access, time, accesses, threshold, inplace=True)
    return last_access, time, least_recently_used(last_access)


def _native_usage(last_access: Tensor, time: Tensor, accesses) -> bool:
    return (
        _kernel() is not None
        and last_access.is_contiguous()
        and native.usable(last_access, time, *(w for _, w in accesses))
    )


def _usage_native(last_access, time, accesses, threshold, lru: bool, blocks=None):
    B, N = last_access.shape
    time_in = time.contiguous()
    time_out = torch.empty_like(time_in)
    pairs = [(i.contiguous(), w.detach().contiguous()) for i, w in accesses]
    pairs += [(None, None)] * (2 - len(pairs))
    (i1, w1), (i2, w2) = pairs
    out = torch.empty(B, dtype=torch.long) if lru else None
    bs, bmin, barg = (0, None, None) if blocks is None else blocks
    _fn("usage", last_access)(
        _p(last_access), _p(time_in), _p(time_out), B, N,
        0 if i1 is None else i1.shape[1], _p(i1), _p(w1),
        0 if i2 is None else i2.shape[1], _p(i2), _p(w2),
        threshold, _p(out), bs, _p(bmin), _p(barg),
    )  # fmt: skip
    return last_access, time_out, out


class StepScratch:
    """Per-``forward`` bookkeeping shared by the :class:`SAMAccessStep` nodes of one sequence.

    - ``blocks``: the block minima of ``last_access`` (``bs``, ``bmin [B, nb]``, ``barg [B, nb]``)
      that find the LRU row in ``O(N / bs + bs)`` instead of ``O(N)`` per step;
    - ``rows``: the rows each step touches (written and read). When the starting memory needs
      no gradient, the backward's ``[B, N, W]`` gradient buffer is allocated uninitialised and
      only these rows are zeroed: no step reads any other row of it, and its final value (the
      gradient of the starting memory) is not used.
    """

    def __init__(
        self,
        last_access: Tensor,
        dense_grad: bool,
        block_rows: int | None = None,
        zero: bool = False,
    ):
        """``zero``: ``last_access`` is known to be all zero (an initial state): the block
        minima are set without reading it."""
        B, N = last_access.shape
        self.dense_grad = dense_grad
        self.rows: list[Tensor] = []
        self.blocks = None
        if block_rows is not None:
            nb = -(-N // block_rows)
            bmin = torch.empty(B, nb, dtype=last_access.dtype)
            barg = torch.empty(B, nb, dtype=torch.long)
            self.blocks = (block_rows, bmin, barg)
            if zero:
                self.clear(torch.arange(B))
            else:
                self.rebuild(last_access, None)

    def clear(self, elements: Tensor) -> None:
        """The block minima of elements (``[n]`` long) whose ``last_access`` was just zeroed:
        every block's minimum is 0 at its first row (no scan of the rows)."""
        if self.blocks is not None:
            bs, bmin, barg = self.blocks
            first = torch.arange(bmin.shape[1], dtype=torch.long) * bs
            bmin.index_fill_(0, elements, 0)
            barg.index_copy_(0, elements, first.expand(len(elements), -1))

    def rebuild(self, last_access: Tensor, mask: Tensor | None) -> None:
        """Recompute the block minima (of the elements in ``mask``, ``[B]`` uint8; all if None)."""
        if self.blocks is not None:
            bs, bmin, barg = self.blocks
            B, N = last_access.shape
            _fn("lru_blocks", last_access)(
                _p(last_access), B, N, bs, _p(bmin), _p(barg), _p(mask)
            )  # fmt: skip

    def gradient_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.dense_grad or not self.rows:
            return torch.zeros(shape, dtype=dtype)
        B, N, W = shape
        g = torch.empty(shape, dtype=dtype)
        rows = torch.cat(self.rows, dim=1)  # [B, Σ touched]
        g.view(B * N, W).index_fill_(0, _flat_rows(rows, N), 0.0)
        return g

    def least_recently_used(self, last_access: Tensor) -> Tensor:
        """:func:`least_recently_used` of ``last_access`` (which the block minima describe):
        through the blocks (``O(N / bs)`` per element) when there are any, else a scan."""
        if self.blocks is None:
            return least_recently_used(last_access)
        _, bmin, barg = self.blocks
        # the first minimum over the blocks' minima is the first minimum over the rows
        return barg.gather(1, bmin.argmin(dim=1, keepdim=True)).squeeze(1)


#: The :class:`Carry` of each memory tensor a carried call returned (weakly keyed: it goes with
#: the tensor).
_CARRIES = WeakIdKeyDictionary()


class Carry:
    """What a sparse core keeps from one call to the next when its caller hands the state over
    (:meth:`~memagents.cores.base.MemoryCore.forward_inplace`: rollouts, one step at a time, no
    gradient), so that a step costs ``O(K·W)`` plus the index update, not ``O(N·W)``:

    - the memory and ``last_access`` are the state's own tensors, written in place (no copy);
    - ``index``: the kNN index, updated at the rows each step writes, never rebuilt;
    - ``scratch``: the block minima of ``last_access`` (:class:`StepScratch`), kept current by
      the usage kernel;
    - ``dirty [B, N]`` bool: the rows each element may have made non-zero since its episode
      started (a superset of its non-zero rows where ``known [B]``: from the element's first
      episode start in the carry, or from the start for an initial memory), so that an episode
      start zeroes only those rows and clears the index without a scan (:meth:`reset`).

    All of it is a function of the memory and ``last_access`` it was built for, and it is found
    again (:meth:`find`) only for those very tensors, unmodified since (the same objects at the
    same version counters): a state modified, copied or rebuilt elsewhere rebuilds its carry,
    never reads a stale one. It holds no reference to the memory (the registry is keyed weakly
    by it) and only weak ones to the other tensors.
    """

    def __init__(self, memory: Tensor, last_access: Tensor, index: Index, scratch: StepScratch):
        """``memory``: the state's memory (a broadcast zero: every element's rows are known;
        otherwise none are, and an element's first reset zeroes all its rows)."""
        self.index, self.scratch = index, scratch
        B, N = memory.shape[:2]
        self.dirty = torch.zeros(B, N, dtype=torch.bool, device=memory.device)
        #: ``[B]``: whether ``dirty`` covers the element's non-zero rows (``all_known``: all)
        self.all_known = is_zero_broadcast(memory)
        self.known = torch.full((B,), self.all_known, device=memory.device)
        #: the SDNC's: ``[2, B, N]`` bool, the rows of ``L`` and ``Lᵀ`` rewritten since each
        #: element's episode began (``sparse_links.reset_rows``); ``None`` for SAM
        self.link_rows: Tensor | None = None
        self._refs: list[weakref.ref] = []
        self._versions: tuple[int, ...] = ()

    @staticmethod
    def find(memory: Tensor, *tensors: Tensor) -> Carry | None:
        """The carry kept with ``memory`` by :meth:`keep`, if it still describes ``memory`` and
        ``tensors`` (``last_access`` first, then any the core vouches for, such as the SDNC's
        links) as they are: the same objects, unmodified since."""
        carry = _CARRIES.get(memory)
        if carry is None or len(carry._refs) != len(tensors):
            return None
        if any(ref() is not t for ref, t in zip(carry._refs, tensors, strict=True)):
            return None
        if carry._versions != tuple(t._version for t in (memory, *tensors)):
            return None
        return carry

    @staticmethod
    def kept(memory: Tensor) -> Carry | None:
        """The carry last kept with ``memory``, valid or not (for inspection)."""
        return _CARRIES.get(memory)

    def keep(self, memory: Tensor, *tensors: Tensor) -> None:
        """Record that this carry describes ``memory`` and ``tensors`` (as :meth:`find` takes
        them) as they are now."""
        self._refs = [weakref.ref(t) for t in tensors]
        self._versions = tuple(t._version for t in (memory, *tensors))
        _CARRIES[memory] = self

    def reset(self, memory: Tensor, reset: Tensor) -> None:
        """Zero the memory of the elements ``reset`` (``[n]`` long) where it may be non-zero (their
        ``dirty`` rows) and clear them in the index: the memory part of an episode start, in
        ``O(N + dirty rows · W)`` per element instead of ``O(N·W)``."""
        B, N, W = memory.shape
        reset_known = reset
        if not self.all_known:
            known = self.known.index_select(0, reset)
            memory.index_fill_(0, reset[~known], 0.0)  # (rows not tracked: all of them)
            reset_known = reset[known]
        sub = self.dirty.index_select(0, reset_known)  # [n, N]
        at = sub.nonzero()  # [m, 2]: (position in reset_known, row)
        flat = reset_known.index_select(0, at[:, 0]) * N + at[:, 1]
        memory.view(B * N, W).index_fill_(0, flat, 0.0)
        self.dirty.index_fill_(0, reset, False)
        if not self.all_known:
            self.known.index_fill_(0, reset, True)
            self.all_known = bool(self.known.all())
        self.index.clear(memory, reset)

    def save(self, memory: Tensor, last_access: Tensor, rows: Tensor, reset: Tensor) -> tuple:
        """Before a step that :meth:`restore` will undo (``peek``): the memory at ``rows``
        (``[B, J]`` long, the rows the step writes where an element does not restart), the whole
        memory of the elements ``reset`` (``[n]`` long) that restart, ``last_access``, the LRU
        blocks and the written-row bookkeeping. ``O(J·W + N)`` per element."""
        gather = rows[..., None].expand(-1, -1, memory.shape[2])
        blocks = self.scratch.blocks
        return (
            rows, gather, memory.gather(1, gather), reset, memory.index_select(0, reset),
            last_access.clone(), self.dirty.clone(), self.known.clone(), self.all_known,
            None if blocks is None else (blocks[1].clone(), blocks[2].clone()),
        )  # fmt: skip

    def save_step(
        self, memory: Tensor, last_access: Tensor, read_indices: Tensor, starts: Tensor | None
    ) -> tuple[tuple, Tensor, Tensor]:
        """:meth:`save` before one step of a sparse core, whose writes go to the rows of
        ``w^R_{t-1}`` (``read_indices [B, ...]``) and the LRU row; ``starts`` (``[1, B]`` bool or
        ``None``) gives the elements that restart. Returns ``(saved, written rows [B, J] long,
        restarting elements [n] long)``."""
        if starts is None:
            reset = torch.zeros(0, dtype=torch.long, device=memory.device)
        else:
            reset = starts[0].nonzero().flatten()
        lru = self.scratch.least_recently_used(last_access)
        written = torch.cat([read_indices.long().flatten(1), lru[:, None]], dim=1)
        return self.save(memory, last_access, written, reset), written, reset

    def restore(self, saved: tuple, memory: Tensor, last_access: Tensor) -> None:
        """Undo the step since :meth:`save`, and re-file the restored rows in the index."""
        rows, gather, at_rows, reset, whole, last, dirty, known, all_known, blocks = saved
        memory.scatter_(1, gather, at_rows)
        memory.index_copy_(0, reset, whole)
        last_access.copy_(last)
        self.dirty.copy_(dirty)
        self.known.copy_(known)
        self.all_known = all_known
        if blocks is not None:
            self.scratch.blocks[1].copy_(blocks[0])
            self.scratch.blocks[2].copy_(blocks[1])
        self.index.update(memory, rows)
        if reset.numel():
            self.index.reset(memory, reset)

    def snapshot(self, memory: Tensor) -> Tensor:
        """A copy of ``memory`` made from its dirty rows alone when every element's are known
        (a lazily zeroed buffer, :func:`zero_buffer`: ``O(dirty rows · W)`` written), else a
        full copy."""
        if not self.all_known or memory.device.type != "cpu":
            return memory.detach().clone()
        B, N, W = memory.shape
        copy = zero_buffer((B, N, W), memory.dtype)
        flat = self.dirty.view(-1).nonzero().flatten()
        rows = memory.detach().view(B * N, W)
        copy.view(B * N, W).index_copy_(0, flat, rows.index_select(0, flat))
        return copy

    def wrote(self, rows: Tensor) -> None:
        """The step wrote the rows ``rows`` (``[B, J]`` long)."""
        self.dirty.scatter_(1, rows, True)


def zero_restarted(g: Tensor, elements: Tensor, touched: list[Tensor] | None) -> None:
    """In a backward pass, zero the memory gradient ``g [B, N, W]`` of the elements ``elements``
    (``[n]`` long) that restarted at this step: their earlier memory had no effect. With
    ``touched`` (the ``[B, ·]`` row lists of every step, :attr:`StepScratch.rows`) only those
    rows, which are the only ones the backward reads (the gradient buffer of
    :meth:`StepScratch.gradient_buffer`); with ``None`` all ``N`` rows."""
    if touched is None:
        g.index_fill_(0, elements, 0.0)
        return
    B, N, W = g.shape
    rows = torch.cat(touched, dim=1).index_select(0, elements)  # [n, S]
    flat = (elements[:, None] * N + rows).flatten()
    g.view(B * N, W).index_fill_(0, flat, 0.0)


# -- write weighting (section 3.2) -----------------------------------------------------------------
def sparse_write_weights(
    read_weights: Tensor,
    read_indices: Tensor,
    lru: Tensor,
    write_gate: Tensor,
    interp_gate: Tensor,
) -> tuple[Tensor, Tensor]:
    """``w^W_t = α (γ w̄^R_{t-1} + (1 - γ) I^U_t)`` in sparse form.

    ``w̄^R_{t-1}`` is the mean of the ``R`` heads' previous read weightings (so it sums to 1).

    :param read_weights: ``[B, R, K]`` previous read weights ``w^R_{t-1}`` (non-zero values).
    :param read_indices: ``[B, R, K]`` long, their rows.
    :param lru: ``[B]`` long, ``I^U_t``.
    :param write_gate: ``[B, 1]`` ``α`` in ``[0, 1]``.
    :param interp_gate: ``[B, 1]`` ``γ`` in ``[0, 1]``.
    :return: ``(weights [B, J], indices [B, J] long)``, ``J = R·K + 1``, the LRU row last.
    """
    R = read_weights.shape[1]
    weights = torch.cat([interp_gate * read_weights.flatten(1) / R, 1.0 - interp_gate], dim=1)
    indices = torch.cat([read_indices.flatten(1), lru.unsqueeze(1)], dim=1)
    return write_gate * weights, indices


# -- kNN indexes ---------------------------------------------------------------------------------
class Index(Protocol):
    """A kNN index over the rows of a ``[B, N, W]`` memory by cosine similarity."""

    def reset(self, memory: Tensor, elements: Tensor) -> None:
        """Rebuild the index of the batch elements ``elements`` (``[n]`` long) from ``memory``."""

    def update(self, memory: Tensor, rows: Tensor) -> None:
        """The rows ``rows`` (``[B, J]`` long) of every element changed in ``memory``."""

    def clear(self, memory: Tensor, elements: Tensor) -> None:
        """Every row of the elements ``elements`` (``[n]`` long) is now zero in ``memory`` (an
        episode start whose caller zeroed the rows it had written): no scan of the rows."""

    def search(self, memory: Tensor, keys: Tensor, k: int) -> Tensor:
        """``[B, R, k]`` long: each key's ``k`` nearest rows, in ascending row order."""


class ExactIndex:
    """Exact cosine top-``K`` by a scan of all rows.

    On the native path (CPU float memory, kernel available) it keeps each row's squared norm
    ``sqnorm [B, N]``, which :class:`SparseAccessStep` updates at the rows it writes, so that its
    scan skips the zero rows and computes one dot product per (row, key); the torch path
    (``sqnorm`` is ``None``) keeps nothing between calls. :meth:`search` itself is stateless on
    both paths. Zero rows score 0; ties go to the lowest row on both paths.
    """

    def __init__(self, memory: Tensor):
        self.sqnorm = None
        if _kernel() is not None and native.usable(memory):
            if is_zero_broadcast(memory):
                self.sqnorm = torch.zeros(memory.shape[:2], dtype=memory.dtype)
            else:
                self.sqnorm = _sqnorm(memory.detach().contiguous())

    def reset(self, memory: Tensor, elements: Tensor) -> None:
        if self.sqnorm is not None:  # the kernel's sums, as the write keeps them
            self.sqnorm[elements] = _sqnorm(memory.detach()[elements].contiguous())

    def clear(self, memory: Tensor, elements: Tensor) -> None:
        if self.sqnorm is not None:
            self.sqnorm.index_fill_(0, elements, 0.0)

    def update(self, memory: Tensor, rows: Tensor) -> None:
        if self.sqnorm is not None:
            values = memory.detach().gather(1, rows.unsqueeze(-1).expand(-1, -1, memory.shape[2]))
            self.sqnorm.scatter_(1, rows, _sqnorm(values.contiguous()))

    def native_search(
        self, memory: Tensor, keys: Tensor, k: int, sqnorm: Tensor | None = None
    ) -> Tensor:
        """:meth:`search` by the kernel (``memory`` contiguous), with the kept ``sqnorm``
        (:class:`SparseAccessStep` keeps it current) unless ``sqnorm`` is given."""
        B, N, W = memory.shape
        keys = keys.detach().contiguous()
        R = keys.shape[1]
        sqnorm = self.sqnorm if sqnorm is None else sqnorm
        out = torch.empty(B, R, k, dtype=torch.long)
        _fn("search", memory)(_p(memory), _p(sqnorm), B, N, W, _p(keys), R, k, _p(out))
        return out

    def search(self, memory: Tensor, keys: Tensor, k: int) -> Tensor:
        # stateless: the norms are taken from ``memory`` as it is now
        if self.sqnorm is not None and native.usable(memory, keys):
            memory = memory.detach().contiguous()
            return self.native_search(memory, keys, k, _sqnorm(memory))
        memory, keys = memory.detach(), keys.detach()
        square_norm = memory.square().sum(-1)  # [B, N]
        zero = square_norm == 0  # rows never written (or erased): cosine 0 with every key
        key_norm = torch.sqrt(keys.square().sum(-1) + EPSILON)  # [B, R]
        # cosine as in addressing.cosine_similarity
        similarity = torch.matmul(keys, memory.transpose(1, 2))  # [B, R, N]
        similarity = similarity.div_(
            key_norm.unsqueeze(-1) * torch.sqrt(square_norm + EPSILON)[:, None]
        )
        similarity = similarity.masked_fill_(zero.unsqueeze(1), 0.0)
        # the k best, ties to the lowest row (as the kernel and FaissIndex)
        best = torch.sort(similarity, dim=-1, descending=True, stable=True).indices[..., :k]
        return best.sort(dim=-1).values


def is_zero_broadcast(t: Tensor) -> bool:
    """``t`` is one ``+0.0`` broadcast to its shape (every stride 0), as the cores' initial
    memories are: nothing to copy or scan."""
    if t.numel() == 0 or any(s != 0 for s in t.stride()):
        return False
    value = t.as_strided((1,), (1,)).item()  # one element: a reshape would materialise t
    return value == 0 and math.copysign(1.0, value) > 0


def zero_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU zero tensor whose pages the OS zeroes when first touched (an anonymous ``mmap``;
    small ones are plain ``torch.zeros``): a dense buffer of which a sequence touches only some
    rows costs only their pages. Not numpy's ``calloc``: numpy asks for transparent huge pages
    for large arrays, and a first touch of a 2 MB page can stall on compaction (tens of ms)."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < ZERO_BUFFER_MMAP_BYTES:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes)  # the storage keeps the mapping alive
    storage = torch.frombuffer(buffer, dtype=dtype, count=numel).untyped_storage()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # a base tensor, not a view


#: :func:`zero_buffer` maps memory from this size on.
ZERO_BUFFER_MMAP_BYTES = 1 << 20


def owned_copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` that the caller may write in place. A CPU :func:`is_zero_broadcast`
    tensor becomes a lazily zeroed :func:`zero_buffer` (pages are zeroed by the OS when first
    touched), so a large memory that a sequence writes sparsely costs only the pages it touches."""
    if t.device.type == "cpu" and not t.requires_grad and is_zero_broadcast(t):
        return zero_buffer(tuple(t.shape), t.dtype)
    return t.clone(memory_format=torch.contiguous_format)


def owned(t: Tensor, handed: bool) -> Tensor:
    """``t`` itself when the caller ``handed`` the state over and ``t`` can be written in place
    as it is (contiguous, on the CPU or any device, needing no gradient, not a broadcast), else
    :func:`owned_copy`."""
    if handed and t.is_contiguous() and not t.requires_grad and all(t.stride()) and t._base is None:
        return t
    return owned_copy(t)


def _sqnorm(memory: Tensor) -> Tensor:
    """``[B, N]`` squared norms of the rows of a contiguous ``[B, N, W]`` memory (kernel)."""
    out = torch.empty(memory.shape[:2], dtype=memory.dtype)
    _fn("sqnorm", memory)(_p(memory), _p(out), out.numel(), memory.shape[2])
    return out


def _ivf_layout(N: int, W: int, nprobe: int, seed: int) -> tuple[int, int, np.ndarray]:
    """``(nlist, nprobe, centroids [nlist, W] float32)`` of the IVF indexes (FAISS's and the
    native one share them, so that both find the same rows): ``round(sqrt N)`` lists with seeded
    random unit centroids, and at most ``nlist`` probes."""
    nlist = max(1, round(math.sqrt(N)))
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.randn(nlist, W, generator=gen, dtype=torch.float64)
    return nlist, min(nprobe, nlist), _unit_rows(centroids)


def _unit_rows(rows: Tensor) -> np.ndarray:
    """``x / sqrt(|x|^2 + eps)`` as contiguous float32 numpy (the ranking of the cosine with eps)."""
    rows = rows.detach()
    unit = rows / torch.sqrt(rows.square().sum(-1, keepdim=True) + EPSILON)
    return np.ascontiguousarray(unit.to(device="cpu", dtype=torch.float32).numpy())


class FaissIndex:
    """Approximate cosine kNN: one FAISS inverted-file index (``IndexIVFFlat``, inner product on
    unit rows) per batch element.

    The ``nlist ≈ sqrt(N)`` coarse centroids are fixed random unit vectors (seeded; no training on
    the data), so the index is a function of the memory alone. Rows that are exactly zero (never
    written, or erased) are not stored: their cosine with any key is 0, and they are merged into
    the results with score 0. Searching ``nprobe`` lists of ``nlist`` costs ``~N·nprobe/nlist``
    dot products per key; a write re-inserts the ``J`` written rows (direct map, ``O(J)``).
    With ``nprobe >= nlist`` the search is exhaustive and equals :class:`ExactIndex` up to ties.
    """

    def __init__(self, memory: Tensor, nprobe: int = FAISS_NPROBE, seed: int = 0):
        if faiss is None:  # pragma: no cover
            raise RuntimeError("FaissIndex needs faiss-cpu")
        B, N, W = memory.shape
        self.size, self.width = N, W
        self.nlist, self.nprobe, self.centroids = _ivf_layout(N, W, nprobe, seed)
        self.indexes: list = [None] * B
        self.quantizers: list = [None] * B  # the IVF index does not own its quantizer
        self.nonzero = np.zeros((B, N), dtype=bool)
        self.reset(memory, torch.arange(B))

    def _build(self, b: int, rows: Tensor) -> None:
        quantizer = faiss.IndexFlatIP(self.width)
        quantizer.add(self.centroids)
        index = faiss.IndexIVFFlat(quantizer, self.width, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True  # fixed centroids
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = self.nprobe
        nonzero = (rows.square().sum(-1) != 0).cpu().numpy()  # as ExactIndex
        ids = np.flatnonzero(nonzero).astype(np.int64)
        if len(ids):
            index.add_with_ids(_unit_rows(rows[torch.from_numpy(ids)]), ids)
        self.indexes[b], self.quantizers[b], self.nonzero[b] = index, quantizer, nonzero

    def reset(self, memory: Tensor, elements: Tensor) -> None:
        for b in elements.tolist():
            self._build(b, memory[b])

    def clear(self, memory: Tensor, elements: Tensor) -> None:
        zero = memory.new_zeros(self.size, self.width)  # (the faiss path is not the fast one)
        for b in elements.tolist():
            self._build(b, zero)

    def update(self, memory: Tensor, rows: Tensor) -> None:
        rows_cpu = rows.cpu()
        for b in range(memory.shape[0]):
            ids = np.unique(rows_cpu[b].numpy()).astype(np.int64)
            values = memory[b, torch.from_numpy(ids)]
            index = self.indexes[b]
            index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
            nonzero = (values.square().sum(-1) != 0).cpu().numpy()
            self.nonzero[b, ids] = nonzero
            if nonzero.any():
                index.add_with_ids(_unit_rows(values[torch.from_numpy(nonzero)]), ids[nonzero])

    def search(self, memory: Tensor, keys: Tensor, k: int) -> Tensor:
        B, R = keys.shape[:2]
        out = np.empty((B, R, k), dtype=np.int64)
        for b in range(B):
            scores, ids = self.indexes[b].search(_unit_rows(keys[b]), k)  # [R, k], -1 = none
            scores = np.where(ids >= 0, scores, -np.inf)
            zero_rows = np.flatnonzero(~self.nonzero[b])[:k]  # cosine 0 with every key
            cand_ids = np.concatenate([ids, np.broadcast_to(zero_rows, (R, len(zero_rows)))], 1)
            cand_scores = np.concatenate([scores, np.zeros((R, len(zero_rows)))], 1)
            best = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
            found = np.take_along_axis(cand_ids, best, 1)
            if (found < 0).any():  # the probed lists held fewer than k rows: scan them all
                found = ExactIndex(memory).search(memory[b : b + 1], keys[b : b + 1], k)[0]
                found = found.cpu().numpy()
            out[b] = np.sort(found, axis=1)
        return torch.from_numpy(out).to(keys.device)


class IVFIndex:
    """:class:`FaissIndex`'s inverted-file index, run by the native kernels (no faiss needed).

    The same algorithm and parameters: ``nlist ≈ sqrt(N)`` fixed seeded random unit centroids
    (the same ones), ``nprobe`` lists probed, unit rows in float32 filed under their nearest
    centroid, zero rows kept apart (score 0, the ``K`` lowest can be read), the exact scan when the
    probed lists hold fewer than ``K`` rows; ties go to the lowest row. Its state lives in the
    kernel library (freed with the object); every method is one kernel call for the whole batch,
    so a step costs ``O(J·nlist·W)`` to update and ``O(R·(nlist + N·nprobe/nlist)·W)`` to search
    per element, with no Python loop over the batch.
    """

    def __init__(self, memory: Tensor, nprobe: int = FAISS_NPROBE, seed: int = 0):
        B, N, W = memory.shape
        self.size, self.width = N, W
        self.nlist, self.nprobe, centroids = _ivf_layout(N, W, nprobe, seed)
        self.centroids = torch.from_numpy(centroids)
        self._lib = _kernel()
        self._handle = self._lib.sa_ivf_new(B, N, W, self.nlist, self.nprobe, _p(self.centroids))
        if not self._handle:
            raise ValueError(f"IVFIndex supports word sizes up to 256; got {W}")
        if not is_zero_broadcast(memory):  # (a new index holds every row as zero)
            self.reset(memory, torch.arange(B))

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.sa_ivf_free(handle)

    def _kernel(self, name: str, memory: Tensor):
        return native.kernel(self._lib, f"sa_ivf_{name}", memory.dtype)

    def reset(self, memory: Tensor, elements: Tensor) -> None:
        memory = memory.detach().contiguous()
        mask = _reset_mask(elements, memory.shape[0])
        if mask is not None:
            self._kernel("reset", memory)(self._handle, _p(memory), _p(mask))

    def clear(self, memory: Tensor, elements: Tensor) -> None:
        mask = _reset_mask(elements, memory.shape[0])
        if mask is not None:
            self._lib.sa_ivf_clear(self._handle, _p(mask))

    def update(self, memory: Tensor, rows: Tensor) -> None:
        memory, rows = memory.detach().contiguous(), rows.contiguous()
        self._kernel("update", memory)(self._handle, _p(memory), _p(rows), rows.shape[1])

    def search(self, memory: Tensor, keys: Tensor, k: int) -> Tensor:
        memory, keys = memory.detach().contiguous(), keys.detach().contiguous()
        out = torch.empty(*keys.shape[:2], k, dtype=torch.long)
        self._kernel("search", memory)(
            self._handle, _p(memory), _p(keys), keys.shape[1], k, _p(out)
        )  # fmt: skip
        return out


def make_index(kind: str, memory: Tensor) -> Index:
    """An index of kind ``"exact"``, ``"faiss"`` or ``"ivf"`` (already resolved) over ``memory``.

    ``"ivf"`` on memory the kernels cannot take (another device or dtype) runs the same algorithm
    through faiss when it is installed, else the exact scan.
    """
    if kind == "ivf":
        if _kernel() is not None and native.usable(memory):
            return IVFIndex(memory)
        kind = "faiss" if faiss_available() else "exact"
    return FaissIndex(memory) if kind == "faiss" else ExactIndex(memory)


# -- sparse content read ---------------------------------------------------------------------------
def sparse_read_forward(rows: Tensor, keys: Tensor, strengths: Tensor):
    """``w = softmax_K(β cos(q, M[i]))`` over the ``K`` found rows, and ``r = Σ_i w_i M[i]``.

    :param rows: ``[B, R, K, W]`` the rows found for each head.
    :param keys: ``[B, R, W]`` read keys ``q``.
    :param strengths: ``[B, R]`` key strengths ``β``.
    :return: ``(weights [B, R, K], read_vectors [B, R, W], cache)``.
    """
    dot = torch.einsum("brkw,brw->brk", rows, keys)
    row_norm = torch.sqrt(rows.square().sum(-1) + EPSILON)  # [B, R, K]
    key_norm = torch.sqrt(keys.square().sum(-1) + EPSILON)  # [B, R]
    sim = dot / (key_norm.unsqueeze(-1) * row_norm)
    weights = torch.softmax(sim * strengths.unsqueeze(-1), dim=-1)
    read_vectors = torch.einsum("brk,brkw->brw", weights, rows)
    return weights, read_vectors, (rows, keys, strengths, row_norm, key_norm, sim, weights)


def sparse_read_backward(g_weights: Tensor, g_read: Tensor, cache):
    """Gradients ``(rows, keys, strengths)`` of :func:`sparse_read_forward`."""
    rows, keys, strengths, row_norm, key_norm, sim, weights = cache
    g_w = g_weights + torch.einsum("brkw,brw->brk", rows, g_read)
    g_rows = weights.unsqueeze(-1) * g_read.unsqueeze(2)
    g_z = weights * (g_w - (g_w * weights).sum(-1, keepdim=True))  # softmax
    g_strengths = (g_z * sim).sum(-1)
    g_sim = g_z * strengths.unsqueeze(-1)
    g_dot = g_sim / (key_norm.unsqueeze(-1) * row_norm)
    # sim = q·m / (|q| |m|): d/dq = m/(|q||m|) - sim q/|q|^2, and the same for m
    g_keys = torch.einsum("brk,brkw->brw", g_dot, rows) - keys * (
        (g_sim * sim).sum(-1) / key_norm.square()
    ).unsqueeze(-1)
    g_rows = g_rows + g_dot.unsqueeze(-1) * keys.unsqueeze(2)
    g_rows = g_rows - rows * (g_sim * sim / row_norm.square()).unsqueeze(-1)
    return g_rows, g_keys, g_strengths


def _flat_rows(indices: Tensor, memory_size: int) -> Tensor:
    """``[B, ...]`` row indices -> flat indices into the ``[B·N, W]`` view of the memory."""
    batch = torch.arange(indices.shape[0], device=indices.device) * memory_size
    return (indices + batch.view(-1, *([1] * (indices.dim() - 1)))).flatten()


class SparseAccessStep(torch.autograd.Function):
    """One SAM memory step, writing the memory in place.

    Forward (no graph recorded): zero the memory of elements in ``reset`` (an episode start),
    erase the LRU row, add ``w^W a^T`` at the ``J`` write rows, update the index, find the ``K``
    nearest rows of each read key, read. Saves the ``R·K`` read rows (``[B, R, K, W]``) and the
    sparse write; the ``N×W`` memory is not saved.

    Backward: receives ``dL/dM_t`` (a dense ``[B, N, W]`` buffer that flows through every step of
    the sequence), adds the read rows' gradient into it, takes the write's gradients from the
    ``J`` written rows, zeroes the erased rows (and the reset elements), and passes the same
    buffer on as ``dL/dM_{t-1}``: ``O(K·W)`` work per step. ``owns_grad=False`` (the last step of
    a call, whose memory the caller sees) copies the incoming gradient once first.

    Inputs: ``memory [B, N, W]`` (contiguous, modified in place), ``write_vector [B, W]`` ``a``,
    ``write_weights [B, J]``, ``read_keys [B, R, W]``, ``read_strengths [B, R]``, then
    non-differentiable ``write_indices [B, J]`` long, ``reset`` ``[n]`` long element indices (may
    be empty), ``index`` (:class:`Index`), ``k`` = ``K``, ``owns_grad``.

    Outputs: ``memory`` (the same tensor), ``read_weights [B, R, K]``, ``read_indices [B, R, K]``
    (exact integers in the memory's dtype, no gradient), ``read_vectors [B, R, W]``.

    Optional last input ``extra_indices [B, E]`` long (the SDNC's link reads): the rows ``M_t[i]``
    at those indices are gathered after the write and returned as a fifth output
    ``extra_rows [B, E, W]``; their gradient is added into the buffer like the read rows'.
    """

    @staticmethod
    def forward(
        ctx, memory, write_vector, write_weights, read_keys, read_strengths,
        write_indices, reset, index, k, owns_grad, extra_indices=None,
    ):  # fmt: skip
        if _kernel() is not None and _native_step_usable(
            memory, write_vector, write_weights, read_keys, read_strengths
        ):
            return _native_forward(
                ctx, memory, write_vector, write_weights, read_keys, read_strengths,
                write_indices, reset, index, k, owns_grad, extra_indices,
            )  # fmt: skip
        ctx.native = False
        B, N, W = memory.shape
        flat = memory.view(B * N, W)
        if reset.numel():
            memory.index_fill_(0, reset, 0.0)
            index.clear(memory, reset)
        lru = write_indices[:, -1]
        flat.index_fill_(0, _flat_rows(lru, N), 0.0)  # erase R_t = I^U_t 1^T
        write_flat = _flat_rows(write_indices, N)
        adds = write_weights.unsqueeze(-1) * write_vector.unsqueeze(1)  # A_t rows: [B, J, W]
        flat.index_add_(0, write_flat, adds.reshape(-1, W))
        index.update(memory, write_indices)

        read_indices = index.search(memory, read_keys, k)  # [B, R, K]
        read_flat = _flat_rows(read_indices, N)
        rows = flat.index_select(0, read_flat).view(*read_indices.shape, W)
        weights, read_vectors, cache = sparse_read_forward(rows, read_keys, read_strengths)

        extra_flat = None if extra_indices is None else _flat_rows(extra_indices, N)

        ctx.shape = (B, N, W)
        ctx.owns_grad = owns_grad
        ctx.save_for_backward(
            *cache, write_vector, write_weights, write_flat, read_flat, reset, extra_flat
        )
        ctx.mark_dirty(memory)
        read_idx = read_indices.to(memory.dtype)
        ctx.mark_non_differentiable(read_idx)
        if extra_flat is None:
            return memory, weights, read_idx, read_vectors
        extra_rows = flat.index_select(0, extra_flat).view(B, -1, W)
        return memory, weights, read_idx, read_vectors, extra_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, g_memory, g_weights, _g_indices, g_read, g_extra=None):
        if ctx.native:
            return _native_backward(ctx, g_memory, g_weights, g_read, g_extra)
        B, N, W = ctx.shape
        *cache, write_vector, write_weights, write_flat, read_flat, reset, extra_flat = (
            ctx.saved_tensors
        )
        if ctx.owns_grad and g_memory.is_contiguous():
            g = g_memory
        else:
            g = g_memory.clone(memory_format=torch.contiguous_format)
        g_flat = g.view(B * N, W)

        g_rows, g_keys, g_strengths = sparse_read_backward(g_weights, g_read, tuple(cache))
        g_flat.index_add_(0, read_flat, g_rows.reshape(-1, W))
        if extra_flat is not None:
            g_flat.index_add_(0, extra_flat, g_extra.reshape(-1, W))

        g_written = g_flat.index_select(0, write_flat).view(B, -1, W)  # dL/dM_t at the J rows
        g_write_weights = torch.einsum("bjw,bw->bj", g_written, write_vector)
        g_write_vector = torch.einsum("bjw,bj->bw", g_written, write_weights)
        lru_flat = write_flat.view(B, -1)[:, -1]
        g_flat.index_fill_(0, lru_flat, 0.0)  # the erased row does not depend on M_{t-1}
        if reset.numel():
            g.index_fill_(0, reset, 0.0)
        return (
            g, g_write_vector, g_write_weights, g_keys, g_strengths,
            None, None, None, None, None, None,
        )  # fmt: skip


def _native_step_usable(memory: Tensor, *tensors: Tensor) -> bool:
    return memory.is_contiguous() and native.usable(memory, *tensors)


def _carve(buffer: Tensor, batch: int, sizes: list[int]) -> list[int]:
    """Pointers to consecutive blocks ``[batch, size]`` of a flat contiguous buffer."""
    base, item, out = buffer.data_ptr(), buffer.element_size(), []
    for size in sizes:
        out.append(base)
        base += batch * size * item
    return out


def _uncarve(buffer: Tensor, pointer: int, shape: tuple[int, ...]) -> Tensor:
    """The block of ``buffer`` at ``pointer`` (from :func:`_carve`) as a tensor view."""
    start = (pointer - buffer.data_ptr()) // buffer.element_size()
    return buffer[start : start + math.prod(shape)].view(shape)


def _reset_mask(reset: Tensor, batch: int) -> Tensor | None:
    """``[n]`` element indices -> ``[B]`` uint8 mask, or ``None`` when no element resets."""
    if not reset.numel():
        return None
    return torch.zeros(batch, dtype=torch.uint8).index_fill_(0, reset, 1)


def _native_forward(
    ctx, memory, write_vector, write_weights, read_keys, read_strengths,
    write_indices, reset, index, k, owns_grad, extra_indices,
):  # fmt: skip
    """:meth:`SparseAccessStep.forward` by the kernels: the write (and, with an
    :class:`ExactIndex`, the search) and the read are one call each; other indexes are updated
    and searched between them."""
    B, N, W = memory.shape
    a = write_vector.detach().contiguous()
    ww = write_weights.detach().contiguous()
    keys = read_keys.detach().contiguous()
    beta = read_strengths.detach().contiguous()
    widx = write_indices.contiguous()
    J = widx.shape[1]
    mask = _reset_mask(reset, B)
    sqnorm = index.sqnorm if isinstance(index, ExactIndex) else None
    _fn("write", memory)(_p(memory), _p(sqnorm), B, N, W, J, _p(a), _p(ww), _p(widx), _p(mask))
    if sqnorm is not None:
        read_indices = index.native_search(memory, keys, k)
    else:
        if mask is not None:  # zeroed by the write but for the rows filed next
            index.clear(memory, reset)
        index.update(memory, widx)
        read_indices = index.search(memory, keys, k).contiguous()
    R = keys.shape[1]
    like = {"dtype": memory.dtype}
    rows = torch.empty(B, R, k, W, **like)
    weights = torch.empty(B, R, k, **like)
    sim = torch.empty(B, R, k, **like)
    read = torch.empty(B, R, W, **like)
    eidx = None if extra_indices is None else extra_indices.contiguous()
    E = 0 if eidx is None else eidx.shape[1]
    extra_rows = None if eidx is None else torch.empty(B, E, W, **like)
    _fn("read", memory)(
        _p(memory), B, N, W, R, k, _p(read_indices), _p(keys), _p(beta),
        _p(rows), _p(weights), _p(sim), _p(read), E, _p(eidx), _p(extra_rows),
    )  # fmt: skip
    ctx.native = True
    ctx.shape = (B, N, W, R, k, J, E)
    ctx.owns_grad = owns_grad
    ctx.save_for_backward(rows, keys, beta, sim, weights, read_indices, a, ww, widx, eidx)
    ctx.reset_mask = mask
    ctx.set_materialize_grads(False)
    ctx.mark_dirty(memory)
    read_idx = read_indices.to(memory.dtype)
    ctx.mark_non_differentiable(read_idx)
    if extra_rows is None:
        return memory, weights, read_idx, read
    return memory, weights, read_idx, read, extra_rows


def _native_backward(ctx, g_memory, g_weights, g_read, g_extra):
    """:meth:`SparseAccessStep.backward` as one kernel call; unused outputs' gradients arrive
    as ``None`` (no zero tensors)."""
    B, N, W, R, K, J, E = ctx.shape
    rows, keys, beta, sim, weights, ridx, a, ww, widx, eidx = ctx.saved_tensors
    if g_memory is None:
        g = torch.zeros(B, N, W, dtype=rows.dtype)
    elif ctx.owns_grad and g_memory.is_contiguous():
        g = g_memory
    else:
        g = g_memory.clone(memory_format=torch.contiguous_format)
    g_a = torch.empty(B, W, dtype=rows.dtype)
    g_ww = torch.empty(B, J, dtype=rows.dtype)
    g_keys = torch.empty(B, R, W, dtype=rows.dtype)
    g_beta = torch.empty(B, R, dtype=rows.dtype)
    g_weights = None if g_weights is None else g_weights.contiguous()
    g_read = None if g_read is None else g_read.contiguous()
    g_extra = None if g_extra is None else g_extra.contiguous()
    _fn("backward", g)(
        _p(g), B, N, W, R, K, J, E, _p(rows), _p(keys), _p(beta), _p(sim), _p(weights),
        _p(ridx), _p(g_weights), _p(g_read), _p(eidx), _p(g_extra), _p(a), _p(ww), _p(widx),
        _p(ctx.reset_mask), _p(g_a), _p(g_ww), _p(g_keys), _p(g_beta),
    )  # fmt: skip
    return (
        g, g_a, g_ww, g_keys, g_beta,
        None, None, None, None, None, None,
    )  # fmt: skip


class SAMAccessStep(torch.autograd.Function):
    """SAM's whole memory step after the controller, as one autograd node (native kernels only).

    From the interface vector ``xi = [q (R·W) | a (W) | β̂ (R) | α̂, γ̂]`` (layout of
    :class:`~memagents.cores.sam.SAMCore`): ``β = oneplus(β̂)``, ``α = σ(α̂)``, ``γ = σ(γ̂)``,
    :func:`sparse_write_weights`, the write, search and read of :class:`SparseAccessStep`, then
    :func:`usage_update_lru` (section 3.3), which also gives the next step's LRU row. The same
    equations as composing those functions (the torch reference); tests compare both.

    Inputs: ``xi [B, R·W + W + R + 2]``, ``prev_read_weights [B, R, K]`` ``w^R_{t-1}``,
    ``memory [B, N, W]`` (contiguous, modified in place); then non-differentiable
    ``prev_read_indices [B, R, K]`` long, ``lru [B]`` long ``I^U_t``, ``last_access [B, N]``
    (updated in place), ``time [B, 1]``, ``reset [n]`` long, ``index``, ``R``, ``W``, ``K``,
    ``owns_grad`` (as in :class:`SparseAccessStep`), ``scratch`` (a :class:`StepScratch` or
    ``None``).

    Outputs: ``memory``, ``read_weights [B, R, K]``, ``read_indices [B, R, K]`` long,
    ``read_vectors [B, R·W]`` (flat), ``write_weights [B, J]``, ``write_indices [B, J]`` long,
    ``time [B, 1]`` ``t``, ``next_lru [B]`` long.
    """

    @staticmethod
    def forward(
        ctx, xi, prev_read_weights, memory, prev_read_indices, lru, last_access, time,
        reset, index, R, W, K, owns_grad, scratch=None,
    ):  # fmt: skip
        B, N, _ = memory.shape
        S, J = xi.shape[1], R * K + 1
        like = {"dtype": memory.dtype}
        xi_c = xi.detach().contiguous()
        prev_w = prev_read_weights.detach().contiguous()
        # one workspace for the intermediates the backward needs (pointers into it, no views)
        work = torch.empty(B * (R * W + W + R + 2 + R * K * W + R * K), **like)
        keys, a, beta, gates, rows, sim = _carve(work, B, [R * W, W, R, 2, R * K * W, R * K])
        weights = torch.empty(B, R, K, **like)
        read = torch.empty(B, R * W, **like)
        ww = torch.empty(B, J, **like)
        ints = torch.empty(B * (J + R * K + 1), dtype=torch.long)  # write rows | read rows | lru
        widx_p, ridx_p, lru_p = _carve(ints, B, [J, R * K, 1])
        widx = _uncarve(ints, widx_p, (B, J))
        ridx = _uncarve(ints, ridx_p, (B, R, K))
        next_lru = _uncarve(ints, lru_p, (B,))
        prev_idx, lru, time = prev_read_indices.contiguous(), lru.contiguous(), time.contiguous()
        _fn("head", memory)(
            _p(xi_c), B, S, R, W, K, _p(prev_w), _p(prev_idx), _p(lru),
            keys, a, beta, gates, _p(ww), widx_p,
        )  # fmt: skip
        mask = _reset_mask(reset, B)
        sqnorm = index.sqnorm if isinstance(index, ExactIndex) else None
        _fn("write", memory)(_p(memory), _p(sqnorm), B, N, W, J, a, _p(ww), widx_p, _p(mask))
        if sqnorm is not None:
            _fn("search", memory)(_p(memory), _p(sqnorm), B, N, W, keys, R, K, ridx_p)
        else:
            if mask is not None:  # zeroed by the write but for the rows filed next
                index.clear(memory, reset)
            index.update(memory, widx)
            found = index.search(memory, _uncarve(work, keys, (B, R, W)), K)
            ridx.copy_(found)
        _fn("read", memory)(
            _p(memory), B, N, W, R, K, ridx_p, keys, beta,
            rows, _p(weights), sim, _p(read), 0, None, None,
        )  # fmt: skip
        new_time = torch.empty(B, 1, **like)
        bs, bmin, barg = (0, None, None) if scratch is None or scratch.blocks is None else (
            scratch.blocks
        )  # fmt: skip
        _fn("usage", memory)(
            _p(last_access), _p(time), _p(new_time), B, N, J, widx_p, _p(ww),
            R * K, ridx_p, _p(weights), ACCESS_THRESHOLD, lru_p, bs, _p(bmin), _p(barg),
        )  # fmt: skip
        if scratch is not None:
            scratch.rows += [widx, ridx.view(B, R * K)]
        ctx.shape = (B, N, W, R, K, J, S)
        ctx.owns_grad = owns_grad
        ctx.scratch = scratch
        ctx.save_for_backward(xi_c, prev_w, work, weights, ints, ww)
        ctx.reset_mask = mask
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(memory)
        ctx.mark_non_differentiable(new_time)
        return memory, weights, ridx, read, ww, widx, new_time, next_lru

    @staticmethod
    @once_differentiable
    def backward(ctx, g_memory, g_weights, _gi, g_read, g_ww_out, _gwi, _gt, _gl):
        B, N, W, R, K, J, S = ctx.shape
        xi, prev_w, work, weights, ints, ww = ctx.saved_tensors
        keys, a, beta, gates, rows, sim = _carve(work, B, [R * W, W, R, 2, R * K * W, R * K])
        widx, ridx, _ = _carve(ints, B, [J, R * K, 1])
        like = {"dtype": work.dtype}
        if g_memory is None:
            scratch = ctx.scratch
            if scratch is None:
                g = torch.zeros(B, N, W, **like)
            else:
                g = scratch.gradient_buffer((B, N, W), work.dtype)
        elif ctx.owns_grad and g_memory.is_contiguous():
            g = g_memory
        else:
            g = g_memory.clone(memory_format=torch.contiguous_format)
        g_a = torch.empty(B, W, **like)
        g_ww = torch.empty(B, J, **like)
        g_keys = torch.empty(B, R, W, **like)
        g_beta = torch.empty(B, R, **like)
        g_weights = None if g_weights is None else g_weights.contiguous()
        g_read = None if g_read is None else g_read.contiguous()
        _fn("backward", g)(
            _p(g), B, N, W, R, K, J, 0, rows, keys, beta, sim, _p(weights),
            ridx, _p(g_weights), _p(g_read), None, None, a, _p(ww), widx,
            _p(ctx.reset_mask), _p(g_a), _p(g_ww), _p(g_keys), _p(g_beta),
        )  # fmt: skip
        if g_ww_out is not None:
            g_ww += g_ww_out
        g_xi = torch.empty(B, S, **like)
        g_prev_w = torch.empty(B, R, K, **like)
        _fn("head_backward", g)(
            _p(xi), B, S, R, W, K, _p(prev_w), gates, _p(g_keys), _p(g_a), _p(g_beta),
            _p(g_ww), _p(g_xi), _p(g_prev_w),
        )  # fmt: skip
        return (g_xi, g_prev_w, g) + (None,) * 11


def dense_access_step(
    memory: Tensor,
    write_vector: Tensor,
    write_weights: Tensor,
    read_keys: Tensor,
    read_strengths: Tensor,
    write_indices: Tensor,
    reset: Tensor,
    index: Index,
    k: int,
    extra_indices: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The step of :class:`SparseAccessStep` in plain differentiable torch, on a new ``[B, N, W]``
    memory per step (the dense reference: ``O(N·W)`` memory per step for autograd). Same
    arguments (without ``owns_grad``) and outputs; ``memory`` is not modified."""
    B, N, W = memory.shape
    if reset.numel():
        starts = torch.zeros(B, dtype=torch.bool, device=memory.device)
        starts[reset] = True
        memory = torch.where(starts.view(B, 1, 1), torch.zeros_like(memory), memory)
        index.clear(memory, reset)
    lru = write_indices[:, -1]
    erase = torch.nn.functional.one_hot(lru, N).to(memory.dtype)  # I^U_t: [B, N]
    adds = write_weights.unsqueeze(-1) * write_vector.unsqueeze(1)  # [B, J, W]
    memory = memory * (1.0 - erase).unsqueeze(-1) + torch.zeros_like(memory).scatter_add(
        1, write_indices.unsqueeze(-1).expand(B, -1, W), adds
    )
    index.update(memory, write_indices)
    read_indices = index.search(memory, read_keys, k)
    R = read_indices.shape[1]
    rows = memory.gather(1, read_indices.view(B, R * k, 1).expand(B, R * k, W)).view(B, R, k, W)
    weights, read_vectors, _ = sparse_read_forward(rows, read_keys, read_strengths)
    out = (memory, weights, read_indices.to(memory.dtype), read_vectors)
    if extra_indices is None:
        return out
    extra_rows = memory.gather(1, extra_indices.unsqueeze(-1).expand(B, -1, W))  # [B, E, W]
    return (*out, extra_rows)
