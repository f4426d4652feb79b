"""SAT: the attacked images stay within ε and [0, 1], raise the detection loss of a trained detector more than noise
of the same size does, and leave weights, gradients and BatchNorm statistics as they were (also under bf16
autocast and channels_last); the hook's draws are reproducible; a short run trains with it."""

import pytest
import torch

from detkit.app.train import train
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks.sat import SATHook, frozen_batchnorm_stats, self_adversarial_images
from detkit.errors import ConfigError
from tests.models.overfit import overfit
from tests.models.test_yolo import tiny_yolo
from tests.models.test_yolo_family import one_thread  # noqa: F401 (autouse: one intra-op thread)

EPS = 0.03


def toy_batch() -> tuple[torch.Tensor, list[dict]]:
    """Two 64×64 grey images with rectangles whose colour is their class, and their targets."""
    colors = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
    boxes = [torch.tensor([[6.0, 8.0, 30.0, 34.0], [36.0, 30.0, 60.0, 58.0]]), torch.tensor([[16.0, 10.0, 44.0, 40.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2])]
    images = torch.full((2, 3, 64, 64), 0.5)
    for i in range(2):
        for (x1, y1, x2, y2), label in zip(boxes[i].int().tolist(), labels[i].tolist()):
            images[i, :, y1:y2, x1:x2] = colors[label][:, None, None]
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


@pytest.fixture(scope="module")
def trained():
    """A tiny YOLOv3 overfit on :func:`toy_batch` (seeded: deterministic), in training mode."""
    images, targets = toy_batch()
    torch.manual_seed(0)
    model = tiny_yolo().train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (set up before the autouse one_thread)
    try:
        overfit(model, images, targets, steps=40, lr=3e-3, shrink=0.5)
    finally:
        torch.set_num_threads(threads)
    for p in model.parameters():
        p.grad = None
    return model, images, targets


def detection_loss(model, images, targets) -> float:
    with frozen_batchnorm_stats(model), torch.no_grad():
        return sum(model(images, targets).values()).item()


def input_gradient(model, images, targets) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    with frozen_batchnorm_stats(model):
        return torch.autograd.grad(sum(model(x, targets).values()), x)[0]


@pytest.mark.parametrize("steps", [1, 3])
def test_attack_stays_within_eps_raises_the_loss_and_leaves_the_model_alone(trained, steps):
    model, images, targets = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights and BatchNorm statistics
    adversarial = self_adversarial_images(model, images, targets, EPS, steps)

    assert adversarial.shape == images.shape and not adversarial.requires_grad
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())

    sign = input_gradient(model, images, targets).sign()
    if steps == 1:  # one FGSM step up the loss
        torch.testing.assert_close(adversarial, (images + EPS * sign).clamp(0, 1))
    clean = detection_loss(model, images, targets)
    noise = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    noisy = detection_loss(model, (images + EPS * noise).clamp(0, 1), targets)
    descended = detection_loss(model, (images - EPS * sign).clamp(0, 1), targets)
    attacked = detection_loss(model, adversarial, targets)
    # the objects are harder to detect: more than after noise, or a step the other way, of the same size
    assert attacked > max(clean, noisy, descended), (clean, noisy, descended, attacked)


def test_attack_under_bf16_autocast_and_channels_last(trained):
    model, images, targets = trained
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial = self_adversarial_images(model, images, targets, EPS, 1,
                                          lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert adversarial.dtype == torch.float32 and adversarial.is_contiguous(memory_format=torch.channels_last)
    assert (adversarial - images).abs().max() <= EPS + 1e-6 and not torch.equal(adversarial, images)
    descended = (images - EPS * input_gradient(model, images, targets).sign()).clamp(0, 1)
    assert detection_loss(model, adversarial, targets) > detection_loss(model, descended, targets)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_hook_draws_are_reproducible_and_follow_prob():
    hook = SATHook(enabled=True, prob=0.5, seed=3)
    draws = [hook.attacks(step, index) for step in range(200) for index in range(2)]
    assert draws == [SATHook(enabled=True, prob=0.5, seed=3).attacks(s, i) for s in range(200) for i in range(2)]
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert not any(SATHook(enabled=True, prob=0.0).attacks(s, 0) for s in range(50))
    assert all(SATHook(enabled=True, prob=1.0).attacks(s, 0) for s in range(50))
    for bad in ({"prob": 1.5}, {"eps": 0.0}, {"steps": 0}):
        with pytest.raises(ConfigError, match="trainer.sat"):
            SATHook(enabled=True, **bad)


def test_training_with_sat_runs(tiny_train_config, tmp_path):
    cfg = tiny_train_config("trainer.sat.enabled=true", "trainer.sat.prob=1.0", "trainer.sat.steps=2",
                            "trainer.accumulate=2", "data.batch_size=4", "trainer.epochs=1", "eval.plots=false",
                            "hooks.tensorboard=null")
    assert "AP" in train(cfg, tmp_path)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["hooks"]["sat"] == {"attacked": 6}  # every loader batch: 3 steps x 2
    bn_counts = {int(v) for k, v in saved["model"].items() if k.endswith("num_batches_tracked")}
    assert bn_counts == {6}  # the attacks did not update BatchNorm statistics: only the 6 training forwards
