"""Algorithmic memory tasks as Gymnasium episodes, and a batched torch vector env for devices.

Importing ``envs`` registers every task under the ``memagents/`` namespace::

    import gymnasium as gym
    import envs

    env = gym.make("memagents/Copy-v0")                      # one episode at a time (numpy)
    venv = envs.make_vec("memagents/Copy-v0", num_envs=1024)  # all episodes as tensors

``envs`` depends on gymnasium, numpy and torch only. See each env class's docstring for its
observation and action spaces, rewards, knobs and memoryless ceiling.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.adding import AddingEnv
from envs.argmax import ArgmaxEnv
from envs.associative_recall import AssociativeRecallEnv, AssociativeRecallProblem
from envs.base import AlgorithmicEnv, Episodes, InvalidActionError, score
from envs.cartpole_novel import MaskVelocity, make_cartpole_novel
from envs.copy import CopyEnv, CopyProblem
from envs.numbers import NumbersProblem
from envs.priority_sort import PrioritySortEnv, PrioritySortProblem
from envs.recall import RecallEnv, RecallProblem
from envs.repeat_copy import RepeatCopyEnv, RepeatCopyProblem
from envs.vector import BatchedEnv, BatchedStep, make_vec

NAMESPACE = "memagents"

#: task name -> (env class, {variant suffix: constructor kwargs}); "" is the default variant.
TASKS: dict[str, tuple[type[AlgorithmicEnv], dict[str, dict[str, Any]]]] = {
    "Recall": (
        RecallEnv,
        {
            "": {},
            "Easy": {"num_symbols": 2, "min_delay": 1, "max_delay": 3},
            "Hard": {"num_symbols": 8, "min_delay": 10, "max_delay": 40},
        },
    ),
    "Copy": (
        CopyEnv,
        {
            "": {},
            "Easy": {"bits": 4, "min_length": 1, "max_length": 5},
            "L20": {"bits": 8, "min_length": 1, "max_length": 20},
            "Hard": {"bits": 8, "min_length": 10, "max_length": 20},
        },
    ),
    "RepeatCopy": (
        RepeatCopyEnv,
        {
            "": {},
            "Easy": {
                "bits": 4,
                "min_length": 1,
                "max_length": 3,
                "min_repeats": 1,
                "max_repeats": 3,
            },
            "Hard": {
                "bits": 8,
                "min_length": 1,
                "max_length": 10,
                "min_repeats": 1,
                "max_repeats": 10,
            },
        },
    ),
    "AssociativeRecall": (
        AssociativeRecallEnv,
        {
            "": {},
            "Easy": {"bits": 4, "item_length": 1, "min_items": 2, "max_items": 4},
            "Hard": {"bits": 6, "item_length": 3, "min_items": 6, "max_items": 12},
        },
    ),
    "PrioritySort": (
        PrioritySortEnv,
        {
            "": {},
            "Easy": {"bits": 4, "min_length": 2, "max_length": 4},
            "Hard": {"bits": 8, "min_length": 20, "max_length": 20, "num_outputs": 16},
        },
    ),
    "Adding": (
        AddingEnv,
        {
            "": {},
            "Easy": {"num_values": 3, "min_length": 2, "max_length": 4},
            "Hard": {"num_values": 10, "min_length": 5, "max_length": 20},
        },
    ),
    "Argmax": (
        ArgmaxEnv,
        {
            "": {},
            "Easy": {"num_values": 5, "min_length": 2, "max_length": 4},
            "Hard": {"num_values": 10, "min_length": 5, "max_length": 20},
        },
    ),
}


def env_id(task: str, variant: str = "") -> str:
    """The registered id of a task variant, e.g. ``env_id("Copy", "L20") == "memagents/Copy-L20-v0"``."""
    return f"{NAMESPACE}/{task}-{variant}-v0" if variant else f"{NAMESPACE}/{task}-v0"


#: every registered id, default variants first.
ENV_IDS: list[str] = [env_id(task) for task in TASKS] + [
    env_id(task, variant)
    for task, (_, variants) in TASKS.items()
    for variant in variants
    if variant
]


#: classic-control ids outside the ``memagents/`` namespace, under the names RL Zoo gives them
#: (``CartPoleNoVel-v1``: CartPole-v1 with the velocities zeroed, see ``envs.cartpole_novel``);
#: kept out of :data:`ENV_IDS`, which lists the algorithmic tasks.
CONTROL_IDS: list[str] = ["CartPoleNoVel-v1"]


def _register() -> None:
    for task, (cls, variants) in TASKS.items():
        for variant, kwargs in variants.items():
            if env_id(task, variant) not in gym.registry:
                gym.register(
                    id=env_id(task, variant),
                    entry_point=f"{cls.__module__}:{cls.__name__}",
                    kwargs=dict(kwargs),
                    disable_env_checker=False,
                )
    if "CartPoleNoVel-v1" not in gym.registry:  # rl_zoo3 registers the same env under this id
        gym.register(id="CartPoleNoVel-v1", entry_point="envs.cartpole_novel:make_cartpole_novel")


_register()

__all__ = [
    "CONTROL_IDS",
    "ENV_IDS",
    "NAMESPACE",
    "TASKS",
    "AddingEnv",
    "AlgorithmicEnv",
    "ArgmaxEnv",
    "AssociativeRecallEnv",
    "AssociativeRecallProblem",
    "BatchedEnv",
    "BatchedStep",
    "CopyEnv",
    "CopyProblem",
    "Episodes",
    "InvalidActionError",
    "MaskVelocity",
    "NumbersProblem",
    "PrioritySortEnv",
    "PrioritySortProblem",
    "RecallEnv",
    "RecallProblem",
    "RepeatCopyEnv",
    "RepeatCopyProblem",
    "env_id",
    "make_cartpole_novel",
    "make_vec",
    "score",
]
