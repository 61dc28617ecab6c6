"""``python -m memagents.compare``: a grid of cores × seeds on one env, learning curves and a table.

Every cell of the grid is a normal run directory of ``memagents.train``, ``OUT/runs/<core>-s<seed>``,
trained by ``python -m memagents.train`` in its own process, ``--jobs`` at a time (default: the
number of CPU cores); each process's output goes to ``OUT/logs/<core>-s<seed>.log``. The ``lstm``
baseline and the memoryless ``mlp`` are always in the grid unless ``--no-baselines``.

Running the same command again is safe and resumes: a run with ``eval.json`` is finished and
reused, a run with a checkpoint is continued with ``train --resume``, and a run that died before
its first checkpoint is started over. A run directory made with another config is an input error
(use another ``--out``). For the algorithmic ``memagents/`` tasks each finished run is then
evaluated with every episode at 1×, 2× and 4× its trained maximum length
(``--length-factors``; through ``python -m memagents.evaluate --lengths``) into
``RUN/lengths.json``.

Finally the runs are aggregated (:mod:`memagents.aggregate`) into ``OUT/curves.png``,
``OUT/curves.svg``, ``OUT/table.md`` and ``OUT/results.json``; ``--aggregate-only`` does just
that on existing run directories.

Exit codes: 0 when every run finished, 1 when some failed (the others are still aggregated),
2 for bad input (one line, no traceback), 130 when interrupted (running trainings are stopped and
resume next time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from memagents.aggregate import AggregateError, write_outputs
from memagents.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
#: cores always in the grid unless --no-baselines: the memoryless floor and the recurrent baseline
BASELINES = ("mlp", "lstm")
PROG = "memagents.compare"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``compare`` and ``sweep`` share."""
    p.add_argument("--env", help="environment id (default: the config's env.id)")
    p.add_argument(
        "--cores", default="", help="comma-separated core names, e.g. gru,dnc (baselines added)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per core (3)")
    p.add_argument("--total-timesteps", type=int, help="steps per run (default: the config's)")
    p.add_argument("--config", help="YAML config of every run (default: configs/default.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, as in memagents.train (repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory (runs under OUT/runs/)")
    p.add_argument(
        "--no-baselines", action="store_true", help=f"do not add {' and '.join(BASELINES)}"
    )
    p.add_argument(
        "--aggregate-only", action="store_true", help="only aggregate the run dirs in OUT"
    )
    p.add_argument(
        "--threshold", type=float, help="reward counted as solved (0.9 of the task's max)"
    )
    p.add_argument(
        "--length-factors",
        default="1,2,4",
        help="length generalisation at these multiples of the trained length ('' to skip)",
    )
    p.add_argument(
        "--length-episodes", type=int, help="episodes per length (the config's eval_episodes)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    add_grid_arguments(p)
    p.add_argument("--jobs", type=int, help="training processes at once (number of CPU cores)")
    return p


# -- the grid -------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One cell of the grid: a run directory and the train flags that make it."""

    name: str  # run directory name, <label>-s<seed>
    core: str
    seed: int
    run_dir: Path
    train_argv: list[str]  # python -m memagents.train flags, without --run-dir
    config: dict[str, Any]  # the resolved config (what train writes to config.yaml)
    extra: dict[str, Any] = field(default_factory=dict)  # grid values beyond core and seed


def parse_cores(text: str, no_baselines: bool) -> list[str]:
    """Core names in grid order: the baselines first (unless ``no_baselines``), no duplicates."""
    import memagents.cores as cores

    names = [c.strip() for c in text.split(",") if c.strip()]
    if not no_baselines:
        names = [*BASELINES, *names]
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("--cores: no cores to run (give --cores or drop --no-baselines)")
    available = cores.available()
    for name in names:
        if name not in available:
            raise ConfigError(f"--cores: unknown core {name!r}; available: {', '.join(available)}")
    return names


def parse_factors(text: str) -> list[float]:
    """``"1,2,4"`` -> ``[1.0, 2.0, 4.0]``; ``""`` -> ``[]``."""
    if not text.strip():
        return []
    try:
        factors = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--length-factors {text!r}: expected numbers, e.g. 1,2,4") from None
    if any(f <= 0 for f in factors):
        raise ConfigError(f"--length-factors {text!r}: factors must be > 0")
    return factors


def check_common(args: argparse.Namespace) -> None:
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: must be an integer >= 1")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        raise ConfigError(f"--total-timesteps {args.total_timesteps}: must be an integer >= 1")
    if args.length_episodes is not None and args.length_episodes < 1:
        raise ConfigError(f"--length-episodes {args.length_episodes}: must be an integer >= 1")
    parse_factors(args.length_factors)


def plan(
    args: argparse.Namespace,
    extra_grid: list[dict[str, Any]] | None = None,
) -> list[RunSpec]:
    """The runs of the grid, each config resolved and validated like ``memagents.train`` does.

    :param extra_grid: further settings to cross with core × seed (sweep's ``--grid``): a list of
        ``{dotted key: value}``; ``[{}]`` (the default) adds nothing.
    """
    from memagents import train
    from memagents.config import to_dict

    cores = parse_cores(args.cores, args.no_baselines)
    out = Path(args.out)
    specs = []
    for extra in extra_grid or [{}]:
        suffix = "".join(f"-{k.rsplit('.', 1)[-1]}={v}" for k, v in extra.items())
        for core in cores:
            base: list[str] = []
            if args.config:
                base += ["--config", args.config]
            if args.env:
                base += ["--env", args.env]
            base += ["--core", core]
            if args.total_timesteps is not None:
                base += ["--total-timesteps", str(args.total_timesteps)]
            for item in args.set:
                base += ["--set", item]
            for key, value in extra.items():
                base += ["--set", f"{key}={json.dumps(value)}"]
            for seed in range(args.seeds):
                argv = [*base, "--seed", str(seed)]
                train_args = train.build_parser().parse_args(argv)
                if seed == 0:
                    config = train.resolve_config(train_args)
                else:  # same config but the seed: validated once per core
                    config.train.seed = seed
                name = f"{core}{suffix}-s{seed}"
                specs.append(
                    RunSpec(
                        name=name,
                        core=core,
                        seed=seed,
                        run_dir=out / "runs" / name,
                        train_argv=argv,
                        config=to_dict(config),
                        extra=dict(extra),
                    )
                )
    return specs


#: Config keys that change how a run is shown, not what it learns: a finished run that differs
#: from the grid's config only there is reused.
DISPLAY_ONLY = frozenset({"train.progress_bar"})


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if f"{prefix}{key}" in DISPLAY_ONLY:
                continue
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {b!r} there, {a!r} now"


def run_state(spec: RunSpec) -> str:
    """``done`` (eval.json), ``resume`` (a checkpoint) or ``fresh``; ConfigError if the directory
    holds a run of another config."""
    import yaml

    d = spec.run_dir
    if (d / "config.yaml").is_file():
        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        diff = _first_difference(spec.config, saved)
        if diff:
            raise ConfigError(
                f"{d} was made with another config ({diff}); use another --out or delete it"
            )
    if (d / "eval.json").is_file():
        return "done"
    if (d / "checkpoints" / "latest.json").is_file() and (d / "config.yaml").is_file():
        return "resume"
    return "fresh"


def train_command(spec: RunSpec, state: str) -> list[str]:
    """The ``python -m memagents.train`` command of a run in a given state."""
    cmd = [sys.executable, "-m", "memagents.train"]
    if state == "resume":
        return [*cmd, "--resume", str(spec.run_dir)]
    return [*cmd, *spec.train_argv, "--run-dir", str(spec.run_dir)]


def length_command(spec: RunSpec, factors: list[float], episodes: int | None) -> list[str] | None:
    """The ``python -m memagents.evaluate --lengths`` command of a finished run, or None when the
    task has no length knob (not an algorithmic task) or no factors are asked for."""
    if not factors or not spec.config["env"]["id"].startswith("memagents/"):
        return None
    lengths = [max(1, round(f * trained_length(spec.config))) for f in factors]
    cmd = [sys.executable, "-m", "memagents.evaluate", "--run", str(spec.run_dir)]
    cmd += ["--lengths", ",".join(map(str, lengths)), "--output", str(raw_lengths_path(spec))]
    if episodes is not None:
        cmd += ["--episodes", str(episodes)]
    else:
        cmd += ["--episodes", str(spec.config["train"]["eval_episodes"])]
    return cmd


def trained_length(config: dict[str, Any]) -> int:
    """The trained maximum "length" of an algorithmic task (``memagents.evaluate.LENGTH_KNOBS``:
    the delay of Recall, the items of AssociativeRecall, else the sequence length)."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the memagents/ ids)
    from memagents.evaluate import length_knobs

    env = gym.make(config["env"]["id"], **config["env"]["kwargs"])
    try:
        task = env.unwrapped
        high = list(length_knobs(task, 1))[-1]
        return int(task.difficulty[high])
    finally:
        env.close()


def raw_lengths_path(spec: RunSpec) -> Path:
    return spec.run_dir / "evaluate-lengths.json"


def write_lengths(spec: RunSpec, factors: list[float], error: str | None = None) -> None:
    """``RUN/lengths.json``: evaluate's rows with the factor of each length."""
    rows = []
    if error is None:
        report = json.loads(raw_lengths_path(spec).read_text())
        for factor, row in zip(factors, report["lengths"], strict=True):
            rows.append({"factor": factor, **row})
    data = {"factors": factors, "lengths": rows, **({"error": error} if error else {})}
    tmp = spec.run_dir / "lengths.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, spec.run_dir / "lengths.json")


# -- running --------------------------------------------------------------------------------------
class Runner:
    """Runs commands as child processes, stoppable all at once from the main thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def call(self, cmd: list[str], log: Path) -> int:
        with self.lock:
            if self.stopping:
                return EXIT_INTERRUPTED
            with log.open("a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def do_run(
    spec: RunSpec, runner: Runner, logs: Path, factors: list[float], episodes: int | None
) -> dict[str, Any]:
    """Train (or resume, or reuse) one run, then its length evaluation; returns a status."""
    start = time.time()
    log = logs / f"{spec.name}.log"
    state = run_state(spec)
    status: dict[str, Any] = {"name": spec.name, "state": state}
    if state == "fresh" and spec.run_dir.exists():
        shutil.rmtree(spec.run_dir)  # died before its first checkpoint: start over cleanly
    if state != "done":
        code = runner.call(train_command(spec, state), log)
        if code != 0:
            return {**status, "code": code, "seconds": time.time() - start}
    cmd = length_command(spec, factors, episodes)
    if cmd is not None and not (spec.run_dir / "lengths.json").is_file():
        code = runner.call(cmd, log)
        if code == EXIT_INTERRUPTED and runner.stopping:
            return {**status, "code": code, "seconds": time.time() - start}
        write_lengths(spec, factors, None if code == 0 else f"evaluate exited {code}; see {log}")
    result = json.loads((spec.run_dir / "eval.json").read_text())
    return {
        **status,
        "code": 0,
        "mean_reward": result["mean_reward"],
        "seconds": time.time() - start,
    }


def run_grid(
    specs: list[RunSpec],
    jobs: int,
    logs: Path,
    factors: list[float],
    episodes: int | None,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every spec, ``jobs`` at a time; on Ctrl-C/SIGTERM stop the children and re-raise."""
    logs.mkdir(parents=True, exist_ok=True)
    runner = Runner()
    statuses = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(do_run, s, runner, logs, factors, episodes): s for s in specs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                spec = futures[future]
                try:
                    status = future.result()
                except Exception as exc:  # a broken run must not take the grid down
                    status = {"name": spec.name, "state": "?", "code": -1, "error": repr(exc)}
                statuses.append(status)
                n = f"[{len(statuses)}/{len(specs)}]"
                if status["code"] == 0:
                    verb = "reused" if status["state"] == "done" else "finished"
                    verb = "resumed and finished" if status["state"] == "resume" else verb
                    report(
                        f"{n} {spec.name}: {verb}, mean reward {status['mean_reward']:.3f} "
                        f"({status['seconds']:.0f} s)"
                    )
                else:
                    why = status.get("error") or f"exit code {status['code']}"
                    report(f"{n} {spec.name}: FAILED ({why}); see {logs / (spec.name + '.log')}")
    except BaseException:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return statuses


def aggregate_and_report(out: Path, threshold: float | None, order: list[str] | None) -> None:
    """Aggregate ``out`` (baselines first unless ``order`` says otherwise) and print the table."""
    write_outputs(out, threshold=threshold, order=order or list(BASELINES))
    print((out / "table.md").read_text(), end="")
    print(f"-> {out / 'curves.png'}, {out / 'table.md'}, {out / 'results.json'}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        out = Path(args.out)
        if args.aggregate_only:
            aggregate_and_report(out, args.threshold, None)
            return 0
        check_common(args)
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
        if jobs < 1:
            raise ConfigError(f"--jobs {jobs}: must be an integer >= 1")
        specs = plan(args)
        for spec in specs:
            run_state(spec)  # a run dir of another config: fail before starting anything
    except (ConfigError, AggregateError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    factors = parse_factors(args.length_factors)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        print(f"{len(specs)} runs ({args.seeds} seeds each), {jobs} at a time -> {out / 'runs'}")
        statuses = run_grid(specs, jobs, out / "logs", factors, args.length_episodes)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    order = list(dict.fromkeys(s.name.rsplit("-s", 1)[0] for s in specs))
    try:
        aggregate_and_report(out, args.threshold, order)
    except AggregateError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    failed = [s["name"] for s in statuses if s["code"] != 0]
    if failed:
        print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
