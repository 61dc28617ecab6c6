"""The pieces of the parity setting with sb3-contrib's LSTM (issue #11, item 3): CartPole without
velocities, ``env.normalize`` (VecNormalize saved, resumed and evaluated with the training
statistics), linear schedules, ReLU/ortho_init heads and ``policy.kind: stock``."""

from __future__ import annotations

import json
import math
import pickle

import gymnasium as gym
import numpy as np
import pytest
import yaml
from torch import nn

import envs
from memagents import evaluate, train
from memagents.config import CONFIG_DIR, from_dict, load_config

ZOO = CONFIG_DIR / "cartpole-novel-zoo.yaml"

#: CartPole-v1's constants (gymnasium.envs.classic_control.CartPoleEnv)
GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02


def cartpole_step_by_hand(state: np.ndarray, action: int) -> np.ndarray:
    """One Euler step of CartPole's dynamics (Barto, Sutton & Anderson 1983; Florian 2007)."""
    x, x_dot, theta, theta_dot = (float(v) for v in state)
    force = FORCE if action == 1 else -FORCE
    total_mass, polemass_length = MASSCART + MASSPOLE, MASSPOLE * LENGTH
    cos, sin = math.cos(theta), math.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
    theta_acc = (GRAVITY * sin - cos * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * cos**2 / total_mass)
    )
    x_acc = temp - polemass_length * theta_acc * cos / total_mass
    return np.array(
        [x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc]
    )


# -- the env -----------------------------------------------------------------------------------
def test_cartpole_novel_shows_positions_and_zeroes_exactly_the_velocities():
    env = gym.make("CartPoleNoVel-v1")
    obs, _ = env.reset(seed=3)
    state = np.array(env.unwrapped.state, dtype=np.float64)
    assert obs.shape == (4,) and env.observation_space.shape == (4,)
    np.testing.assert_allclose(obs, [state[0], 0.0, state[2], 0.0], rtol=0, atol=1e-7)
    for action in (1, 1, 0, 1, 0, 0):
        state = cartpole_step_by_hand(state, action)
        obs, reward, terminated, truncated, _ = env.step(action)
        assert reward == 1.0 and not (terminated or truncated)
        # the hidden velocities are not zero: masking removes information
        assert abs(state[1]) > 1e-3 and abs(state[3]) > 1e-3
        np.testing.assert_allclose(obs, [state[0], 0.0, state[2], 0.0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(env.unwrapped.state, state, rtol=0, atol=1e-5)
    env.close()


def test_cartpole_novel_matches_cartpole_on_positions_and_keeps_its_episode_rules():
    masked, full = gym.make("CartPoleNoVel-v1"), gym.make("CartPole-v1")
    a, _ = masked.reset(seed=7)
    b, _ = full.reset(seed=7)
    steps = 0
    while True:
        np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])
        assert not a[[1, 3]].any() and b[[1, 3]].any()
        a, ra, ta, tra, _ = masked.step(1)
        b, rb, tb, trb, _ = full.step(1)
        steps += 1
        assert (ra, ta, tra) == (rb, tb, trb)
        if ta or tra:
            break
    assert ta and 5 < steps < 500  # always pushing right drops the pole
    assert "CartPoleNoVel-v1" in envs.CONTROL_IDS and "CartPoleNoVel-v1" not in envs.ENV_IDS


def test_mask_velocity_refuses_other_observations():
    with pytest.raises(ValueError, match="4-entry"):
        envs.MaskVelocity(gym.make("Pendulum-v1"))


# -- schedules, heads, stock policy ------------------------------------------------------------
def test_linear_schedule_runs_from_the_value_to_zero():
    lr = train.schedule("linear", 1e-3)
    assert lr(1.0) == pytest.approx(1e-3) and lr(0.0) == 0.0 and lr(0.25) == pytest.approx(2.5e-4)
    assert train.schedule("constant", 0.2) == 0.2


@pytest.mark.parametrize("kind", ["memory", "stock"])
def test_zoo_config_reaches_the_model(kind):
    overrides = ["policy.kind=stock", "ppo.buffer=stock"] if kind == "stock" else []
    config = load_config(ZOO, [*overrides, "env.n_envs=2"])
    train.check_names(config)
    env = train.normalize_env(config, train.make_env(config, seed=0))
    model = train.make_model(config, env, "cpu")
    policy = model.policy
    expected = {"memory": "MemoryPolicy", "stock": "StockLstmPolicy"}[kind]
    assert type(policy).__name__ == expected
    assert type(model).__name__ == {"memory": "MemoryPPO", "stock": "RecurrentPPO"}[kind]
    assert policy.activation_fn is nn.ReLU and policy.ortho_init is False
    # 64 LSTM units: sb3-contrib's (h, c) of 64 each, or our packed [h; c] split in two halves
    assert policy.lstm_actor.hidden_size == 64 and policy.lstm_critic is not None
    for net in (policy.mlp_extractor.policy_net, policy.mlp_extractor.value_net):
        assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [64]
        assert any(isinstance(m, nn.ReLU) for m in net)
    assert model.lr_schedule(1.0) == pytest.approx(1e-3) and model.lr_schedule(0.0) == 0.0
    assert model.clip_range(1.0) == pytest.approx(0.2) and model.clip_range(0.5) == pytest.approx(
        0.1
    )
    assert model.get_vec_normalize_env() is env and env.norm_reward and env.gamma == 0.98
    env.close()


def test_constant_schedules_stay_constant():
    config = load_config(
        ZOO, ["ppo.lr_schedule=constant", "ppo.clip_range_schedule=constant", "env.n_envs=2"]
    )
    env = train.make_env(config, seed=0)
    model = train.make_model(config, env, "cpu")
    assert model.lr_schedule(0.0) == pytest.approx(1e-3) and model.clip_range(0.0) == 0.2
    env.close()


@pytest.mark.parametrize(
    ("overrides", "must_name"),
    [
        (["policy.kind=lstm"], ["policy.kind", "'lstm'", "'stock'"]),
        (["policy.activation=gelu"], ["policy.activation", "'gelu'", "'relu'"]),
        (["ppo.lr_schedule=cosine"], ["ppo.lr_schedule", "'cosine'", "'linear'"]),
        (["ppo.clip_range_schedule=1"], ["ppo.clip_range_schedule", "1", "string"]),
        (["policy.ortho_init=maybe"], ["policy.ortho_init", "'maybe'", "true or false"]),
        (["env.normalize.obs=1"], ["env.normalize.obs", "1", "true or false"]),
        (["env.normalize.rewards=true"], ["'env.normalize.rewards'", "obs, reward"]),
        (["policy.kind=stock"], ["policy.kind", "ppo.buffer", "'sequence-start'"]),
        (["policy.kind=stock", "ppo.buffer=stock", "core.name=gru"], ["'stock'", "'gru'"]),
        (
            ["policy.kind=stock", "ppo.buffer=stock", "core.kwargs.forget_bias=0"],
            ["core.kwargs", "'forget_bias'", "hidden_size, num_layers"],
        ),
        (["policy.kind=stock", "ppo.buffer=stock", "policy.critic=joint"], ["'joint'"]),
    ],
)
def test_bad_values_exit_2_with_one_line(overrides, must_name, capsys):
    argv = ["--config", str(ZOO)]
    for item in overrides:
        argv += ["--set", item]
    code = train.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in must_name:
        assert fragment in lines[0], (fragment, lines[0])


# -- VecNormalize through checkpoints, resume and evaluate -------------------------------------
TINY = [
    *["--config", str(ZOO), "--n-envs", "2", "--set", "ppo.n_steps=16"],
    *[
        "--set",
        "ppo.batch_size=32",
        "--set",
        "ppo.n_epochs=1",
        "--set",
        "core.kwargs.hidden_size=8",
    ],
    *["--set", "policy.net_arch=[8]", "--set", "train.eval_episodes=2"],
]


def _stats(path):
    with open(path, "rb") as f:
        return pickle.load(f)  # VecNormalize pickles itself without its venv


@pytest.mark.parametrize("kind", ["memory", "stock"])
def test_normalization_statistics_round_trip_through_resume_and_evaluate(kind, tmp_path, capsys):
    run_dir = tmp_path / "run"
    extra = ["--set", "policy.kind=stock", "--set", "ppo.buffer=stock"] if kind == "stock" else []
    argv = [*TINY, *extra, "--total-timesteps", "128", "--checkpoint-freq", "64"]
    argv += ["--set", "train.eval_freq=64", "--run-dir", str(run_dir)]
    assert train.main(argv) == 0, capsys.readouterr().err
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["vecnormalize"] == f"step_{latest['num_timesteps']}.vecnormalize.pkl"
    ckpt = _stats(run_dir / "checkpoints" / latest["vecnormalize"])
    final = _stats(run_dir / "model.vecnormalize.pkl")
    # one update per env per step, plus the first reset (count starts at epsilon 1e-4)
    assert final.obs_rms.count == pytest.approx(2 + 128, abs=1e-3)
    assert ckpt.obs_rms.count == pytest.approx(2 + latest["num_timesteps"], abs=1e-3)
    assert final.norm_reward and final.ret_rms.count > 1
    # the velocities are zero in every observation: their running mean stays 0
    assert final.obs_rms.mean[[1, 3]].tolist() == [0.0, 0.0] and abs(final.obs_rms.mean[0]) > 0

    # a killed run resumes from its checkpoint's statistics, not from fresh ones
    (run_dir / "model.zip").unlink()
    (run_dir / "eval.json").unlink()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["total_timesteps"] = 192
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--resume", str(run_dir)]) == 0, capsys.readouterr().err
    resumed = _stats(run_dir / "model.vecnormalize.pkl")
    steps = json.loads((run_dir / "eval.json").read_text())["num_timesteps"]
    after = steps - latest["num_timesteps"]
    assert resumed.obs_rms.count == pytest.approx(ckpt.obs_rms.count + 2 + after, abs=1e-3)

    # evaluate uses the saved statistics, frozen, and the env's own rewards
    cfg = from_dict(config)
    env = train.normalize_env(
        cfg,
        train.make_env(cfg, seed=5, n_envs=1),
        training=False,
        stats=train.normalization_path(run_dir / "model.zip"),
    )
    np.testing.assert_array_equal(env.obs_rms.mean, resumed.obs_rms.mean)
    assert not env.training and not env.norm_reward and env.norm_obs
    raw = env.reset()
    np.testing.assert_allclose(raw, env.normalize_obs(env.get_original_obs()), rtol=0, atol=1e-6)
    assert env.obs_rms.count == resumed.obs_rms.count  # not updated by evaluation
    env.close()
    out = tmp_path / "evaluate.json"
    code = evaluate.main(["--run", str(run_dir), "--episodes", "2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["episodes"] == 2 and 8 <= report["mean_reward"] <= 500  # CartPole step counts

    # without the statistics, evaluation refuses rather than feeding raw observations
    (run_dir / "model.vecnormalize.pkl").unlink()
    assert evaluate.main(["--run", str(run_dir), "--episodes", "1"]) == 2
    assert "vecnormalize.pkl" in capsys.readouterr().err


def test_evaluation_env_gets_the_training_statistics():
    config = load_config(ZOO, ["env.n_envs=2"])
    env = train.normalize_env(config, train.make_env(config, seed=0))
    eval_env = train.normalize_env(config, train.make_env(config, 9, n_envs=1), training=False)
    model = train.make_model(config, env, "cpu")
    model.learn(64)
    assert not np.array_equal(eval_env.obs_rms.mean, env.obs_rms.mean)
    train.sync_normalization(model, eval_env)
    np.testing.assert_array_equal(eval_env.obs_rms.mean, env.obs_rms.mean)
    np.testing.assert_array_equal(eval_env.obs_rms.var, env.obs_rms.var)
    assert eval_env.obs_rms is not env.obs_rms  # a copy: evaluation cannot move training's
    env.close()
    eval_env.close()


@pytest.mark.parametrize("kind", ["memory", "stock"])
def test_aggregate_counts_the_same_lstm_state_for_both_policies(kind, tmp_path):
    from memagents.aggregate import model_stats

    overrides = ["policy.kind=stock", "ppo.buffer=stock"] if kind == "stock" else []
    config = load_config(ZOO, [*overrides, "env.n_envs=1"])
    env = train.make_env(config, seed=0)
    train.make_model(config, env, "cpu").save(tmp_path / "model.zip")
    env.close()
    # 64 units, (h, c), actor and critic: 256 floats per env either way
    assert model_stats(tmp_path) == {"parameters": 44_355.0, "state_size": 256.0}
