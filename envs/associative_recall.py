"""Associative recall (Graves et al. 2014, Neural Turing Machines, section 4.3), as an RL episode."""

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
    random_lengths,
    step_table,
)


class AssociativeRecallProblem(NamedTuple):
    """The contents of ``B`` AssociativeRecall episodes."""

    items: Tensor  # [B, N_max, K, W] uint8 in {0, 1}: K vectors per item; items >= num_items are 0
    num_items: Tensor  # [B] int64 >= 2: N, the number of items shown
    query: Tensor  # [B] int64 in [0, N - 2]: index of the item shown again as the query


def answer_item(problem: AssociativeRecallProblem) -> Tensor:
    """``[B]`` index of the item to emit: the one after the query's first occurrence.

    Items are random, so an item can occur twice; the answer is then the item that follows the
    first occurrence of the query's contents, which is never after the query itself.
    """
    items, num_items, query = problem
    B, N_max = items.shape[:2]
    rows = torch.arange(B, device=items.device)
    same = (items == items[rows, query][:, None]).flatten(2).all(-1)  # [B, N_max]
    same &= torch.arange(N_max, device=items.device) < num_items[:, None]
    return same.int().argmax(dim=1) + 1  # argmax returns the first maximal index


class AssociativeRecallEnv(AlgorithmicEnv):
    """Given a query item, emit the item that followed it in a list.

    ## Description
    The NTM associative-recall task (Graves et al. 2014) posed as an RL episode. The agent is
    shown `N` items (`N` uniform in [`min_items`, `max_items`]), each made of `item_length`
    random `bits`-wide binary vectors shown one per step and preceded by an item-delimiter step.
    Then a query-delimiter step and a query: a copy of one of the first `N - 1` items (uniform).
    Then, on `item_length` answer steps, the agent must emit the item that came right after the
    query in the list, one vector per step. If the query's contents occur twice, the item after
    the first occurrence is the answer.

    ## Observation Space
    `Box(0, 1, (bits + 3,), float32)`: Copy's layout plus one channel for the query delimiter.

    | channel | meaning |
    |---|---|
    | `0 .. bits - 1` | the item vectors, and then the query's vectors; 0 otherwise |
    | `bits` | 1 on the item-delimiter step before each item; 0 otherwise |
    | `bits + 1` | 1 on every answer step (the last `item_length` steps); 0 otherwise |
    | `bits + 2` | 1 on the query-delimiter step before the query; 0 otherwise |

    ## Action Space
    `MultiBinary(bits)`. The action on answer step `k` is scored against vector `k` of the
    answer item; actions on the other steps are ignored (but must be in the space).

    ## Rewards
    On each answer step: (number of bits right) / (`bits` * `item_length`); 0 elsewhere. A
    perfect episode returns 1.0 (up to float32 rounding of each reward).

    ## Episode End
    Terminated after the last answer step: `(N + 1) (item_length + 1) + item_length` steps (at
    most `max_episode_length`). Never truncated. The final observation is all zeros.
    `info["is_success"]` on the last step tells whether every bit was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/AssociativeRecall-v0", bits=6, item_length=3,
                   min_items=2, max_items=6)
    ```
    - `bits` (W, an integer >= 1; fixed): width of each vector.
    - `item_length` (K, an integer >= 1; difficulty knob): vectors per item.
    - `min_items`, `max_items` (integers, 2 <= min <= max; difficulty knobs): range of `N`.

    The defaults are the NTM paper's. Change the knobs between episodes with
    `env.unwrapped.set_difficulty(...)`, also beyond the training range. Variants:
    `memagents/AssociativeRecall-Easy-v0` (4 bits, 1 vector per item, 2..4 items),
    `memagents/AssociativeRecall-Hard-v0` (6 bits, 3 vectors per item, 6..12 items).

    ## Memoryless ceiling
    0.5. Every answer step shows the same observation, and each bit of the answer item is a
    fair coin independent of it (flipping a bit in every item leaves the problem's distribution
    and the answer's position unchanged), so any policy that sees only the current observation
    gets each bit right with probability exactly 1/2.

    ## Version History
    - v0: initial version.
    """

    Problem = AssociativeRecallProblem
    bits = Fixed()
    item_length = Knob()
    min_items = Knob()
    max_items = Knob()
    _knobs = ("item_length", "min_items", "max_items")

    def __init__(
        self,
        bits: int = 6,
        item_length: int = 3,
        min_items: int = 2,
        max_items: int = 6,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            bits=bits,
            item_length=item_length,
            min_items=min_items,
            max_items=max_items,
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.bits + 3,), np.float32)
        self.action_space = spaces.MultiBinary(self.bits)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for name, low in [("bits", 1), ("item_length", 1), ("min_items", 2), ("max_items", 2)]:
            params[name] = check_int(name, params[name], low)
        check_order(params, "min_items", "max_items")
        return params

    @property
    def max_episode_length(self) -> int:
        return (self.max_items + 1) * (self.item_length + 1) + self.item_length

    def memoryless_ceiling(self) -> float:
        return 0.5

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> AssociativeRecallProblem:
        N_max, K, W = self.max_items, self.item_length, self.bits
        num_items = random_lengths(n, self.min_items, N_max, generator, device)
        items = torch.randint(
            0, 2, (n, N_max, K, W), generator=generator, device=device, dtype=torch.uint8
        )
        items *= (torch.arange(N_max, device=device) < num_items[:, None])[..., None, None]
        # query uniform in [0, N - 2]: floor(u (N - 1)), clamped against rounding up
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        query = torch.minimum((u * (num_items - 1)).long(), num_items - 2)
        return AssociativeRecallProblem(items, num_items, query)

    def layout(self, problem: AssociativeRecallProblem) -> Episodes:
        items, num_items, query = problem
        B, N_max, K, W = items.shape
        flat = items.reshape(B, N_max * K, W)  # vector k of item i is row i K + k
        T = (N_max + 1) * (K + 1) + K + 1  # the longest episode + the final observation
        t = torch.arange(T, device=items.device)[None, :]  # [1, T]
        N, q = num_items[:, None], query[:, None]  # [B, 1]
        # rows of the step table: item vectors 0 .. N_max K - 1, blank, item delimiter, answer
        # flag, query delimiter
        table = step_table(flat, W + 3, markers=(W, W + 1, W + 2))  # [B, N_max K + 4, W + 3]
        BLANK, DELIMITER, ANSWER, QUERY = (N_max * K + i for i in range(4))
        # items phase: N blocks of K + 1 steps, [delimiter, vector 0, ..., vector K - 1]
        in_items = t < N * (K + 1)  # [B, T]
        block, offset = t // (K + 1), t % (K + 1)  # [1, T]
        item_row = torch.where(offset == 0, DELIMITER, block * K + offset - 1)  # [1, T]
        # query phase: [query delimiter, query vector 0, ..., K - 1]
        q_start = N * (K + 1)  # [B, 1]
        in_query = (t >= q_start) & (t < q_start + K + 1)  # [B, T]
        query_row = torch.where(t == q_start, QUERY, q * K + (t - q_start) - 1)  # [B, T]
        # answer phase: K steps
        a_start = q_start + K + 1
        is_answer = (t >= a_start) & (t < a_start + K)  # [B, T]
        answer_row = answer_item(problem)[:, None] * K + (t - a_start)  # [B, T]

        shown = torch.where(in_items, item_row, torch.where(in_query, query_row, BLANK))
        shown = torch.where(is_answer, ANSWER, shown)  # [B, T]: table row shown at step t
        obs = gather_steps(table, shown)  # [B, T, W + 3]
        asked = gather_steps(flat.int(), answer_row, where=is_answer)  # [B, T, W]
        weight = is_answer / (W * K)  # [B, T]
        length = (num_items + 1) * (K + 1) + K
        return Episodes(obs, asked, weight.float(), length)
