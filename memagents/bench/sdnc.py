"""``python -m memagents.bench sdnc``: the SDNC's forward+backward time and peak memory as ``N`` grows.

The shape of SAM's benchmark (:mod:`memagents.bench.sam`): B=16, T=64, input 32, hidden 64, W=16,
R=4, K=4, plus ``K_L`` = ``temporal_reads`` = 4. Each memory size ``N`` runs in a fresh process (so
that the peak resident memory it reports belongs to that row alone): a warm-up forward+backward
from the initial state, then the median of the timed repeats. ``index="auto"`` as in SAM's.
Target (issue 3): the same scaling shape as SAM, fwd+bwd at N = 65,536 within 3x of N = 1,024
and peak memory within 1 GB of N = 1,024's.
"""

from __future__ import annotations

import sys

from memagents.bench.sam import run_bench

CORE = {"word_size": 16, "num_reads": 4, "sparse_reads": 4, "temporal_reads": 4}
SIZES = [1024, 16_384, 65_536]


def main(argv: list[str] | None = None) -> int:
    return run_bench("sdnc", CORE, SIZES, argv, __doc__, with_recall=False)


if __name__ == "__main__":
    sys.exit(main())
