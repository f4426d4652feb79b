"""Int8 post-training static quantization of a detector's feature extractor (PT2E path, ``torchao``).

torch 2.14 no longer ships ``torch.ao.quantization.quantize_pt2e``; the PT2E flow lives in ``torchao``
(``pip install detkit[quant]``): ``torch.export`` the module, ``prepare_pt2e`` with the
``X86InductorQuantizer`` (int8 x86 kernels through oneDNN), run calibration batches through the observers,
``convert_pt2e``. The submodules named in ``parts`` (by default YOLO's ``backbone``, ``spp``, ``neck``) are
each replaced by their quantized graph; everything else, the detection heads' convs and post-processing
included, stays float32, so box decoding keeps its precision.

Scheme: activations per-tensor affine uint8 from min/max observers (``observer="minmax"``, the default; or
``"histogram"``, the quantizer's own choice, which clips outliers), weights per-output-channel symmetric int8
(min/max). The converted graph holds quantize/dequantize pairs around float ops: in eager mode it is a
simulation, slower than float; the int8 kernels come from ``torch.compile`` (inductor), see
:func:`compare_fp32_int8`. Graphs are exported with dynamic batch, height and width.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from detkit.utils.timing import median_ms

DEFAULT_PARTS = ("backbone", "spp", "neck")
OBSERVERS = ("minmax", "histogram")


def _pt2e():
    try:
        from torchao.quantization.pt2e import quantizer as quantizer_module
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise ImportError("int8 quantization needs the torchao package: pip install 'detkit[quant]' "
                          f"(or pip install torchao) ({error})") from None
    return x86, quantizer_module, prepare_pt2e, prepare_qat_pt2e, convert_pt2e


def quantization_config(observer: str = "minmax", qat: bool = False):
    """X86 inductor quantization config: uint8 per-tensor affine activations observed by ``observer``
    (min/max by default), int8 per-channel symmetric weights; ``qat`` gives fake-quantize modules instead."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    x86, quantizer_module, *_ = _pt2e()
    import torchao.quantization.pt2e as pt2e

    config = x86.get_default_x86_inductor_quantization_config(is_qat=qat)
    if observer == "histogram" or qat:
        return config
    act = config.input_activation
    minmax = quantizer_module.QuantizationSpec(
        dtype=act.dtype, quant_min=act.quant_min, quant_max=act.quant_max, qscheme=act.qscheme,
        is_dynamic=False, observer_or_fake_quant_ctr=pt2e.MinMaxObserver.with_args(eps=2**-12),
    )
    return x86.QuantizationConfig(minmax, minmax, config.weight, config.bias, config.is_qat)


def _allow_train_eval(graph: nn.Module) -> nn.Module:
    """Let ``model.train()`` / ``model.eval()`` reach an exported graph (torchao then swaps its dropout and
    batch-norm ops), so that a detector holding one still switches modes as a whole."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    return allow_exported_model_train_eval(graph)


def _present_parts(model: nn.Module, parts: Iterable[str]) -> list[str]:
    names = [p for p in parts if getattr(model, p, None) is not None]
    if not names:
        raise ValueError(f"the model has none of the submodules {list(parts)} to quantize; pass parts=[...] "
                         "with names of its feature-extraction submodules")
    return names


@torch.no_grad()
def _record_inputs(model: nn.Module, names: list[str], forward, batches: Sequence[Tensor]) -> dict[str, list]:
    """The positional inputs each named submodule receives while ``forward`` runs on each batch."""
    recorded: dict[str, list] = {name: [] for name in names}
    handles = [getattr(model, name).register_forward_pre_hook(
        lambda _m, args, name=name: recorded[name].append(copy.deepcopy(args))) for name in names]
    try:
        for images in batches:
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _dynamic_shapes(args: tuple):
    auto = torch.export.Dim.AUTO

    def spec(value):
        if isinstance(value, Tensor):
            return {0: auto, 2: auto, 3: auto} if value.dim() == 4 else None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        return None

    return tuple(spec(a) for a in args)


def quantize_features(model: nn.Module, calibration: Sequence[Tensor], parts: Iterable[str] = DEFAULT_PARTS,
                      observer: str = "minmax", forward=None) -> nn.Module:
    """A copy of ``model`` whose submodules ``parts`` are int8 (static PTQ); ``model`` is left unchanged.

    Args:
        model: a detector (eval mode is set on the copy).
        calibration: image batches (B, 3, H, W), preprocessed as the model's input; a few tens of images
            fix the activation ranges.
        parts: names of direct submodules to quantize (absent or None ones are skipped).
        observer: activation observer, ``"minmax"`` or ``"histogram"`` (see :func:`quantization_config`).
        forward: how to run the model on a batch (default ``model.raw_outputs`` if it has one, else the model).
    """
    if not calibration:
        raise ValueError("quantize_features needs at least one calibration batch")
    x86, _, prepare_pt2e, _, convert_pt2e = _pt2e()
    quantized = copy.deepcopy(model).eval()
    names = _present_parts(quantized, parts)
    run = forward or getattr(quantized, "raw_outputs", quantized)
    recorded = _record_inputs(quantized, names, run, calibration)
    quantizer = x86.X86InductorQuantizer().set_global(quantization_config(observer))
    for name in names:
        inputs = recorded[name]
        exported = torch.export.export(getattr(quantized, name), inputs[0],
                                       dynamic_shapes=_dynamic_shapes(inputs[0])).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for args in inputs:
                prepared(*args)
        setattr(quantized, name, _allow_train_eval(convert_pt2e(prepared)))
    return quantized


def prepare_qat(model: nn.Module, example: Tensor, parts: Iterable[str] = DEFAULT_PARTS, forward=None) -> nn.Module:
    """Quantization-aware fine-tuning: a copy of ``model`` whose ``parts`` carry fake-quantize modules
    (train it with the normal trainer), to be finished by :func:`convert_qat`. ``example``: one input batch."""
    x86, _, _, prepare_qat_pt2e, _ = _pt2e()
    qat = copy.deepcopy(model)
    names = _present_parts(qat, parts)
    was_training = qat.training
    recorded = _record_inputs(qat.eval(), names, forward or getattr(qat, "raw_outputs", qat), [example])
    quantizer = x86.X86InductorQuantizer().set_global(quantization_config(qat=True))
    for name in names:
        args = recorded[name][0]
        exported = torch.export.export(getattr(qat, name).train(), args, dynamic_shapes=_dynamic_shapes(args))
        setattr(qat, name, _allow_train_eval(prepare_qat_pt2e(exported.module(), quantizer)))
    return qat.train(was_training)


def convert_qat(model: nn.Module, parts: Iterable[str] = DEFAULT_PARTS) -> nn.Module:
    """Replace the fake-quantized ``parts`` of a :func:`prepare_qat` model by their int8 graphs (in place)."""
    _, _, _, _, convert_pt2e = _pt2e()
    from torchao.quantization.pt2e import move_exported_model_to_eval

    for name in _present_parts(model, parts):
        graph = move_exported_model_to_eval(getattr(model, name))
        setattr(model, name, _allow_train_eval(convert_pt2e(graph)))
    return model.eval()


def output_agreement(reference: Sequence[Tensor], other: Sequence[Tensor]) -> dict[str, float]:
    """How close two lists of raw outputs are: Pearson correlation over all elements, the largest absolute
    difference, and the RMS difference relative to the RMS of ``reference``."""
    a = torch.cat([t.detach().float().flatten() for t in reference])
    b = torch.cat([t.detach().float().flatten() for t in other])
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in size: {a.numel()} vs {b.numel()} elements")
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return {"correlation": correlation, "max_abs_diff": (a - b).abs().max().item(),
            "relative_rms": ((a - b).square().mean().sqrt() / a.square().mean().sqrt().clamp(min=1e-12)).item()}


def compare_fp32_int8(model: nn.Module, quantized: nn.Module, images: Tensor, compile: bool = True,
                      runs: int = 20) -> dict[str, float]:
    """CPU latency (median seconds per batch of ``images``) of the float and int8 models' raw outputs,
    compiled with inductor when ``compile`` (the int8 kernels need it), and their output agreement
    (:func:`output_agreement`, per-channel means removed so that the heads' constant biases do not inflate
    the correlation). Run it on an otherwise idle machine."""
    model, quantized = model.eval(), quantized.eval()
    runners = {"fp32": model.raw_outputs, "int8": quantized.raw_outputs}
    if compile:
        runners = {name: torch.compile(run) for name, run in runners.items()}
    with torch.no_grad():
        agreement = output_agreement(*[[t - t.mean((0, 2, 3), keepdim=True) for t in run(images)]
                                       for run in (model.raw_outputs, quantized.raw_outputs)])
    # freezing folds the weights into constants so that inductor fuses quantize → conv → dequantize into
    # oneDNN int8 convolutions (without it the q/dq ops run decomposed, in float)
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True), torch.no_grad():
        # 3 warm-up calls: compilation happens there
        result = {f"{name}_latency_s": median_ms(lambda run=run: run(images), runs, warmup=3) / 1000
                  for name, run in runners.items()}
    return {**result, **agreement}
