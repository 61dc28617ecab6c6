"""``python -m memagents.bench cores``: speed and peak memory of every core, side by side.

At the issue's shape (B=16, T=64, input 32, hidden 64, W=16, R=4) it times one forward pass and
one forward+backward pass per sequence for each core (NTM and DNC at several memory sizes N),
beside a plain ``nn.LSTM`` (hidden 64) measured in the same run. Each measurement runs in its own
fresh process so that the peak resident memory it reports belongs to that configuration alone.

If the ``dnc`` package (pytorch-dnc) is importable, its DNC is measured at the same shape as a
reference (``--reference auto``, the default); it is never a dependency of memagents.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SHAPE = {"batch": 16, "steps": 64, "input_size": 32, "hidden_size": 64, "word_size": 16, "reads": 4}


@dataclass
class Spec:
    """One configuration to measure."""

    label: str  # row label, e.g. "dnc"
    kind: str  # "torch-lstm" | "core" | "pytorch-dnc"
    core: str = ""  # registry name for kind == "core"
    memory_size: int | None = None  # N, for memory cores
    kwargs: dict[str, Any] = field(default_factory=dict)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return 0


def _peak_rss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _build(spec: Spec, device: str):
    import torch

    B, T, I, H = SHAPE["batch"], SHAPE["steps"], SHAPE["input_size"], SHAPE["hidden_size"]
    x = torch.randn(T, B, I, device=device)
    if spec.kind == "torch-lstm":
        model = torch.nn.LSTM(I, H).to(device)

        def run():
            y, _ = model(x)
            return y

    elif spec.kind == "core":
        import memagents.cores as cores

        model = cores.make(spec.core, input_size=I, **spec.kwargs).to(device)

        def run():
            y, _ = model(x)
            return y

    elif spec.kind == "pytorch-dnc":
        from dnc.dnc import DNC  # the optional reference package

        model = DNC(
            input_size=I,
            hidden_size=H,
            rnn_type="lstm",
            num_layers=1,
            nr_cells=spec.memory_size,
            cell_size=SHAPE["word_size"],
            read_heads=SHAPE["reads"],
            batch_first=False,
            gpu_id=-1 if device == "cpu" else 0,
        )

        def run():
            y, _ = model(x, (None, None, None), reset_experience=True)
            return y

    else:
        raise ValueError(f"unknown spec kind {spec.kind!r}")
    return model, run


def _measure(spec: Spec, device: str, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: warm up, then time forward and forward+backward."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, run = _build(spec, device)
    params = sum(p.numel() for p in model.parameters())
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    base = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run().sum().backward()  # warm-up; its peak is the peak of one forward+backward
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else max(0, _peak_rss_bytes() - base)
    fwd, fwd_bwd = [], []
    for _ in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            run()
            sync()
            fwd.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        run().sum().backward()
        sync()
        fwd_bwd.append(time.perf_counter() - t0)
    return {
        "fwd_ms": 1000 * statistics.median(fwd),
        "fwd_bwd_ms": 1000 * statistics.median(fwd_bwd),
        "peak_mib": peak / 2**20,
        "params": params,
    }


def _measure_in_subprocess(spec: Spec, device: str, repeats: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (spec, device, repeats))


def reference_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("dnc") is not None
    except (ImportError, ValueError):
        return False


def build_specs(sizes: list[int], reference: bool) -> list[Spec]:
    H, W, R = SHAPE["hidden_size"], SHAPE["word_size"], SHAPE["reads"]
    specs = [
        Spec("nn.LSTM (baseline)", "torch-lstm"),
        Spec("mlp", "core", "mlp", kwargs={"hidden_size": H}),
        Spec("lstm", "core", "lstm", kwargs={"hidden_size": H}),
        Spec("gru", "core", "gru", kwargs={"hidden_size": H}),
    ]
    for n in sizes:
        specs.append(
            Spec("ntm", "core", "ntm", n, {"hidden_size": H, "memory_size": n, "word_size": W})
        )
    for n in sizes:
        kw = {"hidden_size": H, "memory_size": n, "word_size": W, "num_reads": R}
        specs.append(Spec("dnc", "core", "dnc", n, kw))
        if reference:
            specs.append(Spec("pytorch-dnc (reference)", "pytorch-dnc", memory_size=n))
    return specs


def to_markdown(rows: list[dict[str, Any]], command: str, device: str) -> str:
    lstm = next(r for r in rows if r["kind"] == "torch-lstm")
    refs = {r["memory_size"]: r for r in rows if r["kind"] == "pytorch-dnc"}
    lines = [
        "## Cores: forward and forward+backward per sequence",
        "",
        f"Command: `{command}`  ",
        f"Shape: B={SHAPE['batch']}, T={SHAPE['steps']}, input {SHAPE['input_size']}, "
        f"hidden {SHAPE['hidden_size']}, W={SHAPE['word_size']}, R={SHAPE['reads']}; "
        f"device {device}, torch threads 1, {platform.processor() or platform.machine()}.  ",
        "Each row is measured in a fresh process (median of the repeats); peak is the resident "
        "memory added by one forward+backward (CUDA: peak allocated).",
        "",
        "| core | N | params | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd / nn.LSTM "
        "| speed-up vs pytorch-dnc (fwd / fwd+bwd) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = refs.get(r["memory_size"]) if r.get("core") == "dnc" else None
        speedup = (
            f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x / {ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x"
            if ref
            else ""
        )
        lines.append(
            f"| {r['label']} | {r['memory_size'] or ''} | {r['params']:,} | {r['fwd_ms']:.1f} "
            f"| {r['fwd_bwd_ms']:.1f} | {r['peak_mib']:.0f} "
            f"| {r['fwd_bwd_ms'] / lstm['fwd_bwd_ms']:.1f}x | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memagents.bench cores", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", default="16,64,256,1024", help="memory sizes N, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument(
        "--reference",
        choices=["auto", "on", "off"],
        default="auto",
        help="also measure pytorch-dnc's DNC (the 'dnc' package) if installed",
    )
    parser.add_argument("--quick", action="store_true", help="N=16 only, one repeat (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="Markdown file to update")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--sizes must be positive integers separated by commas; got {args.sizes!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.quick:
        sizes, args.repeats = [16], 1
    reference = args.reference == "on" or (args.reference == "auto" and reference_available())
    if args.reference == "on" and not reference_available():
        parser.error("--reference on needs the 'dnc' package (pip install dnc)")

    rows = []
    for spec in build_specs(sizes, reference):
        repeats = 1 if (spec.memory_size or 0) >= 1024 else args.repeats
        result = _measure_in_subprocess(spec, args.device, repeats)
        row = {**asdict(spec), **result}
        rows.append(row)
        print(
            f"{spec.label:<26} N={spec.memory_size or '-':<5} fwd {result['fwd_ms']:9.1f} ms  "
            f"fwd+bwd {result['fwd_bwd_ms']:9.1f} ms  peak {result['peak_mib']:8.0f} MiB",
            flush=True,
        )
    from memagents.bench.report import command_line, publish

    markdown = to_markdown(rows, command_line("cores", argv), args.device)
    publish("cores", markdown, not args.no_write, args.out)
    return 0
