"""The single (one episode at a time) algorithmic envs: registry, API, rules, oracle, errors.

Observations, rewards and renders compare bitwise: they are small integers and copies of them,
or numpy arithmetic in a fixed order (the same seeded run twice), exact on every CPU.
"""

from __future__ import annotations

import pickle
import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from envs_oracle import Oracle, brute_force_mode, expected_length
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

import envs
from envs import (
    AddingEnv,
    ArgmaxEnv,
    AssociativeRecallEnv,
    AssociativeRecallProblem,
    CopyEnv,
    CopyProblem,
    InvalidActionError,
    NumbersProblem,
    PrioritySortEnv,
    PrioritySortProblem,
    RecallEnv,
    RecallProblem,
    RepeatCopyEnv,
    RepeatCopyProblem,
)

ENV_CLASSES = [
    RecallEnv,
    CopyEnv,
    RepeatCopyEnv,
    AssociativeRecallEnv,
    PrioritySortEnv,
    AddingEnv,
    ArgmaxEnv,
]


def play(env: gym.Env, policy, seed: int | None = None, options=None):
    """One episode; returns (observations shown, rewards, final info)."""
    obs, _ = env.reset(seed=seed, options=options)
    shown, rewards = [obs], []
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(policy(shown[-1]))
        assert not truncated
        shown.append(obs)
        rewards.append(reward)
    return shown, rewards, info


# -- the registry --------------------------------------------------------------------------------
def test_registry_holds_exactly_the_listed_ids_and_every_task_has_a_default():
    registered = sorted(i for i in gym.registry if i.startswith("memagents/"))
    assert registered == sorted(envs.ENV_IDS)
    for task in [
        "Recall",
        "Copy",
        "RepeatCopy",
        "AssociativeRecall",
        "PrioritySort",
        "Adding",
        "Argmax",
    ]:
        assert f"memagents/{task}-v0" in registered
    assert "memagents/Copy-L20-v0" in registered
    assert gym.spec("memagents/Copy-L20-v0").kwargs == {
        "bits": 8,
        "min_length": 1,
        "max_length": 20,
    }


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_every_id_passes_gymnasium_and_sb3_env_checkers(env_id):
    env = gym.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning is a failure too
        gym_check_env(env.unwrapped, skip_render_check=False)
        sb3_check_env(env.unwrapped, warn=True)


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_seeded_determinism_and_different_seeds_give_different_episodes(env_id):
    def rollout(seed):
        env = gym.make(env_id)
        env.action_space.seed(seed)
        env.reset(seed=seed)
        out = []
        for _ in range(3):  # episodes after the first come from the same seeded stream
            shown, rewards, _ = play(env, lambda _obs: env.action_space.sample())
            out.append((np.stack(shown), np.array(rewards)))
        return out

    first, again, other = rollout(7), rollout(7), rollout(8)
    for (obs_a, rew_a), (obs_b, rew_b) in zip(first, again, strict=True):
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
    assert any(
        a.shape != b.shape or not np.array_equal(a, b)
        for (a, _), (b, _) in zip(first, other, strict=True)
    )


@pytest.mark.parametrize("cls", ENV_CLASSES)
def test_docstring_follows_the_gymnasium_template(cls):
    doc = cls.__doc__
    headings = re.findall(r"^    ## (.+)$", doc, flags=re.MULTILINE)
    assert headings == [
        "Description",
        "Observation Space",
        "Action Space",
        "Rewards",
        "Episode End",
        "Arguments",
        "Memoryless ceiling",
        "Version History",
    ]
    assert "v0" in doc.split("## Version History")[1]


# -- rules, by hand ------------------------------------------------------------------------------
def t(*rows):
    return torch.tensor(rows)


def scripted(env, problem, actions):
    """Play ``problem`` with the given actions; (observations incl. the final one, rewards, info)."""
    acts = iter(actions)
    return play(env, lambda _obs: next(acts), options={"problem": problem})


def test_recall_by_hand():
    env = RecallEnv(num_symbols=3)
    problem = RecallProblem(cue=t(2), delay=t(1))
    shown, rewards, info = scripted(env, problem, [0, 0, 2])
    np.testing.assert_array_equal(
        np.stack(shown), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    )
    assert rewards == [0.0, 0.0, 1.0] and info == {"is_success": True}
    _, rewards, info = scripted(env, problem, [2, 2, 1])  # right too early, wrong when asked
    assert rewards == [0.0, 0.0, 0.0] and info == {"is_success": False}


def test_copy_by_hand():
    env = CopyEnv(bits=2, max_length=2)
    problem = CopyProblem(seq=t([[1, 0], [0, 1]]).to(torch.uint8), length=t(2))
    actions = [[1, 1], [0, 0], [1, 1], [1, 1], [0, 1]]  # answers: 1 of 2 bits, then 2 of 2
    shown, rewards, info = scripted(env, problem, [np.array(a, np.int8) for a in actions])
    # channels: 2 data bits, delimiter, answer flag
    np.testing.assert_array_equal(
        np.stack(shown),
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
    )
    assert rewards == [0.0, 0.0, 0.0, 0.25, 0.5]  # bits right / (bits * L)
    assert info == {"is_success": False}


def test_repeat_copy_by_hand():
    env = RepeatCopyEnv(bits=1, max_length=2, max_repeats=2)
    problem = RepeatCopyProblem(seq=t([[1], [0]]).to(torch.uint8), length=t(2), repeats=t(2))
    actions = [[0], [0], [0], [0], [1], [0], [1], [1]]  # last answer wrong (target 0)
    shown, rewards, info = scripted(env, problem, [np.array(a, np.int8) for a in actions])
    np.testing.assert_array_equal(
        np.stack(shown),
        [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0], *[[0, 0, 1]] * 4, [0, 0, 0]],
    )
    assert rewards == [0, 0, 0, 0, 0.25, 0.25, 0.25, 0.0]
    assert info == {"is_success": False}


def test_associative_recall_by_hand_answers_after_the_first_occurrence():
    env = AssociativeRecallEnv(bits=1, item_length=1, max_items=4)
    # items [1], [0], [1], [1]; the query is item 2 = [1], which first occurs as item 0, so the
    # answer is item 1 = [0] (not item 3, which follows the query's own position)
    items = t([[[1]], [[0]], [[1]], [[1]]]).to(torch.uint8)
    problem = AssociativeRecallProblem(items=items, num_items=t(4), query=t(2))
    shown, rewards, info = scripted(env, problem, [np.array([0], np.int8)] * 11)
    # channels: data, item delimiter, answer flag, query delimiter
    expected = [
        [0, 1, 0, 0], [1, 0, 0, 0],  # item 0: delimiter, [1]
        [0, 1, 0, 0], [0, 0, 0, 0],  # item 1: delimiter, [0]
        [0, 1, 0, 0], [1, 0, 0, 0],  # item 2: delimiter, [1]
        [0, 1, 0, 0], [1, 0, 0, 0],  # item 3: delimiter, [1]
        [0, 0, 0, 1], [1, 0, 0, 0],  # query delimiter, query [1]
        [0, 0, 1, 0], [0, 0, 0, 0],  # answer step, final observation
    ]  # fmt: skip
    np.testing.assert_array_equal(np.stack(shown), expected)
    assert rewards == [0.0] * 10 + [1.0] and info == {"is_success": True}


def test_priority_sort_by_hand_is_stable_and_emits_the_top_outputs():
    env = PrioritySortEnv(bits=1, max_length=3, num_outputs=2)
    # priorities 0.25, 0.75, 0.25: order is vector 1, then vector 0 (ties keep input order)
    problem = PrioritySortProblem(
        seq=t([[1], [0], [0]]).to(torch.uint8),
        priority=t([0.25, 0.75, 0.25]).float(),
        length=t(3),
        outputs=t(2),
    )
    shown, rewards, info = scripted(
        env, problem, [np.array([b], np.int8) for b in [0, 0, 0, 0, 0, 1]]
    )
    # channels: data, delimiter, answer flag, priority
    np.testing.assert_array_equal(
        np.stack(shown),
        np.array(
            [
                [1, 0, 0, 0.25],
                [0, 0, 0, 0.75],
                [0, 0, 0, 0.25],
                [0, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 0],
            ],
            np.float32,
        ),
    )
    assert rewards == [0, 0, 0, 0, 0.5, 0.5] and info == {"is_success": True}


def test_adding_and_argmax_by_hand():
    problem = NumbersProblem(numbers=t([2, 1, 0, 2]), length=t(4))
    one_hot = [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    adding = AddingEnv(num_values=3, max_length=4)
    assert adding.action_space == gym.spaces.Discrete(2 * 4 * 2 + 1)  # length_limit 8, sums <= 16
    shown, rewards, info = scripted(adding, problem, [0, 0, 0, 0, 5])
    np.testing.assert_array_equal(np.stack(shown), one_hot)
    assert rewards == [0, 0, 0, 0, 1.0] and info == {"is_success": True}
    argmax = ArgmaxEnv(num_values=3, max_length=4)
    assert argmax.action_space == gym.spaces.Discrete(8)
    _, rewards, _ = scripted(argmax, problem, [0, 0, 0, 0, 0])  # the first 2 is at position 0
    assert rewards == [0, 0, 0, 0, 1.0]
    _, rewards, _ = scripted(argmax, problem, [0, 0, 0, 0, 3])  # the later tie does not count
    assert rewards == [0, 0, 0, 0, 0.0]


def test_scripted_problem_must_fit_the_env():
    env = CopyEnv(bits=2)
    with pytest.raises(ValueError, match="expected CopyProblem"):
        env.reset(options={"problem": RecallProblem(t(0), t(1))})
    with pytest.raises(ValueError, match="width 5"):
        env.reset(options={"problem": CopyProblem(torch.ones(1, 2, 3, dtype=torch.uint8), t(2))})
    with pytest.raises(ValueError, match="batch size 2"):
        env.reset(options={"problem": CopyProblem(torch.ones(2, 2, 2, dtype=torch.uint8), t(1, 2))})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"length": 3})
    with pytest.raises(ValueError, match="outside the action space"):
        AddingEnv(num_values=3, max_length=2).reset(
            options={"problem": NumbersProblem(t([2, 2, 2, 2, 2]), t(5))}  # sum 10 > 8
        )


# -- the oracle reaches exactly 1 -----------------------------------------------------------------
@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_oracle_scores_exactly_one_with_the_documented_episode_length(env_id):
    env = gym.make(env_id).unwrapped
    oracle = Oracle(env)
    env.reset(seed=0)
    lengths = set()
    for _ in range(40):
        oracle.reset()
        shown, rewards, info = play(env, oracle.act)
        episode_length = len(rewards)
        if isinstance(env.action_space, gym.spaces.Discrete):
            assert sum(rewards) == 1.0  # one answer step, reward exactly 1
        else:  # a float32 reward per answer step: 1 up to their rounding
            assert sum(rewards) == pytest.approx(1.0, abs=1e-6)
        assert info == {"is_success": True}
        assert episode_length == expected_length(env, oracle.history)
        assert episode_length <= env.max_episode_length
        assert all(r >= 0 for r in rewards)
        np.testing.assert_array_equal(shown[-1], np.zeros_like(shown[-1]))  # final observation
        lengths.add(episode_length)
    assert len(lengths) > 1 or env_id.endswith("PrioritySort-Hard-v0")  # lengths do vary


def test_oracle_in_recall_names_the_cue_shown_on_step_zero():
    env = RecallEnv(num_symbols=5, min_delay=0, max_delay=3)
    env.reset(seed=1)
    for _ in range(20):
        oracle = Oracle(env)
        shown, rewards, _ = play(env, oracle.act)
        assert shown[0][:5].sum() == 1 and shown[-2][5] == 1  # cue first, query last
        assert 2 <= len(rewards) <= 5 and rewards[-1] == 1.0


# -- bad arguments and actions -------------------------------------------------------------------
BAD_KWARGS = [
    (RecallEnv, {"num_symbols": 1}, "num_symbols=1"),
    (RecallEnv, {"min_delay": -1}, "min_delay=-1"),
    (RecallEnv, {"min_delay": 4, "max_delay": 2}, "min_delay=4 > max_delay=2"),
    (CopyEnv, {"bits": 0}, "bits=0"),
    (CopyEnv, {"bits": 2.5}, "bits=2.5"),
    (CopyEnv, {"bits": True}, "bits=True"),
    (CopyEnv, {"min_length": 0}, "min_length=0"),
    (CopyEnv, {"min_length": 5, "max_length": 3}, "min_length=5 > max_length=3"),
    (CopyEnv, {"render_mode": "human"}, "render_mode='human'"),
    (RepeatCopyEnv, {"min_repeats": 0}, "min_repeats=0"),
    (RepeatCopyEnv, {"min_repeats": 3, "max_repeats": 2}, "min_repeats=3 > max_repeats=2"),
    (AssociativeRecallEnv, {"min_items": 1}, "min_items=1"),
    (AssociativeRecallEnv, {"item_length": 0}, "item_length=0"),
    (PrioritySortEnv, {"num_outputs": 0}, "num_outputs=0"),
    (PrioritySortEnv, {"max_length": "8"}, "max_length='8'"),
    (AddingEnv, {"num_values": 1}, "num_values=1"),
    (AddingEnv, {"max_length": 30, "length_limit": 10}, "max_length=30 > length_limit=10"),
    (ArgmaxEnv, {"length_limit": 0}, "length_limit=0"),
    (ArgmaxEnv, {"min_length": 0}, "min_length=0"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), BAD_KWARGS)
def test_bad_kwargs_raise_value_error_naming_the_value(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**kwargs)


def test_bad_kwargs_through_gym_make_and_unknown_kwargs():
    with pytest.raises(ValueError, match="bits=0 is invalid: bits must be >= 1"):
        gym.make("memagents/Copy-v0", bits=0)
    with pytest.raises(TypeError, match="length"):
        CopyEnv(length=3)


@pytest.mark.parametrize(
    ("env_id", "action"),
    [
        ("memagents/Recall-v0", 4),
        ("memagents/Recall-v0", -1),
        ("memagents/Recall-v0", 1.0),
        ("memagents/Adding-v0", 49),
        ("memagents/Copy-v0", np.array([0, 1, 2, 0, 0, 0, 0, 0])),
        ("memagents/Copy-v0", np.zeros(7, np.int8)),
        ("memagents/Copy-v0", np.full(8, 0.5)),
        ("memagents/AssociativeRecall-v0", 1),
    ],
)
def test_out_of_space_action_raises_and_changes_nothing(env_id, action):
    env = gym.make(env_id, disable_env_checker=True).unwrapped
    env.reset(seed=3)
    with pytest.raises(InvalidActionError, match="is not in the action space"):
        env.step(action)
    assert env._t == 0  # no step was taken, no reward given
    with pytest.raises(ValueError):  # InvalidActionError is also a ValueError
        env.step(action)
    env.step(env.action_space.sample())  # a valid action still works


def test_step_before_reset_and_after_the_end_raise():
    env = CopyEnv(bits=1, max_length=1)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros(1, np.int8))
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.zeros(1, np.int8))
    with pytest.raises(gym.error.ResetNeeded, match="episode has ended"):
        env.step(np.zeros(1, np.int8))


def test_ansi_render():
    env = gym.make("memagents/Recall-v0", render_mode="ansi")
    env.reset(seed=0, options={"problem": RecallProblem(t(1), t(2))})
    assert env.render() == "RecallEnv step 0/4: obs [0. 1. 0. 0. 0.]\n"


# -- curriculum ----------------------------------------------------------------------------------
def test_set_difficulty_beyond_the_training_range_and_back():
    env = gym.make("memagents/Copy-v0").unwrapped  # trained on lengths 1..10
    env.reset(seed=0)
    assert env.set_difficulty(min_length=30, max_length=30) == {"min_length": 30, "max_length": 30}
    assert env.max_episode_length == 61
    oracle = Oracle(env)
    _, rewards, info = play(env, oracle.act)
    assert info["is_success"]
    assert len(rewards) == 61 and sum(rewards) == pytest.approx(1.0, abs=1e-6)
    env.max_length = 40  # a knob attribute goes through set_difficulty
    assert env.difficulty == {"min_length": 30, "max_length": 40}
    with pytest.raises(ValueError, match="max_length=3"):
        env.max_length = 3  # below min_length
    assert env.difficulty == {"min_length": 30, "max_length": 40}  # unchanged by the failure
    with pytest.raises(ValueError, match="bits=4 is not a difficulty knob"):
        env.set_difficulty(bits=4)
    with pytest.raises(AttributeError, match="fixed after construction"):
        env.bits = 4
    env.set_difficulty(min_length=1, max_length=1)
    for _ in range(5):
        _, rewards, _ = play(env, lambda _obs: env.action_space.sample())
        assert len(rewards) == 3


def test_set_difficulty_takes_effect_at_the_next_episode_only():
    env = RecallEnv(min_delay=2, max_delay=2)
    env.reset(seed=0)
    env.set_difficulty(min_delay=9, max_delay=9)
    steps = 0
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = env.step(0)
        steps += 1
    assert steps == 4  # the running episode kept delay 2
    _, rewards, _ = play(env, lambda _obs: 0)
    assert len(rewards) == 11


@pytest.mark.parametrize(
    ("env_id", "knobs", "length"),
    [
        (
            "memagents/RepeatCopy-v0",
            {"min_repeats": 7, "max_repeats": 7, "min_length": 2, "max_length": 2},
            2 + 7 + 14,
        ),
        (
            "memagents/AssociativeRecall-v0",
            {"item_length": 2, "min_items": 9, "max_items": 9},
            10 * 3 + 2,
        ),
        (
            "memagents/PrioritySort-v0",
            {"min_length": 12, "max_length": 12, "num_outputs": 5},
            12 + 1 + 5,
        ),
        ("memagents/Adding-v0", {"min_length": 12, "max_length": 12}, 13),  # = length_limit
        ("memagents/Argmax-v0", {"min_length": 11, "max_length": 11}, 12),
        ("memagents/Recall-v0", {"min_delay": 50, "max_delay": 50}, 52),
    ],
)
def test_every_task_generalises_beyond_its_training_lengths(env_id, knobs, length):
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    env.set_difficulty(**knobs)
    assert env.max_episode_length == length
    oracle = Oracle(env)
    for _ in range(3):
        oracle.reset()
        _, rewards, info = play(env, oracle.act)
        assert len(rewards) == length and info["is_success"]
        assert sum(rewards) == pytest.approx(1.0, abs=1e-6)


def test_adding_length_limit_bounds_the_curriculum():
    env = AddingEnv(max_length=6)  # length_limit defaults to 12
    with pytest.raises(ValueError, match="max_length=13 > length_limit=12"):
        env.set_difficulty(max_length=13)
    assert AddingEnv(max_length=6, length_limit=50).action_space.n == 50 * 4 + 1


def test_difficulty_through_sb3_dummy_vec_env_env_method():
    venv = DummyVecEnv([lambda: gym.make("memagents/Copy-v0")] * 2)
    venv.env_method("set_difficulty", min_length=4, max_length=4)
    assert venv.get_attr("difficulty") == [{"min_length": 4, "max_length": 4}] * 2
    venv.seed(0)
    venv.reset()
    dones_at = [step for step in range(1, 19) if venv.step(np.zeros((2, 8), np.int8))[2].all()]
    assert dones_at == [9, 18]  # 2 * 4 + 1 steps per episode, both envs


# -- memoryless ceiling, single env ---------------------------------------------------------------
def test_stated_ceilings_for_the_defaults():
    assert RecallEnv().memoryless_ceiling() == 0.25
    for cls in [CopyEnv, RepeatCopyEnv, AssociativeRecallEnv, PrioritySortEnv]:
        assert cls().memoryless_ceiling() == 0.5
    assert AddingEnv().memoryless_ceiling() == pytest.approx(0.0952448, abs=1e-7)
    # by enumerating all 10^2 + ... + 10^6 sequences once (too slow to repeat here)
    assert ArgmaxEnv().memoryless_ceiling() == pytest.approx(0.342331, abs=1e-6)


@pytest.mark.parametrize(
    "env",
    [
        AddingEnv(),
        AddingEnv(num_values=3, min_length=2, max_length=4),
        AddingEnv(num_values=4, min_length=1, max_length=3),
        ArgmaxEnv(num_values=10, min_length=2, max_length=4),
        ArgmaxEnv(num_values=5, min_length=2, max_length=4),
        ArgmaxEnv(num_values=2, min_length=1, max_length=5),
    ],
    ids=lambda e: f"{type(e).__name__}-{e.num_values}-{e.min_length}-{e.max_length}",
)
def test_exact_ceilings_match_brute_force_enumeration(env):
    mode, probability = brute_force_mode(env)
    assert env.memoryless_ceiling() == pytest.approx(probability, rel=1e-12)
    if isinstance(env, ArgmaxEnv):
        assert mode == 0


@pytest.mark.parametrize("env_id", [f"memagents/{task}-v0" for task in envs.TASKS])
def test_random_policy_in_the_single_env_stays_below_the_ceiling(env_id):
    env = gym.make(env_id)
    env.action_space.seed(0)
    env.reset(seed=0)
    returns = [sum(play(env, lambda _obs: env.action_space.sample())[1]) for _ in range(300)]
    ceiling = env.unwrapped.memoryless_ceiling()
    # returns lie in [0, 1]: by Hoeffding, P(mean > ceiling + 0.12) < exp(-2 * 300 * 0.12^2) < 2e-4
    assert np.mean(returns) <= ceiling + 0.12


# -- invariants of every layout, for any parameters ----------------------------------------------
PARAMS = {
    RecallEnv: lambda d: {"num_symbols": d(2, 6), "min_delay": d(0, 3), "max_delay": d(3, 6)},
    CopyEnv: lambda d: {"bits": d(1, 5), "min_length": d(1, 3), "max_length": d(3, 7)},
    RepeatCopyEnv: lambda d: {
        "bits": d(1, 4),
        "min_length": d(1, 2),
        "max_length": d(2, 4),
        "min_repeats": d(1, 2),
        "max_repeats": d(2, 4),
    },
    AssociativeRecallEnv: lambda d: {
        "bits": d(1, 4),
        "item_length": d(1, 3),
        "min_items": d(2, 3),
        "max_items": d(3, 5),
    },
    PrioritySortEnv: lambda d: {
        "bits": d(1, 4),
        "min_length": d(1, 3),
        "max_length": d(3, 6),
        "num_outputs": d(1, 7),
    },
    AddingEnv: lambda d: {"num_values": d(2, 6), "min_length": d(1, 3), "max_length": d(3, 6)},
    ArgmaxEnv: lambda d: {"num_values": d(2, 6), "min_length": d(1, 3), "max_length": d(3, 6)},
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), cls=st.sampled_from(ENV_CLASSES), seed=st.integers(0, 2**31 - 1))
def test_layout_invariants_hold_for_any_parameters(data, cls, seed):
    params = PARAMS[cls](lambda lo, hi: data.draw(st.integers(lo, hi)))
    env = cls(**params)
    episodes = env.layout(env.sample(16, torch.Generator().manual_seed(seed), "cpu"))
    obs, target, weight, length = episodes
    T = obs.shape[1]
    steps = torch.arange(T)[None, :]
    assert obs.dtype == torch.float32 and obs.shape[2] == env.observation_space.shape[0]
    assert bool(((obs >= 0) & (obs <= 1)).all())
    assert int(length.min()) >= 1 and int(length.max()) <= env.max_episode_length
    # room for the longest episode's final observation (some layouts size T by the batch's
    # longest episode, which need not be the longest possible one)
    assert int(length.max()) < T
    assert not bool(obs[steps.expand(16, T) >= length[:, None]].any())  # blank after the end
    assert not bool(weight[steps.expand(16, T) >= length[:, None]].any())  # no reward after it
    assert not bool(target[weight == 0].any())  # targets only on answer steps
    torch.testing.assert_close(
        weight.sum(1) * env.action_width, torch.ones(16), rtol=0, atol=1e-5
    )  # a perfect episode returns 1
    assert type(env.sample(1, torch.Generator(), "cpu")) is env.Problem
    oracle = Oracle(env)
    env.reset(seed=seed)
    _, rewards, info = play(env, oracle.act)
    assert info["is_success"] and sum(rewards) == pytest.approx(1.0, abs=1e-6)


def test_envs_pickle_with_their_random_state():
    env = CopyEnv(bits=3)
    env.reset(seed=5)
    clone = pickle.loads(pickle.dumps(env))
    for _ in range(3):
        np.testing.assert_array_equal(env.reset()[0], clone.reset()[0])


def test_rgb_array_render_shows_input_target_and_output_so_far():
    """Copy, L=3, 4 bits: rows 0..5 the observations, then a band, the targets, a band, the
    actions; columns are steps; a cell's grey level is its value."""
    env = gym.make("memagents/Copy-v0", render_mode="rgb_array", bits=4, min_length=3, max_length=3)
    obs = [env.reset(seed=3)[0]]
    actions = [np.array([1, 0, 1, 1], dtype=np.int8) for _ in range(5)]
    for action in actions:
        obs.append(env.step(action)[0])
    image = env.render()  # after 5 steps: 3 inputs, the delimiter, answers 0 and 1
    cell = env.unwrapped.CELL
    depth, bits = env.observation_space.shape[0], 4
    assert image.dtype == np.uint8
    assert image.shape == ((depth + 2 * bits + 2) * cell, (2 * 3 + 1 + 1) * cell, 3)
    centre = image[cell // 2 :: cell, cell // 2 :: cell, 1].astype(int)  # [rows, steps]
    inputs = centre[:depth]
    targets = centre[depth + 1 : depth + 1 + bits]
    outputs = centre[depth + 2 + bits :]
    for t in range(6):  # observations 0..5 seen so far, later steps black
        np.testing.assert_array_equal(inputs[:, t], (obs[t] * 255).astype(int))
    assert not inputs[:, 6:].any()
    assert (centre[depth] == 89).all() and (centre[depth + 1 + bits] == 89).all()  # the bands
    seq = np.stack([obs[j][:bits] for j in range(3)])  # the input vectors are the targets
    for j in range(2):  # answer steps 4 and 5 so far (step 5 is the current one)
        np.testing.assert_array_equal(targets[:, 4 + j], (seq[j] * 255).astype(int))
    np.testing.assert_array_equal(outputs[:, 4], actions[4].astype(int) * 255)  # answered: step 4
    assert not outputs[:, 5].any() and not outputs[:, :4].any() and not targets[:, :4].any()
    assert tuple(image[0, 5 * cell]) == (255, 80, 0)  # the current step is outlined


def test_rgb_array_render_of_discrete_tasks_is_one_hot():
    env = gym.make("memagents/Recall-v0", render_mode="rgb_array", min_delay=1, max_delay=1)
    obs, _ = env.reset(seed=0)
    cue = int(np.argmax(obs[:4]))
    env.step(0)  # the cue step
    env.step(0)  # the one delay step
    *_, terminated, _, _ = env.step((cue + 1) % 4)  # the query step, answered wrong
    assert terminated
    image = env.render()
    cell = env.unwrapped.CELL
    depth = env.observation_space.shape[0]
    centre = image[cell // 2 :: cell, cell // 2 :: cell, 1].astype(int)
    targets, outputs = centre[depth + 1 : depth + 5], centre[depth + 6 : depth + 10]
    assert targets[:, 2].tolist() == [255 if k == cue else 0 for k in range(4)]
    assert outputs[:, 2].tolist() == [255 if k == (cue + 1) % 4 else 0 for k in range(4)]
