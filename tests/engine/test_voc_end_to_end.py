import json

from detkit.app.evaluate import evaluate_checkpoint
from detkit.app.train import train
from tests.conftest import compose_config
from tests.data.conftest import CLASSES, write_voc


def test_a_voc_trained_checkpoint_evaluates_with_the_voc_metric(tmp_path):
    for split in ("trainval", "test"):
        write_voc(tmp_path / "VOCdevkit" / "VOC2007", split=split)
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir()
    write_voc(tmp_path / "VOCdevkit" / "VOC2012", split="trainval")
    cfg = compose_config("train", [
        "data=voc", f"data.root={tmp_path / 'VOCdevkit'}", f"data.class_names=[{','.join(CLASSES)}]",
        "data.img_size=64", "data.batch_size=2", "data.eval_batch_size=2", "data.num_workers=0",
        "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]", "trainer.epochs=1", "trainer.threads=1",
        "eval.metric=voc07",
    ])
    train(cfg, tmp_path / "run")
    metrics = evaluate_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "eval", metric="voc07")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["mAP"] == metrics["mAP"] and 0.0 <= metrics["mAP"] <= 1.0
    # 'b' has one difficult box (ignored) and one normal one: every class with a non-difficult box is scored.
    assert set(metrics["per_class"]) == set(CLASSES)
    assert "VOC2007" in (tmp_path / "eval" / "report.txt").read_text()
