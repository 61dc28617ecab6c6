"""Argmax (pytorch-dnc's argmax task), as an RL episode."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from envs.numbers import NumberSequenceEnv, NumbersProblem


class ArgmaxEnv(NumberSequenceEnv):
    """Name the position of the largest number of a sequence.

    ## Description
    pytorch-dnc's argmax task posed as an RL episode. The agent is shown `L` numbers (`L`
    uniform in [`min_length`, `max_length`]), each uniform in [0, `num_values`) and shown
    one-hot, one per step. On the following answer step (pytorch-dnc's end marker) it must name
    the position (0-based step index) of the largest number; if the largest value occurs more
    than once, its first position is the answer.

    ## Observation Space
    `Box(0, 1, (num_values + 1,), float32)`:

    | channel | meaning |
    |---|---|
    | `0 .. num_values - 1` | number `j`, one-hot, on input step `j` (steps `0 .. L - 1`) |
    | `num_values` | 1 on the answer step `L`; 0 otherwise |

    ## Action Space
    `Discrete(length_limit)`: the position named. Only the action on the answer step is scored;
    actions on input steps must still be in the space.

    ## Rewards
    1 on the answer step if the action is the position of the largest number, else 0; 0 on
    input steps. A perfect episode returns exactly 1.

    ## Episode End
    Terminated after the answer step: `L + 1` steps (at most `max_length + 1`). Never truncated.
    The final observation is all zeros. `info["is_success"]` on the last step tells whether the
    position was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/Argmax-v0", num_values=10, min_length=2, max_length=6,
                   length_limit=None)
    ```
    - `num_values` (V, an integer >= 2; fixed): numbers are in [0, V).
    - `min_length`, `max_length` (integers, 1 <= min <= max <= `length_limit`; difficulty
      knobs): the range of `L`. Change them between episodes with
      `env.unwrapped.set_difficulty(max_length=...)`, also beyond the training range.
    - `length_limit` (an integer >= `max_length`, default `2 * max_length`, pytorch-dnc's
      generalisation range; fixed): the longest `max_length` ever allowed; it sizes the action
      space.

    Variants: `memagents/Argmax-Easy-v0` (V = 5, L 2..4), `memagents/Argmax-Hard-v0`
    (V = 10, L 5..20).

    ## Memoryless ceiling
    The probability that the first number is the (first) largest, 0.3423 by default (computed
    exactly by `memoryless_ceiling()` for any parameters): the answer step always shows the same
    observation, so a policy that sees only the current observation can do no better than always
    naming the most likely position, which is 0.

    ## Version History
    - v0: initial version.
    """

    def __init__(
        self,
        num_values: int = 10,
        min_length: int = 2,
        max_length: int = 6,
        length_limit: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(num_values, min_length, max_length, length_limit, render_mode)

    def num_answers(self) -> int:
        return self.length_limit

    def answer(self, problem: NumbersProblem) -> Tensor:
        keys = torch.where(self.valid(problem), problem.numbers, -1)  # padding never wins
        return keys.argmax(dim=1)  # [B]; argmax returns the first maximal index

    @classmethod
    def answer_distribution(cls, num_values: int, length: int) -> list[Fraction]:
        # position i wins with largest value m: the numbers before it are < m, those after <= m
        V = num_values
        return [
            sum(
                (
                    Fraction(m, V) ** i * Fraction(m + 1, V) ** (length - 1 - i) / V
                    for m in range(V)
                ),
                Fraction(0),
            )
            for i in range(length)
        ]
