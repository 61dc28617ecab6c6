"""``python -m memagents.compare`` end to end on a tiny grid: runs, reuse, resume, aggregate-only."""

from __future__ import annotations

import json
import shutil

import pytest

from memagents import compare

#: a tiny config for every run of the grid (cf. tests/test_train.py's TINY)
TINY_SETS = [
    "core.kwargs={hidden_size: 8}",
    "policy.net_arch=[8]",
    "env.n_envs=2",
    "ppo.n_steps=32",
    "ppo.batch_size=32",
    "ppo.n_epochs=1",
    "train.eval_episodes=4",
    "train.eval_freq=64",
    "train.checkpoint_freq=64",
    "train.device=cpu",
]


def compare_argv(out, *extra):
    argv = ["--env", "memagents/Recall-v0", "--cores", "lstm", "--seeds", "2"]
    argv += [
        "--total-timesteps",
        "128",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--length-factors",
        "1,2",
    ]
    for item in TINY_SETS:
        argv += ["--set", item]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One tiny compare (mlp and lstm baselines × 2 seeds), shared by the tests below."""
    out = tmp_path_factory.mktemp("compare")
    code = compare.main(compare_argv(out))
    return out, code


NAMES = ["mlp-s0", "mlp-s1", "lstm-s0", "lstm-s1"]


def test_tiny_compare_end_to_end(grid):
    out, code = grid
    assert code == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(NAMES)
    for name in NAMES:
        run = out / "runs" / name
        assert (run / "eval.json").is_file() and (run / "model.zip").is_file()
        lengths = json.loads((run / "lengths.json").read_text())["lengths"]
        assert [row["length"] for row in lengths] == [6, 12]  # Recall-v0: max_delay 6
    results = json.loads((out / "results.json").read_text())
    assert list(results["groups"]) == ["mlp", "lstm"]
    lstm, mlp = results["groups"]["lstm"], results["groups"]["mlp"]
    assert lstm["seeds"] == [0, 1] and lstm["finished_seeds"] == [0, 1]
    assert lstm["curve"]["steps"][-1] >= 128 and len(lstm["curve"]["per_seed"]) == 2
    assert lstm["state_size"] == 16 and mlp["state_size"] == 0  # LSTM h and c of 8; none
    assert lstm["parameters"] > mlp["parameters"] > 0
    assert lstm["steps_per_second"] > 0
    table = (out / "table.md").read_text()
    assert "| lstm | 2/2 |" in table and "Length generalisation" in table
    assert (out / "curves.png").stat().st_size > 0 and (out / "curves.svg").is_file()


def test_an_interrupted_compare_resumes_and_reuses_finished_runs(grid):
    out, code = grid
    assert code == 0
    killed = out / "runs" / "lstm-s1"
    # as if killed after the first checkpoint: no final model, no eval.json, no lengths
    for name in ("eval.json", "model.zip", "lengths.json"):
        (killed / name).unlink()
    latest = json.loads((killed / "checkpoints" / "latest.json").read_text())
    (killed / "checkpoints" / "latest.json").write_text(
        json.dumps({**latest, "num_timesteps": 64, "model": "step_64.zip", "rng": "step_64.rng.pt"})
    )
    # a run that died before its first checkpoint starts over
    dead = out / "runs" / "mlp-s1"
    shutil.rmtree(dead / "checkpoints")
    for name in ("eval.json", "model.zip", "lengths.json"):
        (dead / name).unlink()
    finished = out / "runs" / "lstm-s0" / "eval.json"
    stamp = finished.stat().st_mtime_ns
    assert compare.main(compare_argv(out)) == 0
    assert finished.stat().st_mtime_ns == stamp  # reused, not retrained
    assert (killed / "progress-resumed-1.csv").is_file()  # continued from its checkpoint
    assert json.loads((killed / "eval.json").read_text())["num_timesteps"] >= 128
    assert (killed / "lengths.json").is_file()
    assert not list(dead.glob("progress-resumed*")) and (dead / "eval.json").is_file()


def test_aggregate_only_on_existing_runs(grid, tmp_path, capsys):
    out, _ = grid
    copy = tmp_path / "copy"
    shutil.copytree(out / "runs", copy / "runs")
    assert compare.main(["--aggregate-only", "--out", str(copy), "--threshold", "0"]) == 0
    results = json.loads((copy / "results.json").read_text())
    assert results["threshold"] == 0.0
    assert set(results["groups"]) == {"lstm", "mlp"}
    assert results["groups"]["lstm"]["steps_to_threshold"] == 64  # first evaluation step
    assert "| lstm | 2/2 |" in capsys.readouterr().out


def test_another_config_in_the_same_out_is_refused(grid, capsys):
    out, _ = grid
    code = compare.main(compare_argv(out, "--set", "ppo.gamma=0.5"))
    err = capsys.readouterr().err
    assert code == 2 and "another config" in err and "ppo.gamma" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--cores", "tardis"], "'tardis'"),
        (["--seeds", "0"], "--seeds"),
        (["--jobs", "0"], "--jobs"),
        (["--set", "ppo.foo=1"], "'ppo.foo'"),
        (["--env", "NoSuchEnv-v0"], "NoSuchEnv-v0"),
        (["--length-factors", "1,x"], "--length-factors"),
        (["--no-baselines"], "no cores"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, tmp_path, capsys):
    code = compare.main(["--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "note:" not in line]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "out" / "runs").exists()


def test_aggregate_only_without_runs_exits_2(tmp_path, capsys):
    assert compare.main(["--aggregate-only", "--out", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_the_trainings_and_the_next_compare_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "memagents.compare", "--no-baselines", "--cores", "lstm"]
    argv += ["--seeds", "1", "--total-timesteps", "30000", "--out", str(out), "--jobs", "1"]
    argv += ["--length-factors", ""]
    for item in [*TINY_SETS, "train.eval_freq=2048", "train.checkpoint_freq=1024"]:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "runs" / "lstm-s0" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume" in err
    run = out / "runs" / "lstm-s0"
    assert not (run / "eval.json").exists()
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert (run / "progress-resumed-1.csv").is_file()
    assert json.loads((run / "eval.json").read_text())["num_timesteps"] >= 30000


def test_a_display_setting_does_not_make_another_config(grid, capsys):
    """A finished run that differs only in how training is shown (the progress bar) is the
    same run: reused, not refused."""
    out, _ = grid
    flipped = (
        "false"
        if "progress_bar: true" in (out / "runs" / "lstm-s0" / "config.yaml").read_text()
        else "true"
    )
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.zip")}
    assert finished
    assert compare.main(compare_argv(out, "--set", f"train.progress_bar={flipped}")) == 0
    assert "another config" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not trained again
