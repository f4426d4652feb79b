"""Evaluate a trained checkpoint on a dataset split; the evaluator used during training."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detkit.app.build import build_data_loader, build_dataset, build_model, eval_img_size, prepare_data
from detkit.app.errors import check_input_size
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import write_json
from detkit.errors import CheckpointError, ConfigError
from detkit.evaluation.coco import predict, to_coco_results
from detkit.evaluation.dataset import check_metric, evaluate_dataset, format_metrics, headline, json_metrics
from detkit.evaluation.plots import write_evaluation_plots
from detkit.evaluation.tta import TestTimeAugmentation


def make_evaluator(dataset, loader, out_dir: Path, device, metric: str = "coco", backend: str = "pycocotools"):
    """Callable(model) → metrics that also writes ``predictions.json`` and ``metrics.json`` in ``out_dir``.

    ``metric``: ``coco``, ``voc07`` or ``voc12``; ``backend``: the COCO evaluator (see
    :func:`detkit.evaluation.dataset.evaluate_dataset`). The metrics keep the PR curves and confusion matrix
    for :func:`detkit.evaluation.plots.write_evaluation_plots`; metrics.json leaves them out. An unknown
    ``metric`` is a :class:`~detkit.errors.ConfigError` here, before any prediction.
    """
    check_metric(metric)

    def evaluate(model) -> dict:
        predictions = predict(model, loader, device)
        metrics = evaluate_dataset(dataset, predictions, metric, backend)
        write_json(to_coco_results(predictions, dataset.label_to_category_id), out_dir / "predictions.json")
        write_json(json_metrics(metrics), out_dir / "metrics.json")
        return metrics

    return evaluate


def make_eval_probe(loader, num_images: int, device, sample: int = 8):
    """Callable(model) → the seconds an evaluation over ``num_images`` images of ``loader`` should take: the
    time per image of loading its first batch and of predicting on its first ``sample`` images (after a warm-up
    forward on the same images), times ``num_images``. For :class:`~detkit.engine.hooks.TimeBudgetHook`'s first
    plan; an empty loader gives 0."""

    def probe(model) -> float:
        start = time.perf_counter()
        batch = next(iter(loader), None)
        if batch is None:
            return 0.0
        images, targets = batch
        loading = (time.perf_counter() - start) / max(len(targets), 1)
        count = min(sample, len(targets))
        predict(model, [(images[:count], targets[:count])], device)
        start = time.perf_counter()
        predict(model, [(images[:count], targets[:count])], device)
        return ((time.perf_counter() - start) / count + loading) * num_images

    return probe


def load_trained(checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, stored config, checkpoint state) from a training checkpoint; a checkpoint without
    the config and class names of a training run is a :class:`~detkit.errors.CheckpointError`."""
    state = load_checkpoint(checkpoint, device)
    missing = [key for key in ("config", "class_names") if key not in state]
    if missing:
        raise CheckpointError(f"{checkpoint} is not a readable detkit checkpoint: it holds no {missing[0]!r} entry "
                              "(not written by a detkit training run)")
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg.model, len(state["class_names"]), cfg.get("channel_spec"))
    model.load_state_dict(state.get("weights", state["model"]))
    return model.to(device).eval(), cfg, state


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_cfg: DictConfig | None = None,
                        split: str = "val", device: str = "cpu", metric: str = "coco",
                        backend: str = "pycocotools", plots: bool = True, tta: bool = False,
                        test_size: int | None = None) -> dict:
    """Score a checkpoint on ``split`` of its own dataset (or ``data_cfg``) with ``metric`` (coco, voc07,
    voc12); writes metrics, predictions, a text report and (``plots``) the evaluation plots into ``out_dir``.
    ``tta``: predict through :class:`~detkit.evaluation.tta.TestTimeAugmentation` (flip + 2 scales).
    ``test_size``: letterbox to this size instead of the data config's (:func:`eval_img_size`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cfg, state = load_trained(checkpoint, device)
    check_metric(metric)
    if data_cfg is None:
        data_cfg = cfg.data
    else:  # another dataset: at the model's own sizes and input transform (resize mode, grey) unless it sets
        # them (data=coco|voc|yolo leave them null)
        sizes = {key: cfg.data.get(key) for key in ("img_size", "test_size", "pad_value", "resize", "max_size")
                 if data_cfg.get(key) is None}
        data_cfg = OmegaConf.merge(data_cfg, sizes)
    if test_size:
        data_cfg = OmegaConf.merge(data_cfg, {"test_size": int(test_size)})
    check_input_size(model, eval_img_size(data_cfg), "test_size" if test_size else "data.test_size")
    prepare_data(data_cfg)
    dataset = build_dataset(data_cfg, split, train=False)
    source = getattr(dataset, "ann_file", None) or getattr(dataset, "source", split)  # COCO json, VOC/YOLO root
    if list(dataset.class_names) != list(state["class_names"]):
        raise ConfigError(
            f"{checkpoint} was trained on classes {state['class_names']} but the {split} set of "
            f"{source} has {dataset.class_names}"
        )
    loader = build_data_loader(dataset, data_cfg, train=False)
    if tta:
        model = TestTimeAugmentation(model)
    metrics = make_evaluator(dataset, loader, out_dir, device, metric, backend)(model)
    report = (f"checkpoint {checkpoint}\ndata {source} at {eval_img_size(data_cfg)} px\n"
              f"metric {metric}{' (TTA)' if tta else ''}\n\n"
              f"{format_metrics(metrics)}\n\n{headline(metrics)}\n")
    (out_dir / "report.txt").write_text(report)
    if plots:
        write_evaluation_plots(metrics, out_dir, dataset.class_names)
    print(report)
    return metrics
