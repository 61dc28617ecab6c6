"""The curriculum callback: promotion rules on scripted episode ends, then real (tiny) training on
both env kinds: a DummyVecEnv of single envs and the batched TorchVecEnv."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env

from memagents.sb3 import MemoryPolicy, TorchVecEnv
from memagents.sb3.curriculum import CurriculumCallback

ENV = "memagents/Recall-v0"
TASK = {"min_delay": 1, "max_delay": 2}


def dummy_env(n=2, seed=0):
    return make_vec_env(ENV, n_envs=n, seed=seed, env_kwargs={**TASK, "render_mode": None})


def torch_env(n=2, seed=0):
    return TorchVecEnv.make(ENV, n, seed=seed, **TASK)


ENV_KINDS = {"dummy": dummy_env, "torch": torch_env}


def tiny_model(env):
    return RecurrentPPO(
        MemoryPolicy,
        env,
        n_steps=16,
        batch_size=32,
        n_epochs=1,
        policy_kwargs={"core": "lstm", "core_kwargs": {"hidden_size": 4}, "net_arch": [4]},
        seed=0,
        device="cpu",
    )


def scripted(callback, model):
    """Drive the callback by hand: ``end(i, success)`` finishes env i's episode, one step each."""
    callback.init_callback(model)
    callback.on_training_start({}, {})
    n = model.get_env().num_envs

    def step(ends=()):
        dones = np.zeros(n, dtype=bool)
        infos = [{} for _ in range(n)]
        for i, success in ends:
            dones[i] = True
            infos[i] = {"is_success": success}
        model.num_timesteps += 1
        callback.update_locals({"dones": dones, "infos": infos})
        callback.on_step()

    return step


@pytest.mark.parametrize("kind", list(ENV_KINDS))
def test_promotion_rules_with_scripted_episodes(kind):
    env = ENV_KINDS[kind]()
    model = tiny_model(env)
    cb = CurriculumCallback("max_delay", increment=3, freq=4, threshold=0.75, min_episodes=4)
    step = scripted(cb, model)
    assert cb.level == 2 and cb.next_check == 4
    step([(0, True)])
    step([(1, True)])
    step([(0, False)])
    step()  # check at step 4: 3 episodes < min_episodes -> no decision
    assert cb.level == 2
    step([(0, True)])  # 4 episodes, 3 successes = 0.75
    step()
    step()
    step()  # check at step 8: promoted
    assert cb.level == 5 and cb.last_success_rate == 0.75
    assert [d["max_delay"] for d in env.get_attr("difficulty")] == [5, 5]
    # episodes under way at the change started at delay 2: the first end of each env is ignored
    for _ in range(2):
        step([(0, True), (1, True)])  # 1st round stale, 2nd counts: 2 episodes
    step()
    step()  # check at step 12: 2 < 4 episodes
    assert cb.level == 5 and cb.episodes == 2
    for _ in range(4):
        step([(0, False), (1, True)])  # 6 of 10 succeed < 0.75
    assert cb.level == 5 and cb.last_success_rate == pytest.approx(0.6)
    assert cb.history == [(8, 5)]
    # the decided check at step 16 started a new count: the next judges only later episodes
    assert cb.episodes == 0
    for _ in range(4):
        step([(0, True), (1, True)])
    assert cb.level == 8 and cb.last_success_rate == 1.0


def test_a_level_is_judged_by_recent_episodes_not_its_first_ones():
    """Early failures at a level must not hold back a policy that has since learned it."""
    env = ENV_KINDS["dummy"]()
    model = tiny_model(env)
    cb = CurriculumCallback("max_delay", increment=1, freq=4, threshold=0.9, min_episodes=4)
    step = scripted(cb, model)
    for _ in range(4):
        step([(0, False), (1, False)])  # check at 4: 0 of 8
    assert cb.level == 2 and cb.last_success_rate == 0.0
    for _ in range(4):
        step([(0, True), (1, True)])  # check at 8: 8 of 8 recent (8 of 16 over the level)
    assert cb.level == 3 and cb.last_success_rate == 1.0


def test_max_value_caps_the_level(tmp_path):
    env = dummy_env()
    model = tiny_model(env)
    state = tmp_path / "curriculum.json"
    cb = CurriculumCallback(
        "max_delay", increment=5, freq=1, threshold=0.0, max_value=4, min_episodes=1,
        state_path=state,
    )  # fmt: skip
    step = scripted(cb, model)
    for _ in range(6):
        step([(0, False), (1, False)])
    assert cb.level == 4 and [lvl for _, lvl in cb.history] == [4]
    assert json.loads(state.read_text())["level"] == 4
    # a resumed run starts at the saved level
    env2 = dummy_env()
    cb2 = CurriculumCallback("max_delay", freq=1, state_path=state)
    scripted(cb2, tiny_model(env2))
    assert cb2.level == 4 and env2.envs[0].unwrapped.difficulty["max_delay"] == 4


def test_bad_knob_is_a_clear_error():
    model = tiny_model(dummy_env())
    cb = CurriculumCallback("max_length")
    with pytest.raises(ValueError, match=r"'max_length' is not a difficulty knob.*max_delay"):
        cb.init_callback(model)
    with pytest.raises(ValueError, match="increment"):
        CurriculumCallback("max_delay", increment=0)


@pytest.mark.parametrize("kind", list(ENV_KINDS))
def test_training_raises_the_level_and_logs_it(kind, tmp_path):
    from stable_baselines3.common.logger import configure

    env = ENV_KINDS[kind]()
    model = tiny_model(env)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    # threshold 0: every check with enough finished episodes promotes
    cb = CurriculumCallback("max_delay", increment=1, freq=32, threshold=0.0, min_episodes=2)
    model.learn(total_timesteps=128, callback=cb)
    assert cb.level >= 4  # checks at 32, 64, 96, 128 -> up to 6
    assert env.get_attr("max_delay")[0] == cb.level
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    col = rows[0].split(",").index("curriculum/level")
    levels = [float(r.split(",")[col]) for r in rows[1:]]
    assert levels == sorted(levels) and levels[-1] == cb.level and levels[0] >= 2
    if kind == "dummy":  # the episodes now played are at the new level: delay + 2 steps
        env.reset()
        lengths = []
        for _ in range(6 * (cb.level + 2)):
            _, _, _, infos = env.step(np.array([env.action_space.sample() for _ in range(2)]))
            lengths += [info["episode"]["l"] for info in infos if "episode" in info]
        assert 4 < max(lengths) <= cb.level + 2


def test_eval_env_measures_success_and_follows_the_level():
    env, eval_env = dummy_env(), dummy_env(n=1, seed=1)
    model = tiny_model(env)
    cb = CurriculumCallback("max_delay", freq=16, threshold=0.0, eval_env=eval_env, eval_episodes=2)
    model.learn(total_timesteps=32, callback=cb)
    assert cb.level == 4  # two checks, each promoted on the evaluation
    assert eval_env.envs[0].unwrapped.difficulty["max_delay"] == 4
    assert 0.0 <= cb.last_success_rate <= 1.0


def test_check_knob_for_config_validation():
    from memagents.sb3.curriculum import check_knob

    assert check_knob("memagents/Copy-v0", {}, "max_length") is None
    assert "max_length" in check_knob("memagents/Recall-v0", {}, "max_length")
    assert "not an algorithmic" in check_knob("CartPole-v1", {}, "max_length")
