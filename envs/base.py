"""What every algorithmic memory task shares: the episode tensors, the scoring rule, the single env.

A task is defined once, as two pure batched functions on the env class:

- ``sample(n, generator, device) -> Problem``: draws ``n`` random episode contents (the sequence to
  copy, the numbers to add, ...) as a ``NamedTuple`` of ``[n, ...]`` tensors, using only the given
  ``torch.Generator`` and the env's current difficulty.
- ``layout(problem) -> Episodes``: deterministic; lays each problem out in time as the observation
  shown at every step, the correct action at every step and the reward weight of every step.

The single env (:class:`AlgorithmicEnv`) runs ``sample`` with ``n = 1`` on a generator re-seeded
from ``self.np_random`` at every reset, lays the episode out once, then steps through the arrays.
The batched env (``envs.vector.BatchedEnv``) calls the very same two functions on ``n`` episodes
at a time on its device. Both score actions with :func:`score`. There is no second copy of a rule.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

__all__ = [
    "AlgorithmicEnv",
    "Episodes",
    "Fixed",
    "InvalidActionError",
    "Knob",
    "check_int",
    "check_order",
    "gather_steps",
    "random_bits",
    "random_lengths",
    "score",
    "step_table",
]


class Episodes(NamedTuple):
    """``B`` episodes laid out in time, padded to ``T`` steps (``T`` > every episode's length).

    Step ``t`` of episode ``b`` shows ``obs[b, t]``; the action taken there is scored against
    ``target[b, t]`` with weight ``weight[b, t]`` (0 outside answer steps). After its last step
    ``length[b] - 1`` the episode ends and ``obs[b, length[b]]`` (all zeros) is the final
    observation. For ``Discrete`` actions ``A = 1``; for ``MultiBinary(W)`` ``A = W``.
    """

    obs: Tensor  # [B, T, D] float32: the observation shown at step t
    target: Tensor  # [B, T, A] int32: the correct action at step t (0 where weight is 0)
    weight: Tensor  # [B, T] float32: reward per correct action element at step t
    length: Tensor  # [B] int64: number of steps of each episode


def score(action: Any, target: Any, weight: Any) -> tuple[Any, Any]:
    """Reward of an action, and how many of its elements were wrong on an answer step.

    Written once for numpy arrays and torch tensors alike (the single env calls it with numpy, the
    batched env with tensors), so the two cannot drift apart.

    :param action: ``[..., A]`` taken actions (``A = 1`` for ``Discrete``).
    :param target: ``[..., A]`` correct actions.
    :param weight: ``[...]`` reward per correct element; ``1 / (A * answer steps)`` on answer steps
        so that a perfect episode sums to 1, and 0 elsewhere.
    :return: ``reward [...]``, the number of correct elements times ``weight``, and
        ``wrong [...]``, the number of wrong elements on answer steps (0 elsewhere; an episode
        is a success when they sum to 0). With numpy the reward is exact in float64 (a small
        integer times a float32); rounding it to float32 gives the batched env's reward bit for
        bit.
    """
    right = (action == target).sum(-1)
    return right * weight, (target.shape[-1] - right) * (weight > 0)


def gather_steps(x: Tensor, index: Tensor, where: Tensor | None = None) -> Tensor:
    """Pick rows of a per-episode sequence for every time step.

    :param x: ``[B, L, ...]`` a sequence per episode (e.g. the input vectors).
    :param index: ``[B, T]`` (or ``[1, T]``, broadcast) integer row to pick at each step; clamped
        to ``[0, L - 1]``, so callers can compute it everywhere and mask the meaningless steps.
    :param where: optional ``[B, T]`` (or broadcastable) bool mask; steps where it is False get
        zeros.
    :return: ``[B, T, ...]`` with ``out[b, t] = x[b, index[b, t]]`` where ``where[b, t]``, else 0.
    """
    B, L = x.shape[:2]
    rest = x.shape[2:]
    zero_row = x.new_zeros((B, 1, *rest))
    flat = torch.cat([x, zero_row], dim=1).reshape(B * (L + 1), *rest)  # row L of each is 0
    index = index.clamp(0, L - 1)
    if where is not None:
        index = torch.where(where, index, L)
    index = index + torch.arange(B, device=x.device)[:, None] * (L + 1)  # [B, T] flat rows
    return flat.index_select(0, index.reshape(-1)).reshape(*index.shape, *rest)


def step_table(data: Tensor, width: int, markers: tuple[int, ...]) -> Tensor:
    """Every observation an episode can show, as rows of one table (to be picked per step).

    :param data: ``[B, L, C]`` the data rows (input vectors, priorities, ...) in channels
        ``0 .. C - 1``; the other channels of those rows are 0.
    :param width: ``D``, channels per observation (``>= C``).
    :param markers: channels of the marker rows (delimiter, answer flag, ...).
    :return: ``[B, L + 1 + len(markers), D]`` float32: rows ``0 .. L - 1`` are the data, row ``L``
        is blank (all zeros) and row ``L + 1 + i`` is one-hot at channel ``markers[i]``.
    """
    B, L, C = data.shape
    table = data.new_zeros((B, L + 1 + len(markers), width), dtype=torch.float32)
    table[:, :L, :C] = data
    for i, channel in enumerate(markers):
        table[:, L + 1 + i, channel] = 1.0
    return table


def random_bits(
    n: int, length: Tensor, max_length: int, bits: int, generator: torch.Generator
) -> Tensor:
    """``[n, max_length, bits]`` random uint8 bits, rows at or beyond each ``length`` set to 0.

    :param length: ``[n]`` number of valid rows per episode.
    """
    size = (n, max_length, bits)
    seq = torch.randint(0, 2, size, generator=generator, device=length.device, dtype=torch.uint8)
    valid = torch.arange(max_length, device=length.device) < length[:, None]  # [n, max_length]
    return seq * valid[..., None]


def random_lengths(
    n: int, low: int, high: int, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """``[n]`` integers drawn uniformly from ``[low, high]`` (both included)."""
    return torch.randint(low, high + 1, (n,), generator=generator, device=device)


class InvalidActionError(gym.error.InvalidAction, ValueError):
    """An action outside the env's action space (never silently scored)."""


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= low``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} is invalid: {name} must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be >= {low}")
    return int(value)


def check_order(params: dict[str, Any], low: str, high: str) -> None:
    """``ValueError`` unless ``params[low] <= params[high]``."""
    if params[low] > params[high]:
        raise ValueError(
            f"{low}={params[low]} > {high}={params[high]} is invalid: {low} must be <= {high}"
        )


class Knob:
    """A difficulty parameter: readable, and settable between episodes.

    Setting it (``env.max_length = 20`` or SB3's ``set_attr("max_length", 20)``) goes through
    :meth:`AlgorithmicEnv.set_difficulty`, so it is validated and applies from the next episode.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, env: Any, owner: type | None = None) -> Any:
        return self if env is None else env._params[self.name]

    def __set__(self, env: Any, value: Any) -> None:
        env.set_difficulty(**{self.name: value})


class Fixed:
    """A structural parameter (it sizes the spaces): readable, fixed after construction."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, env: Any, owner: type | None = None) -> Any:
        return self if env is None else env._params[self.name]

    def __set__(self, env: Any, value: Any) -> None:
        raise AttributeError(
            f"{self.name} sizes the observation or action space and is fixed after construction; "
            f"make a new env with {self.name}={value!r} instead"
        )


class AlgorithmicEnv(gym.Env[np.ndarray, Any]):
    """Base class of the algorithmic memory tasks: one episode at a time, as numpy.

    Subclasses declare their parameters as :class:`Fixed` and :class:`Knob` class attributes, set
    ``observation_space`` and ``action_space``, and implement :meth:`check_params`,
    :meth:`sample`, :meth:`layout`, :meth:`memoryless_ceiling` and :attr:`max_episode_length`.

    :param render_mode: ``None``, ``"ansi"`` (:meth:`render` returns the current step as text) or
        ``"rgb_array"`` (an image of the observations seen so far; SB3's ``make_vec_env`` asks
        for this mode by default).
    :param params: the task's parameters, validated by :meth:`check_params`.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    Problem: ClassVar[type]  # the NamedTuple returned by sample()

    def __init__(self, render_mode: str | None = None, **params: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r} is invalid: allowed are None and "
                f"{self.metadata['render_modes']}"
            )
        self.render_mode = render_mode
        self._params = self.check_params(dict(params))
        self._generator = torch.Generator()
        self._episode: tuple[np.ndarray, np.ndarray, np.ndarray, int] | None = None
        self._t = 0
        self._errors = 0

    # -- the task's rules (implemented by every task) ------------------------------------------
    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Validate all parameters; return them normalised (``ValueError`` naming a bad one)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> Any:
        """Draw ``n`` random problems at the current difficulty (a ``Problem`` of ``[n, ...]``).

        :param n: number of episodes ``B``.
        :param generator: the only source of randomness; must live on ``device``.
        :param device: where the tensors are created.
        """
        raise NotImplementedError

    def layout(self, problem: Any) -> Episodes:
        """Lay ``B`` problems out in time (deterministic, batched, on the problem's device)."""
        raise NotImplementedError

    def memoryless_ceiling(self) -> float:
        """Best expected return of any policy that sees only the current observation."""
        raise NotImplementedError

    @property
    def max_episode_length(self) -> int:
        """The longest episode the current difficulty can produce (steps)."""
        raise NotImplementedError

    # -- parameters -----------------------------------------------------------------------------
    _knobs: ClassVar[tuple[str, ...]] = ()

    @property
    def difficulty(self) -> dict[str, Any]:
        """The current values of the difficulty knobs."""
        return {name: self._params[name] for name in self._knobs}

    def set_difficulty(self, **knobs: Any) -> dict[str, Any]:
        """Change difficulty knobs (e.g. ``max_length``) from the next episode on.

        Lengths beyond the training range are allowed (length generalisation) as long as the
        spaces can express them. The current episode, if any, is not changed.

        :param knobs: new values for some of the knobs listed in :attr:`difficulty`.
        :return: the new :attr:`difficulty`.
        """
        for name in knobs:
            if name not in self._knobs:
                raise ValueError(
                    f"{name}={knobs[name]!r} is not a difficulty knob of "
                    f"{type(self).__name__}; allowed: {', '.join(self._knobs)}"
                )
        self._params = self.check_params({**self._params, **knobs})
        return self.difficulty

    @property
    def action_width(self) -> int:
        """``A``: elements per action (1 for ``Discrete``, ``W`` for ``MultiBinary(W)``)."""
        space = self.action_space
        return 1 if isinstance(space, spaces.Discrete) else int(np.prod(space.shape))

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode.

        :param seed: seeds ``self.np_random``, the only source of randomness.
        :param options: ``{"problem": p}`` plays the given problem (a ``Problem`` with batch size
            1, as returned by :meth:`sample`) instead of a random one: scripted episodes.
        :return: the first observation ``[D]`` and an empty info dict.
        """
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"problem"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; allowed: ['problem']")
        if "problem" in options:
            episodes = self.load(options["problem"])
            if episodes.length.shape[0] != 1:
                raise ValueError(
                    f"options['problem'] has batch size {episodes.length.shape[0]}; the single "
                    "env plays exactly one problem (batch size 1)"
                )
        else:
            # All randomness flows from self.np_random: it seeds the task's torch sampler.
            self._generator.manual_seed(int(self.np_random.integers(2**63 - 1)))
            episodes = self.layout(self.sample(1, self._generator, "cpu"))
        self._episode = (
            episodes.obs[0].cpu().numpy(),  # [T, D]
            episodes.target[0].cpu().numpy(),  # [T, A]
            episodes.weight[0].cpu().numpy(),  # [T]
            int(episodes.length[0]),
        )
        self._t = 0
        self._errors = 0
        self._actions: list[np.ndarray] = []
        return self._episode[0][0].copy(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Take one step.

        :param action: an element of ``action_space``; anything else raises
            :class:`InvalidActionError`. Actions on non-answer steps are checked but not scored.
        :return: ``(obs [D], reward, terminated, False, info)``; ``info["is_success"]`` is set on
            the last step (True when every answer element was right).
        """
        if self._episode is None or self._t >= self._episode[3]:
            raise gym.error.ResetNeeded("call reset() before step() (the episode has ended)")
        if not self.action_space.contains(action):
            raise InvalidActionError(
                f"action {action!r} is not in the action space {self.action_space} of "
                f"{type(self).__name__}"
            )
        obs, target, weight, length = self._episode
        t = self._t
        action = np.asarray(action).reshape(-1)  # [A]
        self._actions.append(action.copy())
        reward, wrong = score(action, target[t], weight[t])
        reward = float(np.float32(reward))
        self._errors += int(wrong)
        self._t = t + 1
        terminated = self._t == length
        info = {"is_success": self._errors == 0} if terminated else {}
        return obs[self._t].copy(), reward, terminated, False, info

    #: pixels per observation cell in ``rgb_array`` renders
    CELL = 8

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: the current step and observation as one line of text.
        ``"rgb_array"``: ``uint8 [(D + 2 A' + 2) * CELL, (max_steps + 1) * CELL, 3]``, one column
        per step, three grids stacked: the observations so far (``D`` channels), the targets of
        the answer steps so far, and the actions taken on answer steps so far (``A'`` rows: the
        bits, or one row per symbol for ``Discrete`` actions); brighter = larger, the current step
        outlined, grey bands between the grids."""
        if self.render_mode is None or self._episode is None:
            return None
        obs, target, weight, length = self._episode
        if self.render_mode == "rgb_array":
            return self._render_grids(obs, target, weight, int(length))
        shown = np.array2string(obs[self._t], precision=2, separator=" ")
        return f"{type(self).__name__} step {self._t}/{length}: obs {shown}\n"

    def _answer_rows(self, values: np.ndarray) -> np.ndarray:
        """``[A]`` target or action -> a column of ``A'`` cells (one-hot for ``Discrete``)."""
        if isinstance(self.action_space, spaces.Discrete):
            column = np.zeros(int(self.action_space.n), dtype=np.float32)
            column[int(values.reshape(-1)[0])] = 1.0
            return column
        return values.reshape(-1).astype(np.float32)

    def _render_grids(
        self, obs: np.ndarray, target: np.ndarray, weight: np.ndarray, length: int
    ) -> np.ndarray:
        t = self._t
        width = length + 1
        rows = self._answer_rows(target[0]).shape[0]
        seen = np.zeros((obs.shape[1], width), dtype=np.float32)
        seen[:, : t + 1] = obs[: t + 1].T
        wanted = np.zeros((rows, width), dtype=np.float32)
        given = np.zeros((rows, width), dtype=np.float32)
        for s in range(min(t + 1, length)):
            if weight[s] > 0:
                wanted[:, s] = self._answer_rows(target[s])
                if s < len(self._actions):
                    given[:, s] = self._answer_rows(self._actions[s])
        band = np.full((1, width), 0.35, dtype=np.float32)
        cells = np.clip(np.concatenate([seen, band, wanted, band, given]), 0.0, 1.0)
        cells = (cells * 255).astype(np.uint8)
        image = np.repeat(np.repeat(cells, self.CELL, 0), self.CELL, 1)
        image = np.stack([image] * 3, axis=-1)
        x = t * self.CELL
        image[:, x, :] = (255, 80, 0)
        image[:, x + self.CELL - 1, :] = (255, 80, 0)
        return image

    # -- helpers --------------------------------------------------------------------------------
    def load(self, problem: Any) -> Episodes:
        """Lay out a given (scripted) problem, with ``ValueError`` unless it fits this env.

        :param problem: a ``Problem`` NamedTuple of ``[B, ...]`` tensors (see :meth:`sample`).
        :return: its :class:`Episodes`.
        """
        if not isinstance(problem, self.Problem):
            raise ValueError(
                f"problem of type {type(problem).__name__} is invalid for {type(self).__name__}; "
                f"expected {self.Problem.__name__}"
            )
        episodes = self.layout(problem)
        obs_dim = self.observation_space.shape[0]
        if episodes.obs.shape[-1] != obs_dim:
            raise ValueError(
                f"problem lays out observations of width {episodes.obs.shape[-1]}, but the "
                f"observation space has width {obs_dim}"
            )
        low, high = float(self.observation_space.low[0]), float(self.observation_space.high[0])
        if bool(((episodes.obs < low) | (episodes.obs > high)).any()):
            raise ValueError("problem lays out observations outside the observation space")
        answers = episodes.target[episodes.weight > 0]  # [answer steps, A]
        if isinstance(self.action_space, spaces.Discrete):
            bad = bool(((answers < 0) | (answers >= self.action_space.n)).any())
        else:
            bad = bool(((answers != 0) & (answers != 1)).any())
        if bad:
            raise ValueError(f"problem has answers outside the action space {self.action_space}")
        return episodes
