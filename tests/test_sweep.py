"""``python -m memagents.sweep``: input checks, the message without Ray, and a tiny sweep on a local
Ray (skipped when Ray is not installed) that lands in the same layout as ``compare``."""

from __future__ import annotations

import builtins
import json
import time

import pytest
import yaml
from test_compare import TINY_SETS

from memagents import sweep


def test_grid_and_resources_parsing():
    grid = sweep.parse_grid(["ppo.learning_rate=0.001,0.003", "ppo.n_epochs=1,2"])
    assert len(grid) == 4 and {"ppo.learning_rate": 0.003, "ppo.n_epochs": 2} in grid
    assert sweep.parse_grid([]) == [{}]
    assert sweep.parse_resources("cpu=1,gpu=0.5") == {"cpu": 1.0, "gpu": 0.5}
    with pytest.raises(sweep.ConfigError, match="name=amount"):
        sweep.parse_resources("cpu")
    with pytest.raises(sweep.ConfigError, match="KEY=V1,V2"):
        sweep.parse_grid(["ppo.learning_rate"])


def test_without_ray_exits_2_and_says_how_to_install(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    code = sweep.main(["--cores", "lstm", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Ray Tune is not installed" in err[0] and ".[distributed]" in err[0]


def test_tiny_sweep_on_local_ray(tmp_path):
    pytest.importorskip("ray.tune")
    import ray

    out = tmp_path / "sweep"
    argv = ["--env", "memagents/Recall-v0", "--cores", "lstm", "--no-baselines", "--seeds", "1"]
    argv += ["--total-timesteps", "128", "--out", str(out), "--length-factors", "1"]
    argv += ["--grid", "ppo.learning_rate=0.001,0.003", "--jobs", "2"]
    for item in TINY_SETS:
        argv += ["--set", item]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert sweep.main(argv) == 0
    finally:
        ray.shutdown()
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == ["lstm-learning_rate=0.001-s0", "lstm-learning_rate=0.003-s0"]
    for name in names:
        assert (out / "runs" / name / "eval.json").is_file()
        assert (out / "runs" / name / "lengths.json").is_file()
    # Tune received the evaluations while training, then the final one
    reports = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in (out / "ray" / "sweep").glob("*/result.json")
    ]
    assert len(reports) == 2
    for rows in reports:
        assert [r["done"] for r in rows][-1] is True and len(rows) >= 2
        assert rows[-1]["timesteps"] >= 128
    results = json.loads((out / "results.json").read_text())
    labels = ["lstm-learning_rate=0.001", "lstm-learning_rate=0.003"]  # the grid cell, no seed
    assert list(results["groups"]) == labels
    final = json.loads((out / "runs" / names[1] / "eval.json").read_text())
    assert results["groups"][labels[1]]["final_reward"]["per_seed"] == [final["mean_reward"]]
    assert (out / "curves.png").is_file() and (out / "table.md").is_file()


def test_tune_checkpoint_round_trip_restores_a_resumable_run(tmp_path, capsys):
    """What a trial hands to Tune is enough for `train --resume` on a machine without the run."""
    from memagents import sweep, train

    run_dir = tmp_path / "run"
    argv = [
        "--core", "lstm", "--set", "core.kwargs={hidden_size: 8}", "--set", "policy.net_arch=[8]",
        "--n-envs", "2", "--set", "ppo.n_steps=32", "--set", "ppo.batch_size=32",
        "--set", "ppo.n_epochs=1", "--set", "train.eval_episodes=2", "--set", "train.eval_freq=0",
        "--device", "cpu", "--total-timesteps", "128", "--checkpoint-freq", "64",
    ]  # fmt: skip
    assert train.main([*argv, "--run-dir", str(run_dir)]) == 0
    packed = tmp_path / "tune-checkpoint"
    sweep.pack_run_checkpoint(run_dir, packed)
    assert sorted(p.name for p in (packed / "checkpoints").iterdir()) == sorted(
        ["latest.json", "step_128.zip", "step_128.rng.pt"]
    )
    fresh = tmp_path / "elsewhere" / "run"
    assert sweep.restore_run_checkpoint(packed, fresh)
    assert not sweep.restore_run_checkpoint(packed, fresh)  # never overwrites a checkpoint
    config = yaml.safe_load((fresh / "config.yaml").read_text())
    config["train"]["total_timesteps"] = 192
    (fresh / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--resume", str(fresh)]) == 0
    result = json.loads((fresh / "eval.json").read_text())
    assert result["num_timesteps"] >= 192
    lines = (fresh / "progress.csv").read_text().splitlines()
    column = lines[0].split(",").index("time/total_timesteps")
    assert int(float(lines[1].split(",")[column])) > 128  # continued from step 128, not from 0
    capsys.readouterr()


def test_trainable_reports_the_metric_every_time_and_each_row_once(tmp_path, monkeypatch):
    """A run that writes a checkpoint before its first evaluation (faster training made this a
    race in the local-Ray sweep): Tune's strict metric check fails any report without
    ``mean_reward``, so the checkpoint waits for the first row; no row is reported twice."""
    tune = pytest.importorskip("ray.tune")
    from pathlib import Path

    from memagents import compare

    run_dir = tmp_path / "runs" / "x-s0"
    spec = compare.RunSpec("x-s0", "lstm", 0, run_dir, [], {})
    reports = []

    def fake_run(spec, runner, logs, factors, episodes):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.yaml").write_text("{}\n")
        for name in ("model_64.zip", "rng_64.pt"):
            (run_dir / "checkpoints" / name).write_text("x")
        latest = {"model": "model_64.zip", "rng": "rng_64.pt", "timesteps": 64}
        (run_dir / "checkpoints" / "latest.json").write_text(json.dumps(latest))
        time.sleep(0.05)  # a poll sees the checkpoint before any evaluation row
        rows = "timesteps,mean_reward,std_reward,success_rate\n64,0.5,0.1,0.5\n128,0.75,0.1,0.7\n"
        (run_dir / "evaluations.csv").write_text(rows)
        time.sleep(0.05)
        final = {"mean_reward": 0.8, "success_rate": 0.7, "num_timesteps": 128}
        (run_dir / "eval.json").write_text(json.dumps(final))
        return {"code": 0}

    def report(metrics, checkpoint=None):
        reports.append((dict(metrics), checkpoint is not None))

    monkeypatch.setattr(compare, "do_run", fake_run)
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    trainable = sweep.make_trainable({"x-s0": spec}, [1], 1, poll=0.01)
    trainable({"name": "x-s0"})
    assert all("mean_reward" in metrics for metrics, _ in reports)
    assert sum(with_checkpoint for _, with_checkpoint in reports) == 1
    steps = [m["timesteps"] for m, _ in reports if not m["done"]]
    assert steps == [64.0, 128.0]  # each evaluation row once, in order
    assert reports[-1][0]["done"] and reports[-1][0]["mean_reward"] == 0.8
    assert Path(run_dir / "eval.json").is_file()
