"""The NTM memory access step as one autograd function with a hand-derived backward.

Graves, Wayne & Danihelka 2014, "Neural Turing Machines", arXiv:1410.5401, section 3: for each of
``H`` (write head, read head) pairs, the write head addresses ``M_{t-1}`` (content eqs. 5-6,
interpolation eq. 7, circular shift eq. 8, sharpening eq. 9), all heads erase then add (eqs. 3-4),
then the read heads address ``M_t`` the same way and read (eq. 2). The equations, their order and
their numerical details (``eps`` under the norms and before sharpening, torch's softplus threshold)
are those of :meth:`memagents.cores.ntm.NTMCore.step` with ``fused=False``, which stays the
reference; tests compare the paths in float64.

Why: under plain autograd an NTM step is ~70 small eager ops forward and ~130 backward, whose
dispatch costs far more than their arithmetic at RL sizes (``B`` ≈ 8-64, ``N`` ≈ 32-256). On CPU
this function runs forward and backward as one C++ kernel call each (``csrc/ntm_access.cpp``,
loaded by :mod:`memagents.cores.native`); elsewhere (CUDA, other dtypes, ``MEMAGENTS_NATIVE=0``)
it runs the same hand-derived backward as a few dozen batched torch ops.

The head parameters enter **raw** (the controller's linear output, before activations), one row
of ``P`` numbers per batch element, laid out as :func:`head_sizes` says::

    read : key H*W | beta H | gate H | shift H*K | gamma H
    write: key H*W | beta H | gate H | shift H*K | gamma H | erase H*W | add H*W

with ``β = softplus``, ``g = sigmoid``, ``s = softmax`` over ``K = 2S + 1`` shifts, ``γ = 1 +
softplus``, ``e = sigmoid``; keys and add vectors are used as they are. Taking them raw lets the
activations (and their derivatives) run inside the kernel instead of as separate autograd nodes.

Shapes: ``B`` batch, ``N`` rows, ``W`` word size, ``H`` head pairs, ``S`` maximum shift.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from memagents.cores import addressing, native
from memagents.cores.addressing import EPSILON

#: torch's default softplus threshold: ``softplus(x) = x`` for ``x > 20``.
SOFTPLUS_THRESHOLD = 20.0


def head_sizes(num_heads: int, word_size: int, max_shift: int) -> tuple[list[int], list[int]]:
    """Sizes of the raw parameter blocks ``(read, write)``, in the order of the packed row.

    :return: ``[H*W, H, H, H*K, H]`` (key, β, g, s, γ) for the read heads and the same plus
        ``[H*W, H*W]`` (erase, add) for the write heads; ``K = 2S + 1``.
    """
    H, W, K = num_heads, word_size, 2 * max_shift + 1
    read = [H * W, H, H, H * K, H]
    return read, [*read, H * W, H * W]


# -- the native kernel -----------------------------------------------------------------------------
_ARGTYPES_SET: set[int] = set()


def _kernel():
    """The compiled ``ntm_access`` library or ``None`` (see :func:`native.load`)."""
    lib = native.load("ntm_access")
    if lib is not None and id(lib) not in _ARGTYPES_SET:
        p, i, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        for suffix in ("f32", "f64"):
            size = getattr(lib, f"ntm_workspace_size_{suffix}")
            size.argtypes, size.restype = [i, i, i, i], L
            fwd = getattr(lib, f"ntm_forward_{suffix}")
            fwd.argtypes, fwd.restype = [L, i, i, i, i] + [p] * 9, None
            bwd = getattr(lib, f"ntm_backward_{suffix}")
            bwd.argtypes, bwd.restype = [L, i, i, i, i] + [p] * 16, None
        _ARGTYPES_SET.add(id(lib))
    return lib


def _suffix(dtype: torch.dtype) -> str:
    return "f64" if dtype == torch.float64 else "f32"


# -- torch implementation --------------------------------------------------------------------------
def _softplus_grad(x: Tensor) -> Tensor:
    """Derivative of torch's softplus (threshold 20)."""
    return torch.where(x > SOFTPLUS_THRESHOLD, torch.ones_like(x), torch.sigmoid(x))


def _address_forward(
    memory, mem_norm, previous, key, beta_raw, gate_raw, shift_raw, gamma_raw, index
):
    """The four stages of section 3.3 for ``H`` heads (as ``NTMCore._address``).

    memory ``[B, N, W]``, mem_norm ``[B, N]``, previous ``[B, H, N]``, key ``[B, H, W]``,
    beta/gate/gamma raw ``[B, H]``, shift raw ``[B, H, K]``, index ``[N, K]`` -> ``[B, H, N]``.
    """
    key_norm = torch.sqrt(key.square().sum(-1) + EPSILON)  # [B, H]
    beta = F.softplus(beta_raw)
    gate = torch.sigmoid(gate_raw)
    gamma = addressing.oneplus(gamma_raw)
    shift = torch.softmax(shift_raw, -1)
    dot = torch.bmm(key, memory.transpose(1, 2))  # [B, H, N]
    sim = dot / (key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1))
    content = torch.softmax(sim * beta.unsqueeze(-1), -1)  # w^c (eq. 5)
    gated = previous + gate.unsqueeze(-1) * (content - previous)  # w^g (eq. 7)
    shifted = torch.einsum("bhnk,bhk->bhn", gated[..., index], shift)  # w~ (eq. 8)
    powered = (shifted + EPSILON).pow(gamma.unsqueeze(-1))
    weights = powered / powered.sum(-1, keepdim=True)  # (eq. 9)
    cache = (key, beta_raw, gamma_raw, key_norm, beta, gate, gamma, shift, sim)
    cache += (content, gated, shifted, previous, weights)
    return weights, cache


def _address_backward(grad, memory, mem_norm, cache, index):
    """Gradients ``(memory, previous, key, beta_raw, gate_raw, shift_raw, gamma_raw)`` of
    :func:`_address_forward` given the gradient ``[B, H, N]`` of its weighting."""
    key, beta_raw, gamma_raw, key_norm, beta, gate, gamma, shift, sim = cache[:9]
    content, gated, shifted, previous, weights = cache[9:]
    # sharpening: t = p * dL/dp = w (g - <g, w>); p = (w~ + eps)^γ
    t = weights * (grad - (grad * weights).sum(-1, keepdim=True))
    base = shifted + EPSILON
    g_shifted = gamma.unsqueeze(-1) * t / base
    g_gamma_raw = (t * torch.log(base)).sum(-1) * _softplus_grad(gamma_raw)
    # circular shift: g_s[k] = sum_i g~[i] w^g[i - k + S];  g_wg[j] = sum_k g~[j + k - S] s[k]
    g_shift = torch.einsum("bhn,bhnk->bhk", g_shifted, gated[..., index])
    g_shift_raw = shift * (g_shift - (g_shift * shift).sum(-1, keepdim=True))
    g_gated = torch.einsum("bhnk,bhk->bhn", g_shifted[..., index], shift.flip(-1))
    # interpolation
    g_gate_raw = (g_gated * (content - previous)).sum(-1) * gate * (1.0 - gate)
    g_previous = (1.0 - gate).unsqueeze(-1) * g_gated
    g_content = gate.unsqueeze(-1) * g_gated
    # content softmax and cosine similarity
    g_z = content * (g_content - (g_content * content).sum(-1, keepdim=True))
    g_beta_raw = (g_z * sim).sum(-1) * _softplus_grad(beta_raw)
    g_sim = g_z * beta.unsqueeze(-1)
    g_dot = g_sim / (key_norm.unsqueeze(-1) * mem_norm.unsqueeze(1))
    g_ss = g_sim * sim
    g_key = torch.bmm(g_dot, memory) - key * (g_ss.sum(-1) / key_norm.square()).unsqueeze(-1)
    g_memory = torch.bmm(g_dot.transpose(1, 2), key) - memory * (
        g_ss.sum(1) / mem_norm.square()
    ).unsqueeze(-1)
    return g_memory, g_previous, g_key, g_beta_raw, g_gate_raw, g_shift_raw, g_gamma_raw


def _others_product(x: Tensor, dim: int) -> Tensor:
    """``out[k] = prod_{j != k} x[j]`` along ``dim`` (prefix times suffix products, no division)."""
    n = x.shape[dim]
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    prefix = torch.cumprod(torch.cat([ones, x.narrow(dim, 0, n - 1)], dim), dim)
    flipped = x.flip(dim)
    suffix = torch.cumprod(torch.cat([ones, flipped.narrow(dim, 0, n - 1)], dim), dim).flip(dim)
    return prefix * suffix


def _split(params: Tensor, H: int, W: int, S: int):
    B, K = params.shape[0], 2 * S + 1
    read, write = head_sizes(H, W, S)
    parts = params.split(read + write, dim=-1)
    shapes = [(B, H, W), (B, H), (B, H), (B, H, K), (B, H)]
    r = [p.reshape(s) for p, s in zip(parts[:5], shapes, strict=True)]
    w = [p.reshape(s) for p, s in zip(parts[5:10], shapes, strict=True)]
    return r, w, parts[10].reshape(B, H, W), parts[11].reshape(B, H, W)


def _torch_forward(memory, read_prev, write_prev, params, H, S, index):
    W = memory.shape[-1]
    r_args, w_args, erase_raw, add = _split(params, H, W, S)
    norm0 = torch.sqrt(memory.square().sum(-1) + EPSILON)
    write_weights, w_cache = _address_forward(memory, norm0, write_prev, *w_args, index)
    erase = torch.sigmoid(erase_raw)
    memory_out = addressing.erase_and_add(memory, write_weights, erase, add)
    norm1 = torch.sqrt(memory_out.square().sum(-1) + EPSILON)
    read_weights, r_cache = _address_forward(memory_out, norm1, read_prev, *r_args, index)
    read_vectors = torch.bmm(read_weights, memory_out)
    outputs = (memory_out, write_weights, read_weights, read_vectors)
    return outputs, (memory, norm0, norm1, memory_out, erase, add, *w_cache, *r_cache)


def _torch_backward(grads, cache, index):
    g_memory_out, g_write, g_read, g_vectors = grads
    memory, norm0, norm1, memory_out, erase, add = cache[:6]
    w_cache, r_cache = cache[6:20], cache[20:]
    write_weights, read_weights = w_cache[-1], r_cache[-1]
    # read vectors r = w^r M_t
    g_m1 = torch.baddbmm(g_memory_out, read_weights.transpose(1, 2), g_vectors)
    g_read = torch.baddbmm(g_read, g_vectors, memory_out.transpose(1, 2))
    gm, g_read_prev, *r_grads = _address_backward(g_read, memory_out, norm1, r_cache, index)
    g_m1 = g_m1 + gm
    # erase and add: M_t = M_{t-1} * prod_h f_h + sum_h w_h a_h^T, f_h = 1 - w_h e_h^T
    factors = 1.0 - write_weights.unsqueeze(-1) * erase.unsqueeze(2)  # [B, H, N, W]
    keep = torch.prod(factors, dim=1)
    g_factors = (g_m1 * memory).unsqueeze(1) * _others_product(factors, 1)  # [B, H, N, W]
    g_memory = g_m1 * keep
    g_add = torch.bmm(write_weights, g_m1)  # [B, H, W]
    g_write = g_write + torch.bmm(add, g_m1.transpose(1, 2))
    g_write = g_write - (g_factors * erase.unsqueeze(2)).sum(-1)
    g_erase = -(g_factors * write_weights.unsqueeze(-1)).sum(2)
    g_erase_raw = g_erase * erase * (1.0 - erase)
    gm, g_write_prev, *w_grads = _address_backward(g_write, memory, norm0, w_cache, index)
    g_memory = g_memory + gm
    B = memory.shape[0]
    flat = [g.reshape(B, -1) for g in (*r_grads, *w_grads, g_erase_raw, g_add)]
    return g_memory, g_read_prev, g_write_prev, torch.cat(flat, dim=-1)


# -- the autograd function -------------------------------------------------------------------------
class NTMAccessStep(torch.autograd.Function):
    """One NTM access step: ``(M_{t-1}, w^r_{t-1}, w^w_{t-1}, raw head parameters) ->
    (M_t, w^w_t, w^r_t, r_t)``.

    Inputs: ``memory [B, N, W]``, ``read_weights [B, H, N]``, ``write_weights [B, H, N]``,
    ``params [B, P]`` (raw, laid out as in the module docstring), ``num_heads`` ``H``,
    ``max_shift`` ``S``. Outputs: ``memory [B, N, W]``, ``write_weights [B, H, N]``,
    ``read_weights [B, H, N]``, ``read_vectors [B, H, W]``.
    """

    @staticmethod
    def forward(ctx, memory, read_weights, write_weights, params, num_heads, max_shift):
        H, S = int(num_heads), int(max_shift)
        B, N, W = memory.shape
        expected = sum(sum(s) for s in head_sizes(H, W, S))
        if params.shape != (B, expected) or read_weights.shape != (B, H, N):
            raise ValueError(
                f"NTMAccessStep: params {tuple(params.shape)} (expected {(B, expected)}), "
                f"read weights {tuple(read_weights.shape)} (expected {(B, H, N)})"
            )
        ctx.dims = (H, S)
        lib = _kernel()
        if lib is not None and native.usable(memory, read_weights, write_weights, params):
            inputs = [t.contiguous() for t in (memory, read_weights, write_weights, params)]
            memory_out = torch.empty_like(inputs[0])
            write_out = torch.empty_like(inputs[1])
            read_out = torch.empty_like(inputs[1])
            vectors = memory.new_empty(B, H, W)
            sfx = _suffix(memory.dtype)
            workspace = None
            if any(ctx.needs_input_grad[:4]):
                size = getattr(lib, f"ntm_workspace_size_{sfx}")(N, W, H, S)
                workspace = memory.new_empty(B, size)
            getattr(lib, f"ntm_forward_{sfx}")(
                B, N, W, H, S, *(native.ptr(t) for t in inputs),
                native.ptr(memory_out), native.ptr(write_out), native.ptr(read_out),
                native.ptr(vectors), None if workspace is None else native.ptr(workspace),
            )  # fmt: skip
            ctx.native = True
            if workspace is not None:
                ctx.save_for_backward(*inputs, memory_out, write_out, read_out, workspace)
            return memory_out, write_out, read_out, vectors
        ctx.native = False
        index = addressing.shift_index(N, S, device=memory.device)
        outputs, cache = _torch_forward(memory, read_weights, write_weights, params, H, S, index)
        ctx.save_for_backward(*cache)
        return outputs

    @staticmethod
    def backward(ctx, g_memory, g_write, g_read, g_vectors):
        H, S = ctx.dims
        if ctx.native:
            saved = ctx.saved_tensors
            memory = saved[0]
            B, N, W = memory.shape
            grads = [g.contiguous() for g in (g_memory, g_write, g_read, g_vectors)]
            outs = [torch.empty_like(t) for t in saved[:4]]
            getattr(_kernel(), f"ntm_backward_{_suffix(memory.dtype)}")(
                B, N, W, H, S, *(native.ptr(t) for t in saved),
                *(native.ptr(g) for g in grads), *(native.ptr(t) for t in outs),
            )  # fmt: skip
            return (*outs, None, None)
        cache = ctx.saved_tensors
        index = addressing.shift_index(cache[0].shape[1], S, device=g_memory.device)
        grads = _torch_backward((g_memory, g_write, g_read, g_vectors), cache, index)
        return (*grads, None, None)


def ntm_access(
    memory: Tensor,
    read_weights: Tensor,
    write_weights: Tensor,
    params: Tensor,
    num_heads: int,
    max_shift: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`NTMAccessStep` as a function.

    :param memory: ``[B, N, W]`` ``M_{t-1}``.
    :param read_weights: ``[B, H, N]`` ``w^r_{t-1}``.
    :param write_weights: ``[B, H, N]`` ``w^w_{t-1}``.
    :param params: ``[B, P]`` raw head parameters (layout: :func:`head_sizes`).
    :param num_heads: ``H``.
    :param max_shift: ``S``.
    :return: ``(M_t [B, N, W], w^w_t [B, H, N], w^r_t [B, H, N], r_t [B, H, W])``.
    """
    return NTMAccessStep.apply(memory, read_weights, write_weights, params, num_heads, max_shift)
