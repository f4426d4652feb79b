import math

from benchmarks.yolo_benchmark import config_for, format_results, yolo_family


def test_yolo_family_trains_evaluates_and_counts_each_config(tiny_builtin):
    data = [f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24", "data.builtin.num_val=8",
            "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1",
            "data.img_size=128", "data.batch_size=4", "data.eval_batch_size=8"]
    assert config_for("yolov1_cpu", data).model.input_size == 128  # the FC head follows data.img_size
    rows = yolo_family(("yolov1_cpu", "yolov3_cpu"), steps=1, overrides=data)
    assert [r.name for r in rows] == ["yolov1_cpu", "yolov3_cpu"]
    for r in rows:
        assert 0 <= r.ap50 <= 1 and 0 <= r.ap <= 1 and r.params > 0 and r.flops > 0
        assert math.isfinite(r.img_per_s) and r.img_per_s > 0
    assert "yolov3_cpu" in format_results("t", rows)
