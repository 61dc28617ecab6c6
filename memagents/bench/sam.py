"""``python -m memagents.bench sam``: SAM's forward+backward time and peak memory as ``N`` grows.

Shape of the issue's core benchmark: B=16, T=64, input 32, hidden 64, W=16, R=4, K=4. Each memory
size ``N`` runs in a fresh process (so that the peak resident memory it reports belongs to that
row alone): a warm-up forward+backward from the initial state, then the median of the timed
repeats. ``index="auto"`` picks the exact scan below
:data:`~memagents.cores.sparse_access.AUTO_FAISS_MIN_ROWS` rows and an inverted-file index from
there on (``ivf``, the native kernels' index; ``faiss`` without them). Its recall (fraction of
the exact top-K rows found, per key) is measured on a memory of random rows at N = 65,536.

If the ``dnc`` package (pytorch-dnc) can run its ``SAM`` here, it is measured at the same shape
in a fresh process per N as a reference (``--reference auto``, the default; never a dependency
of memagents). On a CPU it needs ``pyflann`` (its FAISS index is GPU-only), and its backward
mutates tensors saved for backward, which current torch rejects: it runs inside
``torch.autograd.graph.allow_mutation_on_saved_tensors()`` (which copies each mutated tensor).
When it cannot run, the row is skipped with the reason.
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
#: Largest N at which pytorch-dnc's SAM is measured: at N = 65,536 its forward+backward (under
#: ``allow_mutation_on_saved_tensors``, which copies its memory at every in-place update) took
#: more than 23 GB and was killed out of memory.
REFERENCE_MAX_N = 16_384


def median_ms(run, repeats: int) -> float:
    """Milliseconds of the median of ``repeats`` timed calls of ``run``, after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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

    return {
        "N": memory_size,
        "index": core.index_kind,
        "fwd_bwd_ms": median_ms(run, repeats),
        "peak_mib": _peak_rss_bytes() / 2**20,
    }


def measure_reference_row(memory_size: int, repeats: int) -> dict:
    """pytorch-dnc's ``SAM`` (the optional ``dnc`` package) at the same shape: forward+backward
    per sequence from a fresh (``reset_experience``) memory; call in a fresh process."""
    import torch
    from dnc import SAM  # the optional reference package

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T = SHAPE["batch"], SHAPE["steps"]
    model = SAM(
        input_size=SHAPE["input_size"],
        hidden_size=SHAPE["hidden_size"],
        rnn_type="lstm",
        num_layers=1,
        nr_cells=memory_size,
        cell_size=CORE["word_size"],
        read_heads=CORE["num_reads"],
        sparse_reads=CORE["sparse_reads"],
        batch_first=False,
        gpu_id=-1,
    )
    x = torch.randn(T, B, SHAPE["input_size"])

    def run() -> None:
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            y, _ = model(x, (None, None, None), reset_experience=True)
            y.sum().backward()

    return {"N": memory_size, "fwd_bwd_ms": median_ms(run, repeats)}


def reference_importable() -> bool:
    """True when the ``dnc`` package (pytorch-dnc) can be found."""
    import importlib.util

    try:
        return importlib.util.find_spec("dnc") is not None
    except (ImportError, ValueError):
        return False


def measure_recall(memory_size: int = 65_536, queries: int = 64, k: int = 4) -> dict:
    """Mean fraction of the exact top-``k`` rows that each approximate index available here
    (``ivf`` with the native kernels, ``faiss`` with faiss installed) finds, random rows and
    keys: ``{"recalls": {kind: r}}``."""
    import torch

    from memagents.cores import sparse_access

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(4, memory_size, CORE["word_size"], generator=gen)
    keys = torch.randn(4, queries, CORE["word_size"], generator=gen)
    exact = sparse_access.ExactIndex(memory).search(memory, keys, k)
    recalls = {}
    for kind in ("ivf", "faiss"):
        try:
            sparse_access.resolve_index(kind, memory_size)
        except ValueError:  # not available here
            continue
        approx = sparse_access.make_index(kind, memory).search(memory, keys, k)
        hits = (exact.unsqueeze(-1) == approx.unsqueeze(-2)).any(-1).float()
        recalls[kind] = hits.mean().item()
    return {"recalls": recalls}


def _in_subprocess(args: list[str], module: str = "memagents.bench.sam") -> dict:
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(
    rows: list[dict],
    recall: dict | None,
    command: str,
    repeats: int,
    core_kwargs: dict | None = None,
    references: dict[int, float] | None = None,
) -> str:
    """The table; ``references`` maps N to pytorch-dnc's SAM fwd+bwd ms (extra columns)."""
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
        "| N | index | fwd+bwd / sequence (ms) | vs N=1,024 | peak RSS (MiB) | peak - N=1,024 |"
        + (" pytorch-dnc SAM fwd+bwd (ms) | speed-up |" if references else ""),
        "|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if references else ""),
    ]
    for r in rows:
        line = (
            f"| {r['N']:,} | {r['index']} | {r['fwd_bwd_ms']:.1f} "
            f"| {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] - base['peak_mib']:+.0f} |"
        )
        if references:
            ref = references.get(r["N"])
            line += f" {ref:.1f} | {ref / r['fwd_bwd_ms']:.1f}x |" if ref else " | |"
        lines.append(line)
    if references:
        lines += [
            "",
            "pytorch-dnc (the `dnc` package, 1.1.0) SAM at the same shape, in a fresh process per "
            "N, on its CPU index (FLANN via `pyflann`), its backward run under "
            "`torch.autograd.graph.allow_mutation_on_saved_tensors()` (current torch rejects its "
            "in-place updates of tensors saved for backward otherwise); not run above "
            f"N={REFERENCE_MAX_N:,} (at N=65,536 it needed more than 23 GB and was killed).",
        ]
    if recall is not None and recall["recalls"]:
        found = ", ".join(f"`{kind}` {r:.3f}" for kind, r in recall["recalls"].items())
        lines += [
            "",
            f"Recall@4 of the approximate indexes vs exact search at N=65,536 (random rows and "
            f"keys): {found}",
        ]
    return "\n".join(lines) + "\n"


def run_bench(
    name: str,
    core_kwargs: dict,
    sizes: list[int],
    argv: list[str] | None,
    doc: str,
    with_recall: bool,
    reference: bool = False,
) -> int:
    """The CLI of a sparse core's scaling benchmark (``sam``, ``sdnc``): one fresh process per N.

    :param name: the core's registry name; also the benchmark target and the report section.
    :param core_kwargs: the core's kwargs besides the shape and N.
    :param sizes: default memory sizes N.
    :param with_recall: also measure the inverted-file index's recall against exact search at
        N = 65,536.
    :param reference: offer ``--reference`` (pytorch-dnc's SAM beside each row).
    """
    module = f"memagents.bench.{name}"
    parser = argparse.ArgumentParser(
        prog=f"python -m memagents.bench {name}", description=doc.splitlines()[0]
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, sizes)), help="memory sizes N, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    parser.add_argument("--index", default="auto", choices=["auto", "exact", "faiss", "ivf"])
    if reference:
        parser.add_argument(
            "--reference",
            choices=["auto", "on", "off"],
            default="auto",
            help="also measure pytorch-dnc's SAM (the 'dnc' package) when it can run here",
        )
    parser.add_argument("--reference-row", type=int, default=None, help=argparse.SUPPRESS)
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
        print(json.dumps(measure_recall()))
        return 0
    if args.reference_row is not None:  # child process: pytorch-dnc's row
        print(json.dumps(measure_reference_row(args.reference_row, args.repeats)))
        return 0
    with_reference = reference and (
        args.reference == "on" or (args.reference == "auto" and reference_importable())
    )
    if reference and args.reference == "on" and not reference_importable():
        parser.error("--reference on needs the 'dnc' package (pytorch-dnc)")
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
    references: dict[int, float] = {}
    for n in chosen if with_reference else []:
        if n > REFERENCE_MAX_N:
            print(f"pytorch-dnc SAM N={n}: not run (> {REFERENCE_MAX_N:,}: out of memory)")
            continue
        try:
            ref = _in_subprocess(
                ["--reference-row", str(n), "--repeats", str(args.repeats)], module
            )
        except subprocess.CalledProcessError as err:
            reason = (err.stderr.strip().splitlines() or [f"exit status {err.returncode}"])[-1]
            print(f"pytorch-dnc SAM N={n}: skipped ({reason})", flush=True)
            continue
        references[n] = ref["fwd_bwd_ms"]
        print(f"pytorch-dnc SAM N={n:>9,} fwd+bwd {ref['fwd_bwd_ms']:9.1f} ms", flush=True)
    from memagents.cores.sparse_access import resolve_index

    recall = None
    if with_recall and resolve_index("auto", 65_536) != "exact":
        recall = _in_subprocess(["--recall"], module)
    command = (
        f"python -m memagents.bench {name}"
        + (" " + " ".join(argv if argv is not None else sys.argv[2:])).rstrip()
    )
    markdown = to_markdown(rows, recall, command, args.repeats, core_kwargs, references)
    print()
    print(markdown)
    if not args.no_write:
        from memagents.bench.report import write_section

        path = write_section(name, markdown, args.out)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_bench("sam", CORE, SIZES, argv, __doc__, with_recall=True, reference=True)


if __name__ == "__main__":
    sys.exit(main())
