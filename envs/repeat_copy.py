"""Repeat copy (Graves et al. 2014, Neural Turing Machines, section 4.2), as an RL episode."""

from __future__ import annotations

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
    gather_steps,
    random_bits,
    random_lengths,
    step_table,
)


class RepeatCopyProblem(NamedTuple):
    """The contents of ``B`` RepeatCopy episodes."""

    seq: Tensor  # [B, L_max, W] uint8 in {0, 1}: the input vectors; rows >= length are 0
    length: Tensor  # [B] int64 >= 1: L, the number of input vectors
    repeats: Tensor  # [B] int64 >= 1: R, how many times the sequence must be emitted


class RepeatCopyEnv(AlgorithmicEnv):
    """Copy a sequence of binary vectors back as many times as asked.

    ## Description
    The NTM repeat-copy task (Graves et al. 2014) posed as an RL episode. The agent is shown `L`
    random `bits`-wide binary vectors, one per step (`L` uniform in [`min_length`,
    `max_length`]), then the number of copies `R` (uniform in [`min_repeats`, `max_repeats`]) in
    unary: `R` delimiter steps. Then, on `R * L` answer steps, it must emit the sequence `R`
    times over. Unary keeps every observation binary and lets `R` grow beyond the training
    range (the paper instead shows a normalised scalar on one step). The environment, not the
    agent, ends the answer phase, so the paper's end-of-output marker is not part of the action.

    ## Observation Space
    `Box(0, 1, (bits + 2,), float32)`, Copy's layout:

    | channel | meaning |
    |---|---|
    | `0 .. bits - 1` | input vector `j` on input step `j` (steps `0 .. L - 1`); 0 otherwise |
    | `bits` | 1 on each of the `R` delimiter steps `L .. L + R - 1` (the count); 0 otherwise |
    | `bits + 1` | 1 on every answer step (`L + R .. L + R + R L - 1`); 0 otherwise |

    ## Action Space
    `MultiBinary(bits)`. The action on answer step `k` is scored against input vector `k mod L`;
    actions on input and delimiter steps are ignored (but must be in the space).

    ## Rewards
    On each answer step: (number of bits right) / (`bits` * `R` * `L`); 0 elsewhere. A perfect
    episode returns 1.0 (up to float32 rounding of each reward).

    ## Episode End
    Terminated after the last answer step: `L + R + R L` steps (at most `max_length +
    max_repeats + max_repeats * max_length`, see `max_episode_length`). Never truncated. The
    final observation is all zeros. `info["is_success"]` on the last step tells whether every
    bit was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/RepeatCopy-v0", bits=8, min_length=1, max_length=5,
                   min_repeats=1, max_repeats=5)
    ```
    - `bits` (W, an integer >= 1; fixed): width of each vector.
    - `min_length`, `max_length` (integers, 1 <= min <= max; difficulty knobs): range of `L`.
    - `min_repeats`, `max_repeats` (integers, 1 <= min <= max; difficulty knobs): range of `R`.

    Change the knobs between episodes with `env.unwrapped.set_difficulty(...)`, also beyond the
    training range. Variants: `memagents/RepeatCopy-Easy-v0` (4 bits, L 1..3, R 1..3),
    `memagents/RepeatCopy-Hard-v0` (8 bits, L 1..10, R 1..10, the NTM paper's training range).

    ## Memoryless ceiling
    0.5. Every answer step shows the same observation, and each target bit is a fair coin
    independent of it, so any policy that sees only the current observation gets each bit right
    with probability exactly 1/2.

    ## Version History
    - v0: initial version.
    """

    Problem = RepeatCopyProblem
    bits = Fixed()
    min_length = Knob()
    max_length = Knob()
    min_repeats = Knob()
    max_repeats = Knob()
    _knobs = ("min_length", "max_length", "min_repeats", "max_repeats")

    def __init__(
        self,
        bits: int = 8,
        min_length: int = 1,
        max_length: int = 5,
        min_repeats: int = 1,
        max_repeats: int = 5,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            bits=bits,
            min_length=min_length,
            max_length=max_length,
            min_repeats=min_repeats,
            max_repeats=max_repeats,
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.bits + 2,), np.float32)
        self.action_space = spaces.MultiBinary(self.bits)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name, low in [
            ("bits", 1),
            ("min_length", 1),
            ("max_length", 1),
            ("min_repeats", 1),
            ("max_repeats", 1),
        ]:
            params[name] = check_int(name, params[name], low)
        check_order(params, "min_length", "max_length")
        check_order(params, "min_repeats", "max_repeats")
        return params

    @property
    def max_episode_length(self) -> int:
        return self.max_length + self.max_repeats + self.max_repeats * self.max_length

    def memoryless_ceiling(self) -> float:
        return 0.5

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> RepeatCopyProblem:
        length = random_lengths(n, self.min_length, self.max_length, generator, device)
        repeats = random_lengths(n, self.min_repeats, self.max_repeats, generator, device)
        seq = random_bits(n, length, self.max_length, self.bits, generator)
        return RepeatCopyProblem(seq, length, repeats)

    def layout(self, problem: RepeatCopyProblem) -> Episodes:
        seq, length, repeats = problem
        _, L_max, W = seq.shape
        R_max = int(repeats.max())
        T = L_max + R_max + R_max * L_max + 1  # the longest episode + the final observation
        t = torch.arange(T, device=seq.device)[None, :]  # [1, T]
        L, R = length[:, None], repeats[:, None]  # [B, 1]
        is_count = (t >= L) & (t < L + R)  # [B, T]
        is_answer = (t >= L + R) & (t < L + R + R * L)
        # rows of the step table: input vectors 0 .. L_max - 1, blank, delimiter, answer flag
        table = step_table(seq, W + 2, markers=(W, W + 1))  # [B, L_max + 3, W + 2]
        BLANK, DELIMITER, ANSWER = L_max, L_max + 1, L_max + 2
        shown = torch.where(t < L, t, torch.where(is_count, DELIMITER, BLANK))
        shown = torch.where(is_answer, ANSWER, shown)  # [B, T]: table row shown at step t
        obs = gather_steps(table, shown)  # [B, T, W + 2]
        asked = gather_steps(
            seq.int(), (t - L - R) % L, where=is_answer
        )  # answer k = input k mod L
        weight = is_answer / (W * R * L)  # [B, T]
        return Episodes(obs, asked, weight.float(), length + repeats * (length + 1))
