"""Magnitude pruning: masks hold through fine-tuning steps, DSD's dense phase releases them, per-layer
sparsity report."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detkit.compression.magnitude import (
    MagnitudePruningHook,
    dsd_hook,
    layer_sparsity,
    magnitude_masks,
    sparsity_table,
)
from detkit.engine.hooks.ema import ModelEMA


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def fake_trainer(model: nn.Module, eval_model: nn.Module | None = None) -> SimpleNamespace:
    return SimpleNamespace(model=model, state=SimpleNamespace(epoch=0, eval_model=eval_model or model))


def train_steps(trainer, hook, steps: int, ema: ModelEMA | None = None) -> None:
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        loss = trainer.model(torch.randn(4, 3, 6, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hook.after_step(trainer)
        if trainer.state.eval_model is not trainer.model:
            ema.update(trainer.model)  # (the EMA hook may run after the pruning hook)


def test_layer_scope_prunes_each_layer_to_its_fraction_and_masks_survive_fine_tuning():
    model = small_net()
    hook = MagnitudePruningHook(0.5)
    ema = ModelEMA(model, decay=0.5, tau=1.0)  # started before pruning: dense
    trainer = fake_trainer(model, ema.module)
    hook.before_train(trainer)
    masks = {name: mask.clone() for name, mask in hook.masks.items()}
    for name, (zeros, total) in layer_sparsity(model).items():
        assert zeros == round(0.5 * total), name
    train_steps(trainer, hook, 5, ema)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert (weight[~mask] == 0).all()
        assert (weight[mask] != 0).all()  # the kept weights did train
        assert (dict(ema.module.named_modules())[name].weight[~mask] == 0).all()
    assert "total" in sparsity_table(model) and "50.0%" in sparsity_table(model)


def test_dsd_releases_the_masks_in_its_final_dense_phase():
    model = small_net()
    hook = dsd_hook(0.7, dense_epochs=1, sparse_epochs=1)
    trainer = fake_trainer(model)
    hook.before_train(trainer)
    assert hook.masks is None and sum(z for z, _ in layer_sparsity(model).values()) == 0
    trainer.state.epoch = 1
    hook.before_epoch(trainer)
    train_steps(trainer, hook, 3)
    zeros = sum(z for z, _ in layer_sparsity(model).values())
    total = sum(t for _, t in layer_sparsity(model).values())
    assert zeros == pytest.approx(0.7 * total, abs=3)
    trainer.state.epoch = 2
    hook.before_epoch(trainer)
    assert hook.masks is None
    train_steps(trainer, hook, 3)
    assert sum(z for z, _ in layer_sparsity(model).values()) == 0  # pruned weights trained again


def test_global_scope_uses_one_threshold_and_checkpoints_load_weights_only(tmp_path):
    model = small_net()
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the first conv's weights are all small: global pruning takes them first
    masks = magnitude_masks(model, 0.3, scope="global")
    assert not masks["0"].any()
    torch.save({"model": model.state_dict(), "hook": MagnitudePruningHook(0.3, masks=masks).state_dict()},
               tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    small_net().load_state_dict(state["model"])  # a plain model: no parametrisation keys
    hook = MagnitudePruningHook(0.3, scope="global")
    hook.load_state_dict(state["hook"])
    hook.before_epoch(fake_trainer(model))
    assert (model[0].weight == 0).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_masks(small_net(), 1.0)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(small_net(), 0.5, scope="row")
    with pytest.raises(ValueError, match="no prunable"):
        magnitude_masks(small_net(), {"nope": 0.5})
