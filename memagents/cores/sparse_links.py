"""Sparse temporal links of the SDNC (Rae et al. 2016, "Scaling Memory-Augmented Neural Networks
with Sparse Reads and Writes", supplementary "Sparse Differentiable Neural Computer").

The DNC's link ``L_t[i, j]`` (the degree to which row ``i`` was written right after row ``j``) and
precedence ``p_t`` (DNC Methods, "Temporal memory linkage")::

    L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j],   L_t[i, i] = 0
    p_t       = (1 - Σ_i w[i]) p_{t-1} + w

are kept sparse: every row ``i`` of ``L`` stores its ``K_L`` = ``temporal_reads`` strongest
entries (values and column indices, ``[B, N, K_L]``), and so does every row ``j`` of the
transpose ``Lᵀ`` (the backward links, ``Lᵀ[j, i] = L[i, j]``); ``p`` keeps its ``K_L`` largest
entries (values and indices, ``[B, K_L]``). No ``N×N`` tensor exists anywhere.

With ``w = w^W_t`` sparse (``J`` entries), one step touches only:

- the written rows ``i ∈ supp(w)`` of ``L`` (decay ``1 - w[i] - w[j]`` and new entries
  ``w[i] p[j]``, ``j ∈ supp(p)``), and the rows that link *to* a written row (entries ``L[i, j]``,
  ``j ∈ supp(w)``, decay by ``1 - w[j]``), found through ``Lᵀ``'s written rows;
- symmetrically the rows ``supp(w) ∪ supp(p)`` of ``Lᵀ`` and those found through ``L``'s written
  rows.

Each touched row keeps the ``K_L`` largest of its decayed entries and its new candidates. When no
row ever holds more than ``K_L`` non-zeros (e.g. ``K_L ≥ N - 1``) this is exactly the dense DNC
link; otherwise it is the paper's top-``K_L`` approximation, and an entry ``L[i, j]`` that row
``i`` keeps but row ``j`` of ``Lᵀ`` dropped misses the decay ``1 - w[j]`` (a second-order
approximation of already-weak links; tests check the exact case).

Reads through the links (DNC: ``f_t = L_t w^R_{t-1}``, ``b_t = L_tᵀ w^R_{t-1}``) gather the
``Lᵀ`` (forward) and ``L`` (backward) rows of the previous read weighting's rows and keep the top
``K``: ``O(K·K_L)`` per head.

:class:`SparseLinkStep` updates the four ``[B, N, K_L]`` link tensors in place (as
:class:`~memagents.cores.sparse_access.SparseAccessStep` does the memory), saves only the touched
rows before the update, and in backward recomputes the row update from them, so a step touches
``U = O(J·K_L)`` rows and costs ``O(U·K_L·(K_L + J))`` time and ``O(U·K_L)`` saved memory,
independent of ``N``. Stored row indices are unique within
a row and never on the diagonal; empty entries are zero-valued entries at distinct columns.

**Native path.** :func:`temporal_step` is one step's temporal work: the link update, ``p_t`` and
both link reads. On CPU float tensors it is one call of the kernel ``csrc/sparse_links.cpp``
forward and one backward (:func:`native_forward`, :func:`native_backward`,
:class:`NativeTemporalStep`), which enumerates each element's touched rows once, updates each of
them once (loops over its ``K_L`` old entries and, only when its own factor ``w[i]`` / ``p[j]``
is non-zero, its ``K_L`` / ``J`` candidates) and saves exactly those rows; the link indices stay
in the value dtype (exact integers below ``2^24``), as the state stores them. Otherwise it
composes the torch functions of this module, which are the reference: same equations, same
order of products and sums (the kernel is built without fused multiply-adds), same stable
tie-breaking, so tests compare values, selected indices and gradients in float64 to ~1e-12. The
torch path costs hundreds of small ops per step (the ``[U·K_L, J]`` equality tables of
:func:`lookup`, a sort per top-``K_L``, the autograd re-run of the row update in backward).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from memagents.cores import native
from memagents.cores.sparse_access import _flat_rows, _p, zero_buffer


def initial_link_indices(
    batch_size: int, memory_size: int, temporal_reads: int, device=None, dtype=torch.long
) -> Tensor:
    """``[B, N, K_L]`` (long, or exact integers in ``dtype``): the distinct, off-diagonal columns
    ``(i + 1 + k) mod N`` that the zero-valued entries of an empty link row ``i`` point at (one
    cached ``[N, K_L]`` pattern, broadcast over the batch: read-only)."""
    pattern = _link_pattern(memory_size, temporal_reads, torch.device(device or "cpu"), dtype)
    return pattern.expand(batch_size, memory_size, temporal_reads)


@functools.lru_cache(maxsize=16)
def _link_pattern(N: int, temporal_reads: int, device: torch.device, dtype) -> Tensor:
    rows = torch.arange(N, device=device).unsqueeze(1)
    return ((rows + 1 + torch.arange(temporal_reads, device=device)) % N).to(dtype)


def reset_rows(
    values: tuple[Tensor, ...], indices: tuple[Tensor, ...], rows: Tensor, elements: Tensor
) -> None:
    """Restart the links of the elements ``elements`` (``[n]`` long) by rewriting only the rows
    marked in ``rows`` (``[len(values), B, N]`` bool: the rows each link has had rewritten since
    the element's episode began; cleared here) to an empty row: zero values at the columns of
    :func:`initial_link_indices`. The other rows are empty already. ``O(marked rows · K_L)``
    instead of the ``O(N·K_L)`` of a whole restart.

    :param values: the link values ``[B, N, K_L]`` (``L``, ``Lᵀ``), contiguous, in place.
    :param indices: their column indices, the same shapes and order.
    """
    if not elements.numel():
        return
    B, N, L = values[0].shape
    for k, (vals, idx) in enumerate(zip(values, indices, strict=True)):
        at = rows[k].index_select(0, elements).nonzero()  # (position in elements, row)
        flat = elements.index_select(0, at[:, 0]) * N + at[:, 1]
        pattern = _link_pattern(N, L, vals.device, idx.dtype)
        vals.view(B * N, L).index_fill_(0, flat, 0.0)
        idx.view(B * N, L).index_copy_(0, flat, pattern.index_select(0, at[:, 1]))
        rows[k].index_fill_(0, elements, False)


def initial_precedence_indices(batch_size: int, temporal_reads: int, device=None) -> Tensor:
    """``[B, K_L]`` long: the distinct rows ``0..K_L-1`` of the zero-valued empty precedence."""
    return torch.arange(temporal_reads, device=device).expand(batch_size, temporal_reads)


def lookup(query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """The dense value at row ``query`` of a sparse vector given as (``keys``, ``values``) pairs
    (duplicate keys add up).

    :param query: ``[B, ...]`` long rows.
    :param keys: ``[B, M]`` long rows of the sparse vector's entries.
    :param values: ``[B, M]`` their values.
    :return: ``[B, ...]`` values.
    """
    B = query.shape[0]
    eq = (query.reshape(B, -1, 1) == keys.unsqueeze(1)).to(values.dtype)  # [B, Q, M]
    return torch.einsum("bqm,bm->bq", eq, values).view(query.shape)


def first_occurrence(indices: Tensor) -> Tensor:
    """``[..., M]`` bool: True where ``indices[..., m]`` does not occur at an earlier position."""
    ordered, order = indices.sort(dim=-1, stable=True)  # equal indices keep their order
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return torch.empty_like(first).scatter_(-1, order, first)


def _select_top(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest scores along the last dim (stable: earlier wins ties)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _merge(
    existing: Tensor, existing_idx: Tensor, cand: Tensor, cand_idx: Tensor, cand_ok: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate existing entries (unique indices, values ≥ 0) and candidates; candidates that
    repeat an existing index or are not ``cand_ok`` get value 0 and score -1 (never selected
    over the existing entries, so selected indices stay unique)."""
    cand_ok = cand_ok & ~(cand_idx.unsqueeze(-1) == existing_idx.unsqueeze(-2)).any(-1)
    cand = cand * cand_ok
    values = torch.cat([existing, cand], dim=-1)
    indices = torch.cat([existing_idx, cand_idx], dim=-1)
    scores = torch.cat([existing.detach(), torch.where(cand_ok, cand.detach(), -1.0)], dim=-1)
    return values, indices, scores


def sparse_precedence_update(
    precedence: Tensor, precedence_idx: Tensor, write_weights: Tensor, write_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """``p_t = (1 - Σ w) p_{t-1} + w``, keeping the ``K_L`` largest entries.

    :param precedence: ``[B, K_L]`` values of ``p_{t-1}``; ``precedence_idx`` ``[B, K_L]`` long,
        their (distinct) rows.
    :param write_weights: ``[B, J]`` ``w^W_t``; ``write_idx`` ``[B, J]`` long (duplicates add up).
    :return: ``(values [B, K_L], indices [B, K_L] long)`` of ``p_t``.
    """
    k = precedence.shape[-1]
    total = write_weights.sum(-1, keepdim=True)
    existing = (1.0 - total) * precedence + lookup(precedence_idx, write_idx, write_weights)
    cand = lookup(write_idx, write_idx, write_weights)  # merged w at each write entry
    values, indices, scores = _merge(
        existing, precedence_idx, cand, write_idx, first_occurrence(write_idx)
    )
    sel = _select_top(scores, k)
    return values.gather(-1, sel), indices.gather(-1, sel)


def _link_row_candidates(
    old: Tensor,
    old_idx: Tensor,
    rows: Tensor,
    write_weights: Tensor,
    write_idx: Tensor,
    precedence: Tensor,
    precedence_idx: Tensor,
    transpose: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidate entries of the updated rows ``rows`` of ``L`` (or ``Lᵀ``): their decayed
    entries and the new ``w[i] p[j]`` ones.

    :param old: ``[B, U, K_L]`` the rows' values before the step; ``old_idx`` their columns.
    :param rows: ``[B, U]`` long, the row numbers.
    :return: ``(values, indices, scores)``, each ``[B, U, K_L + C]``.
    """
    w_row = lookup(rows, write_idx, write_weights)  # [B, U]
    w_col = lookup(old_idx, write_idx, write_weights)  # [B, U, K_L]
    decayed = (1.0 - w_row.unsqueeze(-1) - w_col) * old
    U = rows.shape[1]
    if not transpose:  # row i of L: + w[i] p[j]
        existing = decayed + w_row.unsqueeze(-1) * lookup(old_idx, precedence_idx, precedence)
        cand = w_row.unsqueeze(-1) * precedence.unsqueeze(1)  # [B, U, K_L]: columns supp(p)
        cand_idx = precedence_idx.unsqueeze(1).expand(-1, U, -1)
        ok = torch.ones_like(cand_idx, dtype=torch.bool)
    else:  # row j of Lᵀ: + w[i] p[j]
        p_row = lookup(rows, precedence_idx, precedence)  # [B, U]
        existing = decayed + w_col * p_row.unsqueeze(-1)
        w_merged = lookup(write_idx, write_idx, write_weights)  # [B, J]
        cand = w_merged.unsqueeze(1) * p_row.unsqueeze(-1)  # [B, U, J]: entries supp(w)
        cand_idx = write_idx.unsqueeze(1).expand(-1, U, -1)
        ok = first_occurrence(write_idx).unsqueeze(1).expand(-1, U, -1)
    ok = ok & (cand_idx != rows.unsqueeze(-1))  # L[i, i] = 0
    return _merge(existing, old_idx, cand, cand_idx, ok)


class SparseLinkStep(torch.autograd.Function):
    """One step of the sparse temporal links, written in place, then the link rows a read needs.

    Inputs: ``link``, ``link_t`` ``[B, N, K_L]`` values of ``L`` and ``Lᵀ`` (contiguous,
    modified in place), ``write_weights [B, J]`` ``w^W_t``, ``precedence [B, K_L]`` ``p_{t-1}``,
    then non-differentiable ``link_idx``, ``link_t_idx`` ``[B, N, K_L]`` long (modified in
    place), ``write_idx [B, J]`` long, ``precedence_idx [B, K_L]`` long, ``read_idx [B, Q]`` long
    (rows whose updated ``L`` and ``Lᵀ`` rows are returned), ``reset`` ``[n]`` long elements whose
    links are emptied first, ``owns_grad`` (as in ``SparseAccessStep``).

    Outputs: ``link``, ``link_t`` (the same tensors), ``rows [B, Q, K_L]``, ``rows_idx`` (long),
    ``rows_t [B, Q, K_L]``, ``rows_t_idx`` (long): rows ``read_idx`` of ``L_t`` and ``L_tᵀ``.

    Saves the touched rows before the update (``O(J·K_L)`` rows of ``K_L``); backward recomputes
    their update from them and passes the one dense gradient buffer of each link on.
    """

    @staticmethod
    def forward(
        ctx, link, link_t, write_weights, precedence,
        link_idx, link_t_idx, write_idx, precedence_idx, read_idx, reset, owns_grad,
    ):  # fmt: skip
        B, N, L = link.shape
        if reset.numel():
            init = initial_link_indices(reset.numel(), N, L, link.device)
            for values, idx in ((link, link_idx), (link_t, link_t_idx)):
                values.index_fill_(0, reset, 0.0)
                idx.index_copy_(0, reset, init)
        flat_vals = (link.view(B * N, L), link_t.view(B * N, L))
        flat_idx = (link_idx.view(B * N, L), link_t_idx.view(B * N, L))
        write_flat = _flat_rows(write_idx, N)
        # touched rows, from the links before the update (duplicates allowed)
        rows_l = torch.cat([write_idx, flat_idx[1][write_flat].view(B, -1)], dim=1)
        rows_t = torch.cat([write_idx, precedence_idx, flat_idx[0][write_flat].view(B, -1)], dim=1)
        saved = []
        for transpose, rows in ((False, rows_l), (True, rows_t)):
            vals, idx = flat_vals[transpose], flat_idx[transpose]
            row_flat = _flat_rows(rows, N)
            old = vals[row_flat].view(B, -1, L)
            old_idx = idx[row_flat].view(B, -1, L)
            values, indices, scores = _link_row_candidates(
                old, old_idx, rows, write_weights, write_idx, precedence, precedence_idx, transpose
            )
            sel = _select_top(scores, L)
            # duplicate rows compute the same new row, so the in-place copy is well defined
            vals.index_copy_(0, row_flat, values.gather(-1, sel).view(-1, L))
            idx.index_copy_(0, row_flat, indices.gather(-1, sel).view(-1, L))
            saved += [rows, row_flat, old, old_idx, sel, first_occurrence(rows)]
        read_flat = _flat_rows(read_idx, N)
        outs = []
        for transpose in (False, True):
            outs.append(flat_vals[transpose][read_flat].view(B, -1, L))
            outs.append(flat_idx[transpose][read_flat].view(B, -1, L))

        ctx.shape = (B, N, L)
        ctx.owns_grad = owns_grad
        ctx.save_for_backward(
            *saved, write_weights, write_idx, precedence, precedence_idx, read_flat, reset
        )
        ctx.mark_dirty(link, link_t)
        ctx.mark_non_differentiable(outs[1], outs[3])
        return link, link_t, *outs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_link, g_link_t, g_rows, _g_ri, g_rows_t, _g_rti):
        B, N, L = ctx.shape
        *saved, write_weights, write_idx, precedence, precedence_idx, read_flat, reset = (
            ctx.saved_tensors
        )
        g_write = torch.zeros_like(write_weights)
        g_prec = torch.zeros_like(precedence)
        grads = []
        for transpose, g_in, g_read in ((False, g_link, g_rows), (True, g_link_t, g_rows_t)):
            rows, row_flat, old, old_idx, sel, first = saved[6 * transpose : 6 * transpose + 6]
            if ctx.owns_grad and g_in.is_contiguous():
                g = g_in
            else:
                g = g_in.clone(memory_format=torch.contiguous_format)
            g_flat = g.view(B * N, L)
            g_flat.index_add_(0, read_flat, g_read.reshape(-1, L))
            g_new = g_flat[row_flat].view(B, -1, L) * first.unsqueeze(-1)  # count each row once
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(True) for t in (old, write_weights, precedence)]
                values, _, _ = _link_row_candidates(
                    inputs[0], old_idx, rows, inputs[1], write_idx, inputs[2], precedence_idx,
                    transpose,
                )  # fmt: skip
                g_old, g_w, g_p = torch.autograd.grad(
                    values.gather(-1, sel), inputs, g_new, allow_unused=True
                )
            g_flat.index_fill_(0, row_flat, 0.0)
            g_flat.index_add_(0, row_flat, g_old.reshape(-1, L))
            if g_w is not None:
                g_write += g_w
            if g_p is not None:
                g_prec += g_p
            if reset.numel():
                g.index_fill_(0, reset, 0.0)
            grads.append(g)
        return (grads[0], grads[1], g_write, g_prec) + (None,) * 7


def directional_read(
    prev_weights: Tensor, prev_idx: Tensor, rows: Tensor, rows_idx: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Forward ``f_t = L_t w^R_{t-1}`` (from the rows of ``L_tᵀ``) or backward
    ``b_t = L_tᵀ w^R_{t-1}`` (from the rows of ``L_t``), keeping each head's ``k`` largest.

    :param prev_weights: ``[B, R, S]`` values of ``w^R_{t-1}``; ``prev_idx`` their rows (unused
        here beyond having selected ``rows``).
    :param rows: ``[B, R, S, K_L]`` the link rows at ``prev_idx``; ``rows_idx`` their columns.
    :param k: ``K``.
    :return: ``(values [B, R, k], indices [B, R, k] long)``; values ≥ 0 summing to ≤ 1 (the
        dense result restricted to its ``k`` largest rows).
    """
    del prev_idx
    B, R = prev_weights.shape[:2]
    cand = (prev_weights.unsqueeze(-1) * rows).reshape(B, R, -1)  # [B, R, S·K_L]
    cand_idx = rows_idx.reshape(B, R, -1)
    eq = (cand_idx.unsqueeze(-1) == cand_idx.unsqueeze(-2)).to(cand.dtype)
    merged = torch.einsum("brcd,brd->brc", eq, cand)  # duplicates add up
    first = first_occurrence(cand_idx)
    merged = merged * first
    sel = _select_top(torch.where(first, merged.detach(), -1.0), k)
    return merged.gather(-1, sel), cand_idx.gather(-1, sel)


def to_dense(values: Tensor, indices: Tensor, size: int) -> Tensor:
    """Scatter sparse rows ``[..., M]`` (values, long indices; duplicates add) into ``[..., size]``."""
    out = values.new_zeros(*values.shape[:-1], size)
    return out.scatter_add(-1, indices.long(), values)


# -- one temporal step: links, precedence and link reads ---------------------------------------------
def temporal_step(
    link: Tensor,
    link_t: Tensor,
    write_weights: Tensor,
    precedence: Tensor,
    read_weights: Tensor,
    link_idx: Tensor,
    link_t_idx: Tensor,
    write_idx: Tensor,
    precedence_idx: Tensor,
    read_idx: Tensor,
    reset: Tensor,
    owns_grad: bool,
    k: int,
) -> tuple[Tensor, ...]:
    """The SDNC's temporal-link work of one step: ``L_t`` (:class:`SparseLinkStep`, in place),
    ``p_t`` (:func:`sparse_precedence_update`), then ``b_t = L_tᵀ w^R_{t-1}`` and
    ``f_t = L_t w^R_{t-1}`` (:func:`directional_read`, from the rows of ``L_t`` and ``L_tᵀ`` at
    the rows of ``w^R_{t-1}``).

    On CPU float tensors with the native kernel (``csrc/sparse_links.cpp``) this is one kernel
    call forward (:class:`NativeTemporalStep` when a gradient is needed) and one backward;
    otherwise the torch functions above, which are the reference (same values, indices,
    tie-breaking and gradients; tests compare both in float64).

    :param link: ``[B, N, K_L]`` values of ``L_{t-1}``; ``link_t`` of ``L_{t-1}ᵀ`` (contiguous,
        owned by the caller: modified in place).
    :param write_weights: ``[B, J]`` ``w^W_t``; ``write_idx`` ``[B, J]`` long (duplicates add).
    :param precedence: ``[B, K_L]`` ``p_{t-1}``; ``precedence_idx`` ``[B, K_L]`` long, distinct.
    :param read_weights: ``[B, R, S]`` ``w^R_{t-1}``; ``read_idx`` ``[B, R, S]`` long.
    :param link_idx: ``[B, N, K_L]`` columns of ``L`` (``link_t_idx``: of ``Lᵀ``), contiguous,
        modified in place; in the dtype :func:`index_dtype` gives (others work, through a
        converted copy).
    :param reset: ``[n]`` long batch elements whose links are emptied first.
    :param owns_grad: as in :class:`SparseLinkStep`.
    :param k: ``K``, entries kept per head by each link read (``K ≤ S·K_L``).
    :return: ``(link, link_t, p_t [B, K_L], p_t's rows [B, K_L] long, dir [B, R, 2K],
        dir_idx [B, R, 2K] long)`` with ``dir = [b_t | f_t]`` per head.
    """
    lib = native_kernel()
    tensors = (link, link_t, write_weights, precedence, read_weights)
    use_native = lib is not None and usable(*tensors)
    wanted = link.dtype if use_native else torch.long
    if link_idx.dtype != wanted or link_t_idx.dtype != wanted:  # through converted copies
        idx = [t.to(wanted, memory_format=torch.contiguous_format) for t in (link_idx, link_t_idx)]
        out = temporal_step(
            link, link_t, write_weights, precedence, read_weights, *idx, write_idx,
            precedence_idx, read_idx, reset, owns_grad, k,
        )  # fmt: skip
        link_idx.copy_(idx[0])
        link_t_idx.copy_(idx[1])
        return out
    if use_native:
        indices = (link_idx, link_t_idx, write_idx, precedence_idx, read_idx, reset)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return NativeTemporalStep.apply(*tensors, *indices, owns_grad, k, lib)
        return (link, link_t, *native_forward(lib, *tensors, *indices, k, save=False)[:4])
    B, R, S = read_weights.shape
    KL = link.shape[-1]
    link, link_t, rows, rows_idx, rows_t, rows_t_idx = SparseLinkStep.apply(
        link, link_t, write_weights, precedence, link_idx, link_t_idx, write_idx,
        precedence_idx, read_idx.flatten(1), reset, owns_grad,
    )  # fmt: skip
    prec, prec_idx = sparse_precedence_update(precedence, precedence_idx, write_weights, write_idx)
    bwd_w, bwd_idx = directional_read(
        read_weights, read_idx, rows.view(B, R, S, KL), rows_idx.view(B, R, S, KL), k
    )
    fwd_w, fwd_idx = directional_read(
        read_weights, read_idx, rows_t.view(B, R, S, KL), rows_t_idx.view(B, R, S, KL), k
    )
    dir_w = torch.cat([bwd_w, fwd_w], dim=-1)
    return link, link_t, prec, prec_idx, dir_w, torch.cat([bwd_idx, fwd_idx], dim=-1)


def index_dtype(link: Tensor) -> torch.dtype:
    """The dtype :func:`temporal_step` keeps the link indices in for link values ``link``: the
    values' own dtype on the native path (exact integers: float32 holds every row below 2^24,
    and the state stores them so), else long."""
    if native_kernel() is not None and usable(link):
        return link.dtype
    return torch.long


_UNLOADED = object()
_lib = _UNLOADED


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
#: the entry points of ``csrc/sparse_links.cpp`` (``_*``: the float32 and float64 variants).
SIGNATURES: dict[str, native.Signature] = {
    # sizes, tensors, n_reset, outputs, cap, saved buffers; returns the touched rows
    "sdnc_links_forward_*": (
        [_i64] * 7 + [_ptr] * 11 + [_i64] + [_ptr] * 4 + [_i64] + [_ptr] * 3,
        _i64,
    ),
    "sdnc_links_backward_*": ([_i64] * 7 + [_ptr] * 11 + [_i64] + [_ptr] * 5, None),
    "sdnc_mix_forward_*": ([_i64] * 4 + [_ptr] * 10, None),
    "sdnc_mix_backward_*": ([_i64] * 4 + [_ptr] * 12, None),
    "sdnc_head_forward_*": ([_i64] * 4 + [_ptr] * 11, None),
    "sdnc_head_backward_*": ([_i64] * 4 + [_ptr] * 13, None),
    "sdnc_lstm_forward_*": ([_i64] * 2 + [_ptr] * 5 + [_i64], None),
    "sdnc_lstm_backward_*": ([_i64] * 2 + [_ptr] * 7, None),
}


def native_kernel() -> ctypes.CDLL | None:
    """The kernel library of ``csrc/sparse_links.cpp`` with its signatures set, or ``None``
    (native kernels off or unbuildable: the torch paths run); loaded once per process. Tests
    monkeypatch this."""
    global _lib
    if _lib is _UNLOADED:
        _lib = native.load("sparse_links", SIGNATURES)
    return _lib


def usable(*tensors: Tensor) -> bool:
    """:func:`memagents.cores.native.usable` with fewer Python calls (it runs every step)."""
    dtype = tensors[0].dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return False
    return all(t.is_cpu and t.dtype is dtype for t in tensors)


def saved_sizes(B: int, L: int, R: int, S: int, K: int, cap: int) -> tuple[int, int]:
    """Lengths of the int32 and the value buffer a recorded forward saves (``struct Saved`` of
    the kernel): ``cap``, then up to ``cap`` touched rows over all elements and both links (row number, old
    values and columns, selected positions) with their counts, the precedence's selected
    positions, and per head the ``S`` link rows each read used (values, columns) and its
    selected positions."""
    n_i32 = 1 + 2 * B + cap * (1 + 2 * L) + B * L + 2 * B * R * S * L + 2 * B * R * K
    return n_i32, cap * L + 2 * B * R * S * L


#: Rows the last recorded steps of each shape touched (their saved buffers are sized by it, and
#: grown when a step needs more; the kernel reports the count before writing anything).
_row_capacity: dict[tuple[int, ...], int] = {}


def native_forward(
    lib, link, link_t, write_weights, precedence, read_weights,
    link_idx, link_t_idx, write_idx, precedence_idx, read_idx, reset, k, save, touched=None,
):  # fmt: skip
    """One kernel call: updates the links in place and returns ``(p_t, p_t idx, dir, dir_idx,
    saved int32 buffer, saved value buffer)`` (the buffers ``None`` unless ``save``).
    ``touched`` (``[2, B, N]`` bool or uint8, contiguous): set to 1 at the rows of ``L`` (``[0]``)
    and of ``Lᵀ`` (``[1]``) the step rewrites (the others keep their values and columns)."""
    B, N, L = link.shape
    J, R, S = write_idx.shape[1], read_idx.shape[1], read_idx.shape[2]
    if S * L < k or L >= N:
        raise ValueError(f"link reads need K <= S·K_L and K_L < N; got S={S}, K_L={L}, K={k}")
    for t in (link, link_t, link_idx, link_t_idx):
        if not t.is_contiguous():
            raise ValueError("the link tensors are updated in place and must be contiguous")
    ins = (write_weights, write_idx, precedence, precedence_idx, read_weights, read_idx, reset)
    w, w_idx, p, p_idx, rw, r_idx, reset = (t.contiguous() for t in ins)
    dtype = link.dtype
    p_out = torch.empty(B, L, dtype=dtype)
    dir_w = torch.empty(B, R, 2 * k, dtype=dtype)
    p_out_idx = torch.empty(B, L, dtype=torch.long)
    dir_idx = torch.empty(B, R, 2 * k, dtype=torch.long)
    fn = native.kernel(lib, "sdnc_links_forward", link.dtype)
    args = (
        B, N, L, J, R, S, k,
        link.data_ptr(), link_t.data_ptr(), link_idx.data_ptr(), link_t_idx.data_ptr(),
        w.data_ptr(), w_idx.data_ptr(), p.data_ptr(), p_idx.data_ptr(), rw.data_ptr(),
        r_idx.data_ptr(), reset.data_ptr(), reset.numel(),
        p_out.data_ptr(), p_out_idx.data_ptr(), dir_w.data_ptr(), dir_idx.data_ptr(),
    )  # fmt: skip
    mark = None if touched is None else touched.data_ptr()
    if not save:
        fn(*args, 0, None, None, mark)
        return p_out, p_out_idx, dir_w, dir_idx, None, None
    key = (B, N, L, J, R, S, k)
    cap = _row_capacity.get(key, 2 * B * min(N, 64))
    while True:
        n_i32, n_t = saved_sizes(B, L, R, S, k, cap)
        saved_i32 = torch.empty(n_i32, dtype=torch.int32)
        saved_t = torch.empty(n_t, dtype=dtype)
        needed = fn(*args, cap, saved_i32.data_ptr(), saved_t.data_ptr(), mark)
        if needed <= cap:
            break
        cap = _row_capacity[key] = needed + needed // 4  # nothing was written but resets
    return p_out, p_out_idx, dir_w, dir_idx, saved_i32, saved_t


class NativeTemporalStep(torch.autograd.Function):
    """:func:`temporal_step` as one native kernel call forward and one backward.

    Forward updates ``L`` and ``Lᵀ`` in place (each touched row once), then ``p_t`` and the two
    link reads, and saves per batch element the touched rows before the update (at most
    ``U = J·(1 + K_L) + K_L`` rows per link: ``O(U·K_L)``), the positions each top-``K_L`` and
    top-``K`` selected, and the ``R·S`` link rows each read used (``O(R·S·K_L)``). Backward
    recomputes the rows' gradients from them and passes the dense link-gradient buffers on in
    place, as :class:`SparseLinkStep` does.
    """

    @staticmethod
    def forward(
        ctx, link, link_t, write_weights, precedence, read_weights,
        link_idx, link_t_idx, write_idx, precedence_idx, read_idx, reset, owns_grad, k, lib,
    ):  # fmt: skip
        p_out, p_out_idx, dir_w, dir_idx, saved_i32, saved_t = native_forward(
            lib, link, link_t, write_weights, precedence, read_weights,
            link_idx, link_t_idx, write_idx, precedence_idx, read_idx, reset, k, save=True,
        )  # fmt: skip
        ctx.shape = (*link.shape, write_idx.shape[1], *read_idx.shape[1:], k)  # B N L J R S K
        ctx.owns_grad = owns_grad
        ctx.lib = lib
        ctx.save_for_backward(
            write_weights, write_idx, precedence, precedence_idx, read_weights, read_idx, reset,
            saved_i32, saved_t,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(link, link_t)
        ctx.mark_non_differentiable(p_out_idx, dir_idx)
        return link, link_t, p_out, p_out_idx, dir_w, dir_idx

    @staticmethod
    @once_differentiable
    def backward(ctx, g_link, g_link_t, g_p, _g_pi, g_dir, _g_di):
        w, w_idx, p, p_idx, rw, rw_idx, reset, saved_i32, saved_t = ctx.saved_tensors
        g_links, g_w, g_prec, g_rw = native_backward(
            ctx.lib, ctx.shape, ctx.owns_grad, g_link, g_link_t, g_p, g_dir,
            w, w_idx, p, p_idx, rw, rw_idx, reset, saved_i32, saved_t,
        )  # fmt: skip
        return (*g_links, g_w, g_prec, g_rw) + (None,) * 9


def native_backward(
    lib, shape, owns_grad, g_link, g_link_t, g_p, g_dir,
    w, w_idx, p, p_idx, rw, rw_idx, reset, saved_i32, saved_t,
):  # fmt: skip
    """The backward kernel call of :func:`native_forward` (``save=True``): from the gradients
    of ``L_t``, ``L_tᵀ`` (dense ``[B, N, K_L]`` buffers, passed on in place when owned), ``p_t``
    and ``[b_t | f_t]`` (any may be ``None``) to ``((dL/dL_{t-1}, dL/dL_{t-1}ᵀ), dL/dw^W,
    dL/dp_{t-1}, dL/dw^R_{t-1})``.

    :param shape: ``(B, N, K_L, J, R, S, K)``.
    """
    B, N, L, J, R, S, k = shape
    grads = []
    for g in (g_link, g_link_t):
        if g is None:
            g = zero_buffer((B, N, L), w.dtype)
        elif not (owns_grad and g.is_contiguous()):
            g = g.clone(memory_format=torch.contiguous_format)
        grads.append(g)
    g_p, g_dir = (None if g is None else g.contiguous() for g in (g_p, g_dir))
    g_w, g_prec, g_rw = torch.empty_like(w), torch.empty_like(p), torch.empty_like(rw)
    native.kernel(lib, "sdnc_links_backward", w.dtype)(
        B, N, L, J, R, S, k,
        *map(_p, (*grads, g_p, g_dir, w, w_idx, p, p_idx, rw, rw_idx, reset)),
        reset.numel(),
        *map(_p, (saved_i32, saved_t, g_w, g_prec, g_rw)),
    )  # fmt: skip
    return tuple(grads), g_w, g_prec, g_rw
