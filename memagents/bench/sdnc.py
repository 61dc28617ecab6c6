"""``python -m memagents.bench sdnc``: the SDNC's forward+backward time and peak memory as ``N`` grows.

The shape of SAM's benchmark (:mod:`memagents.bench.sam`): B=16, T=64, input 32, hidden 64, W=16,
R=4, K=4, plus ``K_L`` = ``temporal_reads`` = 4. Each memory size ``N`` runs in a fresh process (so
that the peak resident memory it reports belongs to that row alone): a warm-up forward+backward
from the initial state, then the median of the timed repeats. ``index="auto"`` as in SAM's.
Target (issue 3): the same scaling shape as SAM, fwd+bwd at N = 65,536 within 3x of N = 1,024
and peak memory within 1 GB of N = 1,024's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

from memagents.bench.sam import SHAPE, _peak_rss_bytes

CORE = {"word_size": 16, "num_reads": 4, "sparse_reads": 4, "temporal_reads": 4}
SIZES = [1024, 16_384, 65_536]


def measure_row(memory_size: int, repeats: int, index: str = "auto") -> dict:
    """Time one forward+backward per sequence at ``memory_size`` (call in a fresh process)."""
    import torch

    import memagents.cores as cores

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T = SHAPE["batch"], SHAPE["steps"]
    core = cores.make(
        "sdnc",
        input_size=SHAPE["input_size"],
        hidden_size=SHAPE["hidden_size"],
        memory_size=memory_size,
        index=index,
        **CORE,
    )
    x = torch.randn(T, B, SHAPE["input_size"])

    def run() -> None:
        y, _ = core(x, core.initial_state(B))
        y.sum().backward()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "N": memory_size,
        "index": core.index_kind,
        "fwd_bwd_ms": 1e3 * statistics.median(times),
        "peak_mib": _peak_rss_bytes() / 2**20,
    }


def _in_subprocess(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "memagents.bench.sdnc", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(rows: list[dict], command: str, repeats: int) -> str:
    base = rows[0]
    lines = [
        f"Command: `{command}`. B={SHAPE['batch']}, T={SHAPE['steps']}, "
        f"input {SHAPE['input_size']}, hidden {SHAPE['hidden_size']}, W={CORE['word_size']}, "
        f"R={CORE['num_reads']}, K={CORE['sparse_reads']}, K_L={CORE['temporal_reads']}; CPU, "
        f"1 thread ({platform.processor() or platform.machine()}); median of {repeats}; each row "
        "in a fresh process, from the initial (empty) memory; peak = process peak RSS.",
        "",
        "| N | index | fwd+bwd / sequence (ms) | vs N=1,024 | peak RSS (MiB) | peak - N=1,024 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']:,} | {r['index']} | {r['fwd_bwd_ms']:.1f} "
            f"| {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] - base['peak_mib']:+.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench sdnc", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="memory sizes N, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    parser.add_argument("--index", default="auto", choices=["auto", "exact", "faiss"])
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="Markdown file to update")
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:  # child process: one row, JSON on stdout
        print(json.dumps(measure_row(args.row, args.repeats, args.index)))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, comma-separated; got {args.sizes!r}")
    rows = []
    for n in sizes:
        try:
            row = _in_subprocess(
                ["--row", str(n), "--repeats", str(args.repeats), "--index", args.index]
            )
        except subprocess.CalledProcessError as err:
            print(f"N={n}: failed ({err.stderr.strip().splitlines()[-1:]})", flush=True)
            continue
        rows.append(row)
        print(
            f"N={n:>9,} {row['index']:<5} fwd+bwd {row['fwd_bwd_ms']:9.1f} ms  "
            f"peak {row['peak_mib']:8.0f} MiB",
            flush=True,
        )
    if not rows:
        return 1
    command = (
        "python -m memagents.bench sdnc"
        + (" " + " ".join(argv if argv is not None else sys.argv[2:])).rstrip()
    )
    markdown = to_markdown(rows, command, args.repeats)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section("sdnc", markdown, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
