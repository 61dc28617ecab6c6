"""Aggregation maths on known data: the bootstrap band, curve alignment, steps to threshold, and the
table/results written from synthetic run directories (no training, no SB3).

Bitwise comparisons are of numpy results in a fixed order (no BLAS): means and percentiles of
equal values, the same seeded bootstrap twice, steps and values copied from the logs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from memagents import aggregate as agg


# -- bootstrap ------------------------------------------------------------------------------------
def test_constant_seeds_give_a_zero_width_band():
    values = np.tile(np.linspace(0.0, 1.0, 7), (5, 1))  # 5 seeds, identical curves
    mean, low, high = agg.bootstrap_ci(values)
    np.testing.assert_array_equal(mean, values[0])
    np.testing.assert_array_equal(low, values[0])
    np.testing.assert_array_equal(high, values[0])


def test_one_seed_gives_a_zero_width_band():
    mean, low, high = agg.bootstrap_ci([[0.2, 0.7]])
    np.testing.assert_array_equal(low, high)
    np.testing.assert_array_equal(mean, [0.2, 0.7])


def test_band_covers_the_true_mean_with_the_expected_width():
    # T independent columns of S normal seeds: the 95% band should cover mu in ~95% of columns
    # (a percentile bootstrap of 20 samples under-covers slightly: ~93%) and its width should be
    # about 2 * 1.96 * sigma / sqrt(S) (times sqrt((S - 1) / S), the bootstrap's plug-in variance).
    rng = np.random.default_rng(123)
    S, T, mu, sigma = 20, 400, 0.5, 0.2
    x = rng.normal(mu, sigma, size=(S, T))
    mean, low, high = agg.bootstrap_ci(x, seed=7)
    coverage = np.mean((low <= mu) & (mu <= high))
    assert 0.88 <= coverage <= 0.99, coverage
    expected = 2 * 1.959964 * sigma / math.sqrt(S) * math.sqrt((S - 1) / S)
    assert np.mean(high - low) == pytest.approx(expected, rel=0.08)
    assert np.all(low <= mean) and np.all(mean <= high)
    np.testing.assert_allclose(mean, x.mean(axis=0))


def test_bootstrap_is_seeded():
    x = np.random.default_rng(0).normal(size=(5, 3))
    a = agg.bootstrap_ci(x, seed=1)
    b = agg.bootstrap_ci(x, seed=1)
    c = agg.bootstrap_ci(x, seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_scalar_samples_give_scalars():
    mean, low, high = agg.bootstrap_ci([0.0, 1.0, 2.0, 3.0])
    assert mean.shape == () and float(mean) == 1.5
    assert 0.0 <= float(low) < 1.5 < float(high) <= 3.0


# -- curves ---------------------------------------------------------------------------------------
def test_align_curves_uses_the_union_of_steps_up_to_the_shortest_seed():
    a = ([0, 10, 20], [0.0, 1.0, 2.0])
    b = ([0, 5, 10, 15, 20, 25], [0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    steps, values = agg.align_curves([a, b])
    np.testing.assert_array_equal(steps, [0, 5, 10, 15, 20])
    np.testing.assert_allclose(values[0], [0.0, 0.5, 1.0, 1.5, 2.0])  # interpolated
    np.testing.assert_allclose(values[1], [0.0, 0.0, 0.0, 0.0, 0.0])  # exact, 25 dropped


def test_steps_to_threshold_on_a_synthetic_curve():
    steps = np.arange(0, 100_001, 1_000)
    curve = 1 - np.exp(-steps / 20_000)  # reaches 0.9 at t = 20000 * ln(10) = 46051.7
    assert agg.steps_to_threshold(steps, curve, 0.9) == 47_000
    assert agg.steps_to_threshold(steps, curve, 0.999) is None  # 1 - e^-5 = 0.9933 at the end
    assert agg.steps_to_threshold([0, 10, 20], [0.2, 0.9, 0.95], 0.9) == 10  # reaching counts
    assert agg.steps_to_threshold([0, 10], [0.5, 0.4], 0.0) == 0


# -- run directories ------------------------------------------------------------------------------
def make_run(root, name, core, seed, evals, final=None, fps=(100.0, 10.0), env="memagents/Copy-v0"):
    """A synthetic run directory: evals is a list of (steps, reward, success)."""
    d = root / "runs" / name
    d.mkdir(parents=True)
    config = {"env": {"id": env, "kwargs": {}}, "core": {"name": core}, "train": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    lines = ["timesteps,mean_reward,std_reward,success_rate"]
    lines += [f"{t},{r},0.0,{s}" for t, r, s in evals]
    (d / "evaluations.csv").write_text("\n".join(lines) + "\n")
    if final is not None:
        reward, success, steps = final
        result = {"mean_reward": reward, "success_rate": success, "num_timesteps": steps}
        (d / "eval.json").write_text(json.dumps(result))
    fps_value, elapsed = fps
    (d / "progress.csv").write_text(
        "time/fps,time/time_elapsed,time/total_timesteps\n"
        f"{fps_value / 2},1,10\n{fps_value},{elapsed},{int(fps_value * elapsed)}\n"
    )
    return d


def test_table_and_results_from_known_runs(tmp_path):
    # core "good": both seeds reach 1.0 at step 200 (seed-mean 0.9 reached at 200)
    make_run(tmp_path, "good-s0", "lstm", 0, [(100, 0.5, 0.0), (200, 1.0, 1.0)], (1.0, 1.0, 300))
    make_run(tmp_path, "good-s1", "lstm", 1, [(100, 0.7, 0.0), (200, 0.9, 0.5)], (0.8, 0.5, 300))
    # core "flat": constant 0.25 -> not reached, zero-width CI
    for seed in (0, 1):
        make_run(
            tmp_path,
            f"flat-s{seed}",
            "mlp",
            seed,
            [(100, 0.25, 0.0), (200, 0.25, 0.0)],
            (0.25, 0.0, 300),
            fps=(50.0, 4.0),
        )
    results = agg.write_outputs(tmp_path, order=["flat"], with_model_stats=False)
    assert list(results["groups"]) == ["flat", "good"]
    good, flat = results["groups"]["good"], results["groups"]["flat"]
    assert results["threshold"] == pytest.approx(0.9)
    assert good["curve"]["steps"] == [100, 200, 300]  # eval.json adds the final point
    np.testing.assert_allclose(good["curve"]["mean"], [0.6, 0.95, 0.9])
    assert good["steps_to_threshold"] == 200
    assert good["final_reward"]["mean"] == pytest.approx(0.9)
    assert good["final_reward"]["low"] == pytest.approx(0.8)  # 2 seeds: bootstrap range = min..max
    assert good["final_reward"]["high"] == pytest.approx(1.0)
    assert good["success_rate"] == pytest.approx(0.75)
    assert good["steps_per_second"] == pytest.approx(100.0)
    assert flat["steps_to_threshold"] is None
    # success curves: good's seed mean is 0, 0.75, 0.75 (0.9 reward, but not 0.9 success)
    assert good["steps_to_success"] is None and flat["steps_to_success"] is None
    assert flat["final_reward"]["low"] == flat["final_reward"]["high"] == 0.25
    assert flat["steps_per_second"] == pytest.approx(50.0)

    table = (tmp_path / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.count("|") > 8}
    assert "0.900 ± 0.100 [0.800, 1.000]" in rows["good"]
    assert "| 200 |" in rows["good"] and "| 0.75 |" in rows["good"] and "| 100 |" in rows["good"]
    assert "not reached" in rows["flat"] and "0.250 ± 0.000" in rows["flat"]
    assert table.index("| flat") < table.index("| good")  # the requested order

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["groups"]["good"]["final_reward"]["per_seed"] == [1.0, 0.8]
    assert saved["groups"]["good"]["parameters"] is None  # NaN -> null (no model.zip)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "curves.svg").read_text()


def test_steps_to_success_follows_the_seed_mean_success_curve(tmp_path):
    # seed-mean success 0.25 at 100, 0.9 at 200 (0.8 and 1.0), 0.95 at 300: reached at 200
    make_run(tmp_path, "dnc-s0", "dnc", 0, [(100, 0.5, 0.0), (200, 0.95, 0.8)], (0.99, 0.9, 300))
    make_run(tmp_path, "dnc-s1", "dnc", 1, [(100, 0.6, 0.5), (200, 1.0, 1.0)], (1.0, 1.0, 300))
    results = agg.write_outputs(tmp_path, with_model_stats=False)
    assert results["groups"]["dnc"]["steps_to_success"] == 200
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if "| dnc" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == "200" and cells[6] == "200"  # steps to 0.90 reward, to 0.90 success


def test_unfinished_runs_show_curves_but_no_final(tmp_path):
    make_run(tmp_path, "dnc-s0", "dnc", 0, [(100, 0.3, 0.0)])
    results = agg.write_outputs(tmp_path, with_model_stats=False)
    g = results["groups"]["dnc"]
    assert g["curve"]["mean"] == [0.3] and g["finished_seeds"] == []
    assert "n/a (unfinished)" in (tmp_path / "table.md").read_text()


def test_a_resumed_run_keeps_the_last_evaluation_of_a_step(tmp_path):
    d = make_run(tmp_path, "gru-s0", "gru", 0, [(100, 0.1, 0), (200, 0.2, 0), (200, 0.4, 0)])
    steps, rewards, _ = agg.read_evaluations(d / "evaluations.csv")
    np.testing.assert_array_equal(steps, [100, 200])
    np.testing.assert_array_equal(rewards, [0.1, 0.4])


def test_length_generalisation_table(tmp_path):
    for seed, r2 in ((0, 0.4), (1, 0.6)):
        d = make_run(tmp_path, f"lstm-s{seed}", "lstm", seed, [(100, 1.0, 1.0)], (1.0, 1.0, 100))
        rows = [
            {"factor": 1.0, "length": 5, "mean_reward": 1.0, "success_rate": 1.0},
            {"factor": 2.0, "length": 10, "mean_reward": r2, "success_rate": 0.0},
        ]
        (d / "lengths.json").write_text(json.dumps({"lengths": rows}))
    results = agg.write_outputs(tmp_path, with_model_stats=False)
    by_factor = {row["factor"]: row for row in results["groups"]["lstm"]["lengths"]}
    assert by_factor[2.0]["mean_reward"] == pytest.approx(0.5)
    assert by_factor[2.0]["min_reward"] == 0.4 and by_factor[2.0]["seeds"] == 2
    table = (tmp_path / "table.md").read_text()
    assert "2× (L=10)" in table and "| lstm | 1.000 (1.00) | 0.500 (0.00) |" in table


def test_runs_of_different_envs_are_refused(tmp_path):
    make_run(tmp_path, "a-s0", "lstm", 0, [(1, 0.0, 0.0)])
    make_run(tmp_path, "b-s0", "lstm", 0, [(1, 0.0, 0.0)], env="memagents/Recall-v0")
    with pytest.raises(agg.AggregateError, match="different environments"):
        agg.write_outputs(tmp_path, with_model_stats=False)
    with pytest.raises(agg.AggregateError, match="no run directories"):
        agg.write_outputs(tmp_path / "empty", with_model_stats=False)
