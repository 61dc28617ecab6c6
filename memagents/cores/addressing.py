"""The addressing mechanisms of the NTM and the DNC, one function per paper mechanism.

Papers and equation numbers cited in each docstring:

- NTM: Graves, Wayne & Danihelka 2014, "Neural Turing Machines", arXiv:1410.5401, section 3.
- DNC: Graves et al. 2016, "Hybrid computing using a neural network with dynamic external memory",
  Nature 538, Methods ("Memory addressing"). The DNC Methods section does not number its
  equations; we cite them by the paragraph heading and symbol.

Shapes use ``B`` batch, ``N`` memory slots, ``W`` word size, ``H`` heads (read heads ``R`` or write
heads), ``S`` the NTM's maximum shift. Everything here is pure torch, batched, and differentiable
(except the sort indices of the allocation, which carry no gradient, as in the paper).

Where the DNC paper leaves a numerical detail open, the DNC functions follow DeepMind's code
release (``deepmind/dnc``, ``dnc/addressing.py``): the epsilon added to the product of norms in
the cosine (:func:`cosine_similarity` with ``denominator_eps``), the ranking of free slots by
``1 - u`` with ties to the lowest index (:func:`allocation_weights`), sequential allocation over
several write heads (:func:`write_allocation_weights`) and the combined write of several heads in
the usage (:func:`usage_update`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Added under square roots, to the DNC's product of norms and to usage before sorting, so that an
#: all-zero memory or an exactly zero usage gives finite gradients (the NaN case pytorch-dnc warns
#: about). DeepMind's ``_EPSILON``.
EPSILON = 1e-6


def oneplus(x: Tensor) -> Tensor:
    """``oneplus(x) = 1 + log(1 + e^x)`` in ``[1, inf)``: the DNC's key strengths and the NTM's γ."""
    return 1.0 + F.softplus(x)


def cosine_similarity(
    memory: Tensor, keys: Tensor, eps: float = EPSILON, denominator_eps: float = 0.0
) -> Tensor:
    """Cosine similarity ``K[u, v] = u·v / (|u| |v| + ε_d)`` of every key against every memory row.

    NTM eq. (6); DNC Methods, "Content-based addressing" ``D(u, v)``. The norms are computed as
    ``sqrt(sum u^2 + eps)`` so that an all-zero memory row or key gives similarity 0 and a finite
    gradient instead of NaN. The DNC also adds ``denominator_eps`` = :data:`EPSILON` to the product
    of the norms, as DeepMind's ``CosineWeights`` does (``dot / (norm + 1e-6)``); the NTM and the
    sparse cores keep ``0``.

    :param memory: ``[B, N, W]`` memory matrix ``M``.
    :param keys: ``[B, H, W]`` lookup keys ``k``, one per head.
    :param eps: added under each norm's square root.
    :param denominator_eps: ``ε_d``, added to the product of the two norms.
    :return: ``[B, H, N]`` similarities in ``[-1, 1]``.
    """
    dot = torch.matmul(keys, memory.transpose(1, 2))  # [B, H, W] x [B, W, N] -> [B, H, N]
    mem_norm = torch.sqrt(memory.square().sum(-1) + eps)  # [B, N]
    key_norm = torch.sqrt(keys.square().sum(-1) + eps)  # [B, H]
    norms = key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1)  # [B, H, N]
    if denominator_eps:
        norms = norms + denominator_eps
    return dot / norms


def content_weights(
    memory: Tensor, keys: Tensor, strengths: Tensor, denominator_eps: float = 0.0
) -> Tensor:
    """Content-based addressing ``w[i] = softmax_i(β K(k, M[i]))``.

    NTM eq. (5); DNC Methods, "Content-based addressing" ``C(M, k, β)``.

    :param memory: ``[B, N, W]`` memory ``M``.
    :param keys: ``[B, H, W]`` keys ``k``.
    :param strengths: ``[B, H]`` key strengths ``β`` (≥ 1 in the DNC via :func:`oneplus`, > 0 NTM).
    :param denominator_eps: see :func:`cosine_similarity` (the DNC passes :data:`EPSILON`).
    :return: ``[B, H, N]`` weightings, non-negative, summing to 1 over ``N``.
    """
    similarity = cosine_similarity(memory, keys, denominator_eps=denominator_eps)
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def interpolate(content: Tensor, previous: Tensor, gate: Tensor) -> Tensor:
    """Location interpolation ``w_g = g w_c + (1 - g) w_{t-1}``. NTM eq. (7).

    :param content: ``[B, H, N]`` content weighting ``w^c_t``.
    :param previous: ``[B, H, N]`` previous weighting ``w_{t-1}``.
    :param gate: ``[B, H]`` interpolation gate ``g_t`` in ``[0, 1]``.
    :return: ``[B, H, N]``.
    """
    g = gate.unsqueeze(-1)
    return previous + g * (content - previous)


def shift_index(memory_size: int, max_shift: int, device: torch.device | None = None) -> Tensor:
    """Gather index for :func:`circular_shift`: ``index[i, k] = (i - (k - S)) mod N``.

    :return: ``[N, 2S+1]`` long tensor.
    """
    rows = torch.arange(memory_size, device=device).unsqueeze(1)
    shifts = torch.arange(-max_shift, max_shift + 1, device=device).unsqueeze(0)
    return (rows - shifts) % memory_size


def circular_shift(weights: Tensor, shift: Tensor, index: Tensor) -> Tensor:
    """Circular convolution ``w~[i] = sum_j w[j] s[i - j]`` over shifts ``-S..S``. NTM eq. (8).

    Done as one batched gather plus a contraction (no loop over the batch, no ``conv1d`` over the
    whole batch): ``w~[b, h, i] = sum_k w[b, h, (i - (k - S)) mod N] s[b, h, k]``.

    :param weights: ``[B, H, N]`` gated weighting ``w^g_t``.
    :param shift: ``[B, H, 2S+1]`` shift distribution ``s_t`` (entry ``k`` is a shift by ``k - S``).
    :param index: ``[N, 2S+1]`` from :func:`shift_index`.
    :return: ``[B, H, N]``.
    """
    if index.shape[0] != weights.shape[-1] or index.shape[1] != shift.shape[-1]:
        raise ValueError(
            f"shift index {tuple(index.shape)} does not match weights {tuple(weights.shape)} "
            f"and shift {tuple(shift.shape)}"
        )
    shifted = weights[..., index]  # [B, H, N, 2S+1]
    return torch.einsum("bhnk,bhk->bhn", shifted, shift)


def sharpen(weights: Tensor, gamma: Tensor, eps: float = EPSILON) -> Tensor:
    """Sharpening ``w[i] = w~[i]^γ / sum_j w~[j]^γ``. NTM eq. (9).

    ``eps`` is added before the power so that ``d/dγ w^γ = w^γ log w`` stays finite at ``w = 0``.

    :param weights: ``[B, H, N]`` shifted weighting ``w~_t`` (non-negative).
    :param gamma: ``[B, H]`` sharpening exponent ``γ_t ≥ 1``.
    :return: ``[B, H, N]``, non-negative, summing to 1.
    """
    powered = (weights + eps).pow(gamma.unsqueeze(-1))
    return powered / powered.sum(-1, keepdim=True)


def erase_and_add(memory: Tensor, weights: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """Write: erase ``M~ = M ∘ prod_h (1 - w_h e_h^T)`` then add ``M' = M~ + sum_h w_h a_h^T``.

    NTM eqs. (3) and (4); DNC Methods, "Reading and writing to memory" (``E`` the all-ones matrix:
    ``M_t = M_{t-1} ∘ (E - w^w e^T) + w^w v^T``), generalised to several write heads as in the DNC
    code release (erase products over heads, adds summed).

    :param memory: ``[B, N, W]`` previous memory ``M_{t-1}``.
    :param weights: ``[B, H, N]`` write weightings ``w^w``.
    :param erase: ``[B, H, W]`` erase vectors ``e`` in ``[0, 1]``.
    :param add: ``[B, H, W]`` add (write) vectors ``a`` / ``v``.
    :return: ``[B, N, W]`` new memory.
    """
    weighted_erase = weights.unsqueeze(-1) * erase.unsqueeze(2)  # [B, H, N, W]
    if weights.shape[1] == 1:
        keep = 1.0 - weighted_erase.squeeze(1)
    else:
        keep = torch.prod(1.0 - weighted_erase, dim=1)  # [B, N, W]
    # [B, N, H] x [B, H, W] -> [B, N, W], added to the erased memory in one call.
    return torch.baddbmm(memory * keep, weights.transpose(1, 2), add)


def read_memory(memory: Tensor, weights: Tensor) -> Tensor:
    """Read vectors ``r = M^T w``. NTM eq. (2); DNC Methods, "Reading and writing to memory".

    :param memory: ``[B, N, W]``.
    :param weights: ``[B, R, N]`` read weightings.
    :return: ``[B, R, W]``.
    """
    return torch.matmul(weights, memory)


def usage_update(
    usage: Tensor, write_weights: Tensor, free_gates: Tensor, read_weights: Tensor
) -> Tensor:
    """Usage ``u_t = (u_{t-1} + w^w - u_{t-1} ∘ w^w) ∘ ψ_t``, ``ψ_t = prod_r (1 - f_r w^r_r)``.

    DNC Methods, "Dynamic memory allocation" (retention vector ``ψ`` and usage ``u``). With several
    write heads the combined write weighting is ``1 - prod_h (1 - w^w_h)`` (DeepMind's
    ``Freeness``).

    This function is differentiable in all its inputs. DeepMind's ``Freeness`` stops the gradient
    through the previous write weightings (``tf.stop_gradient(write_weights)``; the free gates and
    previous read weightings keep theirs): ``DNCCore`` does the same by passing
    ``w^w_{t-1}.detach()`` unless it was built with ``usage_gradient=True``.

    :param usage: ``[B, N]`` previous usage ``u_{t-1}`` in ``[0, 1]``.
    :param write_weights: ``[B, H, N]`` previous write weightings ``w^w_{t-1}``.
    :param free_gates: ``[B, R]`` free gates ``f_t`` in ``[0, 1]``.
    :param read_weights: ``[B, R, N]`` previous read weightings ``w^r_{t-1}``.
    :return: ``[B, N]`` new usage in ``[0, 1]``.
    """
    if write_weights.shape[1] == 1:
        written = write_weights.squeeze(1)
    else:
        written = 1.0 - torch.prod(1.0 - write_weights, dim=1)
    usage = usage + written - usage * written
    retention = torch.prod(1.0 - free_gates.unsqueeze(-1) * read_weights, dim=1)  # ψ: [B, N]
    return usage * retention


def allocation_weights(usage: Tensor, eps: float = EPSILON) -> Tensor:
    """Allocation ``a[φ_j] = (1 - u[φ_j]) prod_{i<j} u[φ_i]``, ``φ`` the slots from least to most
    used.

    DNC Methods, "Dynamic memory allocation". The usage is first mapped to
    ``u' = eps + (1 - eps) u`` so that exact zeros do not stall the product's gradient. As in
    DeepMind's ``Freeness._allocation``, the slots are ranked by the free amount ``1 - u'`` in
    descending order, with equal values in slot order (``tf.nn.top_k``: lowest index first), and
    the product runs over ``1 - (1 - u')``. Computing ``1 - u'`` first matters at ties: the slots
    never written hold usages a few ``1e-17`` apart (rounding noise, different on every CPU and
    code path), which ``u'`` keeps apart but ``1 - u'`` rounds to the value of an unused slot
    (every usage below about ``8e-17`` in float64, ``4e-8`` in float32), so these slots are taken
    in index order, deterministically. The sort indices carry no gradient; the gradient flows
    through the sorted values, as in the paper.

    :param usage: ``[B, N]`` usage ``u_t`` in ``[0, 1]``.
    :param eps: the floor of the mapped usage.
    :return: ``[B, N]`` allocation weighting, non-negative, summing to ≤ 1; the least-used slot
        gets the largest weight.
    """
    free = 1.0 - (eps + (1.0 - eps) * usage)  # 1 - u'
    # φ: descending free amount, stable, so equal values keep slot order
    sorted_free, order = torch.sort(free, dim=-1, descending=True, stable=True)
    sorted_usage = 1.0 - sorted_free
    ones = torch.ones_like(sorted_usage[..., :1])
    exclusive = torch.cumprod(torch.cat([ones, sorted_usage[..., :-1]], dim=-1), dim=-1)
    sorted_alloc = sorted_free * exclusive
    return torch.zeros_like(sorted_alloc).scatter(-1, order, sorted_alloc)


def write_allocation_weights(usage: Tensor, write_gates: Tensor) -> Tensor:
    """Allocation weightings for several write heads, allocated one after another.

    Head ``h`` allocates from the usage left by heads ``< h``, treating their (gated) allocation
    as used: ``u <- u + (1 - u) g_h a_h`` (DeepMind's ``Freeness.write_allocation_weights``, with
    ``g_h`` the product of the head's allocation and write gates; the gradient flows through these
    updates). Reduces to the paper for one head.

    :param usage: ``[B, N]`` usage ``u_t``.
    :param write_gates: ``[B, H]`` product of allocation and write gates ``g^a g^w`` per head.
    :return: ``[B, H, N]``.
    """
    out = []
    for h in range(write_gates.shape[1]):
        alloc = allocation_weights(usage)
        out.append(alloc)
        if h + 1 < write_gates.shape[1]:
            usage = usage + (1.0 - usage) * write_gates[:, h : h + 1] * alloc
    return torch.stack(out, dim=1)


def precedence_update(precedence: Tensor, write_weights: Tensor) -> Tensor:
    """Precedence ``p_t = (1 - sum_i w^w_t[i]) p_{t-1} + w^w_t``, one per write head.

    DNC Methods, "Temporal memory linkage".

    :param precedence: ``[B, H, N]`` ``p_{t-1}``.
    :param write_weights: ``[B, H, N]`` ``w^w_t``.
    :return: ``[B, H, N]``, non-negative, summing to ≤ 1.
    """
    return (1.0 - write_weights.sum(-1, keepdim=True)) * precedence + write_weights


def _link_step_forward(
    link: Tensor, write: Tensor, precedence: Tensor, read: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Shared forward of :func:`link_update` and :func:`link_update_and_read` on 3-D tensors.

    :param link: ``[G, N, N]`` (``G = B * H``); ``write``, ``precedence``: ``[G, N]``;
        ``read``: ``[G, R, N]`` or ``None``.
    """
    w_row = write.unsqueeze(-1)  # w[i]: [G, N, 1]
    w_col = write.unsqueeze(-2)  # w[j]: [G, 1, N]
    out = torch.sub(1.0 - w_row, w_col).mul_(link)  # (1 - w[i] - w[j]) L[i, j]
    out.baddbmm_(w_row, precedence.unsqueeze(-2))  # + w[i] p[j]
    out.diagonal(dim1=-2, dim2=-1).zero_()
    if read is None:
        return out, None, None
    forward = torch.bmm(read, out.transpose(1, 2))  # f[r, i] = sum_j L[i, j] w^r[j]: [G, R, N]
    backward = torch.bmm(read, out)  # b[r, j] = sum_i w^r[i] L[i, j]: [G, R, N]
    return out, forward, backward


class _LinkUpdateAndRead(torch.autograd.Function):
    """Fused temporal-link step: ``L_t`` from ``L_{t-1}``, then ``f_t`` and ``b_t`` from ``L_t``.

    Plain autograd would keep several ``N x N`` intermediates per step and build three ``N x N``
    gradient tensors (one per use of ``L_t``) before adding them. This function saves only its
    inputs and the output link, sums the gradients of ``L_t`` into one buffer with two in-place
    rank-``R`` updates, and touches each ``N x N`` tensor a fixed small number of times. All
    tensors are 3-D ``[G, ...]`` with ``G = B * H`` (batch times write heads).
    """

    @staticmethod
    def forward(ctx, link, write, precedence, read):
        out, fwd, bwd = _link_step_forward(link, write, precedence, read)
        ctx.save_for_backward(link, write, precedence, read, out)
        return out, fwd, bwd

    @staticmethod
    def backward(ctx, grad_out, grad_fwd, grad_bwd):
        return _link_step_backward(grad_out, grad_fwd, grad_bwd, *ctx.saved_tensors)


def _link_step_backward(
    grad_out: Tensor,
    grad_fwd: Tensor,
    grad_bwd: Tensor,
    link: Tensor,
    write: Tensor,
    precedence: Tensor,
    read: Tensor,
    out: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`_link_step_forward` (3-D ``[G, ...]`` tensors); see the forward for
    shapes. Returns the gradients of ``(link, write, precedence, read)``."""
    # Total gradient of L_t: its own + from f = L w^r (g_f^T w^r) + from b = w^rT L (w^rT g_b),
    # as one rank-2R update: [g_f^T, w^rT] @ [w^r; g_b].
    left = torch.cat([grad_fwd, read], dim=1).transpose(1, 2)  # [G, N, 2R]
    right = torch.cat([read, grad_bwd], dim=1)  # [G, 2R, N]
    grad = torch.baddbmm(grad_out, left, right)
    grad.diagonal(dim1=-2, dim2=-1).zero_()  # the diagonal of L_t is constant 0
    w_row = write.unsqueeze(-1)
    w_col = write.unsqueeze(-2)
    # w^r was used against L_t: d f / d w^r and d b / d w^r.
    grad_read = torch.bmm(grad_fwd, out)
    grad_read.baddbmm_(grad_bwd, out.transpose(1, 2))
    # d/dp[j] = sum_i g[i, j] w[i]
    grad_prec = torch.bmm(w_col, grad).squeeze(-2)
    # d/dw[i] = sum_j g[i, j] (p[j] - L[i, j]);  d/dw[j] = -sum_i g[i, j] L[i, j]
    gl = grad * link
    grad_write = torch.bmm(grad, precedence.unsqueeze(-1)).squeeze(-1) - gl.sum(-1) - gl.sum(-2)
    # d/dL_{t-1}[i, j] = g[i, j] (1 - w[i] - w[j]), computed in gl's buffer
    torch.sub(1.0 - w_row, w_col, out=gl)
    grad.mul_(gl)
    return grad, grad_write, grad_prec, grad_read


def link_update(link: Tensor, write_weights: Tensor, precedence: Tensor) -> Tensor:
    """Temporal link matrix update, one per write head. DNC Methods, "Temporal memory linkage":

    ``L_t[i, j] = (1 - w^w_t[i] - w^w_t[j]) L_{t-1}[i, j] + w^w_t[i] p_{t-1}[j]``, ``L_t[i, i] = 0``.

    :param link: ``[B, H, N, N]`` ``L_{t-1}``; ``L[i, j]`` is the degree to which slot ``i`` was
        written after slot ``j``.
    :param write_weights: ``[B, H, N]`` ``w^w_t``.
    :param precedence: ``[B, H, N]`` ``p_{t-1}`` (the precedence *before* this step's write).
    :return: ``[B, H, N, N]`` ``L_t``, entries in ``[0, 1]``, zero diagonal, rows and columns
        summing to ≤ 1.
    """
    B, H, N = write_weights.shape
    read = write_weights.new_zeros(B * H, 1, N)
    out, _, _ = _LinkUpdateAndRead.apply(
        link.reshape(B * H, N, N),
        write_weights.reshape(B * H, N),
        precedence.reshape(B * H, N),
        read,
    )
    return out.view(B, H, N, N)


def link_update_and_read(
    link: Tensor, write_weights: Tensor, precedence: Tensor, read_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`link_update` followed by :func:`directional_read_weights`, fused for speed.

    :param link: ``[B, H, N, N]`` ``L_{t-1}``.
    :param write_weights: ``[B, H, N]`` ``w^w_t``.
    :param precedence: ``[B, H, N]`` ``p_{t-1}``.
    :param read_weights: ``[B, R, N]`` previous read weightings ``w^r_{t-1}``.
    :return: ``(L_t [B, H, N, N], forward [B, R, H, N], backward [B, R, H, N])``.
    """
    B, H, N = write_weights.shape
    R = read_weights.shape[1]
    read = read_weights.unsqueeze(1).expand(B, H, R, N).reshape(B * H, R, N)
    out, fwd, bwd = _LinkUpdateAndRead.apply(
        link.reshape(B * H, N, N),
        write_weights.reshape(B * H, N),
        precedence.reshape(B * H, N),
        read,
    )
    fwd = fwd.view(B, H, R, N).transpose(1, 2)
    bwd = bwd.view(B, H, R, N).transpose(1, 2)
    return out.view(B, H, N, N), fwd, bwd


def directional_read_weights(link: Tensor, read_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Forward ``f_t = L_t w^r_{t-1}`` and backward ``b_t = L_t^T w^r_{t-1}`` weightings.

    DNC Methods, "Temporal memory linkage", for every read head against every write head's link.

    :param link: ``[B, H, N, N]`` ``L_t`` (``H`` write heads).
    :param read_weights: ``[B, R, N]`` previous read weightings ``w^r_{t-1}``.
    :return: ``(forward, backward)``, each ``[B, R, H, N]``.
    """
    # f[b,r,h,i] = sum_j L[b,h,i,j] w[b,r,j];  b[b,r,h,j] = sum_i w[b,r,i] L[b,h,i,j]
    forward = torch.einsum("bhij,brj->brhi", link, read_weights)
    backward = torch.einsum("bhij,bri->brhj", link, read_weights)
    return forward, backward


def others_product(x: Tensor, dim: int) -> Tensor:
    """``out[k] = prod_{j != k} x[j]`` along ``dim`` (prefix times suffix products, no division)."""
    n = x.shape[dim]
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    prefix = torch.cumprod(torch.cat([ones, x.narrow(dim, 0, n - 1)], dim), dim)
    flipped = x.flip(dim)
    suffix = torch.cumprod(torch.cat([ones, flipped.narrow(dim, 0, n - 1)], dim), dim).flip(dim)
    return prefix * suffix
