"""Adding (pytorch-dnc's adding task), as an RL episode."""

from __future__ import annotations

from fractions import Fraction

from torch import Tensor

from envs.numbers import NumberSequenceEnv, NumbersProblem


class AddingEnv(NumberSequenceEnv):
    """Add up a sequence of one-hot numbers.

    ## Description
    pytorch-dnc's adding task posed as an RL episode. The agent is shown `L` numbers (`L`
    uniform in [`min_length`, `max_length`]), each uniform in [0, `num_values`) and shown
    one-hot, one per step. On the following answer step (pytorch-dnc's end marker) it must emit
    their sum. pytorch-dnc regresses the sum; here the sum is a `Discrete` action, scored exactly.

    ## Observation Space
    `Box(0, 1, (num_values + 1,), float32)`:

    | channel | meaning |
    |---|---|
    | `0 .. num_values - 1` | number `j`, one-hot, on input step `j` (steps `0 .. L - 1`) |
    | `num_values` | 1 on the answer step `L`; 0 otherwise |

    ## Action Space
    `Discrete(length_limit * (num_values - 1) + 1)`: the sum named (any sum of up to
    `length_limit` numbers fits). Only the action on the answer step is scored; actions on input
    steps must still be in the space.

    ## Rewards
    1 on the answer step if the action is the sum, else 0; 0 on input steps. A perfect episode
    returns exactly 1.

    ## Episode End
    Terminated after the answer step: `L + 1` steps (at most `max_length + 1`). Never truncated.
    The final observation is all zeros. `info["is_success"]` on the last step tells whether the
    sum was right.

    ## Arguments
    ```python
    gymnasium.make("memagents/Adding-v0", num_values=5, min_length=2, max_length=6,
                   length_limit=None)
    ```
    - `num_values` (V, an integer >= 2; fixed): numbers are in [0, V). pytorch-dnc's default
      input size 6 is V = 5 plus its end marker.
    - `min_length`, `max_length` (integers, 1 <= min <= max <= `length_limit`; difficulty
      knobs): the range of `L`. Change them between episodes with
      `env.unwrapped.set_difficulty(max_length=...)`, also beyond the training range.
    - `length_limit` (an integer >= `max_length`, default `2 * max_length`, pytorch-dnc's
      generalisation range; fixed): the longest `max_length` ever allowed; it sizes the action
      space.

    Variants: `memagents/Adding-Easy-v0` (V = 3, L 2..4), `memagents/Adding-Hard-v0`
    (V = 10, L 5..20).

    ## Memoryless ceiling
    The probability of the most likely sum, 0.0952 by default (the sum 7, computed exactly by
    `memoryless_ceiling()` for any parameters). The answer step always shows the same
    observation, so a policy that sees only the current observation can do no better than always
    naming the most likely sum.

    ## Version History
    - v0: initial version.
    """

    def __init__(
        self,
        num_values: int = 5,
        min_length: int = 2,
        max_length: int = 6,
        length_limit: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(num_values, min_length, max_length, length_limit, render_mode)

    def num_answers(self) -> int:
        return self.length_limit * (self.num_values - 1) + 1

    def answer(self, problem: NumbersProblem) -> Tensor:
        return (problem.numbers * self.valid(problem)).sum(dim=1)  # [B]

    @classmethod
    def answer_distribution(cls, num_values: int, length: int) -> list[Fraction]:
        ways = [1]  # ways[s]: number of sequences of the numbers so far that sum to s
        for _ in range(length):
            longer = [0] * (len(ways) + num_values - 1)
            for s, count in enumerate(ways):
                for v in range(num_values):
                    longer[s + v] += count
            ways = longer
        return [Fraction(count, num_values**length) for count in ways]
