"""The public Python API: ``detkit.train(overrides)``, ``detkit.load(checkpoint)`` → :class:`Detector`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn


def compose_train_config(overrides: Sequence[str] = ()):
    """configs/train.yaml composed with Hydra ``overrides`` (``["model=ssdlite", "trainer.epochs=3"]``), as
    ``tools/train.py`` composes it from the command line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from detkit.utils.resolvers import config_dir

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (a tool): its search path holds train.yaml
        return compose(config_name="train", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def train(overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> dict:
    """Train as ``python tools/train.py *overrides`` does, into ``out_dir`` (default
    ``outputs/DATE/TIME``); returns the final validation metrics. ``last.pt`` and ``best.pt`` there load with
    :func:`load`."""
    from detkit.app.train import train as run

    out_dir = Path(out_dir) if out_dir is not None else Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
    return run(compose_train_config(overrides), out_dir)


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Detector:
    """The trained detector in ``checkpoint`` (a ``last.pt``/``best.pt`` of a training run, or a converted or
    compressed one), in eval mode on ``device``, with its evaluation size and classes."""
    from detkit.app.build import eval_img_size, eval_letterbox
    from detkit.app.evaluate import load_trained

    model, cfg, state = load_trained(checkpoint, str(device))
    return Detector(model, state["class_names"], eval_img_size(cfg.data), checkpoint, device,
                    letterbox=eval_letterbox(cfg.data))


def _as_rgb(image, index: int) -> np.ndarray:
    from PIL import Image

    from detkit.app.predict import read_rgb

    if isinstance(image, (str, Path)):
        return read_rgb(Path(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image {index}: an image must be an H x W x 3 uint8 RGB array (or a path or PIL image), "
                         f"got shape {array.shape} {array.dtype}")
    return array


class Detector:
    """A trained detector ready to use: :meth:`predict`, :meth:`evaluate`, :meth:`export`. ``model`` is the
    underlying torch module (torchvision's detection interface); ``class_names`` its classes; ``img_size`` the
    letterbox size images are resized to (the run's ``data.test_size``); ``letterbox`` the transform that does it
    (:class:`~detkit.data.transforms.Letterbox`: the run's data.resize, data.pad_value; None: detkit's letterbox)."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], img_size: int, checkpoint: str | Path,
                 device: str | torch.device = "cpu", letterbox=None) -> None:
        self.model, self.class_names, self.img_size = model.eval(), list(class_names), int(img_size)
        self.letterbox = letterbox
        self.checkpoint, self.device = Path(checkpoint), torch.device(device)

    def predict(self, images, score_threshold: float = 0.25, batch_size: int = 8) -> list[dict]:
        """Detections for one image or a list of them (file paths, PIL images or H×W×3 uint8 RGB arrays): one
        dict per image with ``boxes`` (N, 4) float xyxy in that image's pixels, ``scores`` (N,), ``labels``
        (N,) 0-based indices into :attr:`class_names`, ``names`` (N class names)."""
        from detkit.app.predict import detect

        single = isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "convert")
        arrays = [_as_rgb(image, i) for i, image in enumerate([images] if single else list(images))]
        results = []
        for start in range(0, len(arrays), max(int(batch_size), 1)):
            chunk = arrays[start:start + max(int(batch_size), 1)]
            results += detect(self.model, chunk, self.img_size, self.device, score_threshold, self.letterbox)
        for det in results:
            det["names"] = [self.class_names[i] for i in det["labels"].tolist()]
        return results

    def evaluate(self, data: Mapping | None = None, split: str = "val", out_dir: str | Path | None = None,
                 metric: str = "coco", tta: bool = False) -> dict:
        """COCO (or ``voc07``/``voc12``) metrics on ``split`` of the checkpoint's own dataset, or of ``data`` (a
        data config, as configs/data/*.yaml); reports and plots go to ``out_dir`` (default
        ``outputs/eval/DATE/TIME``)."""
        from omegaconf import OmegaConf

        from detkit.app.evaluate import evaluate_checkpoint

        out_dir = Path(out_dir) if out_dir is not None else Path("outputs/eval") / time.strftime("%Y-%m-%d/%H-%M-%S")
        data_cfg = OmegaConf.create(dict(data)) if data is not None else None
        return evaluate_checkpoint(self.checkpoint, out_dir, data_cfg, split, str(self.device), metric, tta=tta,
                                   plots=False)

    def export(self, path: str | Path | None = None, img_size: int | None = None) -> Path:
        """ONNX graph of the network and box decoding (``detkit.deploy.onnx``) with its ``.json`` sidecar;
        beside the checkpoint by default. Needs ``pip install detkit[deploy]``."""
        from detkit.deploy.onnx import export_checkpoint

        return export_checkpoint(self.checkpoint, path, img_size)[0]

    def __repr__(self) -> str:
        return (f"Detector({type(self.model).__name__}, {len(self.class_names)} classes, {self.img_size} px, "
                f"from {self.checkpoint})")
