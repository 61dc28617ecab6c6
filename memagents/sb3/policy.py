"""Any memory core in the place of sb3-contrib's LSTM: :class:`MemoryPolicy`.

``RecurrentPPO(MemoryPolicy, env, policy_kwargs={"core": "dnc", "core_kwargs": {...}})`` trains a
core with the *unmodified* ``sb3_contrib.RecurrentPPO``. The data flow per step is::

    obs -> features extractor -> core -> MLP heads -> (action distribution, value)

How the core's state travels through sb3-contrib, which only knows LSTM states:

- RecurrentPPO sizes its state buffers from ``policy.lstm_actor.num_layers`` / ``.hidden_size`` and
  keeps ``(h, c)``, each ``(num_layers, n_envs, hidden_size)``. :class:`PackedCore` wraps a core
  and exposes ``num_layers = 1`` and ``hidden_size = H = max(1, ceil(S / 2))`` with ``S`` the
  core's ``state_size``; the core's flat state ``[B, S]`` is zero-padded to ``[B, 2H]`` and split
  into ``h = [:, :H]`` and ``c = [:, H:]`` (exact: slicing only, no arithmetic).
- Resets: sb3-contrib multiplies the state by ``1 - episode_start``, which restores zeros instead of
  a learned or constant initial state (the NTM/DNC memory starts at 1e-6) and lets a NaN survive
  (``0 * nan = nan``). Here the ``episode_starts`` are handed to the core, whose forward replaces
  the state of starting elements by ``core.initial_state`` with ``torch.where``: one code path, the
  same in rollout (``T = 1``) and in training (whole padded sequences ``[T, n_seq]``, one core call).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    Distribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    MlpExtractor,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn

import memagents.cores as cores
from memagents.cores import state as state_lib

#: SB3 action distributions whose rollout sampling skips torch's argument validation (see
#: ``MemoryPolicy._sampling_distribution``): SB3 class -> the torch distribution it wraps.
_UNVALIDATED: dict[type, type[torch.distributions.Distribution]] = {
    CategoricalDistribution: torch.distributions.Categorical,
    BernoulliDistribution: torch.distributions.Bernoulli,
}

#: ``(h, c)``, each ``(1, B, hidden_size)``: a core state as sb3-contrib stores it.
HC = tuple[Tensor, Tensor]


class ColumnStates(NamedTuple):
    """States before ``n`` training columns, given only for the ``m`` columns that continue a
    stored state; every other column begins an episode at its first step, where the core
    replaces its state by the initial one anyway. The device rollout buffer hands these to
    :meth:`MemoryPolicy.evaluate_actions` so that a minibatch never materialises a state for
    the columns that do not need one (an ``N×W`` memory each for the sparse cores)."""

    stored: Any  # the m columns' states, the core's own (leaves [m, ...])
    columns: Tensor  # [m] long: their positions among the n columns
    n: int  # columns in all


class PackedCore(nn.Module):
    """A memory core dressed as a one-layer ``nn.LSTM`` for sb3-contrib's bookkeeping.

    sb3-contrib reads ``num_layers`` and ``hidden_size`` to allocate ``(h, c)`` state tensors of
    shape ``(num_layers, B, hidden_size)``; this wrapper keeps the core's whole packed state in
    them: ``flat [B, S]`` is padded with zeros to ``[B, 2H]``, ``h = flat[:, :H]``,
    ``c = flat[:, H:]``, with ``H = hidden_size = max(1, ceil(S / 2))``.

    The layout (which slice of ``h`` or ``c`` each state tensor occupies) is computed once, so
    :meth:`pack` concatenates the leaves of each half directly (no ``[B, 2H]`` intermediate; a
    half that is one whole leaf, e.g. the LSTM's ``h`` and ``c``, is a view without a copy) and
    :meth:`unpack` returns views into ``h`` and ``c`` (a copy only for the one leaf that may
    straddle the two halves).

    :param core: the memory core (any :class:`memagents.cores.MemoryCore`).
    """

    #: the packed state is one "layer" of ``h`` and one of ``c``.
    num_layers: int = 1

    def __init__(self, core: cores.MemoryCore):
        super().__init__()
        self.core = core
        self.state_size = int(core.state_size)
        self.hidden_size = max(1, math.ceil(self.state_size / 2))
        self._tree = core.state_shapes_tree()
        self._layout = _Layout(list(state_lib.leaves(self._tree)), self.hidden_size)
        # (batch, device, dtype, parameter versions) -> the packed initial state, for rollouts
        # (see _initial_hc_cached); a cache of values that the parameters determine, not state.
        self._initial_cache: dict[str, Any] = {}

    @property
    def input_size(self) -> int:
        """Features per step of the core's input (``nn.LSTM.input_size``)."""
        return self.core.input_size

    @property
    def output_size(self) -> int:
        """Features per step of the core's output."""
        return self.core.output_size

    def pack(self, state: Any) -> HC:
        """Core state (leaves ``[B, ...]``) -> ``(h, c)``, each ``(1, B, H)``.

        Same values as padding ``core.pack_state(state)`` to ``[B, 2H]`` and splitting it."""
        leaves = [t.reshape(t.shape[0], -1) for t in state_lib.leaves(state)]  # [B, n_i]
        h, c = self._layout.pack(leaves)
        return h.unsqueeze(0), c.unsqueeze(0)

    def unpack(self, hc: HC) -> Any:
        """``(h, c)``, each ``(1, B, H)`` -> the core's NamedTuple state (leaves ``[B, ...]``,
        views into ``h`` and ``c`` apart from a leaf that straddles them)."""
        h, c = hc
        if h.dim() != 3 or h.shape[0] != 1 or h.shape[-1] != self.hidden_size or h.shape != c.shape:
            raise ValueError(
                f"packed state must be (h, c) of shape (1, B, {self.hidden_size}); "
                f"got {tuple(h.shape)} and {tuple(c.shape)}"
            )
        leaves = iter(self._layout.unpack(h[0], c[0]))
        return _rebuild(self._tree, leaves)

    def initial_hc(self, batch_size: int, device: torch.device | str | None = None) -> HC:
        """``core.initial_state`` in packed form: ``(h, c)``, each ``(1, batch_size, H)``."""
        return self.pack(self.core.initial_state(batch_size, device))

    def _initial_hc_cached(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HC:
        """:meth:`initial_hc` without grad, recomputed only when a parameter of the core changed.

        The key holds every parameter's identity, storage and version counter: an optimizer step
        or ``load_state_dict`` (in-place updates), ``.to()`` or replacing a parameter all change
        it (an in-place change through ``param.data`` would not, which nothing in SB3 does)."""
        params = tuple((id(p), p.data_ptr(), p._version) for p in self.core.parameters())
        key = (batch_size, device, dtype, params)
        cached = self._initial_cache.get("key")
        if cached != key:
            with torch.no_grad():
                # own copies: the packed halves may be views of learned initial-state parameters
                h, c = (t.to(dtype).clone() for t in self.initial_hc(batch_size, device))
            self._initial_cache.clear()
            self._initial_cache.update(key=key, hc=(h, c))
        return self._initial_cache["hc"]

    def forward(self, x: Tensor, hc: HC, episode_starts: Tensor) -> tuple[Tensor, HC]:
        """Run the core over a sequence, resetting where episodes start.

        :param x: ``[T, B, input_size]``.
        :param hc: the state before step 0, ``(h, c)`` each ``(1, B, H)``.
        :param episode_starts: ``[T, B]``, 1 where step ``t`` starts an episode for ``b``: the
            core replaces that element's state by its initial state before the step.
        :return: ``y [T, B, output_size]`` and the packed state after the last step.

        A rollout step (``T = 1``, no grad) resets on the packed state instead, with the cached
        packed initial state (:meth:`_initial_hc_cached`): ``torch.where`` on ``h`` and ``c``
        picks the same values as the core's reset of each state tensor, in two operations and
        without building the initial state every step.
        """
        if isinstance(hc, ColumnStates):
            return self._forward_columns(x, hc, episode_starts), None
        if x.shape[0] == 1 and not torch.is_grad_enabled() and episode_starts.shape == x.shape[:2]:
            starts = episode_starts[0].to(device=x.device, dtype=torch.bool)  # [B]
            # on a GPU always select (reading ``starts.any()`` would sync with the host every
            # rollout step); on the CPU skip the two selects when no episode starts
            if x.device.type != "cpu" or bool(starts.any()):
                h, c = hc
                h0, c0 = self._initial_hc_cached(x.shape[1], h.device, h.dtype)
                mask = starts.view(1, -1, 1)
                hc = (torch.where(mask, h0, h), torch.where(mask, c0, c))
            y, state = self.core(x, self.unpack(hc), None)
            return y, self.pack(state)
        y, state = self.core(x, self.unpack(hc), episode_starts)
        return y, self.pack(state)

    def _forward_columns(self, x: Tensor, states: ColumnStates, starts: Tensor) -> Tensor:
        """:meth:`forward`'s outputs from :class:`ColumnStates` (the final state is not made).

        A core that ``carries_state`` (SAM, SDNC: an ``N×W`` memory per element) runs twice:
        the columns that begin an episode from its initial state (a broadcast zero memory,
        never materialised) and the others from their stored states; every element is
        independent, so the outputs are those of one call over all columns. Other cores get
        the packed states of all columns (zeros where an episode begins) and one call."""
        n, cols, stored = states.n, states.columns, states.stored
        if not self.core.carries_state or cols.numel() == n:
            full = state_lib.map_state(
                lambda t: t.new_zeros(n, *t.shape[1:]).index_copy_(0, cols, t), stored
            )
            return self.core(x, full, starts)[0]
        fresh = torch.ones(n, dtype=torch.bool, device=x.device)
        fresh[cols] = False
        fresh = fresh.nonzero().flatten()
        y_fresh = self.core(x.index_select(1, fresh), None, starts.index_select(1, fresh))[0]
        if not cols.numel():
            return y_fresh
        # the stored states were picked for this call: handed over, not copied again
        kept = self.core.forward_inplace(
            x.index_select(1, cols), stored, starts.index_select(1, cols)
        )
        y_kept = kept[0]
        y = y_fresh.new_empty(x.shape[0], n, y_fresh.shape[2])
        return y.index_copy(1, fresh, y_fresh).index_copy(1, cols, y_kept)

    @torch.no_grad()
    def step_native(self, x: Tensor, state: Any, starts: Tensor) -> tuple[Tensor, Any]:
        """One rollout step on the core's own NamedTuple state, without packing it: the same
        values as :meth:`forward` with ``T = 1`` under no grad (the reset selects the same
        initial values, unpacked from the cached packed initial state). A core that
        ``carries_state`` (SAM, SDNC) gets the state handed over
        (:meth:`~memagents.cores.base.MemoryCore.forward_inplace`) with the episode starts, so
        ``state`` must not be read after this call.

        :param x: ``[B, input_size]``.
        :param state: the core's state (leaves ``[B, ...]``).
        :param starts: ``[B]``, 1 where ``x`` starts an episode.
        :return: ``y [B, output_size]`` and the state after the step.
        """
        starts = starts.to(device=x.device, dtype=torch.bool)
        if self.core.carries_state:  # it resets in place, and keeps its index to the next step
            y, state = self.core.forward_inplace(x.unsqueeze(0), state, starts.unsqueeze(0))
            return y[0], state
        if x.device.type != "cpu" or bool(starts.any()):  # see forward: no host read on a GPU
            leaves = next(iter(state_lib.leaves(state)))
            initial = self.unpack(self._initial_hc_cached(x.shape[0], x.device, leaves.dtype))
            state = state_lib.reset_where(state, initial, starts)
        y, state = self.core(x.unsqueeze(0), state, None)
        return y[0], state

    @torch.no_grad()
    def peek_native(self, x: Tensor, state: Any, starts: Tensor) -> Tensor:
        """``y [B, output_size]`` of :meth:`step_native`, leaving ``state`` as it was
        (:meth:`~memagents.cores.base.MemoryCore.peek`): a rollout's bootstrap value."""
        starts = starts.to(device=x.device, dtype=torch.bool)
        return self.core.peek(x.unsqueeze(0), state, starts.unsqueeze(0))[0]


class _Layout:
    """Where each state tensor lies in ``(h, c)``: leaf ``i`` (``n_i`` floats per element) at
    offset ``o_i = n_0 + ... + n_{i-1}`` of the padded ``[B, 2H]`` flat state.

    :param shapes: per-element shapes of the leaves, in field order.
    :param hidden: ``H``.
    """

    def __init__(self, shapes: list[tuple[int, ...]], hidden: int):
        sizes = [math.prod(s) for s in shapes]
        self.sizes = sizes
        self.hidden = hidden
        # per half: pieces (leaf, start, stop) of the leaf's flat [B, n_i] in order, then padding
        self.halves: list[list[tuple[int, int, int]]] = [[], []]
        self.pad = [0, 0]
        offset = 0
        for i, n in enumerate(sizes):
            for half in (0, 1):
                lo, hi = max(offset, half * hidden), min(offset + n, (half + 1) * hidden)
                if lo < hi:
                    self.halves[half].append((i, lo - offset, hi - offset))
            offset += n
        for half in (0, 1):
            self.pad[half] = hidden - sum(b - a for _, a, b in self.halves[half])
        # unpack: per leaf, the (half, start, stop) pieces of h or c it is made of
        self.sources: list[list[tuple[int, int, int]]] = [[] for _ in sizes]
        for half in (0, 1):
            pos = 0
            for i, a, b in self.halves[half]:
                self.sources[i].append((half, pos, pos + b - a))
                pos += b - a
        self.shapes = shapes

    def pack(self, leaves: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Leaves ``[B, n_i]`` -> ``h, c`` each ``[B, H]``."""
        out = []
        for half in (0, 1):
            parts = []
            for i, a, b in self.halves[half]:
                leaf = leaves[i]
                parts.append(leaf if (a, b) == (0, self.sizes[i]) else leaf[:, a:b])
            if self.pad[half]:
                ref = leaves[0]
                parts.append(ref.new_zeros(ref.shape[0], self.pad[half]))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return out[0], out[1]

    def unpack(self, h: Tensor, c: Tensor) -> list[Tensor]:
        """``h, c`` each ``[B, H]`` -> leaves ``[B, *shape_i]``."""
        halves = (h, c)
        leaves = []
        for shape, pieces in zip(self.shapes, self.sources, strict=True):
            parts = [
                halves[half] if (a, b) == (0, self.hidden) else halves[half][:, a:b]
                for half, a, b in pieces
            ]
            if not parts:  # an empty leaf ([B, 0])
                parts = [h[:, :0]]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            leaves.append(flat.reshape(h.shape[0], *shape))
        return leaves


def _rebuild(tree: Any, leaves: Any) -> Any:
    """The NamedTuple structure of the shape tree ``tree`` with its leaves taken from the
    iterator ``leaves`` in field order."""
    if state_lib.is_namedtuple(tree):
        return type(tree)(*(_rebuild(field, leaves) for field in tree))
    return next(leaves)


class MemoryPolicy(RecurrentActorCriticPolicy):
    """sb3-contrib's recurrent actor-critic with a memory core in the place of the LSTM.

    ``RecurrentPPO(MemoryPolicy, env, policy_kwargs={"core": "dnc", "core_kwargs": {...}})``.
    Features extractor -> core -> MLP heads (``net_arch``) -> action distribution and value.

    Critic modes (sb3-contrib's flags, same meaning):

    ====================  =====================  =====================================================
    ``shared_lstm``        ``enable_critic_lstm``  critic
    ====================  =====================  =====================================================
    False                  True (default)          separate critic core (same ``core``/``core_kwargs``)
    True                   False                   shared core; the value head reads the actor core's
                                                   output *detached* (only the actor loss trains it)
    False                  False                   feed-forward: ``Linear(features, core output)``
    ====================  =====================  =====================================================

    ``train_shared_core=True`` (with ``shared_lstm=True``) lets the value loss train the shared
    core as well: the value head reads the core's output *with* its gradient, as one recurrent
    encoder trained by both losses does in CleanRL's and MarcoMeter's PPO-LSTM (config
    ``policy.critic: joint``). The value loss then teaches the core to keep what predicts return
    (the cue of a memory task), a regression signal far denser than the policy gradient's.

    :param observation_space: observation space (Box, or Dict with a Dict-aware extractor).
    :param action_space: action space.
    :param lr_schedule: learning-rate schedule; ``lr_schedule(1)`` is the initial rate.
    :param core: registry name of the core, one of :func:`memagents.cores.available`.
    :param core_kwargs: the core's hyperparameters (``hidden_size``, ``memory_size`` N,
        ``word_size`` W, ``num_reads`` R, ...; see :func:`memagents.cores.core_kwargs`), without
        ``input_size``, which is the features extractor's ``features_dim``.
    :param shared_lstm: one core for actor and critic (see the table above).
    :param enable_critic_lstm: a separate core for the critic (see the table above).
    :param train_shared_core: with ``shared_lstm``, the value loss trains the shared core too
        (not detached); ``False`` keeps sb3-contrib's detached value input.
    :param net_arch: hidden layers of the MLP heads on top of the core's output, as in SB3:
        ``[64, 64]`` or ``dict(pi=[...], vf=[...])``; ``None`` means SB3's default ``[64, 64]``.
    :param activation_fn: activation of the MLP heads.
    :param ortho_init: orthogonal initialisation of the features extractor, MLP heads and output
        layers (the cores keep their own initialisation).
    :param use_sde: generalised state-dependent exploration (Box actions only).
    :param log_std_init: initial log standard deviation of Gaussian actions.
    :param full_std: gSDE: ``(n_features x n_actions)`` std parameters instead of ``n_features``.
    :param use_expln: gSDE: ``expln()`` instead of ``exp()`` to keep the std positive.
    :param squash_output: squash Gaussian actions with ``tanh`` (gSDE).
    :param features_extractor_class: the features extractor; ``None`` chooses
        ``CombinedExtractor`` for Dict observations and ``FlattenExtractor`` otherwise.
    :param features_extractor_kwargs: keyword arguments of the features extractor.
    :param share_features_extractor: one features extractor for actor and critic (required by
        ``shared_lstm``).
    :param normalize_images: divide image observations by 255.
    :param optimizer_class: the optimizer (``torch.optim.Adam`` by default).
    :param optimizer_kwargs: optimizer keyword arguments besides the learning rate.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        core: str = "lstm",
        core_kwargs: dict[str, Any] | None = None,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        train_shared_core: bool = False,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        if core not in cores.available():
            raise ValueError(
                f"core={core!r} is invalid: expected one of {', '.join(cores.available())}"
            )
        if shared_lstm and enable_critic_lstm:
            raise ValueError(
                "shared_lstm=True and enable_critic_lstm=True are exclusive: choose a shared core, "
                "a separate critic core, or neither (feed-forward critic)"
            )
        if train_shared_core and not shared_lstm:
            raise ValueError(
                "train_shared_core=True needs shared_lstm=True (it says whether the value loss "
                "trains the shared core)"
            )
        if shared_lstm and not share_features_extractor:
            raise ValueError(
                "shared_lstm=True needs share_features_extractor=True (one core, one input)"
            )
        if features_extractor_class is None:
            features_extractor_class = (
                CombinedExtractor
                if isinstance(observation_space, spaces.Dict)
                else FlattenExtractor
            )
        # Read by _build_mlp_extractor, which ActorCriticPolicy.__init__ calls before it creates
        # the optimizer: the cores are built there, so the optimizer holds their parameters.
        self.core_name = core
        self.core_kwargs = dict(core_kwargs or {})
        self.shared_lstm = bool(shared_lstm)
        self.enable_critic_lstm = bool(enable_critic_lstm)
        self.train_shared_core = bool(train_shared_core)
        # RecurrentActorCriticPolicy.__init__ is skipped on purpose: it would build nn.LSTMs
        # (lstm_hidden_size=256 by default) only for them to be replaced. Everything it sets up
        # is set up here, in _build_mlp_extractor and by the properties below.
        ActorCriticPolicy.__init__(
            self,
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )
        # For sb3-contrib's predict(): (num_layers, 1, hidden_size) per env.
        self.lstm_hidden_state_shape = (1, 1, self.memory_actor.hidden_size)

    # -- construction --------------------------------------------------------------------------
    def _make_core(self) -> PackedCore:
        # SB3's extractors give features_dim as a numpy integer for MultiDiscrete observations
        # (sum of nvec), which the cores' integer checks refuse
        return PackedCore(
            cores.make(self.core_name, input_size=int(self.features_dim), **self.core_kwargs)
        )

    def _build_mlp_extractor(self) -> None:
        """Build the core(s), the feed-forward critic if any, and the MLP heads on the core output."""
        self.memory_actor = self._make_core()
        self.lstm_output_dim = self.memory_actor.output_size
        self.memory_critic = self._make_core() if self.enable_critic_lstm else None
        self.critic = None
        if not (self.shared_lstm or self.enable_critic_lstm):
            # feed-forward critic: features -> the width of the core's output
            self.critic = nn.Linear(int(self.features_dim), self.lstm_output_dim)
        self.mlp_extractor = MlpExtractor(
            self.lstm_output_dim,
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            device=self.device,
        )

    @property
    def lstm_actor(self) -> PackedCore:
        """The actor core, under the name RecurrentPPO reads its state sizes from."""
        return self.memory_actor

    @property
    def lstm_critic(self) -> PackedCore | None:
        """The separate critic core (``enable_critic_lstm=True``), else ``None``."""
        return self.memory_critic

    @property
    def lstm_kwargs(self) -> dict[str, Any]:
        """sb3-contrib's name for the recurrent module's keyword arguments: ``core_kwargs``."""
        return self.core_kwargs

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            core=self.core_name,
            core_kwargs=self.core_kwargs,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            train_shared_core=self.train_shared_core,
            share_features_extractor=self.share_features_extractor,
        )
        return data

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self, n_envs: int, device: torch.device | str | None = None) -> RNNStates:
        """The packed initial states of actor and critic, as RecurrentPPO keeps them.

        :param n_envs: ``B``.
        :param device: defaults to the policy's device.
        :return: ``RNNStates(pi=(h, c), vf=(h, c))``, each tensor ``(1, n_envs, H)``, detached
            (values to store; inside the core a reset uses the learned initial state with grad).
        """
        device = self.device if device is None else device
        with torch.no_grad():
            # clones: the packed halves may be views of learned initial-state parameters
            pi = tuple(t.clone() for t in self.memory_actor.initial_hc(n_envs, device))
            vf = pi
            if self.memory_critic is not None:
                vf = tuple(t.clone() for t in self.memory_critic.initial_hc(n_envs, device))
        return RNNStates(pi, vf)

    @staticmethod
    def _process_sequence(
        features: Tensor,
        lstm_states: HC,
        episode_starts: Tensor,
        lstm: PackedCore,
    ) -> tuple[Tensor, HC]:
        """Run a core over padded sequences in one call (rollout: sequences of length 1).

        :param features: ``(n_seq * T, features_dim)``, sequence-major as sb3-contrib pads them.
        :param lstm_states: packed state before each sequence, ``(h, c)`` each ``(1, n_seq, H)``.
        :param episode_starts: ``(n_seq * T,)``, 1 where a step starts an episode.
        :param lstm: the :class:`PackedCore` to run.
        :return: ``(n_seq * T, output_size)`` and the packed state after the last step.
        """
        n_seq = lstm_states.n if isinstance(lstm_states, ColumnStates) else lstm_states[0].shape[1]
        # (n_seq * T, F) -> (n_seq, T, F) -> (T, n_seq, F)
        x = features.reshape(n_seq, -1, lstm.input_size).transpose(0, 1)
        # (n_seq * T,) -> (n_seq, T) -> (T, n_seq)
        starts = episode_starts.reshape(n_seq, -1).transpose(0, 1)
        y, hc = lstm(x, lstm_states, starts)  # y: (T, n_seq, O)
        # (T, n_seq, O) -> (n_seq, T, O) -> (n_seq * T, O)
        return y.transpose(0, 1).reshape(-1, lstm.output_size), hc

    # -- the four entry points sb3-contrib calls -----------------------------------------------
    def _latents(
        self, obs: Tensor, lstm_states: RNNStates, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, RNNStates]:
        """Features -> core(s) -> MLP heads: ``(latent_pi, latent_vf, new_states)``."""
        features = self.extract_features(obs)
        if self.share_features_extractor:
            pi_features = vf_features = features
        else:
            pi_features, vf_features = features
        latent_pi, states_pi = self._process_sequence(
            pi_features, lstm_states.pi, episode_starts, self.memory_actor
        )
        if self.memory_critic is not None:
            latent_vf, states_vf = self._process_sequence(
                vf_features, lstm_states.vf, episode_starts, self.memory_critic
            )
        elif self.shared_lstm:
            # sb3-contrib's semantics: the value head reads the shared core without training it;
            # with train_shared_core the value loss trains it too (the state is a value to store)
            latent_vf = latent_pi if self.train_shared_core else latent_pi.detach()
            states_vf = (
                None if states_pi is None else (states_pi[0].detach(), states_pi[1].detach())
            )
        else:
            latent_vf = self.critic(vf_features)
            states_vf = states_pi
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        return latent_pi, latent_vf, RNNStates(states_pi, states_vf)

    def forward(
        self,
        obs: Tensor,
        lstm_states: RNNStates,
        episode_starts: Tensor,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, RNNStates]:
        """One rollout step for ``n_envs`` environments.

        :param obs: observations, ``(n_envs, *obs_shape)`` (or a dict of them).
        :param lstm_states: packed states before the step, ``(h, c)`` each ``(1, n_envs, H)``.
        :param episode_starts: ``(n_envs,)``, 1 where the observation starts an episode.
        :param deterministic: take the distribution's mode instead of sampling.
        :return: actions, values ``(n_envs, 1)``, log-probabilities ``(n_envs,)``, new states.
        """
        latent_pi, latent_vf, states = self._latents(obs, lstm_states, episode_starts)
        return *self._act(latent_pi, latent_vf, deterministic), states

    def _act(
        self, latent_pi: Tensor, latent_vf: Tensor, deterministic: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Heads' latents -> actions, values ``(n_envs, 1)`` and log-probabilities."""
        values = self.value_net(latent_vf)
        distribution = self._action_distribution(latent_pi, deterministic)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def _action_distribution(self, latent_pi: Tensor, deterministic: bool) -> Distribution:
        """The action distribution of a rollout or evaluation step: SB3's for the mode, the
        unvalidated one (:meth:`_sampling_distribution`) for samples."""
        if deterministic:
            return self._get_action_dist_from_latent(latent_pi)
        return self._sampling_distribution(latent_pi)

    def initial_native(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> RNNStates:
        """The cores' own initial states (:meth:`unpack_states` of the packed initial state, with
        the sparse cores' memories left as broadcast zeros): ``RNNStates(pi, vf or None)``."""
        pi = self.memory_actor.core.initial_state(batch_size, device)
        vf = None
        if self.memory_critic is not None:
            vf = self.memory_critic.core.initial_state(batch_size, device)
        return RNNStates(pi, vf)

    def snapshot_states(self, native: RNNStates) -> RNNStates:
        """Copies of the cores' own states that later rollout steps leave alone
        (:meth:`~memagents.cores.base.MemoryCore.snapshot`): a rollout's start states."""
        pi = self.memory_actor.core.snapshot(native.pi)
        vf = None if native.vf is None else self.memory_critic.core.snapshot(native.vf)
        return RNNStates(pi, vf)

    def unpack_states(self, states: RNNStates) -> RNNStates:
        """Packed rollout states -> the cores' own states for :meth:`rollout_step`:
        ``RNNStates(pi=actor state, vf=critic state or None)``."""
        vf = self.memory_critic.unpack(states.vf) if self.memory_critic is not None else None
        return RNNStates(self.memory_actor.unpack(states.pi), vf)

    def pack_states(self, native: RNNStates) -> RNNStates:
        """:meth:`unpack_states` reversed: the packed states :meth:`forward` would have returned
        (with a shared core, the critic's half is the actor's, detached)."""
        pi = self.memory_actor.pack(native.pi)
        if self.memory_critic is not None:
            return RNNStates(pi, self.memory_critic.pack(native.vf))
        return RNNStates(pi, (pi[0].detach(), pi[1].detach()))

    @torch.no_grad()
    def act_native(
        self, obs: Tensor, state: Any, episode_starts: Tensor, deterministic: bool = True
    ) -> tuple[Tensor, Any]:
        """The actor alone, one step on its core's own state (evaluation): actions and the new
        state (handed over, as in :meth:`rollout_step`)."""
        features = self.extract_features(obs)
        pi_features = features if self.share_features_extractor else features[0]
        latent_pi, state = self.memory_actor.step_native(pi_features, state, episode_starts)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        actions = self._action_distribution(latent_pi, deterministic).get_actions(deterministic)
        return actions.reshape((-1, *self.action_space.shape)), state

    @torch.no_grad()
    def predict_values_native(
        self, obs: Tensor, native: RNNStates, episode_starts: Tensor
    ) -> Tensor:
        """:meth:`predict_values` for one step on the cores' own states, which are left as they
        were (:meth:`PackedCore.peek_native`): a rollout's bootstrap values, ``(n_envs, 1)``."""
        features = super(ActorCriticPolicy, self).extract_features(obs, self.vf_features_extractor)
        if self.memory_critic is not None:
            latent_vf = self.memory_critic.peek_native(features, native.vf, episode_starts)
        elif self.shared_lstm:
            latent_vf = self.memory_actor.peek_native(features, native.pi, episode_starts)
        else:
            latent_vf = self.critic(features)
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf))

    @torch.no_grad()
    def rollout_step(
        self, obs: Tensor, native: RNNStates, episode_starts: Tensor, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, RNNStates]:
        """:meth:`forward` (sampling) on the cores' own states (:meth:`unpack_states`), which are
        not packed into ``(h, c)`` and back at every step: the same actions, values,
        log-probabilities and states, for a rollout loop that packs only at its ends.

        :param obs: ``(n_envs, *obs_shape)``.
        :param native: ``RNNStates(pi=actor state, vf=critic state or None)``.
        :param episode_starts: ``(n_envs,)``, 1 where the observation starts an episode.
        :param deterministic: the distribution's mode instead of a sample (evaluation).
        :return: actions, values ``(n_envs, 1)``, log-probabilities ``(n_envs,)``, new states.
        """
        features = self.extract_features(obs)
        if self.share_features_extractor:
            pi_features = vf_features = features
        else:
            pi_features, vf_features = features
        latent_pi, state_pi = self.memory_actor.step_native(pi_features, native.pi, episode_starts)
        state_vf = None
        if self.memory_critic is not None:
            latent_vf, state_vf = self.memory_critic.step_native(
                vf_features, native.vf, episode_starts
            )
        elif self.shared_lstm:
            latent_vf = latent_pi
        else:
            latent_vf = self.critic(vf_features)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        return *self._act(latent_pi, latent_vf, deterministic), RNNStates(state_pi, state_vf)

    def _sampling_distribution(self, latent_pi: Tensor) -> Distribution:
        """``_get_action_dist_from_latent`` for sampling in rollouts: Categorical and Bernoulli
        actions skip torch's argument validation (a few tensor checks and host syncs per step);
        the values are the same, and NaN logits still fail, in the sampler itself. Other action
        distributions are built as SB3 builds them."""
        torch_cls = _UNVALIDATED.get(type(self.action_dist))
        if torch_cls is None:
            return self._get_action_dist_from_latent(latent_pi)
        self.action_dist.distribution = torch_cls(
            logits=self.action_net(latent_pi), validate_args=False
        )
        return self.action_dist

    def evaluate_actions(
        self,
        obs: Tensor,
        actions: Tensor,
        lstm_states: RNNStates,
        episode_starts: Tensor,
        per_element: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Values, log-probabilities and entropy of stored actions over padded sequences.

        :param obs: ``(n_seq * T, *obs_shape)``, sequence-major.
        :param actions: ``(n_seq * T, *action_shape)``.
        :param lstm_states: packed states at the sequence starts, each ``(1, n_seq, H)``.
        :param episode_starts: ``(n_seq * T,)``.
        :param per_element: log-probabilities per action element, ``(n_seq * T, A)``, whose sum
            is the joint one (``MultiBinary(A)``: each Bernoulli; ``Discrete``: ``A = 1``), for
            ``ppo.credit: element``; other action spaces raise ``ValueError``.
        :return: values ``(n_seq * T, 1)``, log-probabilities ``(n_seq * T,)`` (or
            ``(n_seq * T, A)``) and entropy ``(n_seq * T,)``.
        """
        latent_pi, latent_vf, _ = self._latents(obs, lstm_states, episode_starts)
        distribution = self._get_action_dist_from_latent(latent_pi)
        if isinstance(self.action_space, spaces.MultiBinary) and not actions.is_floating_point():
            # SB3 >= 2.7 buffers keep MultiBinary actions as int8 and sb3-contrib's RecurrentPPO
            # passes them on as they are; Bernoulli.log_prob (BCE) needs floats
            actions = actions.float()
        if not per_element:
            log_prob = distribution.log_prob(actions)
        elif isinstance(self.action_space, spaces.MultiBinary):
            log_prob = distribution.distribution.log_prob(actions).flatten(1)
        elif isinstance(self.action_space, spaces.Discrete):
            log_prob = distribution.log_prob(actions)[:, None]
        else:
            raise ValueError(
                f"per-element log-probabilities need a Discrete or MultiBinary action space, "
                f"not {self.action_space}"
            )
        return self.value_net(latent_vf), log_prob, distribution.entropy()

    def get_distribution(
        self, obs: Tensor, lstm_states: HC, episode_starts: Tensor
    ) -> tuple[Distribution, HC]:
        """The actor's action distribution and its new packed state.

        :param obs: ``(B * T, *obs_shape)``.
        :param lstm_states: the actor's packed state, ``(h, c)`` each ``(1, B, H)``.
        :param episode_starts: ``(B * T,)``.
        """
        features = super(ActorCriticPolicy, self).extract_features(obs, self.pi_features_extractor)
        latent_pi, states = self._process_sequence(
            features, lstm_states, episode_starts, self.memory_actor
        )
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        return self._get_action_dist_from_latent(latent_pi), states

    @torch.no_grad()
    def debug_step(
        self, obs: Tensor, state: Any, episode_start: Tensor, deterministic: bool = True
    ) -> tuple[Tensor, Any, dict[str, Tensor]]:
        """One actor step that also returns the core's debug tensors (for recordings and plots).

        :param obs: ``(B, *obs_shape)`` observation tensor (``policy.obs_to_tensor``).
        :param state: the actor core's NamedTuple state (``policy.memory_actor.core`` format);
            ``None`` means its initial state.
        :param episode_start: ``(B,)``, 1 where this step starts an episode.
        :param deterministic: the distribution's mode instead of a sample.
        :return: actions ``(B, *action_shape)``, the new core state, and the core's per-step
            debug tensors ``{name: [B, ...]}`` (memory, read/write weightings, usage, link, ...).
        """
        core = self.memory_actor.core
        features = super(ActorCriticPolicy, self).extract_features(obs, self.pi_features_extractor)
        if state is None:
            state = core.initial_state(features.shape[0], features.device)
        starts = episode_start.reshape(1, -1).to(features.device)
        y, state, debug = core(features.unsqueeze(0), state, starts, return_debug=True)
        latent_pi = self.mlp_extractor.forward_actor(y[0])
        actions = self._get_action_dist_from_latent(latent_pi).get_actions(deterministic)
        return actions, state, {k: v[0] for k, v in debug.items()}

    def predict_values(self, obs: Tensor, lstm_states: HC, episode_starts: Tensor) -> Tensor:
        """Values ``(B * T, 1)`` given the critic's packed state (``(h, c)`` each ``(1, B, H)``).

        With a shared core, ``lstm_states`` is the actor's state; with a feed-forward critic it
        is ignored.
        """
        features = super(ActorCriticPolicy, self).extract_features(obs, self.vf_features_extractor)
        if self.memory_critic is not None:
            latent_vf, _ = self._process_sequence(
                features, lstm_states, episode_starts, self.memory_critic
            )
        elif self.shared_lstm:
            latent_vf, _ = self._process_sequence(
                features, lstm_states, episode_starts, self.memory_actor
            )
            if not self.train_shared_core:
                latent_vf = latent_vf.detach()
        else:
            latent_vf = self.critic(features)
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf))

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Actions for deployment, threading the packed state by hand::

            state, start = None, np.ones(n_envs, dtype=bool)
            while True:
                action, state = policy.predict(obs, state, start, deterministic=True)
                obs, reward, done, info = vec_env.step(action)
                start = done

        :param observation: ``(n_envs, *obs_shape)`` (or one unbatched observation).
        :param state: the ``(h, c)`` returned by the previous call, each ``(1, n_envs, H)``;
            ``None`` starts every env from the core's initial state.
        :param episode_start: ``(n_envs,)`` bool, True where ``observation`` starts an episode
            (that env's state is reset to the initial state); ``None`` means no resets.
        :param deterministic: take the distribution's mode instead of sampling.
        :return: actions and the new ``(h, c)`` state (numpy).
        """
        if state is None:
            # sb3-contrib would start from zeros, which is not every core's initial state:
            # start from zeros *and* reset, which restores the initial state exactly.
            n_envs = self._n_envs(observation)
            episode_start = np.ones(n_envs, dtype=bool)
        return super().predict(observation, state, episode_start, deterministic)

    def _n_envs(self, observation: np.ndarray | dict[str, np.ndarray]) -> int:
        obs, _ = self.obs_to_tensor(observation)
        if isinstance(obs, dict):
            obs = next(iter(obs.values()))
        return obs.shape[0]
