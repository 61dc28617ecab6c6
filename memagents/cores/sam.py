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
whole access step after the controller is one autograd node per step
(:class:`~memagents.cores.sparse_access.SAMAccessStep`), the LRU row is found through block
minima (``O(sqrt N)`` per step) and nothing ``N``-sized is touched per step; the composed torch
functions stay the reference (tests compare both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from memagents.cores import addressing, native, sparse_access
from memagents.cores import state as state_lib
from memagents.cores.base import MemoryCore, check_positive_int, set_forget_bias, stack_debug
from memagents.cores.rnn import LSTMState

#: Largest ``N`` whose row indices are exact in float32 (the packed state's dtype).
MAX_MEMORY_SIZE = 2**24


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


#: From this many rows on, the native path finds the LRU row through block minima of the
#: last-access steps (``O(sqrt N)`` per step) rather than a scan of all ``N``.
BLOCK_LRU_MIN_ROWS = 4096


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

    def _run(self, x: Tensor, state: SAMState, starts: Tensor | None, return_debug: bool):
        first_starts = None if starts is None else starts[0]
        for field in ("read_indices", "write_indices"):
            sparse_access.check_row_indices(
                f"access.{field}", getattr(state.access, field), self.memory_size, first_starts
            )
        if self._native(x, state):
            return self._run_native(x, state, starts, return_debug)
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

    def _run_native(self, x: Tensor, state: SAMState, starts: Tensor | None, return_debug: bool):
        """:meth:`_run` with the memory step as one autograd node per step
        (:class:`~memagents.cores.sparse_access.SAMAccessStep`, native kernels): the same
        equations; the loop keeps ``h``, ``c`` and the read vectors flat (``[B, ·]``) and the
        indices as integers, converting to the state's layout once at the end."""
        T, B = x.shape[0], x.shape[1]
        R, W, K = self.num_reads, self.word_size, self.sparse_reads
        reset_steps = [False] * T if starts is None else starts.any(dim=1).tolist()
        initial = self._initial(B, x.device, memory=False) if any(reset_steps) else None

        access = state.access
        memory = sparse_access.owned_copy(access.memory)  # written in place from here on
        last_access = sparse_access.owned_copy(access.last_access)
        # from the state's memory: an initial (broadcast zero) memory needs no scan
        index = sparse_access.make_index(self.index_kind, access.memory.detach())
        N = self.memory_size
        scratch = sparse_access.StepScratch(
            last_access,
            dense_grad=memory.requires_grad,
            block_rows=math.isqrt(N) if N >= BLOCK_LRU_MIN_ROWS else None,
        )
        h, c = state.controller.h.squeeze(1), state.controller.c.squeeze(1)  # [B, H]
        read_flat = state.read_vectors.reshape(B, R * W)
        time, read_w, write_w = access.time, access.read_weights, access.write_weights
        read_idx, write_idx = access.read_indices.long(), access.write_indices.long()
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
                time = state_lib.reset_where(time, init_a.time, st)
                read_w = state_lib.reset_where(read_w, init_a.read_weights, st)
                write_w = state_lib.reset_where(write_w, init_a.write_weights, st)
                read_idx = read_idx.masked_fill(st[:, None, None], 0)
                write_idx = write_idx.masked_fill(st[:, None], 0)
                last_access.index_fill_(0, reset, 0.0)  # the memory is zeroed by the step
                scratch.rebuild(last_access, st.to(torch.uint8))
                lru = None
            if lru is None:
                lru = sparse_access.least_recently_used(last_access)

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
