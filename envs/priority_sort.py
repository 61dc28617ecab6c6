"""Priority sort (Graves et al. 2014, Neural Turing Machines, section 4.5), as an RL episode."""

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


class PrioritySortProblem(NamedTuple):
    """The contents of ``B`` PrioritySort episodes."""

    seq: Tensor  # [B, L_max, W] uint8 in {0, 1}: the input vectors; rows >= length are 0
    priority: Tensor  # [B, L_max] float32 in [0, 1): priority of each vector; rows >= length are 0
    length: Tensor  # [B] int64 >= 1: L, the number of input vectors
    outputs: Tensor  # [B] int64 in [1, L]: M, how many of the highest-priority vectors to emit


def sorted_rows(problem: PrioritySortProblem) -> Tensor:
    """``[B, L_max]`` input rows by decreasing priority; ties keep input order (stable)."""
    seq, priority, length, _ = problem
    valid = torch.arange(seq.shape[1], device=seq.device) < length[:, None]  # [B, L_max]
    keys = torch.where(valid, priority, torch.full_like(priority, -1.0))  # padding sorts last
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


class PrioritySortEnv(AlgorithmicEnv):
    """Emit the highest-priority vectors of a sequence, in order of priority.

    ## Description
    The NTM priority-sort task (Graves et al. 2014) posed as an RL episode. The agent is shown
    `L` random `bits`-wide binary vectors, one per step (`L` uniform in [`min_length`,
    `max_length`]), each with a scalar priority drawn uniformly from [0, 1) (the paper uses
    [-1, 1]; [0, 1) keeps the observation in a unit box). After a delimiter step it must emit the
    `M = min(num_outputs, L)` vectors of highest priority, highest first (`M = L`, a full sort,
    when `num_outputs` is None). Equal priorities keep their input order.

    ## Observation Space
    `Box(0, 1, (bits + 3,), float32)`: Copy's layout plus one channel for the priority.

    | channel | meaning |
    |---|---|
    | `0 .. bits - 1` | input vector `j` on input step `j` (steps `0 .. L - 1`); 0 otherwise |
    | `bits` | 1 on the single delimiter step `L` that follows the input; 0 otherwise |
    | `bits + 1` | 1 on every answer step (`L + 1 .. L + M`); 0 otherwise |
    | `bits + 2` | the priority of input vector `j` on input step `j`; 0 otherwise |

    ## Action Space
    `MultiBinary(bits)`. The action on answer step `k` is scored against the input vector with
    the `k`-th highest priority; actions on input and delimiter steps are ignored (but must be
    in the space).

    ## Rewards
    On each answer step: (number of bits right) / (`bits` * `M`); 0 elsewhere. A perfect episode
    returns 1.0 (up to float32 rounding of each reward).

    ## Episode End
    Terminated after the last answer step: `L + 1 + M` steps (at most `max_episode_length`).
    Never truncated. The final observation is all zeros. `info["is_success"]` on the last step
    tells whether every bit was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/PrioritySort-v0", bits=8, min_length=2, max_length=8,
                   num_outputs=None)
    ```
    - `bits` (W, an integer >= 1; fixed): width of each vector.
    - `min_length`, `max_length` (integers, 1 <= min <= max; difficulty knobs): range of `L`.
    - `num_outputs` (an integer >= 1, or None for all; difficulty knob): at most this many
      vectors are emitted.

    Change the knobs between episodes with `env.unwrapped.set_difficulty(...)`, also beyond the
    training range. Variants: `memagents/PrioritySort-Easy-v0` (4 bits, L 2..4),
    `memagents/PrioritySort-Hard-v0` (8 bits, L = 20, the 16 highest emitted: the NTM paper's).

    ## Memoryless ceiling
    0.5. Every answer step shows the same observation, and the order of the answer depends only
    on the priorities, so each target bit is a fair coin independent of it: any policy that sees
    only the current observation gets each bit right with probability exactly 1/2.

    ## Version History
    - v0: initial version.
    """

    Problem = PrioritySortProblem
    bits = Fixed()
    min_length = Knob()
    max_length = Knob()
    num_outputs = Knob()
    _knobs = ("min_length", "max_length", "num_outputs")

    def __init__(
        self,
        bits: int = 8,
        min_length: int = 2,
        max_length: int = 8,
        num_outputs: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            bits=bits,
            min_length=min_length,
            max_length=max_length,
            num_outputs=num_outputs,
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.bits + 3,), np.float32)
        self.action_space = spaces.MultiBinary(self.bits)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name, low in [("bits", 1), ("min_length", 1), ("max_length", 1)]:
            params[name] = check_int(name, params[name], low)
        check_order(params, "min_length", "max_length")
        if params["num_outputs"] is not None:
            params["num_outputs"] = check_int("num_outputs", params["num_outputs"], 1)
        return params

    def _outputs(self, length: int) -> int:
        return length if self.num_outputs is None else min(self.num_outputs, length)

    @property
    def max_episode_length(self) -> int:
        return self.max_length + 1 + self._outputs(self.max_length)

    def memoryless_ceiling(self) -> float:
        return 0.5

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> PrioritySortProblem:
        length = random_lengths(n, self.min_length, self.max_length, generator, device)
        seq = random_bits(n, length, self.max_length, self.bits, generator)
        priority = torch.rand(n, self.max_length, generator=generator, device=device)
        priority *= torch.arange(self.max_length, device=device) < length[:, None]
        outputs = length if self.num_outputs is None else length.clamp(max=self.num_outputs)
        return PrioritySortProblem(seq, priority, length, outputs)

    def layout(self, problem: PrioritySortProblem) -> Episodes:
        seq, priority, length, outputs = problem
        _, L_max, W = seq.shape
        T = 2 * L_max + 2  # the longest episode (M <= L) + the final observation
        t = torch.arange(T, device=seq.device)[None, :]  # [1, T]
        L, M = length[:, None], outputs[:, None]  # [B, 1]
        is_answer = (t > L) & (t <= L + M)  # [B, T]
        # rows of the step table: inputs 0 .. L_max - 1 (vector, 0, 0, priority), blank,
        # delimiter, answer flag
        flags = seq.new_zeros((*seq.shape[:2], 2))  # [B, L_max, 2]: no marker on input rows
        data = torch.cat([seq, flags], dim=-1).float()  # [B, L_max, W + 2]
        data = torch.cat([data, priority[..., None]], dim=-1)  # [B, L_max, W + 3]
        table = step_table(data, W + 3, markers=(W, W + 1))  # [B, L_max + 3, W + 3]
        BLANK, DELIMITER, ANSWER = L_max, L_max + 1, L_max + 2
        shown = torch.where(t < L, t, torch.where(t == L, DELIMITER, BLANK))
        shown = torch.where(is_answer, ANSWER, shown)  # [B, T]: table row shown at step t
        obs = gather_steps(table, shown)  # [B, T, W + 3]
        in_order = gather_steps(seq.int(), sorted_rows(problem))  # [B, L_max, W]
        asked = gather_steps(in_order, t - L - 1, where=is_answer)  # [B, T, W]
        weight = is_answer / (W * M)  # [B, T]
        return Episodes(obs, asked, weight.float(), length + 1 + outputs)
