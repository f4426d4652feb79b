import json
import math
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import benchmarks.zoo_benchmark as zoo_benchmark
from benchmarks.peer_benchmark import ROOT
from benchmarks.zoo_benchmark import ZOO, family_configs, format_zoo, read_run, run_zoo, zoo_order
from detkit.api import compose_train_config
from detkit.engine.amp import native_bf16, resolve_precision
from detkit.errors import ConfigError
from tests.app.test_auto import write_coco

# Seconds-long runs of every family below: a small backbone (the Darknet configs take a width), small images,
# no loader workers nor TensorBoard; the budget ends them after their first step.
FAST = ["model.backbone.width=8", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
        "trainer.threads=1", "hooks.tensorboard=null"]
NUMBERS = ("AP", "AP50", "APs", "params", "flops", "train_img_s", "latency_ms", "epochs", "images", "train_seconds")


def builtin_overrides(tiny_overrides: list[str]) -> list[str]:
    data = [o for o in tiny_overrides if o.startswith("data.builtin.")]
    return [*data, "data.img_size=64", "data.test_size=64", *FAST]


def check_row(row: dict, family: str, minutes: float, overrides: list[str]) -> dict:
    """The row's numbers are finite, its command trains ``family`` as the run did; returns the run's stored
    config."""
    assert row["model"] == family and "error" not in row
    assert all(math.isfinite(row[key]) for key in NUMBERS), row
    assert row["params"] > 0 and row["flops"] > 0 and row["latency_ms"] > 0
    assert row["images"] > 0 and row["train_seconds"] > 0 and row["epochs"] > 0
    assert row["train_img_s"] == pytest.approx(row["images"] / row["train_seconds"])
    args = shlex.split(row["command"])
    assert args[:4] == ["python", "tools/train.py", f"model={family}", f"trainer.max_minutes={minutes:g}"]
    assert args[-len(overrides):] == overrides
    stored = torch.load(Path(row["run_dir"]) / "last.pt", map_location="cpu", weights_only=False)
    again = OmegaConf.to_container(compose_train_config(args[2:]).model, resolve=True)
    for key in ("_target_", "backbone"):  # (the priors may be the run's own fit to the data: auto.priors)
        assert again[key] == stored["config"]["model"][key]
    metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
    assert [row[k] for k in ("AP", "AP50", "APs")] == [metrics[k] for k in ("AP", "AP50", "APs")]
    return stored["config"]


def test_the_command_trains_each_family_for_the_budget_and_writes_one_leaderboard(tiny_overrides, tmp_path,
                                                                                   monkeypatch, capsys):
    overrides = builtin_overrides(tiny_overrides)
    out = tmp_path / "zoo"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "zoo", "--minutes", "0.05", "--families",
                                      "fast_rcnn_cpu,yolov3_compact", "--out", str(out), "--latency-repeats", "2",
                                      "--no-reference", *overrides])
    runpy.run_path(str(ROOT / "tools" / "benchmark.py"), run_name="__main__")
    result = json.loads((out / "zoo.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["yolov3_compact", "fast_rcnn_cpu"]  # the zoo's order
    assert result["minutes"] == 0.05 and result["overrides"] == overrides and result["reference"] is None
    for row in result["rows"]:
        config = check_row(row, row["model"], 0.05, overrides)
        assert row["test_size"] == config["data"]["test_size"] == 64
        model, _, _ = zoo_benchmark.load_trained(Path(row["run_dir"]) / "last.pt")
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["precision"] == resolve_precision("auto", torch.device("cpu"))[0]  # auto, resolved here
    table = (out / "zoo.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| yolov3_compact |", "| fast_rcnn_cpu |"))]
    assert len(rows) == 2 and all(f"`{r['command']}`" in table for r in result["rows"])
    assert "budget 0.05 min per model, CPU" in table and ", threads 1, " in table and table in capsys.readouterr().out
    native = "yes" if native_bf16(torch.device("cpu")) else "no"
    assert f"training precision {result['rows'][0]['precision']} (native bf16: {native});" in table


def test_a_user_dataset_takes_overrides_and_is_measured_at_the_sizes_training_chose(tmp_path):
    overrides = [*write_coco(tmp_path / "coco", 8, (72, 96), (12, 30)), "auto.size_range=[64,96]", *FAST]
    result = run_zoo(0.05, tmp_path / "zoo", ["yolov3_compact"], overrides, repeats=2, reference=False,
                     log=lambda _: None)
    (row,) = result["rows"]
    config = check_row(row, "yolov3_compact", 0.05, overrides)
    assert config["data"]["val_json"] == str(tmp_path / "coco" / "ann.json")
    assert row["img_size"] == config["data"]["img_size"] == 96  # chosen by auto.sizes: null on the command line
    assert row["test_size"] == config["data"]["test_size"]


def test_the_zoo_order_puts_gcnn_beside_fast_rcnn_and_other_configs_last():
    assert zoo_order(["gcnn_cpu", "yolov3_mobilenetv2_cpu", "yolov1_cpu", "fast_rcnn_cpu", "yolov1_cpu"]) == \
        ["yolov1_cpu", "fast_rcnn_cpu", "gcnn_cpu", "yolov3_mobilenetv2_cpu"]
    assert zoo_order(reversed(ZOO)) == list(ZOO)
    assert ZOO.index("gcnn_cpu") == ZOO.index("fast_rcnn_cpu") + 1


def test_a_missing_config_or_a_non_coco_metric_fails_before_any_run():
    with pytest.raises(ConfigError, match=r"no model config .*model/yolov9_cpu\.yaml; available: .*yolov3_cpu"):
        family_configs(["yolov3_cpu", "yolov9_cpu"])
    with pytest.raises(ConfigError, match="eval.metric=voc07"):
        family_configs(["ssdlite"], ["eval.metric=voc07"])
    with pytest.raises(ConfigError, match="data.proposals_file=p.json"):
        family_configs(["fast_rcnn_cpu"], ["data.proposals_file=p.json"])


def test_a_failed_run_leaves_a_row_and_the_others_go_on(tmp_path, monkeypatch):
    def run_training(out, minutes, overrides, **popen):
        if "model=ssd300_cpu" in overrides:
            raise subprocess.CalledProcessError(1, "train.py")
        (Path(out) / "metrics.json").write_text(json.dumps({"AP": 0.25, "AP50": 0.5, "APs": -1.0}))
        torch.save({"hooks": {"progress": {"images": 80, "seconds": 4.0, "epochs": 2.5}}}, Path(out) / "last.pt")
        return 5.0

    measured = {"params": 10, "flops": 2e9, "img_size": 64, "test_size": 64, "threads": 1, "latency_ms": 3.0}
    monkeypatch.setattr(zoo_benchmark, "run_training", run_training)
    monkeypatch.setattr(zoo_benchmark, "measure_checkpoint", lambda checkpoint, repeats: measured)
    result = run_zoo(1, tmp_path, ["ssdlite_cpu", "ssd300_cpu"], reference=False, log=lambda _: None)  # ssd300_cpu 1st
    failed, done = result["rows"]
    assert failed["model"] == "ssd300_cpu" and "exited with status 1" in failed["error"]
    assert done["train_img_s"] == 20.0 and done["epochs"] == 2.5 and done["AP"] == 0.25
    table = (tmp_path / "zoo.md").read_text()
    assert table == format_zoo(result)
    assert "| ssd300_cpu | failed: tools/train.py exited with status 1" in table
    assert "| ssdlite_cpu | **0.2500** | 0.5000 | -1.0000 | 0.00 | 2.00 | 20.0 | 3.0 | 2.50 |" in table
    assert all(line.count("|") == 11 for line in table.splitlines() if line.startswith("|"))
    done["AP"] = 0.0
    assert "| ssdlite_cpu | 0.0000 |" in format_zoo(result)  # no bold for a best of nothing
    second = {**done, "model": "yolov3_cpu", "precision": "bf16"}
    mixed = format_zoo({**result, "rows": [{**done, "precision": "fp32"}, second]})
    assert "training precision per run (zoo.json)" in mixed  # rows of different precisions are not summed up as one


def test_a_run_without_training_totals_is_reported(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"AP": 0.0, "AP50": 0.0, "APs": 0.0}))
    torch.save({"hooks": {}}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="left out hooks.progress"):
        read_run(tmp_path)


def test_a_family_prefixed_override_reaches_that_familys_run_and_command_only(tmp_path, monkeypatch):
    seen = {}

    def run_training(out, minutes, overrides, **popen):
        seen[overrides[0]] = overrides
        (Path(out) / "metrics.json").write_text(json.dumps({"AP": 0.1, "AP50": 0.2, "APs": 0.0}))
        torch.save({"hooks": {"progress": {"images": 8, "seconds": 1.0, "epochs": 1.0}}}, Path(out) / "last.pt")
        return 2.0

    measured = {"params": 10, "flops": 2e9, "img_size": 64, "test_size": 64, "threads": 1, "latency_ms": 3.0}
    monkeypatch.setattr(zoo_benchmark, "run_training", run_training)
    monkeypatch.setattr(zoo_benchmark, "measure_checkpoint", lambda checkpoint, repeats: measured)
    overrides = ["yolov1_cpu:data=builtin_large", "eval.plots=false"]
    result = run_zoo(1, tmp_path, ["yolov3_cpu", "yolov1_cpu"], overrides, reference=False, log=lambda _: None)
    assert seen["model=yolov1_cpu"] == ["model=yolov1_cpu", "data=builtin_large", "eval.plots=false"]
    assert seen["model=yolov3_cpu"] == ["model=yolov3_cpu", "eval.plots=false"]
    commands = {r["model"]: r["command"] for r in result["rows"]}
    assert "data=builtin_large" in commands["yolov1_cpu"] and "builtin_large" not in commands["yolov3_cpu"]
    assert family_configs(["yolov1_cpu", "yolov3_cpu"], overrides)["yolov1_cpu"].data.builtin.root == \
        "data/builtin_large"
    with pytest.raises(ConfigError, match="unknown zoo family 'ssdlite'"):
        family_configs(["yolov3_cpu"], ["ssdlite:model.backbone.width=0.5"])
