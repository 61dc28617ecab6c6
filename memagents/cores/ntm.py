"""Neural Turing Machine (Graves, Wayne & Danihelka 2014, arXiv:1410.5401).

An LSTM controller reads the input and the previous read vectors, and drives ``num_heads`` pairs
of write and read heads over an ``N x W`` memory. Each head addresses memory in four stages
(section 3.3): content addressing (eqs. 5-6), interpolation with its previous weighting (eq. 7),
circular shift (eq. 8) and sharpening (eq. 9). Writes erase then add (eqs. 3-4); reads are
weighted sums of rows (eq. 2). At each step the heads write first and then read, so a read at
step ``t`` can see what was written at step ``t``.

Training stabilisers (Collier & Beel 2018, "Implementing Neural Turing Machines"):

- memory starts at the constant ``1e-6`` (not random, not learned), so content addressing on a
  fresh memory is uniform and the gradients are finite;
- the controller's ``h_0, c_0``, the initial read vectors and the initial head weightings are
  learned (the weightings as a softmax of learned logits, so they stay normalised);
- the controller's forget-gate bias starts at 1 (Gers et al. 2000);
- the head parameters come from one linear layer with a small (0.1x) initial weight scale, so that
  early gates and shifts are near their neutral values.

With ``fused=True`` (the default) the memory access (addressing, erase/add, reads) runs as one
autograd function with a hand-derived backward, :class:`~memagents.cores.ntm_access.NTMAccessStep`,
and on CPU (float32/float64, native kernels built) a whole call of :meth:`NTMCore.forward` runs as
one :class:`~memagents.cores.ntm_access.NTMSequence` node: one matrix product and one C++ kernel
call per step each way, backpropagation through time by hand. ``fused=False`` is the reference
built from the :mod:`~memagents.cores.addressing` functions under plain autograd. Tests check that
all paths agree (float64, values and gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memagents.cores import addressing, ntm_access
from memagents.cores.base import MemoryCore, check_positive_int, set_forget_bias
from memagents.cores.ntm_access import head_sizes
from memagents.cores.rnn import LSTMState

MEMORY_INIT = 1e-6


class NTMState(NamedTuple):
    """Recurrent state of the NTM (``H`` = ``num_heads``)."""

    controller: LSTMState  # h, c: [B, 1, hidden_size]
    memory: Tensor  # [B, N, W] memory matrix M_t
    read_weights: Tensor  # [B, H, N] read weightings w^r_t
    write_weights: Tensor  # [B, H, N] write weightings w^w_t
    read_vectors: Tensor  # [B, H, W] read vectors r_t (fed to the controller at t + 1)


class NTMCore(MemoryCore):
    """Neural Turing Machine core; output ``y_t = [h_t; r_t]`` (controller state and reads).

    :param input_size: features per step.
    :param hidden_size: controller LSTM units.
    :param memory_size: ``N``, number of memory rows.
    :param word_size: ``W``, width of a memory row.
    :param num_heads: number of (write head, read head) pairs.
    :param max_shift: ``S``: shifts ``-S..S`` are allowed (eq. 8); ``2S + 1 <= N``.
    :param learn_init: learn the initial controller state, read vectors and head weightings.
    :param fused: run the memory access as one autograd function with a hand-derived backward
        (:class:`~memagents.cores.ntm_access.NTMAccessStep`), and on CPU whole sequences as
        :class:`~memagents.cores.ntm_access.NTMSequence` (same equations, 5-9x faster forward and
        backward). ``False`` runs the reference path built from :mod:`addressing` functions
        under plain autograd.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        memory_size: int = 32,
        word_size: int = 16,
        num_heads: int = 1,
        max_shift: int = 1,
        learn_init: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.memory_size = check_positive_int("memory_size", memory_size)
        self.word_size = check_positive_int("word_size", word_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.max_shift = check_positive_int("max_shift", max_shift, minimum=0)
        if 2 * max_shift + 1 > memory_size:
            raise ValueError(
                f"max_shift={max_shift} needs memory_size >= 2*max_shift+1 = {2 * max_shift + 1}; "
                f"got memory_size={memory_size}"
            )
        self.learn_init = bool(learn_init)
        self.fused = bool(fused)
        self.output_size = hidden_size + num_heads * word_size
        H, W = num_heads, word_size

        self.controller = nn.LSTMCell(input_size + H * W, hidden_size)
        set_forget_bias(self.controller, 1.0)
        # Per head: key W, strength 1, gate 1, shift K, gamma 1 (read and write heads);
        # write heads also erase W and add W (the packed layout NTMAccessStep takes).
        self._read_sizes, self._write_sizes = head_sizes(H, W, max_shift)
        self.heads = nn.Linear(hidden_size, sum(self._read_sizes) + sum(self._write_sizes))
        with torch.no_grad():
            self.heads.weight.mul_(0.1)
            self.heads.bias.zero_()
        self.register_buffer("shift_index", addressing.shift_index(memory_size, max_shift))

        self.h0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.learn_init)
        self.c0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.learn_init)
        self.read0 = nn.Parameter(torch.zeros(1, H, W), requires_grad=self.learn_init)
        # Initial weightings: a learned distribution; starts focused-ish on row 0 so that shifts
        # have a well-defined starting point (all heads), softmax keeps them normalised.
        logits = torch.zeros(1, H, memory_size)
        logits[..., 0] = 4.0
        self.read_logits0 = nn.Parameter(logits.clone(), requires_grad=self.learn_init)
        self.write_logits0 = nn.Parameter(logits.clone(), requires_grad=self.learn_init)

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size, device=None) -> NTMState:
        device = self._device(device)
        B, dtype = batch_size, self._dtype()

        def expand(p: Tensor) -> Tensor:
            return p.to(device).expand(B, *p.shape[1:])

        memory = torch.full(
            (B, self.memory_size, self.word_size), MEMORY_INIT, device=device, dtype=dtype
        )
        return NTMState(
            controller=LSTMState(expand(self.h0), expand(self.c0)),
            memory=memory,
            read_weights=expand(torch.softmax(self.read_logits0, -1)),
            write_weights=expand(torch.softmax(self.write_logits0, -1)),
            read_vectors=expand(self.read0),
        )

    def state_shapes_tree(self) -> NTMState:
        H, N, W = self.num_heads, self.memory_size, self.word_size
        return NTMState(
            controller=LSTMState((1, self.hidden_size), (1, self.hidden_size)),
            memory=(N, W),
            read_weights=(H, N),
            write_weights=(H, N),
            read_vectors=(H, W),
        )

    # -- a sequence ----------------------------------------------------------------------------
    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """As :meth:`MemoryCore.forward`. With ``fused`` and the native kernels available (CPU,
        float32/float64) the whole sequence runs as one
        :class:`~memagents.cores.ntm_access.NTMSequence` node (same equations as :meth:`step`);
        otherwise, and for ``return_debug``, step by step."""
        state, starts = self._check_inputs(x, state, episode_starts)
        if return_debug or not self.fused:
            return super().forward(x, state, starts, return_debug)
        B = x.shape[1]
        H, W, Hd, I = self.num_heads, self.word_size, self.hidden_size, self.input_size
        leaves = self._sequence_leaves(state, B)
        if not ntm_access.sequence_available(x, self.heads.weight, *leaves):
            return super().forward(x, state, starts, return_debug)
        if starts is not None and bool(starts.any()):
            init = self._initial_leaves(x.device)
        else:
            starts, init = None, (None,) * 6
        cell = self.controller
        # The input's share of the gates, for all steps at once: W_x x_t + b_ih + b_hh.
        x_proj = F.linear(x, cell.weight_ih[:, :I], cell.bias_ih + cell.bias_hh)  # [T, B, 4Hd]
        # The recurrent share acts on [h_{t-1}; r_{t-1}]: [W_hh, W_r], [4Hd, Hd + H*W].
        w_state = torch.cat([cell.weight_hh, cell.weight_ih[:, I:]], dim=1)
        y, c, memory, read_weights, write_weights = ntm_access.NTMSequence.apply(
            x_proj, w_state, self.heads.weight, self.heads.bias, *leaves, *init, starts, H,
            self.max_shift, torch.is_grad_enabled(),
        )  # fmt: skip
        last = y[-1]  # [B, Hd + H*W]: [h_T; r_T]
        final = NTMState(
            controller=LSTMState(last[:, :Hd].unsqueeze(1), c.unsqueeze(1)),
            memory=memory,
            read_weights=read_weights,
            write_weights=write_weights,
            read_vectors=last[:, Hd:].reshape(B, H, W),
        )
        return y, final

    def _sequence_leaves(self, state: NTMState, B: int) -> tuple[Tensor, ...]:
        """``(h [B, Hd], c [B, Hd], r [B, H, W], M, w^r, w^w)`` in :class:`NTMSequence` order."""
        h, c = state.controller
        Hd = self.hidden_size
        return (
            h.reshape(B, Hd),
            c.reshape(B, Hd),
            state.read_vectors,
            state.memory,
            state.read_weights,
            state.write_weights,
        )

    def _initial_leaves(self, device) -> tuple[Tensor, ...]:
        """:meth:`initial_state` as :class:`NTMSequence` takes it, without the batch dimension
        (``[1, ...]``, broadcast where episodes start)."""
        Hd, dtype = self.hidden_size, self._dtype()
        memory = torch.full(
            (1, self.memory_size, self.word_size), MEMORY_INIT, device=device, dtype=dtype
        )
        return (
            self.h0.reshape(1, Hd),
            self.c0.reshape(1, Hd),
            self.read0,
            memory,
            torch.softmax(self.read_logits0, -1),
            torch.softmax(self.write_logits0, -1),
        )

    # -- one step ------------------------------------------------------------------------------
    def _address(
        self,
        memory: Tensor,
        previous: Tensor,
        key: Tensor,
        beta: Tensor,
        gate: Tensor,
        shift: Tensor,
        gamma: Tensor,
    ) -> Tensor:
        """The four addressing stages of section 3.3 for ``H`` heads: ``[B, H, N]``."""
        content = addressing.content_weights(memory, key, F.softplus(beta))
        gated = addressing.interpolate(content, previous, torch.sigmoid(gate))
        shifted = addressing.circular_shift(gated, torch.softmax(shift, -1), self.shift_index)
        return addressing.sharpen(shifted, addressing.oneplus(gamma))

    def step(self, x, state: NTMState, return_debug=False):
        B = x.shape[0]
        H, W = self.num_heads, self.word_size
        h_prev, c_prev = state.controller
        ctrl_in = torch.cat([x, state.read_vectors.reshape(B, H * W)], dim=-1)
        h, c = self.controller(ctrl_in, (h_prev.squeeze(1), c_prev.squeeze(1)))
        if self.fused:
            memory, write_weights, read_weights, read_vectors = ntm_access.ntm_access(
                state.memory,
                state.read_weights,
                state.write_weights,
                self.heads(h),
                H,
                self.max_shift,
            )
        else:
            memory, write_weights, read_weights, read_vectors = self._access(h, state)
        y = torch.cat([h, read_vectors.reshape(B, H * W)], dim=-1)
        new_state = NTMState(
            controller=LSTMState(h.unsqueeze(1), c.unsqueeze(1)),
            memory=memory,
            read_weights=read_weights,
            write_weights=write_weights,
            read_vectors=read_vectors,
        )
        if return_debug:
            debug = {
                "memory": memory,
                "read_weights": read_weights,
                "write_weights": write_weights,
            }
            return y, new_state, debug
        return y, new_state

    def _access(self, h: Tensor, state: NTMState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The reference memory access under plain autograd: write heads address ``M_{t-1}``,
        erase and add, read heads address ``M_t`` and read.

        :param h: ``[B, hidden_size]`` controller output.
        :return: ``(M_t [B, N, W], w^w_t [B, H, N], w^r_t [B, H, N], r_t [B, H, W])``.
        """
        B = h.shape[0]
        H, W, K = self.num_heads, self.word_size, 2 * self.max_shift + 1
        params = self.heads(h).split(self._read_sizes + self._write_sizes, dim=-1)
        r_key, r_beta, r_gate, r_shift, r_gamma = params[:5]
        w_key, w_beta, w_gate, w_shift, w_gamma, erase, add = params[5:]

        write_weights = self._address(
            state.memory,
            state.write_weights,
            w_key.view(B, H, W),
            w_beta,
            w_gate,
            w_shift.view(B, H, K),
            w_gamma,
        )
        memory = addressing.erase_and_add(
            state.memory, write_weights, torch.sigmoid(erase).view(B, H, W), add.view(B, H, W)
        )
        read_weights = self._address(
            memory,
            state.read_weights,
            r_key.view(B, H, W),
            r_beta,
            r_gate,
            r_shift.view(B, H, K),
            r_gamma,
        )
        read_vectors = addressing.read_memory(memory, read_weights)
        return memory, write_weights, read_weights, read_vectors
