"""``envs.BatchedEnv`` as a real stable-baselines3 ``VecEnv``.

``envs`` cannot import SB3 (imports go down, never up), so its batched env only duck-types the
``VecEnv`` interface. SB3 algorithms check ``isinstance(env, VecEnv)`` and would otherwise wrap it
in a ``DummyVecEnv``; this thin adapter subclasses ``VecEnv`` and forwards every call::

    from stable_baselines3 import PPO
    from memagents.sb3 import TorchVecEnv

    venv = TorchVecEnv.make("memagents/Copy-v0", num_envs=1024, seed=0)
    PPO("MlpPolicy", venv).learn(100_000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

import envs
from envs.vector import BatchedEnv


class TorchVecEnv(VecEnv):
    """A ``VecEnv`` that steps all its episodes as tensors (auto-reset inside ``step``).

    :param batched: the ``envs.BatchedEnv`` to expose; reachable as ``.batched`` for its tensor
        interface (``reset_tensor``/``step_tensor``).
    """

    def __init__(self, batched: BatchedEnv) -> None:
        if not isinstance(batched, BatchedEnv):
            raise ValueError(f"batched={batched!r} is invalid: expected an envs.BatchedEnv")
        self.batched = batched
        super().__init__(batched.num_envs, batched.observation_space, batched.action_space)

    @classmethod
    def make(
        cls,
        env_id: str,
        num_envs: int,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        **kwargs: Any,
    ) -> TorchVecEnv:
        """``TorchVecEnv(envs.make_vec(env_id, num_envs, device, seed, **kwargs))``."""
        return cls(envs.make_vec(env_id, num_envs, device=device, seed=seed, **kwargs))

    def reset(self) -> np.ndarray:
        obs = self.batched.reset()
        self.reset_infos = self.batched.reset_infos
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self.batched.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        return self.batched.step_wait()

    def close(self) -> None:
        self.batched.close()

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        return self.batched.seed(seed)

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        self.batched.set_options(options)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self.batched.get_attr(attr_name, indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self.batched.set_attr(attr_name, value, indices)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        return self.batched.env_method(method_name, *method_args, indices=indices, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return self.batched.env_is_wrapped(wrapper_class, indices)

    def get_images(self) -> Sequence[np.ndarray | None]:
        return self.batched.get_images()
