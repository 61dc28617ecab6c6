"""All episodes of a task as tensors on one device: a batched env with SB3's ``VecEnv`` interface.

:class:`BatchedEnv` keeps ``B = num_envs`` laid-out episodes in three tensors on ``device`` and
steps them all with a handful of tensor operations: gather the targets of the current step, score
the actions, advance the clocks, and lay out fresh episodes where one ended (auto-reset inside
``step``, as SB3's ``VecEnv`` does). The rules are not re-implemented here: episodes come from the
task's own ``sample`` and ``layout`` (see ``envs.base``), and rewards from ``envs.base.score``.

Two interfaces:

- tensors in, tensors out, for code that keeps everything on the device:
  :meth:`BatchedEnv.reset_tensor` and :meth:`BatchedEnv.step_tensor`;
- stable-baselines3's ``VecEnv`` (numpy in, numpy out, ``infos`` with ``terminal_observation``),
  duck-typed because ``envs`` does not import SB3; ``memagents.sb3.vecenv.TorchVecEnv`` wraps it
  into a real ``VecEnv`` subclass for SB3's ``isinstance`` checks.

``BatchedEnv`` holds one instance of the single env class (``.env``) for the task's parameters
and rules; its difficulty knobs are shared by all episodes and can be changed between steps with
:meth:`set_difficulty`, ``set_attr`` or ``env_method`` (from the next episode of each env on).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.registration import load_env_creator
from torch import Tensor

from envs.base import AlgorithmicEnv, Episodes, InvalidActionError, check_int, score

__all__ = ["BatchedEnv", "BatchedStep", "make_vec"]


class BatchedStep(NamedTuple):
    """What :meth:`BatchedEnv.step_tensor` returns; all tensors on the env's device."""

    obs: Tensor  # [B, D] float32: next observation; where done, the first of a new episode
    reward: Tensor  # [B] float32: reward of this step
    done: Tensor  # [B] bool: the episode ended with this step (terminated; never truncated)
    final_obs: Tensor  # [B, D] float32: observation after this step, before any auto-reset
    success: Tensor  # [B] bool: where done, whether every answer element was right
    episode_return: Tensor  # [B] float32: where done, the episode's summed reward (else 0)
    episode_length: Tensor  # [B] int64: where done, the episode's number of steps (else 0)
    reward_elements: Tensor  # [B, A] float32: reward of each action element (sums to reward)


class BatchedEnv:
    """``num_envs`` episodes of one task, stepped together as tensor operations on ``device``.

    Implements stable-baselines3's ``VecEnv`` interface (duck-typed; wrap it in
    ``memagents.sb3.vecenv.TorchVecEnv`` for SB3 algorithms) plus a tensor interface.

    :param env: the task, a single env instance (e.g. ``envs.CopyEnv(bits=4)``) whose
        parameters, difficulty knobs, ``sample`` and ``layout`` define the episodes.
    :param num_envs: ``B``, the number of episodes stepped together (>= 1).
    :param device: where all episode tensors live, e.g. ``"cpu"`` or ``"cuda:0"``.
    :param seed: seeds the ``torch.Generator`` on ``device`` that draws every episode; ``None``
        draws a seed from the operating system.
    :param check_actions: check every action batch against the action space (one device sync
        per step); an action outside it raises ``envs.InvalidActionError``.
    :param sync_free: auto-reset without reading anything back from the device: finished
        episodes are replaced by masked selects from a reservoir big enough for
        :data:`SYNC_FREE_STEPS` steps of worst-case restarts, and the host looks at the device
        only when that bound runs out (once per ``SYNC_FREE_STEPS`` steps at most). ``None``:
        on any device but the CPU, where finding the finished rows (a host read) is cheaper than
        selecting over every row.
    """

    #: fewest episodes laid out at once for auto-resets (more when ``num_envs`` is larger)
    MIN_RESERVOIR = 256
    #: with ``sync_free``, the reservoir holds ``SYNC_FREE_STEPS * num_envs`` episodes
    SYNC_FREE_STEPS = 32

    def __init__(
        self,
        env: AlgorithmicEnv,
        num_envs: int,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        check_actions: bool = True,
        sync_free: bool | None = None,
    ) -> None:
        if not isinstance(env, AlgorithmicEnv):
            raise ValueError(
                f"env={env!r} is invalid: BatchedEnv needs an envs.AlgorithmicEnv instance"
            )
        self.env = env
        self.num_envs = check_int("num_envs", num_envs, 1)
        self.device = torch.device(device)
        self.check_actions = check_actions
        self.sync_free = self.device.type != "cpu" if sync_free is None else bool(sync_free)
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.render_mode = None
        self.metadata: dict[str, Any] = {"render_modes": []}
        self.reset_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        self._generator = torch.Generator(device=self.device)
        self._next_seed = seed if seed is not None else _fresh_seed()
        self._actions: Any = None
        #: ``[B, A]`` float32 on ``device``: the last ``step_wait``'s reward per action element
        #: (``A = 1`` for ``Discrete``), summing to its reward up to float32 rounding; what
        #: ``ppo.credit: element`` reads (``memagents.sb3.ppo``)
        self.reward_elements: Tensor | None = None
        # episode state, allocated by reset:
        self._obs: Tensor | None = None  # [B, T, D] float32
        self._target: Tensor | None = None  # [B, T, A] int32
        self._weight: Tensor | None = None  # [B, T] float32
        self._length: Tensor | None = None  # [B] int64
        self._t: Tensor | None = None  # [B] int64: current step of each episode
        self._errors: Tensor | None = None  # [B] int64: wrong answer elements so far
        self._return: Tensor | None = None  # [B] float32: reward summed so far this episode
        self._t_start = time.perf_counter()  # for the ``episode`` info's wall time, as Monitor
        self._row_start: Tensor | None = None  # [B] int64: b * T, flat index of (b, t = 0)
        # fresh episodes laid out ahead of time, so that an auto-reset costs a copy, not a
        # sample + layout of a few episodes (dozens of small tensor ops) at every step:
        self._reservoir: Episodes | None = None  # [P, ...] episodes not yet played
        self._reservoir_next = 0  # index of the next unplayed one
        self._reservoir_difficulty: dict[str, Any] = {}  # the knobs they were drawn with
        self._reservoir_size = max(self.num_envs, self.MIN_RESERVOIR)
        if self.sync_free:
            self._reservoir_size = max(self._reservoir_size, self.SYNC_FREE_STEPS * self.num_envs)
        # sync-free auto-reset: the next unplayed reservoir row as a device tensor, and how many
        # unplayed rows the host knows to remain (each step may take up to num_envs)
        self._reservoir_pos: Tensor | None = None
        self._known_left = 0

    # -- tensor interface -----------------------------------------------------------------------
    def reset_tensor(self, problem: Any = None) -> Tensor:
        """Start ``B`` new episodes.

        :param problem: ``None`` for random episodes, or a ``Problem`` of batch size ``B`` (as
            returned by ``env.sample``) to play scripted ones.
        :return: ``[B, D]`` first observations.
        """
        if self._next_seed is not None:
            self._generator.manual_seed(self._next_seed)
            self._next_seed = None
        if problem is None:
            episodes = self.env.layout(self.env.sample(self.num_envs, self._generator, self.device))
        else:
            episodes = self.env.load(problem)
            if episodes.length.shape[0] != self.num_envs:
                raise ValueError(
                    f"problem has batch size {episodes.length.shape[0]}, expected "
                    f"num_envs={self.num_envs}"
                )
            episodes = Episodes(*(x.to(self.device) for x in episodes))
        self._reservoir = None  # a reset (maybe re-seeded) starts a fresh stream of episodes
        self._reservoir_pos, self._known_left = None, 0
        self._obs, self._target, self._weight, self._length = (x.contiguous() for x in episodes)
        self._t = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._errors = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._return = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        self._update_row_start()
        return self._obs[:, 0].clone()

    def step_tensor(self, actions: Tensor | np.ndarray, check: bool | None = None) -> BatchedStep:
        """Step every episode; where one ends, lay out a new one in its place (auto-reset).

        :param actions: ``[B]`` integers for ``Discrete(n)``, ``[B, W]`` zeros and ones for
            ``MultiBinary(W)``; a tensor (any device) or an array.
        :param check: check the action values against the action space (a device sync);
            ``None``: as ``check_actions`` says. Shapes are always checked. A caller whose
            actions come from a distribution over the space (the device collector) passes False.
        :return: a :class:`BatchedStep` of tensors on the env's device.
        """
        if self._t is None:
            raise gym.error.ResetNeeded("call reset() or reset_tensor() before stepping")
        actions = self._check(actions, self.check_actions if check is None else check)  # [B, A]
        B, T, D = self._obs.shape
        now = self._row_start + self._t  # [B] flat index of each episode's current step
        target = self._target.view(B * T, -1).index_select(0, now)  # [B, A]
        weight = self._weight.view(B * T).index_select(0, now)  # [B]
        reward, wrong = score(actions, target, weight)  # [B] float32, [B] int64
        reward_elements = (actions == target) * weight[:, None]  # [B, A] float32
        self._errors += wrong
        self._return += reward
        self._t += 1
        done = self._t >= self._length  # [B]
        final_obs = self._obs.view(B * T, D).index_select(0, now + 1)  # [B, D]
        success = done & (self._errors == 0)
        episode_return = torch.where(done, self._return, 0.0)  # [B]
        episode_length = torch.where(done, self._t, 0)  # [B]
        if self.sync_free:
            self._restart_masked(done)  # may grow T
        else:
            restart = done.nonzero().squeeze(1)  # [k] envs whose episode ended
            if restart.numel() > 0:
                self._restart(restart)  # may grow T
        B, T, D = self._obs.shape
        obs = self._obs.view(B * T, D).index_select(0, self._row_start + self._t)
        return BatchedStep(
            obs, reward, done, final_obs, success, episode_return, episode_length, reward_elements
        )

    def set_difficulty(self, **knobs: Any) -> dict[str, Any]:
        """Change the task's difficulty knobs for every episode that starts from now on."""
        return self.env.set_difficulty(**knobs)

    # -- stable-baselines3 VecEnv interface -----------------------------------------------------
    def reset(self) -> np.ndarray:
        """Start ``B`` new random episodes; return their first observations ``[B, D]``."""
        obs = self.reset_tensor()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs.cpu().numpy()

    def step_async(self, actions: np.ndarray | Tensor) -> None:
        """Store the actions ``[B]`` or ``[B, W]`` for :meth:`step_wait`."""
        self._actions = actions

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step with the stored actions.

        :return: ``obs [B, D] float32``, ``rewards [B] float32``, ``dones [B] bool``, and one
            info dict per env; where done it holds ``terminal_observation`` (``[D]``),
            ``TimeLimit.truncated`` (always False), ``is_success`` and, as SB3's ``Monitor``
            writes it, ``episode = {"r": return, "l": length, "t": seconds since creation}``
            (SB3 logs ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` from it).
        """
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async(actions)")
        out = self.step_tensor(self._actions)
        self._actions = None
        self.reward_elements = out.reward_elements
        dones = out.done.cpu().numpy()
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            final_obs, success = out.final_obs.cpu().numpy(), out.success.cpu().numpy()
            returns = out.episode_return.cpu().numpy()
            lengths = out.episode_length.cpu().numpy()
            elapsed = round(time.perf_counter() - self._t_start, 6)
            for i in np.flatnonzero(dones):
                infos[i] = {
                    "terminal_observation": final_obs[i],
                    "TimeLimit.truncated": False,
                    "is_success": bool(success[i]),
                    "episode": {"r": float(returns[i]), "l": int(lengths[i]), "t": elapsed},
                }
        return out.obs.cpu().numpy(), out.reward.cpu().numpy(), dones, infos

    def step(
        self, actions: np.ndarray | Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """``step_async(actions)`` then ``step_wait()``."""
        self.step_async(actions)
        return self.step_wait()

    def close(self) -> None:
        """Free the episode tensors."""
        self._obs = self._target = self._weight = self._length = self._t = self._errors = None
        self._return = None
        self._reservoir = None

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seed the episode generator at the next reset (``None``: a fresh random seed).

        :return: the seed, once per env (all episodes share one generator).
        """
        self._next_seed = seed if seed is not None else _fresh_seed()
        return [self._next_seed] * self.num_envs

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        """Reset options are not supported; only ``None`` or empty dicts are accepted."""
        given = options if isinstance(options, list) else [options]
        if any(o for o in given):
            raise ValueError(f"options={options!r} is invalid: BatchedEnv takes no reset options")

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        """The task's attribute ``attr_name`` (e.g. ``"max_length"``), once per env in indices."""
        return [getattr(self.env, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        """Set a task attribute (a difficulty knob, validated) for all envs."""
        self._require_all(indices, f"set_attr({attr_name!r})")
        if not hasattr(self.env, attr_name):
            raise AttributeError(f"{type(self.env).__name__} has no attribute {attr_name!r}")
        setattr(self.env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a task method (e.g. ``"set_difficulty"``) once; return its result per env."""
        self._require_all(indices, f"env_method({method_name!r})")
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result] * self.num_envs

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        """No gymnasium wrappers are involved: False for every env."""
        return [False] * len(self._indices(indices))

    def get_images(self) -> Sequence[np.ndarray | None]:
        """No images: None for every env."""
        return [None] * self.num_envs

    def render(self, mode: str | None = None) -> None:
        """Rendering is not supported by the batched env (use the single env's ``"ansi"``)."""
        return None

    @property
    def unwrapped(self) -> BatchedEnv:
        return self

    # -- internals ------------------------------------------------------------------------------
    def _check(self, actions: Tensor | np.ndarray, values: bool) -> Tensor:
        """``[B, A]`` actions on the device; ``InvalidActionError`` if outside the space."""
        a = torch.as_tensor(actions, device=self.device)
        space = self.action_space
        discrete = isinstance(space, spaces.Discrete)
        expected = (self.num_envs,) if discrete else (self.num_envs, *space.shape)
        if tuple(a.shape) != expected:
            raise InvalidActionError(
                f"actions of shape {tuple(a.shape)} are invalid for {self.num_envs} envs with "
                f"action space {space}: expected shape {expected}"
            )
        if values:
            if discrete:
                bad = (a < space.start) | (a >= space.start + space.n)
                if a.is_floating_point():
                    bad |= a != a.round()
            else:
                bad = (a != 0) & (a != 1)
            if bad.any():
                i = int(bad.reshape(self.num_envs, -1).any(1).nonzero()[0])
                raise InvalidActionError(
                    f"action {a[i].tolist()} of env {i} is not in the action space {space}"
                )
        return a.reshape(self.num_envs, -1)

    def _restart(self, rows: Tensor) -> None:
        """Put fresh random episodes in ``rows`` (``[k]`` env indices)."""
        episodes = self._take(rows.numel())
        self._grow_time(episodes.obs.shape[1])
        steps = self._obs.shape[1]
        self._obs.index_copy_(0, rows, _pad_time(episodes.obs, steps))
        self._target.index_copy_(0, rows, _pad_time(episodes.target, steps))
        self._weight.index_copy_(0, rows, _pad_time(episodes.weight, steps))
        self._length.index_copy_(0, rows, episodes.length)
        self._t.index_fill_(0, rows, 0)
        self._errors.index_fill_(0, rows, 0)
        self._return.index_fill_(0, rows, 0.0)

    def _restart_masked(self, done: Tensor) -> None:
        """Put fresh random episodes where ``done`` ([B] bool), with selects over every row and
        no read of ``done`` on the host: row ``b``'s episode is reservoir row ``pos + (number
        of done rows up to b) - 1``, the same rows in the same order as :meth:`_restart`."""
        B = self.num_envs
        self._ensure_reservoir(B)
        rank = torch.cumsum(done, 0) - 1  # [B]
        last = self._reservoir.length.shape[0] - 1
        take = (self._reservoir_pos + rank).clamp(0, last)  # [B]; only done rows are used
        self._reservoir_pos = self._reservoir_pos + done.sum()
        self._known_left -= B
        fresh = Episodes(*(x.index_select(0, take) for x in self._reservoir))  # padded to T
        m1, m2, m3 = done, done[:, None], done[:, None, None]
        self._obs = torch.where(m3, fresh.obs, self._obs)
        self._target = torch.where(m3, fresh.target, self._target)
        self._weight = torch.where(m2, fresh.weight, self._weight)
        self._length = torch.where(m1, fresh.length, self._length)
        self._t = torch.where(m1, 0, self._t)
        self._errors = torch.where(m1, 0, self._errors)
        self._return = torch.where(m1, 0.0, self._return)

    def _ensure_reservoir(self, k: int) -> None:
        """Make sure the reservoir has ``k`` unplayed rows (sync-free path): trusted from the
        host-side bound while it lasts, else read once from the device (and refilled if short,
        or if the difficulty changed). Longer episodes than ever grow ``T`` here, on the host."""
        difficulty = self.env.difficulty
        stale = self._reservoir is None or difficulty != self._reservoir_difficulty
        if not stale and self._known_left >= k:
            return
        size = 0 if self._reservoir is None else self._reservoir.length.shape[0]
        pos = 0 if self._reservoir_pos is None else int(self._reservoir_pos)  # the one sync
        if stale or size - pos < k:
            size = max(self._reservoir_size, k)
            fresh = self.env.layout(self.env.sample(size, self._generator, self.device))
            self._grow_time(fresh.obs.shape[1])
            # padded once to the episodes' T here, not at every step's selects
            steps = self._obs.shape[1]
            obs, target, weight = (_pad_time(x, steps) for x in fresh[:3])
            self._reservoir = Episodes(obs, target, weight, fresh.length)
            self._reservoir_difficulty = difficulty
            pos = 0
        self._reservoir_pos = torch.tensor(pos, dtype=torch.long, device=self.device)
        self._known_left = size - pos

    def _grow_time(self, steps: int) -> None:
        """Zero-pad the episodes' time axis to ``steps`` if they are longer than ever before (a
        curriculum raised the length)."""
        if steps > self._obs.shape[1]:
            self._obs, self._target, self._weight = (
                _pad_time(x, steps) for x in (self._obs, self._target, self._weight)
            )
            self._update_row_start()

    def _take(self, k: int) -> Episodes:
        """``k`` fresh random episodes at the current difficulty, from the reservoir."""
        difficulty = self.env.difficulty
        if (
            self._reservoir is None
            or difficulty != self._reservoir_difficulty
            or self._reservoir_next + k > self._reservoir.length.shape[0]
        ):
            size = max(self._reservoir_size, k)
            self._reservoir = self.env.layout(self.env.sample(size, self._generator, self.device))
            self._reservoir_next = 0
            self._reservoir_difficulty = difficulty
        start, self._reservoir_next = self._reservoir_next, self._reservoir_next + k
        return Episodes(*(x[start : start + k] for x in self._reservoir))

    def _update_row_start(self) -> None:
        steps = self._obs.shape[1]
        self._row_start = torch.arange(self.num_envs, device=self.device) * steps

    def _indices(self, indices: Any) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        chosen = [indices] if isinstance(indices, int) else list(indices)
        for i in chosen:
            if not 0 <= i < self.num_envs:
                raise IndexError(f"env index {i} is out of range for num_envs={self.num_envs}")
        return chosen

    def _require_all(self, indices: Any, what: str) -> None:
        if set(self._indices(indices)) != set(range(self.num_envs)):
            raise ValueError(
                f"{what} with indices={indices!r} is not supported: the {self.num_envs} episodes "
                "of a BatchedEnv share one task and its parameters; pass indices=None"
            )


def _pad_time(x: Tensor, steps: int) -> Tensor:
    """Zero-pad ``[B, T, ...]`` to ``[B, steps, ...]`` along time."""
    if x.shape[1] == steps:
        return x
    padded = x.new_zeros((x.shape[0], steps, *x.shape[2:]))
    padded[:, : x.shape[1]] = x
    return padded


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)


def make_vec(
    env_id: str,
    num_envs: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    **kwargs: Any,
) -> BatchedEnv:
    """The batched env of a registered ``memagents/`` task.

    :param env_id: e.g. ``"memagents/Copy-v0"`` or a variant such as ``"memagents/Copy-L20-v0"``.
    :param num_envs: ``B``, episodes stepped together.
    :param device: where the episodes live.
    :param seed: seeds the episode generator (see :class:`BatchedEnv`).
    :param kwargs: constructor arguments overriding the registered ones (e.g. ``bits=4``).
    :return: a :class:`BatchedEnv` with SB3's ``VecEnv`` interface.
    """
    spec = gym.spec(env_id)
    creator = spec.entry_point
    if isinstance(creator, str):
        creator = load_env_creator(creator)
    if not (isinstance(creator, type) and issubclass(creator, AlgorithmicEnv)):
        raise ValueError(
            f"env_id={env_id!r} has no batched implementation: only the memagents/ algorithmic "
            "tasks do"
        )
    merged = {**spec.kwargs, **kwargs}
    env = creator(**merged)
    env.spec = dataclasses.replace(spec, kwargs=merged)
    return BatchedEnv(env, num_envs, device=device, seed=seed)
