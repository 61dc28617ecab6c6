"""``python -m memagents.bench envs``: steps per second of the algorithmic tasks, four ways.

For each task (its default ``memagents/<Task>-v0`` variant) and each number of envs B in 1, 64,
1024 and 16384 it measures environment steps per second (B x vector steps / wall time) of:

- ``DummyVecEnv``: SB3's sequential vector env over B single envs made by ``gymnasium.make``
  (with the wrappers ``gymnasium.make`` adds), the usual way to train on them;
- ``SyncVectorEnv``: gymnasium's sequential vector env over the same single envs;
- ``batched (VecEnv API)``: ``envs.make_vec``, numpy in and out, ``infos`` built, the way SB3
  algorithms use it through ``memagents.sb3.TorchVecEnv``;
- ``batched (tensors)``: the same env through ``step_tensor``, for code that stays on the device.

Actions are drawn uniformly from the action space ahead of time, so only stepping is timed
(including auto-resets, which every task does often). Each measurement first runs as many vector
steps as the task's longest episode, so that every env has reset at least once and episodes are
out of phase (the steady state of training), then times about ``--seconds`` of wall time (at
least 2 vector steps, at most 2000), on one torch thread. The sequential vector envs are measured
up to ``--max-sequential`` envs (default 1024): they step one env after another, so their rate
per env does not grow with B, and building and warming 16384 of them would take minutes. The
headline ratio compares the batched env at 1024 envs with ``DummyVecEnv`` at its best B.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import envs
from memagents.bench.report import write_section

SIZES = (1, 64, 1024, 16384)
QUICK_SIZES = (1, 8)
BACKENDS = ("DummyVecEnv", "SyncVectorEnv", "batched (VecEnv API)", "batched (tensors)")
MIN_STEPS, MAX_STEPS = 2, 2000
TARGET_RATIO = 50.0  # issue 4: batched@1024 >= 50x DummyVecEnv


def _actions(space: gym.Space, num_envs: int, count: int = 8) -> list[np.ndarray]:
    """``count`` batches of uniformly random actions, ``[num_envs]`` or ``[num_envs, W]``."""
    space.seed(0)
    return [np.stack([space.sample() for _ in range(num_envs)]) for _ in range(count)]


def _time(
    step: Callable[[Any], Any], actions: list[Any], seconds: float, warmup: int
) -> tuple[int, float]:
    """Run ``step`` over the action batches for ~``seconds``; (vector steps, elapsed seconds)."""
    for i in range(warmup):
        step(actions[i % len(actions)])
    n, start = 0, time.perf_counter()
    while n < MAX_STEPS and (n < MIN_STEPS or time.perf_counter() - start < seconds):
        step(actions[n % len(actions)])
        n += 1
    return n, time.perf_counter() - start


def measure(env_id: str, backend: str, num_envs: int, seconds: float) -> float:
    """Environment steps per second of one (task, backend, B) cell."""
    single = gym.make(env_id)
    warmup = single.unwrapped.max_episode_length
    actions = _actions(single.action_space, num_envs)
    if backend == "DummyVecEnv":
        venv: Any = DummyVecEnv([partial(gym.make, env_id)] * num_envs)
        venv.seed(0)
        venv.reset()
        step = venv.step
    elif backend == "SyncVectorEnv":
        venv = gym.vector.SyncVectorEnv([partial(gym.make, env_id)] * num_envs)
        venv.reset(seed=0)
        step = venv.step
    elif backend == "batched (VecEnv API)":
        venv = envs.make_vec(env_id, num_envs, seed=0)
        venv.reset()
        step = venv.step
    elif backend == "batched (tensors)":
        venv = envs.make_vec(env_id, num_envs, seed=0)
        venv.reset_tensor()
        actions = [torch.as_tensor(a) for a in actions]
        step = venv.step_tensor
    else:
        raise ValueError(f"backend={backend!r} is invalid: choose one of {BACKENDS}")
    steps, elapsed = _time(step, actions, seconds, warmup)
    venv.close()
    del venv, step
    gc.collect()
    return steps * num_envs / elapsed


def _fmt(rate: float | None) -> str:
    if rate is None:
        return "—"
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k"
    return f"{rate:.0f}"


SEQUENTIAL = ("DummyVecEnv", "SyncVectorEnv")


def run(
    env_ids: list[str],
    sizes: tuple[int, ...],
    seconds: float,
    max_sequential: int,
    log: Callable[[str], None],
) -> dict[tuple[str, str, int], float | None]:
    """Measure every (task, backend, B); steps per second by key (None: not measured)."""
    results: dict[tuple[str, str, int], float | None] = {}
    for env_id in env_ids:
        for backend in BACKENDS:
            for num_envs in sizes:
                if backend in SEQUENTIAL and num_envs > max_sequential:
                    results[env_id, backend, num_envs] = None
                    continue
                rate = measure(env_id, backend, num_envs, seconds)
                results[env_id, backend, num_envs] = rate
                log(f"{env_id:32s} {backend:22s} B={num_envs:<6d} {_fmt(rate):>9s} steps/s")
    return results


def markdown(
    results: dict[tuple[str, str, int], float | None],
    env_ids: list[str],
    sizes: tuple[int, ...],
    command: str,
    seconds: float,
) -> str:
    """The ``envs`` section of ``docs/BENCHMARKS.md``."""
    ref = 1024 if 1024 in sizes else max(sizes)
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"gymnasium {gym.__version__}, stable-baselines3 {stable_baselines3.__version__}."
    )
    lines = [
        "## Environments",
        "",
        f"`{command}`",
        "",
        "Environment steps per second (B envs x vector steps / wall time) of each task's default",
        "variant: as single envs (`gymnasium.make`) in SB3's `DummyVecEnv` and in gymnasium's",
        "`SyncVectorEnv`, and as the batched torch env `envs.make_vec` (CPU) through its SB3",
        "`VecEnv` API (numpy in/out, infos) and its tensor API (`step_tensor`). Random",
        "actions; auto-resets included, timed in the steady state (after a warm-up as long as the",
        f"longest episode); one torch thread; about {seconds:g} s per cell. — : not measured (the",
        "sequential vector envs step their envs one by one, so their rate per env is flat in B;",
        "see `--max-sequential`).",
        versions,
        "",
        f"**Batched env at B={ref} vs `DummyVecEnv`** (at its best B; target >= {TARGET_RATIO:g}x):",
        "",
        f"| task | DummyVecEnv (best B) | batched VecEnv API, B={ref} | ratio | batched tensors, "
        f"B={ref} | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for env_id in env_ids:
        dummy = max(r for b in sizes if (r := results[env_id, "DummyVecEnv", b]) is not None)
        api = results[env_id, "batched (VecEnv API)", ref]
        tensors = results[env_id, "batched (tensors)", ref]
        lines.append(
            f"| {env_id} | {_fmt(dummy)} | {_fmt(api)} | **{api / dummy:.0f}x** | "
            f"{_fmt(tensors)} | {tensors / dummy:.0f}x |"
        )
    lines += [
        "",
        "All measurements (steps per second):",
        "",
        "| task | backend | " + " | ".join(f"B={b}" for b in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for env_id in env_ids:
        for backend in BACKENDS:
            cells = " | ".join(_fmt(results[env_id, backend, b]) for b in sizes)
            lines.append(f"| {env_id} | {backend} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the env benchmark and write its section of ``docs/BENCHMARKS.md``.

    :param argv: command-line arguments (``--help`` lists them); ``None`` reads ``sys.argv``.
    :return: the process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench envs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (B = 1, 8) and short timings, for a smoke test; not written to "
        "docs/BENCHMARKS.md unless --output is given",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(envs.TASKS),
        choices=list(envs.TASKS),
        metavar="TASK",
        help=f"tasks to measure (default: all of {', '.join(envs.TASKS)})",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="wall time per measurement (default 0.5)"
    )
    parser.add_argument(
        "--max-sequential",
        type=int,
        default=1024,
        metavar="B",
        help="largest B measured for DummyVecEnv and SyncVectorEnv (default 1024)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="file to update (default docs/BENCHMARKS.md)"
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds={args.seconds} is invalid: it must be > 0")
    sizes = QUICK_SIZES if args.quick else SIZES
    seconds = args.seconds if args.seconds is not None else (0.01 if args.quick else 0.5)
    env_ids = [envs.env_id(task) for task in args.tasks]

    torch.set_num_threads(1)
    start = time.perf_counter()
    results = run(
        env_ids, sizes, seconds, args.max_sequential, log=lambda line: print(line, flush=True)
    )
    command = "python -m memagents.bench envs" + (" --quick" if args.quick else "")
    text = markdown(results, env_ids, sizes, command, seconds)
    print(text)
    print(f"(benchmark took {time.perf_counter() - start:.0f} s)")
    if args.output is not None or not args.quick:
        path = write_section("envs", text, args.output)
        print(f"wrote the envs section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
