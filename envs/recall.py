"""Recall: remember one symbol over a delay. The quickest memory test."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.base import AlgorithmicEnv, Episodes, Fixed, Knob, check_int, check_order


class RecallProblem(NamedTuple):
    """The contents of ``B`` Recall episodes."""

    cue: Tensor  # [B] int64 in [0, num_symbols): the symbol shown on the first step
    delay: Tensor  # [B] int64 >= 0: blank steps between the cue and the query


class RecallEnv(AlgorithmicEnv):
    """Recall a cue after a delay.

    ## Description
    On the first step a cue, one of `num_symbols` symbols, is shown one-hot. Then come `delay`
    blank steps, with `delay` drawn uniformly from [`min_delay`, `max_delay`], then one query
    step on which the action must name the cue. The agent must carry one symbol across the delay:
    the quickest memory test.

    ## Observation Space
    `Box(0, 1, (num_symbols + 1,), float32)`:

    | channel | meaning |
    |---|---|
    | `0 .. num_symbols - 1` | the one-hot cue on step 0; 0 on every other step |
    | `num_symbols` | 1 on the query step (the last step); 0 otherwise |

    ## Action Space
    `Discrete(num_symbols)`: the symbol named. Only the action taken on the query step is scored;
    actions on the other steps must still be in the space.

    ## Rewards
    1 on the query step if the action is the cue, else 0; 0 on every other step. A perfect
    episode returns exactly 1.

    ## Episode End
    Terminated after the query step, i.e. after `delay + 2` steps (at most `max_delay + 2`,
    see `max_episode_length`). Never truncated. The final observation is all zeros.
    `info["is_success"]` on the last step tells whether the cue was named.

    ## Arguments
    ```python
    gymnasium.make("memagents/Recall-v0", num_symbols=4, min_delay=1, max_delay=6)
    ```
    - `num_symbols` (S, an integer >= 2; fixed): how many different cues there are.
    - `min_delay`, `max_delay` (integers, 0 <= `min_delay` <= `max_delay`; difficulty knobs):
      the range of the delay. Change them between episodes with
      `env.unwrapped.set_difficulty(max_delay=...)`, also beyond the training range.

    Variants: `memagents/Recall-Easy-v0` (S = 2, delay 1..3), `memagents/Recall-Hard-v0`
    (S = 8, delay 10..40).

    ## Memoryless ceiling
    `1 / num_symbols` (0.25 by default). The query step always shows the same observation,
    whatever the cue, and the cue is uniform over S symbols, so a policy that sees only the
    current observation names it with probability at most 1 / S.

    ## Version History
    - v0: initial version.
    """

    Problem = RecallProblem
    num_symbols = Fixed()
    min_delay = Knob()
    max_delay = Knob()
    _knobs = ("min_delay", "max_delay")

    def __init__(
        self,
        num_symbols: int = 4,
        min_delay: int = 1,
        max_delay: int = 6,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            render_mode=render_mode,
            num_symbols=num_symbols,
            min_delay=min_delay,
            max_delay=max_delay,
        )
        self.observation_space = spaces.Box(0.0, 1.0, (self.num_symbols + 1,), np.float32)
        self.action_space = spaces.Discrete(self.num_symbols)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        params["num_symbols"] = check_int("num_symbols", params["num_symbols"], 2)
        params["min_delay"] = check_int("min_delay", params["min_delay"], 0)
        params["max_delay"] = check_int("max_delay", params["max_delay"], 0)
        check_order(params, "min_delay", "max_delay")
        return params

    @property
    def max_episode_length(self) -> int:
        return self.max_delay + 2

    def memoryless_ceiling(self) -> float:
        return 1.0 / self.num_symbols

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> RecallProblem:
        cue = torch.randint(0, self.num_symbols, (n,), generator=generator, device=device)
        delay = torch.randint(
            self.min_delay, self.max_delay + 1, (n,), generator=generator, device=device
        )
        return RecallProblem(cue, delay)

    def layout(self, problem: RecallProblem) -> Episodes:
        cue, delay = problem
        S = self.num_symbols
        length = delay + 2  # [B]: cue, delay blanks, query
        T = int(length.max()) + 1  # + the final observation
        t = torch.arange(T, device=cue.device)[None, :]  # [1, T]
        is_query = t == (length - 1)[:, None]  # [B, T]
        one_hot = torch.arange(S, device=cue.device) == cue[:, None]  # [B, S]
        shows_cue = (t == 0)[..., None] & one_hot[:, None, :]  # [1, T, 1] & [B, 1, S] -> [B, T, S]
        obs = torch.cat([shows_cue, is_query[..., None]], dim=-1).float()  # [B, T, S + 1]
        target = (cue[:, None] * is_query)[..., None].int()  # [B, T, 1]
        return Episodes(obs, target, is_query.float(), length)
