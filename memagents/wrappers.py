"""Observation wrappers chosen in config (``env.wrapper``), by registry key.

MiniGrid's observations are ``Dict(image=Box(0, 255, (7, 7, 3), uint8), direction=Discrete(4),
mission=MissionSpace)``: SB3's ``DummyVecEnv`` cannot stack the mission strings, and the image
is not an image but a grid of *categorical codes* (object, colour, state) that a 0-255 CNN would
misread. :class:`MiniGridCodes` keeps exactly those codes, and the direction, as integers in one
flat ``Box``; ``memagents.sb3.extractors.MiniGridExtractor`` embeds them. The mission string is
dropped only where it is constant or where the config says so (``env.mission``).

Other envs: SB3's preprocessing (``stable_baselines3.common.preprocessing.preprocess_obs``) takes
``Box``, ``Discrete``, ``MultiDiscrete`` and ``MultiBinary`` observations and a ``Dict`` of them
(one-hot encoding the discrete ones inside the policy), and ``MemoryPolicy`` does too (``Dict``
through SB3's ``CombinedExtractor``). It takes no ``Tuple``, no nesting, no ``Discrete`` with a
``start`` other than 0 (it one-hot encodes ``x`` as if ``start`` were 0) and no multi-dimensional
``MultiDiscrete``: :class:`FlatObservation` encodes all of these as one flat float ``Box``, and
``env.wrapper: auto`` picks it exactly where :func:`sb3_takes` says SB3 cannot take the space.

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
    sizes from it. A flat 1-D ``Box`` is not an image to SB3: it is not divided by 255.

    ## Mission
    The mission string is not encoded. With ``mission="auto"`` the wrapper accepts only envs
    whose mission cannot change (:func:`mission_is_constant`: MiniGrid's ``MissionSpace`` without
    placeholders, as in the Memory, DoorKey, Empty, LavaCrossing and RedBlueDoors tasks) and
    raises ``ValueError`` for the others (every ``BabyAI-*`` level; MiniGrid's Fetch, GoToDoor,
    GoToObject, KeyCorridor, PutNear, ObstructedMaze, ...), whose mission says what to do: an
    agent that cannot read it is left to guess. ``mission="drop"`` drops it anyway.

    ## Info
    ``info["is_success"]`` is added on the last step of an episode: True when it terminated with
    a positive reward (MiniGrid rewards only success), False on failure or truncation.

    :param env: a MiniGrid env (``Dict`` observations with ``image`` and ``direction``).
    :param mission: ``auto`` (refuse an env whose mission can vary) or ``drop`` (drop it anyway).
    """

    def __init__(self, env: gym.Env, mission: str = "auto") -> None:
        gym.utils.RecordConstructorArgs.__init__(self, mission=mission)
        gym.ObservationWrapper.__init__(self, env)
        if mission not in MISSION_OPTIONS:
            raise ValueError(
                f"env.mission: unknown option {mission!r}; allowed: {', '.join(MISSION_OPTIONS)}"
            )
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
        if mission == "auto" and "mission" in space.spaces:
            if not mission_is_constant(space["mission"]):
                env_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
                raise ValueError(
                    f"env.mission: the mission of {env_id} can vary between episodes (it says what "
                    "to do) and env.wrapper 'minigrid' encodes only the grid and direction; set "
                    "env.mission: drop to train without it"
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


#: ``env.mission`` values (see :class:`MiniGridCodes`).
MISSION_OPTIONS = ("auto", "drop")


def mission_is_constant(space: spaces.Space) -> bool:
    """Whether a MiniGrid mission space can produce only one mission: a plain ``MissionSpace``
    whose ``mission_func`` takes no placeholders. BabyAI's ``BabyAIMissionSpace`` subclass also
    has none but accepts any string (its levels write the mission themselves), so it is not."""
    from minigrid.core.mission import MissionSpace

    return type(space) is MissionSpace and space.ordered_placeholders is None


def sb3_takes(space: spaces.Space) -> bool:
    """Whether SB3's ``preprocess_obs`` (and so ``MemoryPolicy``) takes observations of ``space``
    as they are: a ``Box``; a ``Discrete`` or 1-D ``MultiDiscrete`` starting at 0; a
    ``MultiBinary``; or a ``Dict`` of these (not nested)."""
    if isinstance(space, spaces.Dict):
        return all(
            _sb3_takes_leaf(s) and not isinstance(s, spaces.Dict) for s in space.spaces.values()
        )
    return _sb3_takes_leaf(space)


def _sb3_takes_leaf(space: spaces.Space) -> bool:
    if isinstance(space, (spaces.Box, spaces.MultiBinary)):
        return True
    if isinstance(space, spaces.Discrete):
        return int(space.start) == 0
    if isinstance(space, spaces.MultiDiscrete):
        return space.nvec.ndim == 1 and not np.any(space.start)
    return False


class FlatObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Any nesting of ``Tuple``, ``Dict``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary`` and
    ``Box`` observations as one flat ``float32`` vector, discrete values one-hot encoded.

    ## Observation Space
    ``Box(low, high, (D,), float32)``: the leaves of the space in order (``Tuple`` by position,
    ``Dict`` in its key order, as ``gymnasium.spaces.flatten`` walks them), each encoded as

    | leaf | entries | values |
    |---|---|---|
    | ``Box(shape)`` | ``prod(shape)`` | the values in C order, bounds kept (no rescaling) |
    | ``Discrete(n, start)`` | ``n`` | one-hot of ``x - start`` |
    | ``MultiDiscrete(nvec, start)`` | ``sum(nvec)`` | one-hot of ``x[i] - start[i]`` per entry |
    | ``MultiBinary(n)`` | ``prod(n)`` | the bits as 0.0 / 1.0 |

    A ``MultiDiscrete`` gives each entry ``i`` (C order) its own block of ``nvec[i]`` entries.

    e.g. POPGym's Autoencode ``Tuple(Discrete(2), Discrete(4))``: ``(1, 2)`` -> ``[0, 1, 0, 0, 1,
    0]``. Other leaves (``Text``, MiniGrid's mission, ``Sequence``, ``Graph``) have no fixed-size
    encoding: the constructor raises ``ValueError`` naming the leaf.

    :param env: an env with an observation space of the leaves above.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        _check_leaves(env.observation_space, ())  # a clear error before gymnasium's generic one
        # the encoding is gymnasium's own (spaces.flatten), as float32 for the policy
        flat = spaces.flatten_space(env.observation_space)
        self.observation_space = spaces.Box(
            low=flat.low.astype(np.float32), high=flat.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation: Any) -> np.ndarray:
        """A (nested) observation -> ``[D]`` float32 (see the class docstring for the layout)."""
        flat = spaces.flatten(self.env.observation_space, observation)
        return np.asarray(flat, dtype=np.float32)


def _check_leaves(space: spaces.Space, path: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` naming the first leaf (``Tuple`` by index, ``Dict`` by key) that is
    not ``Box``, ``Discrete``, ``MultiDiscrete`` or ``MultiBinary``."""
    if isinstance(space, spaces.Tuple):
        for i, sub in enumerate(space.spaces):
            _check_leaves(sub, (*path, i))
    elif isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            _check_leaves(sub, (*path, key))
    elif not isinstance(
        space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    ):
        where = "".join(f"[{p!r}]" for p in path) or " itself"
        raise ValueError(
            f"env.wrapper 'flatten': the observation{where} is a {type(space).__name__}, which "
            "has no fixed-size encoding (Box, Discrete, MultiDiscrete, MultiBinary, Tuple and "
            "Dict have)"
        )


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
    "flatten": FlatObservation,
}


def is_minigrid_id(env_id: str) -> bool:
    """A MiniGrid or BabyAI id, also in gymnasium's ``module:EnvId`` form."""
    return env_id.split(":", 1)[-1].startswith(("MiniGrid-", "BabyAI-"))


def default_wrapper(env_id: str, observation_space: spaces.Space | None = None) -> str:
    """The wrapper ``env.wrapper: auto`` picks: ``minigrid`` for ``MiniGrid-*`` and ``BabyAI-*``
    ids (Dict observations of grid codes); ``flatten`` when SB3 cannot take the observation space
    as it is (:func:`sb3_takes`: ``Tuple``, nesting, ``Discrete`` with a ``start``); ``none``
    otherwise (and when the space is not given)."""
    if is_minigrid_id(env_id):
        return "minigrid"
    if observation_space is not None and not sb3_takes(observation_space):
        return "flatten"
    return "none"


def wrap(env: gym.Env, name: str) -> gym.Env:
    """Apply the observation wrapper registered as ``name`` (``none``: return ``env`` itself)."""
    if name not in WRAPPERS:
        raise ValueError(f"unknown wrapper {name!r}; available: {', '.join(WRAPPERS)}")
    cls = WRAPPERS[name]
    return env if cls is None else cls(env)
