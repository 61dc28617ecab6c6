"""Sparse Differentiable Neural Computer (SDNC; Rae et al. 2016, "Scaling Memory-Augmented Neural
Networks with Sparse Reads and Writes", NIPS, supplementary "Sparse Differentiable Neural
Computer").

SAM's sparse access (:mod:`~memagents.cores.sparse_access`: LRU usage, sparse writes to the
previously read rows and the LRU row, ``K``-sparse content reads through a kNN index, in-place
memory with ``O(K·W)`` saved per step) plus the DNC's temporal links kept sparse
(:mod:`~memagents.cores.sparse_links`: every row of ``L`` and of ``Lᵀ`` keeps its ``K_L`` =
``temporal_reads`` strongest entries, the precedence its ``K_L`` largest). Per step:

1. controller ``h_t`` from ``[x_t; r_{t-1}]``; interface: read keys ``q``, strengths ``β``, write
   vector ``a_t``, gates ``α_t, γ_t``, read modes ``π_t`` (softmax over backward, content,
   forward per head, as in the DNC);
2. ``w^W_t = α (γ w̄^R_{t-1} + (1 - γ) I^U_t)`` (SAM);
3. sparse link update ``L_t`` with ``p_{t-1}``, then ``p_t``;
4. directional weightings from ``w^R_{t-1}``: ``f_t = L_t w^R_{t-1}`` and ``b_t = L_tᵀ w^R_{t-1}``,
   each kept to its ``K`` largest rows;
5. erase the LRU row, write, content read ``c_t`` (``K`` rows, softmax, sums to 1);
6. ``w^R_t = π[0] b_t + π[1] c_t + π[2] f_t`` and ``r_t = Σ w^R_t M_t``.

**Support of the read weighting.** ``w^R_t`` of a head is stored as ``S = 3K`` slots
``[b_t (K) | c_t (K) | f_t (K)]`` (values and row indices; a row may appear in several slots and
its weight is the sum). The content part has exactly ``K`` non-zeros summing to 1; the link parts
have ``K`` entries each, non-negative, summing to ≤ 1; so the dense ``w^R_t`` has at most ``3K``
non-zero rows (at least the ``K`` content rows while ``π[1] > 0``) and sums to ≤ 1 (to 1 when the
links carry all the weight their rows have, e.g. ``π[1] = 1``). SAM's write therefore goes to
``J = R·3K + 1`` rows.

The output is ``y_t = [h_t; r_t]``.

**How a step runs.** Steps 1-6 are composed from :func:`head_and_links` (interface, 2-4),
SAM's :class:`~memagents.cores.sparse_access.SparseAccessStep` (5), :func:`read_mix` (6) and
SAM's usage update: the torch reference, and each part has a native kernel
(``csrc/sparse_links.cpp``) with a hand-written backward. On CPU float tensors with the kernels
(``fused`` cores, no debug output) everything after the controller is one autograd node per step,
:class:`SDNCStep`, which calls the same kernels and SAM's access step in the same order; a call
without gradient (a rollout) saves nothing. Tests compare the three (torch, composed native, one
node) in float64. A call that records gradients (or runs more than one step) goes one level up:
the whole call, controller included, is one :class:`SDNCSequence` node (backpropagation through
time by hand, weight gradients once over all steps), which removes the per-step autograd nodes of
the LSTM cell and the interface. The initial state's ``N``-row fields are broadcasts, and a
call's owned copies of broadcast zeros are lazily zeroed memory
(:func:`~memagents.cores.sparse_access.owned_copy`), so a sequence from an empty memory pays only for
the rows it touches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from memagents.cores import addressing, lstm_cell, native, sparse_access, sparse_links
from memagents.cores import state as state_lib
from memagents.cores.base import MemoryCore, stack_debug
from memagents.cores.rnn import LSTMState
from memagents.cores.sam import init_sparse_core, lru_block_rows, sparse_snapshot

#: State fields holding row numbers in ``[0, N)`` (stored as floats in the packed state).
INDEX_FIELDS = (
    "read_indices",
    "write_indices",
    "link_indices",
    "link_t_indices",
    "precedence_indices",
)

#: The ``N``-sized access fields besides the memory that a carried call
#: (:meth:`SDNCCore.forward_inplace`) writes in place and its carry vouches for.
_CARRIED = ("last_access", "link", "link_t", "link_indices", "link_t_indices")


def _find_carry(a: SDNCAccessState) -> sparse_access.Carry | None:
    """The carry kept for the access state ``a`` (memory and the :data:`_CARRIED` fields)."""
    return sparse_access.Carry.find(a.memory, *(getattr(a, f) for f in _CARRIED))


class SDNCAccessState(NamedTuple):
    """State of the SDNC's memory access (``R`` read heads, ``S = 3K`` slots per read weighting,
    ``J = R·S + 1`` write locations, ``K_L`` = ``temporal_reads``). Indices are exact integers in
    the state's float dtype."""

    memory: Tensor  # [B, N, W] memory matrix M_t
    last_access: Tensor  # [B, N] step of each row's last access U_t (0 = never), per element
    time: Tensor  # [B, 1] steps taken in the element's episode, t
    read_weights: Tensor  # [B, R, 3K] w^R_t as slots [backward K | content K | forward K]
    read_indices: Tensor  # [B, R, 3K] their rows
    write_weights: Tensor  # [B, J] values of the write weighting w^W_t
    write_indices: Tensor  # [B, J] their rows (the slots read at t-1, then the LRU row)
    link: Tensor  # [B, N, K_L] L_t: row i's K_L strongest entries L_t[i, j]
    link_indices: Tensor  # [B, N, K_L] their columns j (distinct, never i)
    link_t: Tensor  # [B, N, K_L] L_tᵀ: row j's K_L strongest entries L_t[i, j] (backward links)
    link_t_indices: Tensor  # [B, N, K_L] their rows i (distinct, never j)
    precedence: Tensor  # [B, K_L] the K_L largest entries of p_t
    precedence_indices: Tensor  # [B, K_L] their rows (distinct)


class SDNCState(NamedTuple):
    """Recurrent state of the SDNC. The access fields are also readable directly."""

    controller: LSTMState  # h, c: [B, 1, hidden_size]
    access: SDNCAccessState
    read_vectors: Tensor  # [B, R, W] read vectors r_t (fed to the controller at t + 1)

    def __getattr__(self, name):  # state.memory is state.access.memory, etc.
        if name in SDNCAccessState._fields:
            return getattr(self.access, name)
        raise AttributeError(name)


#: Run each step after the controller as one :class:`SDNCStep` node when the native kernels
#: can (``fused`` cores, CPU float tensors, no debug output); tests turn it off to compare with
#: the composed path.
ONE_NODE_STEP = True

#: State fields carried as long working copies during a call (the rest are values).
_INDEX_FIELDS = (
    "link_indices",
    "link_t_indices",
    "precedence_indices",
    "read_indices",
    "write_indices",
)


def read_mix(
    modes: Tensor,
    link_weights: Tensor,
    link_idx: Tensor,
    content_weights: Tensor,
    content_idx: Tensor,
    content_reads: Tensor,
    link_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 6: the read weighting ``w^R_t = π[0] b_t + π[1] c_t + π[2] f_t`` in its slots
    ``[b_t | c_t | f_t]`` and the read vectors ``r_t = Σ_i w^R_t[i] M_t[i]`` (DNC read modes,
    Graves et al. 2016, Methods "Read weighting", over SAM's sparse reads).

    One native kernel call each way on CPU float tensors (``csrc/sparse_links.cpp``); the torch
    ops below otherwise (the reference).

    :param modes: ``[B, R, 3]`` read modes ``π_t`` (backward, content, forward).
    :param link_weights: ``[B, R, 2K]`` ``[b_t | f_t]``; ``link_idx`` ``[B, R, 2K]`` long, their
        rows.
    :param content_weights: ``[B, R, K]`` ``c_t``; ``content_idx`` ``[B, R, K]`` their rows
        (exact integers in the value dtype).
    :param content_reads: ``[B, R, W]`` ``Σ c_t[i] M_t[i]``.
    :param link_rows: ``[B, R·2K, W]`` the rows ``M_t`` at ``link_idx``.
    :return: ``(read_vectors [B, R, W], read_weights [B, R, 3K], read_idx [B, R, 3K] long)``.
    """
    lib = sparse_links.native_kernel()
    tensors = (modes, link_weights, content_weights, content_idx, content_reads, link_rows)
    if lib is not None and sparse_links.usable(*tensors):
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return NativeReadMix.apply(*tensors, link_idx, lib)
        return _mix_forward(lib, *tensors, link_idx)
    B, R, K = content_weights.shape
    link_w = torch.cat(
        [modes[..., :1] * link_weights[..., :K], modes[..., 2:] * link_weights[..., K:]], dim=-1
    )
    read_vectors = modes[..., 1:2] * content_reads + torch.einsum(
        "brk,brkw->brw", link_w, link_rows.view(B, R, 2 * K, -1)
    )
    read_weights = torch.cat(
        [link_w[..., :K], modes[..., 1:2] * content_weights, link_w[..., K:]], dim=-1
    )
    read_idx = torch.cat([link_idx[..., :K], content_idx.long(), link_idx[..., K:]], dim=-1)
    return read_vectors, read_weights, read_idx


def _mix_forward(lib, modes, link_w, content_w, content_idx, content_r, link_rows, link_idx):
    B, R, K = content_w.shape
    W = content_r.shape[-1]
    ins = [
        t.detach().contiguous()
        for t in (modes, link_w, content_w, content_idx, content_r, link_rows)
    ]
    read_vectors = torch.empty(B, R, W, dtype=modes.dtype)
    read_weights = torch.empty(B, R, 3 * K, dtype=modes.dtype)
    read_idx = torch.empty(B, R, 3 * K, dtype=torch.long)
    m, lw, cw, ci, cr, er = (t.data_ptr() for t in ins)
    native.kernel(lib, "sdnc_mix_forward", modes.dtype)(
        B, R, K, W, m, lw, link_idx.contiguous().data_ptr(), cw, ci, cr, er,
        read_weights.data_ptr(), read_vectors.data_ptr(), read_idx.data_ptr(),
    )  # fmt: skip
    return read_vectors, read_weights, read_idx


class NativeReadMix(torch.autograd.Function):
    """:func:`read_mix` as one kernel call forward and one backward (saves its inputs:
    ``O(R·K·W)``)."""

    @staticmethod
    def forward(ctx, modes, link_w, content_w, content_idx, content_r, link_rows, link_idx, lib):
        out = _mix_forward(
            lib, modes, link_w, content_w, content_idx, content_r, link_rows, link_idx
        )
        ctx.lib = lib
        ctx.save_for_backward(modes, link_w, content_w, content_r, link_rows)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_read_vectors, g_read_weights, _g_idx):
        grads = _mix_backward(ctx.lib, ctx.saved_tensors, g_read_vectors, g_read_weights)
        g_modes, g_link_w, g_content_w, g_content_r, g_link_rows = grads
        return g_modes, g_link_w, g_content_w, None, g_content_r, g_link_rows, None, None


def _mix_backward(lib, saved, g_read_vectors, g_read_weights):
    """Gradients ``(π, [b_t | f_t], c_t, Σ c_t M, link rows)`` of :func:`_mix_forward` from
    those of ``(read_vectors, read_weights)`` (either may be ``None``); ``saved`` = ``(modes,
    link_w, content_w, content_r, link_rows)``."""
    modes, link_w, content_w, content_r, link_rows = (t.contiguous() for t in saved)
    B, R, K = content_w.shape
    W = content_r.shape[-1]
    grads = [torch.empty_like(t) for t in (modes, link_w, content_w, content_r, link_rows)]
    g_rv, g_rw = (None if g is None else g.contiguous() for g in (g_read_vectors, g_read_weights))
    native.kernel(lib, "sdnc_mix_backward", modes.dtype)(
        B, R, K, W,
        *(t.data_ptr() for t in (modes, link_w, content_w, content_r, link_rows)),
        None if g_rv is None else g_rv.data_ptr(),
        None if g_rw is None else g_rw.data_ptr(),
        *(g.data_ptr() for g in grads),
    )  # fmt: skip
    return grads


def head_and_links(
    xi: Tensor,
    prev_w: Tensor,
    prev_idx: Tensor,
    lru: Tensor,
    link: Tensor,
    link_t: Tensor,
    precedence: Tensor,
    link_idx: Tensor,
    link_t_idx: Tensor,
    precedence_idx: Tensor,
    reset: Tensor,
    owns_grad: bool,
    sizes: tuple[int, int, int],
) -> tuple[Tensor, ...]:
    """Steps 1-4 after the controller: the interface vector's parts, the write weighting (SAM),
    the sparse links ``L_t``, ``p_t`` and the link reads ``b_t``, ``f_t``
    (:func:`~memagents.cores.sparse_links.temporal_step`).

    ``xi = [q (R·W) | a (W) | β̂ (R) | α̂, γ̂ | π̂ (3R)]``: ``β = oneplus(β̂)``, ``α = σ(α̂)``,
    ``γ = σ(γ̂)``, ``π`` = softmax over each head's (backward, content, forward) modes;
    ``w^W_t = α (γ w̄^R_{t-1} + (1 - γ) I^U_t)``
    (:func:`~memagents.cores.sparse_access.sparse_write_weights`). On CPU float tensors with the
    native kernel this is one autograd node (two kernel calls each way); the composed torch
    functions otherwise (the reference).

    :param xi: ``[B, R·W + W + R + 2 + 3R]`` interface vector.
    :param prev_w: ``[B, R, S]`` ``w^R_{t-1}``; ``prev_idx`` ``[B, R, S]`` long, its rows.
    :param lru: ``[B]`` long ``I^U_t``.
    :param link: see :func:`~memagents.cores.sparse_links.temporal_step` for the link arguments.
    :param sizes: ``(R, W, K)``.
    :return: ``(keys [B, R, W], a [B, W], β [B, R], π [B, R, 3], w^W [B, J], its rows [B, J]
        long, link, link_t, p_t, p_t's rows, [b_t | f_t] [B, R, 2K], their rows)``.
    """
    R, W, K = sizes
    B = xi.shape[0]
    lib = sparse_links.native_kernel()
    tensors = (xi, prev_w, link, link_t, precedence)
    if lib is not None and sparse_links.usable(*tensors) and link_idx.dtype == link.dtype:
        args = (*tensors, prev_idx, lru, link_idx, link_t_idx, precedence_idx, reset)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return NativeHeadLinks.apply(*args, owns_grad, sizes, lib)
        head = _head_forward(lib, xi, prev_w, prev_idx, lru, sizes)
        keys, a, beta, _, modes, ww, widx = head
        links = sparse_links.native_forward(
            lib, link, link_t, ww, precedence, prev_w, link_idx, link_t_idx, widx,
            precedence_idx, prev_idx, reset, K, save=False,
        )  # fmt: skip
        return keys, a, beta, modes, ww, widx, link, link_t, *links[:4]
    keys, a, strengths, gates, modes = xi.split([R * W, W, R, 2, 3 * R], dim=-1)
    beta = addressing.oneplus(strengths)
    alpha, gamma = torch.sigmoid(gates).split([1, 1], dim=-1)
    modes = torch.softmax(modes.view(B, R, 3), dim=-1)
    ww, widx = sparse_access.sparse_write_weights(prev_w, prev_idx, lru, alpha, gamma)
    links = sparse_links.temporal_step(
        link, link_t, ww, precedence, prev_w, link_idx, link_t_idx, widx, precedence_idx,
        prev_idx, reset, owns_grad, K,
    )  # fmt: skip
    return keys.view(B, R, W), a, beta, modes, ww, widx, *links


def _head_forward(lib, xi, prev_w, prev_idx, lru, sizes):
    """The native interface part: ``(keys, a, β, gates (α, γ) [B, 2], π, w^W, its rows)``."""
    R, W, _ = sizes
    B, S = xi.shape[0], prev_w.shape[-1]
    xi, prev_w = xi.detach().contiguous(), prev_w.detach().contiguous()
    like = {"dtype": xi.dtype}
    out = [
        torch.empty(B, R, W, **like),
        torch.empty(B, W, **like),
        torch.empty(B, R, **like),
        torch.empty(B, 2, **like),
        torch.empty(B, R, 3, **like),
        torch.empty(B, R * S + 1, **like),
        torch.empty(B, R * S + 1, dtype=torch.long),
    ]
    native.kernel(lib, "sdnc_head_forward", xi.dtype)(
        B, R, W, S, xi.data_ptr(), prev_w.data_ptr(), prev_idx.contiguous().data_ptr(),
        lru.contiguous().data_ptr(), *(t.data_ptr() for t in out),
    )  # fmt: skip
    return out


class NativeHeadLinks(torch.autograd.Function):
    """:func:`head_and_links` as one autograd node: the interface kernel then the links kernel
    (:class:`~memagents.cores.sparse_links.NativeTemporalStep`'s) forward, the links' backward
    then the interface's, whose ``w^W`` and ``w^R_{t-1}`` gradients include the links'."""

    @staticmethod
    def forward(
        ctx, xi, prev_w, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
        precedence_idx, reset, owns_grad, sizes, lib,
    ):  # fmt: skip
        R, W, K = sizes
        keys, a, beta, gates, modes, ww, widx = _head_forward(lib, xi, prev_w, prev_idx, lru, sizes)
        p_out, p_out_idx, dir_w, dir_idx, saved_i32, saved_t = sparse_links.native_forward(
            lib, link, link_t, ww, precedence, prev_w, link_idx, link_t_idx, widx,
            precedence_idx, prev_idx, reset, K, save=True,
        )  # fmt: skip
        B, N, L = link.shape
        ctx.shape = (B, N, L, widx.shape[1], R, prev_w.shape[-1], K, W)
        ctx.owns_grad = owns_grad
        ctx.lib = lib
        ctx.save_for_backward(
            xi, prev_w, gates, modes, ww, widx, precedence, precedence_idx, prev_idx, reset,
            saved_i32, saved_t,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(link, link_t)
        ctx.mark_non_differentiable(widx, p_out_idx, dir_idx)
        return keys, a, beta, modes, ww, widx, link, link_t, p_out, p_out_idx, dir_w, dir_idx

    @staticmethod
    @once_differentiable
    def backward(
        ctx, g_keys, g_a, g_beta, g_modes, g_ww, _gwi, g_link, g_link_t, g_p, _gpi, g_dir, _gdi
    ):  # fmt: skip
        B, N, L, J, R, S, K, _ = ctx.shape
        xi, prev_w, gates, modes, ww, widx, p, p_idx, prev_idx, reset, saved_i32, saved_t = (
            ctx.saved_tensors
        )
        g_links, g_ww_links, g_p_prev, g_rw_links = sparse_links.native_backward(
            ctx.lib, (B, N, L, J, R, S, K), ctx.owns_grad, g_link, g_link_t, g_p, g_dir,
            ww, widx, p, p_idx, prev_w, prev_idx, reset, saved_i32, saved_t,
        )  # fmt: skip
        g_xi, g_prev_w = _head_backward(
            ctx.lib, xi, prev_w, gates, modes, g_keys, g_a, g_beta, g_modes, g_ww, g_ww_links,
            g_rw_links,
        )  # fmt: skip
        return (g_xi, g_prev_w, *g_links, g_p_prev) + (None,) * 9


def _head_backward(lib, xi, prev_w, gates, modes, *grads):
    """``(dL/dxi, dL/dw^R_{t-1})`` of :func:`_head_forward` from the gradients of ``(keys, a,
    β, π, w^W)`` and the links' own ``(dL/dw^W, dL/dw^R_{t-1})`` (any may be ``None``)."""
    B, S = xi.shape[0], prev_w.shape[-1]
    R = modes.shape[1]
    W = (xi.shape[1] - 4 * R - 2) // (R + 1)
    g_xi, g_prev_w = torch.empty_like(xi), torch.empty_like(prev_w)
    native.kernel(lib, "sdnc_head_backward", xi.dtype)(
        B, R, W, S, xi.data_ptr(), prev_w.data_ptr(), gates.data_ptr(), modes.data_ptr(),
        *(None if g is None else g.contiguous().data_ptr() for g in grads),
        g_xi.data_ptr(), g_prev_w.data_ptr(),
    )  # fmt: skip
    return g_xi, g_prev_w


def sdnc_step(
    xi, prev_w, memory, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
    precedence_idx, last_access, time, reset, index, sizes, owns_grad, lib,
    memory_reset=None, scratch=None, link_rows=None,
):  # fmt: skip
    """:class:`SDNCStep` (same arguments and outputs), or its forward alone when no gradient is
    recorded (rollouts: nothing is saved). Without gradient, ``memory_reset`` (``[n]`` long)
    replaces ``reset`` for the memory (a caller that zeroed the restarting rows itself passes
    none; ``reset`` then restarts the links alone), ``scratch``'s LRU block minima find the next
    LRU row and ``link_rows`` (``[2, B, N]`` bool) gets the link rows the step rewrote marked."""
    args = (
        xi, prev_w, memory, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
        precedence_idx, last_access, time, reset, index, sizes, owns_grad, lib,
    )  # fmt: skip
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (xi, prev_w, memory, link, link_t, precedence)
    ):
        if memory_reset is not None or scratch is not None or link_rows is not None:
            raise ValueError("memory_reset, scratch and link_rows are for steps without gradient")
        return SDNCStep.apply(*args)
    return _step_forward(
        *args, record=False, memory_reset=memory_reset, scratch=scratch, link_rows=link_rows
    )[0]


def _step_forward(
    xi, prev_w, memory, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
    precedence_idx, last_access, time, reset, index, sizes, owns_grad, lib, record,
    memory_reset=None, scratch=None, link_rows=None,
):  # fmt: skip
    """The forward of :class:`SDNCStep`: ``(outputs, what its backward needs)``; see
    :func:`sdnc_step` for ``memory_reset``, ``scratch`` and ``link_rows``."""
    R, _, K = sizes
    B = xi.shape[0]
    keys, a, beta, gates, modes, ww, widx = _head_forward(lib, xi, prev_w, prev_idx, lru, sizes)
    p_out, p_out_idx, dir_w, dir_idx, saved_i32, saved_t = sparse_links.native_forward(
        lib, link, link_t, ww, precedence, prev_w, link_idx, link_t_idx, widx,
        precedence_idx, prev_idx, reset, K, save=record, touched=link_rows,
    )  # fmt: skip
    access = FunctionCtx()
    memory, content_w, content_idx, content_r, extra_rows = sparse_access.SparseAccessStep.forward(
        access, memory, a, ww, keys, beta, widx, reset if memory_reset is None else memory_reset,
        index, K, owns_grad, dir_idx.view(B, 2 * R * K),
    )  # fmt: skip
    # SAM's context keeps its saved tensors; drop its references to the memory (marked dirty)
    # and to_save: the memory (and, at the last step, w^W) are this node's outputs, and an output
    # referenced from its own node's context is a C++ reference cycle that nothing frees (every
    # training call's graph leaked, ~7.6 MB at T=21, B=24, N=64)
    access.saved_tensors, access.to_save = access.to_save, None
    access.dirty_tensors = None
    read_vectors, read_weights, read_idx = _mix_forward(
        lib, modes, dir_w, content_w, content_idx, content_r, extra_rows, dir_idx
    )
    last_access, new_time, next_lru = sparse_access.usage_update_lru(
        last_access,
        time,
        [(widx, ww), (read_idx.view(B, -1), read_weights.view(B, -1))],
        scratch=scratch,
    )
    outputs = (
        memory, link, link_t, p_out, p_out_idx, read_vectors, read_weights, read_idx, ww, widx,
        new_time, next_lru,
    )  # fmt: skip
    saved = (
        gates, modes, ww, widx, saved_i32, saved_t, access, dir_w, content_w, content_r,
        extra_rows,
    )  # fmt: skip
    return outputs, saved


class SDNCStep(torch.autograd.Function):
    """One whole SDNC memory step after the controller as one autograd node (native path):
    :func:`head_and_links` (interface, ``w^W``, ``L_t``, ``p_t``, ``b_t``, ``f_t``), SAM's
    :class:`~memagents.cores.sparse_access.SparseAccessStep` (write, content read, the rows of
    ``b_t`` and ``f_t``; its own forward and backward, called with a plain
    :class:`~torch.autograd.function.FunctionCtx`), :func:`read_mix` and
    :func:`~memagents.cores.sparse_access.usage_update_lru`. Same equations and order as the
    composed path of :meth:`SDNCCore._run` (tests compare both); one node instead of three keeps
    the per-step autograd and Python work near SAM's.

    Inputs: ``xi [B, X]``, ``prev_w [B, R, S]``, ``memory [B, N, W]``, ``link``, ``link_t``
    ``[B, N, K_L]`` (these three modified in place), ``precedence [B, K_L]``; then
    non-differentiable ``prev_idx [B, R, S]`` long, ``lru [B]`` long, ``link_idx``,
    ``link_t_idx`` (in place, the value dtype), ``precedence_idx [B, K_L]`` long,
    ``last_access [B, N]`` (in place), ``time [B, 1]``, ``reset [n]`` long, ``index``,
    ``sizes`` ``(R, W, K)``, ``owns_grad``, ``lib``.

    Outputs: ``memory``, ``link``, ``link_t``, ``p_t``, ``p_t``'s rows (long), ``r_t [B, R, W]``,
    ``w^R_t [B, R, 3K]``, its rows (long), ``w^W_t [B, J]``, its rows (long), ``t [B, 1]``,
    ``I^U_{t+1} [B]`` (long).
    """

    @staticmethod
    def forward(
        ctx, xi, prev_w, memory, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
        precedence_idx, last_access, time, reset, index, sizes, owns_grad, lib,
    ):  # fmt: skip
        R, W, K = sizes
        outputs, saved = _step_forward(
            xi, prev_w, memory, link, link_t, precedence, prev_idx, lru, link_idx, link_t_idx,
            precedence_idx, last_access, time, reset, index, sizes, owns_grad, lib, record=True,
        )  # fmt: skip
        gates, modes, ww, widx, saved_i32, saved_t, access, dir_w, cw, cr, extra_rows = saved
        memory, link, link_t, p_out, p_out_idx, read_vectors, read_weights, read_idx = outputs[:8]
        new_time, next_lru = outputs[10:]
        B, N, L = link.shape
        ctx.shape = (B, N, L, widx.shape[1], R, prev_w.shape[-1], K, W)
        ctx.owns_grad = owns_grad
        ctx.lib = lib
        ctx.access = access
        ctx.save_for_backward(
            xi, prev_w, gates, modes, ww, widx, precedence, precedence_idx, prev_idx, reset,
            saved_i32, saved_t, dir_w, cw, cr, extra_rows,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(memory, link, link_t)
        ctx.mark_non_differentiable(p_out_idx, read_idx, widx, new_time, next_lru)
        # ww is saved in SAM's context as well: the output is a copy (no cycle through it)
        return (
            memory, link, link_t, p_out, p_out_idx, read_vectors, read_weights, read_idx,
            ww.clone(), widx, new_time, next_lru,
        )  # fmt: skip

    @staticmethod
    @once_differentiable
    def backward(
        ctx, g_memory, g_link, g_link_t, g_p, _gpi, g_rv, g_rw, _gri, g_ww, _gwi, _gt, _gl
    ):  # fmt: skip
        g_xi, g_prev_w, g_mem, g_links, g_p_prev = _step_backward(
            ctx.shape, ctx.saved_tensors, ctx.access, ctx.owns_grad, ctx.lib,
            g_memory, g_link, g_link_t, g_p, g_rv, g_rw, g_ww,
        )  # fmt: skip
        return (g_xi, g_prev_w, g_mem, *g_links, g_p_prev) + (None,) * 12


def _step_backward(
    shape, saved, access, owns_grad, lib, g_memory, g_link, g_link_t, g_p, g_rv, g_rw, g_ww
):  # fmt: skip
    """The backward of :class:`SDNCStep` from its saved tensors and access context (``shape`` =
    ``(B, N, L, J, R, S, K, W)``; any gradient may be ``None``): ``(dL/dxi, dL/dw^R_{t-1},
    dL/dM, (dL/dL, dL/dLᵀ), dL/dp_{t-1})``."""
    B, N, L, J, R, S, K, W = shape
    (
        xi, prev_w, gates, modes, ww, widx, p, p_idx, prev_idx, reset, saved_i32, saved_t,
        dir_w, content_w, content_r, extra_rows,
    ) = saved  # fmt: skip
    g_modes, g_dir, g_cw, g_cr, g_extra = _mix_backward(
        lib, (modes, dir_w, content_w, content_r, extra_rows), g_rv, g_rw
    )
    if g_memory is None:  # the step's own zero buffer (lazily zeroed pages), owned
        g_memory = sparse_links.zero_buffer((B, N, W), xi.dtype)
        access.owns_grad = True
    g_mem, g_a, g_ww_access, g_keys, g_beta, *_ = sparse_access.SparseAccessStep.backward(
        access, g_memory, g_cw, None, g_cr, g_extra
    )
    if g_ww is not None:
        g_ww_access = g_ww_access + g_ww
    g_links, g_ww_links, g_p_prev, g_rw_links = sparse_links.native_backward(
        lib, (B, N, L, J, R, S, K), owns_grad, g_link, g_link_t, g_p, g_dir,
        ww, widx, p, p_idx, prev_w, prev_idx, reset, saved_i32, saved_t,
    )  # fmt: skip
    g_xi, g_prev_w = _head_backward(
        lib, xi, prev_w, gates, modes, g_keys.view(B, R * W), g_a, g_beta, g_modes,
        g_ww_access, g_ww_links, g_rw_links,
    )  # fmt: skip
    return g_xi, g_prev_w, g_mem, g_links, g_p_prev


#: Run a whole call as one :class:`SDNCSequence` node where :class:`SDNCStep` would run each step.
SEQUENCE_NODE = True


def _sequence_forward(
    x_proj, w_state, w_if, b_if, h, c, r, memory, link, link_t, precedence, prev_w, init_h,
    init_c, init_r, aux, record,
):  # fmt: skip
    """The forward of :class:`SDNCSequence`: ``(outputs, per-step saved lists or None)``."""
    T, B, G = x_proj.shape
    Hd = G // 4
    R, W, K = aux["sizes"]
    lib, index = aux["lib"], aux["index"]
    starts, reset_steps, initial = aux["starts"], aux["reset_steps"], aux["initial"]
    scratch = aux["scratch"]  # the LRU block minima of small["last_access"]
    small = aux["small"]  # time, read_indices, write_weights, write_indices, last_access, p_idx
    link_idx, link_t_idx = aux["link_idx"], aux["link_t_idx"]
    no_reset = torch.zeros(0, dtype=torch.long)
    w_state_t, w_if_t = w_state.t(), w_if.t()
    x_proj = x_proj.contiguous()
    y = x_proj.new_empty(T, B, Hd + R * W)
    z = torch.cat([h, r], 1)  # [h_{t-1}; r_{t-1}]: [B, D]
    init_z = torch.cat([init_h, init_r], 1) if any(reset_steps) else None
    steps, lru = [], None
    write_weights = small["write_weights"]
    lstm_fwd, _ = lstm_cell.kernels(lib, x_proj)
    for t in range(T):
        reset = no_reset
        if reset_steps[t]:
            st = starts[t]
            reset = st.nonzero().flatten()
            z = torch.where(st[:, None], init_z, z)
            c = torch.where(st[:, None], init_c, c)
            prev_w = state_lib.reset_where(prev_w, initial["read_weights"], st)
            precedence = state_lib.reset_where(precedence, initial["precedence"], st)
            write_weights = state_lib.reset_where(write_weights, initial["write_weights"], st)
            for f in ("time", "read_indices", "write_indices", "precedence_indices"):
                small[f] = state_lib.reset_where(small[f], initial[f], st)
            small["last_access"].index_fill_(0, reset, 0.0)  # (owned) in place, with its blocks
            scratch.clear(reset)
            lru = None
        if lru is None:
            lru = scratch.least_recently_used(small["last_access"])
        # controller (h_t into y[t]), then the interface
        acts, c_prev, c, tanh_c = lstm_cell.forward_step(lstm_fwd, x_proj[t], z, w_state_t, c, y[t])
        xi = torch.addmm(b_if, y[t, :, :Hd], w_if_t)
        if t == 0 and aux["fresh"]:  # initial memory and links: nothing to zero or rewrite
            reset = no_reset
        outputs, saved = _step_forward(
            xi, prev_w, memory, link, link_t, precedence, small["read_indices"], lru, link_idx,
            link_t_idx, small["precedence_indices"], small["last_access"], small["time"], reset,
            index, (R, W, K), t < T - 1, lib, record, scratch=scratch,
        )  # fmt: skip
        (
            memory, link, link_t, p_out, p_out_idx, read_vectors, read_weights, read_idx,
            write_weights, write_indices, time, lru,
        ) = outputs  # fmt: skip
        if record:
            gates, modes, ww, widx, saved_i32, saved_t, access, dir_w, cw, cr, extra = saved
            tensors = (
                xi, prev_w, gates, modes, ww, widx, precedence, small["precedence_indices"],
                small["read_indices"], reset, saved_i32, saved_t, dir_w, cw, cr, extra,
            )  # fmt: skip
            # z only when it is not y[t - 1] (step 0, resets): no views of the output y in
            # the context (y -> its node -> the context -> y would never be freed)
            z_saved = z if t == 0 or reset_steps[t] else None
            steps.append((tensors, access, acts, c_prev, tanh_c, z_saved))
        y[t, :, Hd:] = read_vectors.view(B, R * W)
        z = y[t]
        prev_w, precedence = read_weights, p_out
        small.update(
            time=time, read_indices=read_idx, write_indices=write_indices,
            precedence_indices=p_out_idx,
        )  # fmt: skip
    small["write_weights"] = write_weights
    small["lru"] = lru
    outputs = (y, c, memory, link, link_t, precedence, prev_w, write_weights)
    return outputs, (steps if record else None)


class SDNCSequence(torch.autograd.Function):
    """A whole call of the SDNC (``T`` steps: controller LSTM cell, interface, and the memory step
    of :class:`SDNCStep`) as one autograd node, its backward being backpropagation through time
    by hand (the reverse loop calls :class:`SDNCStep`'s backward step by step). Native path only
    (the same conditions as :class:`SDNCStep`). As :class:`~memagents.cores.ntm_access.NTMSequence`:
    the input's share of the LSTM gates ``x_proj`` is one product over all steps (by the caller,
    under autograd), each step costs one product for the gates, one native call for the LSTM
    cell (``sdnc_lstm_forward``/``_backward``) and one product for the interface, and the weight
    gradients are formed once over all steps (``[T·B]``-row products). The context keeps no view
    of the output ``y`` (``y`` is saved for backward): a view would close a reference cycle
    through the graph that nothing frees. Same equations and
    order as :meth:`SDNCCore._run`'s step loop (tests compare both in float64).

    Step ``t`` (Rae et al. 2016, SDNC; the controller sees ``x_t`` and ``r_{t-1}``): where
    ``starts[t, b]``, element ``b``'s state is first replaced by the initial state; gates ``=
    x_proj[t] + [h_{t-1}; r_{t-1}] w_stateᵀ`` (torch's order ``i, f, g, o``), ``c_t = f c_{t-1}
    + i g``, ``h_t = o tanh(c_t)``; ``xi = h_t w_ifᵀ + b_if``; then :class:`SDNCStep`.

    Inputs: ``x_proj [T, B, 4Hd]``, ``w_state [4Hd, Hd + R·W]``, ``w_if [X, Hd]``, ``b_if [X]``,
    ``h [B, Hd]``, ``c [B, Hd]``, ``r [B, R·W]``, ``memory [B, N, W]``, ``link``, ``link_t``
    ``[B, N, K_L]`` (these three modified in place), ``precedence [B, K_L]``, ``w^R [B, R, 3K]``,
    the initial ``h``, ``c``, ``r`` (``[B, ·]``; used where ``starts``), and ``aux``: a dict of
    the rest (non-differentiable fields, updated in place to the final ones, see
    :meth:`SDNCCore._run`).

    Outputs: ``y [T, B, Hd + R·W]``, the final ``c``, ``memory``, ``link``, ``link_t``, ``p``,
    ``w^R`` and ``w^W``.
    """

    @staticmethod
    def forward(
        ctx, x_proj, w_state, w_if, b_if, h, c, r, memory, link, link_t, precedence, prev_w,
        init_h, init_c, init_r, aux,
    ):  # fmt: skip
        outputs, steps = _sequence_forward(
            x_proj, w_state, w_if, b_if, h, c, r, memory, link, link_t, precedence, prev_w,
            init_h, init_c, init_r, aux, record=True,
        )  # fmt: skip
        R, W, K = aux["sizes"]
        B, N, L = link.shape
        ctx.shape = (B, N, L, 3 * R * K + 1, R, 3 * K, K, W)
        ctx.steps = steps
        ctx.lib = aux["lib"]
        ctx.starts = aux["starts"]
        ctx.reset_steps = aux["reset_steps"]
        ctx.save_for_backward(w_state, w_if, outputs[0])
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(memory, link, link_t)
        # the last w^W is in the steps' contexts: the output is a copy (no cycle through it)
        return (*outputs[:-1], outputs[-1].clone())

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_c, g_memory, g_link, g_link_t, g_p, g_rw, g_ww):
        w_state, w_if, y = ctx.saved_tensors
        steps = ctx.steps
        T = len(steps)
        B, _, _, _, R, _, _, W = ctx.shape
        G, D = w_state.shape
        Hd = G // 4
        X = w_if.shape[0]
        new = w_state.new_empty
        g_gates_all, g_xi_all = new(T, B, G), new(T, B, X)
        zs = new(T, B, D)
        g_z = None  # gradient of [h_t; r_t] through step t + 1
        g_mem, g_links = g_memory, (g_link, g_link_t)
        g_init_z = g_init_c = None
        _, lstm_bwd = lstm_cell.kernels(ctx.lib, w_state)
        for t in reversed(range(T)):
            tensors, access, acts, c_prev, tanh_c, z = steps[t]
            zs[t] = y[t - 1] if z is None else z
            g_out = g_z if g_y is None else (g_y[t] if g_z is None else g_y[t] + g_z)
            g_h = None if g_out is None else g_out[:, :Hd]
            g_rv = None if g_out is None else g_out[:, Hd:].view(B, R, W)
            g_xi, g_rw, g_mem, g_links, g_p = _step_backward(
                ctx.shape, tensors, access, t < T - 1, ctx.lib, g_mem, *g_links, g_p, g_rv,
                g_rw, g_ww if t == T - 1 else None,
            )  # fmt: skip
            g_xi_all[t] = g_xi
            g_h = g_xi.mm(w_if) if g_h is None else torch.addmm(g_h, g_xi, w_if)
            g_c = lstm_cell.backward_step(
                lstm_bwd, (acts, c_prev, tanh_c), g_h, g_c, g_gates_all[t]
            )
            g_z = g_gates_all[t].mm(w_state)
            if ctx.reset_steps[t]:  # reset elements' inputs came from the initial state
                m = ctx.starts[t][:, None]
                g_z, g_c, g_init_z, g_init_c = lstm_cell.route_reset(
                    m, g_z, g_c, g_init_z, g_init_c
                )
                g_rw = g_rw.masked_fill(m[:, :, None], 0.0)
                if g_p is not None:
                    g_p = g_p.masked_fill(m, 0.0)
        g_w_state, g_w_if, g_b_if = lstm_cell.weight_gradients(g_gates_all, zs, g_xi_all, y, Hd)
        g_init = (None,) * 3
        if g_init_z is not None:
            g_init = (g_init_z[:, :Hd], g_init_c, g_init_z[:, Hd:])
        return (
            g_gates_all, g_w_state, g_w_if, g_b_if, g_z[:, :Hd], g_c, g_z[:, Hd:], g_mem,
            *g_links, g_p, g_rw, *g_init, None,
        )  # fmt: skip


def _fields(
    time, read_weights, read_indices, write_weights, write_indices, last_access, precedence,
    precedence_indices,
):  # fmt: skip
    """The per-step fields of the access state that :meth:`SDNCCore._run`'s loop carries."""
    return {
        "time": time,
        "read_weights": read_weights,
        "read_indices": read_indices,
        "write_weights": write_weights,
        "write_indices": write_indices,
        "last_access": last_access,
        "precedence": precedence,
        "precedence_indices": precedence_indices,
    }


class SDNCCore(MemoryCore):
    """Sparse DNC core; output ``y_t = [h_t; r_t]``.

    :param input_size: features per step.
    :param hidden_size: controller LSTM units.
    :param memory_size: ``N``, number of memory rows (at most 2^24).
    :param word_size: ``W``, width of a row.
    :param num_reads: ``R``, read heads.
    :param sparse_reads: ``K`` < ``N``, rows of each head's content read (and of its forward and
        backward link reads).
    :param temporal_reads: ``K_L`` < ``N``, entries kept per row of the link ``L``, of its
        transpose, and of the precedence.
    :param index: kNN search for the content reads: ``"exact"``, ``"faiss"`` or ``"auto"`` (as
        SAM's).
    :param learn_init: learn the controller's initial ``h_0, c_0`` and the initial read vectors.
        Memory, usage, links, precedence and the sparse weights always start at 0.
    :param fused: run the memory step as SAM's in-place
        :class:`~memagents.cores.sparse_access.SparseAccessStep`; ``False`` uses its dense
        reference. The links are always updated in place
        (:func:`~memagents.cores.sparse_links.temporal_step`). With ``fused`` and the native
        kernels (CPU float tensors) each step after the controller is one :class:`SDNCStep`
        node.
    """

    carries_state = True  # forward_inplace keeps the memory, links, index and LRU blocks

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        memory_size: int = 1024,
        word_size: int = 16,
        num_reads: int = 4,
        sparse_reads: int = 4,
        temporal_reads: int = 4,
        index: str = "auto",
        learn_init: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        init_sparse_core(
            self,
            input_size=input_size,
            hidden_size=hidden_size,
            memory_size=memory_size,
            word_size=word_size,
            num_reads=num_reads,
            below_memory_size={"sparse_reads": sparse_reads, "temporal_reads": temporal_reads},
            index=index,
            learn_init=learn_init,
            fused=fused,
            # Interface: read keys R*W | write vector W | strengths R (oneplus) | α, γ (sigmoid)
            #            | read modes R*3 (softmax: backward, content, forward)
            interface_sizes=[num_reads * word_size, word_size, num_reads, 2, 3 * num_reads],
        )

    # -- state ---------------------------------------------------------------------------------
    def _access_shapes(self) -> SDNCAccessState:
        N, W, R, K, KL = (
            self.memory_size,
            self.word_size,
            self.num_reads,
            self.sparse_reads,
            self.temporal_reads,
        )
        J = 3 * R * K + 1
        return SDNCAccessState(
            memory=(N, W),
            last_access=(N,),
            time=(1,),
            read_weights=(R, 3 * K),
            read_indices=(R, 3 * K),
            write_weights=(J,),
            write_indices=(J,),
            link=(N, KL),
            link_indices=(N, KL),
            link_t=(N, KL),
            link_t_indices=(N, KL),
            precedence=(KL,),
            precedence_indices=(KL,),
        )

    def _initial(self, batch_size, device) -> SDNCState:
        device = self._device(device)
        dtype = self._dtype()
        B, N, KL = batch_size, self.memory_size, self.temporal_reads
        # the N-row fields as broadcasts (no allocation; forward copies them once anyway, and
        # an owned copy of a broadcast zero is lazily zeroed memory: see sparse_access.owned_copy)
        zero = torch.zeros((), device=device, dtype=dtype)
        access = {
            f: zero.expand(B, *shape)
            if f in ("memory", "last_access", "link", "link_t", "link_indices", "link_t_indices")
            else torch.zeros(B, *shape, device=device, dtype=dtype)
            for f, shape in self._access_shapes()._asdict().items()
        }  # (the link indices are replaced below by their broadcast pattern)
        link_idx = sparse_links.initial_link_indices(B, N, KL, device, dtype)
        access["link_indices"] = access["link_t_indices"] = link_idx
        access["precedence_indices"] = sparse_links.initial_precedence_indices(B, KL, device).to(
            dtype
        )

        def expand(p: Tensor) -> Tensor:
            return p.to(device).expand(B, *p.shape[1:])

        return SDNCState(
            controller=LSTMState(expand(self.h0), expand(self.c0)),
            access=SDNCAccessState(**access),
            read_vectors=expand(self.read0),
        )

    def initial_state(self, batch_size, device=None) -> SDNCState:
        return self._initial(batch_size, device)

    def state_shapes_tree(self) -> SDNCState:
        return SDNCState(
            controller=LSTMState((1, self.hidden_size), (1, self.hidden_size)),
            access=self._access_shapes(),
            read_vectors=(self.num_reads, self.word_size),
        )

    # -- time ----------------------------------------------------------------------------------
    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """See :meth:`MemoryCore.forward`. The memory and links of ``state`` are copied once per
        call (never modified); the copies are then written in place step by step."""
        state, starts = self._check_inputs(x, state, episode_starts)
        self._check_indices(state, starts, INDEX_FIELDS)
        return self._run(x, state, starts, return_debug)

    def snapshot(self, state):
        """:meth:`MemoryCore.snapshot`; a carried memory is copied from its written rows alone
        (:meth:`~memagents.cores.sparse_access.Carry.snapshot`), the links whole."""
        return sparse_snapshot(self, state, _find_carry(state.access))

    def peek(self, x, state, episode_starts=None):
        """:meth:`MemoryCore.peek`. For one step without gradient on a state that a carried call
        returned, the step runs in place and is then undone, as SAM's: the memory rows it writes
        and the link rows it may rewrite (``L``: the written rows and the columns of ``Lᵀ`` at
        them; ``Lᵀ``: the written rows, ``p_{t-1}``'s rows and the columns of ``L`` at the
        written rows, as the link kernel finds them) are saved before and put back after, with
        the whole memory and links of an element that restarts."""
        state, starts = self._check_inputs(x, state, episode_starts)
        a = state.access
        carry = None
        if x.shape[0] == 1 and not self._wants_grad(x, state):
            carry = _find_carry(a)
        if carry is None or self._restarts_whole(state, starts):
            return self._run(x, state, starts, False)[0]
        memory, last_access = a.memory, a.last_access
        saved, written, reset = carry.save_step(memory, last_access, a.read_indices, starts)
        L = a.link.shape[2]
        at_written = written[..., None].expand(-1, -1, L)
        rows = (
            torch.cat([written, a.link_t_indices.gather(1, at_written).long().flatten(1)], 1),
            torch.cat(
                [
                    written,
                    a.precedence_indices.long(),
                    a.link_indices.gather(1, at_written).long().flatten(1),
                ],
                1,
            ),
        )
        links = ((a.link, a.link_indices, rows[0]), (a.link_t, a.link_t_indices, rows[1]))
        kept = [
            (at, vals.gather(1, at), idx.gather(1, at), vals[reset], idx[reset])
            for vals, idx, r in links
            for at in [r[..., None].expand(-1, -1, L)]
        ]
        link_rows = carry.link_rows.clone()
        y, _ = self._run(x, state, starts, False, carried=True, carry=carry)
        for (vals, idx, _), (at, v, i, whole_v, whole_i) in zip(links, kept, strict=True):
            vals.scatter_(1, at, v)
            idx.scatter_(1, at, i)
            vals.index_copy_(0, reset, whole_v)
            idx.index_copy_(0, reset, whole_i)
        carry.link_rows.copy_(link_rows)
        carry.restore(saved, memory, last_access)
        carry.keep(memory, *(getattr(a, f) for f in _CARRIED))
        return y

    def forward_inplace(self, x, state, episode_starts=None):
        """:meth:`forward` for a caller that hands ``state`` over (see
        :meth:`MemoryCore.forward_inplace`). Without gradient on the native one-node path, the
        memory, ``last_access`` and links of ``state`` are written in place and returned, and the
        kNN index, the LRU block minima and the rows written since each episode start are
        carried to the next call (:class:`~memagents.cores.sparse_access.Carry`): a step costs
        ``O(K·W)`` plus the index update, and an episode start zeroes only the memory rows the
        episode wrote (the links of a restarting element are still rewritten whole, ``O(N·K_L)``).
        Otherwise it is :meth:`forward`."""
        state, starts = self._check_inputs(x, state, episode_starts)
        a = state.access
        carried = not self._wants_grad(x, state)
        carry = None
        if carried:
            carry = _find_carry(a)
        # link rows that this core wrote itself (the carry vouches for them) need no check
        fields = INDEX_FIELDS if carry is None else tuple(set(INDEX_FIELDS) - set(_CARRIED))
        self._check_indices(state, starts, fields)
        return self._run(x, state, starts, False, carried=carried, carry=carry)

    def _is_initial_access(self, a: SDNCAccessState) -> bool:
        """Whether ``a``'s ``N``-sized fields are those of :meth:`initial_state` as it builds
        them (broadcast zeros, and the link indices broadcast from the initial pattern)."""
        if not all(sparse_access.is_zero_broadcast(t) for t in (a.memory, a.link, a.link_t)):
            return False
        pattern = sparse_links.initial_link_indices(
            1, self.memory_size, self.temporal_reads, a.link.device, a.link_indices.dtype
        )
        return all(
            t.stride(0) == 0 and t.data_ptr() == pattern.data_ptr()
            for t in (a.link_indices, a.link_t_indices)
        )

    def _check_indices(self, state, starts, fields) -> None:
        # the kernels index memory and links with these rows unchecked (see SAM's forward)
        first_starts = None if starts is None else starts[0]
        for field in fields:
            sparse_access.check_row_indices(
                f"access.{field}", getattr(state.access, field), self.memory_size, first_starts
            )

    def step(self, x, state: SDNCState, return_debug=False):
        """One step (copies the memory and links; prefer :meth:`forward` over sequences)."""
        out = self._run(x.unsqueeze(0), state, None, return_debug)
        y, new_state = out[0].squeeze(0), out[1]
        if return_debug:
            return y, new_state, {k: v.squeeze(0) for k, v in out[2].items()}
        return y, new_state

    def _run_sequence(
        self, x, state, starts, reset_steps, initial, memory, link, link_t, link_idx,
        link_t_idx, index, small, lib, fresh, scratch,
    ):  # fmt: skip
        """:meth:`_run` as one :class:`SDNCSequence` node (the native path): ``(y, new state)``."""
        B = x.shape[1]
        R, W, K, Hd, I = (
            self.num_reads, self.word_size, self.sparse_reads, self.hidden_size, self.input_size
        )  # fmt: skip
        dtype = memory.dtype
        x_proj, w_state = lstm_cell.input_gates(x, self.controller, I)
        h, c = state.controller.h.reshape(B, Hd), state.controller.c.reshape(B, Hd)
        r = state.read_vectors.reshape(B, R * W)
        init = {}
        init_h = init_c = init_r = None
        if initial is not None:
            init_h = initial.controller.h.reshape(B, Hd)
            init_c = initial.controller.c.reshape(B, Hd)
            init_r = initial.read_vectors.reshape(B, R * W)
            init = {
                f: getattr(initial.access, f).to(small[f].dtype if f in small else dtype)
                for f in (*small, "read_weights", "precedence")
            }
        aux = {
            "sizes": (R, W, K),
            "lib": lib,
            "index": index,
            "starts": starts,
            "reset_steps": reset_steps,
            "initial": init,
            "small": {f: small[f] for f in small if f not in ("read_weights", "precedence")},
            "link_idx": link_idx,
            "link_t_idx": link_t_idx,
            "fresh": fresh,
            "scratch": scratch,
        }
        args = (
            x_proj, w_state, self.interface.weight, self.interface.bias, h, c, r, memory, link,
            link_t, small["precedence"], small["read_weights"], init_h, init_c, init_r,
        )  # fmt: skip
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            out = SDNCSequence.apply(*args, aux)
        else:
            out = _sequence_forward(*args, aux, record=False)[0]
        y, c, memory, link, link_t, precedence, read_weights, write_weights = out
        fields = aux["small"]
        access = SDNCAccessState(
            memory=memory,
            last_access=fields["last_access"],
            time=fields["time"],
            read_weights=read_weights,
            read_indices=fields["read_indices"].to(dtype),
            write_weights=write_weights,
            write_indices=fields["write_indices"].to(dtype),
            link=link,
            link_indices=link_idx.to(dtype),
            link_t=link_t,
            link_t_indices=link_t_idx.to(dtype),
            precedence=precedence,
            precedence_indices=fields["precedence_indices"].to(dtype),
        )
        last = y[-1]
        controller = LSTMState(last[:, :Hd].unsqueeze(1), c.unsqueeze(1))
        new_state = SDNCState(
            controller=controller, access=access, read_vectors=last[:, Hd:].reshape(B, R, W)
        )
        return y, new_state

    def _run(
        self, x: Tensor, state: SDNCState, starts: Tensor | None, return_debug: bool,
        carried: bool = False, carry: sparse_access.Carry | None = None,
    ):  # fmt: skip
        """The loop over time. ``carried`` (:meth:`forward_inplace`, no gradient): on the native
        one-node path the state's own tensors are written in place and what the next call needs
        is kept in a :class:`~memagents.cores.sparse_access.Carry` (``carry``: the one found
        for ``state``, if any)."""
        T, B = x.shape[0], x.shape[1]
        R, W, K = self.num_reads, self.word_size, self.sparse_reads
        reset_steps = [False] * T if starts is None else starts.any(dim=1).tolist()
        initial = self._initial(B, x.device) if any(reset_steps) else None
        if self._restarts_whole(state, starts):
            state, carry = initial, None  # what the restarts put in its place
        a = state.access
        # an initial access state (broadcast zeros, the initial link pattern): a restart at
        # t = 0 has nothing to zero or rewrite
        fresh = self._is_initial_access(a)
        dtype = a.memory.dtype
        lib = sparse_links.native_kernel()
        carried = (
            carried
            and self.fused
            and ONE_NODE_STEP
            and lib is not None
            and sparse_links.usable(x, a.memory, a.link, a.read_weights, a.precedence)
            and sparse_links.index_dtype(a.link) == a.link.dtype
        )
        if not carried:
            carry = None
        N = self.memory_size
        scratch = None
        if carry is not None:  # the state's own tensors, as the last carried call left them
            memory, last_access, link, link_t = a.memory, a.last_access, a.link, a.link_t
            link_idx, link_t_idx = a.link_indices, a.link_t_indices
            index, scratch = carry.index, carry.scratch
        else:
            # owned working copies, written in place from here on
            if self.fused:
                memory = sparse_access.owned_copy(a.memory)
                last_access = sparse_access.owned_copy(a.last_access)
            else:
                memory, last_access = a.memory, a.last_access
            link, link_t = sparse_access.owned_copy(a.link), sparse_access.owned_copy(a.link_t)
            # indices in the dtype the link step works in (the values' on the native path: no
            # copy back at the end), owned copies as well
            idx_dtype = sparse_links.index_dtype(link)
            link_idx, link_t_idx = (
                t.to(idx_dtype, copy=True, memory_format=torch.contiguous_format)
                for t in (a.link_indices, a.link_t_indices)
            )
            index = sparse_access.make_index(self.index_kind, a.memory.detach())
            if carried:
                scratch = sparse_access.StepScratch(
                    last_access, dense_grad=False, block_rows=lru_block_rows(N),
                    zero=sparse_access.is_zero_broadcast(a.last_access),
                )  # fmt: skip
                carry = sparse_access.Carry(a.memory, last_access, index, scratch)
                # the link rows each element rewrote since its episode began ([0]: L, [1]: Lᵀ):
                # tracked from initial links, else from the element's first restart
                carry.link_rows = torch.zeros(2, B, N, dtype=torch.bool)
                carry.all_known = fresh
                carry.known.fill_(fresh)
        # the controller's state and the read vectors flat ([B, ·]) during the loop
        h, c = state.controller.h.squeeze(1), state.controller.c.squeeze(1)
        read_flat = state.read_vectors.reshape(B, R * W)
        small = {
            f: getattr(a, f)
            for f in ("time", "read_weights", "read_indices", "write_weights", "write_indices")
        }
        small["last_access"] = last_access
        small["precedence"] = a.precedence
        for f in ("precedence_indices", "read_indices", "write_indices"):
            small[f] = getattr(a, f).long()
        no_reset = torch.zeros(0, dtype=torch.long, device=x.device)
        lru = None  # I^U_t, from the previous step's usage update when it gives it
        one_node = carry is not None or (
            ONE_NODE_STEP
            and self.fused
            and not return_debug
            and lib is not None
            and link_idx.dtype == link.dtype
            and sparse_links.usable(x, memory, link, a.read_weights, a.precedence, last_access)
        )

        def blocks() -> sparse_access.StepScratch:  # the LRU row through block minima
            return sparse_access.StepScratch(
                last_access, dense_grad=False, block_rows=lru_block_rows(N),
                zero=sparse_access.is_zero_broadcast(a.last_access),
            )  # fmt: skip

        if one_node and SEQUENCE_NODE and carry is None and (T > 1 or torch.is_grad_enabled()):
            # (a rollout's single steps without gradient: the per-step path has less to set up)
            return self._run_sequence(
                x, state, starts, reset_steps, initial, memory, link, link_t, link_idx,
                link_t_idx, index, small, lib, fresh, blocks(),
            )  # fmt: skip
        if one_node and scratch is None and not self._wants_grad(x, state):
            scratch = blocks()  # (the per-step nodes under autograd find the LRU row by a scan)

        outputs, debug_steps = [], []
        for t in range(T):
            reset = link_reset = no_reset
            if reset_steps[t]:
                st = starts[t]
                reset = st.nonzero().flatten()
                h0, c0 = initial.controller.h.squeeze(1), initial.controller.c.squeeze(1)
                h = torch.where(st[:, None], h0, h)
                c = torch.where(st[:, None], c0, c)
                read0 = initial.read_vectors.reshape(B, R * W)
                read_flat = torch.where(st[:, None], read0, read_flat)
                # memory and links are reset in place by their steps (``reset``)
                for f in small:
                    if scratch is not None and f == "last_access":
                        continue
                    init = getattr(initial.access, f)
                    small[f] = state_lib.reset_where(small[f], init.to(small[f].dtype), st)
                if scratch is not None:  # in place, with its block minima
                    last_access.index_fill_(0, reset, 0.0)
                    scratch.clear(reset)
                if carry is not None:  # only the rows the episodes wrote
                    known = carry.known.index_select(0, reset)
                    sparse_links.reset_rows(
                        (link, link_t), (link_idx, link_t_idx), carry.link_rows, reset[known]
                    )
                    link_reset = reset[~known]  # (rows not tracked: the kernel rewrites all)
                    carry.reset(memory, reset)
                lru = None
            if lru is None:
                lru = (
                    sparse_access.least_recently_used(small["last_access"])
                    if scratch is None
                    else scratch.least_recently_used(last_access)
                )

            # 1. controller and interface
            h, c = self.controller(torch.cat([x[t], read_flat], dim=-1), (h, c))
            xi = self.interface(h)
            if one_node:  # steps 2-6 and the usage as one autograd node
                (
                    memory, link, link_t, precedence, precedence_idx, read_vectors,
                    read_weights, read_idx, write_weights, write_indices, time, lru,
                ) = sdnc_step(
                    xi, small["read_weights"], memory, link, link_t, small["precedence"],
                    small["read_indices"], lru, link_idx, link_t_idx,
                    small["precedence_indices"], small["last_access"], small["time"],
                    no_reset if fresh and t == 0 else (reset if carry is None else link_reset),
                    index, (R, W, K), t < T - 1, lib,
                    memory_reset=None if carry is None else no_reset, scratch=scratch,
                    link_rows=None if carry is None else carry.link_rows,
                )  # fmt: skip
                if carry is not None:
                    carry.wrote(write_indices)
                read_flat = read_vectors.view(B, R * W)
                small = _fields(
                    time, read_weights, read_idx, write_weights, write_indices,
                    small["last_access"], precedence, precedence_idx,
                )  # fmt: skip
                outputs.append(torch.cat([h, read_flat], dim=-1))
                continue

            # 2. write weighting (SAM); 3. sparse links L_t (with p_{t-1}), then p_t;
            # 4. f_t = L_t w^R_{t-1} (rows of Lᵀ), b_t = L_tᵀ w^R_{t-1} (rows of L), top K each
            prev_w, prev_idx = small["read_weights"], small["read_indices"]
            (
                keys, write_vector, strengths, modes, write_weights, write_indices,
                link, link_t, precedence, precedence_idx, link_w, link_w_idx,
            ) = head_and_links(
                xi, prev_w, prev_idx, lru, link, link_t, small["precedence"], link_idx,
                link_t_idx, small["precedence_indices"], reset, t < T - 1, (R, W, K),
            )  # fmt: skip

            # 5. write and content read (SAM), with the rows of b_t and f_t
            extra = link_w_idx.view(B, R * 2 * K)  # per head [b_t | f_t]
            args = (memory, write_vector, write_weights, keys, strengths)
            if self.fused:
                memory, content_w, content_idx, content_r, extra_rows = (
                    sparse_access.SparseAccessStep.apply(
                        *args, write_indices, reset, index, K, t < T - 1, extra
                    )
                )
            else:
                memory, content_w, content_idx, content_r, extra_rows = (
                    sparse_access.dense_access_step(*args, write_indices, reset, index, K, extra)
                )

            # 6. w^R_t = π[0] b + π[1] c + π[2] f, r_t = Σ w^R M_t
            read_vectors, read_weights, read_idx = read_mix(
                modes, link_w, link_w_idx, content_w, content_idx, content_r, extra_rows
            )
            read_flat = read_vectors.view(B, R * W)

            accesses = [
                (write_indices, write_weights),
                (read_idx.view(B, -1), read_weights.view(B, -1)),
            ]
            step_lru = lru
            if self.fused:  # in place, and the next step's LRU row in the same pass
                last_access, time, lru = sparse_access.usage_update_lru(
                    small["last_access"], small["time"], accesses
                )
            else:
                last_access, time = sparse_access.usage_update(
                    small["last_access"], small["time"], accesses
                )
                lru = None
            small = _fields(
                time, read_weights, read_idx, write_weights, write_indices, last_access,
                precedence, precedence_idx,
            )  # fmt: skip
            outputs.append(torch.cat([h, read_flat], dim=-1))
            if return_debug:
                debug_steps.append(
                    {
                        "memory": memory.detach().clone(),
                        "last_access": last_access.clone(),
                        "time": time,
                        "read_weights": read_weights,
                        "read_indices": read_idx.to(dtype),
                        "write_weights": write_weights,
                        "write_indices": write_indices.to(dtype),
                        "link": link.detach().clone(),
                        "link_indices": link_idx.to(dtype, copy=True),
                        "link_t": link_t.detach().clone(),
                        "link_t_indices": link_t_idx.to(dtype, copy=True),
                        "precedence": precedence,
                        "precedence_indices": precedence_idx.to(dtype),
                        "content_weights": content_w,
                        "content_indices": content_idx,
                        "forward_weights": link_w[..., K:],
                        "forward_indices": link_w_idx[..., K:].to(dtype),
                        "backward_weights": link_w[..., :K],
                        "backward_indices": link_w_idx[..., :K].to(dtype),
                        "read_modes": modes,
                        "lru": step_lru.to(dtype),
                        "read_vectors": read_vectors,
                    }
                )

        if carry is not None:
            carry.keep(memory, last_access, link, link_t, link_idx, link_t_idx)
        access = SDNCAccessState(
            memory=memory,
            link=link,
            link_indices=link_idx.to(dtype),
            link_t=link_t,
            link_t_indices=link_t_idx.to(dtype),
            **{f: (v.to(dtype) if f in _INDEX_FIELDS else v) for f, v in small.items()},
        )
        controller = LSTMState(h.unsqueeze(1), c.unsqueeze(1))
        new_state = SDNCState(
            controller=controller, access=access, read_vectors=read_flat.view(B, R, W)
        )
        y = torch.stack(outputs)
        if return_debug:
            return y, new_state, stack_debug(debug_steps)
        return y, new_state
