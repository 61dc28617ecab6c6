"""The bridge to stable-baselines3: the only package of memagents that imports it.

- :class:`MemoryPolicy`: any core of :mod:`memagents.cores` in the place of sb3-contrib's LSTM,
  for the unmodified ``sb3_contrib.RecurrentPPO``.
- :class:`MemoryPPO`: RecurrentPPO whose rollout buffer stores the recurrent state only where a
  training sequence starts (:class:`SequenceStartRolloutBuffer`).
- :class:`TorchVecEnv`: ``envs.BatchedEnv`` as a real SB3 ``VecEnv``.
- :class:`MiniGridExtractor` and ``FEATURES_EXTRACTORS``: features extractors by registry key.
- :class:`StockLstmPolicy`: sb3-contrib's ``MlpLstmPolicy`` (the benchmark baseline).
"""

from memagents.sb3.baselines import StockLstmPolicy
from memagents.sb3.extractors import FEATURES_EXTRACTORS, MiniGridExtractor
from memagents.sb3.policy import MemoryPolicy, PackedCore
from memagents.sb3.ppo import (
    MemoryPPO,
    SequenceStartDictRolloutBuffer,
    SequenceStartRolloutBuffer,
    recurrent_state_nbytes,
)
from memagents.sb3.vecenv import TorchVecEnv

__all__ = [
    "FEATURES_EXTRACTORS",
    "MemoryPPO",
    "MemoryPolicy",
    "MiniGridExtractor",
    "PackedCore",
    "SequenceStartDictRolloutBuffer",
    "SequenceStartRolloutBuffer",
    "StockLstmPolicy",
    "TorchVecEnv",
    "recurrent_state_nbytes",
]
