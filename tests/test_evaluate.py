"""``python -m memagents.evaluate``: a tiny trained run evaluated, swept over lengths, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train import TINY

import envs
from memagents import evaluate, train
from memagents.config import ConfigError

ENV_ID = "memagents/Copy-Easy-v0"  # 4 bits, lengths 1..5: an episode of length L lasts 2 L + 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evaluate") / "run"
    argv = [*TINY, "--env", ENV_ID, "--total-timesteps", "64", "--checkpoint-freq", "64"]
    assert train.main([*argv, "--run-dir", str(path)]) == 0
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluates_the_final_model_and_writes_json(run_dir: Path, capsys) -> None:
    code, out, err = run_cli(["--run", str(run_dir), "--episodes", "6"], capsys)
    assert code == 0, err
    report = json.loads((run_dir / "evaluate.json").read_text())
    assert report["model"] == str(run_dir / "model.zip")
    assert report["episodes"] == 6 and report["env"] == ENV_ID
    assert 0.0 <= report["mean_reward"] <= 1.0 + 1e-6 and report["std_reward"] >= 0.0
    assert 0.0 <= report["success_rate"] <= 1.0
    assert 3 <= report["mean_length"] <= 11  # lengths 1..5 of the training range
    assert f"{report['mean_reward']:.3f}" in out and "evaluate.json" in out
    # deterministic policy, same seed: the same numbers again
    assert run_cli(["--run", str(run_dir), "--episodes", "6"], capsys)[0] == 0
    again = json.loads((run_dir / "evaluate.json").read_text())
    assert again["mean_reward"] == report["mean_reward"]


def test_lengths_sweep_sets_each_episode_length(run_dir: Path, capsys) -> None:
    out_path = run_dir / "sweep.json"
    argv = ["--run", str(run_dir), "--episodes", "3", "--lengths", "2,9", "--output", str(out_path)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads(out_path.read_text())
    assert report["trained_difficulty"] == {"min_length": 1, "max_length": 5}
    rows = report["lengths"]
    assert [row["length"] for row in rows] == [2, 9]
    for row in rows:
        length = row["length"]
        assert row["knobs"] == {"min_length": length, "max_length": length}
        assert row["episodes"] == 3
        assert row["mean_length"] == 2 * length + 1  # every episode at exactly this length
    assert "| 9 | min_length=9, max_length=9 |" in out


def test_checkpoint_flag_loads_the_checkpoint(run_dir: Path, capsys) -> None:
    ckpt = run_dir / "checkpoints" / "step_64.zip"
    code, _, err = run_cli(
        ["--run", str(run_dir), "--checkpoint", str(ckpt), "--episodes", "2"], capsys
    )
    assert code == 0, err
    report = json.loads((run_dir / "evaluate-step_64.json").read_text())
    assert report["model"] == str(ckpt) and report["num_timesteps"] == 64


def test_every_task_has_a_length_knob() -> None:
    for task, (cls, _variants) in envs.TASKS.items():
        env = cls()
        knobs = evaluate.length_knobs(env, 7)
        assert set(knobs) <= set(env.difficulty), task
        assert set(knobs.values()) == {7}
        env.set_difficulty(**knobs)  # a valid setting of the task
    assert evaluate.length_knobs(envs.RecallEnv(), 7) == {"min_delay": 7, "max_delay": 7}
    assert evaluate.length_knobs(envs.AssociativeRecallEnv(), 7) == {"min_items": 7, "max_items": 7}
    with pytest.raises(ConfigError, match="has no length knob"):  # e.g. a MiniGrid env
        evaluate.length_knobs(object(), 7)


@pytest.mark.parametrize(
    ("argv", "must_name"),
    [
        ([], ["--run"]),
        (["--run", "/nonexistent/run"], ["/nonexistent/run", "no such directory"]),
        (["--run", "{run}", "--lengths", "5,x"], ["--lengths", "'5,x'", "integers"]),
        (["--run", "{run}", "--lengths", "0"], ["length 0", "min_length"]),
        (["--run", "{run}", "--episodes", "0"], ["--episodes", ">= 1"]),
        (["--run", "{run}", "--checkpoint", "/no/such.zip"], ["--checkpoint", "/no/such.zip"]),
        (["--run", "{nomodel}"], ["model.zip", "--checkpoint"]),
        (["--run", "{run}/checkpoints"], ["config.yaml"]),
        (["--run", "{run}", "--checkpoint", "{bad}"], ["cannot load model", "bad.zip"]),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir: Path, tmp_path: Path, argv, must_name, capsys):
    nomodel = tmp_path / "nomodel"
    nomodel.mkdir()
    shutil.copy(run_dir / "config.yaml", nomodel / "config.yaml")
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip file\nsecond line")
    argv = [a.format(run=run_dir, nomodel=nomodel, bad=bad) for a in argv]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in must_name:
        assert fragment in lines[0], (fragment, lines[0])


def test_episodes_come_from_the_evaluation_seed(run_dir: Path, tmp_path: Path, capsys) -> None:
    # SB3's load(env=...) re-seeds the env with the training seed; the CLI must not let it
    from sb3_contrib import RecurrentPPO

    from memagents.config import from_dict, read_yaml

    out = tmp_path / "seeded.json"
    argv = ["--run", str(run_dir), "--episodes", "8", "--seed", "123", "--output", str(out)]
    assert run_cli(argv, capsys)[0] == 0
    report = json.loads(out.read_text())
    config = from_dict(read_yaml(run_dir / "config.yaml"))
    model = RecurrentPPO.load(run_dir / "model.zip", device="cpu")
    expected = train.evaluate(model, train.make_env(config, 123, n_envs=1), 8)
    assert report["seed"] == 123
    assert report["mean_length"] == expected["mean_length"]
    assert report["mean_reward"] == expected["mean_reward"]


def test_record_writes_one_frame_per_step(run_dir: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    gif, pngs = tmp_path / "episode.gif", tmp_path / "frames"
    out = tmp_path / "report.json"
    argv = ["--run", str(run_dir), "--episodes", "2", "--output", str(out)]
    code, _, err = run_cli([*argv, "--record", str(gif), "--png-dir", str(pngs)], capsys)
    assert code == 0, err
    recording = json.loads(out.read_text())["recording"]
    steps = recording["episode_length"]
    assert steps is not None and recording["frames"] == steps >= 3
    with Image.open(gif) as image:
        assert image.n_frames == steps
    assert len(list(pngs.glob("frame_*.png"))) == steps
    code, _, err = run_cli([*argv, "--record", str(tmp_path / "x.avi")], capsys)
    assert code == 2 and ".gif or .mp4" in err and "Traceback" not in err
