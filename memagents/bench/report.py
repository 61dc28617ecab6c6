"""Write one benchmark's Markdown section into ``docs/BENCHMARKS.md`` without touching the others.

Each benchmark owns a block delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; running
it again replaces only that block, so ``cores`` and ``envs`` results live side by side in one file.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"

_HEADER = """# Benchmarks

Produced by `python -m memagents.bench ...` on the development machine (2 CPU cores, no GPU).
Absolute times on this machine are noisy; compare the ratios, which are measured side by side in
one run. All CPU benchmarks run with `torch.set_num_threads(1)`: with 2 threads, small recurrent
workloads ran erratically and far slower here.
"""


def write_section(name: str, markdown: str, path: str | Path | None = None) -> Path:
    """Replace (or append) the block of benchmark ``name`` in the benchmarks file.

    :param name: the benchmark's name, e.g. ``"cores"``; letters, digits, ``-`` and ``_`` only.
    :param markdown: the block's content (a heading, the command that produced it, tables).
    :param path: the file to update; defaults to ``docs/BENCHMARKS.md`` of the repository.
    :return: the path written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"benchmark name {name!r} must match [A-Za-z0-9_-]+")
    path = Path(path) if path is not None else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else _HEADER
    block = f"<!-- bench:{name} -->\n{markdown.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def command_line(target: str, argv: list[str] | None) -> str:
    """``python -m memagents.bench TARGET ...`` as it was invoked (``argv``, else the process's)."""
    import sys

    args = argv if argv is not None else sys.argv[2:]
    return (f"python -m memagents.bench {target} " + " ".join(args)).rstrip()


def publish(name: str, markdown: str, write: bool, path: str | Path | None = None) -> None:
    """Print a benchmark's section and, if ``write``, put it into the benchmarks file."""
    print()
    print(markdown)
    if write:
        print(f"wrote {write_section(name, markdown, path)}")
