import json

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.app.evaluate import evaluate_checkpoint
from detkit.app.train import train
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import Hook


class StopAfter(Hook):
    """Simulates a killed process: stops the loop right after global step ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self, trainer) -> None:
        if trainer.state.global_step == self.n:
            trainer.state.stop_requested = True


def test_resume_mid_epoch_reproduces_uninterrupted_weights(tiny_train_config, tmp_path):
    # 24 images / batch 8 = 3 steps per epoch; the interruption falls inside the second epoch.
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(tiny_train_config("trainer.eval_every=2"), full_dir)
    cut_cfg = tiny_train_config("trainer.eval_every=2", "trainer.checkpoint_every_steps=1")
    train(cut_cfg, cut_dir, extra_hooks=[StopAfter(4)])
    partial = load_checkpoint(cut_dir / "last.pt")
    assert (partial["epoch"], partial["step_in_epoch"], partial["global_step"]) == (1, 1, 4)
    train(tiny_train_config("trainer.eval_every=2", f"resume={cut_dir / 'last.pt'}"), cut_dir)

    full, resumed = load_checkpoint(full_dir / "last.pt"), load_checkpoint(cut_dir / "last.pt")
    assert full["global_step"] == resumed["global_step"] == 6
    for key in ("model", "weights"):  # raw weights and the EMA that evaluation uses
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    assert full["optimizer"]["state"][0]["exp_avg"].equal(resumed["optimizer"]["state"][0]["exp_avg"])


def test_checkpoint_evaluation_matches_training_and_pycocotools(tiny_train_config, tmp_path, tiny_builtin):
    run_dir = tmp_path / "run"
    metrics = train(tiny_train_config(), run_dir)
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    written = json.loads((run_dir / "metrics.json").read_text())
    assert abs(written["AP"] - metrics["AP"]) < 1e-12

    again = evaluate_checkpoint(run_dir / "last.pt", tmp_path / "eval")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert abs(again[key] - metrics[key]) < 1e-4, key

    # Independently: pycocotools on predictions.json against the dataset's own json.
    gt = COCO(str(tiny_builtin / "annotations" / "instances_val.json"))
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= set(gt.getCatIds())
    evaluator = COCOeval(gt, gt.loadRes(predictions), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert abs(evaluator.stats[0] - again["AP"]) < 1e-12 and abs(evaluator.stats[1] - again["AP50"]) < 1e-12
