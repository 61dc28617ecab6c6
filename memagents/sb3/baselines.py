"""sb3-contrib's stock recurrent policy, as the baseline the bridge is measured against.

:class:`StockLstmPolicy` is sb3-contrib's ``MlpLstmPolicy`` (``RecurrentActorCriticPolicy``)
unchanged except for one dtype cast: with SB3 >= 2.7 the rollout buffer keeps ``MultiBinary``
actions as ``int8``, and sb3-contrib 2.9.2's ``RecurrentPPO.train`` hands them to
``Bernoulli.log_prob`` as they are, which fails ("result type Float can't be cast to the desired
output type Char"). The cast costs nothing measurable; everything else is the stock LSTM path.
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates


class StockLstmPolicy(RecurrentActorCriticPolicy):
    """``MlpLstmPolicy`` that also trains on ``MultiBinary`` actions (see the module docstring).

    Takes exactly ``RecurrentActorCriticPolicy``'s arguments (``lstm_hidden_size``,
    ``enable_critic_lstm``, ``shared_lstm``, ``net_arch``, ``features_extractor_class``, ...).
    """

    def evaluate_actions(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        lstm_states: RNNStates,
        episode_starts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.action_space, spaces.MultiBinary) and not actions.is_floating_point():
            actions = actions.float()
        return super().evaluate_actions(obs, actions, lstm_states, episode_starts)
