"""``python -m memagents.sweep``: the grid of ``compare`` (× ``--grid`` hyperparameters) on Ray Tune.

Same flags as ``python -m memagents.compare`` plus:

- ``--address``: Ray to join (default: start a local Ray on this machine; ``auto`` or
  ``ray://host:port`` joins a cluster);
- ``--resources-per-trial cpu=1[,gpu=0.5]`` (default ``cpu=1``); ``--jobs`` caps the trials that
  run at once (default: as many as the resources allow);
- ``--grid KEY=V1,V2`` (repeatable): a dotted config key and its values, crossed with core × seed;
  the run directories are then named ``<core>-<key leaf>=<value>-s<seed>``.

Each trial is one cell of the grid and does exactly what a ``compare`` worker does
(:func:`memagents.compare.do_run`): ``python -m memagents.train`` into ``OUT/runs/<name>`` (or
``--resume`` it, or reuse it when finished), then the length evaluation. While it trains, every
new row of its ``evaluations.csv`` is reported to Tune (``mean_reward``, ``success_rate``,
``timesteps``), and the final ``eval.json`` last. Each new training checkpoint of a run (its
``config.yaml`` and newest ``checkpoints/`` files) is also reported to Tune as a Tune checkpoint, so
a failed or preempted trial is retried (``max_failures``) from it, on this node or another, even
when ``OUT`` is not shared; running the same command again resumes an interrupted sweep. Tune's own
records go to ``OUT/ray/``.

The results go through the same aggregation as ``compare`` (``OUT/curves.png``, ``table.md``,
``results.json``). Ray is an optional extra: without it this command exits with code 2 and says
how to install it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from memagents import compare
from memagents.config import ConfigError

PROG = "memagents.sweep"
INSTALL = 'pip install -e ".[distributed]" (or: pip install "ray[tune]>=2.9")'


def build_parser() -> argparse.ArgumentParser:
    p = compare._Parser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    compare.add_grid_arguments(p)
    p.add_argument("--jobs", type=int, help="trials at once (default: as resources allow)")
    p.add_argument("--address", help="Ray address: auto, ray://host:port (default: local Ray)")
    p.add_argument(
        "--resources-per-trial", default="cpu=1", help="resources of a trial, e.g. cpu=1,gpu=0.5"
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and values to cross with core × seed (repeatable)",
    )
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (2)")
    return p


def parse_resources(text: str) -> dict[str, float]:
    """``"cpu=1,gpu=0.5"`` -> ``{"cpu": 1.0, "gpu": 0.5}``."""
    resources = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not key.strip() or amount < 0:
            raise ConfigError(
                f"--resources-per-trial {text!r}: expected name=amount pairs, e.g. cpu=1,gpu=0.5"
            )
        resources[key.strip()] = amount
    return resources


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """``["ppo.learning_rate=0.001,0.0003"]`` -> one ``{key: value}`` per combination."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(
                f"--grid {item!r}: expected KEY=V1,V2, e.g. ppo.learning_rate=1e-3,3e-4"
            )
        try:
            parsed = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError:
            raise ConfigError(f"--grid {item!r}: cannot parse the values") from None
        axes.append([(key.strip(), v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def import_ray() -> Any:
    """``ray.tune``, or ConfigError saying how to install it."""
    try:
        from ray import tune
    except ImportError:
        raise ConfigError(f"Ray Tune is not installed; install it with {INSTALL}") from None
    return tune


def make_trainable(specs: dict[str, compare.RunSpec], factors, episodes, poll: float = 1.0):
    """The Tune function trainable: ``config["name"]`` picks the grid cell to run."""

    def trainable(config: dict[str, Any]) -> None:
        from ray import tune

        report = getattr(tune, "report", None)
        if report is None:  # Ray < 2.x: the report of ray.train
            from ray.train import report
        spec = specs[config["name"]]
        checkpoint_cls = getattr(tune, "Checkpoint", None)
        get_checkpoint = getattr(tune, "get_checkpoint", None)
        if checkpoint_cls is None or get_checkpoint is None:  # older Ray: ray.train's
            from ray.train import Checkpoint as checkpoint_cls
            from ray.train import get_checkpoint
        restored = get_checkpoint()
        if restored is not None:  # a retried trial, possibly on another node
            with restored.as_directory() as source:
                restore_run_checkpoint(Path(source), spec.run_dir)
        logs = spec.run_dir.parent.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {}

        def work() -> None:
            result.update(compare.do_run(spec, compare.Runner(), logs, factors, episodes))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        seen = 0
        saved = None
        while True:
            alive = worker.is_alive()
            rows = _evaluation_rows(spec.run_dir)
            latest = _latest(spec.run_dir)
            # every report carries the metric Tune optimises, so a checkpoint written before the
            # first evaluation waits for it; it rides on the newest row (no row twice)
            for row in rows[seen:-1]:
                report({**row, "name": spec.name, "done": False})
            due = latest is not None and latest != saved and rows
            if rows[seen:] or due:
                metrics = {**rows[-1], "name": spec.name, "done": False}
                if due:  # hand the run's newest checkpoint to Tune, which persists it
                    with tempfile.TemporaryDirectory() as tmp:
                        pack_run_checkpoint(spec.run_dir, Path(tmp))
                        report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))
                    saved = latest
                else:
                    report(metrics)
            seen = max(seen, len(rows))
            if not alive:
                break
            time.sleep(poll)
        if result.get("code") != 0:
            raise RuntimeError(f"run {spec.name} failed: {result}; see {logs / spec.name}.log")
        final = json.loads((spec.run_dir / "eval.json").read_text())
        report(
            {
                "mean_reward": final["mean_reward"],
                "success_rate": final["success_rate"],
                "timesteps": final["num_timesteps"],
                "name": spec.name,
                "done": True,
            }
        )

    return trainable


def _latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest.json"
    return path.read_text() if path.is_file() else None


def pack_run_checkpoint(run_dir: Path, dest: Path) -> None:
    """Copy what ``memagents.train --resume`` needs (``config.yaml`` and the newest checkpoint:
    ``latest.json``, its model ``.zip`` and RNG state) into ``dest`` for a Tune checkpoint."""
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "config.yaml", dest / "config.yaml")
    for name in (latest["model"], latest["rng"], "latest.json"):
        shutil.copy2(run_dir / "checkpoints" / name, dest / "checkpoints" / name)


def restore_run_checkpoint(source: Path, run_dir: Path) -> bool:
    """Inverse of :func:`pack_run_checkpoint` for a retried trial: recreate the run directory's
    config and newest checkpoint unless the run directory already has a checkpoint (a shared
    filesystem). Returns True when it restored something."""
    if (run_dir / "checkpoints" / "latest.json").is_file():
        return False
    if not (source / "checkpoints" / "latest.json").is_file():
        return False
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "config.yaml", run_dir / "config.yaml")
    for path in (source / "checkpoints").iterdir():
        shutil.copy2(path, run_dir / "checkpoints" / path.name)
    return True


def _evaluation_rows(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "evaluations.csv"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()[1:]
    rows = []
    for line in lines:
        parts = line.split(",")
        if len(parts) == 4:
            t, reward, _std, success = (float(x) for x in parts)
            rows.append({"timesteps": t, "mean_reward": reward, "success_rate": success})
    return rows


def run_sweep(args: argparse.Namespace, specs: list[compare.RunSpec]) -> list[str]:
    """Run the unfinished specs as Tune trials; return the names of failed trials."""
    import ray

    tune = import_ray()
    pending = [s for s in specs if compare.run_state(s) != "done" or _needs_lengths(args, s)]
    if not pending:
        return []
    factors = compare.parse_factors(args.length_factors)
    trainable = make_trainable({s.name: s for s in specs}, factors, args.length_episodes)
    trainable = tune.with_resources(trainable, parse_resources(args.resources_per_trial))
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    run_config_cls = getattr(tune, "RunConfig", None)
    failure_cls = getattr(tune, "FailureConfig", None)
    if run_config_cls is None:  # older Ray keeps them in ray.train
        from ray.train import FailureConfig as failure_cls
        from ray.train import RunConfig as run_config_cls
    out = Path(args.out).resolve()
    tuner = tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search([s.name for s in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=args.jobs, metric="mean_reward", mode="max"
        ),
        run_config=run_config_cls(
            name="sweep",
            storage_path=str(out / "ray"),
            failure_config=failure_cls(max_failures=args.max_failures),
            verbose=0,
        ),
    )
    results = tuner.fit()
    failed = []
    for result in results:
        if result.error is not None:
            failed.append(str((result.config or {}).get("name", "?")))
    return failed


def _needs_lengths(args: argparse.Namespace, spec: compare.RunSpec) -> bool:
    factors = compare.parse_factors(args.length_factors)
    cmd = compare.length_command(spec, factors, args.length_episodes)
    return cmd is not None and not (spec.run_dir / "lengths.json").is_file()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        out = Path(args.out).resolve()
        args.out = str(out)
        if args.config:
            args.config = str(Path(args.config).resolve())
        if args.aggregate_only:
            compare.aggregate_and_report(out, args.threshold, None)
            return 0
        compare.check_common(args)
        if args.jobs is not None and args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: must be an integer >= 1")
        parse_resources(args.resources_per_trial)
        grid = parse_grid(args.grid)
        import_ray()  # before planning: without Ray nothing else matters
        specs = compare.plan(args, grid)
        for spec in specs:
            compare.run_state(spec)
    except (ConfigError, compare.AggregateError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return compare.EXIT_BAD_INPUT
    print(f"{len(specs)} runs on Ray Tune -> {out / 'runs'}")
    try:
        failed = run_sweep(args, specs)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return compare.EXIT_INTERRUPTED
    order = list(dict.fromkeys(s.name.rsplit("-s", 1)[0] for s in specs))
    try:
        compare.aggregate_and_report(out, args.threshold, order)
    except compare.AggregateError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return compare.EXIT_RUN_FAILED
    if failed:
        print(
            f"{PROG}: {len(failed)} trial(s) failed: {', '.join(sorted(failed))}", file=sys.stderr
        )
        return compare.EXIT_RUN_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
