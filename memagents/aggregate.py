"""Aggregate run directories of one environment into learning curves, a table and raw numbers.

Reads the run directories of ``memagents.train`` (``config.yaml``, ``evaluations.csv``,
``eval.json``, ``progress*.csv``, ``model.zip`` and, if ``compare`` wrote it, ``lengths.json``),
groups them by label (the run directory's name without its ``-s<seed>`` suffix, e.g. ``dnc`` for
``runs/dnc-s0``; the config's core name if the name has no such suffix) and writes into ``DIR``:

- ``curves.png`` and ``curves.svg``: evaluation reward against environment steps, one line per
  label (the mean over seeds) with its 95% bootstrap confidence band;
- ``table.md``: per label the final reward ± CI, success rate, steps to reach the threshold,
  steps/s, parameter count and recurrent state size, then the length-generalisation table;
- ``results.json``: every number behind them, per seed.

The statistics, written once here and used by both ``compare`` and ``sweep``:

- **Alignment.** Seeds may have evaluated at different steps (another ``n_envs``, a resumed run).
  Each seed's curve is its ``evaluations.csv`` rows plus the final ``eval.json`` point; the common
  grid is the union of all seeds' evaluation steps up to the shortest seed's last step, and every
  seed is linearly interpolated onto it (``np.interp``; exact where a seed evaluated at that step).
- **Confidence band.** Percentile bootstrap of the mean over seeds, independently at every grid
  step: draw ``S`` of the ``S`` seed values with replacement ``n_boot`` times (one seeded
  ``numpy.random.Generator``, so the band is reproducible), take each draw's mean, report the
  2.5th and 97.5th percentiles. With one seed the band has zero width (there is nothing to
  resample); read it as "no estimate", not as certainty.
- **Final reward** is ``eval.json``'s ``mean_reward`` (the deterministic evaluation after the
  last step), mean over seeds with the same bootstrap CI. **Success rate** is the seed mean of
  ``eval.json``'s ``success_rate``.
- **Steps to threshold**: the first grid step at which the seed-mean curve reaches the threshold
  (``>=``), or "not reached". The default threshold is 0.9 of the task's best return
  (:func:`max_return`: 1.0 for ``memagents/`` tasks and MiniGrid).
- **Steps/s**: environment steps per second of wall time spent in ``model.learn`` (rollouts,
  updates and the periodic evaluations), from SB3's ``time/fps`` and ``time/time_elapsed`` in the
  last row of every ``progress*.csv`` segment (resumed runs have several), summed over segments.
- **Parameters and state size** are read from one seed's ``model.zip`` per label through
  :mod:`memagents.sb3` (imported only then): trainable parameters of the whole policy, and the
  floats of recurrent state carried per environment (actor core + critic core, if separate).

This module itself needs only numpy, PyYAML and matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

#: confidence level of every band and interval
CONFIDENCE = 0.95
#: bootstrap resamples per grid step
N_BOOT = 2_000
#: fraction of the task's best return that counts as "solved" by default
DEFAULT_THRESHOLD_FRACTION = 0.9

_SEED_SUFFIX = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")


class AggregateError(ValueError):
    """Run directories that cannot be aggregated; the message is one line fit for a CLI."""


# -- statistics ---------------------------------------------------------------------------------
def bootstrap_ci(
    samples: Any, confidence: float = CONFIDENCE, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and its percentile-bootstrap confidence interval, per column.

    :param samples: ``[S, T]`` (or ``[S]``) values: ``S`` seeds at ``T`` evaluation steps.
    :param confidence: coverage of the interval (0.95: the 2.5th to 97.5th percentile).
    :param n_boot: bootstrap resamples.
    :param seed: seed of the resampling generator (the same data give the same interval).
    :return: ``(mean, low, high)``, each ``[T]`` (scalars as 0-d arrays for ``[S]`` input).
    """
    x = np.asarray(samples, dtype=np.float64)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"samples must be [S, T] with S >= 1 seeds; got shape {x.shape}")
    rng = np.random.default_rng(seed)
    S = x.shape[0]
    idx = rng.integers(0, S, size=(n_boot, S))  # [n_boot, S] seeds drawn with replacement
    boot_means = x[idx].mean(axis=1)  # [n_boot, S, T] -> [n_boot, T]
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(boot_means, [alpha, 1 - alpha], axis=0)  # [T] each
    mean = x.mean(axis=0)
    # a constant column must give a zero-width band exactly (quantile interpolation may round)
    low, high = np.minimum(low, mean), np.maximum(high, mean)
    if squeeze:
        return mean[0], low[0], high[0]
    return mean, low, high


def align_curves(curves: list[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Put seeds' curves on one grid of steps (see the module docstring).

    :param curves: per seed ``(steps [T_s], values [T_s])``, steps increasing.
    :return: ``steps [T]`` (the union of the seeds' steps up to the shortest seed's last step)
        and ``values [S, T]`` (each seed linearly interpolated onto ``steps``).
    """
    curves = [(np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)) for s, v in curves]
    curves = [(s, v) for s, v in curves if len(s)]
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    end = min(s[-1] for s, _ in curves)
    grid = np.unique(np.concatenate([s[s <= end] for s, _ in curves]))
    return grid, np.stack([np.interp(grid, s, v) for s, v in curves])


def steps_to_threshold(steps: Any, curve: Any, threshold: float) -> int | None:
    """The first step at which ``curve`` reaches ``threshold`` (``>=``), or None if it never does.

    :param steps: ``[T]`` environment steps.
    :param curve: ``[T]`` the seed-mean evaluation reward at those steps.
    """
    hits = np.flatnonzero(np.asarray(curve, dtype=np.float64) >= threshold)
    return int(np.asarray(steps)[hits[0]]) if hits.size else None


def max_return(env_id: str) -> float:
    """The best episode return of a task: 1.0 for ``memagents/`` tasks (a perfect episode) and
    for MiniGrid (``1 - 0.9 * steps / max_steps`` < 1); 1.0 otherwise as well, as the default."""
    return 1.0


# -- reading runs ---------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """What aggregation reads from one run directory."""

    path: Path
    label: str
    seed: int
    env_id: str
    core: str
    steps: np.ndarray  # [T] evaluation steps (evaluations.csv, then eval.json's num_timesteps)
    rewards: np.ndarray  # [T] mean evaluation reward at those steps
    successes: np.ndarray  # [T] evaluation success rate (NaN when the env reports none)
    final: dict[str, Any] | None  # eval.json, None while the run is unfinished
    steps_per_second: float
    lengths: list[dict[str, Any]] = field(default_factory=list)  # lengths.json rows


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_evaluations(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``evaluations.csv`` as ``(steps, mean_reward, success_rate)`` arrays, sorted by step; a step
    logged twice (a resumed run repeats the evaluations after its checkpoint) keeps its last row.
    Empty arrays if the file is absent."""
    if not path.is_file():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    by_step: dict[float, dict[str, str]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            by_step[_float(row["timesteps"])] = row  # a resumed run re-evaluates: keep the last
    steps = np.array(sorted(by_step))
    rewards = np.array([_float(by_step[t]["mean_reward"]) for t in steps])
    success = np.array([_float(by_step[t].get("success_rate", "nan")) for t in steps])
    return steps, rewards, success


def read_steps_per_second(run_dir: Path) -> float:
    """Environment steps per second of training (see the module docstring); NaN if unknown.

    SB3 logs ``time/time_elapsed`` in whole seconds: segments shorter than a second are weighted
    equally (the mean of their ``time/fps``)."""
    steps = seconds = 0.0
    rates = []
    for path in sorted(run_dir.glob("progress*.csv")):
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if math.isfinite(_float(r.get("time/fps", "")))]
        if not rows:
            continue
        fps, elapsed = _float(rows[-1]["time/fps"]), _float(rows[-1].get("time/time_elapsed", ""))
        rates.append(fps)
        if math.isfinite(elapsed) and elapsed > 0:
            steps += fps * elapsed
            seconds += elapsed
    if seconds > 0:
        return steps / seconds
    return float(np.mean(rates)) if rates else math.nan


def read_run(run_dir: Path) -> RunRecord:
    """One run directory (``AggregateError`` if it has no ``config.yaml``)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise AggregateError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    core = str(config.get("core", {}).get("name", "?"))
    seed = int(config.get("train", {}).get("seed", 0))
    env_id = str(config.get("env", {}).get("id", "?"))
    match = _SEED_SUFFIX.match(run_dir.name)
    label = match["label"] if match else core
    steps, rewards, success = read_evaluations(run_dir / "evaluations.csv")
    final = None
    if (run_dir / "eval.json").is_file():
        final = json.loads((run_dir / "eval.json").read_text())
        t = float(final.get("num_timesteps", steps[-1] if len(steps) else 0))
        if not len(steps) or t > steps[-1]:
            steps = np.append(steps, t)
            rewards = np.append(rewards, float(final["mean_reward"]))
            success = np.append(success, _float(final.get("success_rate", "nan")))
    lengths = []
    if (run_dir / "lengths.json").is_file():
        lengths = json.loads((run_dir / "lengths.json").read_text()).get("lengths", [])
    return RunRecord(
        path=run_dir,
        label=label,
        seed=seed,
        env_id=env_id,
        core=core,
        steps=steps,
        rewards=rewards,
        successes=success,
        final=final,
        steps_per_second=read_steps_per_second(run_dir),
        lengths=lengths,
    )


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root``: ``root/runs/*`` if it exists, else ``root/*`` (or ``root``
    itself), those that hold a ``config.yaml``, sorted."""
    root = Path(root)
    base = root / "runs" if (root / "runs").is_dir() else root
    if (base / "config.yaml").is_file():
        return [base]
    return (
        sorted(p for p in base.iterdir() if (p / "config.yaml").is_file()) if base.is_dir() else []
    )


def model_stats(run_dir: Path) -> dict[str, float]:
    """Trainable parameters and recurrent state floats per env of a run's ``model.zip`` (NaN if
    the model is missing or cannot be loaded). Imports :mod:`memagents.sb3` (and so SB3)."""
    path = Path(run_dir) / "model.zip"
    nan = {"parameters": math.nan, "state_size": math.nan}
    if not path.is_file():
        return nan
    try:
        import torch
        from sb3_contrib import RecurrentPPO

        import memagents.sb3  # noqa: F401  (MemoryPolicy must be importable to unpickle)

        threads = torch.get_num_threads()
        model = RecurrentPPO.load(path, device="cpu")
        torch.set_num_threads(threads)
    except Exception:  # a foreign or corrupt zip: report the other numbers anyway
        return nan
    policy = model.policy
    params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    state = 0
    for name in ("memory_actor", "memory_critic"):
        core = getattr(policy, name, None)
        if core is not None:
            state += int(core.state_size)
    if not hasattr(policy, "memory_actor"):  # sb3-contrib's own LSTM policy: (h, c) per layer
        for name in ("lstm_actor", "lstm_critic"):
            lstm = getattr(policy, name, None)
            if lstm is not None:
                state += 2 * int(lstm.num_layers) * int(lstm.hidden_size)
    return {"parameters": float(params), "state_size": float(state)}


# -- aggregation ----------------------------------------------------------------------------------
def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def aggregate(
    runs: list[RunRecord],
    threshold: float | None = None,
    stats: dict[str, dict[str, float]] | None = None,
    order: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """All numbers of the table and the plot, per label, as plain data (``results.json``).

    :param runs: the runs of one environment.
    :param threshold: reward counted as solved; default 0.9 of :func:`max_return`.
    :param stats: per label ``{"parameters", "state_size"}`` (see :func:`model_stats`).
    :param order: labels in the order to report them (others follow, sorted).
    :param seed: seed of the bootstrap.
    """
    if not runs:
        raise AggregateError("no run directories to aggregate")
    env_ids = sorted({r.env_id for r in runs})
    if len(env_ids) > 1:
        raise AggregateError(f"runs of different environments cannot be aggregated: {env_ids}")
    env_id = env_ids[0]
    if threshold is None:
        threshold = DEFAULT_THRESHOLD_FRACTION * max_return(env_id)
    labels = list(dict.fromkeys([*(order or []), *sorted({r.label for r in runs})]))
    groups: dict[str, Any] = {}
    for label in labels:
        members = sorted((r for r in runs if r.label == label), key=lambda r: r.seed)
        if not members:
            continue
        steps, values = align_curves([(r.steps, r.rewards) for r in members if len(r.steps)])
        if len(steps):
            mean, low, high = bootstrap_ci(values, seed=seed)
        else:
            mean = low = high = np.zeros(0)
        finished = [r for r in members if r.final is not None]
        finals = [float(r.final["mean_reward"]) for r in finished]
        if finals:
            f_mean, f_low, f_high = (float(v) for v in bootstrap_ci(finals, seed=seed))
        else:
            f_mean = f_low = f_high = math.nan
        lengths = _length_rows(finished)
        groups[label] = {
            "core": members[0].core,
            "seeds": [r.seed for r in members],
            "finished_seeds": [r.seed for r in finished],
            "curve": {
                "steps": steps.tolist(),
                "mean": mean.tolist(),
                "low": low.tolist(),
                "high": high.tolist(),
                "per_seed": values.tolist(),
            },
            "final_reward": {"mean": f_mean, "low": f_low, "high": f_high, "per_seed": finals},
            "success_rate": _nanmean([_float(r.final.get("success_rate")) for r in finished]),
            "steps_to_threshold": steps_to_threshold(steps, mean, threshold)
            if len(steps)
            else None,
            "steps_to_success": _steps_to_success(members),
            "steps_per_second": _nanmean([r.steps_per_second for r in members]),
            "num_timesteps": [int(r.final.get("num_timesteps", 0)) for r in finished],
            **(stats or {}).get(label, {"parameters": math.nan, "state_size": math.nan}),
            "lengths": lengths,
            "runs": [str(r.path) for r in members],
        }
    return {
        "env": env_id,
        "threshold": threshold,
        "confidence": CONFIDENCE,
        "n_boot": N_BOOT,
        "bootstrap_seed": seed,
        "groups": groups,
    }


#: success rate counted as solved by ``steps_to_success`` (issue #11/#12's bar)
SUCCESS_THRESHOLD = 0.9


def _steps_to_success(members: list[RunRecord]) -> int | None:
    """First evaluation step where the seed-mean success-rate curve reaches
    :data:`SUCCESS_THRESHOLD` (None if never, or if the env reports no success)."""
    curves = [(r.steps, r.successes) for r in members if len(r.steps)]
    if not curves or any(np.isnan(c).all() for _, c in curves):
        return None
    steps, values = align_curves(curves)
    if not len(steps):
        return None
    return steps_to_threshold(steps, np.nanmean(values, axis=0), SUCCESS_THRESHOLD)


def _length_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Length generalisation per factor: seed mean and range of reward and success."""
    by_factor: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        for row in r.lengths:
            by_factor.setdefault(float(row["factor"]), []).append(row)
    rows = []
    for factor in sorted(by_factor):
        items = by_factor[factor]
        rewards = [float(i["mean_reward"]) for i in items]
        rows.append(
            {
                "factor": factor,
                "length": items[0]["length"],
                "mean_reward": float(np.mean(rewards)),
                "min_reward": float(np.min(rewards)),
                "max_reward": float(np.max(rewards)),
                "success_rate": _nanmean([_float(i.get("success_rate")) for i in items]),
                "seeds": len(items),
            }
        )
    return rows


# -- outputs --------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _fmt_int(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{int(x):,}"


def format_table(results: dict[str, Any]) -> str:
    """``table.md``: one row per label, then length generalisation if any run has it."""
    pct = round(results["confidence"] * 100)
    lines = [
        f"# {results['env']}",
        "",
        f"Final reward: mean over seeds ± {pct}% percentile-bootstrap CI [low, high]. "
        f"Steps to {_fmt(results['threshold'], '.2f')}: first evaluation step where the "
        f"seed-mean reward curve reaches it; to {SUCCESS_THRESHOLD:.2f} success: where the "
        "seed-mean success-rate curve does.",
        "",
        f"| core | seeds | final reward ± {pct}% CI | success rate | "
        f"steps to {_fmt(results['threshold'], '.2f')} | steps to {SUCCESS_THRESHOLD:.2f} "
        "success | steps/s | parameters | state size |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, g in results["groups"].items():
        fr = g["final_reward"]
        half = (
            max(fr["mean"] - fr["low"], fr["high"] - fr["mean"])
            if math.isfinite(fr["mean"])
            else math.nan
        )
        final = (
            f"{_fmt(fr['mean'])} ± {_fmt(half)} [{_fmt(fr['low'])}, {_fmt(fr['high'])}]"
            if math.isfinite(fr["mean"])
            else "n/a (unfinished)"
        )
        reached = g["steps_to_threshold"]
        solved = g.get("steps_to_success")
        seeds = f"{len(g['finished_seeds'])}/{len(g['seeds'])}"
        lines.append(
            f"| {label} | {seeds} | {final} | {_fmt(g['success_rate'], '.2f')} | "
            f"{'not reached' if reached is None else f'{reached:,}'} | "
            f"{'not reached' if solved is None else f'{solved:,}'} | "
            f"{_fmt(g['steps_per_second'], '.0f')} | {_fmt_int(g['parameters'])} | "
            f"{_fmt_int(g['state_size'])} |"
        )
    factors = sorted({row["factor"] for g in results["groups"].values() for row in g["lengths"]})
    if factors:
        lines += [
            "",
            "## Length generalisation",
            "",
            "Mean evaluation reward over seeds (success rate) with every episode at the given "
            "multiple of the trained maximum length.",
            "",
            "| core | " + " | ".join(_factor_header(results, f) for f in factors) + " |",
            "|---|" + "---:|" * len(factors),
        ]
        for label, g in results["groups"].items():
            cells = {row["factor"]: row for row in g["lengths"]}
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{_fmt(cells[f]['mean_reward'])} ({_fmt(cells[f]['success_rate'], '.2f')})"
                    if f in cells
                    else "n/a"
                    for f in factors
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _factor_header(results: dict[str, Any], factor: float) -> str:
    for g in results["groups"].values():
        for row in g["lengths"]:
            if row["factor"] == factor:
                return f"{factor:g}× (L={row['length']})"
    return f"{factor:g}×"  # pragma: no cover


def plot_curves(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``curves.png`` and ``curves.svg``: seed-mean reward vs steps with the CI band per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, g) in enumerate(results["groups"].items()):
        c = g["curve"]
        if not c["steps"]:
            continue
        color = f"C{i % 10}"
        n = len(g["seeds"])
        ax.plot(c["steps"], c["mean"], color=color, label=f"{label} ({n} seed{'s' * (n > 1)})")
        ax.fill_between(c["steps"], c["low"], c["high"], color=color, alpha=0.2, linewidth=0)
    ax.axhline(results["threshold"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation reward")
    pct = round(results["confidence"] * 100)
    ax.set_title(f"{results['env']}: mean over seeds, {pct}% bootstrap CI")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    paths = [out_dir / "curves.png", out_dir / "curves.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def write_outputs(
    root: Path,
    threshold: float | None = None,
    order: list[str] | None = None,
    with_model_stats: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregate the runs under ``root`` into ``root/curves.png|svg``, ``table.md`` and
    ``results.json``; return the results.

    :param root: a compare/sweep output directory (runs under ``root/runs/``) or a directory
        of run directories.
    :param with_model_stats: read parameter counts and state sizes from the models (loads SB3).
    """
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise AggregateError(f"no run directories (with config.yaml) under {str(root)!r}")
    runs = [read_run(p) for p in paths]
    stats: dict[str, dict[str, float]] = {}
    if with_model_stats:
        for label in dict.fromkeys(r.label for r in runs):
            done = [r for r in runs if r.label == label and (r.path / "model.zip").is_file()]
            if done:
                stats[label] = model_stats(done[0].path)
    results = aggregate(runs, threshold=threshold, stats=stats, order=order, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    plot_curves(results, root)
    (root / "table.md").write_text(format_table(results))
    (root / "results.json").write_text(json.dumps(_nan_to_none(results), indent=2))
    return results
