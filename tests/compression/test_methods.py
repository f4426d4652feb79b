"""tools/slim.py's methods on a tiny trained checkpoint: each runs through the dispatch, writes an artifact that
reloads (weights_only) and evaluates to the AP it reported; the iterative channel-pruning schedule."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.app.evaluate import load_trained
from detkit.compression.magnitude import layer_sparsity
from detkit.compression.methods import METHODS, load_artifact, run_method
from detkit.compression.slim import checkpoint_evaluator
from detkit.engine.checkpoint import load_checkpoint
from tests.compression.detector_fixtures import one_thread  # noqa: F401
from tests.compression.method_fixtures import slim_config
from tests.compression.method_fixtures import tiny_checkpoint as checkpoint_fixture

ROOT = Path(__file__).resolve().parents[2]
tiny_checkpoint = checkpoint_fixture  # the fixture, by the name the tests take


def prunable_zero_fraction(model: nn.Module) -> float:
    counts = layer_sparsity(model).values()
    return sum(z for z, _ in counts) / sum(t for _, t in counts)


def assert_same_predictions(expected: Path, actual: Path) -> None:
    # the untrained tiny model scores AP 0: its thousand low-score boxes are what tell two models apart
    # (sorted: boxes of tied scores may come out in either order)
    a, b = [sorted([p["image_id"], p["category_id"], p["score"], *p["bbox"]] for p in json.loads(path.read_text()))
            for path in (expected, actual)]
    assert len(a) == len(b) > 100
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-3, rtol=1e-4)


FINE_TUNED = {"magnitude", "dsd", "deep_compression", "lowrank"}  # the methods with a fine-tuning hook or model


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_writes_an_artifact_that_reloads_and_scores_what_it_reported(method, tiny_checkpoint, tmp_path):
    epochs = 1 if method in FINE_TUNED else 0
    cfg = slim_config(f"finetune.epochs={epochs}", "deep_compression.bits=3", "lowrank.energy=0.6",
                      "int8.calibration_batches=1", "prune.calibration_batches=1")
    report = run_method(method, tiny_checkpoint, tmp_path, cfg)
    rows, final = report["rows"], report["rows"][report["final"]]
    assert (tmp_path / "report.md").is_file() and json.loads((tmp_path / "report.json").read_text())["rows"]
    original = next(iter(rows.values()))
    model = load_artifact(method, report["artifact"])
    metrics = checkpoint_evaluator(load_trained(tiny_checkpoint)[1], tmp_path, "cpu")(model, "reloaded")
    assert abs(metrics["AP"] - final["AP"]) < 1e-6 and abs(metrics["AP50"] - final["AP50"]) < 1e-6
    reported = tmp_path / report["final"] / "predictions.json"  # a row evaluated by the method, or its fine-tune's
    reported = reported if reported.is_file() else tmp_path / "finetune" / "predictions.json"
    assert_same_predictions(reported, tmp_path / "reloaded" / "predictions.json")
    if method in {"slim", "l1", "taylor", "apoz"}:
        assert report["criterion"] == {"slim": "bn_gamma"}.get(method, method)
        assert load_checkpoint(report["artifact"])["config"]["channel_spec"] == report["channel_spec"]
        assert final["params"] < 0.8 * original["params"] and final["gflops"] < original["gflops"]
    elif method == "magnitude":
        assert 0.45 < prunable_zero_fraction(model) < 0.55  # the masks held through fine-tuning
        assert list(rows) == ["original", "pruned", "fine-tuned"] and (tmp_path / "sparsity.txt").is_file()
    elif method == "dsd":
        assert prunable_zero_fraction(model) < 0.05  # the final dense phase revived the pruned weights
        assert (report["sparse_epochs"], report["dense_epochs"]) == (1, 1)
    elif method == "deep_compression":
        conv = dict(model.named_modules())["backbone.stem.0"]
        assert (conv.weight != 0).float().mean() < 0.25 and conv.weight[conv.weight != 0].unique().numel() <= 8
        assert final["weights_mb"] < 0.5 * original["weights_mb"] and "huffman" in report["stages_mb"]
    elif method == "int8":
        assert report["persisted"] and final["weights_mb"] < original["weights_mb"]
        assert any("quantize_per_tensor" in str(n.target) for n in model.backbone.graph.nodes)
        # and in a fresh interpreter, where nothing has registered the quantized ops yet
        fresh = subprocess.run([sys.executable, "-c", "import sys; from detkit.compression.methods import "
                                "load_int8; load_int8(sys.argv[1])", str(report["artifact"])],
                               capture_output=True, text=True, timeout=300)
        assert fresh.returncode == 0, fresh.stderr[-2000:]
    elif method == "lowrank":
        state = load_checkpoint(report["artifact"])  # weights_only=True
        assert state["config"]["model"]["_target_"].endswith("lowrank_detector")
        assert final["params"] < original["params"] and any(isinstance(m, nn.Sequential) and len(m) in (2, 3)
                                                            and isinstance(m[0], nn.Conv2d) for m in model.modules())
    if method in FINE_TUNED:
        assert (tmp_path / "finetune" / "last.pt").is_file() and report["finetune_epochs"] == 1


def test_iterative_schedule_reaches_the_ratio_in_rounds_of_prune_and_fine_tune(tiny_checkpoint, tmp_path):
    cfg = slim_config("finetune.epochs=1", "prune.steps=2", "prune.ratio=0.5", "prune.criterion=l1")
    report = run_method("slim", tiny_checkpoint, tmp_path, cfg)
    assert list(report["rows"]) == ["unpruned", "pruned 1/2", "fine-tuned 1/2", "pruned 2/2", "fine-tuned 2/2"]
    first, second = report["rows"]["pruned 1/2"]["params"], report["rows"]["pruned 2/2"]["params"]
    assert second < first < report["rows"]["unpruned"]["params"]
    assert 0.4 <= report["removed_fraction"] <= 0.6
    assert (tmp_path / "pruned_1.pt").is_file() and report["artifact"] == str(tmp_path / "finetune" / "last.pt")
    model, cfg_, _ = load_trained(report["artifact"])  # both rounds' widths rebuilt from the merged spec
    assert sum(p.numel() for p in model.parameters()) == report["rows"]["fine-tuned 2/2"]["params"]


def test_bad_method_and_settings_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown compression method 'prune'"):
        run_method("prune", tiny_checkpoint, tmp_path, slim_config())
    with pytest.raises(ValueError, match="prune.criterion must be one of"):
        run_method("slim", tiny_checkpoint, tmp_path, slim_config("prune.criterion=gamma"))
    with pytest.raises(ValueError, match="prune.steps"):
        run_method("slim", tiny_checkpoint, tmp_path, slim_config("prune.steps=2", "prune.threshold=0.1"))


def test_slim_tool_dispatches_on_method(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "tools/slim.py", f"checkpoint={tiny_checkpoint}", f"out={tmp_path}",
                             f"hydra.run.dir={tmp_path}", "method=magnitude", "magnitude.sparsity=0.3",
                             "report.latency_repeats=0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "magnitude" and report["settings"]["sparsity"] == 0.3
    bad = subprocess.run([sys.executable, "tools/slim.py", f"checkpoint={tiny_checkpoint}", f"out={tmp_path}",
                          f"hydra.run.dir={tmp_path}", "method=pruning"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown compression method 'pruning'" in bad.stderr
    assert "Traceback" not in bad.stderr
