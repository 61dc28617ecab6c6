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
import time
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
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import FloatSchedule, explained_variance, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from envs.vector import BatchedEnv
from memagents.cores import state as state_lib
from memagents.sb3.device import DeviceRolloutBuffer, batched_env
from memagents.sb3.policy import MemoryPolicy
from memagents.sb3.segments import chunk_segments, pack_columns

#: ``credit`` values: one advantage per step (PPO as published) or per action element
CREDITS = ("step", "element")
#: ``collector`` values: ``device`` (tensors from the batched env to the update,
#: ``memagents.sb3.device``), ``sb3`` (sb3-contrib's numpy loop), ``auto`` (``device`` for a
#: batched env, else ``sb3``)
COLLECTORS = ("auto", "device", "sb3")
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
    #: ``A`` > 0: keep a reward per action element (``ppo.credit: element``); 0: scalar only
    reward_elements: int = 0

    def __init__(
        self, *args: Any, pack_segments: bool = False, reward_elements: int = 0, **kwargs: Any
    ) -> None:
        self.pack_segments = bool(pack_segments)
        self.reward_elements = int(reward_elements)
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        self._base.reset(self)
        # (num_layers, n_envs, H): the packed states before the rollout's first step
        _, num_layers, n_envs, hidden = self.hidden_state_shape
        for name in _STATE_FIELDS:
            setattr(self, name, np.zeros((num_layers, n_envs, hidden), dtype=np.float32))
        self.segment_starts: np.ndarray | None = None
        self.segment_lengths: np.ndarray | None = None
        self.starts_episode: np.ndarray | None = None  # [n_segments] bool: begins an episode
        if self.reward_elements:
            shape = (self.buffer_size, self.n_envs, self.reward_elements)
            self.element_rewards = np.zeros(shape, dtype=np.float32)
            self.element_advantages = np.zeros(shape, dtype=np.float32)
        # (n_envs * n_steps, A): the per-element log-probabilities of the stored actions under
        # the policy that collected them, set by ``set_element_log_probs`` before an update
        self.element_log_probs: np.ndarray | None = None

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

    def add_reward_elements(self, rewards: np.ndarray) -> None:
        """Store the per-element rewards ``(n_envs, A)`` of the step the next ``add`` stores."""
        self.element_rewards[self.pos] = rewards

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        """SB3's GAE(λ) for the scalar advantages and returns; with ``reward_elements`` also one
        advantage per action element (``ppo.credit: element``).

        Element ``i`` of step ``t`` gets GAE(λ) on its own reward ``r_{t,i}`` with the baseline
        ``V(s_t) / A``: ``δ_{t,i} = r_{t,i} + γ V(s_{t+1}) / A - V(s_t) / A`` (zero bootstrap
        past a terminal step), ``Â_{t,i} = δ_{t,i} + γλ Â_{t+1,i}``. Since ``Σ_i r_{t,i} = r_t``
        the element advantages sum to the scalar advantage ``Â_t`` (Schulman et al. 2016,
        eq. 16), and the returns (the value's targets) are unchanged. Whatever the stored reward
        holds beyond ``Σ_i r_{t,i}`` (a timeout's bootstrapped value, float rounding) is spread
        evenly over the elements. The policy gradient of element ``i`` with its own reward is
        unbiased where an action element changes only its own reward and no later observation
        (the algorithmic tasks, laid out before the episode starts): the other elements' rewards
        are then independent of it and only add variance."""
        super().compute_returns_and_advantage(last_values, dones)
        if not self.reward_elements:
            return
        A = self.reward_elements
        rest = self.rewards - self.element_rewards.sum(-1)  # (n_steps, n_envs)
        rewards = self.element_rewards + rest[..., None] / A
        values = self.values / A
        next_values = np.asarray(last_values.detach().cpu().numpy().flatten()) / A
        next_nonterminal = 1.0 - dones.astype(np.float32)
        gae = np.zeros((self.n_envs, A), dtype=np.float32)
        for t in reversed(range(self.buffer_size)):
            if t < self.buffer_size - 1:
                next_nonterminal = 1.0 - self.episode_starts[t + 1]
                next_values = values[t + 1]
            delta = rewards[t] + (self.gamma * next_values * next_nonterminal - values[t])[:, None]
            gae = delta + (self.gamma * self.gae_lambda * next_nonterminal)[:, None] * gae
            self.element_advantages[t] = gae

    def set_element_log_probs(self, evaluate: Any, batch_size: int) -> None:
        """Evaluate the stored actions' per-element log-probabilities once, in minibatches of
        about ``batch_size`` steps, before the update changes the policy (PPO's per-element
        ratios need them and the rollout stores only their sum).

        :param evaluate: ``samples -> (n_seq * T, A)`` tensor, e.g. the policy's
            ``evaluate_actions(..., per_element=True)`` log-probabilities, under ``no_grad``.
        """
        self._ready()
        out = np.zeros((self.n_envs * self.buffer_size, self.reward_elements), dtype=np.float32)
        self.element_log_probs = None  # the samples below must not ask for them yet
        for segments in self._chunks(np.arange(len(self.segment_starts)), batch_size):
            indices, valid = self._padded_indices(self._columns(segments))
            log_probs = evaluate(self._get_samples(segments)).detach().cpu().numpy()
            out[indices[valid]] = log_probs.reshape(*indices.shape, -1)[valid]
        self.element_log_probs = out

    def _ready(self) -> None:
        if not self.generator_ready:
            self._prepare_observations()
            self._prepare()
            self.generator_ready = True

    def _prepare(self) -> None:
        """Flatten env-major (``(n_steps, n_envs, ...) -> (n_envs * n_steps, ...)``) and find the
        segments: flat index ``e * n_steps + t`` starts one where ``t == 0`` or an episode starts."""
        for name in _FLAT_FIELDS:
            setattr(self, name, self.swap_and_flatten(getattr(self, name)))
        if self.reward_elements:
            self.element_advantages = self.swap_and_flatten(self.element_advantages)
        starts = self.episode_starts.reshape(self.n_envs, self.buffer_size) > 0.5
        starts[:, 0] = True
        self.segment_starts = np.flatnonzero(starts)
        ends = np.append(self.segment_starts[1:], self.n_envs * self.buffer_size)
        self.segment_lengths = ends - self.segment_starts
        self.starts_episode = self.episode_starts.reshape(-1)[self.segment_starts] > 0.5

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        """Minibatches of whole episode segments, shuffled, each of at least ``batch_size`` steps
        (the last one may be smaller); ``None`` yields one minibatch with everything."""
        assert self.full, "Rollout buffer must be full before sampling from it"
        self._ready()
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        # the global numpy RNG on purpose: SB3's ``seed=`` seeds it (sb3-contrib's buffer uses it too)
        order = np.random.permutation(len(self.segment_starts))  # noqa: NPY002
        for segments in self._chunks(order, batch_size):
            yield self._get_samples(segments)

    def _chunks(self, order: np.ndarray, batch_size: int) -> Generator[np.ndarray, None, None]:
        """The segments in ``order``, grouped into runs of at least ``batch_size`` steps."""
        return chunk_segments(order, self.segment_lengths, batch_size)

    def _prepare_observations(self) -> None:
        raise NotImplementedError

    def _columns(self, segments: np.ndarray) -> list[list[int]]:
        """The minibatch's training sequences (``memagents.sb3.segments.pack_columns``)."""
        return pack_columns(segments, self.segment_lengths, self.starts_episode, self.pack_segments)

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
        if self.reward_elements:  # (n_seq * T, A)
            advantages = self._pad(self.element_advantages, indices, valid)
        else:
            advantages = self._pad(self.advantages, indices, valid).flatten()
        if self.element_log_probs is not None:
            old_log_prob = self._pad(self.element_log_probs, indices, valid)
        else:
            old_log_prob = self._pad(self.log_probs, indices, valid).flatten()
        return dict(
            actions=self._pad(self.actions, indices, valid),
            old_values=self._pad(self.values, indices, valid).flatten(),
            old_log_prob=old_log_prob,
            advantages=advantages,
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
    :param credit: ``step`` (one advantage per step, PPO as published) or ``element`` (one per
        action element, see :meth:`_train_elements`; needs a batched env).
    :param collector: ``device`` keeps the rollout as tensors on the training device, from the
        batched env (``envs.BatchedEnv.step_tensor``) through the buffer
        (:class:`memagents.sb3.device.DeviceRolloutBuffer`) into the update; ``sb3`` is
        sb3-contrib's loop (numpy between env, policy and buffer); ``auto`` (default) picks
        ``device`` for a batched env and otherwise sb3-contrib's loop, run on the cores' own
        states (:meth:`_collect_native`) when a core ``carries_state``. All give the same
        rollouts and updates for the same seed.
    """

    #: the device collector's states after its last step, in the cores' own form (``None``:
    #: the packed ``_last_lstm_states`` are current); see :attr:`_last_lstm_states`.
    _native_states: RNNStates | None = None

    @property
    def _last_lstm_states(self) -> RNNStates | None:
        """RecurrentPPO's packed states after the last rollout step. The device collector keeps
        them in the cores' own form between rollouts (a sparse core's memory, index and LRU
        bookkeeping carry on, see ``MemoryCore.forward_inplace``) and they are packed only when
        read here."""
        if self._native_states is not None:
            self._packed_states = self.policy.pack_states(self._native_states)
            self._native_states = None
        return self._packed_states

    @_last_lstm_states.setter
    def _last_lstm_states(self, value: RNNStates | None) -> None:
        self._packed_states = value
        self._native_states = None

    def _excluded_save_params(self) -> list[str]:
        # where _last_lstm_states (excluded by RecurrentPPO) lives
        return [*super()._excluded_save_params(), "_packed_states", "_native_states"]

    def __init__(
        self,
        *args: Any,
        pack_segments: bool | None = None,
        credit: str = "step",
        collector: str = "auto",
        **kwargs: Any,
    ) -> None:
        if pack_segments not in (None, True, False):
            raise ValueError(f"pack_segments={pack_segments!r}: expected None, True or False")
        if credit not in CREDITS:
            raise ValueError(f"credit={credit!r} is invalid: expected one of {', '.join(CREDITS)}")
        if collector not in COLLECTORS:
            raise ValueError(
                f"collector={collector!r} is invalid: expected one of {', '.join(COLLECTORS)}"
            )
        self.pack_segments = pack_segments
        self.credit = credit
        self.collector = collector
        super().__init__(*args, **kwargs)
        if credit == "element":
            if not isinstance(self.action_space, (spaces.Discrete, spaces.MultiBinary)):
                raise ValueError(
                    f"credit='element' needs a Discrete or MultiBinary action space, not "
                    f"{self.action_space}"
                )
            if self.env is not None:
                _batched_env(self.env, "credit='element'")

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
        common = {
            "gamma": self.gamma,
            "gae_lambda": self.gae_lambda,
            "n_envs": self.n_envs,
            "pack_segments": self._packs_segments(),
            "reward_elements": self._n_elements() if self.credit == "element" else 0,
        }
        spaces_ = (self.observation_space, self.action_space)
        if self._on_device():
            self.rollout_buffer = DeviceRolloutBuffer(self.n_steps, *spaces_, self.device, **common)
        else:
            buffer_cls = (
                SequenceStartDictRolloutBuffer
                if isinstance(self.observation_space, spaces.Dict)
                else SequenceStartRolloutBuffer
            )
            states = (self.n_steps, *state_shape)
            self.rollout_buffer = buffer_cls(self.n_steps, *spaces_, states, self.device, **common)
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError(
                    f"clip_range_vf={self.clip_range_vf!r} is invalid: expected > 0, "
                    "or None to disable value clipping"
                )
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def _on_device(self) -> bool:
        """Whether rollouts use the device collector (``collector``, resolved against the env)."""
        env = batched_env(self.env) if self.env is not None else None
        if self.collector == "device" and env is None:
            raise ValueError(
                "collector='device' needs the batched env of an algorithmic task (env.vec_env: "
                f"batched); got {type(self.env).__name__}. Use collector='sb3' or 'auto'"
            )
        return self.collector != "sb3" and env is not None

    def _n_elements(self) -> int:
        if isinstance(self.action_space, spaces.MultiBinary):
            return int(np.prod(self.action_space.shape))
        return 1

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """RecurrentPPO's rollout; with ``credit='element'`` each step's per-element rewards
        (``envs.BatchedEnv.reward_elements``) also go to the buffer, read after the env step
        and before the buffer stores it (where SB3 calls ``callback.on_step``)."""
        if isinstance(rollout_buffer, DeviceRolloutBuffer):
            return self._collect_on_device(env, callback, rollout_buffer, n_rollout_steps)
        if (
            self.collector == "auto"
            and self.credit == "step"
            and isinstance(rollout_buffer, _SequenceStartMixin)
            and self._carries_state()
        ):
            return self._collect_native(env, callback, rollout_buffer, n_rollout_steps)
        if self.credit == "element":
            callback = _StoreRewardElements(
                callback, _batched_env(env, "credit='element'"), rollout_buffer
            )
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _rollout_start_states(self) -> RNNStates:
        """The cores' own states a rollout starts from: those the last rollout left (carried on
        from one rollout to the next, packed only if someone reads ``_last_lstm_states``), else
        the packed ``_last_lstm_states`` unpacked."""
        if self._native_states is not None:
            return self._native_states
        return self.policy.unpack_states(self._last_lstm_states)

    def _carries_state(self) -> bool:
        """Whether a core of the policy keeps work between rollout steps (``carries_state``:
        SAM, SDNC), so that its state is best handed from step to step unpacked."""
        policy = self.policy
        cores = [policy.memory_actor, policy.memory_critic]
        return any(c is not None and c.core.carries_state for c in cores)

    def _collect_native(
        self,
        env: VecEnv,
        callback: BaseCallback,
        buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """sb3-contrib's ``collect_rollouts`` (numpy env, the same steps, values, bootstrap of
        truncated episodes and callbacks) with the cores' own states instead of packed ones:
        ``MemoryPolicy.rollout_step`` hands the state from step to step, so a sparse core keeps
        its memory, index and LRU bookkeeping (``MemoryCore.forward_inplace``) where the packed
        loop would copy and rebuild them every step. The buffer gets the rollout's first state,
        packed once; the bootstrap value is a ``peek``. ``collector: auto`` takes it for numpy
        envs when a core ``carries_state``; ``sb3`` keeps sb3-contrib's loop. The two give the
        same rollouts and updates (tested). A stopping callback keeps the stepped observation
        with the stepped state, as the device collector does."""
        policy, device = self.policy, self.device
        policy.set_training_mode(False)
        n_steps = 0
        buffer.reset()
        if self.use_sde:
            policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        native = self._rollout_start_states()
        start = policy.pack_states(native)  # what the buffer stores: the rollout's first state
        new_obs, dones = self._last_obs, self._last_episode_starts
        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                policy.reset_noise(env.num_envs)
            with torch.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, device)
                episode_starts = torch.as_tensor(
                    self._last_episode_starts, dtype=torch.float32, device=device
                )
                actions, values, log_probs, native = policy.rollout_step(
                    obs_tensor, native, episode_starts
                )
            self._native_states = native
            actions = actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)
            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                self._last_obs, self._last_episode_starts = new_obs, dones
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            for idx, done in enumerate(dones):  # truncated episodes: bootstrap (SB3 issue 633)
                info = infos[idx]
                if (
                    done
                    and info.get("terminal_observation") is not None
                    and info.get("TimeLimit.truncated", False)
                ):
                    terminal_obs = policy.obs_to_tensor(info["terminal_observation"])[0]
                    one = RNNStates(*(_element(s, idx) for s in native))
                    with torch.no_grad():
                        no_start = torch.zeros(1, dtype=torch.float32, device=device)
                        terminal_value = policy.predict_values_native(terminal_obs, one, no_start)
                    rewards[idx] += self.gamma * terminal_value[0]
            buffer.add(
                self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs,
                lstm_states=start,
            )  # fmt: skip
            self._last_obs, self._last_episode_starts = new_obs, dones
        with torch.no_grad():  # the states go on to the next rollout unchanged
            episode_starts = torch.as_tensor(dones, dtype=torch.float32, device=device)
            values = policy.predict_values_native(
                obs_as_tensor(new_obs, device), native, episode_starts
            )
        buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True

    def _collect_on_device(
        self,
        env: VecEnv,
        callback: BaseCallback,
        buffer: DeviceRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """RecurrentPPO's rollout loop with tensors only: the policy's actions go to
        ``BatchedEnv.step_tensor`` and its outputs into the buffer, all on the device. Callbacks
        see ``dones`` and ``successes`` as ``[B]`` bool tensors in their locals (no ``infos``);
        the finished episodes reach SB3's episode logs once, at the rollout's end. Batched
        episodes end only by termination, so no timeout bootstrap is needed."""
        batched = _batched_env(env, "the device collector")
        policy, device = self.policy, self.device
        policy.set_training_mode(False)
        buffer.reset()
        callback.on_rollout_start()
        obs = torch.as_tensor(self._last_obs, dtype=torch.float32, device=device)
        starts = torch.as_tensor(self._last_episode_starts, dtype=torch.float32, device=device)
        native = self._rollout_start_states()
        buffer.set_start_states(policy.snapshot_states(native))
        for _ in range(n_rollout_steps):
            # (a core that carries its state, SAM or SDNC, wrote the old one in place)
            actions, values, log_probs, native = policy.rollout_step(obs, native, starts)
            self._native_states = native
            out = batched.step_tensor(actions, check=False)
            self.num_timesteps += batched.num_envs
            dones = out.done
            callback.update_locals({"dones": dones, "successes": out.success, "actions": actions})
            if not callback.on_step():
                # stopped: the env has stepped, so keep its new observation with the new state
                self._last_obs = out.obs.to(device)
                self._last_episode_starts = dones.to(device=device, dtype=torch.float32)
                return False
            buffer.add(
                obs, actions, out.reward, starts, values, log_probs,
                reward_elements=out.reward_elements if buffer.reward_elements else None,
                dones=dones, successes=out.success,
                episode_returns=out.episode_return, episode_lengths=out.episode_length,
            )  # fmt: skip
            obs, starts = out.obs.to(device), dones.to(device=device, dtype=torch.float32)
            self._last_obs, self._last_episode_starts = obs, starts
        with torch.no_grad():  # the states go on to the next rollout unchanged
            values = policy.predict_values_native(obs, native, starts)
        buffer.compute_returns_and_advantage(values, starts)
        self._log_episodes(buffer, batched)
        callback.on_rollout_end()
        return True

    def _log_episodes(self, buffer: DeviceRolloutBuffer, batched: BatchedEnv) -> None:
        """The rollout's finished episodes into SB3's episode buffers (``rollout/ep_rew_mean``,
        ``rollout/ep_len_mean``, ``rollout/success_rate``), as a ``Monitor`` would report them."""
        returns, lengths, successes = buffer.finished_episodes()
        elapsed = round(time.perf_counter() - batched._t_start, 6)
        for r, n, ok in zip(returns.tolist(), lengths.tolist(), successes.tolist(), strict=True):
            self.ep_info_buffer.append({"r": r, "l": n, "t": elapsed})
            self.ep_success_buffer.append(ok)

    def train(self) -> None:
        """One PPO update on the rollout buffer: RecurrentPPO's for ``credit='step'``, else
        :meth:`_train_elements`."""
        if self.credit == "step":
            super().train()
        else:
            self._train_elements()

    def _train_elements(self) -> None:
        """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) taken per action element and
        summed: ``L = Σ_i min(ρ_i Â_i, clip(ρ_i, 1 ± ε) Â_i)`` with ``ρ_i`` the element's
        probability ratio and ``Â_i`` its advantage (see
        ``_SequenceStartMixin.compute_returns_and_advantage``). At ``ρ = 1`` its gradient is
        ``Σ_i Â_i ∇ log π_i``, where the joint surrogate's is ``Â ∇ Σ_i log π_i``: each element
        is credited with its own reward instead of the sum of all of them. Advantages are
        normalised over every element of the minibatch; value and entropy terms, gradient
        clipping, early stopping on ``target_kl`` (on the joint KL, the sum over elements) and
        the logged quantities are RecurrentPPO's."""
        policy, buffer = self.policy, self.rollout_buffer
        policy.set_training_mode(True)
        self._update_learning_rate(policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)

        def evaluate(data: Any) -> tuple[torch.Tensor, ...]:
            actions = data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            return policy.evaluate_actions(
                data.observations, actions, data.lstm_states, data.episode_starts, per_element=True
            )

        with torch.no_grad():
            buffer.set_element_log_probs(lambda data: evaluate(data)[1], self.batch_size)

        logs: dict[str, list[float]] = collections.defaultdict(list)
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for data in buffer.get(self.batch_size):
                mask = data.mask > 1e-8
                values, log_prob, entropy = evaluate(data)
                values = values.flatten()
                advantages = data.advantages  # (n, A)
                if self.normalize_advantage:
                    valid = advantages[mask]
                    advantages = (advantages - valid.mean()) / (valid.std() + 1e-8)
                log_ratio = log_prob - data.old_log_prob  # (n, A)
                ratio = torch.exp(log_ratio)
                surrogate = torch.min(
                    advantages * ratio,
                    advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range),
                ).sum(-1)
                policy_loss = -surrogate[mask].mean()
                values_pred = values
                if clip_range_vf is not None:
                    values_pred = data.old_values + torch.clamp(
                        values - data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = ((data.returns - values_pred) ** 2)[mask].mean()
                entropy_loss = -entropy[mask].mean()  # Bernoulli and Categorical have one
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                with torch.no_grad():
                    joint = log_ratio.sum(-1)
                    approx_kl = ((torch.exp(joint) - 1) - joint)[mask].mean().item()
                    clipped = (torch.abs(ratio - 1) > clip_range).float()[mask].mean().item()
                approx_kl_divs.append(approx_kl)
                logs["policy_gradient_loss"].append(policy_loss.item())
                logs["value_loss"].append(value_loss.item())
                logs["entropy_loss"].append(entropy_loss.item())
                logs["clip_fraction"].append(clipped)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(
                            f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}"
                        )
                    break
                policy.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), self.max_grad_norm)
                policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break

        for name, values_ in logs.items():
            self.logger.record(f"train/{name}", float(np.mean(values_)))
        self.logger.record("train/approx_kl", float(np.mean(approx_kl_divs)))
        self.logger.record("train/loss", loss.item())
        self.logger.record(
            "train/explained_variance",
            explained_variance(buffer.values.flatten(), buffer.returns.flatten()),
        )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)


def _batched_env(env: VecEnv, what: str) -> BatchedEnv:
    """The ``envs.BatchedEnv`` under ``env``; a clear error naming ``what`` needs it for any
    other env."""
    batched = batched_env(env)
    if batched is None:
        raise ValueError(
            f"{what} needs the batched env of an algorithmic task (env.vec_env: batched), which "
            f"steps as tensors and reports a reward per action element; got {type(env).__name__}"
        )
    return batched


def _element(state: Any, index: int) -> Any:
    """Element ``index`` of a core's own state (``[1, ...]`` views; ``None`` stays ``None``)."""
    return None if state is None else state_lib.map_state(lambda t: t[index : index + 1], state)


class _StoreRewardElements(BaseCallback):
    """Wraps the training callback: at every step (after the env step, before the rollout
    buffer stores it) hands the env's per-element rewards to the buffer, then defers to the
    wrapped callback for everything."""

    def __init__(self, callback: BaseCallback, env: BatchedEnv, buffer: Any) -> None:
        super().__init__()
        self.callback, self.env, self.buffer = callback, env, buffer

    def on_rollout_start(self) -> None:
        self.callback.on_rollout_start()

    def on_rollout_end(self) -> None:
        self.callback.on_rollout_end()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        self.callback.update_locals(locals_)

    def on_step(self) -> bool:
        self.buffer.add_reward_elements(self.env.reward_elements.cpu().numpy())
        return self.callback.on_step()

    def _on_step(self) -> bool:  # BaseCallback's abstract hook; on_step above replaces it
        return True


def recurrent_state_nbytes(buffer: RecurrentRolloutBuffer | RecurrentDictRolloutBuffer) -> int:
    """Bytes a recurrent rollout buffer (sb3-contrib's or ours) holds for recurrent states."""
    return sum(getattr(buffer, name).nbytes for name in _STATE_FIELDS)
