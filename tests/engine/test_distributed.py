import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from detkit.app.build import scaled_lr
from detkit.app.train import training_forward
from detkit.data.loader import ResumableSampler, build_loader
from detkit.engine import distributed
from detkit.engine.hooks import Hook, NonFiniteGuard, ScheduleHook
from detkit.engine.trainer import Trainer


class ToyDetector(nn.Module):
    """The detector interface with a per-image mean loss and no BatchNorm: a data-parallel step over a split
    batch must then equal one step over the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 2))

    def forward(self, images, targets):
        goal = torch.stack([t["goal"] for t in targets])
        return {"loss_toy": ((self.net(images) - goal) ** 2).sum(dim=1).mean()}


class ToyData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(index)
        return torch.rand(3, 8, 8, generator=g), {"goal": torch.rand(2, generator=g), "image_id": index}


def run(batch_size: int, steps: int, rank: int = 0, world: int = 1, accumulate: int = 1) -> dict:
    torch.manual_seed(0)
    model = ToyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = build_loader(ToyData(), batch_size, train=True, seed=3, rank=rank, world=world)

    class Stop(Hook):
        def after_step(self, t):
            t.state.stop_requested = t.state.global_step == steps

    trainer = Trainer(model, optimizer, loader, epochs=1, hooks=[ScheduleHook(scheduler), Stop()],
                      accumulate=accumulate, forward=training_forward(model, torch.device("cpu"), compile=False))
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world_info, _ = distributed.init_from_env("cpu")
    assert world_info.rank == rank and world_info.size == world
    state = run(batch_size=4, steps=3, rank=rank, world=world)
    torch.save(state, f"{out}.{rank}")
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_take_the_single_process_step_on_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    single = run(batch_size=8, steps=3)
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path / "state")), nprocs=2, join=True)
    for rank in range(2):
        state = torch.load(tmp_path / f"state.{rank}", weights_only=True)
        for name, tensor in single.items():
            assert torch.allclose(state[name], tensor, atol=1e-6), (rank, name)
    # and the run did move the weights: the comparison is not between two initialisations
    torch.manual_seed(0)
    initial = ToyDetector().state_dict()
    assert not torch.allclose(initial["net.4.weight"], single["net.4.weight"], atol=1e-3)


def test_accumulating_two_batches_takes_the_step_of_one_batch_twice_the_size():
    torch.set_num_threads(1)
    single = run(batch_size=8, steps=3)
    accumulated = run(batch_size=4, steps=3, accumulate=2)
    for name, tensor in single.items():
        assert torch.allclose(accumulated[name], tensor, atol=1e-6), name


def test_shards_partition_the_shared_permutation():
    full = list(ResumableSampler(10, seed=1))
    shards = [list(ResumableSampler(10, seed=1, rank=r, world=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    assert sorted(sum(shards, [])) == sorted(full[:9])
    assert [shards[r][1] for r in range(3)] == full[3:6]  # step 1 of the ranks = single-process step 1
    resumed = ResumableSampler(10, seed=1, rank=1, world=3)
    resumed.start_at(2)
    assert list(resumed) == shards[1][2:]


class NaNOnSteps(ToyDetector):
    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.bad_steps, self.calls = bad_steps, 0

    def forward(self, images, targets):
        losses = super().forward(images, targets)
        self.calls += 1
        return {k: v * float("nan") for k, v in losses.items()} if self.calls in self.bad_steps else losses


def toy_trainer(model, max_nonfinite: int, *hooks: Hook) -> Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = build_loader(ToyData(), 4, train=True)
    return Trainer(model, optimizer, loader, epochs=1,
                   hooks=[ScheduleHook(scheduler), NonFiniteGuard(max_nonfinite), *hooks])


def test_a_nonfinite_loss_skips_the_step_naming_terms_and_images():
    model = NaNOnSteps({2})
    before = {}

    class Snapshot(Hook):
        def before_step(self, t):
            if t.state.global_step == 1:
                before.update({k: v.clone() for k, v in model.state_dict().items()})

        def after_step(self, t):
            if t.state.global_step == 2:
                assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    trainer = toy_trainer(model, 3, Snapshot())
    with pytest.warns(RuntimeWarning, match=r"non-finite loss .* loss_toy=nan; image ids \[.*\]; step skipped"):
        trainer.train()
    assert trainer.state.skipped_steps == 1 and trainer.state.global_step == trainer.state.steps_per_epoch


def test_consecutive_nonfinite_losses_stop_the_run():
    trainer = toy_trainer(NaNOnSteps({2, 3, 4}), max_nonfinite=3)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="3 step\\(s\\) in a row, stopping"):
        trainer.train()


def test_lr_scales_with_the_total_batch():
    assert scaled_lr(0.01, 32, 8, "linear") == pytest.approx(0.04)
    assert scaled_lr(0.01, 32, 8, "sqrt") == pytest.approx(0.02)
    assert scaled_lr(0.01, 32, 8, "none") == 0.01 and scaled_lr(0.01, 32, None) == 0.01
    with pytest.raises(ValueError, match="optim.lr_scaling must be one of linear, sqrt, none"):
        scaled_lr(0.01, 32, 8, "cubic")
