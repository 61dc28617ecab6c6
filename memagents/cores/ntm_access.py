"""The NTM memory access step (and a whole NTM sequence) as autograd functions with hand-derived
backwards.

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

:class:`NTMSequence` goes one level up, for the native path: ``T`` whole steps of the core
(controller LSTM cell, head layer, access) as a single autograd node, with backpropagation
through time written out, so that a training sequence records one node instead of ``T`` times a
dozen (the controller's cell, linear layers, concatenations, views).

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
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from memagents.cores import addressing, native
from memagents.cores.addressing import EPSILON, others_product

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
class _Kernels(NamedTuple):
    """The kernel entry points of one dtype (see ``csrc/ntm_access.cpp``)."""

    workspace_size: Callable
    forward: Callable
    backward: Callable
    step_forward: Callable
    step_backward: Callable


_p, _i, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
#: the entry points of ``csrc/ntm_access.cpp`` (``_*``: the float32 and float64 variants).
SIGNATURES: dict[str, native.Signature] = {
    "ntm_workspace_size_*": ([_i, _i, _i, _i], _L),
    "ntm_forward_*": ([_L, _i, _i, _i, _i, _L] + [_p] * 9, None),
    "ntm_backward_*": ([_L, _i, _i, _i, _i, _L] + [_p] * 16, None),
    "ntm_step_forward_*": ([_L, _i, _i, _i, _i, _i] + [_p] * 14, None),
    "ntm_step_backward_*": ([_L, _i, _i, _i, _i, _i] + [_p] * 20, None),
}


def _kernel():
    """The compiled ``ntm_access`` library or ``None`` (see :func:`native.load`)."""
    return native.load("ntm_access", SIGNATURES)


def _functions(lib, dtype: torch.dtype) -> _Kernels:
    """The typed entry points of ``lib`` for ``dtype`` (float32 or float64)."""
    return _Kernels(*(native.kernel(lib, f"ntm_{n}", dtype) for n in _Kernels._fields))


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
    g_factors = (g_m1 * memory).unsqueeze(1) * others_product(factors, 1)  # [B, H, N, W]
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
    ``max_shift`` ``S``, ``record`` (``False``: no backward will be needed, keep nothing).
    Outputs: ``memory [B, N, W]``, ``write_weights [B, H, N]``, ``read_weights [B, H, N]``,
    ``read_vectors [B, H, W]``.
    """

    @staticmethod
    def forward(
        ctx, memory, read_weights, write_weights, params, num_heads, max_shift, record=True
    ):
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
            k = _functions(lib, memory.dtype)
            inputs = [t.contiguous() for t in (memory, read_weights, write_weights, params)]
            memory_out = torch.empty_like(inputs[0])
            write_out = torch.empty_like(inputs[1])
            read_out = torch.empty_like(inputs[1])
            vectors = memory.new_empty(B, H, W)
            workspace = None
            if record and any(ctx.needs_input_grad[:4]):
                workspace = memory.new_empty(B, k.workspace_size(N, W, H, S))
            k.forward(
                B, N, W, H, S, H * W, *(t.data_ptr() for t in inputs), memory_out.data_ptr(),
                write_out.data_ptr(), read_out.data_ptr(), vectors.data_ptr(),
                None if workspace is None else workspace.data_ptr(),
            )  # fmt: skip
            ctx.native = True
            if workspace is not None:
                ctx.save_for_backward(*inputs, memory_out, write_out, read_out, workspace)
            return memory_out, write_out, read_out, vectors
        ctx.native = False
        index = addressing.shift_index(N, S, device=memory.device)
        outputs, cache = _torch_forward(memory, read_weights, write_weights, params, H, S, index)
        if record:
            ctx.save_for_backward(*cache)
        return outputs

    @staticmethod
    def backward(ctx, g_memory, g_write, g_read, g_vectors):
        H, S = ctx.dims
        saved = ctx.saved_tensors
        if ctx.native:
            memory = saved[0]
            B, N, W = memory.shape
            grads = [g.contiguous() for g in (g_memory, g_write, g_read, g_vectors)]
            outs = [torch.empty_like(t) for t in saved[:4]]
            _functions(_kernel(), memory.dtype).backward(
                B, N, W, H, S, H * W, *(t.data_ptr() for t in saved),
                *(g.data_ptr() for g in grads), *(t.data_ptr() for t in outs),
            )  # fmt: skip
            return (*outs, None, None, None)
        index = addressing.shift_index(saved[0].shape[1], S, device=g_memory.device)
        grads = _torch_backward((g_memory, g_write, g_read, g_vectors), saved, index)
        return (*grads, None, None, None)


class NTMSequence(torch.autograd.Function):
    """``T`` whole NTM steps (controller LSTM cell, head parameters, memory access) as one
    autograd node, its backward being backpropagation through time by hand. Native kernels only
    (CPU, float32/float64): callers check :func:`sequence_available` first.

    Step ``t`` (Graves et al. 2014, section 2: the controller sees ``x_t`` and ``r_{t-1}``):

    - where ``starts[t, b]``, element ``b``'s state is first replaced by the initial state;
    - gates ``= x_proj[t] + [h_{t-1}; r_{t-1}] w_state^T``, then the LSTM cell (torch's gate order
      ``i, f, g, o``) gives ``c_t, h_t``;
    - raw head parameters ``h_t w_heads^T + b_heads``, then the access of :class:`NTMAccessStep`.

    The input projection ``x_proj`` (all steps, with both LSTM biases) is computed by the caller
    in one call under autograd, and the weight gradients are formed once over all steps
    (``[T*B]``-row matrix products), so each step costs one matrix product (the gates) and one
    kernel call (cell, heads, access: ``ntm_step_forward``) forward, and the same backward.

    Inputs: ``x_proj [T, B, 4Hd]``; ``w_state [4Hd, Hd + H*W]`` (acting on ``[h; r]``);
    ``w_heads [P, Hd]``; ``b_heads [P]``; the state before step 0: ``h [B, Hd]``, ``c [B, Hd]``,
    ``r [B, H, W]``, ``M [B, N, W]``, ``w^r [B, H, N]``, ``w^w [B, H, N]``; the initial state in the
    same six shapes or with a leading 1 instead of ``B`` (broadcast; all ``None`` when ``starts``
    is ``None``); ``starts [T, B]`` bool or ``None``; ``H``; ``S``; ``record`` (``False``: no
    backward, keep nothing).

    Outputs: ``y [T, B, Hd + H*W]`` (``[h_t; r_t]``), and the final ``c [B, Hd]``,
    ``M [B, N, W]``, ``w^r [B, H, N]``, ``w^w [B, H, N]`` (``h_T`` and ``r_T`` are in ``y[-1]``).
    """

    @staticmethod
    def forward(
        ctx, x_proj, w_state, w_heads, b_heads, h, c, r, memory, read_w, write_w,
        init_h, init_c, init_r, init_memory, init_read_w, init_write_w, starts,
        num_heads, max_shift, record=True,
    ):  # fmt: skip
        H, S = int(num_heads), int(max_shift)
        T, B, G = x_proj.shape
        Hd, (N, W), P = G // 4, memory.shape[1:], w_heads.shape[0]
        D = Hd + H * W
        k = _functions(_kernel(), x_proj.dtype)
        new = x_proj.new_empty
        x_proj = x_proj.contiguous()
        w_state_t, w_heads = w_state.t(), w_heads.contiguous()  # [D, 4Hd], [P, Hd]
        gates, cells, params = new(T, B, G), new(T, B, Hd), new(T, B, P)
        memories, reads, writes = new(T, B, N, W), new(T, B, H, N), new(T, B, H, N)
        y = new(T, B, D)
        record = record and any(ctx.needs_input_grad)
        ws = new(T, B, k.workspace_size(N, W, H, S)) if record else None
        at = _StepPointers(gates, cells, params, memories, reads, writes, y, ws)

        z = torch.cat([h.reshape(B, Hd), r.reshape(B, H * W)], 1)  # [h; r]: [B, D]
        start = (z, c.reshape(B, Hd).contiguous(), memory.contiguous())
        start += (read_w.contiguous(), write_w.contiguous())
        state = [t.data_ptr() for t in start[1:]]  # pointers to c, M, w^r, w^w before step t
        resets = [False] * T if starts is None else starts.any(1).tolist()
        if any(resets):
            init_z = torch.cat([init_h.expand(B, Hd), init_r.expand(B, H, W).reshape(B, -1)], 1)
            init = (init_z, init_c, init_memory, init_read_w, init_write_w)
        reset_inputs = {}  # t -> (mask, the state after the reset), kept for the backward
        xs, gs, ys = x_proj.unbind(0), gates.unbind(0), y.unbind(0)
        w_heads_ptr, b_heads_ptr = w_heads.data_ptr(), b_heads.contiguous().data_ptr()
        for t in range(T):
            if resets[t]:
                mask = starts[t]
                before = start if t == 0 else (z, cells[t - 1], memories[t - 1])
                before = before if t == 0 else (*before, reads[t - 1], writes[t - 1])
                after = tuple(
                    torch.where(mask.view(B, *([1] * (a.dim() - 1))), i, a)
                    for i, a in zip(init, before, strict=True)
                )
                reset_inputs[t] = (mask, after)
                z, state = after[0], [a.data_ptr() for a in after[1:]]
            torch.addmm(xs[t], z, w_state_t, out=gs[t])
            k.step_forward(
                B, N, W, H, S, Hd, at.gates[t], state[0], at.cells[t], at.y[t], w_heads_ptr,
                b_heads_ptr, at.params[t], state[1], state[2], state[3], at.memories[t],
                at.writes[t], at.reads[t], at.ws[t],
            )  # fmt: skip
            z, state = ys[t], [at.cells[t], at.memories[t], at.reads[t], at.writes[t]]
        if record:
            ctx.dims = (H, S)
            ctx.reset_inputs = reset_inputs
            ctx.save_for_backward(
                w_state, w_heads, gates, cells, params, memories, reads, writes, ws, y, *start
            )
        last = (cells[-1], memories[-1], reads[-1], writes[-1])
        if record:  # outputs apart from the buffers saved for the backward
            last = tuple(t.clone() for t in last)
        return (y, *last)

    @staticmethod
    def backward(ctx, g_y, g_c, g_memory, g_read, g_write):
        H, S = ctx.dims
        saved = ctx.saved_tensors
        w_state, w_heads, gates, cells, params, memories, reads, writes, ws, y = saved[:10]
        start = saved[10:]
        T, B, D = y.shape
        G, P, (N, W) = gates.shape[-1], params.shape[-1], memories.shape[-2:]
        Hd = G // 4
        k = _functions(_kernel(), y.dtype)
        g_y = g_y.contiguous()
        g_gates, g_params = torch.empty_like(gates), torch.empty_like(params)
        at = _StepPointers(
            gates, cells, params, memories, reads, writes, y, ws, g_y, g_params, g_gates
        )
        g_gate_steps = g_gates.unbind(0)
        w_heads = w_heads.contiguous()
        # Gradients of the state after step t, carried backwards and updated in place by the
        # kernel to those of the state before step t: [h; r] (less g_y), c, M, w^r, w^w.
        g_z = y.new_zeros(B, D)
        carried = (g_z, g_c.clone(memory_format=torch.contiguous_format))
        carried += tuple(
            g.clone(memory_format=torch.contiguous_format) for g in (g_memory, g_read, g_write)
        )
        g_cell, g_mem, g_rw, g_ww = carried[1:]
        g_init = [torch.zeros_like(g) for g in carried] if ctx.reset_inputs else None
        start_ptrs = [t.data_ptr() for t in start[1:]]
        for t in reversed(range(T)):
            if t in ctx.reset_inputs:
                state = [a.data_ptr() for a in ctx.reset_inputs[t][1][1:]]
            elif t == 0:
                state = start_ptrs
            else:
                state = [at.cells[t - 1], at.memories[t - 1], at.reads[t - 1], at.writes[t - 1]]
            k.step_backward(
                B, N, W, H, S, Hd, at.gates[t], state[0], at.cells[t], w_heads.data_ptr(),
                state[1], state[2], state[3], at.params[t], at.memories[t], at.writes[t],
                at.reads[t], at.ws[t], at.g_y[t], g_z.data_ptr(), g_mem.data_ptr(),
                g_ww.data_ptr(), g_rw.data_ptr(), g_cell.data_ptr(), at.g_params[t],
                at.g_gates[t],
            )  # fmt: skip
            torch.mm(g_gate_steps[t], w_state, out=g_z)  # gradient of [h; r] before step t
            if t in ctx.reset_inputs:  # reset elements' inputs came from the initial state
                mask = ctx.reset_inputs[t][0]
                for g, acc in zip(carried, g_init, strict=True):
                    m = mask.view(B, *([1] * (g.dim() - 1)))
                    acc.add_(torch.where(m, g, 0.0))
                    g.masked_fill_(m, 0.0)
        # weight gradients over all steps at once: the inputs [h; r] of every step
        z_in = torch.cat([start[0].unsqueeze(0), y[:-1]])
        for t, (_, after) in ctx.reset_inputs.items():
            z_in[t] = after[0]
        g_gates_2d, g_params_2d = g_gates.view(T * B, G), g_params.view(T * B, P)
        g_w_state = g_gates_2d.t().mm(z_in.view(T * B, D))
        g_w_heads = g_params_2d.t().mm(y.view(T * B, D)[:, :Hd])
        g_b_heads = g_params_2d.sum(0)

        def split(g_z, g_cell, g_mem, g_rw, g_ww):  # as the inputs h, c, r, M, w^r, w^w
            return g_z[:, :Hd], g_cell, g_z[:, Hd:].reshape(B, H, W), g_mem, g_rw, g_ww

        g_init = (None,) * 6 if g_init is None else split(*g_init)
        return (
            g_gates, g_w_state, g_w_heads, g_b_heads, *split(*carried), *g_init,
            None, None, None, None,
        )  # fmt: skip


class _StepPointers:
    """Data pointers of the per-step slices of ``[T, ...]`` contiguous buffers, by name:
    ``at.gates[t]`` is the address of ``gates[t]``; a ``None`` buffer gives ``None`` for every
    step."""

    _NAMES = ("gates", "cells", "params", "memories", "reads", "writes", "y", "ws")
    _NAMES += ("g_y", "g_params", "g_gates")

    def __init__(self, *buffers: Tensor | None):
        T = buffers[0].shape[0]
        for name, buf in zip(self._NAMES, buffers, strict=False):
            if buf is None:
                setattr(self, name, [None] * T)
                continue
            base, size = buf.data_ptr(), buf.stride(0) * buf.element_size()
            setattr(self, name, range(base, base + T * size, size))


def sequence_available(*tensors: Tensor) -> bool:
    """Whether :class:`NTMSequence` can run on these tensors (its kernels built, CPU, one float
    dtype)."""
    return _kernel() is not None and native.usable(*tensors)


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
    return NTMAccessStep.apply(
        memory, read_weights, write_weights, params, num_heads, max_shift, torch.is_grad_enabled()
    )
