"""The SB3 bridge: :class:`MemoryPolicy` inside sb3-contrib's RecurrentPPO and :class:`MemoryPPO`.

What is checked, for every registered core:
- with unchanged weights, the log-probabilities and values recomputed in training from the rollout
  buffer's minibatches equal those recorded during the rollout (1e-5), for every critic mode and
  both buffers (sb3-contrib's, which stores every step's state, and the sequence-start buffer);
- a step that starts an episode runs from exactly ``core.initial_state`` (learned init set to
  nonzero values, garbage or NaN in the carried state), in rollout and in training;
- the optimizer holds every parameter and ``learn`` moves the core's weights;
- SB3 ``save``/``load`` rebuilds the model: identical actions and states;
- ``predict(obs, state, episode_start)`` threads and resets the state as the rollout does.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import PATH_TOL, PATH_TOL_F64
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import Tensor

import envs  # noqa: F401  (registers memagents/Recall-v0)
import memagents.cores as cores
from memagents.sb3 import (
    MemoryPolicy,
    MemoryPPO,
    PackedCore,
    SequenceStartDictRolloutBuffer,
    SequenceStartRolloutBuffer,
    recurrent_state_nbytes,
)

ENV_ID = "memagents/Recall-v0"
N_ENVS = 2
N_STEPS = 16
BATCH_SIZE = 12  # not a divisor of N_STEPS * N_ENVS: minibatches cut sequences at odd places

#: Tiny hyperparameters; each core takes the ones its constructor accepts.
TINY: dict[str, Any] = {
    "hidden_size": 8,
    "memory_size": 6,
    "word_size": 4,
    "num_reads": 2,
    "num_writes": 1,
    "num_heads": 1,
    "max_shift": 1,
    "learn_init": True,
}

CORES = cores.available()

#: critic mode -> sb3-contrib's flags.
CRITIC_MODES: dict[str, dict[str, bool]] = {
    "separate": {"shared_lstm": False, "enable_critic_lstm": True},
    "shared": {"shared_lstm": True, "enable_critic_lstm": False},
    "joint": {"shared_lstm": True, "enable_critic_lstm": False, "train_shared_core": True},
    "feedforward": {"shared_lstm": False, "enable_critic_lstm": False},
}

#: buffer -> algorithm class that uses it.
ALGOS: dict[str, type[RecurrentPPO]] = {"stock": RecurrentPPO, "seqstart": MemoryPPO}

#: Names of parameters that hold a learned initial state.
INIT_PARAMS = ("h0", "c0", "read0", "read_logits0", "write_logits0")


def tiny_kwargs(name: str) -> dict[str, Any]:
    allowed = set(cores.core_kwargs(name))
    return {k: v for k, v in TINY.items() if k in allowed}


class DictObs(gym.ObservationWrapper):
    """Recall with a Dict observation: ``{"cue": [S], "query": [1]}``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        size = env.observation_space.shape[0]
        self.observation_space = spaces.Dict(
            {
                "cue": spaces.Box(0.0, 1.0, (size - 1,), np.float32),
                "query": spaces.Box(0.0, 1.0, (1,), np.float32),
            }
        )

    def observation(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        return {"cue": obs[:-1], "query": obs[-1:]}


def make_env(n_envs: int = N_ENVS, dict_obs: bool = False, seed: int = 0) -> DummyVecEnv:
    def make() -> gym.Env:
        env = gym.make(ENV_ID)
        return DictObs(env) if dict_obs else env

    venv = DummyVecEnv([make] * n_envs)
    venv.seed(seed)
    return venv


def randomize_initial_state(policy: MemoryPolicy, seed: int = 1) -> None:
    """Nonzero learned initial states, so that a reset to zeros cannot pass for a reset to them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.rsplit(".", 1)[-1] in INIT_PARAMS:
                param.copy_(torch.randn(param.shape, generator=gen))


def make_model(
    core: str,
    critic: str = "separate",
    algo: str = "stock",
    dict_obs: bool = False,
    n_envs: int = N_ENVS,
    **kwargs: Any,
) -> RecurrentPPO:
    policy_kwargs = {
        "core": core,
        "core_kwargs": tiny_kwargs(core),
        "net_arch": [16],
        **CRITIC_MODES[critic],
    }
    kwargs = {"n_steps": N_STEPS, "batch_size": BATCH_SIZE, "n_epochs": 1, "seed": 0, **kwargs}
    model = ALGOS[algo](
        MemoryPolicy, make_env(n_envs, dict_obs), policy_kwargs=policy_kwargs, **kwargs
    )
    randomize_initial_state(model.policy)
    return model


def collect(model: RecurrentPPO, rollouts: int = 1) -> None:
    """Fill the rollout buffer without training (the last of ``rollouts`` rollouts is kept)."""
    _, callback = model._setup_learn(rollouts * model.n_steps * model.n_envs, callback=None)
    callback.on_training_start(locals(), globals())
    for _ in range(rollouts):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)


def garbage_states(policy: MemoryPolicy, n: int, fill: float) -> RNNStates:
    shape = (1, n, policy.lstm_actor.hidden_size)
    g = torch.full(shape, fill)
    return RNNStates((g, g.clone()), (g.clone(), g.clone()))


# -- PackedCore ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORES)
def test_packed_core_sizes_and_exact_round_trip(name: str) -> None:
    torch.manual_seed(0)
    core = cores.make(name, input_size=3, **tiny_kwargs(name))
    packed = PackedCore(core)
    assert packed.num_layers == 1
    assert packed.hidden_size == max(1, math.ceil(core.state_size / 2))
    with torch.no_grad():
        _, state = core(torch.randn(4, 5, 3), core.initial_state(5))
        h, c = packed.pack(state)
    assert h.shape == c.shape == (1, 5, packed.hidden_size)
    flat = torch.cat([h[0], c[0]], dim=1)
    # bitwise: packing and unpacking only copy and reshape
    assert torch.equal(flat[:, : core.state_size], core.pack_state(state))
    assert torch.all(flat[:, core.state_size :] == 0)  # padding
    assert torch.equal(core.pack_state(packed.unpack((h, c))), core.pack_state(state))


@pytest.mark.parametrize("name", CORES)
def test_packed_layout_equals_padded_flat_state(name: str) -> None:
    """pack/unpack by the precomputed layout = padding ``core.pack_state`` to ``[B, 2H]`` and
    splitting it (the definition), exactly, with gradients flowing through both (bitwise: copies
    and reshapes, whose gradients are copies too)."""
    torch.manual_seed(0)
    core = cores.make(name, input_size=3, **tiny_kwargs(name)).double()
    packed = PackedCore(core)
    S, H = packed.state_size, packed.hidden_size
    flat = torch.randn(5, 2 * H, dtype=torch.float64, requires_grad=True)
    h, c = flat[:, :H].unsqueeze(0), flat[:, H:].unsqueeze(0)
    state = packed.unpack((h, c))
    assert torch.equal(core.pack_state(state), flat[:, :S])
    h2, c2 = packed.pack(state)
    expected = torch.cat([flat[:, :S], flat.new_zeros(5, 2 * H - S)], dim=1)
    assert torch.equal(torch.cat([h2[0], c2[0]], dim=1), expected)
    # gradients: d(sum w * pack(unpack(flat))) / d flat = w on the state, 0 on the padding
    if S == 0:  # the memoryless core: padding only
        return
    w = torch.randn(5, 2 * H, dtype=torch.float64)
    (torch.cat([h2[0], c2[0]], dim=1) * w).sum().backward()
    assert torch.equal(flat.grad[:, :S], w[:, :S])
    assert torch.all(flat.grad[:, S:] == 0)


def test_packed_lstm_state_is_views_without_copies() -> None:
    """The LSTM's ``h`` and ``c`` are exactly the two packed halves: no copy either way."""
    core = cores.make("lstm", input_size=3, hidden_size=8)
    packed = PackedCore(core)
    hc = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    state = packed.unpack(hc)
    assert state.h.data_ptr() == hc[0].data_ptr() and state.c.data_ptr() == hc[1].data_ptr()
    with torch.no_grad():
        _, new = core(torch.randn(1, 4, 3), state, None)
    h, c = packed.pack(new)
    assert h.data_ptr() == new.h.data_ptr() and c.data_ptr() == new.c.data_ptr()


@pytest.mark.parametrize("name", CORES)
@pytest.mark.parametrize("T", [1, 3])
def test_cores_leave_their_input_state_untouched(name: str, T: int) -> None:
    """PackedCore hands the core views into sb3-contrib's stored ``(h, c)``: a core that wrote
    into its input state would corrupt the rollout buffer, so none may."""
    torch.manual_seed(0)
    core = cores.make(name, input_size=3, **tiny_kwargs(name))
    packed = PackedCore(core)
    with torch.no_grad():
        _, state = core(torch.randn(4, 3, 3), core.initial_state(3))
        h, c = packed.pack(state)
    hc = (h.clone(), c.clone())
    before = (hc[0].clone(), hc[1].clone())
    starts = torch.tensor([[1.0, 0.0, 0.0]] + [[0.0, 1.0, 0.0]] * (T - 1))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            packed(torch.randn(T, 3, 3), hc, starts)
        assert torch.equal(hc[0], before[0]) and torch.equal(hc[1], before[1])  # untouched


@pytest.mark.parametrize("name", CORES)
def test_rollout_step_reset_on_packed_state_equals_core_reset(name: str) -> None:
    """A rollout step (T = 1, no grad) resets on the packed state with the cached initial
    state; it must give what the core's own reset gives (garbage and NaN in the reset rows,
    learned initial state set to nonzero values), up to float64 rounding: the core then runs on
    views into the packed halves, the reference on its reset's dense tensors, the same values in
    other layouts (a library matmul may round another leading dimension differently)."""
    torch.manual_seed(0)
    core = cores.make(name, input_size=3, **tiny_kwargs(name)).double()
    with torch.no_grad():
        for pname, p in core.named_parameters():
            if pname.split(".")[-1] in INIT_PARAMS:
                p.uniform_(-0.5, 0.5)
    packed = PackedCore(core)
    B = 4
    with torch.no_grad():
        _, state = core(torch.randn(3, B, 3, dtype=torch.float64), core.initial_state(B))
        h, c = packed.pack(state)
    h, c = h.clone(), c.clone()
    h[:, 1], c[:, 3] = float("nan"), 7.0  # garbage in rows that reset
    starts = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.randn(1, B, 3, dtype=torch.float64)
    with torch.no_grad():
        y, (h1, c1) = packed(x, (h, c), starts)
        y_ref, state_ref = core(x, packed.unpack((h, c)), starts)
    h_ref, c_ref = packed.pack(state_ref)
    torch.testing.assert_close(y, y_ref, **PATH_TOL_F64)  # NaN anywhere would fail too
    torch.testing.assert_close(h1, h_ref, **PATH_TOL_F64)
    torch.testing.assert_close(c1, c_ref, **PATH_TOL_F64)
    assert not torch.isnan(h1).any()


def test_cached_initial_state_follows_parameter_changes() -> None:
    """The packed initial state cached for rollouts is recomputed after an optimizer step,
    ``load_state_dict`` and a new batch size: learned initial states change every update."""
    torch.manual_seed(0)
    core = cores.make("lstm", input_size=3, hidden_size=4, learn_init=True)
    packed = PackedCore(core)
    x, starts = torch.randn(1, 2, 3), torch.ones(1, 2)
    hc = (torch.full((1, 2, 4), 3.0), torch.full((1, 2, 4), 3.0))

    def rollout_step(batch: int = 2) -> Tensor:
        with torch.no_grad():
            y, _ = packed(x[:, :batch].expand(1, batch, 3), tuple(t[:, :1].expand(1, batch, 4)
                          for t in hc), starts[:, :1].expand(1, batch))  # fmt: skip
            y_ref, _ = core(x[:, :batch].expand(1, batch, 3), None, None)  # from initial_state
        # up to float32 rounding: the rollout runs from a dense copy of the initial state, the
        # reference from its broadcast (another layout); a stale cache would be far off
        torch.testing.assert_close(y, y_ref, **PATH_TOL)
        return y

    first = rollout_step()
    optimizer = torch.optim.SGD(core.parameters(), lr=0.5)
    loss = sum((p - 1).square().sum() for p in (core.h0, core.c0))
    loss.backward()
    optimizer.step()  # in place: h0 and c0 move
    second = rollout_step()
    assert not torch.equal(first, second)
    core.load_state_dict({k: torch.zeros_like(v) for k, v in core.state_dict().items()})
    assert torch.equal(rollout_step(), torch.zeros_like(first))  # zero weights: exactly 0
    rollout_step(batch=1)


@pytest.mark.parametrize("env_id", [ENV_ID, "memagents/Copy-v0"])  # Discrete, MultiBinary
def test_rollout_sampling_without_validation_equals_sb3_distribution(env_id: str) -> None:
    """Rollout steps sample from Categorical/Bernoulli built without torch's argument checks:
    the same actions (same generator draws) and log-probabilities as SB3's own distribution."""
    venv = DummyVecEnv([lambda: gym.make(env_id)] * 3)
    model = RecurrentPPO(MemoryPolicy, venv, policy_kwargs={"core": "lstm", "net_arch": [8]})
    policy = model.policy
    obs = torch.as_tensor(venv.reset(), dtype=torch.float32)
    states, starts = policy.initial_state(3), torch.ones(3)
    with torch.no_grad():
        torch.manual_seed(5)
        actions, values, log_prob, _ = policy.forward(obs, states, starts)
        latent_pi, latent_vf, _ = policy._latents(obs, states, starts)
        torch.manual_seed(5)
        reference = policy._get_action_dist_from_latent(latent_pi)
        ref_actions = reference.get_actions()
    assert reference.distribution._validate_args  # the reference path does validate
    # bitwise: the same latents (the same calls), then the same distribution formulas on the same
    # logits; only the argument checks differ
    assert torch.equal(actions, ref_actions.reshape(actions.shape))
    assert torch.equal(log_prob, reference.log_prob(ref_actions))
    assert torch.equal(values, policy.value_net(latent_vf))
    with torch.no_grad(), pytest.raises(RuntimeError):  # NaN logits still fail in the sampler
        policy._sampling_distribution(torch.full_like(latent_pi, float("nan"))).get_actions()


# -- rollout vs training ------------------------------------------------------------------------


def assert_training_matches_rollout(model: RecurrentPPO) -> None:
    """Recompute every minibatch of the (second) rollout and compare with the recorded values."""
    collect(model, rollouts=2)
    policy = model.policy
    mid_episode_sequences = 0
    covered = 0
    with torch.no_grad():
        for data in model.rollout_buffer.get(model.batch_size):
            actions = data.actions.long().flatten()
            values, log_prob, _ = policy.evaluate_actions(
                data.observations, actions, data.lstm_states, data.episode_starts
            )
            mask = data.mask > 0.5
            torch.testing.assert_close(log_prob[mask], data.old_log_prob[mask], atol=1e-5, rtol=0.0)
            torch.testing.assert_close(
                values.flatten()[mask], data.old_values[mask], atol=1e-5, rtol=0.0
            )
            n_seq = data.lstm_states.pi[0].shape[1]
            first_steps = data.episode_starts.reshape(n_seq, -1)[:, 0]
            mid_episode_sequences += int((first_steps == 0).sum())
            covered += int(mask.sum())
    assert covered == model.n_steps * model.n_envs
    # the stored (carried) state was used, not only resets at sequence starts
    assert mid_episode_sequences > 0


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("critic", list(CRITIC_MODES))
@pytest.mark.parametrize("name", CORES)
def test_training_recomputes_rollout_log_probs_and_values(
    name: str, critic: str, algo: str
) -> None:
    assert_training_matches_rollout(make_model(name, critic, algo))


@pytest.mark.parametrize("name", ["lstm", "ntm"])
def test_rollouts_after_an_update_reset_to_the_updated_initial_state(name: str) -> None:
    """After ``learn`` has moved the learned initial state, rollouts (which reset with a cached
    packed initial state) must still match training's recomputation, which resets with the
    parameters as they are."""
    model = make_model(name)
    before = {k: v.clone() for k, v in model.policy.named_parameters() if k.endswith("h0")}
    model.learn(model.n_steps * model.n_envs)  # one rollout (fills the cache), one update
    after = dict(model.policy.named_parameters())
    assert before and all(not torch.equal(v, after[k]) for k, v in before.items())
    assert_training_matches_rollout(model)


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("name", ["lstm", "dnc"])
def test_training_recomputes_rollout_with_dict_observations(name: str, algo: str) -> None:
    model = make_model(name, "separate", algo, dict_obs=True)
    expected = SequenceStartDictRolloutBuffer if algo == "seqstart" else RecurrentRolloutBuffer
    if algo == "seqstart":
        assert isinstance(model.rollout_buffer, expected)
    assert_training_matches_rollout(model)


# -- resets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [1e3, float("nan")])
@pytest.mark.parametrize("name", CORES)
def test_rollout_episode_start_runs_from_initial_state(name: str, fill: float) -> None:
    policy = make_model(name).policy
    n = 3
    obs = obs_tensor_for(policy, n)
    initial = policy.initial_state(n)
    learned_init = any(n.rsplit(".", 1)[-1] in INIT_PARAMS for n, _ in policy.named_parameters())
    if learned_init:  # the reset must restore a state that is not zeros
        assert torch.any(initial.pi[0] != 0) or torch.any(initial.pi[1] != 0)
    with torch.no_grad():
        # reference: explicitly from the initial state, no reset
        _, values_ref, logp_ref, states_ref = policy(
            obs, initial, torch.zeros(n), deterministic=True
        )
        # carried state is garbage / NaN everywhere, but every env starts an episode
        _, values, logp, states = policy(
            obs, garbage_states(policy, n, fill), torch.ones(n), deterministic=True
        )
        features = policy.extract_features(obs)
        core = policy.lstm_actor.core
        _, core_state = core(features[None], core.initial_state(n), None)
    torch.testing.assert_close(values, values_ref, atol=1e-6, rtol=0.0)
    torch.testing.assert_close(logp, logp_ref, atol=1e-6, rtol=0.0)
    # the state after the step is the core's step from its own initial state
    torch.testing.assert_close(
        core.pack_state(policy.lstm_actor.unpack(states.pi)), core.pack_state(core_state)
    )
    for a, b in zip((*states.pi, *states.vf), (*states_ref.pi, *states_ref.vf), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0.0)


def obs_tensor_for(policy: MemoryPolicy, n: int, seed: int = 0) -> torch.Tensor:
    space = policy.observation_space
    space.seed(seed)
    return policy.obs_to_tensor(np.stack([space.sample() for _ in range(n)]))[0]


@pytest.mark.parametrize("critic", list(CRITIC_MODES))
@pytest.mark.parametrize("name", CORES)
def test_training_episode_starts_run_from_initial_state(name: str, critic: str) -> None:
    """Two padded sequences of T=4: sequence 0 starts an episode with a NaN stored state,
    sequence 1 carries a real state and starts a new episode at t=2."""
    policy = make_model(name, critic).policy
    n_seq, T = 2, 4
    obs = obs_tensor_for(policy, n_seq * T)
    actions = torch.zeros(n_seq * T, dtype=torch.long)
    starts = torch.zeros(n_seq, T)
    starts[0, 0] = 1.0
    starts[1, 2] = 1.0
    with torch.no_grad():
        # a real carried state for sequence 1
        _, _, _, carried = policy(obs[:n_seq], policy.initial_state(n_seq), torch.ones(n_seq))
        states = RNNStates(
            tuple(
                torch.cat([torch.full_like(t[:, :1], math.nan), t[:, 1:]], 1) for t in carried.pi
            ),
            tuple(
                torch.cat([torch.full_like(t[:, :1], math.nan), t[:, 1:]], 1) for t in carried.vf
            ),
        )
        values, logp, _ = policy.evaluate_actions(obs, actions, states, starts.flatten())
        values, logp = values.reshape(n_seq, T), logp.reshape(n_seq, T)
        # references run from the initial state without any reset
        obs_seq = obs.reshape(n_seq, T, -1)
        v0, l0, _ = policy.evaluate_actions(
            obs_seq[0], actions[:T], policy.initial_state(1), torch.zeros(T)
        )
        v1, l1, _ = policy.evaluate_actions(
            obs_seq[1, 2:], actions[:2], policy.initial_state(1), torch.zeros(2)
        )
    assert torch.isfinite(values).all() and torch.isfinite(logp).all()
    torch.testing.assert_close(values[0], v0.flatten(), atol=1e-6, rtol=0.0)
    torch.testing.assert_close(logp[0], l0, atol=1e-6, rtol=0.0)
    torch.testing.assert_close(values[1, 2:], v1.flatten(), atol=1e-6, rtol=0.0)
    torch.testing.assert_close(logp[1, 2:], l1, atol=1e-6, rtol=0.0)


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("critic", list(CRITIC_MODES))
@pytest.mark.parametrize("name", CORES)
def test_learn_moves_core_weights(name: str, critic: str) -> None:
    model = make_model(name, critic)
    policy = model.policy
    in_optimizer = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in policy.parameters()}
    trained = [policy.lstm_actor.core]
    if policy.lstm_critic is not None:
        trained.append(policy.lstm_critic.core)
    before = [torch.nn.utils.parameters_to_vector(m.parameters()).clone() for m in trained]
    model.learn(N_STEPS * N_ENVS)
    for module, old in zip(trained, before, strict=True):
        new = torch.nn.utils.parameters_to_vector(module.parameters())
        assert torch.isfinite(new).all()
        assert not torch.equal(new, old), f"{type(module).__name__} did not train"


@pytest.mark.parametrize("critic", ["shared", "joint"])
@pytest.mark.parametrize("name", ["lstm", "dnc"])
def test_value_loss_trains_the_shared_core_only_when_joint(name: str, critic: str) -> None:
    """``shared`` detaches the value head's input (sb3-contrib); ``joint`` lets the value loss
    reach the core: the gradient of the values alone w.r.t. the core's weights is zero in the one
    mode and nonzero in the other, while the heads get it in both."""
    model = make_model(name, critic, "seqstart")
    collect(model)
    policy = model.policy
    batch = next(model.rollout_buffer.get(batch_size=None))
    values, _, _ = policy.evaluate_actions(
        batch.observations, batch.actions, batch.lstm_states, batch.episode_starts
    )
    policy.zero_grad(set_to_none=True)
    values.square().sum().backward()
    core_grads = [p.grad for p in policy.lstm_actor.core.parameters()]
    reached = [g is not None and bool(g.abs().sum() > 0) for g in core_grads]
    assert any(reached) == (critic == "joint")
    assert policy.value_net.weight.grad is not None
    assert policy.value_net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("algo", list(ALGOS))
def test_short_dnc_learn_stays_finite(algo: str) -> None:
    model = make_model("dnc", "separate", algo, n_envs=4)
    model.learn(2 * N_STEPS * 4)
    assert model.num_timesteps == 2 * N_STEPS * 4
    for name, param in model.policy.named_parameters():
        assert torch.isfinite(param).all(), name
    for key in ("train/loss", "train/value_loss", "train/entropy_loss", "train/approx_kl"):
        assert np.isfinite(model.logger.name_to_value[key]), key


# -- sequence-start buffer ----------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True])
def test_sequence_start_minibatches_are_whole_episode_segments(pack: bool) -> None:
    # minibatches of >= 24 steps: several segments of Recall's 4-7 step episodes each
    model = make_model("gru", algo="seqstart", n_envs=3, pack_segments=pack, batch_size=24)
    collect(model, rollouts=2)
    buffer = model.rollout_buffer
    assert isinstance(buffer, SequenceStartRolloutBuffer)
    assert buffer.pack_segments is pack
    seen = []
    batches = list(buffer.get(model.batch_size))
    n_columns = n_segments = 0
    for i, data in enumerate(batches):
        n_seq = data.lstm_states.pi[0].shape[1]
        mask = data.mask.reshape(n_seq, -1) > 0.5
        starts = data.episode_starts.reshape(n_seq, -1)
        # valid steps are a prefix of each padded row
        lengths = mask.sum(1)
        assert torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None])
        # the segments: a column's first step, then every later episode start in it
        cuts = [
            [0, *(t for t in range(1, int(n)) if starts[c, t] > 0.5), int(n)]
            for c, n in enumerate(lengths)
        ]
        segment_lengths = [b - a for cut in cuts for a, b in itertools.pairwise(cut)]
        n_columns, n_segments = n_columns + n_seq, n_segments + len(segment_lengths)
        if not pack:  # an episode starts only at a segment's first step
            assert torch.all(starts[:, 1:] == 0)
        # columns are as long as the longest segment, and no longer
        assert mask.shape[1] == max(segment_lengths)
        if i < len(batches) - 1:
            assert int(lengths.sum()) >= model.batch_size
        seen.append(data.old_log_prob[data.mask > 0.5])
    # packing put several segments in some column; unpacked, one per column
    assert (n_columns < n_segments) if pack else (n_columns == n_segments)
    # every step of the rollout appears exactly once
    assert sum(len(s) for s in seen) == model.n_steps * model.n_envs
    torch.testing.assert_close(
        torch.sort(torch.cat(seen)).values,
        torch.sort(torch.as_tensor(buffer.log_probs.flatten())).values,
    )


def test_packing_is_best_fit_decreasing_with_continuations_heading_columns() -> None:
    """Hand-built rollout of 2 envs x 8 steps: env 0 continues an episode for 5 steps, then
    one of 3; env 1 runs episodes of 2, 4 and 2 steps. Longest segment T = 5. The continuation
    (5) heads its own column; the rest go longest first into the fullest column with room:
    4 -> new column [4]; 3 -> new [3]; 2 -> [3, 2]; 2 -> no room (4 + 2 > 5, 5) -> new [2]."""
    obs_space = spaces.Box(0.0, 1.0, (1,), np.float32)
    buffer = SequenceStartRolloutBuffer(
        8, obs_space, spaces.Discrete(2), (8, 1, 2, 3), "cpu", n_envs=2, pack_segments=True
    )
    starts = np.zeros((8, 2), dtype=np.float32)  # (n_steps, n_envs)
    starts[5, 0] = 1.0
    starts[[0, 2, 6], 1] = 1.0
    buffer.episode_starts = starts
    buffer._prepare()
    # flat env-major segment starts: env 0 at 0 and 5, env 1 at 8, 10 and 14
    assert buffer.segment_starts.tolist() == [0, 5, 8, 10, 14]
    assert buffer.segment_lengths.tolist() == [5, 3, 2, 4, 2]
    columns = buffer._columns(np.array([3, 1, 0, 4, 2]))
    assert columns == [[0], [3], [1, 4], [2]]
    indices, valid = buffer._padded_indices(columns)
    assert valid.sum(1).tolist() == [5, 4, 5, 2]
    assert indices[2].tolist() == [5, 6, 7, 14, 15]
    assert indices[3].tolist() == [8, 9, 8, 8, 8]  # padding repeats the column's first step
    # best fit, not first fit: env 0 continues for 2 steps (its column has 3 steps of room),
    # then runs episodes of 5 and 1; env 1 continues for 4 (room 1), then runs one of 4. The
    # 5 and the 4 fit no column and open two; the 1 goes to the fullest column it fits, env
    # 1's continuation (room 1), not to the first with room (env 0's, room 3)
    starts[:] = 0.0
    starts[[2, 7], 0] = 1.0
    starts[4, 1] = 1.0
    buffer.episode_starts = starts
    buffer._prepare()
    assert buffer.segment_lengths.tolist() == [2, 5, 1, 4, 4]
    assert buffer._columns(np.arange(5)) == [[0], [3, 2], [1], [4]]
    buffer.pack_segments = False
    assert buffer._columns(np.array([3, 1, 0])) == [[3], [1], [0]]


@pytest.mark.parametrize("critic", ["separate", "shared"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_packed_segments_match_the_rollout_in_whole_sequence_cores(name: str, critic: str) -> None:
    """``lstm`` and ``gru`` are not packed by default (a reset mid-sequence splits their
    ``nn.LSTM``/``nn.GRU`` call), but packing them must still be exact."""
    assert not make_model(name, critic, "seqstart").rollout_buffer.pack_segments
    model = make_model(name, critic, "seqstart", pack_segments=True)
    assert model.rollout_buffer.pack_segments
    assert_training_matches_rollout(model)


@pytest.mark.parametrize("name", [n for n in CORES if n not in ("lstm", "gru")])
def test_memory_cores_pack_segments_by_default(name: str) -> None:
    assert cores.make(name, input_size=3, **tiny_kwargs(name)).cheap_mid_sequence_resets
    assert make_model(name, "separate", "seqstart").rollout_buffer.pack_segments


def test_pack_segments_rejects_non_booleans() -> None:
    with pytest.raises(ValueError, match="pack_segments='yes'"):
        make_model("gru", algo="seqstart", pack_segments="yes")


def test_sequence_start_buffer_stores_states_once_per_rollout() -> None:
    """Measured: the DNC of the issue (N=64, W=16, R=4, 64 controller units) at n_steps=128,
    n_envs=16. sb3-contrib's buffer holds ~90 MiB of states; ours n_steps=128 times less."""
    core = cores.make(
        "dnc", input_size=8, hidden_size=64, memory_size=64, word_size=16, num_reads=4
    )
    hidden = PackedCore(core).hidden_size
    n_steps, n_envs = 128, 16
    obs_space = spaces.Box(0.0, 1.0, (8,), np.float32)
    act_space = spaces.Discrete(4)
    shape = (n_steps, 1, n_envs, hidden)
    stock = RecurrentRolloutBuffer(n_steps, obs_space, act_space, shape, "cpu", n_envs=n_envs)
    ours = SequenceStartRolloutBuffer(n_steps, obs_space, act_space, shape, "cpu", n_envs=n_envs)
    stock_bytes, our_bytes = recurrent_state_nbytes(stock), recurrent_state_nbytes(ours)
    assert stock_bytes == 4 * n_steps * n_envs * hidden * 4
    assert our_bytes * n_steps == stock_bytes
    assert stock_bytes > 80 * 2**20
    assert our_bytes < 2**20


# -- save / load and predict --------------------------------------------------------------------


def rollout_predictions(model: RecurrentPPO, steps: int = 12, seed: int = 3) -> list[Any]:
    """Deterministic actions and states of ``predict`` over a real episode stream."""
    env = make_env(N_ENVS, seed=seed)
    obs = env.reset()
    state, start = None, np.ones(N_ENVS, dtype=bool)
    out = []
    for _ in range(steps):
        action, state = model.predict(obs, state=state, episode_start=start, deterministic=True)
        out.append((action.copy(), state[0].copy(), state[1].copy()))
        obs, _, start, _ = env.step(action)
    return out


@pytest.mark.parametrize("name", CORES)
def test_save_load_round_trip_gives_identical_actions(name: str, tmp_path) -> None:
    model = make_model(name, "separate")
    model.learn(N_STEPS * N_ENVS)  # weights away from their initialisation
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = RecurrentPPO.load(path, device="cpu")
    assert isinstance(loaded.policy, MemoryPolicy)
    assert type(loaded.policy.lstm_actor.core) is type(model.policy.lstm_actor.core)
    assert loaded.policy.core_kwargs == tiny_kwargs(name)
    # bitwise: the loaded weights are the same values in the same layout, so both rollouts run
    # the same kernels on the same values
    for a, b in zip(rollout_predictions(model), rollout_predictions(loaded), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_policy_save_load_uses_constructor_parameters(tmp_path) -> None:
    model = make_model("ntm", "feedforward", algo="seqstart")
    path = tmp_path / "policy.pt"
    model.policy.save(path)
    loaded = MemoryPolicy.load(path, device="cpu")
    assert loaded.core_name == "ntm" and loaded.lstm_critic is None and loaded.critic is not None
    for (k, v), (k2, v2) in zip(
        model.policy.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("name", ["lstm", "ntm", "dnc"])
def test_predict_threads_and_resets_state(name: str) -> None:
    policy = make_model(name).policy
    space = policy.observation_space
    space.seed(0)
    obs_seq = np.stack(
        [np.stack([space.sample() for _ in range(2)]) for _ in range(5)]
    )  # [T, B, I]
    # state=None starts from the core's initial state (not from zeros)
    action_none, state_none = policy.predict(obs_seq[0], None, None, deterministic=True)
    initial = policy.initial_state(2).pi
    init_np = (initial[0].numpy(), initial[1].numpy())
    action_init, state_init = policy.predict(
        obs_seq[0], init_np, np.zeros(2, dtype=bool), deterministic=True
    )
    # discrete actions of states equal up to rounding: the same unless two logits tie to ~1e-6
    np.testing.assert_array_equal(action_none, action_init)
    np.testing.assert_allclose(state_none[0], state_init[0], atol=1e-6)
    np.testing.assert_allclose(state_none[1], state_init[1], atol=1e-6)
    # episode_start=True resets a garbage state to the initial state
    garbage = (np.full_like(init_np[0], 7.0), np.full_like(init_np[1], -7.0))
    _, state_reset = policy.predict(obs_seq[0], garbage, np.ones(2, dtype=bool), deterministic=True)
    np.testing.assert_allclose(state_reset[0], state_init[0], atol=1e-6)
    # threading the state step by step = the core over the whole sequence in one call
    state, start = None, None
    for obs in obs_seq:
        _, state = policy.predict(obs, state, start, deterministic=True)
        start = np.zeros(2, dtype=bool)
    core = policy.lstm_actor.core
    with torch.no_grad():
        x = policy.extract_features(torch.as_tensor(obs_seq.reshape(-1, obs_seq.shape[-1])))
        _, final = core(x.reshape(5, 2, -1), core.initial_state(2), None)
    packed = policy.lstm_actor.pack(final)
    np.testing.assert_allclose(state[0], packed[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(state[1], packed[1].numpy(), atol=1e-5)
    # and the state matters: a different history gives a different state
    assert not np.allclose(state[0], state_init[0])


# -- arguments ----------------------------------------------------------------------------------


def test_invalid_arguments_are_rejected() -> None:
    env = make_env()
    with pytest.raises(ValueError, match="core='nope'"):
        RecurrentPPO(MemoryPolicy, env, policy_kwargs={"core": "nope"})
    with pytest.raises(ValueError, match="exclusive"):
        RecurrentPPO(
            MemoryPolicy,
            env,
            policy_kwargs={"core": "gru", "shared_lstm": True, "enable_critic_lstm": True},
        )
    with pytest.raises(ValueError, match="does not take"):
        RecurrentPPO(MemoryPolicy, env, policy_kwargs={"core": "gru", "core_kwargs": {"N": 3}})
    with pytest.raises(ValueError, match="train_shared_core=True needs shared_lstm=True"):
        RecurrentPPO(MemoryPolicy, env, policy_kwargs={"core": "gru", "train_shared_core": True})
