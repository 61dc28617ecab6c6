"""Baselines: the memoryless MLP and the LSTM and GRU on ``nn.LSTM`` / ``nn.GRU``.

The LSTM and GRU process a sequence in as few library calls as the resets allow: the sequence is
cut only at time steps where some batch element starts an episode, the state of those elements is
reset there, and each piece runs as one cuDNN/oneDNN-friendly ``nn.LSTM`` call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from memagents.cores import state as state_lib
from memagents.cores.base import MemoryCore, check_positive_int, set_forget_bias


class MLPState(NamedTuple):
    """The memoryless core's state: nothing, but it still knows the batch size."""

    empty: Tensor  # [B, 0]


class MLPCore(MemoryCore):
    """A stateless baseline with the core interface: ``y_t = MLP(x_t)``.

    A task on which this core matches the memory cores does not need memory; its score is the
    memoryless ceiling the environments state.

    :param input_size: features per step.
    :param hidden_size: width of each hidden layer, and the output size.
    :param num_layers: number of ``Linear + tanh`` layers (≥ 1).
    """

    def __init__(self, input_size: int, hidden_size: int = 64, num_layers: int = 1):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.output_size = check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        layers: list[nn.Module] = []
        width = input_size
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        self.net = nn.Sequential(*layers)

    def initial_state(self, batch_size, device=None) -> MLPState:
        return MLPState(
            torch.zeros(batch_size, 0, device=self._device(device), dtype=self._dtype())
        )

    def state_shapes_tree(self) -> MLPState:
        return MLPState((0,))

    def step(self, x, state, return_debug=False):
        y = self.net(x)
        return (y, state, {}) if return_debug else (y, state)

    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        state, _ = self._check_inputs(x, state, episode_starts)
        y = self.net(x)
        return (y, state, {}) if return_debug else (y, state)


class LSTMState(NamedTuple):
    """State of an ``L``-layer LSTM with ``H`` units."""

    h: Tensor  # [B, L, H] hidden state
    c: Tensor  # [B, L, H] cell state


class GRUState(NamedTuple):
    """State of an ``L``-layer GRU with ``H`` units."""

    h: Tensor  # [B, L, H] hidden state


class _TorchRNNCore(MemoryCore):
    """Shared sequence logic of the LSTM and GRU cores (``nn.LSTM`` / ``nn.GRU``, time first)."""

    rnn: nn.RNNBase
    #: a reset mid-sequence cuts the ``nn.LSTM``/``nn.GRU`` call in two (see ``forward``)
    cheap_mid_sequence_resets = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, learn_init: bool):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.output_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.learn_init = bool(learn_init)

    def _init_param(self) -> nn.Parameter | None:
        shape = (1, self.num_layers, self.output_size)
        return nn.Parameter(torch.zeros(shape)) if self.learn_init else None

    def _to_torch(self, state) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _from_torch(self, hx) -> LSTMState | GRUState:
        raise NotImplementedError

    def step(self, x, state, return_debug=False):
        y, new_state = self._run(x.unsqueeze(0), state, one_step=True)
        y = y.squeeze(0)
        if return_debug:
            return y, new_state, {"h": new_state.h[:, -1]}
        return y, new_state

    def _run(self, x: Tensor, state, one_step: bool = False):
        if one_step:
            return self._run_one_step(x, state)
        # x: [T, B, I]; nn.RNNBase states are layer first: [B, L, H] -> [L, B, H]
        y, hx = self.rnn(x, self._to_torch(state))
        return y, self._from_torch(hx)

    def _run_one_step(self, x: Tensor, state):
        """One step (rollouts call the core with T = 1) through the fused cell kernels of
        ``nn.LSTMCell`` / ``nn.GRUCell`` on the same weights: about 2x cheaper than a
        one-step ``nn.LSTM`` call on CPU (its oneDNN path has a large fixed cost). Same values up to
        float rounding."""
        raise NotImplementedError

    def forward(self, x, state=None, episode_starts=None, return_debug=False):
        state, starts = self._check_inputs(x, state, episode_starts)
        T, B = x.shape[0], x.shape[1]
        if return_debug:
            return super().forward(x, state, episode_starts, return_debug=True)
        any_start = [False] * T if starts is None else starts.any(dim=1).tolist()
        # one nn.LSTM / nn.GRU call per piece between time steps where some element resets
        cuts = [0] + [t for t in range(1, T) if any_start[t]]
        initial = None
        pieces = []
        for i, t0 in enumerate(cuts):
            t1 = cuts[i + 1] if i + 1 < len(cuts) else T
            if any_start[t0]:
                if initial is None:
                    initial = self.initial_state(B, x.device)
                state = state_lib.reset_where(state, initial, starts[t0])
            # a call of one step (a rollout) takes the cell kernels; pieces of longer sequences
            # stay on nn.LSTM/nn.GRU so that where the sequence is cut never changes the values
            y, state = self._run(x[t0:t1], state, one_step=T == 1)
            pieces.append(y)
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return y, state


class LSTMCore(_TorchRNNCore):
    """LSTM baseline (Hochreiter & Schmidhuber 1997) on ``nn.LSTM``; ``y_t = h_t`` of the top layer.

    :param input_size: features per step.
    :param hidden_size: ``H``, units per layer and the output size.
    :param num_layers: ``L`` stacked layers.
    :param learn_init: learn the initial ``h_0, c_0`` (zero-initialised) instead of fixing 0.
    :param forget_bias: initial forget-gate bias (1.0: Gers et al. 2000).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        learn_init: bool = False,
        forget_bias: float = 1.0,
    ):
        super().__init__(input_size, hidden_size, num_layers, learn_init)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=num_layers)
        set_forget_bias(self.rnn, forget_bias)
        self.h0 = self._init_param()
        self.c0 = self._init_param()

    def initial_state(self, batch_size, device=None) -> LSTMState:
        weight = self.rnn.weight_ih_l0  # the first parameter: its device and dtype
        device = weight.device if device is None else torch.device(device)
        if self.h0 is not None:
            return LSTMState(
                self.h0.to(device).expand(batch_size, -1, -1),
                self.c0.to(device).expand(batch_size, -1, -1),
            )
        zeros = torch.zeros(
            batch_size, self.num_layers, self.output_size, device=device, dtype=weight.dtype
        )
        return LSTMState(zeros, zeros)

    def state_shapes_tree(self) -> LSTMState:
        shape = (self.num_layers, self.output_size)
        return LSTMState(shape, shape)

    def _to_torch(self, state):
        return (state.h.transpose(0, 1).contiguous(), state.c.transpose(0, 1).contiguous())

    def _run_one_step(self, x: Tensor, state: LSTMState):
        inp, hs, cs = x[0], [], []
        # nn.LSTM's own list of [w_ih, w_hh, b_ih, b_hh] per layer (what its forward uses)
        weights = self.rnn._flat_weights
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
            h, c = torch._VF.lstm_cell(
                inp, (state.h[:, layer], state.c[:, layer]), w_ih, w_hh, b_ih, b_hh
            )
            hs.append(h)
            cs.append(c)
            inp = h
        return inp.unsqueeze(0), LSTMState(_stack_layers(hs), _stack_layers(cs))

    def _from_torch(self, hx):
        return LSTMState(hx[0].transpose(0, 1), hx[1].transpose(0, 1))


class GRUCore(_TorchRNNCore):
    """GRU baseline (Cho et al. 2014) on ``nn.GRU``; ``y_t = h_t`` of the top layer.

    :param input_size: features per step.
    :param hidden_size: ``H``, units per layer and the output size.
    :param num_layers: ``L`` stacked layers.
    :param learn_init: learn the initial ``h_0`` (zero-initialised) instead of fixing 0.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        learn_init: bool = False,
    ):
        super().__init__(input_size, hidden_size, num_layers, learn_init)
        self.rnn = nn.GRU(input_size, hidden_size, num_layers=num_layers)
        self.h0 = self._init_param()

    def initial_state(self, batch_size, device=None) -> GRUState:
        weight = self.rnn.weight_ih_l0  # the first parameter: its device and dtype
        device = weight.device if device is None else torch.device(device)
        if self.h0 is not None:
            return GRUState(self.h0.to(device).expand(batch_size, -1, -1))
        return GRUState(
            torch.zeros(
                batch_size, self.num_layers, self.output_size, device=device, dtype=weight.dtype
            )
        )

    def state_shapes_tree(self) -> GRUState:
        return GRUState((self.num_layers, self.output_size))

    def _to_torch(self, state):
        return state.h.transpose(0, 1).contiguous()

    def _run_one_step(self, x: Tensor, state: GRUState):
        inp, hs = x[0], []
        weights = self.rnn._flat_weights  # [w_ih, w_hh, b_ih, b_hh] per layer
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
            h = torch._VF.gru_cell(inp, state.h[:, layer], w_ih, w_hh, b_ih, b_hh)
            hs.append(h)
            inp = h
        return inp.unsqueeze(0), GRUState(_stack_layers(hs))

    def _from_torch(self, hx):
        return GRUState(hx.transpose(0, 1))


def _stack_layers(per_layer: list[Tensor]) -> Tensor:
    """``L`` tensors ``[B, H]`` -> ``[B, L, H]`` (a view when ``L = 1``)."""
    return per_layer[0].unsqueeze(1) if len(per_layer) == 1 else torch.stack(per_layer, 1)
