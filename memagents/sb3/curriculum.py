"""A curriculum: raise an algorithmic task's difficulty when the agent succeeds at the current level.

As in pytorch-dnc's copy task (``curriculum_increment``, ``curriculum_freq``), a difficulty knob of
the task (``max_length`` of Copy, ``max_delay`` of Recall, ``max_items`` of AssociativeRecall, ...:
any key of ``env.unwrapped.difficulty``) grows by ``increment``; unlike pytorch-dnc it grows only
when the agent has earned it: every ``freq`` environment steps the success rate at the current
level is checked, and the level is raised when it is at least ``threshold``.

The success rate is measured either on the training episodes (the default: free, and stricter
than a deterministic evaluation since the policy samples its actions) or, with ``eval_env``, by
``eval_episodes`` deterministic episodes on that env. Training episodes count only if they started
at the current level: an episode under way when the level changes is not counted.

The knob is set with ``env_method("set_difficulty", knob=value)``, which SB3's ``DummyVecEnv`` (of
Monitor-wrapped single envs) and :class:`memagents.sb3.TorchVecEnv` both forward to the task; it
applies from each env's next episode. ``sync_envs`` (e.g. the evaluation env of a run) are kept at
the same level. The level is logged as ``curriculum/level`` (and the measured success as
``curriculum/success_rate``) at every rollout, and, with ``state_path``, saved as JSON so that a
resumed run continues at its level.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv


def knob_error(difficulty: dict[str, Any], knob: str) -> str | None:
    """Why ``knob`` cannot be a curriculum knob of a task with this ``difficulty``, or None."""
    if knob not in difficulty:
        allowed = ", ".join(difficulty) or "none (not an algorithmic memagents/ task)"
        return f"{knob!r} is not a difficulty knob of this task; allowed: {allowed}"
    value = difficulty[knob]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return f"{knob!r} is {value!r}; the curriculum raises integer knobs only"
    return None


def check_knob(env_id: str, env_kwargs: dict[str, Any], knob: str) -> str | None:
    """Why ``knob`` cannot be a curriculum knob of ``gym.make(env_id, **env_kwargs)``, or None
    (for config validation, before any training)."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the memagents/ ids)

    env = gym.make(env_id, **env_kwargs)
    try:
        difficulty = dict(getattr(env.unwrapped, "difficulty", {}))
    finally:
        env.close()
    return knob_error(difficulty, knob)


class CurriculumCallback(BaseCallback):
    """Raise a difficulty knob by ``increment`` whenever the success rate reaches ``threshold``.

    :param knob: the difficulty knob to raise (a key of the task's ``difficulty``, e.g.
        ``"max_length"``).
    :param increment: ``curriculum_increment``: added to the knob at each promotion (>= 1).
    :param freq: ``curriculum_freq``: environment steps (summed over envs) between checks.
    :param threshold: success rate in ``[0, 1]`` at the current level needed to be promoted.
    :param max_value: the knob is never raised beyond this (None: no limit).
    :param min_episodes: training episodes that must have finished at the current level since
        the last decided check before a check decides (ignored with ``eval_env``). The success
        rate is that of these recent episodes: each decided check starts a new count, so a level
        is judged by the policy as it is now, not by its first, unskilled episodes there (a
        count over the whole level lags far behind: on Copy at length 2 it read 0.39 when the
        last rollout's success was 0.92).
    :param eval_env: if given, the success rate is that of ``eval_episodes`` deterministic
        episodes on this ``VecEnv`` (kept at the current level) instead of the training episodes.
    :param eval_episodes: episodes per check with ``eval_env``.
    :param sync_envs: further ``VecEnv`` s kept at the current level (e.g. a run's evaluation env).
    :param state_path: JSON file holding ``{"level", "num_timesteps"}``, written at each
        promotion and read at the start of training (so a resumed run keeps its level).
    :param verbose: 1 prints every promotion.
    """

    def __init__(
        self,
        knob: str,
        increment: int = 1,
        freq: int = 10_000,
        threshold: float = 0.9,
        max_value: int | None = None,
        min_episodes: int = 20,
        eval_env: VecEnv | None = None,
        eval_episodes: int = 20,
        sync_envs: Sequence[VecEnv] = (),
        state_path: str | Path | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if isinstance(increment, bool) or not isinstance(increment, int) or increment < 1:
            raise ValueError(f"increment={increment!r} is invalid: must be an integer >= 1")
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"freq={freq!r} is invalid: must be an integer >= 1")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} is invalid: must be in [0, 1]")
        if min_episodes < 1 or eval_episodes < 1:
            raise ValueError("min_episodes and eval_episodes must be >= 1")
        self.knob = knob
        self.increment = increment
        self.freq = freq
        self.threshold = float(threshold)
        self.max_value = max_value
        self.min_episodes = min_episodes
        self.eval_env = eval_env
        self.eval_episodes = eval_episodes
        self.sync_envs = list(sync_envs)
        self.state_path = Path(state_path) if state_path is not None else None
        self.level: int = 0
        self.next_check = 0
        self.successes = 0  # of those episodes, the successful ones
        self.episodes = 0  # training episodes finished at this level since the last decided check
        self.last_success_rate = float("nan")
        self.stale = np.zeros(0, dtype=bool)  # [n_envs] episode under way started before a change
        self.history: list[tuple[int, int]] = []  # (num_timesteps, level) of every change

    @classmethod
    def from_config(cls, section: Any, **kwargs: Any) -> CurriculumCallback:
        """From a config ``curriculum:`` section (``knob``, ``increment``, ``freq``,
        ``threshold``, ``max_value`` (0: no limit), ``min_episodes``); ``kwargs`` add the envs
        and the state path."""
        return cls(
            knob=section.knob,
            increment=section.increment,
            freq=section.freq,
            threshold=section.threshold,
            max_value=section.max_value or None,
            min_episodes=section.min_episodes,
            **kwargs,
        )

    # -- levels ---------------------------------------------------------------------------------
    def _envs(self) -> list[VecEnv]:
        envs = [self.training_env, *self.sync_envs]
        if self.eval_env is not None:
            envs.append(self.eval_env)
        return envs

    def set_level(self, level: int) -> None:
        """Set the knob on every env (from each env's next episode) and restart the count."""
        for env in self._envs():
            env.env_method("set_difficulty", **{self.knob: int(level)})
        self.level = int(level)
        self.successes = self.episodes = 0
        self.stale[:] = True
        self.history.append((int(self.num_timesteps), self.level))
        if self.state_path is not None:
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps({"level": self.level, "num_timesteps": self.num_timesteps}))
            os.replace(tmp, self.state_path)

    def _init_callback(self) -> None:
        difficulty = self.training_env.get_attr("difficulty")[0]
        error = knob_error(difficulty, self.knob)
        if error:
            raise ValueError(f"curriculum knob: {error}")
        self.level = int(difficulty[self.knob])
        self.stale = np.zeros(self.training_env.num_envs, dtype=bool)

    def _on_training_start(self) -> None:
        if self.state_path is not None and self.state_path.is_file():
            saved = int(json.loads(self.state_path.read_text())["level"])
            if saved != self.level:
                self.set_level(saved)
        t = self.num_timesteps
        self.next_check = (t // self.freq + 1) * self.freq

    # -- measuring success ----------------------------------------------------------------------
    def _on_step(self) -> bool:
        dones = self.locals.get("dones")
        if isinstance(dones, torch.Tensor):  # the device collector: [B] bool tensors, no infos
            self._count_tensors(dones, self.locals["successes"])
        elif dones is not None and self.locals.get("infos") is not None:
            infos = self.locals["infos"]
            for i, done in enumerate(dones):
                if not done:
                    continue
                if self.stale[i]:  # started before the last change: not at this level
                    self.stale[i] = False
                    continue
                self.episodes += 1
                self.successes += int(bool(infos[i].get("is_success", False)))
        if self.num_timesteps >= self.next_check:
            self.next_check += self.freq
            self._check()
        return True

    def _count_tensors(self, dones: torch.Tensor, successes: torch.Tensor) -> None:
        """Count the finished episodes of a step as tensors on their device (no host sync;
        ``_check`` reads the counts)."""
        if not isinstance(self.stale, torch.Tensor):
            self.stale = torch.as_tensor(self.stale, device=dones.device)
        counted = dones & ~self.stale
        self.stale &= ~dones
        self.episodes = self.episodes + counted.sum()
        self.successes = self.successes + (counted & successes).sum()

    def _evaluate(self) -> float:
        from stable_baselines3.common.evaluation import evaluate_policy

        successes: list[float] = []

        def on_step(locals_: dict[str, Any], _globals: dict[str, Any]) -> None:
            if locals_["done"]:
                successes.append(float(bool(locals_["info"].get("is_success", False))))

        evaluate_policy(
            self.model,
            self.eval_env,
            n_eval_episodes=self.eval_episodes,
            deterministic=True,
            callback=on_step,
            warn=False,
        )
        return float(np.mean(successes)) if successes else 0.0

    def _check(self) -> None:
        if self.eval_env is not None:
            rate = self._evaluate()
        elif int(self.episodes) >= self.min_episodes:
            rate = float(self.successes) / int(self.episodes)
            self.successes = self.episodes = 0  # the next check judges the episodes after this
        else:
            return  # not enough episodes at this level since the last decided check
        self.last_success_rate = rate
        if rate < self.threshold:
            return
        if self.max_value is not None and self.level >= self.max_value:
            return
        new = self.level + self.increment
        if self.max_value is not None:
            new = min(new, self.max_value)
        if self.verbose:
            print(
                f"curriculum: {self.knob} {self.level} -> {new} at step {self.num_timesteps} "
                f"(success {rate:.2f})"
            )
        self.set_level(new)

    def _on_rollout_end(self) -> None:
        self.logger.record("curriculum/level", self.level)
        self.logger.record("curriculum/success_rate", self.last_success_rate)
