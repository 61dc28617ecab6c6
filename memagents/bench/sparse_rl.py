"""``python -m memagents.bench sparse-rl``: SAM and SDNC as reinforcement learning calls them,
as the memory grows from N = 1,024 to 65,536.

The cores' own scaling benchmarks (``bench sam``, ``bench sdnc``) time one training call from an
empty memory with no episode starts. Inside RL neither holds: rollouts call the core one step at
a time with the state carried between calls, and training sequences begin (and may restart)
with episode starts. Each row here runs in a fresh process (its peak resident memory is its
own), with one torch thread, at the shape B=16, input 32, hidden 64, W=16, R=4, K=4:

- **step**: one ``T = 1`` call without gradient, the state carried from the previous call, each
  element's episode restarting with probability 1/32 per step (median over 300 steps after 100
  warm-up steps, so the memory holds written rows): ``forward_inplace`` (how rollouts call a
  core; the sparse cores keep their index and memory between calls) and, for comparison,
  ``forward`` (the functional call, which copies the state and rebuilds the index each call).
- **fwd+bwd**: a training call of ``T = 64`` from a used state (the 100 warm-up steps), with an
  episode start at ``t = 0`` for every element and another at ``t = 32`` for every third one;
  the median of the timed repeats, and the process's peak resident memory.
- **train**: ``MemoryPPO`` on ``memagents/Recall-v0`` (batched env, device collector, joint
  critic), 16 envs x 64 steps per rollout, batch 256, 2 epochs, one warm-up iteration and three
  timed: rollout milliseconds per step (policy, env and buffer), update seconds, steps/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from typing import Any

CORES = ("sam", "sdnc")
SIZES = (1024, 16_384, 65_536)
SHAPE = {"batch": 16, "input_size": 32, "hidden_size": 64}
CORE = {"word_size": 16, "num_reads": 4, "sparse_reads": 4}
RESTART = 1 / 32  # per element and step
TRAIN: dict[str, Any] = {
    "n_envs": 16,
    "n_steps": 64,
    "batch_size": 256,
    "n_epochs": 2,
    "hidden_size": 64,
    "net_arch": [64],
    "iterations": 4,  # one warm-up, three timed
    "eval_episodes": 16,
}
#: targets of the issue (``docs/BENCHMARKS.md`` states them beside the table)
TARGETS = {"step": 2.0, "fwd_bwd": 3.0, "peak_mib": 1024.0, "train": 0.5}


def _peak_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_core(core_name: str, memory_size: int, repeats: int) -> dict[str, Any]:
    """The step and fwd+bwd columns of one row (run in a fresh process)."""
    import torch

    from memagents.cores import make

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, I = SHAPE["batch"], SHAPE["input_size"]
    core = make(
        core_name, input_size=I, hidden_size=SHAPE["hidden_size"], memory_size=memory_size,
        **CORE,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def steps(n: int, state, call) -> tuple[list[float], Any]:
        times = []
        for _ in range(n):
            x = torch.randn(1, B, I, generator=gen)
            starts = (torch.rand(1, B, generator=gen) < RESTART).float()
            t0 = time.perf_counter()
            with torch.no_grad():
                _, state = call(x, state, starts)
            times.append(time.perf_counter() - t0)
        return times, state

    _, state = steps(100, None, core.forward_inplace)
    carried, state = steps(300, state, core.forward_inplace)
    copying, _ = steps(10 if memory_size > 16_384 else 50, _clone(state), core)

    T = 64
    x = torch.randn(T, B, I, generator=gen)
    starts = torch.zeros(T, B)
    starts[0] = 1
    starts[T // 2, ::3] = 1

    def train_call() -> None:
        core.zero_grad(set_to_none=True)
        y, _ = core(x, state, starts)
        y.square().mean().backward()

    train_call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_call()
        times.append(time.perf_counter() - t0)
    return {
        "step_ms": 1e3 * statistics.median(carried),
        "step_copy_ms": 1e3 * statistics.median(copying),
        "fwd_bwd_ms": 1e3 * statistics.median(times),
        "peak_mib": _peak_mib(),
    }


def _clone(state):
    from memagents.cores import state as state_lib

    return state_lib.map_state(lambda t: t.clone(), state)


def measure_train(core_name: str, memory_size: int) -> dict[str, Any]:
    """The train columns of one row (run in a fresh process)."""
    from memagents.bench.collector import measure

    result = measure(
        "memagents/Recall-v0", core_name, "device", TRAIN, "cpu",
        {"memory_size": memory_size, **CORE},
    )  # fmt: skip
    return {
        "rollout_ms_per_step": 1e3 * result["rollout_s"] / TRAIN["n_steps"],
        "update_s": result["update_s"],
        "steps_per_s": result["steps_per_s"],
        "train_peak_mib": _peak_mib(),
    }


def _in_subprocess(fn, *args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _ratio(rows: list[dict], row: dict, key: str) -> float:
    base = next(r for r in rows if r["core"] == row["core"] and r["memory_size"] == SIZES[0])
    return row[key] / base[key]


def to_markdown(rows: list[dict[str, Any]], command: str, repeats: int) -> str:
    lines = [
        "## Sparse memories inside RL: SAM and SDNC rollout steps, training calls and training",
        "",
        f"`{command}` ({platform.processor() or platform.machine()}, one torch thread; each row "
        f"in a fresh process). Shape: B={SHAPE['batch']}, input {SHAPE['input_size']}, hidden "
        f"{SHAPE['hidden_size']}, W={CORE['word_size']}, R={CORE['num_reads']}, "
        f"K={CORE['sparse_reads']}; `index=auto` (exact scan below N=16,384, the native IVF "
        "index from there on).",
        "",
        "- *step*: one T=1 call without gradient, the state carried, each episode restarting "
        "with probability 1/32 per step, median of 300 steps after 100: `forward_inplace` (what "
        "rollouts call) and, for comparison, `forward` (copies the state, rebuilds the index).",
        f"- *fwd+bwd*: T=64 from a used state, episode starts at t=0 (all) and t=32 (every "
        f"third element), median of {repeats}; *peak*: the process's peak resident memory.",
        f"- *train*: `MemoryPPO` on `memagents/Recall-v0`, {TRAIN['n_envs']} batched envs x "
        f"{TRAIN['n_steps']} steps, batch {TRAIN['batch_size']}, {TRAIN['n_epochs']} epochs, "
        "device collector, joint critic; rollout ms per env step of all envs (policy, env, "
        "buffer), update s per iteration, env steps/s; ratios against N=1,024.",
        "",
        "| core | N | step ms | step vs 1,024 | step by `forward` ms | fwd+bwd ms | fwd+bwd vs "
        "1,024 | peak MiB | rollout ms/step | rollout vs 1,024 | update s | steps/s | steps/s "
        "vs 1,024 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['core']} | {r['memory_size']:,} | {r['step_ms']:.2f} | "
            f"{_ratio(rows, r, 'step_ms'):.2f}x | {r['step_copy_ms']:.1f} | "
            f"{r['fwd_bwd_ms']:.1f} | {_ratio(rows, r, 'fwd_bwd_ms'):.2f}x | {r['peak_mib']:.0f} | "
            f"{r['rollout_ms_per_step']:.2f} | {_ratio(rows, r, 'rollout_ms_per_step'):.2f}x | "
            f"{r['update_s']:.2f} | {r['steps_per_s']:.0f} | "
            f"{_ratio(rows, r, 'steps_per_s'):.2f}x |"
        )
    lines += ["", "Targets at the largest N against N=1,024 (same run):", ""]
    for core in dict.fromkeys(r["core"] for r in rows):
        mine = [r for r in rows if r["core"] == core]
        base, top = mine[0], mine[-1]
        if base["memory_size"] != SIZES[0] or top is base:
            continue
        checks = [
            ("T=1 step", top["step_ms"] / base["step_ms"], f"<= {TARGETS['step']:g}x"),
            ("rollout step", top["rollout_ms_per_step"] / base["rollout_ms_per_step"],
             f"<= {TARGETS['step']:g}x"),
            ("fwd+bwd", top["fwd_bwd_ms"] / base["fwd_bwd_ms"], f"<= {TARGETS['fwd_bwd']:g}x"),
            ("training steps/s", top["steps_per_s"] / base["steps_per_s"],
             f">= {TARGETS['train']:g}x"),
        ]  # fmt: skip
        met = [
            checks[0][1] <= TARGETS["step"],
            checks[1][1] <= TARGETS["step"],
            checks[2][1] <= TARGETS["fwd_bwd"],
            checks[3][1] >= TARGETS["train"],
        ]
        extra = top["peak_mib"] - base["peak_mib"]
        parts = [
            f"{name} {value:.2f}x ({goal}: {'met' if ok else '**not met**'})"
            for (name, value, goal), ok in zip(checks, met, strict=True)
        ]
        parts.append(
            f"fwd+bwd peak +{extra:.0f} MiB (<= +1 GB: "
            f"{'met' if extra <= TARGETS['peak_mib'] else '**not met**'})"
        )
        lines.append(f"- {core} at N={top['memory_size']:,}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench sparse-rl", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cores", default=",".join(CORES), help="sam, sdnc (comma-separated)")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)),
        help=f"memory sizes N, comma-separated; the first is the baseline ({SIZES[0]})",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed fwd+bwd repeats (median)")
    parser.add_argument("--no-train", action="store_true", help="skip the training columns")
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="Markdown file to update")
    args = parser.parse_args(argv)
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    for core in cores:
        if core not in CORES:
            parser.error(f"--cores: {core!r} is not a sparse core; choose from {', '.join(CORES)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, comma-separated; got {args.sizes!r}")
    if not sizes or sizes[0] != SIZES[0]:
        parser.error(f"--sizes must start with the baseline {SIZES[0]}; got {args.sizes!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    rows = []
    for core in cores:
        for n in sizes:
            row = {"core": core, "memory_size": n}
            row.update(_in_subprocess(measure_core, core, n, args.repeats))
            nan = float("nan")
            train = (
                {"rollout_ms_per_step": nan, "update_s": nan, "steps_per_s": nan}
                if args.no_train
                else _in_subprocess(measure_train, core, n)
            )
            row.update(train)
            rows.append(row)
            print(
                f"{core:<5} N={n:>7,}  step {row['step_ms']:7.2f} ms (forward "
                f"{row['step_copy_ms']:7.1f})  fwd+bwd {row['fwd_bwd_ms']:7.1f} ms  peak "
                f"{row['peak_mib']:6.0f} MiB  rollout {row['rollout_ms_per_step']:6.2f} ms/step  "
                f"{row['steps_per_s']:7.0f} steps/s",
                flush=True,
            )
    from memagents.bench.report import command_line, publish

    command = command_line("sparse-rl", argv)
    publish("sparse-rl", to_markdown(rows, command, args.repeats), not args.no_write, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
