"""Rollouts that stay on the device: the batched env, the policy and the rollout buffer as
tensors, end to end (``ppo.collector: device``).

With SB3's collector every step of a batched env crosses to numpy and back: the env's tensors go
to host arrays, then ``obs_as_tensor`` brings them back for the policy, whose actions go to numpy
for the env, and the infos hold one Python dict per env. :class:`DeviceRolloutBuffer` keeps
observations, actions, rewards, episode starts, values, log-probabilities, per-element rewards
and the recurrent state at the rollout's start as tensors on the training device;
``MemoryPPO.collect_rollouts`` (``memagents.sb3.ppo``) steps ``envs.BatchedEnv.step_tensor``
with the policy's action tensor and writes the step's tensors into it. Advantages (GAE, per
step and per action element) are tensor recursions over the rollout's steps; minibatches are
gathered with tensor indexing.

What is planned on the host, once per minibatch, is which segments go where (a few thousand
integers per rollout): the shuffled order (numpy's global RNG, as SB3 does), the grouping into
minibatches and the packing of segments into training sequences are those of the numpy buffer
(``memagents.sb3.segments``), so that both collectors train on the same minibatches. Host syncs
per rollout: the segments' lengths once, and the finished episodes' statistics once (for the
``rollout/ep_rew_mean``, ``rollout/ep_len_mean`` and ``rollout/success_rate`` logs).

:func:`evaluate_batched` steps all evaluation episodes of a batched env as one batch on the
device.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.type_aliases import RecurrentRolloutBufferSamples, RNNStates
from stable_baselines3.common.preprocessing import get_action_dim
from torch import Tensor

from envs.vector import BatchedEnv
from memagents.cores import state as state_lib
from memagents.cores.sparse_access import is_zero_broadcast
from memagents.sb3.policy import ColumnStates
from memagents.sb3.segments import chunk_segments, column_layout, pack_columns


class DeviceRolloutBuffer:
    """A rollout of a batched env kept as tensors on ``device``; minibatches of whole episode
    segments, as :class:`memagents.sb3.ppo.SequenceStartRolloutBuffer` makes them (same order,
    same grouping, same packing), gathered with tensor indexing.

    Storage is ``[n_steps, n_envs, ...]``; :meth:`get` flattens it env-major
    (``[n_envs * n_steps, ...]``, flat index ``e * n_steps + t``) as SB3's buffers do.

    :param buffer_size: ``n_steps``, steps per env per rollout.
    :param observation_space: a ``Box`` (the batched envs' observations).
    :param action_space: ``Discrete`` or ``MultiBinary`` (the batched envs' actions).
    :param device: where everything lives.
    :param gamma: discount factor γ.
    :param gae_lambda: GAE's λ.
    :param n_envs: ``B``, envs stepped together.
    :param pack_segments: pack several episode segments into one training sequence (see
        ``memagents.sb3.ppo``).
    :param reward_elements: ``A`` > 0 keeps a reward per action element (``ppo.credit:
        element``); 0: scalar rewards only.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        n_envs: int = 1,
        pack_segments: bool = False,
        reward_elements: int = 0,
    ) -> None:
        if not isinstance(observation_space, spaces.Box):
            raise ValueError(
                f"observation_space={observation_space}: the device collector needs a Box"
            )
        self.buffer_size = int(buffer_size)
        self.n_envs = int(n_envs)
        self.obs_shape = tuple(observation_space.shape)
        self.action_dim = get_action_dim(action_space)
        self.device = torch.device(device)
        self.gamma = float(gamma)
        self.gae_lambda = float(gae_lambda)
        self.pack_segments = bool(pack_segments)
        self.reward_elements = int(reward_elements)
        shape = (self.buffer_size, self.n_envs)
        zeros = lambda *s, dtype=torch.float32: torch.zeros(  # noqa: E731
            *s, dtype=dtype, device=self.device
        )
        self.observations = zeros(*shape, *self.obs_shape)
        self.actions = zeros(*shape, self.action_dim)
        self.rewards = zeros(*shape)
        self.episode_starts = zeros(*shape)
        self.value_tensor = zeros(*shape)  # V(s_t) (``values``: a host copy)
        self.log_probs = zeros(*shape)
        self.advantages = zeros(*shape)
        self.return_tensor = zeros(*shape)  # Â_t + V(s_t) (``returns``: a host copy)
        # the episodes that ended at each step, for the logs (one host copy per rollout)
        self.dones = zeros(*shape, dtype=torch.bool)
        self.successes = zeros(*shape, dtype=torch.bool)
        self.episode_returns = zeros(*shape)
        self.episode_lengths = zeros(*shape, dtype=torch.long)
        if self.reward_elements:
            self.element_rewards = zeros(*shape, self.reward_elements)
            self.element_advantages = zeros(*shape, self.reward_elements)
        self.start_states: RNNStates | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new rollout (the tensors are overwritten step by step, not cleared)."""
        self.pos = 0
        self.full = False
        self.generator_ready = False
        self.segment_starts: np.ndarray | None = None
        self.segment_lengths: np.ndarray | None = None
        #: ``(n_envs * n_steps, A)``: the per-element log-probabilities of the stored actions
        #: under the policy that collected them (``set_element_log_probs``)
        self.element_log_probs: Tensor | None = None

    # -- filling --------------------------------------------------------------------------------
    def set_start_states(self, states: RNNStates) -> None:
        """The cores' own states before the rollout's first step (``RNNStates(pi, vf or None)``,
        as ``MemoryPolicy.rollout_step`` carries them), taken as they are: snapshots
        (``MemoryPolicy.snapshot_states``) that the rollout's in-place steps leave alone."""
        self.start_states = states

    def add(
        self,
        obs: Tensor,
        actions: Tensor,
        rewards: Tensor,
        episode_starts: Tensor,
        values: Tensor,
        log_probs: Tensor,
        reward_elements: Tensor | None = None,
        dones: Tensor | None = None,
        successes: Tensor | None = None,
        episode_returns: Tensor | None = None,
        episode_lengths: Tensor | None = None,
    ) -> None:
        """Store one step of every env (tensors on the buffer's device).

        :param obs: ``[B, *obs_shape]`` the observation the actions were taken on.
        :param actions: ``[B]`` or ``[B, action_dim]``.
        :param rewards: ``[B]``.
        :param episode_starts: ``[B]``, 1 where ``obs`` starts an episode.
        :param values: ``[B]`` or ``[B, 1]``, the critic's values of ``obs``.
        :param log_probs: ``[B]``, of the actions.
        :param reward_elements: ``[B, A]`` with ``reward_elements`` > 0.
        :param dones: ``[B]`` bool, the episode ended with this step; with ``successes``,
            ``episode_returns`` and ``episode_lengths`` (``envs.BatchedStep``'s fields) for the
            episode statistics.
        """
        if self.pos >= self.buffer_size:
            raise RuntimeError(f"the rollout buffer is full ({self.buffer_size} steps)")
        i = self.pos
        self.observations[i] = obs.reshape(self.n_envs, *self.obs_shape)
        self.actions[i] = actions.reshape(self.n_envs, self.action_dim)
        self.rewards[i] = rewards
        self.episode_starts[i] = episode_starts
        self.value_tensor[i] = values.reshape(self.n_envs)
        self.log_probs[i] = log_probs.reshape(self.n_envs)
        if self.reward_elements:
            if reward_elements is None:
                raise ValueError("reward_elements is required: the buffer keeps them")
            self.element_rewards[i] = reward_elements
        if dones is not None:
            self.dones[i] = dones
            self.successes[i] = successes
            self.episode_returns[i] = episode_returns
            self.episode_lengths[i] = episode_lengths
        else:
            self.dones[i] = False
        self.pos += 1
        self.full = self.pos == self.buffer_size

    # -- advantages -----------------------------------------------------------------------------
    def compute_returns_and_advantage(self, last_values: Tensor, dones: Tensor) -> None:
        """GAE(λ) (Schulman et al. 2016, eq. 16) as SB3's ``RolloutBuffer`` computes it, with
        tensors: ``δ_t = r_t + γ V(s_{t+1}) (1 - d_{t+1}) - V(s_t)``, ``Â_t = δ_t + γλ (1 -
        d_{t+1}) Â_{t+1}``, returns ``Â_t + V(s_t)``. With ``reward_elements``, also one
        advantage per action element with the baseline ``V / A`` (see
        ``memagents.sb3.ppo._SequenceStartMixin.compute_returns_and_advantage``).

        :param last_values: ``[B]`` or ``[B, 1]``, the values after the last step.
        :param dones: ``[B]``, 1 where the last step ended an episode.
        """
        values = self.value_tensor
        last_values = last_values.reshape(self.n_envs).to(values.dtype)
        last_nonterminal = 1.0 - dones.reshape(self.n_envs).to(values.dtype)
        gamma, lam = self.gamma, self.gae_lambda
        gae = torch.zeros_like(last_values)
        for t in reversed(range(self.buffer_size)):
            if t == self.buffer_size - 1:
                next_nonterminal, next_values = last_nonterminal, last_values
            else:
                next_nonterminal, next_values = 1.0 - self.episode_starts[t + 1], values[t + 1]
            delta = self.rewards[t] + gamma * next_values * next_nonterminal - values[t]
            gae = delta + gamma * lam * next_nonterminal * gae
            self.advantages[t] = gae
        self.return_tensor = self.advantages + values
        if not self.reward_elements:
            return
        A = self.reward_elements
        rest = self.rewards - self.element_rewards.sum(-1)  # [n_steps, B]
        rewards = self.element_rewards + rest[..., None] / A
        values = values / A
        next_values = last_values / A
        next_nonterminal = last_nonterminal
        gae = torch.zeros((self.n_envs, A), dtype=values.dtype, device=self.device)
        for t in reversed(range(self.buffer_size)):
            if t < self.buffer_size - 1:
                next_nonterminal = 1.0 - self.episode_starts[t + 1]
                next_values = values[t + 1]
            delta = rewards[t] + (gamma * next_values * next_nonterminal - values[t])[:, None]
            gae = delta + (gamma * lam * next_nonterminal)[:, None] * gae
            self.element_advantages[t] = gae

    # -- minibatches ----------------------------------------------------------------------------
    def _ready(self) -> None:
        """Once per rollout, before its minibatches: flatten env-major, build the gather table,
        find the segments (flat index ``e * n_steps + t`` starts one where ``t == 0`` or an
        episode starts) and copy their lengths to the host for the plan."""
        if self.generator_ready:
            return
        n = self.n_envs * self.buffer_size
        shape = (self.buffer_size, self.n_envs)
        # every per-step float of a minibatch in one table, gathered with one index_select:
        # the fields side by side as [n_steps, n_envs, F], then flattened env-major at once
        # (flat index e * n_steps + t); row n is zeros, where the padding points
        columns = {
            "observations": self.observations.reshape(*shape, -1),
            "actions": self.actions,
            "old_values": self.value_tensor[..., None],
            "old_log_prob": self.log_probs[..., None],
            "advantages": (
                self.element_advantages if self.reward_elements else self.advantages[..., None]
            ),
            "returns": self.return_tensor[..., None],
            "episode_starts": self.episode_starts[..., None],
        }
        table = torch.cat(list(columns.values()), dim=-1).transpose(0, 1).reshape(n, -1)
        self.table = torch.cat([table, table.new_zeros((1, table.shape[1]))])
        widths = [c.shape[-1] for c in columns.values()]
        ends = np.cumsum(widths)
        self.table_slices = {
            name: slice(int(end - w), int(end))
            for name, w, end in zip(columns, widths, ends, strict=True)
        }
        starts = self.episode_starts.transpose(0, 1) > 0.5  # [n_envs, n_steps]
        starts[:, 0] = True
        segment_starts = torch.nonzero(starts.reshape(-1)).squeeze(1)
        ends = torch.cat([segment_starts[1:], segment_starts.new_tensor([n])])
        self._segment_starts = segment_starts
        self._segment_lengths = ends - segment_starts
        # the plan's inputs, on the host (one copy per rollout)
        self.segment_starts = segment_starts.cpu().numpy()
        self.segment_lengths = self._segment_lengths.cpu().numpy()
        first_steps = self.table[segment_starts, self.table_slices["episode_starts"].start] > 0.5
        self._starts_episode = first_steps.cpu().numpy()
        self.generator_ready = True

    def flat(self, name: str) -> Tensor:
        """A stored field flattened env-major, ``[n_envs * n_steps, ...]`` (a copy; for
        inspection and tests, the update reads the table)."""
        x = getattr(self, name)
        return x.transpose(0, 1).reshape(self.n_envs * self.buffer_size, *x.shape[2:])

    def get(self, batch_size: int | None = None) -> Generator[RecurrentRolloutBufferSamples]:
        """Minibatches of whole episode segments, shuffled (numpy's global RNG, as the numpy
        buffer), each of at least ``batch_size`` steps (the last may be smaller); ``None``
        yields one minibatch with everything."""
        assert self.full, "Rollout buffer must be full before sampling from it"
        self._ready()
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        order = np.random.permutation(len(self.segment_starts))  # noqa: NPY002
        for segments in chunk_segments(order, self.segment_lengths, batch_size):
            yield self._get_samples(segments)

    def _layout(self, segments: np.ndarray) -> tuple[Tensor, Tensor, Tensor, int]:
        """Flat step indices ``[n_col * T]`` of the minibatch's padded training sequences
        (padding points at ``n_envs * n_steps``, the zero row of the table), their validity
        mask ``[n_col * T]``, the segment heading each column ``[n_col]``, and ``T``."""
        if self.pack_segments:
            columns = pack_columns(segments, self.segment_lengths, self._starts_episode, True)
            segment, column, offset, T = column_layout(columns, self.segment_lengths)
            heads = torch.as_tensor([col[0] for col in columns], device=self.device)
            n_col = len(columns)
        else:  # one segment per column, in the given order
            segment = np.asarray(segments, dtype=np.int64)
            n_col = len(segment)
            column, offset = np.arange(n_col), np.zeros(n_col, dtype=np.int64)
            T = int(self.segment_lengths[segment].max())
            heads = torch.as_tensor(segment, device=self.device)
        segment_np = segment
        segment = torch.as_tensor(segment, device=self.device)
        column = torch.as_tensor(column, device=self.device)
        offset = torch.as_tensor(offset, device=self.device)
        lengths = self._segment_lengths[segment]
        total = int(self.segment_lengths[segment_np].sum())
        seg_of_step = torch.repeat_interleave(
            torch.arange(len(segment), device=self.device), lengths, output_size=total
        )
        first = torch.cumsum(lengths, 0) - lengths  # each segment's first position in the steps
        j = torch.arange(total, device=self.device) - first[seg_of_step]  # step within segment
        target = column[seg_of_step] * T + offset[seg_of_step] + j
        source = self._segment_starts[segment][seg_of_step] + j
        n = n_col * T
        pad = self.n_envs * self.buffer_size
        indices = torch.full((n,), pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(n, dtype=torch.bool, device=self.device)
        indices[target] = source
        valid[target] = True
        return indices, valid, heads, T

    def _pad(self, x: Tensor, indices: Tensor) -> Tensor:
        """``x [n_envs * n_steps, *s]`` -> zero-padded ``[n_col * T, *s]`` (padding indices
        point one past the end)."""
        padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return padded.index_select(0, indices)

    def _start_states(self, heads: Tensor) -> RNNStates:
        """The states before each column's first segment, as
        :class:`~memagents.sb3.policy.ColumnStates`: the stored state (the cores' own) of the
        ``m`` columns whose first segment begins the rollout; the others begin an
        episode, where the core starts from its initial state, so none is made for them."""
        flat = self._segment_starts[heads]
        env = torch.div(flat, self.buffer_size, rounding_mode="floor")
        columns = ((flat % self.buffer_size) == 0).nonzero().flatten()
        env = env.index_select(0, columns)

        def take(t: Tensor) -> Tensor:  # the picked elements of a state tensor [n_envs, ...]
            if is_zero_broadcast(t):  # (a memory never written: stays a broadcast)
                return t.as_strided((1,) * t.dim(), (0,) * t.dim()).expand(len(env), *t.shape[1:])
            return t.index_select(0, env)

        def pick(stored: Any) -> ColumnStates | None:
            if stored is None:
                return None
            return ColumnStates(state_lib.map_state(take, stored), columns, len(heads))

        assert self.start_states is not None, "set_start_states() before the first step"
        pi, vf = self.start_states
        picked_pi = pick(pi)
        return RNNStates(picked_pi, picked_pi if vf is pi else pick(vf))

    def _get_samples(self, segments: np.ndarray) -> RecurrentRolloutBufferSamples:
        indices, valid, heads, _ = self._layout(segments)
        rows = self.table.index_select(0, indices)  # [n_col * T, F], zeros where padding
        part = {name: rows[:, cols].contiguous() for name, cols in self.table_slices.items()}
        if self.element_log_probs is not None:
            old_log_prob = self._pad(self.element_log_probs, indices)
        else:
            old_log_prob = part["old_log_prob"].squeeze(1)
        advantages = part["advantages"]
        return RecurrentRolloutBufferSamples(
            observations=part["observations"].reshape(-1, *self.obs_shape).contiguous(),
            actions=part["actions"].contiguous(),
            old_values=part["old_values"].squeeze(1),
            old_log_prob=old_log_prob,
            advantages=advantages if self.reward_elements else advantages.squeeze(1),
            returns=part["returns"].squeeze(1),
            lstm_states=self._start_states(heads),
            episode_starts=part["episode_starts"].squeeze(1),
            mask=valid.to(torch.float32),
        )

    def set_element_log_probs(
        self, evaluate: Callable[[RecurrentRolloutBufferSamples], Tensor], batch_size: int
    ) -> None:
        """The stored actions' per-element log-probabilities under the current policy, once,
        in minibatches of about ``batch_size`` steps, before the update changes it.

        :param evaluate: ``samples -> (n_col * T, A)`` log-probabilities (under ``no_grad``).
        """
        self._ready()
        n = self.n_envs * self.buffer_size
        out = torch.zeros((n, self.reward_elements), device=self.device)
        self.element_log_probs = None  # the samples below must not ask for them yet
        everything = np.arange(len(self.segment_starts))
        for segments in chunk_segments(everything, self.segment_lengths, batch_size):
            indices, valid, _, _ = self._layout(segments)
            log_probs = evaluate(self._get_samples(segments)).detach()
            out[indices[valid]] = log_probs.reshape(len(indices), -1)[valid]
        self.element_log_probs = out

    # -- what SB3's update and logs read ------------------------------------------------------
    @property
    def values(self) -> np.ndarray:
        """``[n_steps, n_envs]`` values, copied to the host (SB3's update reads them once for
        ``explained_variance``)."""
        return self.value_tensor.cpu().numpy()

    @property
    def returns(self) -> np.ndarray:
        """``[n_steps, n_envs]`` returns, copied to the host."""
        return self.return_tensor.cpu().numpy()

    def finished_episodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return, length and success of every episode that ended in this rollout, step-major
        (the order SB3's collector logs them in), copied to the host at once."""
        steps = self.pos
        done = self.dones[:steps].reshape(-1)
        picked = torch.nonzero(done).squeeze(1)
        returns = self.episode_returns[:steps].reshape(-1)[picked]
        lengths = self.episode_lengths[:steps].reshape(-1)[picked]
        successes = self.successes[:steps].reshape(-1)[picked]
        return returns.cpu().numpy(), lengths.cpu().numpy(), successes.cpu().numpy()


def batched_env(env: Any) -> BatchedEnv | None:
    """The ``envs.BatchedEnv`` under an SB3 ``VecEnv`` (``TorchVecEnv``), or None."""
    batched = getattr(env, "batched", env)
    return batched if isinstance(batched, BatchedEnv) else None


@torch.no_grad()
def evaluate_batched(
    policy: Any, env: BatchedEnv, episodes: int, deterministic: bool = True
) -> dict[str, np.ndarray]:
    """Play ``episodes`` episodes on every env of a batched env at once, on its device, with the
    recurrent state carried and reset at each episode start.

    The episodes are spread over the ``B`` envs as SB3's ``evaluate_policy`` spreads them (env
    ``i`` plays ``(episodes + i) // B``, counting its first episodes only), so the same seed
    gives the same episodes as ``evaluate_policy`` on the same env; the loop stops when every
    env has played its share (checked every 16 steps, the only host syncs besides the result).

    :param policy: a ``MemoryPolicy`` on the env's device (stepped on its core's own state,
        ``act_native``), or anything with ``get_distribution`` and ``initial_state``.
    :param env: the batched env (restarted: ``reset_tensor``).
    :param episodes: episodes in all (>= 1).
    :param deterministic: the distribution's mode instead of samples.
    :return: ``{"rewards", "lengths", "successes"}``, one entry per episode, env-major.
    """
    if episodes < 1:
        raise ValueError(f"episodes={episodes!r} is invalid: expected >= 1")
    B, device = env.num_envs, env.device
    policy.set_training_mode(False)
    targets = torch.tensor([(episodes + i) // B for i in range(B)], device=device)
    most = int(targets.max())
    counts = torch.zeros(B, dtype=torch.long, device=device)
    rewards = torch.zeros((B, most), device=device)
    lengths = torch.zeros((B, most), dtype=torch.long, device=device)
    successes = torch.zeros((B, most), dtype=torch.bool, device=device)
    obs = env.reset_tensor()
    native = hasattr(policy, "act_native")  # the core's own state, never packed
    states = policy.initial_native(B, device).pi if native else policy.initial_state(B, device).pi
    starts = torch.ones(B, device=device)
    rows = torch.arange(B, device=device)
    step = 0
    while True:
        if native:
            actions, states = policy.act_native(obs, states, starts, deterministic)
        else:
            distribution, states = policy.get_distribution(obs, states, starts)
            actions = distribution.get_actions(deterministic=deterministic)
        out = env.step_tensor(actions)
        record = out.done & (counts < targets)
        slot = counts.clamp(max=most - 1)
        rewards[rows, slot] = torch.where(record, out.episode_return, rewards[rows, slot])
        lengths[rows, slot] = torch.where(record, out.episode_length, lengths[rows, slot])
        successes[rows, slot] = torch.where(record, out.success, successes[rows, slot])
        counts += record
        obs, starts = out.obs, out.done.to(torch.float32)
        step += 1
        if step % 16 == 0 and bool((counts >= targets).all()):
            break
    keep = torch.arange(most, device=device)[None, :] < targets[:, None]
    return {
        "rewards": rewards[keep].cpu().numpy(),
        "lengths": lengths[keep].cpu().numpy(),
        "successes": successes[keep].cpu().numpy(),
    }
