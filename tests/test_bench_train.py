"""The training benchmark's CLI, at tiny sizes (``--quick``)."""

from __future__ import annotations

import re

import pytest

from memagents.bench import __main__ as bench_main
from memagents.bench import train as bench_train


def test_quick_train_benchmark_writes_only_its_section(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:cores -->\nkept\n<!-- /bench:cores -->\n")
    argv = ["--quick", "--systems", "stock,lstm,dnc", "--output", str(out)]
    assert bench_train.main(argv) == 0
    text = out.read_text()
    assert "<!-- bench:cores -->\nkept\n<!-- /bench:cores -->" in text  # untouched
    section = text.split("<!-- bench:train -->")[1].split("<!-- /bench:train -->")[0]
    rows = re.findall(
        r"^\| (\S+) \| ([^|]+) \| [\d,]+ \| (\d+) \| \*\*([\d.]+)x\*\* \|", section, re.M
    )
    expected = [
        (env, label)
        for env in bench_train.ENVS
        for label in (
            "stock RecurrentPPO LSTM",
            "lstm",
            "dnc N=64",
            "lstm, sequence-start buffer",
            "dnc N=64, sequence-start buffer",
        )
    ]
    assert [(env, label.strip()) for env, label, _, _ in rows] == expected
    for _env, label, steps, ratio in rows:
        assert int(steps) > 0
        if label.startswith("stock"):
            assert ratio == "1.00"  # ratios are against the stock row of the same env
    assert "Preset `quick`" in section and "separate critic" in section
    assert "wrote the train section" in capsys.readouterr().out


def test_rows_cover_stock_lstm_and_every_memory_core():
    import memagents.cores as cores

    specs = bench_train.build_specs(["memagents/Copy-v0"])
    systems = {s.system for s in specs}
    assert {"stock", "lstm", "ntm", "dnc"} <= systems
    assert ("fwp" in systems) == ("fwp" in cores.available())
    for name in ("sam", "sdnc"):
        assert (name in systems) == (name in cores.available())
    for spec in specs:
        if spec.system in ("ntm", "dnc", "sam", "sdnc"):
            assert spec.core_kwargs["memory_size"] == 64
    # every system of ours runs with both rollout buffers; stock only with its own
    buffers = {(s.system, s.buffer) for s in specs}
    for system in systems - {"stock"}:
        assert {(system, "stock"), (system, "sequence-start")} <= buffers
    assert ("stock", "sequence-start") not in buffers


def test_target_is_registered_and_bad_arguments_exit_with_usage_errors():
    assert bench_main.TARGETS["train"] == "memagents.bench.train"
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--envs", "NoSuchEnv-v0"])
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--systems", "tardis"])
    with pytest.raises(SystemExit):
        bench_train.main(["--iterations", "1"])


def test_batched_preset_has_a_row_per_collector_and_its_own_section(tmp_path, capsys):
    """``--presets batched --quick``: sb3 then device per (env, core), the time split, the
    device row's ratios to the sb3 row, written to the ``train-batched`` section only."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:train -->\nkept\n<!-- /bench:train -->\n")
    argv = ["--presets", "batched", "--quick", "--systems", "lstm", "--output", str(out)]
    assert bench_train.main(argv) == 0
    text = out.read_text()
    assert "<!-- bench:train -->\nkept\n<!-- /bench:train -->" in text
    section = text.split("<!-- bench:train-batched -->")[1].split("<!-- /bench:train-batched -->")[
        0
    ]
    rows = re.findall(
        r"^\| (memagents/\S+) \| (\w+) \| (sb3|device) \| ([\d,]+) \|(.*)$", section, re.M
    )
    assert [(env, core, coll) for env, core, coll, _, _ in rows] == [
        (env, "lstm", coll) for env in ("memagents/Copy-v0", "memagents/Recall-v0")
        for coll in ("sb3", "device")
    ]  # fmt: skip
    for _, _, collector, steps, rest in rows:
        assert int(steps.replace(",", "")) > 0
        cells = [c.strip() for c in rest.split("|")]
        times = [float(c) for c in cells[:7]]  # rollout, prep, fwd, bwd, opt, other, eval
        assert all(t > 0 for i, t in enumerate(times) if i != 5)  # "other" may round to 0
        assert (cells[7] == "-") == (collector == "device")  # 1-env eval: sb3 rows
        assert ("x**" in cells[9]) == (collector == "device")
    assert "wrote the train-batched section" in capsys.readouterr().out


def test_batched_preset_bad_arguments_exit_with_usage_errors():
    with pytest.raises(SystemExit):
        bench_train.main(["--presets", "batched", "--quick", "--envs", "MiniGrid-MemoryS7-v0"])
    with pytest.raises(SystemExit):
        bench_train.main(["--presets", "batched", "--quick", "--systems", "tardis"])
    with pytest.raises(SystemExit):
        bench_train.main(["--presets", "batched,light", "--quick"])
    with pytest.raises(SystemExit):  # the other presets run on the CPU only
        bench_train.main(["--presets", "light", "--quick", "--device", "cuda"])
