"""The controller's LSTM cell inside the sequence nodes of SAM and the SDNC.

:class:`~memagents.cores.sam.SAMSequence` and :class:`~memagents.cores.sdnc.SDNCSequence` run a
whole training call as one autograd node, backpropagating through time by hand. Their controller
is torch's ``nn.LSTMCell`` (Hochreiter & Schmidhuber 1997; gates ``i, f, g, o``) over
``[x_t; r_{t-1}]``, split here so that the input's share of the gates is one product over all
steps and each step costs one product over the recurrent part ``z_{t-1} = [h_{t-1}; r_{t-1}]``:

    gates_t = x_proj[t] + z_{t-1} w_stateᵀ,  x_proj = x W_ixᵀ + b_ih + b_hh,
    w_state = [W_hh, W_ir],  c_t = f c_{t-1} + i g,  h_t = o tanh(c_t).

The cell itself is the native kernel ``sdnc_lstm_forward``/``_backward`` of
``csrc/sparse_links.cpp``. Shapes: ``B`` batch, ``Hd`` controller units, ``G = 4 Hd``, ``D`` the
width of ``z``.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from memagents.cores import native


def input_gates(x: Tensor, cell: nn.LSTMCell, input_size: int) -> tuple[Tensor, Tensor]:
    """``(x_proj [T, B, G], w_state [G, D])`` for ``x [T, B, input_size]`` and a ``cell`` whose
    input is ``[x_t; r_{t-1}]`` (under autograd: gradients reach the cell's parameters)."""
    I = input_size
    x_proj = nn.functional.linear(x, cell.weight_ih[:, :I], cell.bias_ih + cell.bias_hh)
    return x_proj, torch.cat([cell.weight_hh, cell.weight_ih[:, I:]], dim=1)


def forward_step(
    fn: ctypes._CFuncPtr, x_proj_t: Tensor, z: Tensor, w_state_t: Tensor, c: Tensor, y_t: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One cell step: ``h_t`` is written into the first ``Hd`` columns of ``y_t [B, ·]`` (a row
    of the output, contiguous). Returns ``(acts [B, G], c_prev, c_t, tanh(c_t))``: the gates'
    activations and what :func:`backward_step` needs."""
    B, Hd = c.shape
    acts = torch.addmm(x_proj_t, z, w_state_t)  # pre-activations, then activations
    c_prev, c, tanh_c = c.contiguous(), c.new_empty(B, Hd), c.new_empty(B, Hd)
    fn(B, Hd, acts.data_ptr(), c_prev.data_ptr(), c.data_ptr(), tanh_c.data_ptr(),
       y_t.data_ptr(), y_t.shape[-1])  # fmt: skip
    return acts, c_prev, c, tanh_c


def backward_step(
    fn: ctypes._CFuncPtr,
    saved: tuple[Tensor, Tensor, Tensor],
    g_h: Tensor,
    g_c: Tensor | None,
    g_gates: Tensor,
) -> Tensor:
    """The cell backwards from ``g_h [B, Hd]`` and ``g_c`` (``None``: zero): writes the gates'
    pre-activation gradients into ``g_gates [B, G]`` (contiguous) and returns ``dL/dc_{t-1}``.

    :param saved: ``(acts, c_prev, tanh_c)`` of :func:`forward_step`.
    """
    acts, c_prev, tanh_c = saved
    g_c_prev = torch.empty_like(c_prev)
    g_h = g_h.contiguous()
    g_c = None if g_c is None else g_c.contiguous()
    fn(
        c_prev.shape[0], c_prev.shape[1], acts.data_ptr(), c_prev.data_ptr(), tanh_c.data_ptr(),
        g_h.data_ptr(), None if g_c is None else g_c.data_ptr(), g_gates.data_ptr(),
        g_c_prev.data_ptr(),
    )  # fmt: skip
    return g_c_prev


def kernels(lib: ctypes.CDLL, like: Tensor) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """The forward and backward cell kernels for the dtype of ``like``."""
    return (
        native.kernel(lib, "sdnc_lstm_forward", like.dtype),
        native.kernel(lib, "sdnc_lstm_backward", like.dtype),
    )


def route_reset(
    m: Tensor, g_z: Tensor, g_c: Tensor, g_init_z: Tensor | None, g_init_c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At a step where the elements of ``m [B, 1]`` (bool) started an episode, their ``z_{t-1}``
    and ``c_{t-1}`` were the initial state's: their gradients go to it (accumulated over the
    sequence) instead of the previous step. Returns ``(g_z, g_c, g_init_z, g_init_c)``."""
    g_init_z = torch.where(m, g_z, 0.0) + (0.0 if g_init_z is None else g_init_z)
    g_init_c = torch.where(m, g_c, 0.0) + (0.0 if g_init_c is None else g_init_c)
    return g_z.masked_fill(m, 0.0), g_c.masked_fill(m, 0.0), g_init_z, g_init_c


def weight_gradients(
    g_gates: Tensor, zs: Tensor, g_xi: Tensor, y: Tensor, Hd: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL/dw_state, dL/dw_if, dL/db_if)`` formed once over all steps from ``g_gates
    [T, B, G]``, the recurrent inputs ``zs [T, B, D]``, the interface gradients ``g_xi
    [T, B, X]`` and the outputs ``y [T, B, D]`` (``h_t`` its first ``Hd`` columns), for the
    interface ``xi = h w_ifᵀ + b_if``."""
    T, B, G = g_gates.shape
    D, X = zs.shape[-1], g_xi.shape[-1]
    g_w_state = g_gates.view(T * B, G).t().mm(zs.view(T * B, D))
    g_w_if = g_xi.view(T * B, X).t().mm(y.view(T * B, -1)[:, :Hd])
    return g_w_state, g_w_if, g_xi.view(T * B, X).sum(0)
