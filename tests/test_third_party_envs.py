"""Any Gymnasium env in the CLI.

- ``--env module:EnvId`` and ``env.packages`` (``--gym-packages``) import the module that
  registers the id; a module that cannot be imported, or that registers no such id, exits 2 with
  one line naming it;
- ``env.wrapper: flatten`` encodes ``Tuple``/``Dict``/``Discrete``/``MultiDiscrete``/
  ``MultiBinary``/``Box`` observations as one flat float ``Box`` (values checked by hand and
  against ``gymnasium.spaces.flatten``), and ``auto`` picks it exactly where SB3 cannot take the
  space;
- ``Dict`` observations with ``MultiDiscrete`` leaves, ``MultiDiscrete`` and ``Box`` actions
  train through the CLI;
- MiniGrid missions are dropped only where constant or with ``env.mission: drop``;
- POPGym's RepeatPrevious, Autoencode (Tuple observations) and Battleship (MultiDiscrete actions)
  train through the CLI (skipped when POPGym is not installed: ``pip install -e '.[popgym]'``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import ClassVar

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)
import numpy as np
import pytest
import yaml
from gymnasium import spaces
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.torch_layers import CombinedExtractor

from memagents import train
from memagents.config import ConfigError, from_dict
from memagents.wrappers import (
    FlatObservation,
    MiniGridCodes,
    default_wrapper,
    mission_is_constant,
    sb3_takes,
)

#: a tiny, fast run: GRU of 8, 2 envs, one epoch per 128-step update, evaluation only at the end
TINY = [
    *["--core", "gru", "--set", "core.kwargs={hidden_size: 8}", "--set", "policy.net_arch=[8]"],
    *["--n-envs", "2", "--set", "ppo.n_steps=64", "--set", "ppo.batch_size=64"],
    *["--set", "ppo.n_epochs=1", "--set", "train.eval_episodes=3", "--set", "train.eval_freq=0"],
    *["--set", "train.checkpoint_freq=0", "--device", "cpu"],
]

#: a module outside memagents that registers two envs on import, as a third-party package would
MODULE_SOURCE = '''
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TupleEcho(gym.Env):
    """Name the previous step's symbol: Tuple observations, MultiDiscrete actions."""

    metadata = {"render_modes": []}

    def __init__(self, length=8):
        self.observation_space = spaces.Tuple((spaces.Discrete(3), spaces.MultiDiscrete([2, 2])))
        self.action_space = spaces.MultiDiscrete([3, 2])
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.prev = 0, int(self.np_random.integers(3))
        return (self.prev, np.array([0, 1])), {}

    def step(self, action):
        reward = float(int(action[0]) == self.prev) / self.length
        self.t += 1
        self.prev = int(self.np_random.integers(3))
        obs = (self.prev, np.array([self.t % 2, 1]))
        return obs, reward, self.t >= self.length, False, {}


class DictBox(gym.Env):
    """A Dict of a Box and a MultiDiscrete, and Box actions: reward -|action - a[0]|."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Dict(
            {"a": spaces.Box(-1, 1, (3,), np.float32), "b": spaces.MultiDiscrete([2, 3])}
        )
        self.action_space = spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.obs = self.observation_space.sample()
        return self.obs, {}

    def step(self, action):
        reward = -abs(float(action[0]) - float(self.obs["a"][0]))
        self.t += 1
        self.obs = self.observation_space.sample()
        return self.obs, reward, self.t >= 6, False, {}


gym.register(__name__ + "/TupleEcho-v0", entry_point=TupleEcho)
gym.register(__name__ + "/DictBox-v0", entry_point=DictBox)
gym.register(__name__ + "-TupleEcho-v0", entry_point=TupleEcho)  # popgym's id style
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A fresh importable module (a new name per test: the registry is global) that registers
    ``<module>/TupleEcho-v0`` and ``<module>/DictBox-v0`` when imported; unregistered after."""
    name = f"thirdparty_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for env_id in [k for k in gym.registry if k.startswith((name + "/", name + "-"))]:
        del gym.registry[env_id]
    sys.modules.pop(name, None)


def run_cli(argv, capsys):
    code = train.main(argv)
    return code, capsys.readouterr().err


def load_model(run_dir):
    """The run's config and its final model."""
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return config, train.algorithm_class(config).load(run_dir / "model.zip", device="cpu")


# -- module:EnvId and env.packages ----------------------------------------------------------------
def test_module_env_id_imports_the_module_and_trains(third_party, tmp_path, capsys):
    env_id = f"{third_party}/TupleEcho-v0"
    assert env_id not in gym.registry and third_party not in sys.modules
    run_dir = tmp_path / "run"
    argv = ["--env", f"{third_party}:{env_id}", *TINY, "--total-timesteps", "256"]
    code, err = run_cli([*argv, "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    assert third_party in sys.modules and env_id in gym.registry
    config, model = load_model(run_dir)
    assert train.env_wrapper(config) == "flatten"
    # Tuple(Discrete(3), MultiDiscrete([2, 2])) -> 3 + 2 + 2 one-hot entries
    assert model.observation_space == spaces.Box(0.0, 1.0, (7,), np.float32)
    assert model.action_space == spaces.MultiDiscrete([3, 2])
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["episodes"] == 3 and result["mean_length"] == 8
    assert 0.0 <= result["mean_reward"] <= 1.0


def test_gym_packages_are_imported_before_the_env_is_made(third_party):
    argv = ["--env", f"{third_party}/TupleEcho-v0", "--gym-packages", f"json, {third_party}"]
    config = train.resolve_config(train.build_parser().parse_args([*argv, *TINY]))
    assert config.env.packages == ["json", third_party]
    assert config.env.id in gym.registry
    assert train.env_wrapper(config) == "flatten"


@pytest.mark.parametrize(
    ("argv", "must_name"),
    [
        (["--env", "no_such_mod_x:Foo-v0"], ["'no_such_mod_x'", "No module named"]),
        (["--gym-packages", "no_such_mod_x"], ["env.packages", "'no_such_mod_x'"]),
        (["--set", "env.packages=[popgym, 'a b']"], ["env.packages", "module names"]),
        (["--env", "json:Foo-v0"], ["'json'", "registered no environment 'Foo-v0'"]),
        (["--env", "memagents/Copy-v0", "--set", "env.wrapper=flat"], ["'flat'", "flatten"]),
    ],
)
def test_bad_env_imports_exit_2_with_one_line(argv, must_name, capsys):
    code, err = run_cli([*argv, *TINY], capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]  # not --core's note
    assert len(lines) == 1, err
    for fragment in must_name:
        assert fragment in lines[0], (fragment, lines[0])


def test_an_installed_package_named_by_the_id_prefix_is_imported_and_kept(third_party, capsys):
    """``--env popgym-RepeatPreviousEasy-v0`` after ``pip install popgym``: the id's prefix names
    an installed package, which is imported as ``--gym-packages`` would and kept in
    ``env.packages``, so that the saved config makes the env again (evaluate, resume)."""
    env_id = f"{third_party}-TupleEcho-v0"
    assert third_party not in sys.modules and env_id not in gym.registry
    config = train.resolve_config(train.build_parser().parse_args(["--env", env_id, *TINY]))
    assert third_party in sys.modules and env_id in gym.registry
    assert config.env.packages == [third_party]
    assert f"imported '{third_party}'" in capsys.readouterr().err
    # the package is imported but registers no such id: an error naming the other forms
    code, err = run_cli(["--env", f"{third_party}-NoSuch-v0", *TINY], capsys)
    assert code == 2 and "Traceback" not in err
    assert "unknown environment" in err and "module:EnvId" in err
    # a prefix that is no installed package: the same error, nothing imported
    code, err = run_cli(["--env", "nosuchpkg_q-Foo-v0", *TINY], capsys)
    assert code == 2 and "nosuchpkg_q" not in sys.modules and "module:EnvId" in err


# -- the flatten wrapper --------------------------------------------------------------------------
class FixedObsEnv(gym.Env):
    """Shows ``obs`` (or samples of its space) for three steps: a test bed for wrappers."""

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, space: spaces.Space, obs=None) -> None:
        self.observation_space = space
        self.action_space = spaces.Discrete(2)
        self.obs = obs

    def _obs(self):
        return self.observation_space.sample() if self.obs is None else self.obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, self.t >= 3, False, {}


NESTED = spaces.Dict(
    {
        "a_bits": spaces.MultiBinary(2),
        "b_cards": spaces.Tuple((spaces.Discrete(3, start=-1), spaces.MultiDiscrete([2, 3]))),
        "c_pos": spaces.Box(-1.0, 2.0, (2,), np.float32),
    }
)


def test_flatten_one_hot_encodes_by_hand():
    obs = {
        "a_bits": np.array([1, 0], dtype=np.int8),
        "b_cards": (np.int64(0), np.array([1, 2])),
        "c_pos": np.array([0.5, -1.0], dtype=np.float32),
    }
    env = FlatObservation(FixedObsEnv(NESTED, obs))
    expected = [
        *[1, 0],  # MultiBinary(2): the bits
        *[0, 1, 0],  # Discrete(3, start=-1) at 0: one-hot of 0 - (-1) = 1
        *[0, 1],  # MultiDiscrete entry 0 of 2 at 1
        *[0, 0, 1],  # MultiDiscrete entry 1 of 3 at 2
        *[0.5, -1.0],  # Box: the values
    ]
    assert env.observation_space == spaces.Box(
        low=np.array([0] * 10 + [-1, -1], dtype=np.float32),
        high=np.array([1] * 10 + [2, 2], dtype=np.float32),
        dtype=np.float32,
    )
    got, _ = env.reset(seed=0)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    # the same values as gymnasium's own flattening of this space
    np.testing.assert_array_equal(got, spaces.flatten(NESTED, obs).astype(np.float32))


def test_flatten_of_sampled_observations_passes_sb3_check_and_stays_one_hot():
    env = FlatObservation(FixedObsEnv(NESTED))
    sb3_check_env(env, warn=False)
    obs, _ = env.reset(seed=3)
    for _ in range(20):
        assert env.observation_space.contains(obs)
        assert obs[:2].sum() in (0, 1, 2)  # bits
        assert obs[2:5].sum() == 1 and obs[5:7].sum() == 1 and obs[7:10].sum() == 1
        obs, *_ = env.step(0)


def test_flatten_refuses_a_leaf_it_cannot_encode():
    space = spaces.Dict({"mission": spaces.Text(8), "x": spaces.Discrete(2)})
    with pytest.raises(ValueError, match=r"observation\['mission'\] is a Text"):
        FlatObservation(FixedObsEnv(space, {"mission": "go", "x": 0}))


@pytest.mark.parametrize(
    ("space", "takes"),
    [
        (spaces.Box(0, 1, (3,)), True),
        (spaces.Discrete(4), True),
        (spaces.MultiDiscrete([8, 8]), True),
        (spaces.MultiBinary(3), True),
        (spaces.Dict({"a": spaces.Box(0, 1, (2,)), "b": spaces.MultiDiscrete([2, 3])}), True),
        (spaces.Discrete(3, start=1), False),  # SB3 would one-hot encode x, not x - start
        (spaces.MultiDiscrete([[2, 2], [2, 2]]), False),  # SB3 splits 1-D nvec only
        (spaces.Tuple((spaces.Discrete(2), spaces.Discrete(4))), False),
        (spaces.Dict({"a": spaces.Dict({"b": spaces.Discrete(2)})}), False),
    ],
)
def test_auto_flattens_exactly_what_sb3_cannot_take(space, takes):
    assert sb3_takes(space) is takes
    assert default_wrapper("Some-v0", space) == ("none" if takes else "flatten")


def test_auto_picks_minigrid_by_id_also_in_module_form():
    assert default_wrapper("MiniGrid-MemoryS7-v0") == "minigrid"
    assert default_wrapper("minigrid:MiniGrid-MemoryS7-v0") == "minigrid"
    assert default_wrapper("minigrid:BabyAI-GoToRedBall-v0") == "minigrid"


def test_none_wrapper_on_a_tuple_space_is_a_config_error(third_party):
    config = from_dict(
        {"env": {"id": f"{third_party}:{third_party}/TupleEcho-v0", "wrapper": "none"}}
    )
    with pytest.raises(ConfigError, match=r"'none' passes Tuple\(.*use env.wrapper flatten"):
        train.check_names(config)


# -- native Dict observations, MultiDiscrete and Box actions --------------------------------------
def test_dict_observations_and_box_actions_train_through_the_cli(third_party, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--env", f"{third_party}:{third_party}/DictBox-v0", *TINY, "--total-timesteps", "256"]
    code, err = run_cli([*argv, "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    config, model = load_model(run_dir)
    assert train.env_wrapper(config) == "none"  # SB3 takes the Dict as it is
    assert isinstance(model.policy.features_extractor, CombinedExtractor)
    # Box(3,) + one-hot MultiDiscrete([2, 3]): 3 + 5 features into the core
    assert model.policy.memory_actor.input_size == 8
    assert model.action_space == spaces.Box(-1, 1, (1,), np.float32)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["mean_length"] == 6 and -12.0 <= result["mean_reward"] <= 0.0


# -- MiniGrid missions ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env_id", "constant"),
    [
        ("MiniGrid-MemoryS7-v0", True),
        ("MiniGrid-DoorKey-5x5-v0", True),
        ("MiniGrid-RedBlueDoors-6x6-v0", True),
        ("MiniGrid-Fetch-5x5-N2-v0", False),
        ("MiniGrid-GoToDoor-5x5-v0", False),
        ("BabyAI-GoToRedBall-v0", False),
        ("BabyAI-PutNextLocal-v0", False),
    ],
)
def test_constant_missions_are_told_from_varying_ones(env_id, constant):
    env = gym.make(env_id)
    assert mission_is_constant(env.observation_space["mission"]) is constant
    if constant:
        MiniGridCodes(env)
    else:
        with pytest.raises(ValueError, match=f"{env_id} can vary.*env.mission: drop"):
            MiniGridCodes(env)
        assert MiniGridCodes(env, mission="drop").observation_space.shape == (148,)
    env.close()


def test_babyai_is_refused_unless_the_mission_is_dropped(capsys):
    code, err = run_cli(["--env", "BabyAI-GoToRedBall-v0", *TINY], capsys)
    assert code == 2 and "Traceback" not in err
    assert "BabyAI-GoToRedBall-v0 can vary" in err
    assert "env.mission: drop" in err
    config = from_dict({"env": {"id": "BabyAI-GoToRedBall-v0", "mission": "drop", "n_envs": 1}})
    train.check_names(config)
    env = train.make_env(config, seed=0)
    assert env.observation_space.shape == (148,)
    env.close()


def test_flatten_never_drops_a_minigrid_mission():
    config = from_dict({"env": {"id": "MiniGrid-MemoryS7-v0", "wrapper": "flatten"}})
    with pytest.raises(ConfigError, match=r"\['mission'\] is a MissionSpace"):
        train.check_names(config)


# -- POPGym ---------------------------------------------------------------------------------------
@pytest.fixture
def popgym():
    return pytest.importorskip(
        "popgym", reason="POPGym is not installed (pip install -e '.[popgym]')"
    )


@pytest.mark.parametrize(
    ("env_id", "observation_space", "action_space", "lowest_return", "longest"),
    [
        # Discrete observations: SB3 one-hot encodes them itself (wrapper auto -> none);
        # one deck of 52 cards, returns scaled to [-1, 1]
        ("popgym-RepeatPreviousEasy-v0", spaces.Discrete(4), spaces.Discrete(4), -1.0, 51),
        # Tuple(Discrete(2), Discrete(4)) observations: flattened, one-hot (2 + 4 entries)
        (
            "popgym-AutoencodeEasy-v0",
            spaces.Box(0.0, 1.0, (6,), np.float32),
            spaces.Discrete(4),
            -1.0,
            103,
        ),
        # MultiDiscrete actions, one categorical per coordinate; 64 shots, 12 hits to sink all:
        # all misses return -64 / (64 - 12)
        (
            "popgym-BattleshipEasy-v0",
            spaces.Discrete(2),
            spaces.MultiDiscrete([8, 8]),
            -64 / 52,
            64,
        ),
    ],
)
def test_popgym_trains_through_the_cli(
    popgym, env_id, observation_space, action_space, lowest_return, longest, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    argv = ["--env", env_id, "--gym-packages", "popgym", *TINY, "--total-timesteps", "2048"]
    code, err = run_cli([*argv, "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    config, model = load_model(run_dir)
    assert config.env.packages == ["popgym"]
    assert model.observation_space == observation_space
    assert model.action_space == action_space
    assert model.num_timesteps >= 2048
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["episodes"] == 3 and 1 <= result["mean_length"] <= longest
    assert lowest_return - 1e-6 <= result["mean_reward"] <= 1.0 + 1e-6


def test_popgym_run_evaluates_in_a_fresh_process(popgym, tmp_path, capsys):
    """``memagents.evaluate`` imports the module of a ``module:EnvId`` id from the run's config."""
    run_dir = tmp_path / "run"
    argv = ["--env", "popgym:popgym-AutoencodeEasy-v0", *TINY, "--total-timesteps", "128"]
    code, err = run_cli([*argv, "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    out = tmp_path / "evaluate.json"
    cmd = [sys.executable, "-m", "memagents.evaluate", "--run", str(run_dir), "--episodes", "2"]
    proc = subprocess.run(
        [*cmd, "--output", str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["env"] == "popgym:popgym-AutoencodeEasy-v0" and report["episodes"] == 2
