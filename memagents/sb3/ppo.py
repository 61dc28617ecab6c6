"""``MemoryPPO``: RecurrentPPO with a rollout buffer that stores the recurrent state only where a
training sequence starts.

sb3-contrib's ``RecurrentRolloutBuffer`` stores the full ``(h, c)`` of actor and critic for every
step of the rollout and copies it to host memory at each step: ``4 * n_steps * n_envs * H`` floats.
For a DNC with N=64, W=16, R=4 (packed ``H`` = 2,880) at ``n_steps=128, n_envs=16`` that is about
90 MiB per rollout; for large memories it is gigabytes.

Here training sequences are *episode segments*: a segment starts at the rollout's first step or at
an episode start and runs to the episode's end or the rollout's end. A segment that starts at an
episode start needs no stored state (the core resets to its initial state there), so the state is
needed only once per env, at the rollout start: ``4 * n_envs * H`` floats (under 1 MiB for the
DNC above). Minibatches are whole segments, shuffled, grouped until they hold at least
``batch_size`` steps.

A minibatch is laid out as ``n_col`` training sequences ("columns") of the longest segment's length
``T``, padding masked out of the loss. Unpacked, each segment is its own column. Packed (the
default for cores whose mid-sequence resets are free, see
:attr:`memagents.cores.MemoryCore.cheap_mid_sequence_resets`), segments that begin an episode are
placed one after another in a column (best fit, longest first): each starts with
``episode_start = 1``, so the core resets to its initial state there exactly as at a column's
first step, and every step sees the same state as unpacked. Segments that continue an episode
from the previous rollout need their stored state and so each heads a column. With short
episodes (Copy: ~25 segments of up to ~21 steps in a 256-step minibatch) this halves the steps a
step-by-step core runs, padding included.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.buffers import (
    RecurrentDictRolloutBuffer,
    RecurrentRolloutBuffer,
)
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import (
    RecurrentDictRolloutBufferSamples,
    RecurrentRolloutBufferSamples,
    RNNStates,
)
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import FloatSchedule

from memagents.sb3.policy import MemoryPolicy

_STATE_FIELDS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")
_FLAT_FIELDS = ("actions", "values", "log_probs", "advantages", "returns", "episode_starts")


class _SequenceStartMixin:
    """Shared logic of the Box and Dict sequence-start buffers (placed before the sb3-contrib
    buffer class in the MRO; ``_base`` is the plain SB3 buffer it bypasses for storage)."""

    _base: ClassVar[type[RolloutBuffer]]
    hidden_state_shape: tuple[int, int, int, int]
    buffer_size: int
    n_envs: int
    pos: int
    device: torch.device
    generator_ready: bool

    #: pack several episode segments into one training sequence (see the module docstring)
    pack_segments: bool = False

    def __init__(self, *args: Any, pack_segments: bool = False, **kwargs: Any) -> None:
        self.pack_segments = bool(pack_segments)
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        self._base.reset(self)
        # (num_layers, n_envs, H): the packed states before the rollout's first step
        _, num_layers, n_envs, hidden = self.hidden_state_shape
        for name in _STATE_FIELDS:
            setattr(self, name, np.zeros((num_layers, n_envs, hidden), dtype=np.float32))
        self.segment_starts: np.ndarray | None = None
        self.segment_lengths: np.ndarray | None = None

    def add(self, *args: Any, lstm_states: RNNStates, **kwargs: Any) -> None:
        """Store one step; the recurrent state only when it is the rollout's first step.

        :param lstm_states: the packed states *before* this step (as RecurrentPPO passes them),
            ``RNNStates(pi=(h, c), vf=(h, c))``, each ``(num_layers, n_envs, H)``.
        """
        if self.pos == 0:
            tensors = (*lstm_states.pi, *lstm_states.vf)
            for name, tensor in zip(_STATE_FIELDS, tensors, strict=True):
                getattr(self, name)[...] = tensor.detach().cpu().numpy()
        self._base.add(self, *args, **kwargs)

    def _prepare(self) -> None:
        """Flatten env-major (``(n_steps, n_envs, ...) -> (n_envs * n_steps, ...)``) and find the
        segments: flat index ``e * n_steps + t`` starts one where ``t == 0`` or an episode starts."""
        for name in _FLAT_FIELDS:
            setattr(self, name, self.swap_and_flatten(getattr(self, name)))
        starts = self.episode_starts.reshape(self.n_envs, self.buffer_size) > 0.5
        starts[:, 0] = True
        self.segment_starts = np.flatnonzero(starts)
        ends = np.append(self.segment_starts[1:], self.n_envs * self.buffer_size)
        self.segment_lengths = ends - self.segment_starts

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        """Minibatches of whole episode segments, shuffled, each of at least ``batch_size`` steps
        (the last one may be smaller); ``None`` yields one minibatch with everything."""
        assert self.full, "Rollout buffer must be full before sampling from it"
        if not self.generator_ready:
            self._prepare_observations()
            self._prepare()
            self.generator_ready = True
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        # the global numpy RNG on purpose: SB3's ``seed=`` seeds it (sb3-contrib's buffer uses it too)
        order = np.random.permutation(len(self.segment_starts))  # noqa: NPY002
        chunk: list[int] = []
        steps = 0
        for seg in order:
            chunk.append(seg)
            steps += self.segment_lengths[seg]
            if steps >= batch_size:
                yield self._get_samples(np.array(chunk))
                chunk, steps = [], 0
        if chunk:
            yield self._get_samples(np.array(chunk))

    def _prepare_observations(self) -> None:
        raise NotImplementedError

    def _columns(self, segments: np.ndarray) -> list[list[int]]:
        """The minibatch's training sequences: lists of segment numbers, each list's segments
        run one after another; the first segment of each list gives the stored state.

        Unpacked: one segment per column. Packed: segments that continue an episode from the
        previous rollout (no episode start at their first step) each head a column; the others,
        longest first, go into the column with the least room that still fits them within
        ``T = max length`` (on ties, the one that has had that room longest; a new column if
        none fits). This is best fit decreasing, the classic bin-packing heuristic, in
        ``O(n·T)`` for ``n`` segments."""
        if not self.pack_segments:
            return [[int(seg)] for seg in segments]
        lengths = self.segment_lengths
        capacity = int(lengths[segments].max())
        starts_episode = self.episode_starts.reshape(-1)[self.segment_starts[segments]] > 0.5
        columns = [[int(seg)] for seg in segments[~starts_episode]]
        # room -> the columns with that much room left, in the order they got it
        by_room: list[collections.deque[int]] = [collections.deque() for _ in range(capacity + 1)]
        for i, col in enumerate(columns):
            by_room[capacity - int(lengths[col[0]])].append(i)
        rest = segments[starts_episode]
        for seg in rest[np.argsort(-lengths[rest], kind="stable")]:
            length = int(lengths[seg])
            room = next((r for r in range(length, capacity + 1) if by_room[r]), None)
            if room is None:
                i, room = len(columns), capacity
                columns.append([])
            else:
                i = by_room[room].popleft()
            columns[i].append(int(seg))
            by_room[room - length].append(i)
        return columns

    def _padded_indices(self, columns: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices ``(n_col, T)`` of the steps of each column's segments, in order (padding
        points at the column's first step), and the validity mask ``(n_col, T)``."""
        T = max(int(self.segment_lengths[col].sum()) for col in columns)
        indices = np.empty((len(columns), T), dtype=np.int64)
        valid = np.zeros((len(columns), T), dtype=bool)
        for i, col in enumerate(columns):
            flat = np.concatenate(
                [np.arange(self.segment_lengths[s]) + self.segment_starts[s] for s in col]
            )
            indices[i, : len(flat)] = flat
            indices[i, len(flat) :] = flat[0]
            valid[i, : len(flat)] = True
        return indices, valid

    def _pad(self, array: np.ndarray, indices: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """``array (n_envs * n_steps, *s)`` -> zero-padded ``(n_seq * T, *s)`` tensor."""
        picked = array[indices]  # (n_seq, T, *s)
        mask = valid.reshape(valid.shape + (1,) * (picked.ndim - 2))
        picked = np.where(mask, picked, 0).astype(array.dtype, copy=False)
        return self.to_torch(picked.reshape(-1, *array.shape[1:]))

    def _start_states(self, segments: np.ndarray) -> RNNStates:
        """Packed states before each segment (a column's first), each ``(num_layers, n_seq, H)``:
        the stored state for segments that begin the rollout; zeros for segments that begin an
        episode (the core replaces them by its initial state, since ``episode_starts`` is 1
        there)."""
        flat = self.segment_starts[segments]
        env = flat // self.buffer_size
        at_rollout_start = (flat % self.buffer_size) == 0

        def pick(name: str) -> torch.Tensor:
            stored = getattr(self, name)[:, env]  # (num_layers, n_seq, H)
            states = np.where(at_rollout_start[None, :, None], stored, 0).astype(np.float32)
            return self.to_torch(states).contiguous()

        return RNNStates(
            (pick("hidden_states_pi"), pick("cell_states_pi")),
            (pick("hidden_states_vf"), pick("cell_states_vf")),
        )

    def _common_samples(self, segments: np.ndarray) -> dict[str, Any]:
        columns = self._columns(segments)
        indices, valid = self._padded_indices(columns)
        flat_valid = self.to_torch(valid.reshape(-1).astype(np.float32))
        return dict(
            actions=self._pad(self.actions, indices, valid),
            old_values=self._pad(self.values, indices, valid).flatten(),
            old_log_prob=self._pad(self.log_probs, indices, valid).flatten(),
            advantages=self._pad(self.advantages, indices, valid).flatten(),
            returns=self._pad(self.returns, indices, valid).flatten(),
            lstm_states=self._start_states(np.array([col[0] for col in columns])),
            episode_starts=self._pad(self.episode_starts, indices, valid).flatten(),
            mask=flat_valid,
            _indices=indices,
            _valid=valid,
        )


class SequenceStartRolloutBuffer(_SequenceStartMixin, RecurrentRolloutBuffer):
    """Rollout buffer for Box observations that stores the packed recurrent state only at the
    rollout's first step (per env); minibatches are whole episode segments.

    :param buffer_size: ``n_steps``, steps per env per rollout.
    :param observation_space: observation space.
    :param action_space: action space.
    :param hidden_state_shape: ``(n_steps, num_layers, n_envs, H)`` as RecurrentPPO computes it;
        only ``(num_layers, n_envs, H)`` is allocated per state tensor.
    :param device: where sampled minibatches go.
    :param gae_lambda: GAE's λ.
    :param gamma: discount factor γ.
    :param n_envs: number of parallel environments.
    """

    _base = RolloutBuffer

    def _prepare_observations(self) -> None:
        self.observations = self.swap_and_flatten(self.observations)

    def _get_samples(self, segments: np.ndarray, env: Any = None) -> RecurrentRolloutBufferSamples:
        data = self._common_samples(segments)
        indices, valid = data.pop("_indices"), data.pop("_valid")
        return RecurrentRolloutBufferSamples(
            observations=self._pad(self.observations, indices, valid), **data
        )


class SequenceStartDictRolloutBuffer(_SequenceStartMixin, RecurrentDictRolloutBuffer):
    """:class:`SequenceStartRolloutBuffer` for Dict observations (same parameters)."""

    _base = DictRolloutBuffer

    def _prepare_observations(self) -> None:
        for key, obs in self.observations.items():
            self.observations[key] = self.swap_and_flatten(obs)

    def _get_samples(
        self, segments: np.ndarray, env: Any = None
    ) -> RecurrentDictRolloutBufferSamples:
        data = self._common_samples(segments)
        indices, valid = data.pop("_indices"), data.pop("_valid")
        observations = {
            key: self._pad(obs, indices, valid) for key, obs in self.observations.items()
        }
        return RecurrentDictRolloutBufferSamples(observations=observations, **data)


class MemoryPPO(RecurrentPPO):
    """``sb3_contrib.RecurrentPPO`` with :class:`SequenceStartRolloutBuffer` (or its Dict
    variant): the recurrent state is stored once per env per rollout instead of at every step,
    and minibatches are whole episode segments (each at least ``batch_size`` steps, so a
    minibatch can exceed ``batch_size`` when episodes are long).

    Takes RecurrentPPO's arguments (``policy`` may be ``"MemoryPolicy"``; see
    ``sb3_contrib.RecurrentPPO`` for each of them) and one more:

    :param pack_segments: place several episode segments one after another in each training
        sequence (see the module docstring): the same loss and gradients from fewer, fuller
        sequences. ``None`` (default): pack when every recurrent core of the policy has
        :attr:`~memagents.cores.MemoryCore.cheap_mid_sequence_resets` (the memory cores, not
        ``lstm``/``gru``, whose whole-sequence kernel a reset splits).
    """

    def __init__(self, *args: Any, pack_segments: bool | None = None, **kwargs: Any) -> None:
        if pack_segments not in (None, True, False):
            raise ValueError(f"pack_segments={pack_segments!r}: expected None, True or False")
        self.pack_segments = pack_segments
        super().__init__(*args, **kwargs)

    def _packs_segments(self) -> bool:
        if self.pack_segments is not None:
            return self.pack_segments
        modules = [self.policy.lstm_actor, getattr(self.policy, "lstm_critic", None)]
        cores = [getattr(m, "core", m) for m in modules if m is not None]
        return all(getattr(core, "cheap_mid_sequence_resets", False) for core in cores)

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        **RecurrentPPO.policy_aliases,
        "MemoryPolicy": MemoryPolicy,
    }

    def _setup_model(self) -> None:
        # RecurrentPPO._setup_model with the sequence-start buffer: the stock buffer is never
        # allocated (for large memories it would not fit).
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(
            self.observation_space,
            self.action_space,
            self.lr_schedule,
            use_sde=self.use_sde,
            **self.policy_kwargs,
        )
        self.policy = self.policy.to(self.device)
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            raise ValueError("Policy must subclass RecurrentActorCriticPolicy")
        lstm = self.policy.lstm_actor
        state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        self._last_lstm_states = RNNStates(
            tuple(torch.zeros(state_shape, device=self.device) for _ in range(2)),
            tuple(torch.zeros(state_shape, device=self.device) for _ in range(2)),
        )
        buffer_cls = (
            SequenceStartDictRolloutBuffer
            if isinstance(self.observation_space, spaces.Dict)
            else SequenceStartRolloutBuffer
        )
        self.rollout_buffer = buffer_cls(
            self.n_steps,
            self.observation_space,
            self.action_space,
            (self.n_steps, *state_shape),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            pack_segments=self._packs_segments(),
        )
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError(
                    f"clip_range_vf={self.clip_range_vf!r} is invalid: expected > 0, "
                    "or None to disable value clipping"
                )
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)


def recurrent_state_nbytes(buffer: RecurrentRolloutBuffer | RecurrentDictRolloutBuffer) -> int:
    """Bytes a recurrent rollout buffer (sb3-contrib's or ours) holds for recurrent states."""
    return sum(getattr(buffer, name).nbytes for name in _STATE_FIELDS)
