"""Differentiable Neural Computer (Graves et al. 2016, Nature 538, "Hybrid computing using a
neural network with dynamic external memory").

An LSTM controller receives the input ``x_t`` and the previous read vectors ``r_{t-1}`` and emits
the interface vector ``ξ_t`` (Methods, "Interface parameters"). The memory access then runs, in the
paper's order:

1. usage ``u_t`` from the free gates and the previous read/write weightings
   (:func:`~memagents.cores.addressing.usage_update`);
2. write weighting ``w^w_t = g^w [g^a a_t + (1 - g^a) c^w_t]`` from allocation
   (:func:`~memagents.cores.addressing.allocation_weights`) and content lookup on ``M_{t-1}``;
3. erase and write (:func:`~memagents.cores.addressing.erase_and_add`);
4. temporal link ``L_t`` and precedence ``p_t``
   (:func:`~memagents.cores.addressing.link_update`);
5. read weightings ``w^r_t = π[1] b_t + π[2] c^r_t + π[3] f_t`` (backward, content, forward; one
   backward and one forward mode per write head) and read vectors ``r_t = M_t^T w^r_t``.

The output is ``y_t = [h_t; r_t]``; the policy's heads play the role of the paper's output matrix
``W_y``.

Where the paper leaves details open, the access step follows DeepMind's code release
(``deepmind/dnc``, ``dnc/access.py`` and ``dnc/addressing.py``), in every execution path:

- several write heads: each has its own link matrix and precedence, their combined write in the
  usage is ``1 - prod_h (1 - w^w_h)``, and allocation is sequential over heads
  (``u <- u + (1 - u) g^a_h g^w_h a_h``);
- free slots are ranked by ``1 - u`` (descending), equal values in slot order (``tf.nn.top_k``),
  so that the never-written slots of a fresh episode, whose usages differ only by rounding noise,
  are allocated lowest index first on every CPU and path;
- cosine similarity ``k·M[i] / (|k| |M[i]| + 1e-6)``, each norm ``sqrt(sum x^2 + 1e-6)``;
- the usage carries no gradient to the previous write weightings ``w^w_{t-1}``
  (``tf.stop_gradient`` in DeepMind's ``Freeness``; ``usage_gradient=True`` keeps it); the free
  gates and the previous read weightings keep theirs.

Deliberate differences from DeepMind's release, kept as they are:

- key strengths ``β = oneplus(β̂) = 1 + softplus(β̂)`` as in the paper (DeepMind: ``softplus``);
- read modes ordered ``[backward x H, content, forward x H]`` in ``ξ`` and ``π``
  (DeepMind: ``[backward x H, forward x H, content]``): a layout, not a change of equations;
- the initial memory is the constant ``1e-6`` (the small-constant initialisation Collier & Beel
  2018 found best for the NTM; DeepMind: zeros); usage, link, precedence and weightings start at
  zero in both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from memagents.cores import addressing, dnc_access
from memagents.cores.base import MemoryCore, check_positive_int, set_forget_bias
from memagents.cores.dnc_access import DNCAccessStep, DNCSequence
from memagents.cores.rnn import LSTMState


class AccessState(NamedTuple):
    """State of the DNC's memory access (``R`` read heads, ``H`` = ``num_writes`` write heads)."""

    memory: Tensor  # [B, N, W] memory matrix M_t
    usage: Tensor  # [B, N] usage u_t in [0, 1]
    link: Tensor  # [B, H, N, N] temporal link matrices L_t (zero diagonal)
    precedence: Tensor  # [B, H, N] precedence weightings p_t
    read_weights: Tensor  # [B, R, N] read weightings w^r_t
    write_weights: Tensor  # [B, H, N] write weightings w^w_t


class DNCState(NamedTuple):
    """Recurrent state of the DNC. The access fields are also readable directly
    (``state.memory`` is ``state.access.memory``)."""

    controller: LSTMState  # h, c: [B, 1, hidden_size]
    access: AccessState
    read_vectors: Tensor  # [B, R, W] read vectors r_t (fed to the controller at t + 1)

    @property
    def memory(self) -> Tensor:
        return self.access.memory

    @property
    def usage(self) -> Tensor:
        return self.access.usage

    @property
    def link(self) -> Tensor:
        return self.access.link

    @property
    def precedence(self) -> Tensor:
        return self.access.precedence

    @property
    def read_weights(self) -> Tensor:
        return self.access.read_weights

    @property
    def write_weights(self) -> Tensor:
        return self.access.write_weights


class DNCCore(MemoryCore):
    """Differentiable Neural Computer core; output ``y_t = [h_t; r_t]``.

    :param input_size: features per step.
    :param hidden_size: controller LSTM units.
    :param memory_size: ``N``, number of memory slots.
    :param word_size: ``W``, width of a slot.
    :param num_reads: ``R``, read heads.
    :param num_writes: write heads (1 in the paper).
    :param learn_init: learn the controller's initial ``h_0, c_0`` and the initial read vectors
        (zero-initialised; Collier & Beel 2018). Memory (1e-6), usage, link, precedence and the
        weightings always start at their fixed values (see the module docstring).
    :param fused: run the memory access as one autograd function with a hand-written backward
        (:class:`~memagents.cores.dnc_access.DNCAccessStep`; same equations, several times
        faster), on the CPU a C++ kernel, and a whole sequence as one autograd node with one
        kernel call per step and direction (:class:`~memagents.cores.dnc_access.DNCSequence`).
        ``False`` runs the reference path built from :mod:`addressing` functions under plain
        autograd; tests check that all of them agree.
    :param usage_gradient: let the gradient of the usage ``u_t`` reach the previous write
        weightings ``w^w_{t-1}`` (the exact derivative of the paper's equations). ``False`` (the
        default) stops it, as DeepMind's release does (``tf.stop_gradient`` in ``Freeness``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        memory_size: int = 32,
        word_size: int = 16,
        num_reads: int = 4,
        num_writes: int = 1,
        learn_init: bool = True,
        fused: bool = True,
        usage_gradient: bool = False,
    ):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.memory_size = check_positive_int("memory_size", memory_size)
        self.word_size = check_positive_int("word_size", word_size)
        self.num_reads = check_positive_int("num_reads", num_reads)
        self.num_writes = check_positive_int("num_writes", num_writes)
        self.learn_init = bool(learn_init)
        self.fused = bool(fused)
        self.usage_gradient = bool(usage_gradient)
        R, H, W = num_reads, num_writes, word_size
        self.output_size = hidden_size + R * W

        self.controller = nn.LSTMCell(input_size + R * W, hidden_size)
        set_forget_bias(self.controller, 1.0)
        # Interface vector ξ_t, laid out so that each activation is one call:
        #   raw:     read keys R*W | write keys H*W | write vectors H*W
        #   oneplus: read strengths R | write strengths H
        #   sigmoid: erase H*W | free gates R | allocation gates H | write gates H
        #   softmax: read modes R*(1 + 2H)
        # (the order of dnc_access.interface_sizes, which the fused access step reads)
        self._sizes = [R * W + 2 * H * W, R + H, H * W + R + 2 * H, R * (1 + 2 * H)]
        self.interface = nn.Linear(hidden_size, sum(self._sizes))

        self.h0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.learn_init)
        self.c0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.learn_init)
        self.read0 = nn.Parameter(torch.zeros(1, R, W), requires_grad=self.learn_init)
        # no-grad weights of :meth:`forward` (see :meth:`_rollout_weights`): a cache, not state
        self._weights_cache: dict[str, object] = {}

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size, device=None) -> DNCState:
        device = self._device(device)
        B, N, W, R, H = (
            batch_size,
            self.memory_size,
            self.word_size,
            self.num_reads,
            self.num_writes,
        )
        dtype = self._dtype()

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(B, *shape, device=device, dtype=dtype)

        def expand(p: Tensor) -> Tensor:
            return p.to(device).expand(B, *p.shape[1:])

        access = AccessState(
            memory=torch.full((B, N, W), dnc_access.INITIAL_ACCESS[0], device=device, dtype=dtype),
            usage=zeros(N),
            link=zeros(H, N, N),
            precedence=zeros(H, N),
            read_weights=zeros(R, N),
            write_weights=zeros(H, N),
        )
        return DNCState(
            controller=LSTMState(expand(self.h0), expand(self.c0)),
            access=access,
            read_vectors=expand(self.read0),
        )

    def state_shapes_tree(self) -> DNCState:
        N, W, R, H = self.memory_size, self.word_size, self.num_reads, self.num_writes
        return DNCState(
            controller=LSTMState((1, self.hidden_size), (1, self.hidden_size)),
            access=AccessState(
                memory=(N, W),
                usage=(N,),
                link=(H, N, N),
                precedence=(H, N),
                read_weights=(R, N),
                write_weights=(H, N),
            ),
            read_vectors=(R, W),
        )

    # -- a whole sequence -----------------------------------------------------------------------
    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """As :meth:`MemoryCore.forward`. On the CPU (``fused``, native kernel available, no
        debug tensors) the whole sequence is one autograd node,
        :class:`~memagents.cores.dnc_access.DNCSequence` (the same computation as :meth:`step`):
        the input's share of the controller's gates ``W_x x_t + b_ih + b_hh`` is one matrix
        product for all ``T`` steps, the rest of each step (gates from ``[r_{t-1}; h_{t-1}]``,
        LSTM cell, interface ξ, memory access) one kernel call each way, episode starts are
        applied inside the node, and ``y_t = [h_t; r_t]`` is assembled once at the end."""
        if not self.fused or return_debug:
            return super().forward(x, state, episode_starts, return_debug)
        state, starts = self._check_inputs(x, state, episode_starts)
        cell, head = self.controller, self.interface
        params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, head.weight)
        leaves = (*state.controller, *state.access, state.read_vectors)  # DNCState, flat
        if not dnc_access.step_usable(x, *leaves, *params, head.bias):
            return super().forward(x, state, episode_starts)
        T, B = x.shape[0], x.shape[1]
        R, W, I = self.num_reads, self.word_size, self.input_size
        # [T, B, 4 hidden]: the input's share of the gates for all steps in one product
        if torch.is_grad_enabled():
            bias, w_rh = cell.bias_ih + cell.bias_hh, self._recurrent_weights()
        else:
            bias, w_rh = self._rollout_weights()
        gates_x = torch.addmm(bias, x.reshape(T * B, I), cell.weight_ih[:, :I].t()).view(T, B, -1)
        first = (
            state.controller.h.reshape(B, -1), state.controller.c.reshape(B, -1),
            state.read_vectors.reshape(B, R * W), *state.access,
        )  # fmt: skip
        init = (None,) * 3
        if starts is not None and bool(starts.any()):  # the learned initial h, c, r
            init = (self.h0.view(1, -1), self.c0.view(1, -1), self.read0.view(1, R * W))
        # without grad (a rollout) the node's forward runs as a plain function: it keeps nothing
        # for a backward then, and Function.apply's bookkeeping is ~10% of a T = 1 call
        record = torch.is_grad_enabled()
        args = (
            gates_x, w_rh, head.weight.t(), head.bias, *first, *init,
            None if init[0] is None else starts, record, self.usage_gradient,
        )  # fmt: skip
        outs = DNCSequence.apply(*args) if record else DNCSequence.forward(None, *args)
        hs, reads, c, *access = outs
        y = torch.cat([hs, reads.view(T, B, R * W)], dim=-1)
        h = hs[-1].unsqueeze(1)
        return y, DNCState(LSTMState(h, c.unsqueeze(1)), AccessState(*access), reads[-1])

    def _recurrent_weights(self) -> Tensor:
        """``W_rh [R*W + Hd, 4Hd]``: the gate weights of ``[r_{t-1}; h_{t-1}]``,
        ``[W_ih[:, I:], W_hh]`` transposed (Graves et al. 2016, Methods, controller equations)."""
        cell = self.controller
        return torch.cat([cell.weight_ih[:, self.input_size :], cell.weight_hh], dim=1).t()

    def _rollout_weights(self) -> tuple[Tensor, Tensor]:
        """``(b_ih + b_hh [4Hd], W_rh [R*W + Hd, 4Hd])`` without grad, rebuilt only when a
        controller parameter changed (a rollout calls :meth:`forward` once per env step).

        The key holds each parameter's identity, storage and version counter: an optimizer step
        or ``load_state_dict`` (in-place), ``.to()`` or replacing a parameter all change it (an
        in-place change through ``param.data`` would not, which nothing in SB3 does)."""
        cell = self.controller
        params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        cache = self._weights_cache
        if cache.get("key") != key:
            with torch.no_grad():
                weights = (cell.bias_ih + cell.bias_hh, self._recurrent_weights())
            cache.clear()
            cache.update(key=key, weights=weights)
        return cache["weights"]

    # -- one step ------------------------------------------------------------------------------
    def step(self, x, state: DNCState, return_debug=False):
        B = x.shape[0]
        R, H, W = self.num_reads, self.num_writes, self.word_size
        prev = state.access
        # w^w_{t-1} enters this step only through the usage: DeepMind stops its gradient there
        write0 = prev.write_weights if self.usage_gradient else prev.write_weights.detach()

        h_prev, c_prev = state.controller
        ctrl_in = torch.cat([x, state.read_vectors.reshape(B, R * W)], dim=-1)
        h, c = self.controller(ctrl_in, (h_prev.squeeze(1), c_prev.squeeze(1)))

        # Interface parameters ξ_t (Methods, "Interface parameters").
        xi = self.interface(h)
        if self.fused:
            # ξ goes in whole: the access step applies the activations itself (one graph node)
            memory, usage, link, precedence, read_weights, write_weights, read_vectors, allocation = (
                DNCAccessStep.apply(
                    prev.memory, prev.usage, prev.link, prev.precedence, prev.read_weights,
                    write0, xi,
                )
            )  # fmt: skip
            if return_debug:
                modes = torch.softmax(xi[:, -R * (1 + 2 * H) :].reshape(B, R, 1 + 2 * H), dim=-1)
        else:
            raw, strengths, gates, modes = xi.split(self._sizes, dim=-1)
            read_keys, write_keys, write_vectors = raw.split([R * W, H * W, H * W], dim=-1)
            strengths = addressing.oneplus(strengths)
            read_strengths, write_strengths = strengths.split([R, H], dim=-1)
            erase, free_gates, alloc_gates, write_gates = torch.sigmoid(gates).split(
                [H * W, R, H, H], dim=-1
            )
            modes = torch.softmax(modes.view(B, R, 1 + 2 * H), dim=-1)  # π_t: [B, R, 1 + 2H]

            # 1. usage, 2. write weighting
            usage = addressing.usage_update(prev.usage, write0, free_gates, prev.read_weights)
            eps = addressing.EPSILON  # DeepMind's cosine: k·M / (|k| |M| + eps)
            write_content = addressing.content_weights(
                prev.memory, write_keys.view(B, H, W), write_strengths, denominator_eps=eps
            )
            allocation = addressing.write_allocation_weights(usage, alloc_gates * write_gates)
            g_a = alloc_gates.unsqueeze(-1)
            write_weights = write_gates.unsqueeze(-1) * (
                write_content + g_a * (allocation - write_content)
            )  # [B, H, N]

            # 3. erase and write
            memory = addressing.erase_and_add(
                prev.memory, write_weights, erase.view(B, H, W), write_vectors.view(B, H, W)
            )

            # 4. temporal linkage (uses p_{t-1}), then precedence p_t
            # 5. (with the link, fused) directional weightings f_t = L_t w^r_{t-1}, b_t = L_t^T w^r_{t-1}
            link, forward_w, backward_w = addressing.link_update_and_read(
                prev.link, write_weights, prev.precedence, prev.read_weights
            )
            precedence = addressing.precedence_update(prev.precedence, write_weights)

            # 5. read weightings: backward b, content c, forward f
            read_content = addressing.content_weights(
                memory, read_keys.view(B, R, W), read_strengths, denominator_eps=eps
            )
            read_weights = (
                modes[..., H : H + 1] * read_content
                + torch.einsum("brh,brhn->brn", modes[..., :H], backward_w)
                + torch.einsum("brh,brhn->brn", modes[..., H + 1 :], forward_w)
            )
            read_vectors = addressing.read_memory(memory, read_weights)

        y = torch.cat([h, read_vectors.reshape(B, R * W)], dim=-1)
        new_state = DNCState(
            controller=LSTMState(h.unsqueeze(1), c.unsqueeze(1)),
            access=AccessState(
                memory=memory,
                usage=usage,
                link=link,
                precedence=precedence,
                read_weights=read_weights,
                write_weights=write_weights,
            ),
            read_vectors=read_vectors,
        )
        if return_debug:
            debug = {
                "memory": memory,
                "usage": usage,
                "link": link,
                "precedence": precedence,
                "read_weights": read_weights,
                "write_weights": write_weights,
                "allocation": allocation,
                "read_modes": modes,
            }
            return y, new_state, debug
        return y, new_state
