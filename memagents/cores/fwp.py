"""Fast weight programmers: linear attention as a memory of outer products (``"fwp"``).

Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight Programmers":
a *slow* network maps each input ``x^(i)`` to a key ``k^(i)``, a value ``v^(i)``, a query
``q^(i)`` and (for the delta rule) a learning rate ``β^(i)`` per head; these *program* a fast
weight matrix ``W^(i)`` per head, which is the recurrent state, and the output is what the
query retrieves from it::

    sum rule    W^(i) = W^(i-1) + v^(i) ⊗ φ'(k^(i))                                   (linear attention)
    delta rule  W^(i) = W^(i-1) + β^(i) (v^(i) - W^(i-1) φ'(k^(i))) ⊗ φ'(k^(i)),  β^(i) = σ(W_β x^(i))
    read        y^(i) = W^(i) φ'(q^(i))

with ``a ⊗ b = a bᵀ``. The delta rule first retrieves the value ``v̄ = W φ'(k)`` currently bound
to the key and replaces a fraction ``β`` of it by the new value, so that the memory can correct a
binding instead of only adding to it (the sum rule's capacity limit, paper Sec. 4.1-4.2).

Two execution paths compute the same function (tested to 1e-4 in float32):

- the **step form** (:func:`fast_weight_step`): one update of ``W`` per time step; used for
  ``T = 1`` rollouts, for ``chunk_size = 1`` and for ``return_debug``;
- the **chunk form** (:func:`fast_weight_chunked`): Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length": the sequence is cut into chunks of ``C``
  steps; inside a chunk everything is matrix products (the delta rule's product of
  ``I - β k kᵀ`` factors in the WY/UT form, one triangular solve), and only the ``T / C`` chunk
  states are passed on sequentially.

Both the chunk form and the slow net's heads (feature map, normalisation, ``σ``) are autograd
Functions with hand-derived backward passes (:class:`_FastWeightChunks`, :class:`_SlowNetHeads`):
under plain autograd their backward passes were mostly glue (concatenations for splits, masks,
copies for transposes), several times the cost of the arithmetic. The heads run as one C++ kernel
call each way on CPU (``csrc/fwp_heads.cpp``, see :mod:`memagents.cores.native`), which also
writes the chunk form's block layout directly; elsewhere they run as torch ops. The plain-autograd
formulas (:func:`dpfp`, :func:`sum_normalise`, :func:`fast_weight_step`) stay the reference: tests
compare the Functions with them in float64.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memagents.cores import native
from memagents.cores.base import MemoryCore, check_positive_int

#: Update rules of the fast weights (``update`` kwarg).
UPDATES = ("sum", "delta")

#: Feature maps φ of keys and queries (``feature_map`` kwarg).
FEATURE_MAPS = ("elu1", "dpfp")

#: Lower bound of the sum in the sum normalisation; only reached by DPFP features that are all
#: zero (e.g. a zero key), which then map to the zero vector instead of 0 / 0.
NORM_EPS = 1e-6


class FWPState(NamedTuple):
    """State of the fast-weight core: one fast weight matrix per head."""

    fast_weights: Tensor  # [B, H, d_v, d_φ]  W^(i): maps a feature φ'(q) of size d_φ to a value


# -- feature maps ------------------------------------------------------------------------------


def elu1(x: Tensor) -> Tensor:
    """``φ(x) = ELU(x) + 1`` elementwise (Katharopoulos et al. 2020): positive, same size.

    :param x: ``[..., d_key]``.
    :return: ``[..., d_key]``, every entry > 0.
    """
    return F.elu(x) + 1.0


def dpfp(x: Tensor, nu: int = 1) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021, Sec. 5.3), before normalisation.

    With ``r = ReLU([x, -x])`` of size ``2 d_key`` (indices taken modulo ``2 d_key``)::

        φ_{2 d_key (i - 1) + j}(x) = r_j · r_{j + i},   i = 1..ν,  j = 1..2 d_key

    so ``φ(x)`` has ``d_φ = 2 d_key ν`` non-negative entries, block ``i`` holding the products of
    ``r`` with ``r`` rolled by ``i``. Most entries are zero, and the features of keys that point in
    different directions are nearly orthogonal. A key can map to the zero vector (with ``ν = 1``,
    one whose signs alternate, e.g. ``[1, -1, 1]``): it then neither writes nor reads.

    ``r`` and its rolls are computed as ``ReLU(x E_i)`` with the signed permutation matrices
    ``E_i [d_key, 2 d_key]`` (column ``j`` of ``E_i`` picks ``±x`` for entry ``j + i`` of
    ``[x, -x]``): one exact matrix product instead of concatenations and rolls along the last
    axis, which are slow on CPU and in the backward pass.

    :param x: ``[..., d_key]``.
    :param nu: ``ν`` in ``1 .. 2 d_key - 1``.
    :return: ``[..., 2 d_key ν]``, entries ≥ 0.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    E = torch.cat([eye, -eye], dim=1)  # [d, 2d]: x E = [x, -x]
    # E_i is E with its columns rolled left by i: (x E_i)_j = [x, -x]_{j + i}
    E_rolled = torch.cat([torch.roll(E, shifts=-i, dims=1) for i in range(1, nu + 1)], dim=1)
    # 2-D products on [M, d]: a batched [..., d] @ [d, n] product is far slower on CPU, and
    # separate products (rather than slices of one) keep slice gradients out of the backward
    flat = x.reshape(-1, d)
    r = F.relu(flat @ E)  # [M, 2d]
    r_rolled = F.relu(flat @ E_rolled).view(-1, nu, 2 * d)  # [M, ν, 2d], block i: r rolled by i
    return (r.unsqueeze(1) * r_rolled).view(*lead, 2 * d * nu)


def sum_normalise(phi: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``φ'(x) = φ(x) / Σ_j φ(x)_j`` (Schlag et al. 2021, Sec. 4.2, "normalisation").

    Both feature maps are non-negative, so this makes every key and query feature a vector of
    unit L1 norm. The paper applies it to keys *and* queries in place of linear attention's
    denominator ``z^(i) · φ(q^(i))`` with ``z^(i) = Σ_j φ(k^(j))``: that denominator is a sum over
    all past keys, which the delta rule (which also *removes* values) does not have, and without any
    normalisation the write strength ``φ(k)ᵀ φ(k)`` of the delta rule is unbounded and the update
    ``W (I - β φ(k) φ(k)ᵀ)`` can diverge. With ``‖φ'(k)‖₁ = 1`` and ``φ' ≥ 0``,
    ``‖φ'(k)‖₂² ≤ 1``, so for ``β ∈ (0, 1)`` each factor ``I - β φ' φ'ᵀ`` is a contraction and
    ``‖W φ'(q)‖`` is bounded by the largest stored value.

    :param phi: ``[..., d_φ]``, non-negative.
    :param eps: the sum is clamped below at ``eps`` (an all-zero DPFP feature stays zero).
    :return: ``[..., d_φ]`` with unit L1 norm (or zero).
    """
    return phi * phi.sum(dim=-1, keepdim=True).clamp_min(eps).reciprocal()


# -- the slow net's output layer, split into heads ---------------------------------------------


def slow_net_heads(
    z: Tensor,
    num_heads: int,
    key_size: int,
    value_size: int,
    feature_map: str,
    nu: int,
    delta: bool,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The slow net's output ``z = W_slow x`` split into what programs the fast weights.

    ``z``'s last axis is ``[k_1..k_H, q_1..q_H | v_1..v_H | β_1..β_H]`` (``β`` for the delta
    rule only): keys and queries go through ``φ'`` (the feature map, then
    :func:`sum_normalise`), values stay as they are, ``β = σ(·)``. The same function as
    ``sum_normalise(dpfp(k))`` (or :func:`elu1`), ``torch.sigmoid`` etc. under plain autograd,
    computed by :class:`_SlowNetHeads` with a hand-written backward pass (one native kernel call
    each way on CPU).

    :param z: ``[..., 2 H d_key + H d_v (+ H)]``; ``[T, B, ·]`` when ``chunk_size`` is given.
    :param chunk_size: ``None``: outputs in step layout, ``φ'(k)``, ``φ'(q)`` ``[..., H, d_φ]``,
        ``v [..., H, d_v]``, ``β [..., H]``. ``C``: outputs in the chunk layout of
        :func:`fast_weight_chunked` (``[N B H, C, d]`` and ``β [N B H, C, 1]``, steps padded with
        zeros to ``N = ⌈T / C⌉`` chunks), written there directly instead of copied.
    :return: ``φ'(k)``, ``φ'(q)``, ``v``, ``β`` (``None`` for the sum rule).
    """
    return _SlowNetHeads.apply(
        z, num_heads, key_size, value_size, feature_map, nu, delta, chunk_size
    )


def _features_forward(x: Tensor, feature_map: str, nu: int) -> tuple[Tensor, Tensor, Tensor]:
    """``φ'(x)``, the scale ``1 / max(Σ φ, eps)`` ``[..., 1]`` and ``Σ φ ≥ eps`` (torch path)."""
    if feature_map == "dpfp":
        r = torch.cat([x, -x], dim=-1).clamp_min_(0.0)  # ReLU([x, -x])
        phi = torch.cat([r * r.roll(-i, dims=-1) for i in range(1, nu + 1)], dim=-1)
    else:
        phi = elu1(x)
    total = phi.sum(dim=-1, keepdim=True)
    scale = total.clamp_min(NORM_EPS).reciprocal_()
    return phi.mul_(scale), scale, total >= NORM_EPS


def _features_backward(
    x: Tensor,
    features: Tensor,
    scale: Tensor,
    unclamped: Tensor,
    grad: Tensor,
    feature_map: str,
    nu: int,
) -> Tensor:
    """The gradient wrt ``x`` of ``φ'(x) = φ(x) / max(Σ φ(x), eps)`` given ``grad = dφ'``
    (torch path; the formulas are in :class:`_SlowNetHeads`)."""
    dot = torch.where(unclamped, (grad * features).sum(dim=-1, keepdim=True), 0.0)
    dphi = (grad - dot).mul_(scale)
    if feature_map == "elu1":
        return dphi.mul_(torch.where(x > 0, 1.0, torch.exp(x)))
    d = x.shape[-1]
    r = torch.cat([x, -x], dim=-1).clamp_min_(0.0)
    dr = torch.zeros_like(r)
    for i in range(1, nu + 1):  # φ_i = r ⊙ roll(r, -i): both factors get a gradient
        dphi_i = dphi[..., (i - 1) * 2 * d : i * 2 * d]
        dr += dphi_i * r.roll(-i, dims=-1)
        dr += (dphi_i * r).roll(i, dims=-1)
    # ReLU: no gradient at 0 (``where``, not a product with a bool mask: that is slow on CPU)
    return torch.where(x > 0, dr[..., :d], 0.0) - torch.where(x < 0, dr[..., d:], 0.0)


#: the entry points of ``csrc/fwp_heads.cpp`` (``_*``: the float32 and float64 variants).
HEADS_SIGNATURES: dict[str, native.Signature] = {
    "fwp_heads_forward_*": (
        [ctypes.c_void_p] * 2 + [ctypes.c_double] + [ctypes.c_void_p] * 5,
        None,
    ),
    "fwp_heads_backward_*": (
        [ctypes.c_void_p] * 2 + [ctypes.c_double] + [ctypes.c_void_p] * 7,
        None,
    ),
}


def _heads_kernel() -> ctypes.CDLL | None:
    """The compiled ``csrc/fwp_heads.cpp`` or ``None`` (see :func:`native.load`)."""
    return native.load("fwp_heads", HEADS_SIGNATURES)


def _heads_functions(lib: ctypes.CDLL, dtype: torch.dtype) -> tuple:
    """``(forward, backward)`` entry points of ``lib`` for ``dtype``."""
    return native.kernel(lib, "fwp_heads_forward", dtype), native.kernel(
        lib, "fwp_heads_backward", dtype
    )


def _longs(*values: int) -> ctypes.Array:
    return (ctypes.c_long * len(values))(*values)


class _SlowNetHeads(torch.autograd.Function):
    """:func:`slow_net_heads` with a hand-written backward pass.

    With ``r = ReLU([x, -x])``, ``φ_{i,j} = r_j r_{j+i}`` (DPFP, Schlag et al. 2021, Sec. 5.3)
    and ``φ' = c φ``, ``c = 1 / max(Σ φ, eps)`` (Sec. 4.2), given ``g = dφ'``::

        dφ   = c (g - [Σ φ ≥ eps] (g · φ'))
        dr_j = Σ_i dφ_{i,j} r_{j+i} + dφ_{i,j-i} r_{j-i}          (indices modulo 2 d_key)
        dx_j = dr_j [x_j > 0] - dr_{j+d_key} [x_j < 0]

    and for ``φ = ELU(x) + 1``, ``dx = dφ · (1 if x > 0 else exp(x))``; ``dβ = σ (1 - σ) g_β``.
    On CPU these are one pass over ``z`` each way (``csrc/fwp_heads.cpp``, which also writes the
    chunk layout directly); elsewhere a few elementwise torch ops instead of autograd's chain
    (two permutation products, ReLU, product, sum, clamp, division, splits and their concats).
    """

    @staticmethod
    def forward(ctx, z, num_heads, key_size, value_size, feature_map, nu, delta, chunk_size):
        H, Dk, Dv = num_heads, key_size, value_size
        d_phi = 2 * Dk * nu if feature_map == "dpfp" else Dk
        if chunk_size is None:  # step layout: T = all leading axes, B = 1
            lead = z.shape[:-1]
            T, B, C, N = math.prod(lead), 1, max(math.prod(lead), 1), 1
        else:
            T, B = z.shape[:2]
            C = min(chunk_size, T)
            N = math.ceil(T / C)
        ctx.config = (H, Dk, Dv, d_phi, feature_map, nu, delta, T, B, C, N, chunk_size)
        lib = _heads_kernel()
        ctx.native = lib is not None and native.usable(z)
        if ctx.native:
            z = z.contiguous()
            if chunk_size is None:
                shape = (*lead, H)
                beta = z.new_empty(shape) if delta else None
            else:  # [N B H, C, ·]; padded steps must be zero
                shape = (N * B * H, C)
                beta = z.new_zeros(*shape, 1) if delta else None
            new = z.new_zeros if N * C != T else z.new_empty
            k, q, v = new(*shape, d_phi), new(*shape, d_phi), new(*shape, Dv)
            forward, _ = _heads_functions(lib, z.dtype)
            strides = _longs(
                *_layout_strides(d_phi, chunk_size, B, H, C),
                *_layout_strides(Dv, chunk_size, B, H, C),
                *_layout_strides(1, chunk_size, B, H, C),
            )
            sizes = _longs(T, B, C, H, Dk, Dv, feature_map == "dpfp", nu, delta)
            out = [native.ptr(t) for t in (k, q, v)] + [native.ptr(beta) if delta else None]
            forward(native.ptr(z), sizes, NORM_EPS, *out, strides)
            ctx.save_for_backward(z, beta)
            return k, q, v, beta
        n_kq, n_v = 2 * H * Dk, H * Dv
        k, k_scale, k_unclamped = _features_forward(
            z[..., : n_kq // 2].unflatten(-1, (H, Dk)), feature_map, nu
        )
        q, q_scale, q_unclamped = _features_forward(
            z[..., n_kq // 2 : n_kq].unflatten(-1, (H, Dk)), feature_map, nu
        )
        v = z[..., n_kq : n_kq + n_v].unflatten(-1, (H, Dv)).clone()
        beta = torch.sigmoid(z[..., n_kq + n_v :]) if delta else None
        ctx.save_for_backward(z, beta, k, k_scale, k_unclamped, q, q_scale, q_unclamped)
        if chunk_size is not None:
            k, q, v = (_rows_to_chunks(a, N, C) for a in (k, q, v))
            beta = _rows_to_chunks(beta.unsqueeze(-1), N, C) if delta else None
        return k, q, v, beta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dk, dq, dv, dbeta):
        z, beta, *saved = ctx.saved_tensors
        H, Dk, Dv, d_phi, feature_map, nu, delta, T, B, C, N, chunk_size = ctx.config
        dz = torch.empty_like(z)
        if ctx.native:
            _, backward = _heads_functions(_heads_kernel(), z.dtype)
            dk, dq, dv = dk.contiguous(), dq.contiguous(), dv.contiguous()
            dbeta = dbeta.contiguous() if delta else None
            strides = _longs(
                *_layout_strides(1, chunk_size, B, H, C),
                *_layout_strides(d_phi, chunk_size, B, H, C),
                *_layout_strides(Dv, chunk_size, B, H, C),
                *_layout_strides(1, chunk_size, B, H, C),
            )
            sizes = _longs(T, B, C, H, Dk, Dv, feature_map == "dpfp", nu, delta)
            grads = [native.ptr(t) if t is not None else None for t in (dk, dq, dv, dbeta)]
            beta_ptr = native.ptr(beta) if delta else None
            backward(native.ptr(z), sizes, NORM_EPS, beta_ptr, *grads, strides, native.ptr(dz))
            return dz, None, None, None, None, None, None, None
        if chunk_size is not None:
            dk, dq, dv = (_chunks_to_rows(a, N, T, B, H) for a in (dk, dq, dv))
            dbeta = _chunks_to_rows(dbeta, N, T, B, H).squeeze(-1) if delta else None
        k, k_scale, k_unclamped, q, q_scale, q_unclamped = saved
        n_kq, n_v = 2 * H * Dk, H * Dv
        x_k = z[..., : n_kq // 2].unflatten(-1, (H, Dk))
        x_q = z[..., n_kq // 2 : n_kq].unflatten(-1, (H, Dk))
        dz[..., : n_kq // 2] = _features_backward(
            x_k, k, k_scale, k_unclamped, dk, feature_map, nu
        ).flatten(-2)
        dz[..., n_kq // 2 : n_kq] = _features_backward(
            x_q, q, q_scale, q_unclamped, dq, feature_map, nu
        ).flatten(-2)
        dz[..., n_kq : n_kq + n_v] = dv.flatten(-2)
        if delta:
            dz[..., n_kq + n_v :] = dbeta * beta * (1.0 - beta)
        return dz, None, None, None, None, None, None, None


def _layout_strides(d: int, chunk_size: int | None, B: int, H: int, C: int) -> tuple[int, ...]:
    """Strides ``(n, b, h, c)`` of the per-head vectors of size ``d`` in the step layout
    (``chunk_size`` ``None``: ``[T, H, d]`` with ``B = 1``, ``C = T``) or the chunk layout
    (``[N B H, C, d]``); step ``t`` is chunk ``n = t // C``, row ``c = t % C``."""
    if chunk_size is None:
        return (0, 0, d, H * d)
    return (B * H * C * d, H * C * d, C * d, d)


# -- the two execution paths -------------------------------------------------------------------


def fast_weight_step(
    W: Tensor, k: Tensor, v: Tensor, q: Tensor, beta: Tensor | None, update: str
) -> tuple[Tensor, Tensor]:
    """One step of the fast weights: update ``W`` with ``(k, v[, β])``, then read with ``q``.

    :param W: ``[B, H, d_v, d_φ]``, ``W^(i-1)``.
    :param k: ``[B, H, d_φ]``, the key feature ``φ'(k^(i))``.
    :param v: ``[B, H, d_v]``, the value ``v^(i)``.
    :param q: ``[B, H, d_φ]``, the query feature ``φ'(q^(i))``.
    :param beta: ``[B, H]``, ``β^(i)`` (delta rule only; ignored by the sum rule).
    :param update: ``"sum"`` or ``"delta"``.
    :return: ``y^(i) = W^(i) φ'(q^(i))`` ``[B, H, d_v]`` and ``W^(i)`` ``[B, H, d_v, d_φ]``.
    """
    if update == "delta":
        v_old = torch.einsum("bhvf,bhf->bhv", W, k)  # v̄ = W^(i-1) φ'(k)
        write = beta.unsqueeze(-1) * (v - v_old)  # β (v - v̄)
    else:
        write = v
    W = W + torch.einsum("bhv,bhf->bhvf", write, k)
    y = torch.einsum("bhvf,bhf->bhv", W, q)
    return y, W


def fast_weight_chunked(
    W: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    beta: Tensor | None,
    starts: Tensor | None,
    chunk_size: int,
    update: str,
) -> tuple[Tensor, Tensor]:
    """The recurrence of :func:`fast_weight_step` over ``T`` steps, in chunks of ``C`` steps.

    **Inside a chunk** starting from the state ``S``, with the chunk's key features, values and
    query features as rows ``K [C, d_φ]``, ``V [C, d_v]``, ``Q [C, d_φ]`` (Yang et al. 2024,
    Sec. 3):

    - Delta rule. The state after step ``t`` of the chunk is ``S_t = S P_t + H_t`` with
      ``P_t = Π_{i≤t} (I - β_i k_i k_iᵀ)``, which the WY representation writes as
      ``P_t = I - Σ_{i≤t} w_i k_iᵀ`` and ``H_t = Σ_{i≤t} u_i k_iᵀ``. Stacked as rows, the UT
      transform gives ``[Wy | U] = T diag(β) [K | V]`` with ``T = (I + A)^{-1}`` and
      ``A = strict_tril(diag(β) K Kᵀ)``. The "new values" ``Ũ = U - Wy Sᵀ`` (``u_i - S w_i``:
      what step ``i`` writes, given the state the chunk started from) are therefore
      ``Ũ = T diag(β) (V - K Sᵀ)``: one unit-lower-triangular solve per chunk with ``d_v``
      right-hand sides, and ``Wy`` is never formed.
    - Sum rule: ``P_t = I`` and ``H_t = Σ_{i≤t} v_i k_iᵀ``, i.e. ``Ũ = V``.

    Then, with the causal scores ``A_qk = tril(Q Kᵀ)`` (diagonal included: ``y_t`` reads
    ``S_t``)::

        O     = Q Sᵀ + A_qk Ũ                            [C, d_v]
        S_C   = S + Ũᵀ K                                 [d_v, d_φ]

    ``K Kᵀ`` and ``Q Kᵀ`` are batched products over all chunks; the ``T / C`` sequential steps
    only carry the state (``K Sᵀ``, the solve, ``Ũᵀ K``), and ``Q Sᵀ + A_qk Ũ`` runs batched over
    all chunks afterwards. The backward pass is written by hand (:class:`_FastWeightChunks`):
    the same structure in reverse, with solves by ``(I + A)ᵀ``.

    **Resets inside a chunk.** An episode start at step ``t`` sets the state to zero before step
    ``t``, so each chunk splits into segments (the steps between starts) that do not interact,
    and every segment but the first starts from zero instead of ``S``:

    - ``A`` and ``A_qk`` are masked to pairs ``(t, i)`` in the same segment, so that the UT
      transform and the intra-chunk outputs restart at every start;
    - ``Q Sᵀ`` and ``K Sᵀ`` are kept only in rows before the chunk's first start;
    - the next state keeps ``S`` only if the chunk has no start, and sums ``Ũᵀ K`` over the
      chunk's last segment only.

    With finite inputs this is exact. (Unlike the step form's ``torch.where`` reset, a NaN or inf
    of the ending episode in the same chunk can still reach the next one through a zero weight in
    a matrix product, ``0 · NaN``; the carried state itself is reset with ``torch.where``.)
    ``T`` need not be a multiple of ``C``: the last chunk is padded with zero keys, values,
    queries and ``β``, which change nothing.

    :param W: ``[B, H, d_v, d_φ]``, the state before step 0.
    :param k: ``[T, B, H, d_φ]``, key features ``φ'(k^(i))``.
    :param v: ``[T, B, H, d_v]``, values ``v^(i)``.
    :param q: ``[T, B, H, d_φ]``, query features ``φ'(q^(i))``.
    :param beta: ``[T, B, H]``, learning rates ``β^(i)`` (delta rule only).
    :param starts: ``[T, B]`` bool, True where step ``t`` begins an episode (the state is set
        to zero first); ``None`` for no resets.
    :param chunk_size: ``C`` ≥ 1.
    :param update: ``"sum"`` or ``"delta"``.
    :return: ``y [T, B, H, d_v]`` and the state after the last step ``[B, H, d_v, d_φ]``.
    """
    T = k.shape[0]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    K, Q, V = (_rows_to_chunks(a, N, C) for a in (k, q, v))
    b = _rows_to_chunks(beta.unsqueeze(-1), N, C) if update == "delta" else None
    return _chunked(W, K, Q, V, b, starts, T)


def _chunked(
    W: Tensor, K: Tensor, Q: Tensor, V: Tensor, b: Tensor | None, starts: Tensor | None, T: int
) -> tuple[Tensor, Tensor]:
    """:func:`fast_weight_chunked` on inputs in chunk layout (:func:`_rows_to_chunks`):
    ``K``, ``Q`` ``[N B H, C, d_φ]``, ``V [N B H, C, d_v]``, ``b`` (``β``) ``[N B H, C, 1]``
    (``None``: the sum rule), with ``T`` the number of steps before padding."""
    if starts is not None:
        starts = starts.bool()
        if not starts.any():
            starts = None  # the unmasked path
    return _FastWeightChunks.apply(W, K, Q, V, b, starts, T)


#: Size (in elements) of the C x C gradient blocks the chunk backward handles at once: small
#: enough to stay in a core's cache while four products read them (~3-8% faster than whole
#: chunks at the benchmark's B = 16, H = 4, C = 64, where a chunk's blocks take 2 MB).
CACHE_FLOATS = 1 << 17


class _ChunkMasks(NamedTuple):
    """Where the terms of a chunk apply, with ``G = B H`` (heads share their element's masks).

    ``qk``, ``solve`` and ``grad`` multiply ``[N G, ·, C]`` score matrices viewed as
    ``[N, B, H, ·, C]``; without episode starts ``qk`` and ``grad`` are ``[·, C]`` constants and
    the others are ``None``.
    """

    qk: Tensor  # [C, C] or [N, B, 1, C, C]: causal pairs in one segment (A_qk), float
    solve: Tensor | None  # [N, B, 1, C, C]: pairs in one segment (A), float
    grad: Tensor  # [2C, C] or [N, B, 1, 2C, C]: [-strict pairs (Γ); causal pairs (dA_qk)]
    carry: Tensor | None  # [N G, C, 1] bool: rows before the chunk's first start (read S)
    last: Tensor | None  # [N G, C, 1] float: rows in the chunk's last segment (write S)
    keep: Tensor | None  # [N, G, 1, 1] bool: the chunk has no start (keeps S)


@functools.lru_cache(maxsize=32)
def _causal_masks(C: int, dtype: torch.dtype, device: torch.device) -> _ChunkMasks:
    """The masks without episode starts: constants per chunk size (cached; never modified)."""
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()  # i ≤ t
    strict = causal.logical_not().mT  # i < t
    grad = torch.cat([-strict.to(dtype), causal.to(dtype)])
    return _ChunkMasks(causal.to(dtype), None, grad, None, None, None)


def _chunk_masks(
    starts: Tensor | None, T: int, B: int, H: int, N: int, C: int, dtype: torch.dtype, device
) -> _ChunkMasks:
    """The masks of :func:`fast_weight_chunked`'s chunks from ``starts [T, B]`` (or ``None``)."""
    if starts is None:
        return _causal_masks(C, dtype, torch.device(device))
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()  # i ≤ t
    strict = causal.logical_not().mT  # i < t
    if N * C != T:
        starts = F.pad(starts, (0, 0, 0, N * C - T), value=False)
    seg = starts.reshape(N, C, B).transpose(1, 2).long().cumsum(-1)  # [N, B, C] segment ids
    same = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(2)  # [N, B, 1, C, C]
    qk = (causal & same).to(dtype)
    grad = torch.cat([-(strict & same).to(dtype), qk], dim=-2)

    def rows(mask: Tensor) -> Tensor:  # [N, B, 1, R, 1] -> [N G, R, 1]
        return mask.expand(N, B, H, mask.shape[-2], 1).reshape(N * B * H, mask.shape[-2], 1)

    carry = (seg == 0).view(N, B, 1, C, 1)
    last = rows(same[..., -1, :].unsqueeze(-1)).to(dtype)
    keep = rows(carry[:, :, :, -1:]).view(N, B * H, 1, 1)
    return _ChunkMasks(qk, same.to(dtype), grad, rows(carry), last, keep)


def _mask_(x: Tensor, mask: Tensor, B: int, H: int) -> Tensor:
    """``x [N G, R, C] *= mask`` in place, ``mask`` ``[R, C]`` or ``[N, B, 1, R, C]``."""
    if mask.dim() == 2:
        return x.mul_(mask)
    x.view(-1, B, H, *x.shape[-2:]).mul_(mask)
    return x


def _rows_to_chunks(a: Tensor, N: int, C: int) -> Tensor:
    """``[T, B, H, d] -> [N B H, C, d]`` (chunk-major, zero padded to ``N C`` steps): a copy.
    Block ``(n, b, h)`` holds steps ``n C .. n C + C - 1`` of head ``h`` of element ``b``."""
    T = a.shape[0]
    if N * C != T:
        a = F.pad(a, (0, 0) * (a.dim() - 1) + (0, N * C - T))
    return a.reshape(N, C, -1, a.shape[-1]).transpose(1, 2).reshape(-1, C, a.shape[-1])


def _chunks_to_rows(a: Tensor, N: int, T: int, B: int, H: int) -> Tensor:
    """``[N B H, C, d] -> [T, B, H, d]``, the inverse of :func:`_rows_to_chunks`: a copy."""
    C, d = a.shape[-2:]
    return a.view(N, B * H, C, d).transpose(1, 2).reshape(N * C, B, H, d)[:T]


class _FastWeightChunks(torch.autograd.Function):
    """The chunk form of :func:`fast_weight_chunked` with a hand-written backward pass.

    Layout: the ``N`` chunks of the ``G = B H`` heads are ``N G`` independent ``C``-row blocks
    (chunk-major, so chunk ``n`` is the contiguous slice ``[n G, (n + 1) G)``), as
    :func:`_rows_to_chunks` and :func:`slow_net_heads` make them.

    Forward, per block: ``M = K (diag(β) K)ᵀ`` (masked to pairs in one segment). Its strict lower
    triangle is ``A' = diag(β)^-1 A diag(β)`` and, ``K Kᵀ`` being symmetric, its strict upper
    triangle is ``Aᵀ``, so both solves read this one matrix: ``(I + A) Ũ = diag(β) E`` with
    ``E = V - K Sᵀ`` is solved as ``(I + A') Ê = E``, ``Ũ = diag(β) Ê``.

    Backward of one chunk (rows and pairs masked as in the forward), from ``dO`` and ``dS_C``
    (the gradient of the state the chunk hands on), with ``R = diag(β) E``::

        dŨ  = A_qkᵀ dO + K dS_Cᵀ          dR = (I + A)^-T dŨ
        dE  = diag(β) dR = dV             dβ = rowsum(dR ⊙ Ê)
        Γ   = diag(β) dA = -strict(dE Ũᵀ) dA_qk = tril(dO Ũᵀ)        ([Γ; dA_qk]: one product)
        dS  = dS_C + dOᵀ Q - dEᵀ K        (the sequential part)
        dQ  = dO S + dA_qk K
        dK  = Ũ dS_C - dE S + dA_qkᵀ Q + (Γ + Γᵀ) K

    The chain rule gives ``dβ = rowsum(dR ⊙ E) + rowsum(dA ⊙ K Kᵀ)``; row ``i`` of
    ``(I + A) Ũ = diag(β) E`` says ``Σ_{j<i} (K Kᵀ)_ij Ũ_j = E_i - Ê_i``, so the second term is
    ``-dR_i · (E_i - Ê_i)`` and ``dβ = rowsum(dR ⊙ Ê)``, without a pass over ``C × C`` matrices.
    The sum rule: ``Ũ = V``, ``dV = dŨ``, no ``A``.
    """

    @staticmethod
    def forward(ctx, W0, K, Q, V, b, starts, T):
        B, H, Dv, Dk = W0.shape
        G = B * H
        C = K.shape[1]
        N = K.shape[0] // G
        delta = b is not None
        dtype, device = K.dtype, K.device
        masks = _chunk_masks(starts, T, B, H, N, C, dtype, device)
        K_last = K if masks.last is None else K * masks.last  # K on the last segment
        A_qk = _mask_(torch.bmm(Q, K.mT), masks.qk, B, H)  # [N G, C, C]
        if delta:
            bK = K * b  # diag(β) K
            # M = K Kᵀ diag(β): its strict lower triangle is A' = diag(β)^-1 A diag(β), its
            # strict upper triangle is Aᵀ (K Kᵀ is symmetric), the two solves' matrices
            M = torch.bmm(K, bK.mT)
            if masks.solve is not None:
                _mask_(M, masks.solve, B, H)
            E_hat = torch.empty(N * G, C, Dv, dtype=dtype, device=device)  # Ê = diag(β)^-1 Ũ
            written = E_hat
            bK_last = bK if masks.last is None else bK * masks.last  # Ũᵀ K = Êᵀ diag(β) K
        else:
            M = E_hat = bK = None
            written, bK_last = V, K_last  # Ũ = V
        # states[n]: S entering chunk n (states[N]: the final state)
        states = torch.empty(N + 1, G, Dv, Dk, dtype=dtype, device=device)
        states[0] = W0.reshape(G, Dv, Dk)
        for n in range(N):
            now = slice(n * G, (n + 1) * G)
            S = states[n]
            if delta:
                if masks.carry is None:
                    E = torch.baddbmm(V[now], K[now], S.mT, alpha=-1)  # V - K Sᵀ [G, C, d_v]
                else:
                    E = torch.bmm(K[now], S.mT).masked_fill_(~masks.carry[now], 0.0)
                    E = V[now] - E
                # (I + A) Ũ = diag(β) (V - K Sᵀ)  <=>  (I + A') Ê = V - K Sᵀ, Ũ = diag(β) Ê
                torch.linalg.solve_triangular(
                    M[now], E, upper=False, unitriangular=True, out=E_hat[now]
                )
            if masks.keep is not None:
                S = torch.where(masks.keep[n], S, 0.0)
            torch.baddbmm(S, written[now].mT, bK_last[now], out=states[n + 1])  # S + Ũᵀ K
        U = E_hat * b if delta else V  # Ũ
        S_final = states[N]
        states = states[:N].view(N * G, Dv, Dk)
        O = torch.bmm(Q, states.mT)  # Q Sᵀ [N G, C, d_v]
        if masks.carry is not None:
            O.masked_fill_(~masks.carry, 0.0)
        O.baddbmm_(A_qk, U)  # + A_qk Ũ
        ctx.save_for_backward(K, Q, b, bK, A_qk, M, U, E_hat, states, K_last)
        ctx.masks = masks
        ctx.T = T
        return _chunks_to_rows(O, N, T, B, H), S_final.reshape(W0.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dW):
        K, Q, b, bK, A_qk, M, U, E_hat, states, K_last = ctx.saved_tensors
        masks, T = ctx.masks, ctx.T
        B, H, Dv, Dk = dW.shape
        G = B * H
        C = K.shape[1]
        N = K.shape[0] // G
        delta = b is not None
        # [dE; dO] [N G, 2C, d_v] (the sum rule: dO only), dO from [T, B, H, d_v]
        dEO = U.new_empty(N * G, 2 * C if delta else C, Dv)
        dO = dEO[:, C:] if delta else dEO
        if N * C != T:
            dy = F.pad(dy, (0, 0) * 3 + (0, N * C - T))
        dO.view(N, G, C, Dv).copy_(dy.reshape(N, C, G, Dv).transpose(1, 2))
        dO_c = dO if masks.carry is None else dO * masks.carry
        # dS_all[n + 1]: the gradient of the state chunk n hands on (dS_all[0]: of W0)
        dS_all = torch.empty(N + 1, G, Dv, Dk, dtype=dW.dtype, device=dW.device)
        dS_all[N] = dW.reshape(G, Dv, Dk)
        dK, dQ = torch.empty_like(K), torch.empty_like(Q)
        if delta:
            dR = torch.empty_like(U)
            dE = dEO[:, :C]  # dV
            bK_c = bK if masks.carry is None else bK * masks.carry  # dEᵀ K = dRᵀ diag(β) K
        else:
            dE = torch.empty_like(U)  # dV = dŨ
        U_last = U if masks.last is None else U * masks.last
        grad_mask = masks.grad if delta else masks.qk
        per = max(1, CACHE_FLOATS // (H * grad_mask.shape[-2] * C))  # elements per part
        # chunk by chunk backwards; each chunk's C x C products are used while in cache
        for n in reversed(range(N)):
            now = slice(n * G, (n + 1) * G)
            dS_next = dS_all[n + 1]
            dU = torch.bmm(A_qk[now].mT, dO[now], out=None if delta else dE[now])  # A_qkᵀ dO
            dU.baddbmm_(K_last[now], dS_next.mT)  # dŨ = A_qkᵀ dO + K dS_Cᵀ
            dS = dS_next if masks.keep is None else torch.where(masks.keep[n], dS_next, 0.0)
            torch.baddbmm(dS, dO_c[now].mT, Q[now], out=dS_all[n])  # dS_C + dOᵀ Q
            if delta:
                # dR = (I + A)^-T dŨ: (I + A)ᵀ is the unit upper triangle of M
                torch.linalg.solve_triangular(
                    M[now], dU, upper=True, unitriangular=True, out=dR[now]
                )
                dS_all[n].baddbmm_(dR[now].mT, bK_c[now], alpha=-1)  # - dEᵀ K
                torch.mul(dR[now], b[now], out=dE[now])
            # the C x C part a few elements at a time, so that [Γ; dA_qk] stays in cache
            for b0 in range(0, B, per):
                b1 = min(B, b0 + per)
                part = slice(n * G + b0 * H, n * G + b1 * H)
                grads = torch.bmm(dEO[part], U[part].mT)  # [dE; dO] Ũᵀ [·, 2C, C]
                mask = grad_mask if grad_mask.dim() == 2 else grad_mask[n : n + 1, b0:b1]
                _mask_(grads, mask, b1 - b0, H)
                dA_qk = grads[:, C:] if delta else grads  # grads = [Γ; dA_qk]
                dK_p = torch.bmm(dA_qk.mT, Q[part], out=dK[part])  # dA_qkᵀ Q
                dQ_p = torch.bmm(dA_qk, K[part], out=dQ[part])  # dA_qk K
                if delta:
                    gamma = grads[:, :C]  # Γ = diag(β) dA
                    dK_p.baddbmm_(gamma.mT, K[part]).baddbmm_(gamma, K[part])  # + (Γ + Γᵀ) K
                    dE_c = dE[part] if masks.carry is None else dE[part] * masks.carry[part]
                    dK_p.baddbmm_(dE_c, states[part], alpha=-1)  # - dE S
                dK_p.baddbmm_(U_last[part], dS_next[b0 * H : b1 * H])  # + Ũ dS_C
                dQ_p.baddbmm_(dO_c[part], states[part])  # + dO S
        db = torch.linalg.vecdot(dR, E_hat).unsqueeze(-1) if delta else None  # rowsum(dR ⊙ Ê)
        return dS_all[0].reshape(dW.shape), dK, dQ, dE, db, None, None


# -- the core ----------------------------------------------------------------------------------


class FWPCore(MemoryCore):
    """Fast weight programmer core (Schlag et al. 2021) with the sum or the delta update rule.

    Per step, with ``H`` heads of key size ``d_key`` and value size ``d_v = d_key`` (as the
    paper's ``d_k = d_v``)::

        k, v, q, β = split(W_slow x^(i));   φ'(k) = φ(k) / Σ φ(k);   φ'(q) likewise;   β = σ(β)
        W^(i) = update(W^(i-1), φ'(k), v, β)            per head, see the module docstring
        y^(i) = W_o [W^(i)_1 φ'(q_1); ...; W^(i)_H φ'(q_H)] + b_o                 [hidden_size]

    ``W_slow`` is one linear layer (the slow net) producing all heads' ``k, q [d_key]``,
    ``v [d_v]`` and, for the delta rule only, ``β``. The fast weights start each episode at zero
    (nothing learned lives in the state). Sequences of ``T > 1`` steps run in the chunk-parallel
    form with chunks of ``chunk_size`` steps; ``T = 1``, ``chunk_size = 1`` and ``return_debug``
    run the step form. Both honour ``episode_starts`` at any step.

    :param input_size: features per step of ``x``.
    :param hidden_size: output width (the output projection ``W_o``'s size).
    :param num_heads: ``H``, independent fast weight matrices.
    :param key_size: ``d_key``, size of each head's key and query before the feature map, and
        ``d_v``, the size of each head's value.
    :param update: ``"delta"`` (default; delta rule with learned ``β``) or ``"sum"`` (linear
        attention: ``W += v ⊗ φ'(k)``, no ``β``).
    :param feature_map: ``"dpfp"`` (default; ``d_φ = 2 d_key ν``) or ``"elu1"``
        (``ELU + 1``, ``d_φ = d_key``); both sum-normalised, see :func:`sum_normalise`.
    :param chunk_size: ``C``, steps per chunk of the chunk-parallel form (default 64);
        1 runs every sequence in the step form.
    :param dpfp_nu: ``ν`` of DPFP, ``1 .. 2 d_key - 1`` (default 1; unused by ``"elu1"``).
    :raises ValueError: a value out of its allowed range, naming it and the allowed values.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        num_heads: int = 4,
        key_size: int = 16,
        update: str = "delta",
        feature_map: str = "dpfp",
        chunk_size: int = 64,
        dpfp_nu: int = 1,
    ):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.output_size = check_positive_int("hidden_size", hidden_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.key_size = check_positive_int("key_size", key_size)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if update not in UPDATES:
            raise ValueError(
                f"update must be one of {', '.join(map(repr, UPDATES))}; got {update!r}"
            )
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}; "
                f"got {feature_map!r}"
            )
        max_nu = 2 * key_size - 1
        if isinstance(dpfp_nu, bool) or not isinstance(dpfp_nu, int) or not 1 <= dpfp_nu <= max_nu:
            raise ValueError(
                f"dpfp_nu must be an integer in 1 .. 2 * key_size - 1 = {max_nu}; got {dpfp_nu!r}"
            )
        self.update = update
        self.feature_map = feature_map
        self.dpfp_nu = dpfp_nu
        self.value_size = key_size  # d_v
        self.feature_size = key_size * (2 * dpfp_nu if feature_map == "dpfp" else 1)  # d_φ
        H, Dk, Dv = num_heads, key_size, self.value_size
        self._split = [2 * H * Dk, H * Dv] + ([H] if update == "delta" else [])
        self.slow = nn.Linear(input_size, sum(self._split))  # W_slow: x -> [k | q], v[, β]
        self.out = nn.Linear(H * Dv, hidden_size)  # W_o

    def extra_repr(self) -> str:
        return (
            f"update={self.update!r}, feature_map={self.feature_map!r}, heads={self.num_heads}, "
            f"d_key={self.key_size}, d_phi={self.feature_size}, chunk_size={self.chunk_size}"
        )

    # -- state -------------------------------------------------------------------------------
    def initial_state(self, batch_size, device=None) -> FWPState:
        shape = (batch_size, self.num_heads, self.value_size, self.feature_size)
        return FWPState(torch.zeros(shape, device=self._device(device), dtype=self._dtype()))

    def state_shapes_tree(self) -> FWPState:
        return FWPState((self.num_heads, self.value_size, self.feature_size))

    # -- slow net ----------------------------------------------------------------------------
    def _program(
        self, x: Tensor, chunk_size: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The slow net: ``x [..., I]`` -> ``φ'(k) [..., H, d_φ]``, ``v [..., H, d_v]``,
        ``φ'(q) [..., H, d_φ]``, ``β [..., H]`` (``None`` for the sum rule); with ``chunk_size``,
        in the chunk layout of :func:`fast_weight_chunked` (see :func:`slow_net_heads`)."""
        k, q, v, beta = slow_net_heads(
            self.slow(x),
            self.num_heads,
            self.key_size,
            self.value_size,
            self.feature_map,
            self.dpfp_nu,
            self.update == "delta",
            chunk_size,
        )
        return k, v, q, beta

    # -- time --------------------------------------------------------------------------------
    def step(self, x, state, return_debug=False):
        """One step: ``x [B, I]``, ``state.fast_weights [B, H, d_v, d_φ]`` -> ``y [B, hidden]``.

        Debug tensors: ``fast_weights`` ``W^(i)`` ``[B, H, d_v, d_φ]``, ``key`` ``φ'(k)`` and
        ``query`` ``φ'(q)`` ``[B, H, d_φ]``, ``value`` ``[B, H, d_v]``, and for the delta rule
        ``beta`` ``[B, H]``.
        """
        k, v, q, beta = self._program(x)
        y, W = fast_weight_step(state.fast_weights, k, v, q, beta, self.update)
        y = self.out(y.flatten(-2))
        if not return_debug:
            return y, FWPState(W)
        debug = {"fast_weights": W, "key": k, "query": q, "value": v}
        if beta is not None:
            debug["beta"] = beta
        return y, FWPState(W), debug

    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """Run over ``x [T, B, I]``; see :meth:`MemoryCore.forward`. The step form runs for
        ``T = 1``, ``chunk_size = 1`` or ``return_debug``; otherwise the chunk-parallel form."""
        state, starts = self._check_inputs(x, state, episode_starts)
        T = x.shape[0]
        if return_debug or T == 1 or self.chunk_size == 1:
            return self._forward_steps(x, state, starts, return_debug)
        k, v, q, beta = self._program(x, self.chunk_size)  # [N B H, C, d]: chunk layout
        y, W = _chunked(state.fast_weights, k, q, v, beta, starts, T)
        y = self.out(y.flatten(-2))  # [T, B, H, d_v] -> [T, B, H * d_v]
        return y, FWPState(W)

    def _forward_steps(self, x: Tensor, state: FWPState, starts: Tensor | None, return_debug: bool):
        """The step form over a sequence: the slow net for all steps at once (it has no state),
        then one fast-weight update per step, resetting ``W`` to zero where an episode starts."""
        k, v, q, beta = self._program(x)  # [T, B, H, d], β [T, B, H]
        W = state.fast_weights
        ys, debug_steps = [], []
        for t in range(x.shape[0]):
            if starts is not None:
                W = torch.where(starts[t].view(-1, 1, 1, 1), 0.0, W)  # reset to the initial W = 0
            b_t = beta[t] if beta is not None else None
            y, W = fast_weight_step(W, k[t], v[t], q[t], b_t, self.update)
            ys.append(y)
            if return_debug:
                dbg = {"fast_weights": W, "key": k[t], "query": q[t], "value": v[t]}
                if b_t is not None:
                    dbg["beta"] = b_t
                debug_steps.append(dbg)
        y = self.out(torch.stack(ys).flatten(-2))  # [T, B, H, d_v] -> [T, B, hidden]
        if return_debug:
            debug = {name: torch.stack([d[name] for d in debug_steps]) for name in debug_steps[0]}
            return y, FWPState(W), debug
        return y, FWPState(W)
