"""Multi-scale sampling: sizes fixed by (seed, epoch, batch block), constant within a batch, resumable; and the
whole training data path (reader → Mosaic → yolo preset → multi-scale loader) built from the config."""

import pytest
import torch

from detkit.app.build import build_data_loader, build_dataset
from detkit.data.mosaic import Mosaic
from detkit.data.multiscale import YOLOV2_SIZES, MultiScaleDataset, MultiScaleSampler


def test_sizes_are_deterministic_blockwise_and_resumable():
    sampler = MultiScaleSampler(100, batch_size=4, sizes=YOLOV2_SIZES, every=2, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert full == list(sampler) and sorted(i for i, _ in full) == list(range(100))
    for block in range(0, 100, 8):  # every=2 batches of 4
        assert len({size for _, size in full[block : block + 8]}) == 1
    assert len({size for _, size in full}) > 3 and {size for _, size in full} <= set(YOLOV2_SIZES)
    sampler.start_at(12)  # a resume after 3 batches sees exactly the rest
    assert list(sampler) == full[12:] and len(sampler) == 100
    sampler.set_epoch(4)
    assert list(sampler) != full
    with pytest.raises(ValueError, match="multiples of 32"):
        MultiScaleSampler(10, 2, sizes=[320, 330])


def test_multiscale_dataset_sets_the_size():
    class Transform:
        size = 32

        def __call__(self, sample, index):
            return self.size, index

    class Data:
        transforms = Transform()

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return self.transforms(None, index)

    ds = MultiScaleDataset(Data())
    assert ds[(1, 64)] == (64, 1) and ds[(2, 96)] == (96, 2) and len(ds) == 3


def test_mosaic_yolo_multiscale_loader_from_config(tiny_train_config):
    cfg = tiny_train_config("augment@data.augment=yolo", "data.mosaic.prob=0.5", "data.mosaic.close_last=1",
                            "data.multiscale.sizes=[64,96]", "data.multiscale.every=1", "data.batch_size=4")
    dataset = build_dataset(cfg.data, "train", seed=0)
    assert isinstance(dataset, MultiScaleDataset) and isinstance(dataset.dataset, Mosaic)
    assert dataset.dataset.epochs == 2 and dataset.num_classes == 10 and len(dataset.class_names) == 10
    loader = build_data_loader(dataset, cfg.data, train=True, seed=0)
    sizes = []
    for images, targets in loader:
        size = images.shape[-1]
        assert images.shape[-2:] == (size, size) and size in (64, 96) and images.dtype == torch.float32
        for t in targets:
            boxes = t["boxes"]
            assert len(boxes) == len(t["labels"]) and ((boxes >= 0) & (boxes <= size)).all()
        sizes.append(size)
    assert len(sizes) == 6 and len(set(sizes)) == 2
    loader.sampler.set_epoch(1)
    loader.sampler.start_at(8)
    assert [images.shape[-1] for images, _ in loader] == _sizes(loader, 1)[2:]


def _sizes(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [images.shape[-1] for images, _ in loader]


def test_training_with_mosaic_and_multiscale_resumes_exactly(tiny_train_config, tmp_path):
    from detkit.app.train import train
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.hooks import Hook

    class StopAfter(Hook):
        def after_step(self, trainer) -> None:
            trainer.state.stop_requested = trainer.state.global_step == 4

    options = ("augment@data.augment=yolo", "data.mosaic.prob=0.5", "data.mosaic.mixup=0.5",
               "data.multiscale.sizes=[64,96]", "data.multiscale.every=1", "trainer.eval_every=2")
    train(tiny_train_config(*options), tmp_path / "full")
    train(tiny_train_config(*options, "trainer.checkpoint_every_steps=1"), tmp_path / "cut", extra_hooks=[StopAfter()])
    train(tiny_train_config(*options, f"resume={tmp_path / 'cut' / 'last.pt'}"), tmp_path / "cut")
    full, resumed = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert full["global_step"] == resumed["global_step"] == 6
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
