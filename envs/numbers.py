"""What Adding and Argmax share: a sequence of one-hot numbers, then one answer step.

Both are pytorch-dnc's tasks: numbers are shown one-hot, one per step, then an end marker on
which the network's output is read. Here the end marker is the answer step and the answer is a
``Discrete`` action, so ``length_limit`` (the longest sequence the env will ever be set to) sizes
the action space once, at construction, leaving room for length-generalisation tests.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.base import (
    AlgorithmicEnv,
    Episodes,
    Fixed,
    Knob,
    check_int,
    check_order,
    random_lengths,
)


class NumbersProblem(NamedTuple):
    """The contents of ``B`` Adding or Argmax episodes."""

    numbers: Tensor  # [B, L_max] int64 in [0, num_values): the numbers; entries >= length are 0
    length: Tensor  # [B] int64 >= 1: L, how many numbers are shown


class NumberSequenceEnv(AlgorithmicEnv):
    """Base of Adding and Argmax: ``L`` one-hot numbers, then the answer step.

    Subclasses define :meth:`answer` (the correct action per episode), :meth:`num_answers` (the
    size of the action space) and :meth:`answer_distribution` (for the memoryless ceiling).
    """

    Problem = NumbersProblem
    num_values = Fixed()
    length_limit = Fixed()
    min_length = Knob()
    max_length = Knob()
    _knobs = ("min_length", "max_length")

    def __init__(
        self,
        num_values: int,
        min_length: int,
        max_length: int,
        length_limit: int | None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            num_values=num_values,
            min_length=min_length,
            max_length=max_length,
            length_limit=length_limit,
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.num_values + 1,), np.float32)
        self.action_space = spaces.Discrete(self.num_answers())

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name, low in [("num_values", 2), ("min_length", 1), ("max_length", 1)]:
            params[name] = check_int(name, params[name], low)
        check_order(params, "min_length", "max_length")
        if params["length_limit"] is None:  # resolved once, at construction
            params["length_limit"] = 2 * params["max_length"]
        params["length_limit"] = check_int("length_limit", params["length_limit"], 1)
        if params["max_length"] > params["length_limit"]:
            raise ValueError(
                f"max_length={params['max_length']} > length_limit={params['length_limit']} is "
                "invalid: length_limit sizes the action space and bounds every length; make the "
                "env with a larger length_limit"
            )
        return params

    # -- what differs between Adding and Argmax ------------------------------------------------
    def num_answers(self) -> int:
        """Size of the ``Discrete`` action space (fixed by ``num_values`` and ``length_limit``)."""
        raise NotImplementedError

    def answer(self, problem: NumbersProblem) -> Tensor:
        """``[B]`` the correct action of each episode."""
        raise NotImplementedError

    @classmethod
    def answer_distribution(cls, num_values: int, length: int) -> list[Fraction]:
        """Exact probability of each answer when ``length`` numbers are uniform in
        ``[0, num_values)``; index = answer."""
        raise NotImplementedError

    # -- shared rules ---------------------------------------------------------------------------
    @property
    def max_episode_length(self) -> int:
        return self.max_length + 1

    def memoryless_ceiling(self) -> float:
        """The probability of the most likely answer: the answer step always shows the same
        observation, so a memoryless policy can do no better than always naming that answer."""
        lengths = range(self.min_length, self.max_length + 1)
        total: dict[int, Fraction] = {}
        for length in lengths:
            for a, p in enumerate(self.answer_distribution(self.num_values, length)):
                total[a] = total.get(a, Fraction(0)) + p / len(lengths)
        return float(max(total.values()))

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> NumbersProblem:
        length = random_lengths(n, self.min_length, self.max_length, generator, device)
        numbers = torch.randint(
            0, self.num_values, (n, self.max_length), generator=generator, device=device
        )
        numbers *= torch.arange(self.max_length, device=device) < length[:, None]
        return NumbersProblem(numbers, length)

    def layout(self, problem: NumbersProblem) -> Episodes:
        numbers, length = problem
        _, L_max = numbers.shape
        V = self.num_values
        T = L_max + 2  # the longest episode, L_max + 1 steps, + the final observation
        t = torch.arange(T, device=numbers.device)[None, :]  # [1, T]
        L = length[:, None]  # [B, 1]
        is_input = t < L  # [B, T]
        is_answer = t == L
        shown = torch.nn.functional.pad(numbers, (0, T - L_max))  # [B, T]
        one_hot = shown[..., None] == torch.arange(V, device=numbers.device)  # [B, T, V]
        obs = torch.cat([one_hot & is_input[..., None], is_answer[..., None]], dim=-1)
        target = (self.answer(problem)[:, None] * is_answer)[..., None]  # [B, T, 1]
        return Episodes(obs.float(), target.int(), is_answer.float(), length + 1)

    @staticmethod
    def valid(problem: NumbersProblem) -> Tensor:
        """``[B, L_max]`` True where a number is shown."""
        numbers, length = problem
        return torch.arange(numbers.shape[1], device=numbers.device) < length[:, None]
