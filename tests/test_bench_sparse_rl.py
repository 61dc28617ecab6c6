"""``python -m memagents.bench sparse-rl``: its argument errors and the targets its report
states (ratios against N=1,024 computed from the rows, met or not)."""

from __future__ import annotations

import pytest

from memagents.bench import sparse_rl


def _row(core, n, step, fwd_bwd, peak, rollout, sps):
    return {
        "core": core, "memory_size": n, "step_ms": step, "step_copy_ms": 10 * step,
        "fwd_bwd_ms": fwd_bwd, "peak_mib": peak, "rollout_ms_per_step": rollout,
        "update_s": 0.5, "steps_per_s": sps,
    }  # fmt: skip


def test_report_states_each_target_from_the_rows():
    rows = [
        _row("sam", 1024, 1.0, 100.0, 300.0, 4.0, 1000.0),
        _row("sam", 65_536, 1.5, 350.0, 600.0, 9.0, 600.0),
    ]
    text = sparse_rl.to_markdown(rows, "python -m memagents.bench sparse-rl", 5)
    assert "| sam | 65,536 | 1.50 | 1.50x |" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("- sam at N=65,536"))
    assert "T=1 step 1.50x (<= 2x: met)" in line
    assert "rollout step 2.25x (<= 2x: **not met**)" in line
    assert "fwd+bwd 3.50x (<= 3x: **not met**)" in line
    assert "training steps/s 0.60x (>= 0.5x: met)" in line
    assert "fwd+bwd peak +300 MiB (<= +1 GB: met)" in line


@pytest.mark.parametrize(
    "argv",
    [["--cores", "dnc"], ["--sizes", "65536"], ["--sizes", "1024,x"], ["--repeats", "0"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sparse_rl.main([*argv, "--no-write"])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
