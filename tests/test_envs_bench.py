"""The env benchmark's CLI, at tiny sizes (``--quick``)."""

from __future__ import annotations

import re

import pytest

from memagents.bench import envs as bench_envs


def test_quick_env_benchmark_writes_only_its_section(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:cores -->\nkept\n<!-- /bench:cores -->\n")
    code = bench_envs.main(
        ["--quick", "--tasks", "Recall", "Copy", "--seconds", "0.005", "--output", str(out)]
    )
    assert code == 0
    text = out.read_text()
    assert "<!-- bench:cores -->\nkept\n<!-- /bench:cores -->" in text  # untouched
    section = text.split("<!-- bench:envs -->")[1].split("<!-- /bench:envs -->")[0]
    summary, table = section.split("All measurements")
    rate = r"[\d.]+(?: [kM])?"
    for task in ("memagents/Recall-v0", "memagents/Copy-v0"):  # one summary row with ratios
        pattern = rf"^\| {task} \| {rate} \| {rate} \| \*\*\d+x\*\* \| {rate} \| \d+x \|$"
        assert len(re.findall(pattern, summary, flags=re.MULTILINE)) == 1
    rows = re.findall(rf"^\| (memagents/\S+) \| ([^|]+) \| {rate} \| {rate} \|$", table, re.M)
    assert sorted(rows) == sorted(
        (task, backend)
        for task in ("memagents/Recall-v0", "memagents/Copy-v0")
        for backend in bench_envs.BACKENDS
    )
    assert "| B=1 | B=8 |" in table
    assert "wrote the envs section" in capsys.readouterr().out


def test_quick_run_without_output_does_not_touch_the_docs(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(bench_envs, "write_section", lambda *a, **k: written.append(a))
    assert bench_envs.main(["--quick", "--tasks", "Adding", "--seconds", "0.005"]) == 0
    assert written == []


def test_bad_arguments_exit_with_a_usage_error():
    with pytest.raises(SystemExit):
        bench_envs.main(["--tasks", "Sorting"])
    with pytest.raises(SystemExit):
        bench_envs.main(["--seconds", "0"])
