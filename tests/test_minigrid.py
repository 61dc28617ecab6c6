"""MiniGrid: the grid-code wrapper, the code-embedding extractor and RecurrentPPO on MemoryS7.

- :class:`MiniGridCodes` shows exactly MiniGrid's grid codes and direction, passes SB3's and
  Gymnasium's env checkers and marks success;
- :class:`MiniGridExtractor` embeds codes (one changed object code changes the features);
- a tiny ``RecurrentPPO(MemoryPolicy)`` trains on ``MiniGrid-MemoryS7-v0`` and, with unchanged
  weights, recomputes the rollout's log-probabilities and values in training;
- the configs under ``configs/minigrid-*.yaml`` are valid and select the wrapper and extractor.

Observations compare bitwise (uint8 grid codes, copied); features and log-probabilities computed
two ways compare with tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import minigrid  # noqa: F401  (registers MiniGrid ids)
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import DummyVecEnv

from memagents import train
from memagents.config import CONFIG_DIR, ConfigError, from_dict, load_config
from memagents.sb3 import MemoryPolicy
from memagents.sb3.extractors import MiniGridExtractor
from memagents.wrappers import ActionSubset, MiniGridCodes, wrap

ENV_ID = "MiniGrid-MemoryS7-v0"


def wrapped(env_id: str = ENV_ID) -> MiniGridCodes:
    return MiniGridCodes(gym.make(env_id))


def test_wrapper_observation_is_the_raw_grid_codes_and_direction() -> None:
    raw, env = gym.make(ENV_ID), wrapped()
    raw_obs, _ = raw.reset(seed=3)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    directions = set()
    for _ in range(30):
        assert obs.shape == (7 * 7 * 3 + 1,) and obs.dtype == np.uint8
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs[:-1].reshape(7, 7, 3), raw_obs["image"])
        assert obs[-1] == raw_obs["direction"]
        # the layout the extractor relies on: entry 3 (7 x + y) + c is image[x, y, c]
        x, y, c = 2, 5, 0
        assert obs[3 * (7 * x + y) + c] == raw_obs["image"][x, y, c]
        directions.add(int(obs[-1]))
        action = int(rng.integers(0, 3))  # left, right, forward
        raw_obs, *_ = raw.step(action)
        obs, *_ = env.step(action)
    assert len(directions) > 1  # the direction channel was exercised
    # the vocabulary the extractor reads: 11 objects, 6 colours, 3 states, 4 directions
    high = env.observation_space.high
    assert tuple(high[:3]) == (10, 5, 2) and high[-1] == 3


@pytest.mark.filterwarnings("ignore:.*is different from the unwrapped version")
@pytest.mark.parametrize("env_id", [ENV_ID, "MiniGrid-RedBlueDoors-6x6-v0"])
def test_wrapped_env_passes_the_env_checkers(env_id: str) -> None:
    check_env(wrapped(env_id), warn=True)
    gym_check_env(wrapped(env_id), skip_render_check=True)
    DummyVecEnv([lambda: wrapped(env_id)] * 2).reset()  # raw Dict obs with missions would not stack


def test_wrapper_marks_success_and_failure() -> None:
    env = wrapped()
    base = env.unwrapped
    # MemoryEnv ends an episode when the agent stands on the success or the failure cell:
    # put it there and turn in place
    outcomes = {}
    for name in ("success", "failure"):
        env.reset(seed=0)
        base.agent_pos = getattr(base, f"{name}_pos")  # set by reset
        _, reward, terminated, _, info = env.step(base.actions.left)
        assert terminated
        outcomes[name] = (reward, info["is_success"])
    assert outcomes["success"][0] > 0 and outcomes["success"][1] is True
    assert outcomes["failure"] == (0, False)


def test_wrap_registry_rejects_unknown_names_and_non_minigrid_envs() -> None:
    import envs  # noqa: F401

    plain = gym.make("memagents/Recall-v0")
    assert wrap(plain, "none") is plain
    with pytest.raises(ValueError, match="unknown wrapper 'rgb'"):
        wrap(plain, "rgb")
    with pytest.raises(ValueError, match="Dict observations"):
        wrap(plain, "minigrid")


# -- extractor ----------------------------------------------------------------------------------


def test_extractor_embeds_codes() -> None:
    env = wrapped()
    torch.manual_seed(0)
    extractor = MiniGridExtractor(env.observation_space, features_dim=32, embed_dim=4)
    obs, _ = env.reset(seed=1)
    batch = torch.as_tensor(np.stack([obs, obs]), dtype=torch.float32)
    features = extractor(batch)
    assert features.shape == (2, 32) == (2, extractor.features_dim)
    torch.testing.assert_close(features[0], features[1])
    # change the object code of one cell: a key (5) becomes a ball (6) -> other features
    changed = batch.clone()
    x, y = 3, 3
    changed[1, 3 * (7 * x + y)] = 5.0
    other = extractor(changed)
    changed[1, 3 * (7 * x + y)] = 6.0
    assert not torch.allclose(extractor(changed)[1], other[1])
    # the direction is seen too
    turned = batch.clone()
    turned[1, -1] = (batch[1, -1] + 1) % 4
    assert not torch.allclose(extractor(turned)[1], features[1])
    # categorical: the code's embedding row is used, so gradients reach exactly that row
    extractor.zero_grad()
    extractor(changed[1:]).sum().backward()
    grad = extractor.code_embeddings[0].weight.grad  # [11, E]
    used = set(changed[1, :-1:3].long().tolist())
    assert all((grad[i].abs().sum() > 0) == (i in used) for i in range(11))


def lookup_forward(extractor: MiniGridExtractor, observations: torch.Tensor) -> torch.Tensor:
    """The extractor's forward with one ``nn.Embedding`` lookup per grid channel."""
    codes = observations.round().long()
    B, V = codes.shape[0], extractor.view
    grid = codes[:, :-1].reshape(B, V, V, 3)
    embedded = torch.cat(
        [emb(grid[..., c]) for c, emb in enumerate(extractor.code_embeddings)], dim=-1
    )
    x = extractor.conv(embedded.permute(0, 3, 1, 2))
    direction = extractor.direction_embedding(codes[:, -1])
    return extractor.linear(torch.cat([x, direction], dim=1))


def test_extractor_one_hot_path_equals_the_embedding_lookups() -> None:
    """Under grad the grid codes are embedded as ``multi_hot @ block_diag(tables)``: the same
    features and the same gradient for every parameter as three ``nn.Embedding`` lookups (float64,
    exact up to summation order); without grad, the lookups themselves."""
    env = wrapped()
    torch.manual_seed(0)
    extractor = MiniGridExtractor(env.observation_space, features_dim=16, embed_dim=3).double()
    obs, _ = env.reset(seed=2)
    batch = [obs]
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
        batch.append(obs)
    x = torch.as_tensor(np.stack(batch), dtype=torch.float64)
    weights = torch.randn(len(batch), 16, dtype=torch.float64)
    grads = []
    for forward in (extractor.forward, lambda obs: lookup_forward(extractor, obs)):
        extractor.zero_grad()
        out = forward(x)
        (out * weights).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in extractor.named_parameters()}))
    (out, g), (ref_out, ref_g) = grads
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    assert g.keys() == ref_g.keys()
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=0, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), ref_out, rtol=0, atol=1e-12)


def test_extractor_rejects_out_of_range_codes() -> None:
    env = wrapped()
    extractor = MiniGridExtractor(env.observation_space)
    obs, _ = env.reset(seed=1)
    bad = torch.as_tensor(obs[None], dtype=torch.float32).clone()
    bad[0, 1] = 6.0  # colour code 6: MiniGrid has colours 0-5 (6 would be a state row)
    with pytest.raises(ValueError, match=r"codes \[\d+, 6, \d+\] out of range.*\[11, 6, 3\]"):
        extractor(bad)


def test_extractor_rejects_a_space_that_is_not_grid_codes() -> None:
    from gymnasium import spaces

    with pytest.raises(ValueError, match="3 V V"):
        MiniGridExtractor(spaces.Box(0, 1, (10,), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        MiniGridExtractor(wrapped().observation_space, channels=[4] * 7)


# -- RecurrentPPO on MemoryS7 -------------------------------------------------------------------


def test_recurrent_ppo_trains_on_memory_s7_and_training_matches_rollout() -> None:
    venv = DummyVecEnv([wrapped] * 2)
    venv.seed(0)
    model = RecurrentPPO(
        MemoryPolicy,
        venv,
        n_steps=32,
        batch_size=24,  # cuts sequences at odd places
        n_epochs=1,
        seed=0,
        policy_kwargs={
            "core": "lstm",
            "core_kwargs": {"hidden_size": 8},
            "net_arch": [16],
            "features_extractor_class": MiniGridExtractor,
            "features_extractor_kwargs": {"features_dim": 16, "embed_dim": 4},
        },
    )
    before = [p.detach().clone() for p in model.policy.features_extractor.parameters()]
    model.learn(256)
    assert model.num_timesteps == 256
    moved = [
        not torch.equal(b, p)
        for b, p in zip(before, model.policy.features_extractor.parameters(), strict=True)
    ]
    assert any(moved)  # the extractor is trained through the core

    # one more rollout without training, then recompute every minibatch with the same weights
    _, callback = model._setup_learn(model.n_steps * model.n_envs, callback=None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    covered = 0
    with torch.no_grad():
        for data in model.rollout_buffer.get(model.batch_size):
            values, log_prob, _ = model.policy.evaluate_actions(
                data.observations,
                data.actions.long().flatten(),
                data.lstm_states,
                data.episode_starts,
            )
            mask = data.mask > 0.5
            torch.testing.assert_close(log_prob[mask], data.old_log_prob[mask], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                values.flatten()[mask], data.old_values[mask], atol=1e-5, rtol=0
            )
            covered += int(mask.sum())
    assert covered == model.n_steps * model.n_envs


# -- config and CLI -----------------------------------------------------------------------------


MINIGRID_CONFIGS = sorted(CONFIG_DIR.glob("minigrid-*.yaml"))


def test_there_is_a_config_per_memory_variant_and_redbluedoors() -> None:
    ids = {load_config(path).env.id for path in MINIGRID_CONFIGS}
    expected = {
        f"MiniGrid-Memory{s}-v0" for s in ("S7", "S9", "S11", "S13", "S13Random", "S17Random")
    }
    assert ids == expected | {"MiniGrid-RedBlueDoors-6x6-v0"}


@pytest.mark.parametrize("path", MINIGRID_CONFIGS, ids=lambda p: Path(p).stem)
def test_minigrid_configs_select_the_code_pipeline(path: Path) -> None:
    config = load_config(path)
    train.check_names(config)
    assert train.env_wrapper(config) == "minigrid"
    kwargs = train.policy_kwargs(config)
    assert kwargs["features_extractor_class"] is MiniGridExtractor


def test_auto_picks_the_pipeline_by_env_id() -> None:
    mg = from_dict({"env": {"id": ENV_ID}})
    assert train.env_wrapper(mg) == "minigrid" and train.features_extractor(mg) == "minigrid"
    algo = from_dict({"env": {"id": "memagents/Copy-v0"}})
    assert train.env_wrapper(algo) == "none"
    assert "features_extractor_class" not in train.policy_kwargs(algo)


@pytest.mark.parametrize(
    ("overrides", "must_name"),
    [
        ({"env": {"id": ENV_ID, "wrapper": "rgb"}}, ["env.wrapper", "'rgb'", "minigrid"]),
        ({"env": {"wrapper": "minigrid"}}, ["env.wrapper", "memagents/Recall-v0"]),
        ({"policy": {"features_extractor": "nature"}}, ["policy.features_extractor", "'nature'"]),
        ({"policy": {"features_extractor": "minigrid"}}, ["policy.features_extractor", "'none'"]),
        (
            {"env": {"id": ENV_ID}, "policy": {"features_extractor_kwargs": {"dim": 3}}},
            ["features_extractor_kwargs", "'dim'", "embed_dim"],
        ),
    ],
)
def test_bad_pipeline_config_is_a_config_error(overrides, must_name) -> None:
    with pytest.raises(ConfigError) as info:
        train.check_names(from_dict(overrides))
    message = str(info.value)
    assert "\n" not in message
    for fragment in must_name:
        assert fragment in message, (fragment, message)


def test_action_subset_renumbers_actions_and_replays_the_inner_env() -> None:
    """Outer action i is inner action actions[i]: the same seed and mapped actions give the same
    observations as the unwrapped env, in another order of actions than the inner one's."""
    actions = [2, 0, 1]  # forward, left, right
    raw, env = gym.make(ENV_ID), ActionSubset(gym.make(ENV_ID), actions)
    assert env.action_space == gym.spaces.Discrete(3)
    raw_obs, _ = raw.reset(seed=5)
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(1)
    for _ in range(40):
        a = int(rng.integers(0, 3))
        raw_obs, raw_r, raw_term, raw_trunc, _ = raw.step(actions[a])
        obs, r, term, trunc, _ = env.step(a)
        np.testing.assert_array_equal(obs["image"], raw_obs["image"])
        assert (obs["direction"], r, term, trunc) == (
            raw_obs["direction"],
            raw_r,
            raw_term,
            raw_trunc,
        )
        if term or trunc:
            break
    check_env(MiniGridCodes(ActionSubset(gym.make(ENV_ID), [0, 1, 2])), warn=False)


@pytest.mark.parametrize(
    ("actions", "must_name"),
    [([0, 7], ["[0, 7]", "0..6", "Discrete(7)"]), ([1, 1], ["[1, 1]", "distinct"]), ([], [])],
)
def test_action_subset_rejects_bad_ids(actions, must_name) -> None:
    with pytest.raises(ValueError) as info:
        ActionSubset(gym.make(ENV_ID), actions)
    for fragment in must_name:
        assert fragment in str(info.value)


def test_bad_action_subset_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"env.actions \[0, 9\].*0..6"):
        train.check_names(from_dict({"env": {"id": ENV_ID, "actions": [0, 9]}}))
    with pytest.raises(ConfigError, match=r"env.actions.*distinct"):
        from_dict({"env": {"id": ENV_ID, "actions": [2, 2]}})
    with pytest.raises(ConfigError, match="batched"):
        train.check_names(
            from_dict({"env": {"id": "memagents/Copy-v0", "vec_env": "batched", "actions": [0]}})
        )


def test_train_cli_runs_memory_s7(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = [
        "--config", str(CONFIG_DIR / "minigrid-memory-s7.yaml"),
        "--set", "core.kwargs.hidden_size=8",
        "--set", "policy.features_extractor_kwargs={features_dim: 8, embed_dim: 2, channels: [4]}",
        "--n-envs", "2", "--set", "ppo.n_steps=32", "--set", "ppo.batch_size=32",
        "--set", "ppo.n_epochs=1", "--total-timesteps", "64", "--set", "train.eval_episodes=1",
        "--checkpoint-freq", "0", "--device", "cpu", "--run-dir", str(run_dir),
    ]  # fmt: skip
    assert train.main(argv) == 0, capsys.readouterr().err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["episodes"] == 1 and result["success_rate"] in (0.0, 1.0)
    model = RecurrentPPO.load(run_dir / "model.zip", device="cpu")
    assert isinstance(model.policy.features_extractor, MiniGridExtractor)
