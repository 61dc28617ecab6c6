"""``python -m memagents.bench sam``: the table and a real (tiny) row."""

from __future__ import annotations

from memagents.bench import sam as bench_sam


def test_table_has_the_reference_columns_only_with_references():
    rows = [
        {"N": 1024, "index": "exact", "fwd_bwd_ms": 50.0, "peak_mib": 200.0},
        {"N": 65_536, "index": "ivf", "fwd_bwd_ms": 125.0, "peak_mib": 260.0},
    ]
    plain = bench_sam.to_markdown(rows, None, "cmd", 3)
    assert "pytorch-dnc" not in plain
    assert "| 65,536 | ivf | 125.0 | 2.50x | 260 | +60 |" in plain
    table = bench_sam.to_markdown(
        rows, {"recalls": {"ivf": 0.9, "faiss": 0.95}}, "cmd", 3, references={1024: 400.0}
    )
    assert "| 1,024 | exact | 50.0 | 1.00x | 200 | +0 | 400.0 | 8.0x |" in table
    assert "| 65,536 | ivf | 125.0 | 2.50x | 260 | +60 | | |" in table
    assert "exact search at N=65,536 (random rows and keys): `ivf` 0.900, `faiss` 0.950" in table


def test_a_row_measures_forward_and_backward():
    row = bench_sam.measure_row(64, repeats=1, index="exact")
    assert row["N"] == 64 and row["index"] == "exact"
    assert row["fwd_bwd_ms"] > 0 and row["peak_mib"] > 0


def test_recall_of_each_available_index_is_measured_and_high():
    recalls = bench_sam.measure_recall(memory_size=4096, queries=16)["recalls"]
    assert recalls, "neither the native ivf index nor faiss is available"
    assert all(0.9 <= r <= 1.0 for r in recalls.values()), recalls
