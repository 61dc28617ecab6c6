"""The DNC memory access step as one autograd function with a hand-written backward.

The same equations as the reference path in :mod:`memagents.cores.addressing` (and the same order:
usage, write weighting, erase-and-write, link and precedence, read weighting, read; Graves et al.
2016, Methods; where the paper leaves details open, DeepMind's release, as listed in
:mod:`memagents.cores.dnc`), computed without recording an autograd graph. Plain autograd builds
~170 graph nodes per DNC step, most of them views and small elementwise ops whose bookkeeping
costs more than their arithmetic at the sizes RL uses; this function records one node and its
backward applies the chain rule mechanism by mechanism in a few dozen batched ops. Tests check it
against the reference path (forward values and gradients), against DeepMind's equations
(``tests/test_dnc_deepmind.py``) and with float64 ``gradcheck``.

On CPU tensors (float32/float64) both directions run as one call each into a C++ kernel
(``csrc/dnc_access.cpp``, built and loaded by :mod:`memagents.cores.native`) that loops over the
batch and computes the same equations in the same order; the forward leaves a workspace of
intermediates (softmax weights, norms, sort order, directional weightings) for the backward.
The torch code below is the reference and the path for other devices (or ``MEMAGENTS_NATIVE=0``).
The function also accepts the interface vector ξ before its activations, which it then applies
itself. :class:`DNCStep` goes one step further: the LSTM controller's recurrent part, ξ and
the access step in one kernel call per step and direction; :class:`DNCSequence`, which
``DNCCore.forward`` runs on the CPU, makes a whole sequence of such steps one autograd node.

Shapes: ``B`` batch, ``N`` slots, ``W`` word size, ``R`` read heads, ``H`` write heads.
"""

from __future__ import annotations

import ctypes
import functools
from array import array

import torch
import torch.nn.functional as F
from torch import Tensor

from memagents.cores import native
from memagents.cores.addressing import (
    EPSILON,
    _link_step_backward,
    _link_step_forward,
    others_product,
)


# -- the interface vector ξ and its activations (Methods, "Interface parameters") ----------------
def interface_sizes(R: int, H: int, W: int) -> list[int]:
    """Widths of the parts of ξ, in order: read keys ``R*W``, write keys ``H*W``, write vectors
    ``H*W``, read strengths ``R``, write strengths ``H``, erase ``H*W``, free gates ``R``,
    allocation gates ``H``, write gates ``H``, read modes ``R*(1 + 2H)`` (as ``DNCCore``)."""
    return [R * W, H * W, H * W, R, H, H * W, R, H, H, R * (1 + 2 * H)]


def _softplus_grad(x: Tensor) -> Tensor:
    """Derivative of torch's softplus (threshold 20)."""
    return torch.where(x > 20.0, torch.ones_like(x), torch.sigmoid(x))


def _activate(raw: Tensor, R: int, H: int, W: int) -> tuple[Tensor, ...]:
    """ξ ``[B, X]`` -> the 10 activated interface inputs of :class:`DNCAccessStep` (keys and
    write vectors as they are, strengths ``oneplus``, erase and gates ``sigmoid``, read modes
    ``softmax`` over ``1 + 2H`` per read head)."""
    B = raw.shape[0]
    kr, kw, v, br, bw, erase, free, g_alloc, g_write, modes = raw.split(
        interface_sizes(R, H, W), dim=-1
    )
    return (
        kr.reshape(B, R, W), 1.0 + F.softplus(br), kw.reshape(B, H, W), 1.0 + F.softplus(bw),
        v.reshape(B, H, W), torch.sigmoid(erase).view(B, H, W), torch.sigmoid(free),
        torch.sigmoid(g_alloc), torch.sigmoid(g_write),
        torch.softmax(modes.reshape(B, R, 1 + 2 * H), dim=-1),
    )  # fmt: skip


def _activate_backward(raw: Tensor, act: tuple[Tensor, ...], grads) -> Tensor:
    """Gradient of ξ ``[B, X]`` from the gradients of the 10 activated inputs."""
    B = raw.shape[0]
    R, W = act[0].shape[1:]
    H = act[2].shape[1]
    start = R * W + 2 * H * W  # the strengths' raw values
    br_raw, bw_raw = raw[:, start : start + R], raw[:, start + R : start + R + H]
    g_kr, g_br, g_kw, g_bw, g_v, g_erase, g_free, g_ga, g_gw, g_modes = grads
    _, _, _, _, _, erase, free, g_alloc, g_write, modes = act

    def sig(g, y):
        return (g * (1.0 - y) * y).reshape(B, -1)

    g_z = modes * (g_modes - (g_modes * modes).sum(-1, keepdim=True))  # softmax
    pieces = [
        g_kr.reshape(B, -1), g_kw.reshape(B, -1), g_v.reshape(B, -1),
        g_br * _softplus_grad(br_raw), g_bw * _softplus_grad(bw_raw),
        sig(g_erase, erase), sig(g_free, free), sig(g_ga, g_alloc), sig(g_gw, g_write),
        g_z.reshape(B, -1),
    ]  # fmt: skip
    return torch.cat(pieces, dim=-1)


# -- the native kernel -----------------------------------------------------------------------------
_p, _L = ctypes.c_void_p, ctypes.c_long
#: the entry points of ``csrc/dnc_access.cpp`` (``_*``: the float32 and float64 variants).
SIGNATURES: dict[str, native.Signature] = {
    "dnc_workspace_size": ([_p], _L),
    "dnc_interface_size": ([_p], _L),
    "dnc_step_workspace_size": ([_p], _L),
    "dnc_forward_*": ([_p, _p, _p, _p, _L, _p, _p, _p], None),
    "dnc_backward_*": ([_p, _p, _p, _p, _p, _p, _L, _p, _p, _p, _p, _p], None),
    "dnc_step_forward_*": ([_p] * 9, None),
    "dnc_step_backward_*": ([_p] * 12, None),
    "dnc_seq_step_backward_*": ([_p] * 13 + [_L], None),
}


def _load():
    """The compiled ``dnc_access`` library with its signatures set, or ``None``."""
    return native.load("dnc_access", SIGNATURES)


_UNLOADED = object()

#: The kernel library, loaded on first use (``None``: torch path only). Tests set it to ``None``
#: to run the torch path.
lib = _UNLOADED


def _kernel():
    global lib
    if lib is _UNLOADED:
        lib = _load()
    return lib


def _access_outputs(B: int, N: int, W: int, R: int, H: int, like: dict) -> tuple[Tensor, ...]:
    """Uninitialised outputs of a native access step (the kernel writes every element):
    ``memory [B,N,W]``, ``usage [B,N]``, ``link [B,H,N,N]``, ``precedence [B,H,N]``,
    ``read_weights [B,R,N]``, ``write_weights [B,H,N]``, ``read_vectors [B,R,W]``,
    ``allocation [B,H,N]``."""
    return (
        torch.empty(B, N, W, **like),
        torch.empty(B, N, **like),
        torch.empty(B, H, N, N, **like),
        torch.empty(B, H, N, **like),
        torch.empty(B, R, N, **like),
        torch.empty(B, H, N, **like),
        torch.empty(B, R, W, **like),
        torch.empty(B, H, N, **like),
    )


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """``t [B, ...]`` with each batch element's entries contiguous, and its batch stride.

    Slices of the interface vector (``[B, R, W]`` views with batch stride ``> R*W``) and
    gradients arriving through them are passed as they are; anything else is copied.
    """
    if t.is_contiguous():
        return t, t.stride(0)
    expected, strides, shape = 1, t.stride(), t.shape
    for d in range(t.dim() - 1, 0, -1):
        if shape[d] != 1 and strides[d] != expected:
            t = t.contiguous()
            return t, t.stride(0)
        expected *= shape[d]
    return t, strides[0]


def _pointers(tensors) -> tuple[array, array, list]:
    """Data pointers and batch strides of tensors (``None`` -> null) as ``int64`` arrays for a
    kernel call (plain buffers: cheaper than ctypes arrays and invisible to the garbage
    collector), and the tensors actually pointed to (kept alive for the call)."""
    kept, ptrs, strides = [], array("q"), array("q")
    for t in tensors:
        if t is None:
            ptrs.append(0)
            strides.append(0)
        else:
            t, stride = _rows(t)
            kept.append(t)
            ptrs.append(t.data_ptr())
            strides.append(stride)
    return ptrs, strides, kept


def _address(a: array) -> int:
    return a.buffer_info()[0]


def _entry(name: str, dtype: torch.dtype):
    """The kernel entry point ``name`` for ``dtype`` (float32 or float64)."""
    return native.kernel(lib, name, dtype)


@functools.lru_cache(maxsize=64)
def _shape_info(B: int, N: int, W: int, R: int, H: int) -> tuple[array, int, int]:
    """The kernel's dims array, workspace size (per batch element) and interface width."""
    dims = array("q", (B, N, W, R, H))
    address = _address(dims)
    return dims, lib.dnc_workspace_size(address), lib.dnc_interface_size(address)


def _native_forward(ctx, inputs: tuple[Tensor, ...]):
    """The forward as one kernel call (see ``csrc/dnc_access.cpp`` for the layout). ``inputs``
    are the six state tensors and either the 10 activated interface tensors or ξ alone."""
    memory0, read0, write0 = inputs[0], inputs[4], inputs[5]
    B, N, W = memory0.shape
    R, H = read0.shape[1], write0.shape[1]
    dims, work_size, X = _shape_info(B, N, W, R, H)
    raw, raw_ptr, raw_stride = None, None, 0
    if len(inputs) == 7:
        raw, raw_stride = _rows(inputs[6])
        raw_ptr = raw.data_ptr()
        if raw.shape[1] != X:
            raise ValueError(f"interface vector of width {raw.shape[1]} for R={R}, H={H}, W={W}")
    like = {"dtype": memory0.dtype, "device": memory0.device}
    outputs = _access_outputs(B, N, W, R, H, like)
    work = torch.empty(B, work_size, **like)
    order = torch.empty(B, H, N, dtype=torch.int32)
    in_ptrs, in_strides, _kept = _pointers(inputs if raw is None else inputs[:6])
    out_ptrs = array("q", [t.data_ptr() for t in outputs])
    kernel = _entry("dnc_forward", memory0.dtype)
    kernel(
        _address(dims), _address(in_ptrs), _address(in_strides), raw_ptr, raw_stride,
        _address(out_ptrs), work.data_ptr(), order.data_ptr(),
    )  # fmt: skip

    memory, _usage, _link, _prec, read, write, _rv, alloc = outputs
    ctx.native = True
    ctx.work = (work, order)  # never require grad: plain attributes are safe and cheap
    ctx.save_for_backward(*inputs, memory, read, write, alloc)
    ctx.mark_non_differentiable(alloc)
    ctx.set_materialize_grads(False)  # unused outputs: null gradients, no zero tensors
    return outputs


def _native_backward(ctx, grads):
    """The backward as one kernel call; gradients of unused outputs arrive as ``None``."""
    saved = ctx.saved_tensors
    inputs, (memory, read, write, alloc) = saved[:-4], saved[-4:]
    work, order = ctx.work
    memory0, read0, write0 = inputs[0], inputs[4], inputs[5]
    B, N, W = memory0.shape
    R, H = read0.shape[1], write0.shape[1]
    dims = _shape_info(B, N, W, R, H)[0]
    needs = ctx.needs_input_grad
    results = [
        torch.empty_like(t, memory_format=torch.contiguous_format)
        if i not in (2, 5) or needs[i]
        else None
        for i, t in enumerate(inputs)
    ]  # no gradient for a link that needs none (e.g. the all-zero initial link): no N x N
    # output; none for detached previous write weights (DNCCore's default, as DeepMind's)
    raw, raw_ptr, raw_stride, g_raw_ptr = None, None, 0, None
    if len(inputs) == 7:
        raw, raw_stride = _rows(inputs[6])
        raw_ptr, g_raw_ptr = raw.data_ptr(), results[6].data_ptr()
    grad_ptrs, grad_strides, _kept = _pointers(grads[:7])
    in_ptrs, in_strides, _kept_in = _pointers(inputs[:6] if raw is not None else inputs)
    out_ptrs = array("q", (memory.data_ptr(), 0, 0, 0, read.data_ptr(), write.data_ptr(), 0))
    out_ptrs.append(alloc.data_ptr())
    res_ptrs = array("q", [0 if t is None else t.data_ptr() for t in results[:6]])
    if raw is None:
        res_ptrs.extend(t.data_ptr() for t in results[6:])
    else:
        res_ptrs.extend([0] * 10)
    kernel = _entry("dnc_backward", memory0.dtype)
    kernel(
        _address(dims), _address(grad_ptrs), _address(grad_strides), _address(in_ptrs),
        _address(in_strides), raw_ptr, raw_stride, _address(out_ptrs), work.data_ptr(),
        order.data_ptr(), _address(res_ptrs), g_raw_ptr,
    )  # fmt: skip
    return tuple(results)


# -- content weights C(M, k, β) = softmax(β cos(k, M)) ---------------------------------------------
def _content_forward(memory: Tensor, keys: Tensor, strengths: Tensor):
    """memory ``[B, N, W]``, keys ``[B, K, W]``, strengths ``[B, K]`` -> weights ``[B, K, N]``;
    cosine ``k·M / (|k| |M| + EPSILON)`` as DeepMind's (:func:`addressing.cosine_similarity` with
    ``denominator_eps=EPSILON``)."""
    dot = torch.bmm(keys, memory.transpose(1, 2))
    mem_norm = torch.sqrt(memory.square().sum(-1) + EPSILON)  # [B, N]
    key_norm = torch.sqrt(keys.square().sum(-1) + EPSILON)  # [B, K]
    denom = key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1) + EPSILON  # [B, K, N]
    sim = dot.div_(denom)
    weights = torch.softmax(sim * strengths.unsqueeze(-1), dim=-1)
    return weights, (memory, keys, strengths, mem_norm, key_norm, denom, sim, weights)


def _content_backward(grad: Tensor, cache) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``(memory, keys, strengths)`` given the gradient of the weights."""
    memory, keys, strengths, mem_norm, key_norm, denom, sim, weights = cache
    g_z = weights * (grad - (grad * weights).sum(-1, keepdim=True))  # softmax
    g_strength = (g_z * sim).sum(-1)
    g_dot = g_z * strengths.unsqueeze(-1) / denom
    # sim = dot / D, D = |k| |m| + eps: d sim / d|k| = -sim |m| / D, d|k|/dk = k / |k| (and the
    # same for memory rows)
    g_denom = g_dot * sim  # = -(gradient of D)
    g_key_norm = (g_denom * mem_norm.unsqueeze(1)).sum(-1) / key_norm  # [B, K]
    g_mem_norm = (g_denom * key_norm.unsqueeze(-1)).sum(1) / mem_norm  # [B, N]
    g_keys = torch.bmm(g_dot, memory).sub_(keys * g_key_norm.unsqueeze(-1))
    g_mem = torch.bmm(g_dot.transpose(1, 2), keys).sub_(memory * g_mem_norm.unsqueeze(-1))
    return g_mem, g_keys, g_strength


# -- allocation a[φ_j] = (1 - u[φ_j]) prod_{i<j} u[φ_i] ---------------------------------------------
def _allocation_forward(usage: Tensor):
    """usage ``[B, N]`` -> allocation ``[B, N]`` (as :func:`addressing.allocation_weights`:
    slots ranked by ``1 - u'`` descending, ties lowest index first, as DeepMind's)."""
    free = 1.0 - (EPSILON + (1.0 - EPSILON) * usage)  # 1 - u'
    sorted_free, order = torch.sort(free, dim=-1, descending=True, stable=True)
    sorted_usage = 1.0 - sorted_free
    ones = torch.ones_like(sorted_usage[:, :1])
    exclusive = torch.cumprod(torch.cat([ones, sorted_usage[:, :-1]], dim=-1), dim=-1)
    sorted_alloc = sorted_free * exclusive
    alloc = torch.zeros_like(sorted_alloc).scatter_(-1, order, sorted_alloc)
    return alloc, (sorted_usage, order, exclusive, sorted_alloc)


def _allocation_backward(grad: Tensor, cache) -> Tensor:
    """d a_j / d s_k = -P_k [j = k] + a_j / s_k [j > k]  (``s = 1 - (1 - u')`` sorted, ``P``
    its exclusive product); the sort permutation carries no gradient."""
    sorted_usage, order, exclusive, sorted_alloc = cache
    g_sorted = grad.gather(-1, order)
    weighted = g_sorted * sorted_alloc
    later = weighted.flip(-1).cumsum(-1).flip(-1) - weighted  # sum over j > k
    g_s = later / sorted_usage - g_sorted * exclusive
    return torch.zeros_like(g_s).scatter_(-1, order, g_s).mul_(1.0 - EPSILON)


class DNCAccessStep(torch.autograd.Function):
    """One DNC memory-access step.

    Inputs: the previous access state ``memory [B,N,W]``, ``usage [B,N]``, ``link [B,H,N,N]``,
    ``precedence [B,H,N]``, ``read_weights [B,R,N]``, ``write_weights [B,H,N]``, then the
    activated interface: ``read_keys [B,R,W]``, ``read_strengths [B,R]`` (≥ 1),
    ``write_keys [B,H,W]``, ``write_strengths [B,H]``, ``write_vectors [B,H,W]``,
    ``erase [B,H,W]``, ``free_gates [B,R]``, ``alloc_gates [B,H]``, ``write_gates [B,H]``,
    ``read_modes [B,R,1+2H]`` (backward x H, content, forward x H; rows sum to 1). In place of
    these ten, the interface vector ξ ``[B, X]`` before its activations may be passed alone
    (layout :func:`interface_sizes`): the function then applies them itself and returns the
    gradient of ξ (one graph node where the activations and splits would take two dozen).

    Outputs: the new ``memory, usage, link, precedence, read_weights, write_weights``, the read
    vectors ``[B,R,W]`` and (no gradient) the allocation weighting ``[B,H,N]``.

    The backward is the exact derivative in every input. DeepMind's stopped usage gradient is the
    caller's: ``DNCCore.step`` passes ``write_weights`` detached (then its gradient, which comes
    from the usage only, is not computed).
    """

    @staticmethod
    def forward(ctx, memory0, usage0, link0, prec0, read0, write0, *interface):
        inputs = (memory0, usage0, link0, prec0, read0, write0, *interface)
        if _kernel() is not None and native.usable(*inputs):
            return _native_forward(ctx, inputs)
        ctx.native = False
        B, N, W = memory0.shape
        R, H = read0.shape[1], write0.shape[1]
        ctx.raw = None
        if len(interface) == 1:  # ξ before its activations
            raw = interface[0]
            interface = _activate(raw, R, H, W)
            ctx.raw = (raw, interface)
        kr, br, kw, bw, v, erase, free, g_alloc, g_write, modes = interface

        # 1. usage u = (u0 + c - u0 c) ψ, c the combined previous write, ψ the retention
        keep = 1.0 - free.unsqueeze(-1) * read0  # [B, R, N]
        psi = keep.prod(1)
        written = write0[:, 0] if H == 1 else 1.0 - (1.0 - write0).prod(1)
        u1 = usage0 + written - usage0 * written
        usage = u1 * psi

        # 2. write weighting from content (on M_{t-1}) and allocation
        write_content, cw_cache = _content_forward(memory0, kw, bw)
        gate_prod = g_alloc * g_write
        allocs, alloc_caches, usages = [], [], [usage]
        u_h = usage
        for h in range(H):
            a, cache = _allocation_forward(u_h)
            allocs.append(a)
            alloc_caches.append(cache)
            if h + 1 < H:
                u_h = u_h + (1.0 - u_h) * gate_prod[:, h : h + 1] * a
                usages.append(u_h)
        alloc = allocs[0].unsqueeze(1) if H == 1 else torch.stack(allocs, 1)
        mix = torch.lerp(write_content, alloc, g_alloc.unsqueeze(-1))  # [B, H, N]
        write = g_write.unsqueeze(-1) * mix

        # 3. erase and write
        one_minus = 1.0 - write.unsqueeze(-1) * erase.unsqueeze(2)  # [B, H, N, W]
        keep_mem = one_minus[:, 0] if H == 1 else one_minus.prod(1)
        memory = torch.baddbmm(memory0 * keep_mem, write.transpose(1, 2), v)

        # 4. link, directional weightings, precedence
        read_g = read0.unsqueeze(1).expand(B, H, R, N).reshape(B * H, R, N)
        link_args = (link0.reshape(B * H, N, N), write.reshape(B * H, N), prec0.reshape(B * H, N))
        link, fwd, bwd = _link_step_forward(*link_args, read_g)
        precedence = (1.0 - write.sum(-1, keepdim=True)) * prec0 + write

        # 5. read weighting: [b_1..b_H, c, f_1..f_H] mixed by the read modes, then read
        read_content, cr_cache = _content_forward(memory, kr, br)
        directions = torch.cat(
            [
                bwd.view(B, H, R, N).transpose(1, 2),
                read_content.unsqueeze(2),
                fwd.view(B, H, R, N).transpose(1, 2),
            ],
            dim=2,
        )  # [B, R, 1 + 2H, N]
        read = torch.matmul(modes.unsqueeze(-2), directions).squeeze(-2)  # [B, R, N]
        read_vectors = torch.bmm(read, memory)

        ctx.shapes = (B, N, W, R, H)
        ctx.caches = (cw_cache, cr_cache, alloc_caches)
        ctx.save_for_backward(
            memory0, usage0, prec0, read0, write0, free, g_alloc, g_write, modes, v, erase,
            keep, psi, written, u1, write_content, alloc, mix, write, one_minus, keep_mem,
            memory, directions, read, link0, link,
            *usages,
        )  # fmt: skip
        ctx.mark_non_differentiable(alloc)
        link = link.view(B, H, N, N)
        return memory, usage, link, precedence, read, write, read_vectors, alloc

    @staticmethod
    def backward(ctx, g_memory, g_usage, g_link, g_prec, g_read, g_write, g_rv, _g_alloc):
        if ctx.native:
            return _native_backward(ctx, (g_memory, g_usage, g_link, g_prec, g_read, g_write, g_rv))
        B, N, _W, R, H = ctx.shapes
        cw_cache, cr_cache, alloc_caches = ctx.caches
        (
            memory0, usage0, prec0, read0, write0, free, g_alloc, g_write_gate, modes, v, erase,
            keep, psi, written, u1, write_content, alloc, mix, write, one_minus, keep_mem,
            memory, directions, read, link0, link,
            *usages,
        ) = ctx.saved_tensors  # fmt: skip
        # Views are rebuilt here rather than saved: unpacking a saved view replays its view chain
        # through autograd, which cost more than the whole backward at small sizes.
        read_g = read0.unsqueeze(1).expand(B, H, R, N).reshape(B * H, R, N)
        link_args = (link0.reshape(B * H, N, N), write.reshape(B * H, N), prec0.reshape(B * H, N))

        # 5. read vectors r = w^r M, then the mode mixture
        g_read = g_read + torch.bmm(g_rv, memory.transpose(1, 2))
        g_mem = g_memory + torch.bmm(read.transpose(1, 2), g_rv)
        g_modes = torch.matmul(directions, g_read.unsqueeze(-1)).squeeze(-1)  # [B, R, 1 + 2H]
        g_dirs = modes.unsqueeze(-1) * g_read.unsqueeze(-2)  # [B, R, 1 + 2H, N]
        gm, g_kr, g_br = _content_backward(g_dirs[:, :, H], cr_cache)
        g_mem = g_mem + gm

        # 4. precedence p = (1 - sum w) p0 + w, then the link (with f and b)
        g_prec0 = (1.0 - write.sum(-1, keepdim=True)) * g_prec
        g_w = g_write + g_prec - (g_prec * prec0).sum(-1, keepdim=True)
        g_bwd = g_dirs[:, :, :H].transpose(1, 2).reshape(B * H, R, N)
        g_fwd = g_dirs[:, :, H + 1 :].transpose(1, 2).reshape(B * H, R, N)
        g_link0, g_wl, g_pl, g_rl = _link_step_backward(
            g_link.reshape(B * H, N, N), g_fwd, g_bwd, *link_args, read_g, link
        )
        g_w = g_w + g_wl.view(B, H, N)
        g_prec0 = g_prec0 + g_pl.view(B, H, N)
        g_read0 = g_rl.view(B, H, R, N).sum(1)

        # 3. erase and write: M = M0 ∘ K + w^T v
        g_memory0 = g_mem * keep_mem
        g_w = g_w + torch.bmm(v, g_mem.transpose(1, 2))  # [B, H, W] x [B, W, N]
        g_v = torch.bmm(write, g_mem)
        g_keep = g_mem * memory0  # [B, N, W]
        if H == 1:
            g_we = -g_keep.unsqueeze(1)
        else:
            g_we = -g_keep.unsqueeze(1) * others_product(one_minus, 1)  # [B, H, N, W]
        g_w = g_w + torch.matmul(g_we, erase.unsqueeze(-1)).squeeze(-1)
        g_erase = torch.matmul(write.unsqueeze(-2), g_we).squeeze(-2)

        # 2. write weighting w = g^w lerp(c^w, a, g^a)
        g_gw = (g_w * mix).sum(-1)
        g_mix = g_w * g_write_gate.unsqueeze(-1)
        g_ga = (g_mix * (alloc - write_content)).sum(-1)
        g_cw = g_mix * (1.0 - g_alloc.unsqueeze(-1))
        g_a = g_mix * g_alloc.unsqueeze(-1)
        gate_prod = g_alloc * g_write_gate
        g_u_next = None
        for h in reversed(range(H)):
            g_a_h = g_a[:, h]
            g_u_h = None
            if g_u_next is not None:  # u_{h+1} = u_h + (1 - u_h) s_h a_h
                u_h, a_h, s_h = usages[h], alloc[:, h], gate_prod[:, h : h + 1]
                g_a_h = g_a_h + g_u_next * (1.0 - u_h) * s_h
                g_s = (g_u_next * (1.0 - u_h) * a_h).sum(-1)
                g_ga[:, h] += g_s * g_write_gate[:, h]
                g_gw[:, h] += g_s * g_alloc[:, h]
                g_u_h = g_u_next * (1.0 - s_h * a_h)
            g_from_alloc = _allocation_backward(g_a_h, alloc_caches[h])
            g_u_next = g_from_alloc if g_u_h is None else g_u_h + g_from_alloc
        g_usage_total = g_usage + g_u_next
        gm0, g_kw, g_bw = _content_backward(g_cw, cw_cache)
        g_memory0 = g_memory0 + gm0

        # 1. usage u = (u0 + c - u0 c) ψ
        g_u1 = g_usage_total * psi
        g_psi = g_usage_total * u1
        g_usage0 = g_u1 * (1.0 - written)
        g_write0 = None  # None when w^w_{t-1} needs no gradient (DNCCore's default: detached)
        if ctx.needs_input_grad[5]:
            g_written = g_u1 * (1.0 - usage0)
            if H == 1:
                g_write0 = g_written.unsqueeze(1)
            else:
                g_write0 = g_written.unsqueeze(1) * others_product(1.0 - write0, 1)
        g_keep_r = g_psi.unsqueeze(1) * others_product(keep, 1)  # [B, R, N]
        g_free = -(g_keep_r * read0).sum(-1)
        g_read0 = g_read0 - g_keep_r * free.unsqueeze(-1)

        g_interface = (g_kr, g_br, g_kw, g_bw, g_v, g_erase, g_free, g_ga, g_gw, g_modes)
        if ctx.raw is not None:
            g_interface = (_activate_backward(ctx.raw[0], ctx.raw[1], g_interface),)
        return (
            g_memory0, g_usage0, g_link0.view(B, H, N, N), g_prec0, g_read0, g_write0,
            *g_interface,
        )  # fmt: skip


# -- a whole step: controller and access (DNCCore's fused sequence path on the CPU) ----------------
@functools.lru_cache(maxsize=64)
def _step_shape_info(B: int, N: int, W: int, R: int, H: int, Hd: int) -> tuple[array, int, int]:
    """The step kernel's dims array, access and controller workspace sizes per batch element."""
    dims = array("q", (B, N, W, R, H, Hd))
    address = _address(dims)
    return dims, lib.dnc_workspace_size(address), lib.dnc_step_workspace_size(address)


def step_usable(*tensors: Tensor) -> bool:
    """True when :class:`DNCStep` and :class:`DNCSequence` can run: the kernel is loaded and the
    tensors are CPU tensors of one float dtype."""
    return _kernel() is not None and native.usable(*tensors)


class DNCStep(torch.autograd.Function):
    """One whole DNC step, one C++ kernel call each way (CPU only; see :func:`step_usable`): the
    LSTM controller's recurrent part, the interface vector ξ, then the access step on ξ (as
    :class:`DNCAccessStep` with ξ whole; :class:`DNCSequence` runs its kernels step by step).
    ``DNCCore.step`` is the same computation in torch (tests compare both).

    Inputs: ``gates_x [B, 4Hd]`` (the input's share of the LSTM gates with both biases,
    ``W_x x_t + b_ih + b_hh``), ``h0, c0 [B, Hd]``, ``r0 [B, R*W]`` (previous read vectors),
    ``w_rh [R*W + Hd, 4Hd]`` (the rest of the gate weights: ``[W_ih[:, I:], W_hh]`` transposed),
    ``w_xi [Hd, X]`` (interface weight transposed), ``b_xi [X]``, then the six access state
    tensors of :class:`DNCAccessStep`. Gate order i, f, g, o as ``nn.LSTMCell``.

    Outputs: ``h, c [B, Hd]``, then the eight outputs of :class:`DNCAccessStep`.
    """

    @staticmethod
    def forward(ctx, gates_x, h0, c0, r0, w_rh, w_xi, b_xi, *state):
        memory0, read0, write0 = state[0], state[4], state[5]
        B, N, W = memory0.shape
        R, H, Hd = read0.shape[1], write0.shape[1], h0.shape[1]
        dims, work_size, ctrl_size = _step_shape_info(B, N, W, R, H, Hd)
        like = {"dtype": memory0.dtype, "device": memory0.device}
        outputs = (
            *_access_outputs(B, N, W, R, H, like),
            torch.empty(B, Hd, **like),  # h
            torch.empty(B, Hd, **like),  # c
        )
        work = torch.empty(B, work_size, **like)
        cwork = torch.empty(B, ctrl_size, **like)
        order = torch.empty(B, H, N, dtype=torch.int32)
        weights = tuple(t.contiguous() for t in (w_rh, w_xi, b_xi))
        ctrl_ptrs, ctrl_strides, _kept = _pointers((gates_x, h0, c0, r0, *weights))
        in_ptrs, in_strides, _kept_in = _pointers(state)
        out_ptrs = array("q", [t.data_ptr() for t in outputs])
        kernel = _entry("dnc_step_forward", like["dtype"])
        kernel(
            _address(dims), _address(ctrl_ptrs), _address(ctrl_strides), _address(in_ptrs),
            _address(in_strides), _address(out_ptrs), work.data_ptr(), cwork.data_ptr(),
            order.data_ptr(),
        )  # fmt: skip
        memory, _usage, _link, _prec, read, write, _rv, alloc, h, _c = outputs
        ctx.work = (work, cwork, order)
        ctx.save_for_backward(gates_x, h0, c0, r0, *weights, *state, memory, read, write, alloc, h)
        ctx.mark_non_differentiable(alloc)
        ctx.set_materialize_grads(False)
        return (h, outputs[9], *outputs[:8])

    @staticmethod
    def backward(ctx, g_h, g_c, *grads):
        saved = ctx.saved_tensors
        ctrl, state, (memory, read, write, alloc, h) = saved[:7], saved[7:13], saved[13:]
        work, cwork, order = ctx.work
        memory0, read0, write0 = state[0], state[4], state[5]
        B, N, W = memory0.shape
        R, H, Hd = read0.shape[1], write0.shape[1], h.shape[1]
        dims = _step_shape_info(B, N, W, R, H, Hd)[0]
        like = {"dtype": memory0.dtype, "device": memory0.device}
        needs = ctx.needs_input_grad
        g_state = [
            torch.empty_like(t, memory_format=torch.contiguous_format)
            if i not in (2, 5) or needs[7 + i]
            else None
            for i, t in enumerate(state)
        ]  # no N x N output for a link that needs no gradient; none for detached w^w_{t-1}
        g_ctrl = [
            torch.empty(B, 4 * Hd, **like), torch.empty(B, Hd, **like),
            torch.empty(B, Hd, **like), torch.empty(B, R * W, **like),
            torch.empty_like(ctrl[4]), torch.empty_like(ctrl[5]), torch.empty_like(ctrl[6]),
        ]  # fmt: skip
        grad_ptrs, grad_strides, _kept = _pointers((*grads[:7], g_h, g_c))
        ctrl_ptrs, ctrl_strides, _kept_c = _pointers(ctrl)
        in_ptrs, in_strides, _kept_in = _pointers(state)
        out_ptrs = array("q", (memory.data_ptr(), 0, 0, 0, read.data_ptr(), write.data_ptr(), 0))
        out_ptrs.extend((alloc.data_ptr(), h.data_ptr(), 0))
        res_ptrs = array("q", [0 if t is None else t.data_ptr() for t in (*g_state, *g_ctrl)])
        kernel = _entry("dnc_step_backward", like["dtype"])
        kernel(
            _address(dims), _address(grad_ptrs), _address(grad_strides), _address(ctrl_ptrs),
            _address(ctrl_strides), _address(in_ptrs), _address(in_strides),
            _address(out_ptrs), work.data_ptr(), cwork.data_ptr(), order.data_ptr(),
            _address(res_ptrs),
        )  # fmt: skip
        return (*g_ctrl, *g_state)


# -- a whole sequence as one autograd node (DNCCore.forward on the CPU) ----------------------------
#: The DNC's initial access state, each field one constant (Graves et al. 2016, Methods):
#: memory, usage, link, precedence, read weightings, write weightings.
INITIAL_ACCESS = (1e-6, 0.0, 0.0, 0.0, 0.0, 0.0)


def _steps(t: Tensor) -> tuple[int, int]:
    """Data pointer of a contiguous ``[T, ...]`` buffer and the bytes of one step."""
    return t.data_ptr(), t.stride(0) * t.element_size()


class DNCSequence(torch.autograd.Function):
    """``T`` whole DNC steps (the step of :class:`DNCStep`) as one autograd node, its backward
    backpropagation through time by hand: a Python loop over the steps calling the forward step
    kernel (``dnc_step_forward``) into ``[T, B, ...]`` buffers, then a reversed loop calling the
    backward step kernel, the gradients of the state carried from step to step in place of an
    autograd graph (one node instead of ``T``; no per-step outputs, saved tensors or gradient
    accumulation by the engine). The backward kernel (``dnc_seq_step_backward``) leaves out the
    controller's weight gradients and hands back the gradient of ξ instead; those of ``w_rh``,
    ``w_xi`` and ``b_xi`` are then formed once over all steps (``[T*B]``-row matrix products).
    Native kernels only (CPU, float32/float64): callers check :func:`step_usable` first.

    Step ``t`` (Graves et al. 2016, Methods: the controller sees ``x_t`` and ``r_{t-1}``):

    - where ``starts[t, b]``, element ``b``'s state (controller, read vectors, access) is first
      replaced by the initial state;
    - then the step of :class:`DNCStep`: gates ``= gates_x[t] + [r_{t-1}; h_{t-1}] W_rh``, the
      LSTM cell, ``ξ_t = h_t W_ξ + b``, the memory access on ``ξ_t``.

    Inputs: ``gates_x [T, B, 4Hd]`` (``W_x x_t + b_ih + b_hh``, all steps); ``w_rh
    [R*W + Hd, 4Hd]``; ``w_xi [Hd, X]``; ``b_xi [X]``; the state before step 0: ``h, c [B, Hd]``,
    ``r [B, R*W]``, then the six access state tensors of :class:`DNCAccessStep`; the initial
    ``h, c, r`` (learned) in the same shapes or broadcastable to them (``None`` when ``starts`` is
    ``None``); ``starts [T, B]`` bool or ``None``; ``record`` (``False``, e.g. under
    ``no_grad``: no backward, keep nothing); ``usage_gradient`` (``False``: each step's usage
    passes no gradient to the previous write weightings ``w^w_{t-1}``, DeepMind's
    ``tf.stop_gradient``, and the starting write weightings get none; ``True``: the exact
    derivative). The per-step nodes :class:`DNCAccessStep` and :class:`DNCStep` always give the
    exact derivative: ``DNCCore.step`` stops it by passing ``w^w_{t-1}`` detached. The initial
    access state is the constant :data:`INITIAL_ACCESS` (no gradient).

    Outputs: ``h [T, B, Hd]``, read vectors ``[T, B, R, W]`` (every step's), then the final
    ``c [B, Hd]`` and the final six access state tensors.
    """

    @staticmethod
    def forward(ctx, gates_x, w_rh, w_xi, b_xi, *rest):
        state, init, starts, record, usage_gradient = rest[:9], rest[9:12], *rest[12:15]
        T, B, G = gates_x.shape
        Hd = G // 4
        memory0, read0, write0 = state[3], state[7], state[8]
        N, W = memory0.shape[1:]
        R, H = read0.shape[1], write0.shape[1]
        RW = R * W
        dims, work_size, ctrl_size = _step_shape_info(B, N, W, R, H, Hd)
        new = gates_x.new_empty
        # the backward needs every step's access state and workspace; without it (a rollout,
        # no_grad evaluation) two slots used in turn suffice: step t reads slot (t - 1) % 2
        keep = bool(record and any(ctx.needs_input_grad))
        S = T if keep else min(T, 2)
        hs, cs, rvs = new(T, B, Hd), new(T, B, Hd), new(T, B, R, W)
        access = [
            new(S, B, N, W), new(S, B, N), new(S, B, H, N, N), new(S, B, H, N),
            new(S, B, R, N), new(S, B, H, N),
        ]  # fmt: skip
        allocs = new(S, B, H, N)
        work, cwork = new(S, B, work_size), new(S, B, ctrl_size)
        order = torch.empty(S, B, H, N, dtype=torch.int32)
        # each step's controller input [r_{t-1}; h_{t-1}] (kept for the weight gradients) and
        # whole gates gates_x + [r_{t-1}; h_{t-1}] W_rh: one GEMM per step outside the kernel
        z_in, gates = new(T, B, RW + Hd), new(T, B, G)
        w_xi, b_xi = w_xi.contiguous(), b_xi.contiguous()
        start = tuple(t.reshape(B, -1).contiguous() for t in state[:3])
        start += tuple(t.contiguous() for t in state[3:])
        resets = [False] * T if starts is None else starts.any(1).tolist()
        ctrl_strides = array("q", (G, Hd, Hd, RW, 0, 0, 0))
        in_strides = array("q", (N * W, N, H * N * N, H * N, R * N, H * N))
        kernel = _entry("dnc_step_forward", gates_x.dtype)
        # step t's pointers by arithmetic on the [T, ...] buffers (no per-step tensor views)
        outs = (*access, rvs, allocs, hs, cs)
        out_at, gates_at = [_steps(o) for o in outs], _steps(gates)
        work_at, cwork_at, order_at = _steps(work), _steps(cwork), _steps(order)
        ctrl_ptrs = array("q", (0, 0, 0, 0, 0, w_xi.data_ptr(), b_xi.data_ptr()))  # null W_rh:
        in_ptrs, out_ptrs = array("q", [0] * 6), array("q", [0] * 10)  # the gates given whole
        z_steps, gate_steps, gx_steps = z_in.unbind(0), gates.unbind(0), gates_x.unbind(0)
        h_steps, rv_steps = hs.unbind(0), rvs.view(T, B, RW).unbind(0)
        reset_inputs = {}  # t -> (mask, the state after the reset), kept for the backward
        before = [a.data_ptr() for a in start]  # h, c, r, then the access state
        h_prev, r_prev = start[0], start[2]
        for t in range(T):
            if resets[t]:
                mask = starts[t]
                now = start
                if t > 0:
                    now = (hs[t - 1], cs[t - 1], rvs[t - 1].view(B, RW))
                    now += tuple(a[(t - 1) % S] for a in access)
                m = mask.view(B, 1)
                now = (
                    *(torch.where(m, i, a) for i, a in zip(init, now[:3], strict=True)),
                    *(
                        a.masked_fill(mask.view(B, *([1] * (a.dim() - 1))), v)
                        for a, v in zip(now[3:], INITIAL_ACCESS, strict=True)
                    ),
                )
                reset_inputs[t] = (mask, now)
                before = [a.data_ptr() for a in now]
                h_prev, r_prev = now[0], now[2]
            torch.cat([r_prev, h_prev], dim=1, out=z_steps[t])
            torch.addmm(gx_steps[t], z_steps[t], w_rh, out=gate_steps[t])
            ctrl_ptrs[0] = gates_at[0] + t * gates_at[1]
            ctrl_ptrs[1], ctrl_ptrs[2], ctrl_ptrs[3] = before[0], before[1], before[2]
            for i in range(6):
                in_ptrs[i] = before[3 + i]
            slot = t % S
            for i, (base, step) in enumerate(out_at[:8]):  # access, read vectors, allocation
                out_ptrs[i] = base + (t if i == 6 else slot) * step
            for i, (base, step) in enumerate(out_at[8:], 8):  # h, c: every step
                out_ptrs[i] = base + t * step
            kernel(
                _address(dims), _address(ctrl_ptrs), _address(ctrl_strides), _address(in_ptrs),
                _address(in_strides), _address(out_ptrs), work_at[0] + slot * work_at[1],
                cwork_at[0] + slot * cwork_at[1], order_at[0] + slot * order_at[1],
            )  # fmt: skip
            before = [out_ptrs[8], out_ptrs[9], out_ptrs[6], *out_ptrs[:6]]
            h_prev, r_prev = h_steps[t], rv_steps[t]
        final = (cs[-1], *(a[(T - 1) % S] for a in access))
        if not keep:  # e.g. a rollout: keep nothing
            return (hs, rvs, *final)
        ctx.reset_inputs = reset_inputs
        ctx.usage_gradient = bool(usage_gradient)
        ctx.init_rows = [None if i is None else i.shape[0] for i in init]
        ctx.work = (work, cwork, order)
        ctx.save_for_backward(gates, w_rh, w_xi, b_xi, hs, cs, rvs, allocs, *access, *start, z_in)
        return (hs, rvs, *(a.clone() for a in final))  # (not views of the saved buffers)

    @staticmethod
    def backward(ctx, g_hs, g_rvs, g_c, *g_final):
        saved = ctx.saved_tensors
        gates, weights, (hs, cs, rvs, allocs) = saved[0], saved[1:4], saved[4:8]
        access, start, z_in = saved[8:14], saved[14:23], saved[23]
        w_rh = weights[0]
        work, cwork, order = ctx.work
        T, B, G = gates.shape
        Hd = G // 4
        N, W = access[0].shape[2:]
        R, H = rvs.shape[2], access[5].shape[2]
        RW = R * W
        dims = _step_shape_info(B, N, W, R, H, Hd)[0]
        kernel = _entry("dnc_seq_step_backward", gates.dtype)
        new = gates.new_empty

        def zeros_like(t):
            return torch.zeros_like(t, memory_format=torch.contiguous_format)

        g_hs = zeros_like(hs) if g_hs is None else g_hs.contiguous()
        g_rvs = zeros_like(rvs) if g_rvs is None else g_rvs.contiguous()
        g_rvs = g_rvs.view(T, B, RW)
        # the gradients of the state after step t: c, then the access state (ping-pong between
        # two sets: the kernel reads one and writes the other); [r; h] in g_z, formed outside
        shapes = [(B, Hd), *(a.shape[1:] for a in access)]
        carried = [new(*s) for s in shapes]
        other = [new(*s) for s in shapes]
        carried[0].copy_(g_c) if g_c is not None else carried[0].zero_()
        for i, g in enumerate(g_final):
            carried[1 + i].copy_(g) if g is not None else carried[1 + i].zero_()
        g_z = gates.new_zeros(B, RW + Hd)  # gradient of [r; h] before step t (after: before t+1)
        g_r, g_h = g_z[:, :RW], g_z[:, RW:]
        scratch_h, scratch_r = new(B, Hd), new(B, RW)  # the kernel's g_h0 scratch, unused g_r0
        g_gates, g_xi = torch.empty_like(gates), new(T, B, weights[2].shape[0])
        g_init = [None] * 3
        grad_strides = array("q", (N * W, N, H * N * N, H * N, R * N, H * N, RW, Hd, Hd))
        ctrl_strides = array("q", (G, Hd, Hd, RW, 0, 0, 0))
        in_strides = array("q", (N * W, N, H * N * N, H * N, R * N, H * N))
        weight_ptrs = [0, weights[1].data_ptr(), weights[2].data_ptr()]
        g_h_t, g_rv_t = new(B, Hd), new(B, RW)
        # step t's pointers by arithmetic on the [T, ...] buffers (no per-step tensor views)
        state_at = [_steps(a) for a in (hs, cs, rvs, *access)]  # the state after each step
        out_at = [_steps(a) for a in (access[0], access[4], access[5], allocs, hs)]
        gates_at, g_gates_at, g_xi_at = _steps(gates), _steps(g_gates), _steps(g_xi)
        work_at, cwork_at, order_at = _steps(work), _steps(cwork), _steps(order)
        start_ptrs = [a.data_ptr() for a in start]
        g_h_steps, g_rv_steps, g_gate_steps = g_hs.unbind(0), g_rvs.unbind(0), g_gates.unbind(0)
        w_rh_t = w_rh.t()
        ctrl_ptrs = array("q", [0] * 4 + weight_ptrs)
        in_ptrs, out_ptrs = array("q", [0] * 6), array("q", [0] * 10)
        ptr_sets = {}  # id of a carried set -> (gradient pointers, result pointers)
        for t in reversed(range(T)):
            if t in ctx.reset_inputs:
                before = [a.data_ptr() for a in ctx.reset_inputs[t][1]]
            elif t == 0:
                before = start_ptrs
            else:
                before = [base + (t - 1) * step for base, step in state_at]
            torch.add(g_h_steps[t], g_h, out=g_h_t)
            torch.add(g_rv_steps[t], g_r, out=g_rv_t)
            if id(carried) not in ptr_sets:
                grads = (*carried[1:], g_rv_t, g_h_t, carried[0])
                res = array("q", (g.data_ptr() for g in other[1:]))
                res.extend((0, scratch_h.data_ptr(), other[0].data_ptr(), scratch_r.data_ptr()))
                res.extend((0, 0, 0))  # the parameters' gradients: below, over all steps
                ptr_sets[id(carried)] = (array("q", (g.data_ptr() for g in grads)), res)
            grad_ptrs, res_ptrs = ptr_sets[id(carried)]
            res_ptrs[6] = g_gates_at[0] + t * g_gates_at[1]
            ctrl_ptrs[0] = gates_at[0] + t * gates_at[1]
            ctrl_ptrs[1], ctrl_ptrs[2], ctrl_ptrs[3] = before[0], before[1], before[2]
            for i in range(6):
                in_ptrs[i] = before[3 + i]
            (m_at, r_at, w_at, a_at, h_at) = ((base + t * step) for base, step in out_at)
            out_ptrs[0], out_ptrs[4], out_ptrs[5], out_ptrs[7], out_ptrs[8] = (
                m_at,
                r_at,
                w_at,
                a_at,
                h_at,
            )
            kernel(
                _address(dims), _address(grad_ptrs), _address(grad_strides),
                _address(ctrl_ptrs), _address(ctrl_strides), _address(in_ptrs),
                _address(in_strides), _address(out_ptrs), work_at[0] + t * work_at[1],
                cwork_at[0] + t * cwork_at[1], order_at[0] + t * order_at[1],
                _address(res_ptrs), g_xi_at[0] + t * g_xi_at[1], ctx.usage_gradient,
            )  # fmt: skip
            torch.mm(g_gate_steps[t], w_rh_t, out=g_z)  # gradient of [r; h] before step t
            carried, other = other, carried
            if t in ctx.reset_inputs:  # reset elements' state came from the initial state
                mask = ctx.reset_inputs[t][0]
                m = mask.view(B, 1)
                for i, g in ((0, g_h), (1, carried[0]), (2, g_r)):  # h, c, r
                    part = torch.where(m, g, 0.0)  # (the initial access state is constant)
                    if ctx.init_rows[i] == 1:  # an initial state broadcast over the batch
                        part = part.sum(0, keepdim=True)
                    g_init[i] = part if g_init[i] is None else g_init[i] + part
                g_z.masked_fill_(m, 0.0)
                for g in carried:
                    g.masked_fill_(mask.view(B, *([1] * (g.dim() - 1))), 0.0)
        # the parameters' gradients over all steps at once ([T*B]-row products): gates =
        # gates_x + [r_{t-1}; h_{t-1}] W_rh and ξ = h W_ξ + b
        g_w_rh = z_in.view(T * B, -1).t().mm(g_gates.view(T * B, G))
        g_w_xi = hs.view(T * B, Hd).t().mm(g_xi.view(T * B, -1))
        g_b = g_xi.view(T * B, -1).sum(0)
        g_write0 = carried[6] if ctx.usage_gradient else None  # (zeros: w^w_{t-1} stopped)
        g_start = (g_h.clone(), carried[0], g_r.clone(), *carried[1:6], g_write0)
        return (g_gates, g_w_rh, g_w_xi, g_b, *g_start, *g_init, None, None, None)
