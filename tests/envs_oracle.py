"""Test helpers for ``envs``: a perfect-memory oracle, written from the env docstrings only.

The oracle sees nothing but the observations of the current episode and keeps all of them (a
perfect memory); it re-derives every answer from the documented observation layout, so it is an
independent check of the tasks' ``layout`` code, not a copy of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import envs


class Oracle:
    """Plays one episode of ``env``'s task perfectly from its observations.

    :param env: the (unwrapped) single env, for its fixed parameters and spaces.
    """

    def __init__(self, env: envs.AlgorithmicEnv) -> None:
        self.env = env
        self.history: list[np.ndarray] = []

    def reset(self) -> None:
        self.history = []

    def act(self, obs: np.ndarray) -> Any:
        """The action for the step that shows ``obs`` (a valid no-op off answer steps)."""
        self.history.append(np.asarray(obs, dtype=np.float64))
        answer = getattr(self, "_" + type(self.env).__name__)()
        if answer is None:
            return self.null_action()
        return answer

    def null_action(self) -> Any:
        space = self.env.action_space
        return 0 if isinstance(space, envs.base.spaces.Discrete) else np.zeros(space.n, np.int8)

    # -- one method per task: returns the answer on answer steps, else None ---------------------
    def _RecallEnv(self) -> Any:
        S = self.env.num_symbols
        if self.history[-1][S] != 1:
            return None
        return int(np.argmax(self.history[0][:S]))

    def _inputs_until(self, flag_channel: int) -> list[np.ndarray]:
        """Observations before the first one with ``flag_channel`` set."""
        inputs = []
        for obs in self.history:
            if obs[flag_channel] == 1:
                break
            inputs.append(obs)
        return inputs

    def _answer_index(self, answer_channel: int) -> int | None:
        """Index of the current answer step (0 = first), or None off answer steps."""
        if self.history[-1][answer_channel] != 1:
            return None
        return sum(int(obs[answer_channel] == 1) for obs in self.history) - 1

    def _CopyEnv(self) -> Any:
        W = self.env.bits
        k = self._answer_index(W + 1)
        if k is None:
            return None
        return self._inputs_until(W)[k][:W].astype(np.int8)

    def _RepeatCopyEnv(self) -> Any:
        W = self.env.bits
        k = self._answer_index(W + 1)
        if k is None:
            return None
        inputs = self._inputs_until(W)
        return inputs[k % len(inputs)][:W].astype(np.int8)

    def _AssociativeRecallEnv(self) -> Any:
        W = self.env.bits
        k = self._answer_index(W + 1)
        if k is None:
            return None
        items: list[list[tuple[int, ...]]] = []
        query: list[tuple[int, ...]] | None = None
        for obs in self.history:
            if obs[W] == 1:  # item delimiter: a new item starts
                items.append([])
            elif obs[W + 2] == 1:  # query delimiter: the query follows
                query = []
            elif obs[W + 1] == 1:  # answer phase
                break
            elif query is not None:
                query.append(tuple(obs[:W].astype(int)))
            else:
                items[-1].append(tuple(obs[:W].astype(int)))
        first = next(i for i, item in enumerate(items) if item == query)
        return np.array(items[first + 1][k], dtype=np.int8)

    def _PrioritySortEnv(self) -> Any:
        W = self.env.bits
        k = self._answer_index(W + 1)
        if k is None:
            return None
        inputs = self._inputs_until(W)
        by_priority = sorted(inputs, key=lambda obs: -obs[W + 2])  # sorted() is stable
        return by_priority[k][:W].astype(np.int8)

    def _numbers(self) -> list[int] | None:
        V = self.env.num_values
        if self.history[-1][V] != 1:
            return None
        return [int(np.argmax(obs[:V])) for obs in self.history[:-1]]

    def _AddingEnv(self) -> Any:
        numbers = self._numbers()
        return None if numbers is None else sum(numbers)

    def _ArgmaxEnv(self) -> Any:
        numbers = self._numbers()
        return None if numbers is None else numbers.index(max(numbers))


def expected_length(env: envs.AlgorithmicEnv, history: list[np.ndarray]) -> int:
    """The documented episode length, from the contents the oracle saw (the whole episode)."""
    name = type(env).__name__
    if name == "RecallEnv":
        return len(history)  # checked separately: cue on step 0, query last
    if name in ("CopyEnv", "RepeatCopyEnv", "PrioritySortEnv"):
        W = env.bits
        L = next(i for i, obs in enumerate(history) if obs[W] == 1)
        if name == "CopyEnv":
            return 2 * L + 1
        if name == "RepeatCopyEnv":
            R = sum(int(obs[W] == 1) for obs in history)
            return L + R + R * L
        M = L if env.num_outputs is None else min(env.num_outputs, L)
        return L + 1 + M
    if name == "AssociativeRecallEnv":
        N = sum(int(obs[env.bits] == 1) for obs in history)
        K = env.item_length
        return (N + 1) * (K + 1) + K
    L = next(i for i, obs in enumerate(history) if obs[env.num_values] == 1)
    return L + 1


def best_memoryless_action(env: envs.AlgorithmicEnv) -> Any:
    """A constant action that reaches the memoryless ceiling (its mode, found by brute force for
    Adding; 0 / all zeros elsewhere, which the docstrings' arguments show is optimal)."""
    if isinstance(env, envs.AddingEnv):
        return brute_force_mode(env)[0]
    if isinstance(env.action_space, envs.base.spaces.Discrete):
        return 0
    return np.zeros(env.action_space.n, np.int8)


def brute_force_mode(env: envs.AlgorithmicEnv) -> tuple[int, float]:
    """(most likely answer, its probability) of Adding or Argmax by enumerating every sequence."""
    import itertools
    from fractions import Fraction

    lengths = range(env.min_length, env.max_length + 1)
    probability: dict[int, Fraction] = {}
    for L in lengths:
        for numbers in itertools.product(range(env.num_values), repeat=L):
            answer = (
                sum(numbers) if isinstance(env, envs.AddingEnv) else numbers.index(max(numbers))
            )
            p = Fraction(1, env.num_values**L * len(lengths))
            probability[answer] = probability.get(answer, Fraction(0)) + p
    answer = max(probability, key=probability.__getitem__)
    return answer, float(probability[answer])
