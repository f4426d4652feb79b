import math
import time

from detkit.utils.timing import interleaved_medians, median_ms


def test_interleaved_medians_alternate_the_candidates():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                                  warmup=1)
    assert calls == ["a", "b"] * 4 and set(medians) == {"a", "b"}
    assert all(math.isfinite(v) and v >= 0 for v in medians.values())


def test_median_ms_is_the_one_candidate_case_in_milliseconds():
    calls = []
    assert median_ms(lambda: calls.append(1), repeats=5, warmup=2) >= 0 and len(calls) == 7
    durations = iter([0.002, 0.3, 0.003])  # seconds; the median (3 ms), not the mean (100 ms)
    assert 2.5 < median_ms(lambda: time.sleep(next(durations)), repeats=3, warmup=0) < 60
