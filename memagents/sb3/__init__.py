"""The bridge to stable-baselines3: the only package of memagents that imports it."""

from memagents.sb3.vecenv import TorchVecEnv

__all__ = ["TorchVecEnv"]
