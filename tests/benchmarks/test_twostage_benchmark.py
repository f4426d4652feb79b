import math

from benchmarks.benchmark import format_table
from benchmarks.twostage_benchmark import twostage_timings


def test_quick_twostage_benchmark_times_both_detectors_against_torchvision():
    tables = twostage_timings(repeats=1, batch=1, size=64, num_classes=3, depth=18, warmup=0)
    assert len(tables) == 4
    for title, rows in tables:
        assert [r.name.split()[0] for r in rows] == ["torchvision", "detkit"]
        assert rows[0].ratio == 1.0 and math.isfinite(rows[1].ratio) and rows[1].median_ms > 0
        assert "ResNet-18" in format_table(title, rows)
    assert [t.split()[0] for t, _ in tables] == ["fpn_rcnn", "fpn_rcnn", "retinanet", "retinanet"]
