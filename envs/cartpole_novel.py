"""CartPole without velocities: the classic partially observable control benchmark.

``CartPoleNoVel-v1`` is Gymnasium's ``CartPole-v1`` whose observation keeps the cart position and
the pole angle and zeroes the two velocities, as RL Zoo's ``MaskVelocityWrapper`` does (the same
id, the same 4-dimensional observation with entries 1 and 3 set to 0). A policy must infer the
velocities from successive positions, i.e. it needs memory; sb3-contrib's test suite states the
memoryless ceiling: "a non-recurrent policy doesn't get more than ~50". RL Zoo's tuned
``RecurrentPPO`` setting for it is ``configs/cartpole-novel-zoo.yaml``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

#: indices of the velocities in CartPole's observation ``[x, x_dot, theta, theta_dot]``.
CARTPOLE_VELOCITY_INDICES = (1, 3)


class MaskVelocity(gym.ObservationWrapper):
    """Zero the velocity entries of CartPole's observation.

    ## Observation Space

    CartPole's ``Box(4,)``; after masking it holds ``[x, 0, theta, 0]``:

    | Num | Observation           | Min                 | Max               |
    |-----|-----------------------|---------------------|-------------------|
    | 0   | Cart Position         | -4.8                | 4.8               |
    | 1   | 0 (was Cart Velocity) | -inf                | inf               |
    | 2   | Pole Angle            | ~ -0.418 rad (-24°) | ~ 0.418 rad (24°) |
    | 3   | 0 (was Angular Vel.)  | -inf                | inf               |

    Actions, rewards (+1 per step) and episode ends (pole beyond ±12°, cart beyond ±2.4, 500 steps)
    are CartPole-v1's.

    ## Arguments

    :param env: a ``CartPole-v1`` environment (any env whose observation is CartPole's 4 entries).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        shape = env.observation_space.shape
        if shape != (4,):
            raise ValueError(f"MaskVelocity expects CartPole's 4-entry observation; got {shape}")
        self.mask = np.ones(4, dtype=env.observation_space.dtype)
        self.mask[list(CARTPOLE_VELOCITY_INDICES)] = 0

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation * self.mask


def make_cartpole_novel(render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """``CartPole-v1`` (500-step time limit) with :class:`MaskVelocity`: the entry point of
    ``CartPoleNoVel-v1``; ``kwargs`` go to ``gym.make("CartPole-v1", ...)``."""
    return MaskVelocity(gym.make("CartPole-v1", render_mode=render_mode, **kwargs))
