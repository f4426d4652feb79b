"""Distillation: each loss term at its minimum for a student equal to its teacher, the ψ rule of the imitation
mask, the teacher bound of the box loss, a frozen teacher, and a short narrower-student run that resumes."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch import nn

from detkit.app.train import train
from detkit.boxes import DeltaCoder
from detkit.compression.distill import DistillHook, distill
from detkit.compression.distill_adapters import DistillationError, dense_adapter
from detkit.compression.distill_losses import bounded_regression_loss, imitation_mask, logit_kd_loss
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import Hook
from detkit.models.backbones.darknet import Darknet
from detkit.models.backbones.mobilenet import MobileNetV2SSD
from detkit.models.detectors.ssd import SSD
from detkit.models.detectors.yolo import YOLOv3
from tests.conftest import compose_config
from tests.engine.test_train_resume import StopAfter
from tests.models.test_yolo import ANCHORS
from tests.models.test_yolo_family import one_thread  # noqa: F401 (autouse: one intra-op thread)

DISTILL_YAML = Path(__file__).resolve().parents[2] / "configs" / "compress" / "distill.yaml"


def tiny_yolo(width: int = 8, num_classes: int = 3, anchors=ANCHORS) -> YOLOv3:
    backbone = Darknet(depths=(1, 1, 1, 1), width=width, stem_stride=2, num_outputs=3)
    return YOLOv3(num_classes, backbone, anchors, neck_pairs=0)


def tiny_ssdlite(width: float = 0.25, num_classes: int = 3) -> SSD:
    priors = {"image_size": 128, "feature_sizes": (8, 4, 2, 1, 1, 1), "steps": (16, 32, 64, 128, 128, 128),
              "min_sizes": (16, 32, 56, 80, 100, 116), "max_sizes": (32, 56, 80, 100, 116, 128),
              "aspect_ratios": ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))}
    return SSD(num_classes, MobileNetV2SSD(width=width, extra_channels=(64, 32, 32, 16)), priors, separable_head=True)


def batch(size: int = 128):
    torch.manual_seed(1)
    images = torch.rand(2, 3, size, size)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [70.0, 60.0, 120.0, 100.0]]),
                "labels": torch.tensor([0, 1])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 84.0]]), "labels": torch.tensor([2])}]
    return images, targets


def fake_trainer(model: nn.Module) -> SimpleNamespace:
    """What DistillHook reads from a Trainer, without a data loader."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return SimpleNamespace(model=model, optimizer=optimizer, device=torch.device("cpu"), lr=1e-3,
                           memory_format=torch.contiguous_format, grad_clip_norm=None,
                           loader=SimpleNamespace(dataset=None))


def hook_losses(teacher: nn.Module, student: nn.Module, **settings) -> dict:
    hook = DistillHook(teacher, **settings)
    trainer = fake_trainer(student)
    hook.before_train(trainer)
    images, targets = batch()
    student(images, targets) if student.training else student(images)
    return hook.extra_losses(trainer, images, targets)


@pytest.mark.parametrize("make", [tiny_yolo, tiny_ssdlite], ids=["yolo", "ssdlite"])
def test_every_term_is_at_its_minimum_for_a_student_equal_to_its_teacher(make):
    torch.manual_seed(0)
    teacher = make().eval()
    student = copy.deepcopy(teacher).eval()  # eval: the same BatchNorm statistics as the teacher
    losses = hook_losses(teacher, student, kd_weight=1.0, box_weight=1.0, imitation_weight=1.0)
    assert set(losses) == {"loss_kd", "loss_bounded_box", "loss_imitation"}
    for name, value in losses.items():
        assert abs(value.item()) < 1e-5, (name, value.item())

    with torch.no_grad():  # a different student: every term becomes positive
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = hook_losses(teacher, student, kd_weight=1.0, box_weight=1.0, imitation_weight=1.0)
    assert all(v.item() > 1e-4 for v in losses.values()), {k: v.item() for k, v in losses.items()}


@pytest.mark.parametrize("name", ["yolov2_cpu", "yolov4_cpu", "ssdlite"])
def test_adapters_read_what_the_detector_predicts(name):
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={name}"] + (["model.backbone.width=0.25"] if name == "ssdlite" else []))
    model = instantiate(cfg.model, num_classes=3).eval()
    view = dense_adapter(model)
    images = batch()[0]
    with torch.no_grad():
        boxes, scores = model.dense_predictions(images)  # the detector's own decoding, anchor by anchor
        out = view.outputs(images)
    assert torch.allclose(out.boxes, boxes, atol=1e-4)
    if out.softmax:
        probabilities = out.logits.softmax(-1)[..., 1:]
    else:
        probabilities = out.logits.sigmoid() * out.objectness.sigmoid()[..., None]
    assert torch.allclose(probabilities, scores, atol=1e-6)
    assert out.priors.shape == (boxes.shape[1], 4) and len(out.cells) == boxes.shape[1]
    assert int(out.cells.max()) + 1 == sum(f.shape[-2] * f.shape[-1] for f in out.features)
    if not out.softmax:  # zero offsets decode to the priors: same order
        zeros = [torch.zeros(2, a.shape[0], f.shape[-2], f.shape[-1], 8) for a, f in zip(model.anchors, out.features)]
        assert torch.allclose(torch.cat([b.reshape(2, -1, 4) for b in model.decode(zeros)], 1)[0], out.priors)


def test_kd_loss_is_a_divergence_minimal_at_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 50, 4)
    for softmax in (True, False):
        objectness = torch.randn(2, 50)
        at_teacher = logit_kd_loss(teacher, teacher, 3.0, softmax, objectness, objectness)
        assert abs(float(at_teacher)) < 1e-5
        student = (teacher + 0.5 * torch.randn_like(teacher)).requires_grad_()
        loss = logit_kd_loss(student, teacher, 3.0, softmax, objectness + 0.3, objectness)
        assert loss.item() > 0
        loss.backward()  # a small step down the gradient moves the student towards the teacher
        moved = logit_kd_loss(student.detach() - 0.1 * student.grad, teacher, 3.0, softmax, objectness + 0.3,
                              objectness)
        assert moved.item() < loss.item()
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(teacher, teacher, 0.0)


def test_teacher_gets_no_gradient_and_stays_in_eval_mode_while_the_adaptation_trains():
    torch.manual_seed(0)
    teacher, student = tiny_yolo(width=16).eval(), tiny_yolo(width=8).train()
    hook, trainer = DistillHook(teacher, kd_weight=1.0, box_weight=1.0, imitation_weight=1.0), fake_trainer(student)
    hook.before_train(trainer)
    images, targets = batch()
    losses = student(images, targets)
    losses.update(hook.extra_losses(trainer, images, targets))
    sum(losses.values()).backward()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.heads.parameters())
    before = [p.detach().clone() for p in hook.adaptation.parameters()]
    hook.after_backward(trainer)  # the hook's own optimizer steps the 1×1 adaptation convs (8·k → 16·k channels)
    assert [tuple(c.weight.shape[:2]) for c in hook.adaptation] == [(32, 16), (64, 32), (128, 64)]
    assert all(not torch.equal(b, p) for b, p in zip(before, hook.adaptation.parameters()))


def test_imitation_mask_follows_the_psi_rule():
    # One level of 1×4 cells, one prior per cell, each 10×10.
    priors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [20, 0, 30, 10]])
    cells = torch.arange(4)
    first = torch.tensor([[0.0, 0, 10, 10]])  # IoU 1, 1/3, 0, 0
    second = torch.tensor([[22.0, 0, 26, 10]])  # IoU 0, 0, 0, 0.4: a small object still gets its location
    mask = imitation_mask(priors, cells, 4, [torch.cat([first, second]), torch.zeros(0, 4)], psi=0.5)
    assert mask.tolist() == [[True, False, False, True], [False, False, False, False]]
    assert imitation_mask(priors, cells, 4, [first], psi=0.3).tolist() == [[True, True, False, False]]
    # Two priors per cell (cells 0 and 1): a cell is in the mask when any of its priors is kept.
    two = torch.tensor([[0.0, 0, 4, 4], [0, 0, 10, 10], [10, 0, 14, 4], [10, 0, 20, 10]])
    assert imitation_mask(two, torch.tensor([0, 0, 1, 1]), 2, [torch.tensor([[10.0, 0, 19, 10]])]).tolist() == [
        [False, True]]


def test_bounded_box_loss_counts_only_where_the_student_is_not_better_than_the_teacher_by_the_margin():
    priors = torch.tensor([[0.0, 0, 20, 20], [50, 50, 90, 90]])
    gt = torch.tensor([[2.0, 2, 22, 22]])  # matches prior 0 only
    teacher = torch.tensor([[[4.0, 4, 24, 24], [0, 0, 1, 1]]])  # 4 px off
    close = torch.tensor([[[2.5, 2, 22.5, 22], [0, 0, 1, 1]]])  # 0.5 px off: error 0.025² vs teacher 0.1²·2
    coder = DeltaCoder()
    target = coder.encode(gt, priors[:1])
    error_close = float(((coder.encode(close[0, :1], priors[:1]) - target) ** 2).sum())
    error_teacher = float(((coder.encode(teacher[0, :1], priors[:1]) - target) ** 2).sum())
    assert error_close < error_teacher
    # Better than the teacher by more than the margin: nothing to learn from the teacher bound.
    assert float(bounded_regression_loss(close, teacher, priors, [gt], margin=0.0)) == 0.0
    assert float(bounded_regression_loss(close, teacher, priors, [gt], margin=0.5 * (error_teacher - error_close))) == 0
    # Better, but not by the margin; or worse: the student's own L2 error counts.
    margin = 2 * (error_teacher - error_close)
    assert float(bounded_regression_loss(close, teacher, priors, [gt], margin=margin)) == pytest.approx(error_close)
    assert float(bounded_regression_loss(teacher, close, priors, [gt])) == pytest.approx(error_teacher)
    assert float(bounded_regression_loss(teacher, close, priors, [torch.zeros(0, 4)])) == 0.0


def test_unsupported_detectors_and_different_head_layouts_are_refused_by_name():
    class TwoStageDetector(nn.Module):
        pass

    with pytest.raises(DistillationError, match="TwoStageDetector"):
        dense_adapter(TwoStageDetector())
    other_anchors = [[[w + 1, h] for w, h in level] for level in ANCHORS]
    with pytest.raises(DistillationError, match="head layout.*anchors"):
        hook_losses(tiny_yolo(), tiny_yolo(anchors=other_anchors), kd_weight=1.0)
    with pytest.raises(DistillationError, match="head layout.*num_classes"):
        hook_losses(tiny_yolo(num_classes=4), tiny_yolo(num_classes=3), box_weight=1.0)
    # feature imitation alone reads no per-anchor output: other anchors are fine, another family is not
    assert set(hook_losses(tiny_yolo(), tiny_yolo(anchors=other_anchors))) == {"loss_imitation"}
    with pytest.raises(DistillationError, match="teacher is a SSD and the student a YOLOv3"):
        hook_losses(tiny_ssdlite(), tiny_yolo())


class LoggedLosses(Hook):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def after_step(self, trainer) -> None:
        self.names |= set(trainer.state.losses)


def distill_config(tiny_train_config, teacher, *overrides: str):
    """The tiny training config plus the distillation settings of configs/compress/distill.yaml."""
    cfg = tiny_train_config("eval.plots=false", "trainer.eval_every=2", *overrides)
    with open_dict(cfg):
        cfg.teacher, cfg.distill = (str(teacher) if teacher else None), OmegaConf.load(DISTILL_YAML).distill
    cfg.distill.kd_weight, cfg.distill.box_weight = 0.5, 0.01  # every term on (the defaults: imitation only)
    return cfg


def test_narrower_student_distills_end_to_end_and_resumes_exactly(tiny_train_config, tmp_path):
    # Teacher: the tiny config at width 12; student: the same at width 8, so the adaptation convs widen.
    train(tiny_train_config("model.backbone.width=12", "trainer.epochs=1", "trainer.ema.enabled=false",
                            "eval.plots=false"), tmp_path / "teacher")
    teacher = tmp_path / "teacher" / "last.pt"
    metrics = distill(distill_config(tiny_train_config, teacher), tmp_path / "full")
    assert "AP" in metrics
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    assert full["config"]["model"]["backbone"]["width"] == 8 and full["global_step"] == 6

    cut = distill_config(tiny_train_config, teacher, "trainer.checkpoint_every_steps=1")
    logged = LoggedLosses()
    distill(cut, tmp_path / "cut", extra_hooks=[StopAfter(4), logged])
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["global_step"] == 4
    assert {"loss_kd", "loss_bounded_box", "loss_imitation", "loss_obj"} <= logged.names
    distill(distill_config(tiny_train_config, teacher, f"resume={tmp_path / 'cut' / 'last.pt'}"), tmp_path / "cut")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["global_step"] == 6
    for key in ("model", "weights"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    adaptation = full["hooks"]["distill_hook"]["adaptation"]
    student_teacher = [tuple(w.shape[:2]) for k, w in adaptation.items() if k.endswith("weight")]
    assert len(student_teacher) == 3 and all(c_t == c_s * 3 // 2 for c_t, c_s in student_teacher)
    for name, tensor in adaptation.items():
        assert torch.equal(tensor, resumed["hooks"]["distill_hook"]["adaptation"][name]), name


def test_distill_names_a_missing_teacher(tiny_train_config, tmp_path):
    with pytest.raises(ValueError, match="teacher=PATH"):
        distill(distill_config(tiny_train_config, None), tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        distill(distill_config(tiny_train_config, tmp_path / "nowhere.pt"), tmp_path)
