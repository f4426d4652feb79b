import json

from benchmarks import report_benchmark
from benchmarks.benchmark import train_config
from benchmarks.report_benchmark import format_report, matmul_gflops, run_report
from detkit.app.build import build_model


def tiny_yolo():
    return build_model(train_config(["model.backbone.width=4", "model.backbone.depths=[1,1,1,1]"]).model, 20)


def test_the_report_times_each_pair_and_writes_markdown_and_json(tmp_path, monkeypatch):
    # Two small detectors stand in for a torchvision/detkit pair (the real pairs take minutes on a CPU).
    monkeypatch.setattr(report_benchmark, "detector_pairs", lambda **kwargs: {
        "toy": ("baseline toy", tiny_yolo(), "detkit toy", tiny_yolo(), 64, 0)})
    report = run_report(tmp_path, repeats=1, quick=True)
    rows = report["detectors"]
    assert [r["phase"] for r in rows] == ["train step, batch 1", "inference, batch 1", "inference, batch 2"]
    assert all(r["baseline_ms"] > 0 and r["detkit_ms"] > 0 and abs(r["ratio"] - r["detkit_ms"] / r["baseline_ms"])
               < 1e-9 for r in rows)
    d = report["default_model"]
    assert d["train_img_s"] > 0 and d["infer_img_s"] > d["train_img_s"] / 10
    assert abs(d["infer_gflop_s"] - d["gflops_per_image"] * d["infer_img_s"]) < 1e-6
    assert json.loads((tmp_path / "benchmark.json").read_text())["detectors"] == rows
    markdown = (tmp_path / "benchmark.md").read_text()
    assert markdown == format_report(report)
    assert "| baseline toy vs detkit toy (64 px) | inference, batch 2 |" in markdown
    assert "of the matmul rate" in markdown
    assert report["loader_img_s"] and report["coco_eval_ms"]


def test_the_pairs_are_torchvisions_twins_at_equal_size():
    pairs = report_benchmark.detector_pairs(twostage_size=64, depth=18, only=("retinanet",))
    assert list(pairs) == ["retinanet"]
    tv_name, theirs, our_name, ours, size, offset = pairs["retinanet"]
    assert tv_name == "torchvision retinanet_resnet18_fpn" and size == 64 and offset == 0
    assert type(theirs).__module__.startswith("torchvision") and type(ours).__module__.startswith("detkit")


def test_matmul_rate_is_a_plausible_positive_number():
    rate = matmul_gflops(n=256, repeats=2)
    assert 0.1 < rate < 1e6
