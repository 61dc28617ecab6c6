"""``python -m memagents.bench {cores,envs,fwp,sam,sdnc,sparse-rl,train} [options]``: benchmarks into
``docs/BENCHMARKS.md``."""

from __future__ import annotations

import importlib
import sys

TARGETS = {
    "cores": "memagents.bench.cores",
    "envs": "memagents.bench.envs",
    "fwp": "memagents.bench.fwp",
    "sam": "memagents.bench.sam",
    "sdnc": "memagents.bench.sdnc",
    "sparse-rl": "memagents.bench.sparse_rl",
    "train": "memagents.bench.train",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("targets: " + ", ".join(TARGETS))
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    if target not in TARGETS:
        print(
            f"memagents.bench: unknown target {target!r}; choose one of: {', '.join(TARGETS)}",
            file=sys.stderr,
        )
        return 2
    try:
        module = importlib.import_module(TARGETS[target])
    except ModuleNotFoundError as exc:
        print(f"memagents.bench: target {target!r} is not available here ({exc})", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
