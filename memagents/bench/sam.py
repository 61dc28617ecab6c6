"""``python -m memagents.bench sam``: SAM's forward+backward time and peak memory as ``N`` grows.

Shape of the issue's core benchmark: B=16, T=64, input 32, hidden 64, W=16, R=4, K=4. Each memory
size ``N`` runs in a fresh process (so that the peak resident memory it reports belongs to that
row alone): a warm-up forward+backward from the initial state, then the median of the timed
repeats. ``index="auto"`` picks the exact torch scan below
:data:`~memagents.cores.sparse_access.AUTO_FAISS_MIN_ROWS` rows and FAISS from there on. The
FAISS recall (fraction of the exact top-K rows found, per key) is measured on a memory of
random rows at N = 65,536.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE = {"batch": 16, "steps": 64, "input_size": 32, "hidden_size": 64}
CORE = {"word_size": 16, "num_reads": 4, "sparse_reads": 4}
SIZES = [1024, 16_384, 65_536, 262_144, 1_048_576]


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_row(
    memory_size: int,
    repeats: int,
    index: str = "auto",
    core_name: str = "sam",
    core_kwargs: dict | None = None,
) -> dict:
    """Time one forward+backward per sequence at ``memory_size`` (call in a fresh process).

    :param core_name: a sparse core of the registry (``sam`` or ``sdnc``).
    :param core_kwargs: its kwargs besides the shape and N (default: :data:`CORE`).
    """
    import torch

    import memagents.cores as cores

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T = SHAPE["batch"], SHAPE["steps"]
    core = cores.make(
        core_name,
        input_size=SHAPE["input_size"],
        hidden_size=SHAPE["hidden_size"],
        memory_size=memory_size,
        index=index,
        **(CORE if core_kwargs is None else core_kwargs),
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


def measure_recall(memory_size: int = 65_536, queries: int = 64, k: int = 4) -> float:
    """Mean fraction of the exact top-``k`` rows that FAISS finds, random rows and keys."""
    import torch

    from memagents.cores import sparse_access

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(4, memory_size, CORE["word_size"], generator=gen)
    keys = torch.randn(4, queries, CORE["word_size"], generator=gen)
    exact = sparse_access.ExactIndex(memory).search(memory, keys, k)
    approx = sparse_access.FaissIndex(memory).search(memory, keys, k)
    hits = (exact.unsqueeze(-1) == approx.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


def _in_subprocess(args: list[str], module: str = "memagents.bench.sam") -> dict:
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(
    rows: list[dict],
    recall: float | None,
    command: str,
    repeats: int,
    core_kwargs: dict | None = None,
) -> str:
    base = rows[0]
    kw = CORE if core_kwargs is None else core_kwargs
    temporal = f", K_L={kw['temporal_reads']}" if "temporal_reads" in kw else ""
    lines = [
        f"Command: `{command}`. B={SHAPE['batch']}, T={SHAPE['steps']}, "
        f"input {SHAPE['input_size']}, hidden {SHAPE['hidden_size']}, W={kw['word_size']}, "
        f"R={kw['num_reads']}, K={kw['sparse_reads']}{temporal}; CPU, 1 thread "
        f"({platform.processor() or platform.machine()}); median of {repeats}; each row in a "
        "fresh process, from the initial (empty) memory; peak = process peak RSS.",
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
    if recall is not None:
        lines += [
            "",
            f"FAISS recall@4 vs exact search at N=65,536 (random rows and keys): {recall:.3f}",
        ]
    return "\n".join(lines) + "\n"


def run_bench(
    name: str,
    core_kwargs: dict,
    sizes: list[int],
    argv: list[str] | None,
    doc: str,
    with_recall: bool,
) -> int:
    """The CLI of a sparse core's scaling benchmark (``sam``, ``sdnc``): one fresh process per N.

    :param name: the core's registry name; also the benchmark target and the report section.
    :param core_kwargs: the core's kwargs besides the shape and N.
    :param sizes: default memory sizes N.
    :param with_recall: also measure FAISS recall against exact search at N = 65,536.
    """
    module = f"memagents.bench.{name}"
    parser = argparse.ArgumentParser(
        prog=f"python -m memagents.bench {name}", description=doc.splitlines()[0]
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, sizes)), help="memory sizes N, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    parser.add_argument("--index", default="auto", choices=["auto", "exact", "faiss"])
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="Markdown file to update")
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recall", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:  # child process: one row, JSON on stdout
        row = measure_row(args.row, args.repeats, args.index, name, core_kwargs)
        print(json.dumps(row))
        return 0
    if args.recall:
        print(json.dumps({"recall": measure_recall()}))
        return 0
    try:
        chosen = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, comma-separated; got {args.sizes!r}")
    rows = []
    for n in chosen:
        try:
            row = _in_subprocess(
                ["--row", str(n), "--repeats", str(args.repeats), "--index", args.index], module
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
    from memagents.cores.sparse_access import faiss_available

    recall = None
    if with_recall and faiss_available():
        recall = _in_subprocess(["--recall"], module)["recall"]
    command = (
        f"python -m memagents.bench {name}"
        + (" " + " ".join(argv if argv is not None else sys.argv[2:])).rstrip()
    )
    markdown = to_markdown(rows, recall, command, args.repeats, core_kwargs)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section(name, markdown, args.out)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_bench("sam", CORE, SIZES, argv, __doc__, with_recall=True)


if __name__ == "__main__":
    sys.exit(main())
