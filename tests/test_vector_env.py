"""The batched torch env (``envs.vector``): same rules as the single env, VecEnv semantics, SB3.

Observations, targets and lengths compare bitwise: 0/1 data and integers that both envs copy from
the same episode; a reward is one product of an integer count and a float32 weight (correctly
rounded on every CPU); a seeded run repeated is the same ops on the same values.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from envs_oracle import Oracle, best_memoryless_action, expected_length
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

import envs
from envs import InvalidActionError
from memagents.sb3 import TorchVecEnv

DEFAULT_IDS = [f"memagents/{task}-v0" for task in envs.TASKS]


def row(problem, i):
    """Episode ``i`` of a batched problem, as a problem of batch size 1."""
    return type(problem)(*(x[i : i + 1] for x in problem))


def sample(env_id, n, seed):
    env = gym.make(env_id).unwrapped
    return env.sample(n, torch.Generator().manual_seed(seed), "cpu")


# -- one definition of the rules ------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    env_id=st.sampled_from(envs.ENV_IDS),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5),
    oracle_rate=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_batched_env_matches_single_env_for_the_same_episodes_and_actions(
    env_id, seed, n, oracle_rate
):
    problem = sample(env_id, n, seed)
    batched = envs.make_vec(env_id, n, seed=0)
    obs = batched.reset_tensor(problem)
    singles = [gym.make(env_id, disable_env_checker=True).unwrapped for _ in range(n)]
    oracles = [Oracle(env) for env in singles]
    for i, env in enumerate(singles):
        first, _ = env.reset(options={"problem": row(problem, i)})
        np.testing.assert_array_equal(first, obs[i].numpy())
    rng = np.random.default_rng(seed)
    singles[0].action_space.seed(seed)
    active = [True] * n
    returns = [0.0] * n  # summed in float64, as SB3's Monitor sums the single env's rewards
    steps = [0] * n
    last_obs = [obs[i].numpy() for i in range(n)]
    while any(active):
        actions = []
        for i in range(n):  # a mix of right and random answers, so rewards take many values
            right = oracles[i].act(last_obs[i])
            actions.append(
                right if rng.random() < oracle_rate else singles[0].action_space.sample()
            )
        out = batched.step_tensor(torch.as_tensor(np.array(actions)))
        for i in np.flatnonzero(active):
            obs_i, reward, terminated, _, info = singles[i].step(actions[i])
            assert reward == out.reward[i].item()  # bit for bit
            assert terminated == out.done[i].item()
            returns[i] += reward
            steps[i] += 1
            np.testing.assert_array_equal(obs_i, out.final_obs[i].numpy())
            if terminated:
                assert info["is_success"] == out.success[i].item()
                # float32 sums of at most a few dozen float32 rewards: rounding only
                assert out.episode_return[i].item() == pytest.approx(returns[i], abs=1e-5)
                assert out.episode_length[i].item() == steps[i]
                active[i] = False
            else:
                assert out.episode_return[i].item() == 0.0 and out.episode_length[i].item() == 0
                np.testing.assert_array_equal(obs_i, out.obs[i].numpy())
            last_obs[i] = obs_i


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_batched_env_draws_its_episodes_with_the_tasks_own_sample_and_layout(env_id):
    batched = envs.make_vec(env_id, 6, seed=123)
    obs = batched.reset_tensor()
    task = batched.env
    expected = task.layout(task.sample(6, torch.Generator().manual_seed(123), "cpu"))
    torch.testing.assert_close(obs, expected.obs[:, 0], rtol=0, atol=0)
    assert torch.equal(batched._length, expected.length)


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_oracle_scores_exactly_one_in_every_batched_episode_across_auto_resets(env_id):
    venv = envs.make_vec(env_id, 8, seed=2)
    oracles = [Oracle(gym.make(env_id).unwrapped) for _ in range(8)]
    obs = venv.reset()
    returns = np.zeros(8)
    steps = np.zeros(8, dtype=int)
    finished = 0
    for _ in range(3 * venv.env.max_episode_length):
        actions = np.array([oracle.act(o) for oracle, o in zip(oracles, obs, strict=True)])
        obs, rewards, dones, infos = venv.step(actions)
        returns += rewards
        steps += 1
        for i in range(8):
            if not dones[i]:
                assert infos[i] == {}
                continue
            assert returns[i] == pytest.approx(1.0, abs=1e-5)  # float32 rewards
            assert steps[i] == expected_length(oracles[i].env, oracles[i].history)
            assert infos[i]["is_success"] is True
            assert infos[i]["TimeLimit.truncated"] is False
            episode = infos[i]["episode"]  # SB3 Monitor's record, summed on the device
            assert episode["r"] == pytest.approx(returns[i], abs=1e-5)
            assert episode["l"] == steps[i] and episode["t"] >= 0.0
            np.testing.assert_array_equal(infos[i]["terminal_observation"], np.zeros(obs.shape[1]))
            returns[i], steps[i] = 0.0, 0
            oracles[i].reset()
            finished += 1
    assert finished >= 16


def test_auto_reset_returns_the_next_episodes_first_observation_and_fresh_success_flags():
    venv = envs.make_vec("memagents/Recall-v0", 64, seed=4)
    obs = venv.reset()
    rng = np.random.default_rng(0)
    cues = obs[:, :4].argmax(1)
    returns = np.zeros(64)
    outcomes = set()
    for _ in range(40):
        guess_right = rng.random(64) < 0.5  # right on about half the episodes
        obs, rewards, dones, infos = venv.step(np.where(guess_right, cues, (cues + 1) % 4))
        returns += rewards
        for i in np.flatnonzero(dones):
            assert obs[i, :4].sum() == 1 and obs[i, 4] == 0  # a cue: the next episode's step 0
            assert infos[i]["terminal_observation"].shape == (5,)
            assert infos[i]["is_success"] == (returns[i] == 1.0)  # this episode's answer only
            outcomes.add(infos[i]["is_success"])
            returns[i] = 0.0
            cues[i] = obs[i, :4].argmax()
    assert outcomes == {True, False}


# -- seeding -------------------------------------------------------------------------------------
def run(venv, steps, seed=0):
    """Observations, rewards and dones of ``steps`` steps of seeded random actions."""
    venv.action_space.seed(seed)
    out = [venv.reset()]
    for _ in range(steps):
        actions = np.stack([venv.action_space.sample() for _ in range(venv.num_envs)])
        obs, rewards, dones, _ = venv.step(actions)
        out += [obs, rewards, dones]
    return out


def test_same_seed_same_episodes_other_seed_other_episodes():
    a = run(envs.make_vec("memagents/Copy-v0", 16, seed=5), 40)
    b = run(envs.make_vec("memagents/Copy-v0", 16, seed=5), 40)
    c = run(envs.make_vec("memagents/Copy-v0", 16, seed=6), 40)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    venv = envs.make_vec("memagents/Copy-v0", 16, seed=99)
    run(venv, 10)
    assert venv.seed(5) == [5] * 16
    d = run(venv, 40)  # re-seeded at the reset: the same stream as a
    assert all(np.array_equal(x, y) for x, y in zip(a, d, strict=True))


# -- memoryless ceilings, measured on many episodes ----------------------------------------------
def episode_returns(venv, policy, episodes):
    """Returns of the first ``episodes`` episodes that end, under ``policy(obs [B, D])``."""
    obs = venv.reset_tensor()
    running = torch.zeros(venv.num_envs)
    returns = []
    while sum(len(r) for r in returns) < episodes:
        out = venv.step_tensor(policy(obs))
        running += out.reward
        returns.append(running[out.done].clone())
        running[out.done] = 0.0
        obs = out.obs
    return torch.cat(returns)[:episodes].double().numpy()


def margin(returns):
    """Five standard errors: a fixed-seed test, false alarms below one in a million."""
    return 5 * returns.std() / np.sqrt(len(returns)) + 1e-12


@pytest.mark.parametrize("env_id", DEFAULT_IDS)
def test_best_memoryless_policy_reaches_the_ceiling_and_no_further(env_id):
    venv = envs.make_vec(env_id, 1000, seed=11)
    ceiling = venv.env.memoryless_ceiling()
    constant = torch.as_tensor(best_memoryless_action(venv.env))
    returns = episode_returns(
        venv, lambda obs: constant.expand(obs.shape[0], *constant.shape), 8000
    )
    assert abs(returns.mean() - ceiling) <= margin(returns)


@pytest.mark.parametrize("env_id", DEFAULT_IDS)
def test_random_and_observation_driven_memoryless_policies_stay_at_or_below_the_ceiling(env_id):
    venv = envs.make_vec(env_id, 1000, seed=12)
    ceiling = venv.env.memoryless_ceiling()
    generator = torch.Generator().manual_seed(0)
    space = venv.action_space

    def random_policy(obs):
        if isinstance(space, gym.spaces.Discrete):
            return torch.randint(0, int(space.n), (obs.shape[0],), generator=generator)
        return torch.randint(0, 2, (obs.shape[0], space.n), generator=generator)

    def echo_policy(obs):  # acts on what it sees right now: the best guess without memory
        if isinstance(space, gym.spaces.Discrete):
            return obs.argmax(1).clamp(max=int(space.n) - 1)
        return (obs[:, : space.n] > 0.5).long()

    for policy in (random_policy, echo_policy):
        returns = episode_returns(venv, policy, 8000)
        assert returns.mean() <= ceiling + margin(returns)


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_answer_steps_all_look_alike_which_is_why_the_ceiling_holds(env_id):
    task = gym.make(env_id).unwrapped
    episodes = task.layout(task.sample(500, torch.Generator().manual_seed(0), "cpu"))
    answer_obs = episodes.obs[episodes.weight > 0]  # [answer steps, D]
    assert torch.unique(answer_obs, dim=0).shape[0] == 1
    # and a perfect episode's weights add up to 1: sum over steps of A * weight
    totals = episodes.weight.sum(1) * task.action_width
    torch.testing.assert_close(totals, torch.ones(500), rtol=0, atol=1e-5)


# -- curriculum through the VecEnv interface ------------------------------------------------------
def lengths_after(venv, steps):
    """Lengths of the episodes that start and end within the next ``steps`` steps."""
    zeros = np.zeros((venv.num_envs, *venv.action_space.shape), dtype=np.int64)
    started = np.zeros(venv.num_envs, dtype=int)
    complete, lengths = np.zeros(venv.num_envs, dtype=bool), []
    for step in range(1, steps + 1):
        _, _, dones, _ = venv.step(zeros)
        for i in np.flatnonzero(dones):
            if complete[i]:
                lengths.append(step - started[i])
            complete[i], started[i] = True, step
    return sorted(set(lengths))


@pytest.mark.parametrize("wrap", [False, True], ids=["BatchedEnv", "TorchVecEnv"])
def test_difficulty_through_env_method_set_attr_and_get_attr(wrap):
    batched = envs.make_vec("memagents/Copy-v0", 32, seed=0)  # lengths 1..10: 3..21 steps
    venv = TorchVecEnv(batched) if wrap else batched
    venv.reset()
    assert venv.get_attr("max_length") == [10] * 32
    assert venv.get_attr("max_length", indices=[0, 3]) == [10, 10]
    assert venv.env_method("set_difficulty", min_length=25, max_length=25)[0] == {
        "min_length": 25,
        "max_length": 25,
    }
    assert lengths_after(venv, 150) == [51]  # beyond the training range: buffers grew
    venv.set_attr("min_length", 2)
    venv.set_attr("max_length", 2)
    assert lengths_after(venv, 80) == [5]
    with pytest.raises(ValueError, match="min_length=2 > max_length=1"):
        venv.set_attr("max_length", 1)
    assert venv.get_attr("difficulty")[0] == {"min_length": 2, "max_length": 2}
    with pytest.raises(ValueError, match="indices=\\[0\\]"):
        venv.env_method("set_difficulty", max_length=3, indices=[0])
    with pytest.raises(ValueError, match="indices"):
        venv.set_attr("max_length", 3, indices=[1, 2])
    with pytest.raises(AttributeError, match="no attribute 'no_such_knob'"):
        venv.set_attr("no_such_knob", 1)
    with pytest.raises(AttributeError, match="fixed after construction"):
        venv.set_attr("bits", 4)
    assert venv.env_method("memoryless_ceiling", indices=list(range(32)))[0] == 0.5


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env_id", "actions", "message"),
    [
        ("memagents/Recall-v0", np.array([0, 1, 4]), "action 4 of env 2"),
        ("memagents/Recall-v0", np.array([0, -1, 0]), "action -1 of env 1"),
        ("memagents/Recall-v0", np.array([0.0, 1.5, 0.0]), "action 1.5 of env 1"),
        ("memagents/Recall-v0", np.zeros((3, 1), np.int64), "expected shape \\(3,\\)"),
        (
            "memagents/Copy-Easy-v0",
            np.array([[0, 1, 0, 0], [0, 0, 2, 0], [0] * 4]),
            "action \\[0, 0, 2, 0\\] of env 1",
        ),
        ("memagents/Copy-Easy-v0", np.zeros((3, 5)), "expected shape \\(3, 4\\)"),
    ],
)
def test_out_of_space_actions_raise_and_change_nothing(env_id, actions, message):
    venv, twin = envs.make_vec(env_id, 3, seed=1), envs.make_vec(env_id, 3, seed=1)
    venv.reset(), twin.reset()
    with pytest.raises(InvalidActionError, match=message):
        venv.step(actions)
    good = np.zeros((3, *venv.action_space.shape), dtype=np.int64)
    for _ in range(12):
        a, b = venv.step(good), twin.step(good)
        for x, y in zip(a[:3], b[:3], strict=True):
            np.testing.assert_array_equal(x, y)


def test_make_vec_arguments_and_misuse():
    assert envs.make_vec("memagents/Copy-v0", 2, bits=3).observation_space.shape == (5,)
    assert envs.make_vec("memagents/Copy-L20-v0", 2).get_attr("max_length") == [20, 20]
    with pytest.raises(ValueError, match="num_envs=0"):
        envs.make_vec("memagents/Copy-v0", 0)
    with pytest.raises(ValueError, match="bits=0"):
        envs.make_vec("memagents/Copy-v0", 2, bits=0)
    with pytest.raises(ValueError, match="no batched implementation"):
        envs.make_vec("CartPole-v1", 2)
    venv = envs.make_vec("memagents/Recall-v0", 2)
    with pytest.raises(gym.error.ResetNeeded):
        venv.step_tensor(torch.zeros(2, dtype=torch.long))
    venv.reset()
    with pytest.raises(RuntimeError, match="without step_async"):
        venv.step_wait()
    with pytest.raises(ValueError, match="no reset options"):
        venv.set_options({"problem": None})
    with pytest.raises(ValueError, match="batch size 3, expected num_envs=2"):
        venv.reset_tensor(sample("memagents/Recall-v0", 3, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_episodes_live_on_the_requested_device():  # pragma: no cover - no GPU in CI
    venv = envs.make_vec("memagents/Copy-v0", 64, device="cuda", seed=0)
    obs = venv.reset_tensor()
    out = venv.step_tensor(torch.zeros(64, 8, dtype=torch.long, device="cuda"))
    assert obs.device.type == out.reward.device.type == "cuda"


# -- stable-baselines3 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env_id", "lengths"),
    [("memagents/Recall-v0", set(range(3, 9))), ("memagents/Copy-Easy-v0", {3, 5, 7, 9, 11})],
)
def test_sb3_ppo_trains_on_the_batched_env_unchanged(env_id, lengths):
    venv = TorchVecEnv.make(env_id, num_envs=8, seed=0)
    assert isinstance(venv, VecEnv)
    # no VecMonitor: the batched env writes the episode records SB3 logs from
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0)
    model.learn(total_timesteps=512)
    assert model.num_timesteps == 512
    episodes = list(model.ep_info_buffer)
    assert len(episodes) >= 40
    assert all(0.0 <= e["r"] <= 1.0 + 1e-6 and e["l"] in lengths for e in episodes)
    actions, _ = model.predict(venv.reset())
    assert actions.shape == (8, *venv.action_space.shape)


def test_torch_vec_env_rejects_other_objects():
    with pytest.raises(ValueError, match=r"expected an envs\.BatchedEnv"):
        TorchVecEnv(gym.make("memagents/Copy-v0"))


@pytest.mark.parametrize(
    "env_id", ["memagents/Copy-v0", "memagents/RepeatCopy-v0", "memagents/AssociativeRecall-v0"]
)
def test_sync_free_auto_reset_plays_the_same_episodes_as_the_indexed_one(env_id: str) -> None:
    """``sync_free`` (the GPU path: masked selects, no host read of ``done``) against the
    indexed auto-reset on the CPU, with the same reservoir size so both draw one stream of
    episodes: every output of every step is the same, across many auto-resets."""
    masked = envs.make_vec(env_id, 16, seed=5)
    indexed = envs.make_vec(env_id, 16, seed=5)
    masked.sync_free = True  # as on a GPU
    masked._reservoir_size = indexed._reservoir_size = 16 * envs.BatchedEnv.SYNC_FREE_STEPS
    torch.testing.assert_close(masked.reset_tensor(), indexed.reset_tensor(), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    space = masked.action_space
    shape = (16,) if isinstance(space, gym.spaces.Discrete) else (16, *space.shape)
    high = space.n if isinstance(space, gym.spaces.Discrete) else 2
    finished = 0
    for _ in range(120):
        actions = torch.randint(0, high, shape, generator=gen)
        a, b = masked.step_tensor(actions), indexed.step_tensor(actions)
        for name, x, y in zip(a._fields, a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        finished += int(a.done.sum())
    assert finished > 50  # many auto-resets happened
    assert masked._known_left < masked._reservoir.length.shape[0]  # the bound was used
