"""The contract every memory core meets (see ``shared/DESIGN.md``, section 2).

A core is an ``nn.Module`` that carries a recurrent state through time. The state is a typed
``NamedTuple`` of tensors (batch first) and never lives on the module, so it can be sliced per
environment, stored in a rollout buffer, packed to ``[B, S]`` for SB3, and reset per element.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memagents.cores import state as state_lib


class MemoryCore(nn.Module):
    """Base class of all cores.

    Subclasses implement :meth:`initial_state`, :meth:`state_shapes_tree` and either
    :meth:`step` (one time step; the base :meth:`forward` loops over time and applies resets) or
    their own :meth:`forward` (whole-sequence fast paths) that honours the same reset rule.

    Attributes:
        input_size: features per step of the input ``x``.
        output_size: features per step of the output ``y``.
    """

    input_size: int
    output_size: int

    #: whether an episode start in the middle of a training sequence costs no more than one at
    #: its first step. True for cores that run step by step (resets are per-element selects);
    #: False where a reset mid-sequence splits a whole-sequence kernel (``nn.LSTM``, ``nn.GRU``).
    #: :class:`memagents.sb3.MemoryPPO` packs several episode segments into one training sequence
    #: only when this holds for every core of the policy.
    cheap_mid_sequence_resets: bool = True

    #: whether :meth:`forward_inplace` keeps work from one call to the next (the sparse cores'
    #: memory, kNN index and LRU bookkeeping), so that a caller stepping one step at a time
    #: should hand its state over and pass the episode starts to the core rather than reset the
    #: state itself (a reset outside would be a new state, and an ``O(N·W)`` select).
    carries_state: bool = False

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        """The state at the start of an episode (may depend on learned parameters).

        :param batch_size: ``B``.
        :param device: where to put it; defaults to the device of the core's parameters.
        :return: a NamedTuple of ``[B, ...]`` tensors.
        """
        raise NotImplementedError

    def state_shapes_tree(self) -> Any:
        """The state's NamedTuple structure with each tensor replaced by its per-element shape."""
        raise NotImplementedError

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-batch-element shape of every state tensor, by dotted field name."""
        return dict(state_lib.named_leaves(self.state_shapes_tree()))

    @property
    def state_size(self) -> int:
        """Floats per batch element in the packed state (``S`` of :meth:`pack_state`)."""
        return state_lib.state_size(self.state_shapes_tree())

    def pack_state(self, state: Any) -> Tensor:
        """Flatten a state into ``[B, state_size]`` (exact; inverse of :meth:`unpack_state`)."""
        return state_lib.pack(state)

    def unpack_state(self, flat: Tensor) -> Any:
        """Rebuild the NamedTuple state from ``[B, state_size]``."""
        return state_lib.unpack(flat, self.state_shapes_tree())

    def _device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    # -- time ----------------------------------------------------------------------------------
    def step(self, x: Tensor, state: Any, return_debug: bool = False):
        """One time step.

        :param x: ``[B, input_size]``.
        :param state: the state before this step.
        :param return_debug: also return a dict of ``[B, ...]`` debug tensors.
        :return: ``(y [B, output_size], state)`` or ``(y, state, debug)``.
        """
        raise NotImplementedError

    def _check_inputs(
        self, x: Tensor, state: Any, episode_starts: Tensor | None
    ) -> tuple[Any, Tensor | None]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"x must have shape [T, B, {self.input_size}] (input_size={self.input_size}); "
                f"got {tuple(x.shape)}"
            )
        T, B = x.shape[0], x.shape[1]
        if state is None:
            state = self.initial_state(B, x.device)
        if episode_starts is not None:
            if tuple(episode_starts.shape) != (T, B):
                raise ValueError(
                    f"episode_starts must have shape [T, B] = [{T}, {B}]; "
                    f"got {tuple(episode_starts.shape)}"
                )
            episode_starts = episode_starts.to(device=x.device, dtype=torch.bool)
        return state, episode_starts

    def forward(
        self,
        x: Tensor,
        state: Any = None,
        episode_starts: Tensor | None = None,
        return_debug: bool = False,
    ):
        """Run the core over a sequence.

        :param x: ``[T, B, input_size]``.
        :param state: state before step 0; ``None`` means :meth:`initial_state`.
        :param episode_starts: ``[T, B]``, 1 where step ``t`` begins a new episode for element
            ``b``: that element's state is replaced by the initial state before step ``t``.
            ``None`` means no resets.
        :param return_debug: also return a dict of ``[T, B, ...]`` debug tensors (memory,
            weightings, ...; see the core's :meth:`step`).
        :return: ``(y [T, B, output_size], final_state)`` or ``(y, final_state, debug)``.
        """
        state, starts = self._check_inputs(x, state, episode_starts)
        T, B = x.shape[0], x.shape[1]
        reset_steps = [False] * T if starts is None else starts.any(dim=1).tolist()
        initial = self.initial_state(B, x.device) if any(reset_steps) else None
        outputs = []
        debug_steps: list[dict[str, Tensor]] = []
        for t in range(T):
            if reset_steps[t]:
                state = state_lib.reset_where(state, initial, starts[t])
            if return_debug:
                y, state, dbg = self.step(x[t], state, return_debug=True)
                debug_steps.append(dbg)
            else:
                y, state = self.step(x[t], state)
            outputs.append(y)
        y = torch.stack(outputs)
        if return_debug:
            return y, state, stack_debug(debug_steps)
        return y, state

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` that later in-place steps (:meth:`forward_inplace`) leave alone:
        what a rollout buffer keeps of the state at the rollout's start. A broadcast zero stays
        one; SAM and SDNC copy a carried memory from the rows it may hold (``O(rows · W)``)."""
        from memagents.cores.sparse_access import is_zero_broadcast

        return state_lib.map_state(
            lambda t: t.detach() if is_zero_broadcast(t) else t.detach().clone(), state
        )

    def peek(self, x: Tensor, state: Any, episode_starts: Tensor | None = None) -> Tensor:
        """The outputs ``y [T, B, output_size]`` of :meth:`forward` from ``state``, which is left
        as it was (a rollout's bootstrap value after its last step: the state goes on to the
        next rollout). The base class calls :meth:`forward` (which never modifies its input);
        SAM steps a carried state in place and restores what the step changed, instead of
        copying its ``N×W`` memory."""
        return self(x, state, episode_starts)[0]

    def _restarts_whole(self, state: Any, starts: Tensor | None) -> bool:
        """Whether every element restarts at step 0 and no state tensor wants a gradient: the
        state is then replaced before it is read, and a core may start from its initial state
        instead (no copy or scan of an ``N×W`` memory it would only discard)."""
        return (
            starts is not None
            and bool(starts[0].all())
            and not any(t.requires_grad for t in state_lib.leaves(state))
        )

    def _wants_grad(self, x: Tensor, state: Any) -> bool:
        """Whether a call builds a graph (a parameter, the input or the state needs one)."""
        return torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(t.requires_grad for t in state_lib.leaves(state))
        )

    def forward_inplace(self, x: Tensor, state: Any, episode_starts: Tensor | None = None):
        """:meth:`forward` (no debug output) for a caller that hands ``state`` over: the core may
        write the state's tensors in place and return them in the new state, so ``state`` must
        not be read afterwards. The outputs and the new state's values are those of
        :meth:`forward`. Rollouts step this way; the sparse cores (SAM, SDNC) then keep their
        memory, kNN index and LRU bookkeeping from one call to the next instead of copying and
        rebuilding ``O(N·W)`` of them per call. The base class simply calls :meth:`forward`.

        :param x: ``[T, B, input_size]``.
        :param state: the state before step 0 (given up by the caller).
        :param episode_starts: ``[T, B]`` or ``None``, as in :meth:`forward`.
        :return: ``(y [T, B, output_size], final_state)``.
        """
        return self(x, state, episode_starts)


def stack_debug(steps: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-step debug dicts ``{name: [B, ...]}`` into ``{name: [T, B, ...]}``."""
    if not steps:
        return {}
    return {k: torch.stack([d[k] for d in steps]) for k in steps[0]}


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer hyperparameter; raise ``ValueError`` naming it and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def set_forget_bias(cell: nn.LSTMCell | nn.LSTM, value: float = 1.0) -> None:
    """Initialise LSTM forget-gate biases to ``value`` (split as ``value`` on ``bias_ih``, 0 on
    ``bias_hh``) and the other gate biases to 0.

    Gers, Schmidhuber & Cummins 2000: with the forget gate open at the start, the cell keeps its
    contents until it has learned to forget; NTM implementations use it to stabilise early training
    (Collier & Beel 2018).
    """
    with torch.no_grad():
        for name, param in cell.named_parameters():
            if "bias" in name:
                param.zero_()
                if "bias_ih" in name:
                    hidden = param.shape[0] // 4
                    param[hidden : 2 * hidden] = value
