"""The loader benchmark's pieces on a tiny built-in dataset: both pipelines run and the table has a baseline."""

from benchmarks.loader_benchmark import PIPELINES, format_throughputs, loader_throughputs


def test_loader_throughputs_on_tiny_data(tiny_builtin):
    overrides = [f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24", "data.builtin.num_val=8",
                 "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1"]
    rows = loader_throughputs(size=64, workers=0, batch_size=8, batches=1, overrides=overrides)
    assert [name for name, _ in rows] == list(PIPELINES) and all(rate > 0 for _, rate in rows)
    lines = format_throughputs("t", rows).splitlines()
    assert lines[0] == "t" and lines[2].endswith("1.00") and len(lines) == 2 + len(rows)
