"""``python -m memagents.bench fwp``: the fast-weight core's chunk-parallel form against its step form.

At B=16, input 32, hidden 64, T=256 it times one forward pass and one forward+backward pass per
sequence of ``fwp`` with the delta and the sum rule, in the chunk-parallel form (``chunk_size``
64 by default) and in the step form (``chunk_size=1``), beside a plain ``nn.LSTM`` (hidden 64).
All rows run in one process and their repeats are interleaved (row 1, row 2, ..., row 1, ...), so
that load from other processes on the machine falls on every row alike; the table reports medians
and the step form / chunk form ratio. Before timing, it checks that the chunk and step forms of
each rule give the same outputs and final state (max abs difference ≤ 1e-4, float32).

``--clock cpu`` times with ``time.process_time`` (this process's CPU time) instead of wall time:
on a machine shared with other jobs, time spent waiting for a core is then not counted, which
keeps the ratios steadier. Whether the fast-weight core's native kernel (the slow-net heads,
``csrc/fwp_heads.cpp``) ran is part of the report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

SHAPE = {"batch": 16, "steps": 256, "input_size": 32, "hidden_size": 64}
TOLERANCE = 1e-4  # max abs difference allowed between the chunk and the step form


@dataclass
class Row:
    """One configuration to time."""

    label: str
    update: str = ""  # "" for the nn.LSTM baseline
    chunk_size: int = 0
    params: int = 0
    fwd_ms: float = 0.0
    fwd_bwd_ms: float = 0.0


def _build(row: Row, kwargs: dict[str, Any]):
    import torch

    I, H = SHAPE["input_size"], SHAPE["hidden_size"]
    torch.manual_seed(0)  # same parameters for the chunk and the step form of one rule
    if not row.update:
        return torch.nn.LSTM(I, H)
    import memagents.cores as cores

    return cores.make(
        "fwp", input_size=I, hidden_size=H, update=row.update, chunk_size=row.chunk_size, **kwargs
    )


def check_paths_agree(models: dict[str, Any], rows: list[Row], x) -> dict[str, float]:
    """Max abs difference of outputs and final fast weights, each chunk form vs its step form."""
    import torch

    diffs = {}
    with torch.no_grad():
        for row in rows:
            if not row.update or row.chunk_size == 1:
                continue
            step = next(r for r in rows if r.update == row.update and r.chunk_size == 1)
            y_c, s_c = models[row.label](x)
            y_s, s_s = models[step.label](x)
            diff = max(
                (y_c - y_s).abs().max().item(),
                (s_c.fast_weights - s_s.fast_weights).abs().max().item(),
            )
            diffs[row.label] = diff
            if not diff <= TOLERANCE:
                raise AssertionError(
                    f"{row.label}: chunk and step form differ by {diff:.2e} > {TOLERANCE:.0e}"
                )
    return diffs


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(
    rows: list[Row], kwargs: dict[str, Any], repeats: int, clock: str = "wall"
) -> dict[str, float]:
    """Time every row (interleaved repeats, medians); return the chunk-vs-step differences.

    :param clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``).
    """
    import torch

    torch.set_num_threads(1)
    now = CLOCKS[clock]
    B, T, I = SHAPE["batch"], SHAPE["steps"], SHAPE["input_size"]
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(0))
    models = {row.label: _build(row, kwargs) for row in rows}
    for row in rows:
        row.params = sum(p.numel() for p in models[row.label].parameters())
    diffs = check_paths_agree(models, rows, x)

    def run(model):
        y, _ = model(x)
        return y

    for model in models.values():  # warm-up
        run(model).sum().backward()
    fwd: dict[str, list[float]] = {row.label: [] for row in rows}
    fwd_bwd: dict[str, list[float]] = {row.label: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            model = models[row.label]
            with torch.no_grad():
                t0 = now()
                run(model)
                fwd[row.label].append(now() - t0)
            model.zero_grad(set_to_none=True)
            t0 = now()
            run(model).sum().backward()
            fwd_bwd[row.label].append(now() - t0)
    for row in rows:
        row.fwd_ms = 1000 * statistics.median(fwd[row.label])
        row.fwd_bwd_ms = 1000 * statistics.median(fwd_bwd[row.label])
    return diffs


def build_rows(chunk_sizes: list[int]) -> list[Row]:
    rows = [Row("nn.LSTM (baseline)")]
    for update in ("delta", "sum"):
        for c in chunk_sizes:
            rows.append(Row(f"fwp {update}, chunk form C={c}", update, c))
        rows.append(Row(f"fwp {update}, step form", update, 1))
    return rows


def native_status() -> str:
    """Whether the fast-weight core's native kernel is in use, for the report."""
    from memagents.cores import fwp, native

    if native.mode() == "0":
        return "off (MEMAGENTS_NATIVE=0)"
    return "on" if fwp._heads_kernel() is not None else "unavailable (torch path)"


def to_markdown(
    rows: list[Row],
    diffs: dict[str, float],
    kwargs: dict[str, Any],
    command: str,
    repeats: int,
    clock: str = "wall",
    native: str = "",
) -> str:
    lstm = rows[0]
    step = {r.update: r for r in rows if r.chunk_size == 1}
    clock_text = "wall time" if clock == "wall" else "CPU time of this process"
    lines = [
        "## Fast weights (`fwp`): chunk-parallel form vs step form",
        "",
        f"Command: `{command}`  ",
        f"Shape: B={SHAPE['batch']}, T={SHAPE['steps']}, input {SHAPE['input_size']}, "
        f"hidden {SHAPE['hidden_size']}; fwp {', '.join(f'{k}={v}' for k, v in kwargs.items())}; "
        f"CPU, torch threads 1, {platform.processor() or platform.machine()}; "
        f"fwp native kernel: {native or native_status()}.  ",
        f"One process, {repeats} interleaved repeats per row (median of {clock_text}). "
        "`step / chunk` is the step "
        "form's time over this row's (same rule); `max |Δ|` is the largest difference of outputs "
        f"and final fast weights between this chunk form and the step form (float32, checked "
        f"≤ {TOLERANCE:.0e}).",
        "",
        "| core | params | fwd ms | fwd+bwd ms | fwd+bwd / nn.LSTM | step / chunk (fwd / fwd+bwd) "
        "| max \\|Δ\\| |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = ""
        if r.update and r.chunk_size != 1:
            s = step[r.update]
            ratio = f"{s.fwd_ms / r.fwd_ms:.1f}x / {s.fwd_bwd_ms / r.fwd_bwd_ms:.1f}x"
        diff = f"{diffs[r.label]:.1e}" if r.label in diffs else ""
        lines.append(
            f"| {r.label} | {r.params:,} | {r.fwd_ms:.1f} | {r.fwd_bwd_ms:.1f} "
            f"| {r.fwd_bwd_ms / lstm.fwd_bwd_ms:.1f}x | {ratio} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench fwp", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--chunk-sizes", default="64", help="chunk sizes C of the chunk form, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median)")
    parser.add_argument("--feature-map", default="dpfp", choices=["dpfp", "elu1"])
    parser.add_argument("--num-heads", type=int, default=4, help="H")
    parser.add_argument("--key-size", type=int, default=16, help="d_key (and d_v)")
    parser.add_argument("--quick", action="store_true", help="one repeat (smoke run)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time, or this process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="Markdown file to update")
    args = parser.parse_args(argv)
    try:
        chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
        if not chunk_sizes or min(chunk_sizes) < 2:
            raise ValueError
    except ValueError:
        parser.error(
            f"--chunk-sizes must be integers >= 2, comma-separated; got {args.chunk_sizes!r}"
        )
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    repeats = 1 if args.quick else args.repeats
    kwargs = {
        "num_heads": args.num_heads,
        "key_size": args.key_size,
        "feature_map": args.feature_map,
    }
    rows = build_rows(chunk_sizes)
    diffs = measure(rows, kwargs, repeats, args.clock)
    for r in rows:
        print(f"{r.label:<30} fwd {r.fwd_ms:8.1f} ms  fwd+bwd {r.fwd_bwd_ms:8.1f} ms", flush=True)
    command = (
        "python -m memagents.bench fwp"
        + (" " + " ".join(argv if argv is not None else sys.argv[2:])).rstrip()
    )
    markdown = to_markdown(rows, diffs, kwargs, command, repeats, args.clock)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section("fwp", markdown, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
