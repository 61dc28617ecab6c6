"""``ppo.credit: element``: a reward, an advantage and a clipped ratio per action element.

Checked against hand-computed GAE, against the joint quantities they decompose (element rewards
sum to the step's reward, element advantages to the step's advantage, element log-probabilities
to the joint log-probability), and against the published update where the two must coincide
(``Discrete`` actions have one element, so ``element`` and ``step`` make the same update).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PATH_TOL
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv

import envs
from memagents.sb3 import MemoryPolicy, MemoryPPO, TorchVecEnv
from memagents.sb3.ppo import SequenceStartRolloutBuffer


def test_batched_env_reward_elements_score_each_bit_and_sum_to_the_reward() -> None:
    venv = envs.make_vec("memagents/Copy-v0", 64, seed=3, bits=4, max_length=3)
    venv.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        target = venv._target.view(-1, 4).index_select(0, venv._row_start + venv._t)
        weight = venv._weight.view(-1).index_select(0, venv._row_start + venv._t)
        actions = torch.randint(0, 2, (64, 4), generator=gen)
        venv.step_async(actions)
        _, reward, _, _ = venv.step_wait()
        elements = venv.reward_elements
        assert elements.shape == (64, 4)
        # by hand: weight where the bit is right, 0 where it is wrong
        expected = torch.where(actions == target, weight[:, None], torch.zeros(()))
        torch.testing.assert_close(elements, expected, rtol=0, atol=0)
        np.testing.assert_allclose(elements.sum(-1).numpy(), reward, rtol=1e-6, atol=1e-7)


def make_buffer(n_steps: int, n_envs: int, A: int, gamma: float, lam: float):
    buffer = SequenceStartRolloutBuffer(
        n_steps,
        spaces.Box(-1, 1, (3,)),
        spaces.MultiBinary(A),
        (n_steps, 1, n_envs, 4),
        "cpu",
        gamma=gamma,
        gae_lambda=lam,
        n_envs=n_envs,
        reward_elements=A,
    )
    buffer.reset()
    return buffer


def fill(buffer, rng: np.random.Generator, A: int, extra: float = 0.0) -> None:
    """Random steps; each step's reward is the sum of its element rewards plus ``extra``."""
    n_envs = buffer.n_envs
    state = torch.zeros(1, n_envs, 4)
    for t in range(buffer.buffer_size):
        elements = rng.random((n_envs, A)).astype(np.float32)
        buffer.add_reward_elements(elements)
        starts = (rng.random(n_envs) < 0.3).astype(np.float32) if t else np.ones(n_envs)
        buffer.add(
            rng.random((n_envs, 3)).astype(np.float32),
            rng.integers(0, 2, (n_envs, A)),
            elements.sum(-1) + extra,
            starts,
            torch.as_tensor(rng.random(n_envs).astype(np.float32)),
            torch.zeros(n_envs),
            lstm_states=type("S", (), {"pi": (state, state), "vf": (state, state)})(),
        )


@pytest.mark.parametrize("gamma,lam,extra", [(0.0, 0.95, 0.0), (0.9, 0.95, 0.0), (0.99, 0.8, 0.3)])
def test_element_advantages_sum_to_the_step_advantage(gamma: float, lam: float, extra: float):
    rng = np.random.default_rng(0)
    A = 5
    buffer = make_buffer(16, 3, A, gamma, lam)
    fill(buffer, rng, A, extra)
    last_values = torch.as_tensor(rng.random(3).astype(np.float32))
    dones = np.array([True, False, False])
    buffer.compute_returns_and_advantage(last_values, dones)
    np.testing.assert_allclose(
        buffer.element_advantages.sum(-1), buffer.advantages, rtol=1e-5, atol=1e-5
    )


def test_element_advantages_by_hand() -> None:
    """Two steps of one env, two elements, one episode that ends at the second step:
    ``δ_{t,i} = r_{t,i} + γ V_{t+1} / A - V_t / A`` and ``Â_{0,i} = δ_{0,i} + γλ δ_{1,i}``."""
    A, gamma, lam = 2, 0.5, 0.8
    buffer = make_buffer(2, 1, A, gamma, lam)
    state = torch.zeros(1, 1, 4)
    states = type("S", (), {"pi": (state, state), "vf": (state, state)})()
    r = np.array([[[0.25, 0.0]], [[0.5, 0.125]]], dtype=np.float32)
    v = [0.4, 0.2]
    for t in range(2):
        buffer.add_reward_elements(r[t])
        buffer.add(
            np.zeros((1, 3), np.float32),
            np.zeros((1, A)),
            r[t].sum(-1),
            np.array([float(t == 0)]),
            torch.tensor([v[t]]),
            torch.zeros(1),
            lstm_states=states,
        )
    buffer.compute_returns_and_advantage(torch.tensor([9.0]), np.array([True]))
    d1 = r[1, 0] - v[1] / A  # terminal: no bootstrap from the 9.0
    d0 = r[0, 0] + gamma * v[1] / A - v[0] / A
    np.testing.assert_allclose(buffer.element_advantages[1, 0], d1, rtol=1e-6)
    np.testing.assert_allclose(buffer.element_advantages[0, 0], d0 + gamma * lam * d1, rtol=1e-6)


def copy_model(
    credit: str, env_id: str = "memagents/Copy-v0", seed: int = 0, core: str = "lstm", **kwargs
):
    venv = TorchVecEnv.make(env_id, 8, seed=seed, **kwargs)
    return MemoryPPO(
        MemoryPolicy,
        venv,
        n_steps=16,
        batch_size=64,
        n_epochs=2,
        credit=credit,
        policy_kwargs=dict(core=core, core_kwargs=dict(hidden_size=16), net_arch=[16]),
        seed=seed,
        device="cpu",
    )


def test_per_element_log_probs_sum_to_the_joint_log_prob() -> None:
    model = copy_model("element", bits=6, max_length=3)
    model.learn(128)  # fills a rollout buffer
    data = next(model.rollout_buffer.get(64))
    policy = model.policy
    with torch.no_grad():
        _, joint, _ = policy.evaluate_actions(
            data.observations, data.actions, data.lstm_states, data.episode_starts
        )
        _, each, _ = policy.evaluate_actions(
            data.observations, data.actions, data.lstm_states, data.episode_starts, True
        )
    assert each.shape == (joint.shape[0], 6)
    torch.testing.assert_close(each.sum(-1), joint, **PATH_TOL)


@pytest.mark.parametrize("core", ["lstm", "ntm"])  # ntm: packed training sequences
def test_one_element_makes_the_published_update(core: str) -> None:
    """``Discrete`` actions have one element: the element advantage is the step advantage and
    the element ratio the step ratio, so one update must land on the same parameters (up to the
    rounding of log-probabilities evaluated again before the update)."""
    params = []
    for credit in ("step", "element"):
        model = copy_model(credit, env_id="memagents/Recall-v0", core=core)
        assert model.rollout_buffer.pack_segments == (core == "ntm")
        model.learn(128)
        params.append(torch.cat([p.detach().flatten() for p in model.policy.parameters()]))
    before = copy_model("step", env_id="memagents/Recall-v0", core=core).policy
    moved = (params[0] - torch.cat([p.detach().flatten() for p in before.parameters()])).abs()
    assert moved.max() > 1e-4  # the update did something
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-5)


def test_element_credit_learns_differently_from_step_credit_on_bits() -> None:
    """With 6 bits per answer the two credits are different algorithms: same seed, same
    rollout, different parameters after the first update."""
    params = []
    for credit in ("step", "element"):
        model = copy_model(credit, bits=6, max_length=3)
        model.learn(128)
        params.append(torch.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert (params[0] - params[1]).abs().max() > 1e-4


def test_element_credit_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match=r"credit=.bits.*step, element"):
        copy_model("bits")
    dummy = DummyVecEnv([lambda: envs.RecallEnv()])
    with pytest.raises(ValueError, match=r"env\.vec_env: batched"):
        MemoryPPO(
            MemoryPolicy,
            dummy,
            n_steps=8,
            batch_size=8,
            credit="element",
            policy_kwargs=dict(core="lstm", core_kwargs=dict(hidden_size=8)),
        )
