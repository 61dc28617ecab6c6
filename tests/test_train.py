"""The training CLI: config validation, a tiny end-to-end run, resume after a kill, NaN guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from memagents import train
from memagents.config import ConfigError, apply_overrides, from_dict, load_config, to_dict

TINY = [
    "--core",
    "lstm",
    "--set",
    "core.kwargs={hidden_size: 8}",
    "--set",
    "policy.net_arch=[8]",
    "--n-envs",
    "2",
    "--set",
    "ppo.n_steps=32",
    "--set",
    "ppo.batch_size=32",
    "--set",
    "ppo.n_epochs=1",
    "--set",
    "train.eval_episodes=4",
    "--device",
    "cpu",
]


def run_cli(argv, capsys):
    code = train.main(argv)
    err = capsys.readouterr().err
    return code, err


#: a batched Copy with an invalid difficulty knob
BATCHED_BAD = ["--set", "env.kwargs.max_length=0"]


@pytest.mark.parametrize(
    ("argv", "must_name"),
    [
        (["--set", "ppo.foo=1"], ["'ppo.foo'", "n_steps", "max_grad_norm"]),
        (["--set", "ppo.gamma=2"], ["ppo.gamma", "2.0", "[0, 1]"]),
        (["--set", "ppo.n_steps=abc"], ["ppo.n_steps", "'abc'", "integer"]),
        (["--core", "tardis"], ["'tardis'", "dnc", "lstm"]),
        (["--env", "NoSuchEnv-v0"], ["'NoSuchEnv-v0'", "memagents/"]),
        (["--set", "core.kwargs.memory_sz=3"], ["'memory_sz'", "memory_size"]),
        (["--seed", "x"], ["--seed", "'x'"]),
        (["--set", "novalue"], ["key=value"]),
        (["--resume", "/nonexistent/run"], ["/nonexistent/run", "config.yaml"]),
        (["--set", "ppo.pack_segments=on"], ["ppo.pack_segments", "True", "quote the word"]),
        (["--set", "ppo.pack_segments=sometimes"], ["ppo.pack_segments", "'sometimes'", "never"]),
        (["--set", "env.kwargs.max_delay=0"], ["env.kwargs", "max_delay=0", "min_delay"]),
        (["--set", "env.kwargs.colour=3"], ["env.kwargs", "'colour'"]),
        (["--set", "env.actions=[0, 4]"], ["env.actions", "[0, 4]", "0..3"]),
        (["--set", "ppo.credit=bits"], ["ppo.credit", "'bits'", "'element'"]),
        (["--set", "ppo.credit=element"], ["ppo.credit", "batched", "env.vec_env='dummy'"]),
        (
            [*["--env", "memagents/Copy-v0", "--set", "env.vec_env=batched"], *BATCHED_BAD],
            ["env.kwargs", "max_length=0"],
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, must_name, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in must_name:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    ("setting", "core", "packs"),
    [
        ("auto", "ntm", True),
        ("auto", "gru", False),
        ("always", "gru", True),
        ("never", "ntm", False),
    ],
)
def test_pack_segments_setting_reaches_the_rollout_buffer(setting, core, packs):
    config = from_dict(
        {
            "env": {"id": "memagents/Recall-v0", "n_envs": 2},
            "core": {"name": core, "kwargs": {"hidden_size": 8}},
            "ppo": {"n_steps": 8, "batch_size": 8, "pack_segments": setting},
        }
    )
    assert config.ppo.buffer == "sequence-start"  # the default
    env = train.make_env(config, seed=0)
    model = train.make_model(config, env, "cpu")
    assert model.rollout_buffer.pack_segments is packs
    env.close()


def test_overrides_are_typed_and_dotted():
    data = apply_overrides(
        {}, ["ppo.n_steps=64", "core.kwargs.memory_size=32", "policy.net_arch=[16, 16]"]
    )
    config = from_dict(data)
    assert config.ppo.n_steps == 64
    assert config.core.kwargs == {"memory_size": 32}
    assert config.policy.net_arch == [16, 16]
    # ints are accepted for floats and become floats; the rest keep their defaults
    assert from_dict({"ppo": {"clip_range": 1}}).ppo.clip_range == 1.0
    with pytest.raises(ConfigError, match="true or false"):
        from_dict({"train": {"progress_bar": "yes"}})


def test_default_config_is_valid_and_round_trips():
    config = load_config()
    train.check_names(config)
    assert from_dict(to_dict(config)) == config
    assert config.train.torch_threads == 1


def test_tiny_run_writes_the_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--total-timesteps", "128", "--checkpoint-freq", "64", "--run-dir", str(run_dir)]
    argv += ["--set", "train.eval_freq=64"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["core"]["name"] == "lstm" and saved["ppo"]["n_steps"] == 32
    assert from_dict(saved).env.n_envs == 2
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result) >= {"mean_reward", "std_reward", "success_rate", "episodes"}
    assert result["episodes"] == 4
    assert 0.0 <= result["mean_reward"] <= 1.0 + 1e-6
    assert 3 <= result["mean_length"] <= 8  # Recall-v0: delay 1..6 + cue + query
    assert result["num_timesteps"] >= 128
    assert (run_dir / "model.zip").is_file()
    header = (run_dir / "progress.csv").read_text().splitlines()[0]
    assert "time/total_timesteps" in header
    evals = (run_dir / "evaluations.csv").read_text().splitlines()
    assert evals[0] == "timesteps,mean_reward,std_reward,success_rate" and len(evals) >= 3
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["num_timesteps"] % 64 == 0 and latest["num_timesteps"] >= 64
    assert list(run_dir.glob("events.out.tfevents*"))


def test_the_latest_checkpoint_of_a_finished_run_is_its_final_model(tmp_path, capsys):
    """The periodic checkpoint at the run's last step is taken before the last update; the
    run's end saves the final model as the latest checkpoint, so that ``--resume`` of a
    finished run continues from (or re-evaluates) what ``model.zip`` holds."""
    from sb3_contrib import RecurrentPPO

    run_dir = tmp_path / "run"
    argv = [*TINY, "--total-timesteps", "128", "--checkpoint-freq", "64", "--run-dir", str(run_dir)]
    assert run_cli(argv, capsys)[0] == 0
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    final = RecurrentPPO.load(run_dir / "model.zip", device="cpu").policy.state_dict()
    ckpt = RecurrentPPO.load(run_dir / "checkpoints" / latest["model"], device="cpu")
    assert (
        latest["num_timesteps"] == json.loads((run_dir / "eval.json").read_text())["num_timesteps"]
    )
    for name, value in ckpt.policy.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)


def test_resume_continues_to_the_original_total(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--total-timesteps", "128", "--checkpoint-freq", "64", "--run-dir", str(run_dir)]
    assert run_cli(argv, capsys)[0] == 0
    # pretend the run was killed after its first checkpoint and asked for more steps
    (run_dir / "model.zip").unlink()
    (run_dir / "eval.json").unlink()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["total_timesteps"] = 256
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    first_ckpt = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["num_timesteps"]
    code, err = run_cli(["--resume", str(run_dir)], capsys)
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["num_timesteps"] >= 256
    resumed = (run_dir / "progress-resumed-1.csv").read_text().splitlines()
    steps_col = resumed[0].split(",").index("time/total_timesteps")
    first_logged = int(float(resumed[1].split(",")[steps_col]))
    assert first_ckpt < first_logged <= first_ckpt + 2 * 32  # continued, not restarted
    assert (run_dir / "progress.csv").exists()  # the first segment is kept


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--total-timesteps", "64", "--checkpoint-freq", "64", "--run-dir", str(run_dir)]
    assert run_cli(argv, capsys)[0] == 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["total_timesteps"] = 512
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    good = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    (run_dir / "eval.json").unlink()

    import sb3_contrib

    real_load = sb3_contrib.RecurrentPPO.load

    def poisoned_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        _name, param = next(iter(model.policy.named_parameters()))
        with torch.no_grad():
            param.view(-1)[0] = math.nan
        return model

    monkeypatch.setattr(sb3_contrib.RecurrentPPO, "load", poisoned_load)
    code, err = run_cli(["--resume", str(run_dir)], capsys)
    assert code == 3
    assert "non-finite" in err and "step" in err and "Traceback" not in err
    # the last good checkpoint is untouched and loads with finite weights
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text()) == good
    model = real_load(run_dir / "checkpoints" / good["model"], device="cpu")
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert not (run_dir / "eval.json").exists()


def test_curriculum_block_raises_the_knob_during_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--total-timesteps", "256", "--run-dir", str(run_dir)]
    argv += ["--set", "curriculum={knob: max_delay, increment: 2, freq: 64, threshold: 0.0}"]
    argv += ["--set", "curriculum.min_episodes=1", "--set", "train.eval_freq=0"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    start = load_config().env.kwargs.get("max_delay", 6)
    level = json.loads((run_dir / "curriculum.json").read_text())["level"]
    # threshold 0 promotes at every check: 256 steps / 64 per check, +2 each
    assert level >= start + 2 and (level - start) % 2 == 0


def test_curriculum_knob_must_exist(capsys):
    code, err = run_cli(["--set", "curriculum.knob=max_wombats"], capsys)
    assert code == 2 and "curriculum.knob" in err and "max_wombats" in err


@pytest.mark.parametrize(("target_kl", "updates"), [(0.0, 3), (1.0e-9, 1)])
def test_target_kl_stops_the_epochs_early(target_kl, updates):
    """``ppo.target_kl: 0`` is off (every epoch runs); a tiny one stops after the first
    minibatch step of the first epoch, once the policy has moved at all."""
    from memagents.config import load_config

    config = load_config(
        None,
        [
            "env.id=memagents/Recall-v0",
            "env.vec_env=batched",
            "env.n_envs=8",
            "ppo.n_steps=16",
            "ppo.batch_size=32",
            "ppo.n_epochs=3",
            f"ppo.target_kl={target_kl:.10f}",
            "core.kwargs.hidden_size=8",
        ],
    )
    env = train.make_env(config, seed=0)
    model = train.make_model(config, env, "cpu")
    assert model.target_kl == (target_kl or None)
    model.learn(128)
    assert model._n_updates == updates


def test_batched_evaluation_steps_all_episodes_at_once_without_favouring_short_ones():
    """A batched run evaluates on a batched env of ``min(episodes, 256)`` envs. SB3's
    ``evaluate_policy`` gives every env an equal share of the episodes, so the mean episode
    length is the task's: Copy at lengths 1..10 lasts ``2 L + 1`` steps, 12 on average (std
    5.7); the first 96 episodes to finish on 16 envs would be far shorter."""
    from memagents.config import load_config
    from memagents.sb3 import MemoryPolicy, MemoryPPO, TorchVecEnv

    batched = load_config(None, ["env.id=memagents/Copy-v0", "env.vec_env=batched"])
    assert train.eval_env_count(batched, 100) == 100
    assert train.eval_env_count(batched, 1000) == train.EVAL_BATCH
    assert train.eval_env_count(load_config(None, []), 100) == 1
    env = TorchVecEnv.make("memagents/Copy-v0", 16, seed=3)
    model = MemoryPPO(
        MemoryPolicy, env, n_steps=8, batch_size=8, policy_kwargs=dict(core="lstm"), seed=0
    )
    result = train.evaluate(model, env, 96)
    assert result["episodes"] == 96
    assert 10.0 <= result["mean_length"] <= 14.0, result  # 12 ± 3.4 standard errors
