"""Sparsity training, tools/slim.py end to end, and the pruned checkpoint through the other tools."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from detkit.app.build import build_model
from detkit.app.evaluate import evaluate_checkpoint, load_trained
from detkit.app.train import train
from detkit.compression.graph import example_images
from detkit.compression.pruning import prune_model
from detkit.compression.slim import pruned_state
from detkit.compression.sparsity import SparsityHook, sparsity_factor
from detkit.deploy.onnx import export_checkpoint
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


class _Trainer:  # what SparsityHook reads from a Trainer
    def __init__(self, model, step=0, total=10):
        self.model, self.state = model, SimpleNamespace(global_step=step, total_steps=total)


def test_the_sparsity_hook_adds_s_sign_gamma_to_the_prunable_gammas_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.2, 0.0, 1.0]))
    model(torch.rand(2, 3, 4, 4)).sum().backward()
    grad = model[1].weight.grad.clone()
    hook = SparsityHook(0.1, schedule="linear", batchnorms=[model[1]])
    hook.after_backward(_Trainer(model, step=5, total=10))  # linear schedule: s halved at mid-run
    assert torch.allclose(model[1].weight.grad - grad, torch.tensor([0.05, -0.05, 0.0, 0.05]))
    assert sparsity_factor(1.0, "cosine", 0.1) == 0.1 and sparsity_factor(0.3) == 1.0


def test_sparsity_training_from_the_config_shrinks_gamma_and_logs_a_histogram(tiny_train_config, tmp_path):
    def mean_gamma(run: str, *overrides: str) -> float:
        # Adam moves each γ by about lr per step when s dominates its gradient: 6 steps of 0.05 here
        train(tiny_train_config("trainer.ema.enabled=false", "optim.lr=0.05", "schedule.warmup_steps=0",
                                "schedule.final_factor=1.0", *overrides), tmp_path / run)
        weights = load_checkpoint(tmp_path / run / "last.pt")["model"]
        return torch.cat([w.abs() for k, w in weights.items() if k.endswith(".1.weight") and w.dim() == 1]).mean()

    plain = mean_gamma("plain")
    sparse = mean_gamma("sparse", "+compress=sparsity", "sparsity.s=1.0")
    assert sparse < 0.85 * plain
    events = b"".join(p.read_bytes() for p in (tmp_path / "sparse" / "tb").glob("events.*"))
    assert b"sparsity/gamma" in events and b"sparsity/gamma" not in b"".join(
        p.read_bytes() for p in (tmp_path / "plain" / "tb").glob("events.*"))


def test_a_pruned_checkpoint_reloads_with_weights_only_and_gives_the_same_outputs(tiny_train_config, tmp_path):
    train(tiny_train_config("trainer.epochs=1"), tmp_path / "run")
    model, cfg, state = load_trained(tmp_path / "run" / "last.pt")
    result = prune_model(model, ratio=0.5, images=example_images(64))
    path = save_checkpoint(pruned_state(state, model, cfg, result, {"ratio": 0.5}), tmp_path / "pruned.pt")
    reloaded = load_checkpoint(path)  # torch.load(weights_only=True)
    spec = OmegaConf.create(reloaded["config"]).channel_spec
    assert json.loads(json.dumps(reloaded["config"]["channel_spec"])) == result.channel_spec
    rebuilt = build_model(OmegaConf.create(reloaded["config"]).model, len(reloaded["class_names"]), spec)
    rebuilt.load_state_dict(reloaded["weights"])
    images = example_images(96, batch=2)
    expected = model.eval().raw_outputs(images)
    assert all(torch.equal(a, b) for a, b in zip(expected, rebuilt.eval().raw_outputs(images)))


def test_slim_tool_end_to_end_then_eval_export_and_resume(tiny_train_config, tmp_path):
    cfg = tiny_train_config("trainer.epochs=1", "+compress=sparsity", "sparsity.s=1e-3")
    train(cfg, tmp_path / "sparse")
    out = tmp_path / "slim"
    result = subprocess.run(
        [sys.executable, "tools/slim.py", f"checkpoint={tmp_path / 'sparse' / 'last.pt'}", f"out={out}",
         f"hydra.run.dir={out}", "prune.ratio=0.5", "finetune.epochs=1", "report.latency_repeats=2",
         "report.threads=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["unpruned", "pruned", "fine-tuned"] and report["removed_fraction"] >= 0.4
    assert rows["pruned"]["params"] < rows["unpruned"]["params"]
    assert rows["pruned"]["gflops"] < rows["unpruned"]["gflops"]
    assert rows["fine-tuned"]["params"] == rows["pruned"]["params"] and rows["pruned"]["latency_ms"] > 0
    assert "| fine-tuned |" in (out / "report.md").read_text()
    tuned = out / "finetune" / "last.pt"
    assert load_checkpoint(tuned)["config"]["channel_spec"] == report["channel_spec"]
    metrics = evaluate_checkpoint(tuned, tmp_path / "eval", plots=False)
    assert abs(metrics["AP"] - rows["fine-tuned"]["AP"]) < 1e-6
    onnx_path, sidecar = export_checkpoint(tuned, tmp_path / "slim.onnx")
    assert onnx_path.is_file() and sidecar["max_box_diff"] < 1e-3  # onnxruntime = PyTorch, as unpruned
    # the fine-tuned run resumes from the command line like any other: one more epoch from its last.pt
    resumed = subprocess.run(
        [sys.executable, "tools/train.py", f"--config-dir={out / 'finetune'}", "--config-name=config",
         f"resume={tuned}", "trainer.epochs=2", f"hydra.run.dir={out / 'finetune'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and load_checkpoint(tuned)["epoch"] == 1
