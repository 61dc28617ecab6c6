"""Copy (Graves et al. 2014, Neural Turing Machines, section 4.1), as an RL episode."""

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


class CopyProblem(NamedTuple):
    """The contents of ``B`` Copy episodes."""

    seq: Tensor  # [B, L_max, W] uint8 in {0, 1}: the input vectors; rows >= length are 0
    length: Tensor  # [B] int64 in [1, L_max]: L, the number of input vectors


class CopyEnv(AlgorithmicEnv):
    """Copy a sequence of binary vectors after seeing it once.

    ## Description
    The NTM copy task (Graves et al. 2014) posed as an RL episode. The agent is shown a sequence
    of `L` random `bits`-wide binary vectors, one per step (`L` uniform in [`min_length`,
    `max_length`]), then a single delimiter step, then `L` answer steps on which it must emit the
    vectors back, in order, one per step.

    ## Observation Space
    `Box(0, 1, (bits + 2,), float32)`, the layout shared by every Copy-like task:

    | channel | meaning |
    |---|---|
    | `0 .. bits - 1` | input vector `j` on input step `j` (steps `0 .. L - 1`); 0 otherwise |
    | `bits` | 1 on the single delimiter step `L` that follows the input; 0 otherwise |
    | `bits + 1` | 1 on every answer step (`L + 1 .. 2 L`); 0 otherwise |

    ## Action Space
    `MultiBinary(bits)`: the vector emitted. The action on answer step `j` (step `L + 1 + j`)
    is scored against input vector `j`; actions on input and delimiter steps are ignored
    (but must be in the space).

    ## Rewards
    On answer step `j`: (number of bits of the action equal to input vector `j`) / (`bits` * `L`).
    0 on other steps. A perfect episode returns 1.0 (up to float32 rounding of each reward).

    ## Episode End
    Terminated after the last answer step: `2 L + 1` steps (at most `2 max_length + 1`, see
    `max_episode_length`). Never truncated. The final observation is all zeros.
    `info["is_success"]` on the last step tells whether every bit was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/Copy-v0", bits=8, min_length=1, max_length=10)
    ```
    - `bits` (W, an integer >= 1; fixed): width of each vector.
    - `min_length`, `max_length` (integers, 1 <= `min_length` <= `max_length`; difficulty knobs):
      the range of the sequence length `L`. Change them between episodes with
      `env.unwrapped.set_difficulty(max_length=...)`, also beyond the training range.

    Variants: `memagents/Copy-Easy-v0` (4 bits, length 1..5), `memagents/Copy-L20-v0`
    (8 bits, length 1..20, the NTM paper's training range), `memagents/Copy-Hard-v0`
    (8 bits, length 10..20).

    ## Memoryless ceiling
    0.5. Every answer step shows the same observation, and each target bit is a fair coin
    independent of it, so any policy that sees only the current observation gets each bit right
    with probability exactly 1/2.

    ## Version History
    - v0: initial version.
    """

    Problem = CopyProblem
    bits = Fixed()
    min_length = Knob()
    max_length = Knob()
    _knobs = ("min_length", "max_length")

    def __init__(
        self,
        bits: int = 8,
        min_length: int = 1,
        max_length: int = 10,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode, bits=bits, min_length=min_length, max_length=max_length
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.bits + 2,), np.float32)
        self.action_space = spaces.MultiBinary(self.bits)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        params["bits"] = check_int("bits", params["bits"], 1)
        params["min_length"] = check_int("min_length", params["min_length"], 1)
        params["max_length"] = check_int("max_length", params["max_length"], 1)
        check_order(params, "min_length", "max_length")
        return params

    @property
    def max_episode_length(self) -> int:
        return 2 * self.max_length + 1

    def memoryless_ceiling(self) -> float:
        return 0.5

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str) -> CopyProblem:
        length = random_lengths(n, self.min_length, self.max_length, generator, device)
        return CopyProblem(random_bits(n, length, self.max_length, self.bits, generator), length)

    def layout(self, problem: CopyProblem) -> Episodes:
        seq, length = problem
        _, L_max, W = seq.shape
        T = 2 * L_max + 2  # the longest episode, 2 L_max + 1 steps, + the final observation
        t = torch.arange(T, device=seq.device)[None, :]  # [1, T]
        L = length[:, None]  # [B, 1]
        is_answer = (t > L) & (t <= 2 * L)  # [B, T]
        # rows of the step table: input vectors 0 .. L_max - 1, blank, delimiter, answer flag
        table = step_table(seq, W + 2, markers=(W, W + 1))  # [B, L_max + 3, W + 2]
        BLANK, DELIMITER, ANSWER = L_max, L_max + 1, L_max + 2
        shown = torch.where(t < L, t, torch.where(t == L, DELIMITER, BLANK))
        shown = torch.where(is_answer, ANSWER, shown)  # [B, T]: table row shown at step t
        obs = gather_steps(table, shown)  # [B, T, W + 2]
        asked = gather_steps(seq.int(), t - L - 1, where=is_answer)  # [B, T, W]: answer j = input j
        weight = is_answer / (W * L)  # [B, T]: 1 / (W L) on answer steps
        return Episodes(obs, asked, weight.float(), 2 * length + 1)
