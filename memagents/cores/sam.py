"""Sparse Access Memory (SAM; Rae et al. 2016, "Scaling Memory-Augmented Neural Networks with
Sparse Reads and Writes", NIPS, section 3).

An LSTM controller receives ``x_t`` and the previous read vectors ``r_{t-1}`` and emits, per step,
``R`` read keys ``q`` with strengths ``β`` (oneplus), a write vector ``a_t``, a write gate ``α_t``
and an interpolation gate ``γ_t``. The memory access (:mod:`~memagents.cores.sparse_access`) then:

1. picks the least-recently-used row ``I^U_t`` from the per-element last-access steps ``U_{t-1}``;
2. writes ``w^W_t = α (γ w̄^R_{t-1} + (1 - γ) I^U_t)``: to the rows read at ``t - 1`` and the LRU
   row, which is erased first (``M_t = (1 - I^U_t 1^T) ∘ M_{t-1} + w^W_t a_t^T``);
3. reads: each head attends to the ``K`` rows nearest its key by cosine similarity (a kNN index),
   ``w^R = softmax(β cos)`` over those ``K``, ``r = Σ w^R M``;
4. marks the rows whose read or write weight exceeds ``δ`` as accessed at step ``t``.

The output is ``y_t = [h_t; r_t]``. The sparse weightings live in the state as values and row
indices (the indices as exact integers in the state's float dtype, so that the state packs into one
``[B, S]`` tensor for SB3). With ``fused=True`` (the default) each step is one autograd function
that writes the memory in place and saves only the ``K·W``-sized rows it touched, so that a
sequence's forward and backward cost ``O(T·K·W)`` memory beside the one ``N×W`` memory and its one
gradient buffer; ``fused=False`` is the dense reference (a new memory per step under autograd).
On CPU float tensors with the native kernels available (:mod:`~memagents.cores.native`), the
whole access step after the controller is one kernel call each way
(:class:`~memagents.cores.sparse_access.SAMAccessStep`), a training call (under autograd) is one
autograd node (:class:`SAMSequence`), the LRU row is found through block minima (``O(sqrt N)``
per step) and nothing ``N``-sized is touched per step; the composed torch functions stay the
reference (tests compare both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from memagents.cores import addressing, lstm_cell, native, sparse_access, sparse_links
from memagents.cores import state as state_lib
from memagents.cores.base import MemoryCore, check_positive_int, set_forget_bias, stack_debug
from memagents.cores.rnn import LSTMState

#: Largest ``N`` whose row indices are exact in float32 (the packed state's dtype).
MAX_MEMORY_SIZE = 2**24

#: Run a training call on the native path as one :class:`SAMSequence` node where
#: :class:`~memagents.cores.sparse_access.SAMAccessStep` would run as a node per step (tests
#: switch it off to compare both).
SEQUENCE_NODE = True


def init_sparse_core(
    core: MemoryCore,
    *,
    input_size: int,
    hidden_size: int,
    memory_size: int,
    word_size: int,
    num_reads: int,
    below_memory_size: dict[str, int],
    index: str,
    learn_init: bool,
    fused: bool,
    interface_sizes: list[int],
) -> None:
    """The construction SAM and SDNC share: validate and set the hyperparameters, then build the
    LSTM controller (input ``x_t`` and the ``R`` previous read vectors), the interface layer
    (``interface_sizes``, kept as ``core._sizes``) and the learned initial ``h_0, c_0, r_0``.

    :param below_memory_size: read counts (``sparse_reads``, ``temporal_reads``) that must be
        positive and smaller than ``memory_size``; each is set as an attribute.
    :raises ValueError: naming the bad value and the allowed range.
    """
    core.input_size = check_positive_int("input_size", input_size)
    core.hidden_size = check_positive_int("hidden_size", hidden_size)
    core.memory_size = check_positive_int("memory_size", memory_size, minimum=2)
    if memory_size > MAX_MEMORY_SIZE:
        raise ValueError(f"memory_size must be <= 2**24; got {memory_size!r}")
    core.word_size = check_positive_int("word_size", word_size)
    core.num_reads = check_positive_int("num_reads", num_reads)
    for name, value in below_memory_size.items():
        setattr(core, name, check_positive_int(name, value))
    for name, value in below_memory_size.items():
        if value >= memory_size:
            raise ValueError(f"{name} must be < memory_size ({memory_size}); got {value!r}")
    core.index = index
    core.index_kind = sparse_access.resolve_index(index, memory_size)
    core.learn_init = bool(learn_init)
    core.fused = bool(fused)
    R, W = num_reads, word_size
    core.output_size = hidden_size + R * W

    core.controller = nn.LSTMCell(input_size + R * W, hidden_size)
    set_forget_bias(core.controller, 1.0)
    core._sizes = list(interface_sizes)
    core.interface = nn.Linear(hidden_size, sum(core._sizes))

    core.h0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=core.learn_init)
    core.c0 = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=core.learn_init)
    core.read0 = nn.Parameter(torch.zeros(1, R, W), requires_grad=core.learn_init)


def sparse_snapshot(core: MemoryCore, state, carry: sparse_access.Carry | None):
    """:meth:`MemoryCore.snapshot` of a SAM or SDNC state (``state.access.memory`` its ``N×W``
    memory) whose carry, if any, is ``carry``: the other fields copied as the base class copies
    them, the memory from its written rows alone when it is carried."""
    a = state.access
    rest = MemoryCore.snapshot(core, state._replace(access=a._replace(memory=a.memory[:0])))
    if carry is not None:
        memory = carry.snapshot(a.memory)
    elif sparse_access.is_zero_broadcast(a.memory):
        memory = a.memory.detach()
    else:
        memory = a.memory.detach().clone()
    return rest._replace(access=rest.access._replace(memory=memory))


#: From this many rows on, the native path finds the LRU row through block minima of the
#: last-access steps (``O(sqrt N)`` per step) rather than a scan of all ``N``.
BLOCK_LRU_MIN_ROWS = 4096


def lru_block_rows(memory_size: int) -> int | None:
    """Rows per block of the LRU block minima (``sqrt N``), or ``None`` (a scan) below
    :data:`BLOCK_LRU_MIN_ROWS`."""
    return math.isqrt(memory_size) if memory_size >= BLOCK_LRU_MIN_ROWS else None


class SparseAccessState(NamedTuple):
    """State of SAM's memory access (``R`` read heads, ``K`` non-zeros per read weighting,
    ``J = R·K + 1`` write locations)."""

    memory: Tensor  # [B, N, W] memory matrix M_t
    last_access: Tensor  # [B, N] step of each row's last access U_t (0 = never), per element
    time: Tensor  # [B, 1] steps taken in the element's episode, t
    read_weights: Tensor  # [B, R, K] non-zero values of the read weightings w^R_t (sum to 1)
    read_indices: Tensor  # [B, R, K] their rows (exact integers, ascending per head)
    write_weights: Tensor  # [B, J] values of the write weighting w^W_t
    write_indices: Tensor  # [B, J] their rows (the rows read at t-1, then the LRU row I^U_t)


class SAMState(NamedTuple):
    """Recurrent state of SAM. The access fields are also readable directly
    (``state.memory`` is ``state.access.memory``)."""

    controller: LSTMState  # h, c: [B, 1, hidden_size]
    access: SparseAccessState
    read_vectors: Tensor  # [B, R, W] read vectors r_t (fed to the controller at t + 1)

    @property
    def memory(self) -> Tensor:
        return self.access.memory

    @property
    def last_access(self) -> Tensor:
        return self.access.last_access

    @property
    def read_weights(self) -> Tensor:
        return self.access.read_weights

    @property
    def read_indices(self) -> Tensor:
        return self.access.read_indices

    @property
    def write_weights(self) -> Tensor:
        return self.access.write_weights

    @property
    def write_indices(self) -> Tensor:
        return self.access.write_indices


def _reset_access(
    st, reset, initial, time, read_w, write_w, read_idx, write_idx, last_access, scratch,
    zeroed=False,
):  # fmt: skip
    """The native loops' reset of the access state where ``st [B]`` (bool; ``reset``: its
    elements as long indices) starts an episode: ``time``, ``w^R``, ``w^W`` from ``initial`` (a
    mapping with those fields), their rows to 0, ``last_access`` zeroed in place (unless
    ``zeroed``: it is all zero already) and the block minima set (the memory itself is zeroed
    by the caller or the step). Returns ``(time, w^R, w^W, w^R rows, w^W rows)``."""
    time = state_lib.reset_where(time, initial["time"], st)
    read_w = state_lib.reset_where(read_w, initial["read_weights"], st)
    write_w = state_lib.reset_where(write_w, initial["write_weights"], st)
    read_idx = read_idx.masked_fill(st[:, None, None], 0)
    write_idx = write_idx.masked_fill(st[:, None], 0)
    if not zeroed:
        last_access.index_fill_(0, reset, 0.0)
    scratch.clear(reset)
    return time, read_w, write_w, read_idx, write_idx


def _sequence_forward(
    x_proj, w_state, w_if, b_if, h, c, r, memory, read_w, init_h, init_c, init_r, aux
):  # fmt: skip
    """The forward of :class:`SAMSequence`: ``((y, c, memory, w^R, w^W), per-step records)``."""
    T, B, G = x_proj.shape
    Hd = G // 4
    R, W, K = aux["sizes"]
    index, scratch = aux["index"], aux["scratch"]
    starts, reset_steps, initial, small, rows = (
        aux["starts"],
        aux["reset_steps"],
        aux["initial"],
        aux["small"],
        aux["rows"],
    )
    last_access, time = small["last_access"], small["time"]
    read_idx, write_idx, write_w = small["read_idx"], small["write_idx"], small["write_w"]
    no_reset = torch.zeros(0, dtype=torch.long)
    w_state_t, w_if_t = w_state.t(), w_if.t()
    x_proj = x_proj.contiguous()
    y = x_proj.new_empty(T, B, Hd + R * W)
    z = torch.cat([h, r], 1)  # [h_{t-1}; r_{t-1}]: [B, D]
    init_z = torch.cat([init_h, init_r], 1) if any(reset_steps) else None
    lstm_fwd, _ = lstm_cell.kernels(aux["lib"], x_proj)
    steps, lru = [], None
    for t in range(T):
        reset = no_reset
        if reset_steps[t]:
            st = starts[t]
            reset = st.nonzero().flatten()
            z = torch.where(st[:, None], init_z, z)
            c = torch.where(st[:, None], init_c, c)
            time, read_w, write_w, read_idx, write_idx = _reset_access(
                st, reset, initial, time, read_w, write_w, read_idx, write_idx, last_access,
                scratch, zeroed=aux["fresh"] and t == 0,
            )  # fmt: skip
            restarted = reset
            if aux["fresh"] and t == 0:  # an initial memory: nothing written, no gradient wanted
                restarted = None
            else:  # zero the rows the episodes wrote (the step would zero all N)
                rows.reset(memory, reset)
            reset = no_reset
            lru = None
        else:
            restarted = None
        if lru is None:
            lru = scratch.least_recently_used(last_access)
        # controller (h_t into y[t]), then the interface
        acts, c_prev, c, tanh_c = lstm_cell.forward_step(lstm_fwd, x_proj[t], z, w_state_t, c, y[t])
        xi = torch.addmm(b_if, y[t, :, :Hd], w_if_t)
        access = FunctionCtx()
        memory, read_w, read_idx, read_flat, write_w, write_idx, time, lru = (
            sparse_access.SAMAccessStep.forward(
                access, xi, read_w, memory, read_idx, lru, last_access, time, reset, index,
                R, W, K, t < T - 1, scratch,
            )
        )  # fmt: skip
        # the context keeps what its backward reads; the memory (dirty, this node's output)
        # must not stay referenced from it (a cycle through the graph that nothing frees)
        access.saved_tensors, access.to_save, access.dirty_tensors = access.to_save, None, None
        # z only when it is not y[t - 1] (step 0, resets): no views of the output y in the
        # context (y -> its node -> the context -> y would never be freed)
        steps.append(
            (access, acts, c_prev, tanh_c, z if t == 0 or reset_steps[t] else None, restarted)
        )
        rows.wrote(write_idx)
        y[t, :, Hd:] = read_flat
        z = y[t]
    small.update(time=time, read_idx=read_idx, write_idx=write_idx, write_w=write_w, lru=lru)
    return (y, c, memory, read_w, write_w), steps


class SAMSequence(torch.autograd.Function):
    """A whole training call of SAM (``T`` steps: controller LSTM cell, interface, and the
    memory step of :class:`~memagents.cores.sparse_access.SAMAccessStep`) as one autograd node;
    its backward is backpropagation through time by hand, calling ``SAMAccessStep``'s backward
    step by step in reverse. Native path only. As the SDNC's ``SDNCSequence``: the input's share
    of the LSTM gates ``x_proj`` is one product over all steps (by the caller, under autograd);
    each step costs one product for the gates, one native call for the LSTM cell
    (``sdnc_lstm_forward``/``_backward``), one product for the interface and the access step;
    the weight gradients are formed once over all steps (``[T·B]``-row products). Same
    equations and order as :meth:`SAMCore._run_native`'s loop (tests compare both in float64).

    Step ``t`` (Rae et al. 2016, section 3; the controller sees ``x_t`` and ``r_{t-1}``): where
    ``starts[t, b]``, element ``b``'s state is first replaced by the initial state; gates ``=
    x_proj[t] + [h_{t-1}; r_{t-1}] w_stateᵀ`` (torch's order ``i, f, g, o``), ``c_t = f c_{t-1}
    + i g``, ``h_t = o tanh(c_t)``; ``xi = h_t w_ifᵀ + b_if``; then the access step.

    Inputs: ``x_proj [T, B, 4Hd]``, ``w_state [4Hd, Hd + R·W]``, ``w_if [X, Hd]``, ``b_if [X]``,
    ``h [B, Hd]``, ``c [B, Hd]``, ``r [B, R·W]``, ``memory [B, N, W]`` (modified in place),
    ``w^R [B, R, K]``, the initial ``h``, ``c``, ``r`` (``[B, ·]``; used where ``starts``) and
    ``aux``: a dict of the rest (``sizes``, ``lib``, ``index``, ``scratch``, ``starts``,
    ``reset_steps``, ``initial``, and ``small``: the non-differentiable fields, updated in place
    to the final ones).

    Outputs: ``y [T, B, Hd + R·W]``, the final ``c``, ``memory``, ``w^R`` and ``w^W``.
    """

    @staticmethod
    def forward(
        ctx, x_proj, w_state, w_if, b_if, h, c, r, memory, read_w, init_h, init_c, init_r, aux
    ):  # fmt: skip
        outputs, steps = _sequence_forward(
            x_proj, w_state, w_if, b_if, h, c, r, memory, read_w, init_h, init_c, init_r, aux
        )
        ctx.steps = steps
        ctx.lib = aux["lib"]
        ctx.starts = aux["starts"]
        ctx.reset_steps = aux["reset_steps"]
        ctx.scratch = aux["scratch"]
        ctx.save_for_backward(w_state, w_if, outputs[0])
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(memory)
        # the last w^R and w^W are in the last step's context: the outputs are copies
        y, c, memory, read_w, write_w = outputs
        return y, c, memory, read_w.clone(), write_w.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_c, g_memory, g_rw, g_ww):
        w_state, w_if, y = ctx.saved_tensors
        steps = ctx.steps
        T, B = y.shape[0], y.shape[1]
        G, D = w_state.shape
        Hd = G // 4
        X = w_if.shape[0]
        new = w_state.new_empty
        g_gates_all, g_xi_all, zs = new(T, B, G), new(T, B, X), new(T, B, D)
        g_z = None  # gradient of [h_t; r_t] through step t + 1
        g_mem = g_memory
        g_init_z = g_init_c = None
        _, lstm_bwd = lstm_cell.kernels(ctx.lib, w_state)
        # a restart zeroes the gradient of the element's earlier memory: only its rows that
        # some step touched when the buffer holds nothing elsewhere (no gradient came for the
        # final memory and none is wanted for the first), else all of them
        touched = None if g_memory is not None or ctx.scratch.dense_grad else ctx.scratch.rows
        for t in reversed(range(T)):
            access, acts, c_prev, tanh_c, z, restarted = steps[t]
            zs[t] = y[t - 1] if z is None else z
            g_out = g_z if g_y is None else (g_y[t] if g_z is None else g_y[t] + g_z)
            g_h = None if g_out is None else g_out[:, :Hd]
            g_read = None if g_out is None else g_out[:, Hd:]
            g_xi, g_rw, g_mem = sparse_access.SAMAccessStep.backward(
                access, g_mem, g_rw, None, g_read, g_ww if t == T - 1 else None, None, None, None
            )[:3]
            if restarted is not None:
                sparse_access.zero_restarted(g_mem, restarted, touched)
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
        g_w_state, g_w_if, g_b_if = lstm_cell.weight_gradients(g_gates_all, zs, g_xi_all, y, Hd)
        g_init = (None,) * 3
        if g_init_z is not None:
            g_init = (g_init_z[:, :Hd], g_init_c, g_init_z[:, Hd:])
        return (
            g_gates_all, g_w_state, g_w_if, g_b_if, g_z[:, :Hd], g_c, g_z[:, Hd:], g_mem, g_rw,
            *g_init, None,
        )  # fmt: skip


class SAMCore(MemoryCore):
    """Sparse Access Memory core; output ``y_t = [h_t; r_t]``.

    :param input_size: features per step.
    :param hidden_size: controller LSTM units.
    :param memory_size: ``N``, number of memory rows (at most 2^24).
    :param word_size: ``W``, width of a row.
    :param num_reads: ``R``, read heads.
    :param sparse_reads: ``K`` < ``N``, rows each read head attends to (non-zeros per read
        weighting).
    :param index: kNN search for the reads: ``"exact"`` (scan of all rows), ``"ivf"``
        (approximate inverted-file index run by the native kernels), ``"faiss"`` (the same
        algorithm through ``faiss-cpu``) or ``"auto"`` (``"ivf"``, else ``"faiss"``, from
        :data:`~memagents.cores.sparse_access.AUTO_FAISS_MIN_ROWS` rows on; ``"exact"`` below).
    :param learn_init: learn the controller's initial ``h_0, c_0`` and the initial read vectors
        (zero-initialised). Memory (zeros), last-access steps and sparse weights always start at 0.
    :param fused: run each memory step as :class:`~memagents.cores.sparse_access.SparseAccessStep`
        (in-place sparse write, ``O(K·W)`` saved per step). ``False`` runs the dense reference
        (:func:`~memagents.cores.sparse_access.dense_access_step`); tests check both agree.
    """

    carries_state = True  # forward_inplace keeps the memory, index and LRU blocks between calls

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        memory_size: int = 1024,
        word_size: int = 16,
        num_reads: int = 4,
        sparse_reads: int = 4,
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
            below_memory_size={"sparse_reads": sparse_reads},
            index=index,
            learn_init=learn_init,
            fused=fused,
            # Interface: read keys R*W | write vector W | read strengths R (oneplus) | α, γ
            # (sigmoid)
            interface_sizes=[num_reads * word_size, word_size, num_reads, 2],
        )

    # -- state ---------------------------------------------------------------------------------
    def _initial_access(self, batch_size, device, dtype, memory: bool = True):
        B, N, W, R, K = (
            batch_size,
            self.memory_size,
            self.word_size,
            self.num_reads,
            self.sparse_reads,
        )

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(B, *shape, device=device, dtype=dtype)

        # the N×W memory as a broadcast zero (no allocation): forward copies it once anyway
        empty = torch.zeros((), device=device, dtype=dtype).expand(B, N, W) if memory else None
        return SparseAccessState(
            memory=empty,
            last_access=torch.zeros((), device=device, dtype=dtype).expand(B, N),
            time=zeros(1),
            read_weights=zeros(R, K),
            read_indices=zeros(R, K),
            write_weights=zeros(R * K + 1),
            write_indices=zeros(R * K + 1),
        )

    def _initial(self, batch_size, device, memory: bool = True) -> SAMState:
        device = self._device(device)
        dtype = self._dtype()

        def expand(p: Tensor) -> Tensor:
            return p.to(device).expand(batch_size, *p.shape[1:])

        return SAMState(
            controller=LSTMState(expand(self.h0), expand(self.c0)),
            access=self._initial_access(batch_size, device, dtype, memory),
            read_vectors=expand(self.read0),
        )

    def initial_state(self, batch_size, device=None) -> SAMState:
        return self._initial(batch_size, device)

    def state_shapes_tree(self) -> SAMState:
        N, W, R, K = self.memory_size, self.word_size, self.num_reads, self.sparse_reads
        return SAMState(
            controller=LSTMState((1, self.hidden_size), (1, self.hidden_size)),
            access=SparseAccessState(
                memory=(N, W),
                last_access=(N,),
                time=(1,),
                read_weights=(R, K),
                read_indices=(R, K),
                write_weights=(R * K + 1,),
                write_indices=(R * K + 1,),
            ),
            read_vectors=(R, W),
        )

    # -- time ----------------------------------------------------------------------------------
    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        """See :meth:`MemoryCore.forward`. The memory of ``state`` is copied once per call (never
        modified); the copy is then written in place step by step."""
        state, starts = self._check_inputs(x, state, episode_starts)
        return self._run(x, state, starts, return_debug)

    def snapshot(self, state):
        """:meth:`MemoryCore.snapshot`; a carried memory is copied from its written rows alone
        (:meth:`~memagents.cores.sparse_access.Carry.snapshot`)."""
        a = state.access
        return sparse_snapshot(self, state, sparse_access.Carry.find(a.memory, a.last_access))

    def forward_inplace(self, x, state, episode_starts=None):
        """:meth:`forward` for a caller that hands ``state`` over (see
        :meth:`MemoryCore.forward_inplace`). Without gradient on the native path, the memory and
        ``last_access`` of ``state`` are written in place and returned, and the kNN index, the
        LRU block minima and the rows written since each episode start are carried to the next
        call (:class:`~memagents.cores.sparse_access.Carry`): a step costs ``O(K·W)`` plus the
        index update, and an episode start zeroes only the rows the episode wrote. Otherwise it
        is :meth:`forward`."""
        state, starts = self._check_inputs(x, state, episode_starts)
        return self._run(x, state, starts, False, carried=True)

    def peek(self, x, state, episode_starts=None):
        """:meth:`MemoryCore.peek`. For one step without gradient on a state that a carried call
        returned (:meth:`forward_inplace`), the step runs in place and is then undone: the rows
        it wrote (``w^R_{t-1}``'s rows and the LRU row, saved before), ``last_access``, the LRU
        blocks and the written-rows mask restored, and the index re-filed at those rows; an
        element that restarts gets its whole memory back (saved before) and its index rebuilt.
        ``O(J·W + N)`` per element instead of a copy of the memory and a new index."""
        state, starts = self._check_inputs(x, state, episode_starts)
        a = state.access
        carry = None
        if x.shape[0] == 1 and self._native(x, state) and not self._wants_grad(x, state):
            carry = sparse_access.Carry.find(a.memory, a.last_access)
        if carry is None or self._restarts_whole(state, starts):
            return self._run(x, state, starts, False)[0]
        memory, last_access = a.memory, a.last_access
        saved, _, _ = carry.save_step(memory, last_access, a.read_indices, starts)
        y, _ = self._run_native(x, state, starts, False, carried=True)
        carry.restore(saved, memory, last_access)
        carry.keep(memory, last_access)
        return y

    def step(self, x, state: SAMState, return_debug=False):
        """One step (copies the memory; prefer :meth:`forward` over whole sequences)."""
        out = self._run(x.unsqueeze(0), state, None, return_debug)
        y, new_state = out[0].squeeze(0), out[1]
        if return_debug:
            return y, new_state, {k: v.squeeze(0) for k, v in out[2].items()}
        return y, new_state

    def _native(self, x: Tensor, state: SAMState) -> bool:
        """Whether :meth:`_run` takes the kernel path (:meth:`_run_native`)."""
        a = state.access
        return (
            self.fused
            and sparse_access._kernel() is not None
            and native.usable(
                x, a.memory, a.last_access, a.time, a.read_weights, state.read_vectors
            )
        )

    def _run(
        self, x: Tensor, state: SAMState, starts: Tensor | None, return_debug: bool,
        carried: bool = False,
    ):  # fmt: skip
        if self._restarts_whole(state, starts):
            state = self._initial(x.shape[1], x.device)  # what the restarts put in its place
        first_starts = None if starts is None else starts[0]
        for field in ("read_indices", "write_indices"):
            sparse_access.check_row_indices(
                f"access.{field}", getattr(state.access, field), self.memory_size, first_starts
            )
        if self._native(x, state):
            handed = carried
            carried = carried and not self._wants_grad(x, state)
            return self._run_native(x, state, starts, return_debug, carried, handed)
        T, B = x.shape[0], x.shape[1]
        R, W, K = self.num_reads, self.word_size, self.sparse_reads
        reset_steps = [False] * T if starts is None else starts.any(dim=1).tolist()
        initial = self._initial(B, x.device, memory=False) if any(reset_steps) else None

        access = state.access
        if self.fused:  # owned copies, written in place from here on
            memory = access.memory.clone(memory_format=torch.contiguous_format)
            last_access = access.last_access.clone()
        else:
            memory, last_access = access.memory, access.last_access
        index = sparse_access.make_index(self.index_kind, memory.detach())
        controller, read_vectors = state.controller, state.read_vectors
        small = access._replace(memory=None, last_access=last_access)
        no_reset = torch.zeros(0, dtype=torch.long, device=x.device)

        outputs, debug_steps = [], []
        for t in range(T):
            reset = no_reset
            if reset_steps[t]:
                reset = starts[t].nonzero().flatten()
                controller = state_lib.reset_where(controller, initial.controller, starts[t])
                read_vectors = state_lib.reset_where(read_vectors, initial.read_vectors, starts[t])
                # the memory is zeroed in place by the access step (``reset``)
                small = small._replace(
                    **{
                        f: state_lib.reset_where(
                            getattr(small, f), getattr(initial.access, f), starts[t]
                        )
                        for f in small._fields
                        if f != "memory"
                    }
                )

            h_prev, c_prev = controller
            ctrl_in = torch.cat([x[t], read_vectors.reshape(B, R * W)], dim=-1)
            h, c = self.controller(ctrl_in, (h_prev.squeeze(1), c_prev.squeeze(1)))
            keys, write_vector, strengths, gates = self.interface(h).split(self._sizes, dim=-1)
            strengths = addressing.oneplus(strengths)
            write_gate, interp_gate = torch.sigmoid(gates).split([1, 1], dim=-1)

            lru = sparse_access.least_recently_used(small.last_access)
            write_weights, write_indices = sparse_access.sparse_write_weights(
                small.read_weights, small.read_indices.long(), lru, write_gate, interp_gate
            )
            args = (memory, write_vector, write_weights, keys.view(B, R, W), strengths)
            if self.fused:
                memory, read_weights, read_indices, read_vectors = (
                    sparse_access.SparseAccessStep.apply(
                        *args, write_indices, reset, index, K, t < T - 1
                    )
                )
            else:
                memory, read_weights, read_indices, read_vectors = sparse_access.dense_access_step(
                    *args, write_indices, reset, index, K
                )
            last_access, time = sparse_access.usage_update(
                small.last_access,
                small.time,
                [
                    (write_indices, write_weights),
                    (read_indices.long().flatten(1), read_weights.flatten(1)),
                ],
                inplace=self.fused,
            )
            small = SparseAccessState(
                memory=None,
                last_access=last_access,
                time=time,
                read_weights=read_weights,
                read_indices=read_indices,
                write_weights=write_weights,
                write_indices=write_indices.to(write_weights.dtype),
            )
            controller = LSTMState(h.unsqueeze(1), c.unsqueeze(1))
            y = torch.cat([h, read_vectors.reshape(B, R * W)], dim=-1)
            outputs.append(y)
            if return_debug:
                debug_steps.append(
                    {
                        "memory": memory.detach().clone(),
                        "last_access": last_access.clone(),
                        "time": time,
                        "read_weights": read_weights,
                        "read_indices": read_indices,
                        "write_weights": write_weights,
                        "write_indices": small.write_indices,
                        "lru": lru.to(write_weights.dtype),
                        "read_vectors": read_vectors,
                    }
                )

        new_state = SAMState(
            controller=controller,
            access=small._replace(memory=memory),
            read_vectors=read_vectors,
        )
        y = torch.stack(outputs)
        if return_debug:
            return y, new_state, stack_debug(debug_steps)
        return y, new_state

    def _run_sequence(
        self, x, starts, reset_steps, initial, h, c, read_flat, memory, read_w, small, index,
        scratch, lib, rows, fresh,
    ):  # fmt: skip
        """:meth:`_run_native` as one :class:`SAMSequence` node: ``(y, new state)``."""
        B = x.shape[1]
        R, W, K, Hd, I = (
            self.num_reads, self.word_size, self.sparse_reads, self.hidden_size, self.input_size
        )  # fmt: skip
        dtype = memory.dtype
        x_proj, w_state = lstm_cell.input_gates(x, self.controller, I)
        init_h = init_c = init_r = None
        init = {}
        if initial is not None:
            init_h = initial.controller.h.reshape(B, Hd)
            init_c = initial.controller.c.reshape(B, Hd)
            init_r = initial.read_vectors.reshape(B, R * W)
            a = initial.access
            init = {
                "time": a.time,
                "read_weights": a.read_weights,
                "write_weights": a.write_weights,
            }
        aux = {
            "sizes": (R, W, K),
            "lib": lib,
            "index": index,
            "scratch": scratch,
            "starts": starts,
            "reset_steps": reset_steps,
            "initial": init,
            "small": small,
            "rows": rows,
            "fresh": fresh,
        }
        y, c, memory, read_w, write_w = SAMSequence.apply(
            x_proj, w_state, self.interface.weight, self.interface.bias, h, c, read_flat, memory,
            read_w, init_h, init_c, init_r, aux,
        )  # fmt: skip
        last = y[-1]
        new_state = SAMState(
            controller=LSTMState(last[:, :Hd].unsqueeze(1), c.unsqueeze(1)),
            access=SparseAccessState(
                memory=memory,
                last_access=small["last_access"],
                time=small["time"],
                read_weights=read_w,
                read_indices=small["read_idx"].to(dtype),
                write_weights=write_w,
                write_indices=small["write_idx"].to(dtype),
            ),
            read_vectors=last[:, Hd:].reshape(B, R, W),
        )
        return y, new_state

    def _run_native(
        self, x: Tensor, state: SAMState, starts: Tensor | None, return_debug: bool,
        carried: bool = False, handed: bool = False,
    ):  # fmt: skip
        """:meth:`_run` with the memory step as one autograd node per step
        (:class:`~memagents.cores.sparse_access.SAMAccessStep`, native kernels): the same
        equations; the loop keeps ``h``, ``c`` and the read vectors flat (``[B, ·]``) and the
        indices as integers, converting to the state's layout once at the end. ``carried`` (no
        gradient): the state's memory is written in place and what the next call needs is kept
        in a :class:`~memagents.cores.sparse_access.Carry` (see :meth:`forward_inplace`).
        ``handed`` (:meth:`forward_inplace`, with or without gradient): the state's memory and
        last-access steps are written in place when they can be, not copied."""
        T, B = x.shape[0], x.shape[1]
        R, W, K = self.num_reads, self.word_size, self.sparse_reads
        reset_steps = [False] * T if starts is None else starts.any(dim=1).tolist()
        initial = self._initial(B, x.device, memory=False) if any(reset_steps) else None

        access = state.access
        N = self.memory_size
        wants_grad = self._wants_grad(x, state)
        # the whole call as one node (its backward zeroes only the rows a restart needs)
        lib = sparse_links.native_kernel() if SEQUENCE_NODE and wants_grad else None
        sequence = lib is not None and not return_debug
        # an initial state's last-access steps: all zero, nothing to read or to reset at t = 0
        fresh = sparse_access.is_zero_broadcast(
            access.last_access
        ) and sparse_access.is_zero_broadcast(access.memory)
        carry = sparse_access.Carry.find(access.memory, access.last_access) if carried else None
        if carry is not None:  # the memory, its index and the LRU blocks as the last call left them
            memory, last_access = access.memory, access.last_access
            index, scratch = carry.index, carry.scratch
            scratch.rows = []
        else:
            # written in place from here on: the state's own when handed over, else copies
            memory = sparse_access.owned(access.memory, handed)
            last_access = sparse_access.owned(access.last_access, handed)
            # from the state's memory: an initial (broadcast zero) memory needs no scan
            index = sparse_access.make_index(self.index_kind, access.memory.detach())
            scratch = sparse_access.StepScratch(
                last_access,
                dense_grad=memory.requires_grad,
                block_rows=lru_block_rows(N),
                zero=fresh,
            )
            if sequence or not wants_grad:
                # the rows each element wrote (a reset zeroes only those); kept for the next
                # call only when carried. (Not for the per-step nodes with gradient, whose
                # backward zeroes a restarting element's whole gradient itself.)
                carry = sparse_access.Carry(access.memory, last_access, index, scratch)
        h, c = state.controller.h.squeeze(1), state.controller.c.squeeze(1)  # [B, H]
        read_flat = state.read_vectors.reshape(B, R * W)
        time, read_w, write_w = access.time, access.read_weights, access.write_weights
        read_idx, write_idx = access.read_indices.long(), access.write_indices.long()
        if sequence:  # (lib: the LSTM cell's kernel)
            small = {
                "last_access": last_access, "time": time, "read_idx": read_idx,
                "write_idx": write_idx, "write_w": write_w,
            }  # fmt: skip
            return self._run_sequence(
                x, starts, reset_steps, initial, h, c, read_flat, memory, read_w, small,
                index, scratch, lib, carry, fresh,
            )  # fmt: skip
        no_reset = torch.zeros(0, dtype=torch.long, device=x.device)
        lru = None

        outputs, debug_steps = [], []
        for t in range(T):
            reset = no_reset
            if reset_steps[t]:
                st = starts[t]
                reset = st.nonzero().flatten()
                init, init_a = initial, initial.access
                h = torch.where(st[:, None], init.controller.h.squeeze(1), h)
                c = torch.where(st[:, None], init.controller.c.squeeze(1), c)
                read_flat = torch.where(st[:, None], init.read_vectors.reshape(B, R * W), read_flat)
                time, read_w, write_w, read_idx, write_idx = _reset_access(
                    st, reset, init_a._asdict(), time, read_w, write_w, read_idx, write_idx,
                    last_access, scratch, zeroed=fresh and t == 0,
                )  # fmt: skip
                if carry is not None:  # zero the rows the episodes wrote (not the step: all N)
                    if not (fresh and t == 0):  # (an initial memory has none)
                        carry.reset(memory, reset)
                    reset = no_reset
                lru = None
            if lru is None:
                lru = scratch.least_recently_used(last_access)

            ctrl_in = torch.cat([x[t], read_flat], dim=-1)
            h, c = self.controller(ctrl_in, (h, c))
            xi = self.interface(h)
            step_lru = lru
            memory, read_w, read_idx, read_flat, write_w, write_idx, time, lru = (
                sparse_access.SAMAccessStep.apply(
                    xi, read_w, memory, read_idx, lru, last_access, time, reset, index,
                    R, W, K, t < T - 1, scratch,
                )
            )  # fmt: skip
            if carry is not None:
                carry.wrote(write_idx)
            outputs.append(torch.cat([h, read_flat], dim=-1))
            if return_debug:
                dtype = read_w.dtype
                debug_steps.append(
                    {
                        "memory": memory.detach().clone(),
                        "last_access": last_access.clone(),
                        "time": time,
                        "read_weights": read_w,
                        "read_indices": read_idx.to(dtype),
                        "write_weights": write_w,
                        "write_indices": write_idx.to(dtype),
                        "lru": step_lru.to(dtype),
                        "read_vectors": read_flat.view(B, R, W),
                    }
                )

        if carried:
            carry.keep(memory, last_access)
        dtype = memory.dtype
        new_state = SAMState(
            controller=LSTMState(h.unsqueeze(1), c.unsqueeze(1)),
            access=SparseAccessState(
                memory=memory,
                last_access=last_access,
                time=time,
                read_weights=read_w,
                read_indices=read_idx.to(dtype),
                write_weights=write_w,
                write_indices=write_idx.to(dtype),
            ),
            read_vectors=read_flat.view(B, R, W),
        )
        y = torch.stack(outputs)
        if return_debug:
            return y, new_state, stack_debug(debug_steps)
        return y, new_state
