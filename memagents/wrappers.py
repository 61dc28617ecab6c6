"""Observation wrappers chosen in config (``env.wrapper``), by registry key.

MiniGrid's observations are ``Dict(image=Box(0, 255, (7, 7, 3), uint8), direction=Discrete(4),
mission=MissionSpace)``: SB3's ``DummyVecEnv`` cannot stack the mission strings, and the image
is not an image but a grid of *categorical codes* (object, colour, state) that a 0-255 CNN would
misread. :class:`MiniGridCodes` keeps exactly those codes, and the direction, as integers in one
flat ``Box``; ``memagents.sb3.extractors.MiniGridExtractor`` embeds them.

This module imports gymnasium, minigrid and numpy only (no SB3).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: highest code of each grid channel, (object, colour, state), as ``minigrid.core.constants``
#: defines them: 11 object types (``unseen`` .. ``agent``), 6 colours, 3 door states.
GRID_CODE_MAX = (10, 5, 2)
#: highest direction code (0 = right, 1 = down, 2 = left, 3 = up).
DIRECTION_MAX = 3


class MiniGridCodes(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """MiniGrid's partial view and direction as integer codes in one flat ``Box``.

    ## Observation Space
    ``Box(0, high, (V * V * 3 + 1,), uint8)`` with ``V`` the agent's view size (7 by default):

    | index | meaning |
    |---|---|
    | ``0 .. 3 V V - 1`` | ``obs["image"]`` flattened in its ``[x, y, channel]`` order |
    | ``3 V V`` | ``obs["direction"]`` (0..3) |

    Entry ``3 (V x + y) + c`` is ``image[x, y, c]``: channel 0 is the object code (0..10),
    1 the colour code (0..5), 2 the state code (0..2).

    ``high`` is ``(10, 5, 2)`` repeated per cell, then 3: the extractor reads its vocabulary
    sizes from it. The mission string is dropped (constant in the Memory and RedBlueDoors
    tasks). A flat 1-D ``Box`` is not an image to SB3: it is not divided by 255.

    ## Info
    ``info["is_success"]`` is added on the last step of an episode: True when it terminated with
    a positive reward (MiniGrid rewards only success), False on failure or truncation.

    :param env: a MiniGrid env (``Dict`` observations with ``image`` and ``direction``).
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not (
            isinstance(space, spaces.Dict)
            and "image" in space.spaces
            and "direction" in space.spaces
            and len(space["image"].shape) == 3
            and space["image"].shape[2] == 3
        ):
            raise ValueError(
                f"MiniGridCodes needs MiniGrid's Dict observations with 'image' (V, V, 3) and "
                f"'direction'; got {space}"
            )
        self.view_shape: tuple[int, int, int] = tuple(space["image"].shape)  # (V, V, 3)
        cells = self.view_shape[0] * self.view_shape[1]
        high = np.array([*GRID_CODE_MAX * cells, DIRECTION_MAX], dtype=np.uint8)
        self.observation_space = spaces.Box(
            low=np.zeros_like(high), high=high, shape=high.shape, dtype=np.uint8
        )

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        """``{"image": [V, V, 3], "direction": int, ...}`` -> ``[3 V V + 1]`` uint8 codes."""
        image = np.asarray(observation["image"], dtype=np.uint8).reshape(-1)  # [V * V * 3]
        return np.append(image, np.uint8(observation["direction"]))

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info = {**info, "is_success": bool(terminated and reward > 0)}
        return self.observation(obs), reward, terminated, truncated, info


class ActionSubset(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Only some actions of a ``Discrete`` action space, renumbered ``0..k-1``.

    Action ``i`` of the wrapped env is action ``actions[i]`` of the inner one. MiniGrid's Memory
    tasks need only ``[0, 1, 2]`` (turn left, turn right, forward); the other four (pick up, drop,
    toggle, done) change nothing there but dilute exploration (MarcoMeter's recurrent PPO trains
    MiniGrid on these three).

    :param env: an env with a ``Discrete(n)`` action space.
    :param actions: distinct inner action ids, each in ``start .. start + n - 1``.
    """

    def __init__(self, env: gym.Env, actions: list[int]) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, actions=list(actions))
        gym.ActionWrapper.__init__(self, env)
        space = env.action_space
        if not isinstance(space, spaces.Discrete):
            raise ValueError(f"env.actions needs a Discrete action space; got {space}")
        lo, hi = int(space.start), int(space.start + space.n - 1)
        bad = [a for a in actions if not lo <= int(a) <= hi]
        if not actions or bad or len(set(actions)) != len(actions):
            raise ValueError(
                f"env.actions {list(actions)}: expected distinct action ids in {lo}..{hi} "
                f"(the env's {space})"
            )
        self.actions = np.asarray(actions, dtype=np.int64)
        self.action_space = spaces.Discrete(len(actions))

    def action(self, action: Any) -> int:
        """Outer action ``i`` (0..k-1) -> inner action ``actions[i]``."""
        return int(self.actions[int(action)])


#: ``env.wrapper`` registry key -> observation wrapper (``None``: the env as it is).
WRAPPERS: dict[str, type[gym.Wrapper] | None] = {
    "none": None,
    "minigrid": MiniGridCodes,
}


def default_wrapper(env_id: str) -> str:
    """The wrapper ``env.wrapper: auto`` picks: ``minigrid`` for ``MiniGrid-*`` and ``BabyAI-*``
    ids (Dict observations of grid codes), ``none`` otherwise."""
    return "minigrid" if env_id.startswith(("MiniGrid-", "BabyAI-")) else "none"


def wrap(env: gym.Env, name: str) -> gym.Env:
    """Apply the observation wrapper registered as ``name`` (``none``: return ``env`` itself)."""
    if name not in WRAPPERS:
        raise ValueError(f"unknown wrapper {name!r}; available: {', '.join(WRAPPERS)}")
    cls = WRAPPERS[name]
    return env if cls is None else cls(env)
