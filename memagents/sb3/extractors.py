"""Features extractors named by registry key (``policy.features_extractor`` in a config).

:class:`MiniGridExtractor` reads the flat code vector of ``memagents.wrappers.MiniGridCodes``:
each grid cell's object, colour and state codes are looked up in three embedding tables
(categorical codes, not intensities: a ``key`` (5) is not "between" a ``floor`` (3) and a
``ball`` (6)), the embedded ``[E_obj + E_col + E_state, V, V]`` grid goes through a small conv
net, and the embedded direction joins it before one linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor
from torch import Tensor, nn


class MiniGridExtractor(BaseFeaturesExtractor):
    """Embeddings of MiniGrid's categorical grid codes and direction, then a small conv net.

    Input layout (``MiniGridCodes``): ``[B, 3 V V + 1]``, entry ``3 (V x + y) + c`` the code of
    channel ``c`` (object, colour, state) of cell ``(x, y)``, the last entry the direction. The
    vocabulary sizes are ``observation_space.high + 1`` (11 objects, 6 colours, 3 states and 4
    directions for MiniGrid).

    ::

        codes [B, V, V, 3] -> embed each channel, concat -> [B, V, V, 3 E] -> [B, 3 E, V, V]
        -> (Conv2d 2x2 + ReLU) per entry of ``channels`` -> flatten [B, C' V' V']
        ++ direction embedding [B, E] -> Linear + ReLU -> [B, features_dim]

    :param observation_space: the ``Box`` of ``MiniGridCodes``: shape ``(3 V V + 1,)``.
    :param features_dim: width of the output features (the core's ``input_size``).
    :param embed_dim: ``E``, width of each code's embedding (object, colour, state, direction).
    :param channels: output channels of the 2x2 convolutions (stride 1, no padding: each one
        shrinks the view by 1 per side); ``[]`` gives an MLP over the embedded grid.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        features_dim: int = 64,
        embed_dim: int = 8,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__(observation_space, features_dim)
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ValueError(
                f"MiniGridExtractor needs the flat Box of memagents.wrappers.MiniGridCodes; "
                f"got {observation_space}"
            )
        n_codes = observation_space.shape[0] - 1
        view = math.isqrt(n_codes // 3)
        if n_codes < 3 or 3 * view * view != n_codes:
            raise ValueError(
                f"MiniGridExtractor: observation width {n_codes + 1} is not 3 V V + 1 for any view "
                "size V (is the env wrapped with env.wrapper: minigrid?)"
            )
        if features_dim < 1 or embed_dim < 1 or any(c < 1 for c in channels):
            raise ValueError(
                f"MiniGridExtractor: features_dim={features_dim}, embed_dim={embed_dim} and "
                f"channels={list(channels)} must be >= 1"
            )
        if len(channels) >= view:
            raise ValueError(
                f"MiniGridExtractor: {len(channels)} 2x2 convolutions do not fit a {view}x{view} "
                f"view (at most {view - 1})"
            )
        high = np.asarray(observation_space.high, dtype=np.int64)
        self.view = view
        # vocabulary size of each grid channel (object, colour, state) and of the direction
        sizes = [int(high[: 3 * view * view][c::3].max()) + 1 for c in range(3)]
        self.code_embeddings = nn.ModuleList(nn.Embedding(n, embed_dim) for n in sizes)
        # row of each channel's first code in the stacked vocabulary (see forward)
        self.register_buffer("_offsets", torch.tensor([0, sizes[0], sizes[0] + sizes[1]]), False)
        self.register_buffer("_limits", torch.tensor(sizes), False)  # codes must be below
        self._sizes = tuple(sizes)
        self.direction_embedding = nn.Embedding(int(high[-1]) + 1, embed_dim)
        layers: list[nn.Module] = []
        width = 3 * embed_dim
        for c in channels:
            layers += [nn.Conv2d(width, c, kernel_size=2), nn.ReLU()]
            width = c
        self.conv = nn.Sequential(*layers, nn.Flatten())
        side = view - len(channels)
        self.linear = nn.Sequential(
            nn.Linear(width * side * side + embed_dim, features_dim), nn.ReLU()
        )

    def forward(self, observations: Tensor) -> Tensor:
        """``[B, 3 V V + 1]`` codes (as floats, SB3 casts observations) -> ``[B, features_dim]``."""
        codes = observations.round().long()  # exact small integers
        B, V = codes.shape[0], self.view
        grid = codes[:, :-1].reshape(B * V * V, 3)  # cell (b, x, y) -> its 3 codes
        if torch.is_grad_enabled():
            embedded = self._embed_grid(grid)  # [B V V, 3 E]
        else:  # rollouts (B = n_envs): the three lookups cost less than building the product
            embedded = torch.cat([emb(grid[:, c]) for c, emb in enumerate(self.code_embeddings)], 1)
        x = self.conv(embedded.view(B, V, V, -1).permute(0, 3, 1, 2))  # [B, C' V' V']
        direction = self.direction_embedding(codes[:, -1])  # [B, E]
        return self.linear(torch.cat([x, direction], dim=1))  # [B, features_dim]

    def _embed_grid(self, grid: Tensor) -> Tensor:
        """``[n, 3]`` codes -> ``[n, 3 E]``, each channel's embedding row, concatenated.

        Computed as ``multi_hot(codes) @ block_diag(E_obj, E_col, E_state)``: the same values as
        three ``nn.Embedding`` lookups (each output is one weight times 1 plus zeros), but the
        backward is one small dense product instead of three scatter-adds over ``n`` indices
        (``embedding_dense_backward`` was 14% of a PPO update on MemoryS7)."""
        bad = ((grid < 0) | (grid >= self._limits)).any(1)
        if bad.any():
            bad = grid[bad][0]
            raise ValueError(
                f"MiniGridExtractor: cell codes {bad.tolist()} out of range; (object, colour, "
                f"state) codes must be below {list(self._sizes)}"
            )
        table = torch.block_diag(*(emb.weight for emb in self.code_embeddings))  # [ΣV, 3 E]
        multi_hot = table.new_zeros(grid.shape[0], table.shape[0])
        multi_hot.scatter_(1, grid + self._offsets, 1.0)
        return multi_hot @ table


#: ``policy.features_extractor`` registry key -> class (``auto``: MemoryPolicy's default,
#: ``FlattenExtractor`` for Box and ``CombinedExtractor`` for Dict observations).
FEATURES_EXTRACTORS: dict[str, type[BaseFeaturesExtractor] | None] = {
    "auto": None,
    "flatten": FlattenExtractor,
    "minigrid": MiniGridExtractor,
}
