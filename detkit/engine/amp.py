"""Mixed precision: the training loop under autocast, with loss scaling for float16 (detectron2's
``AMPTrainer``)."""

from __future__ import annotations

import torch

from detkit.engine.trainer import Trainer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA, or a CPU with AVX512-BF16/AMX): elsewhere bf16 is
    emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(precision, autocast dtype or None) for a ``trainer.precision`` setting on ``device``: ``auto`` becomes
    bf16 where :func:`native_bf16`, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return precision, PRECISIONS[precision]


class AMPTrainer(Trainer):
    """:class:`Trainer` whose forward pass runs under autocast.

    ``precision``: ``fp32`` (no autocast), ``bf16`` (convolutions in bfloat16; weights, optimizer and the
    detectors' own float32 casts untouched; no loss scaling is needed with bf16's float32 range), ``fp16``
    (float16 autocast with dynamic loss scaling by ``torch.amp.GradScaler``, saved in checkpoints; for GPUs
    without bf16) or ``auto`` (bf16 where :func:`native_bf16`, else fp32). Other arguments: :class:`Trainer`'s.
    """

    def __init__(self, *args, precision: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.precision, self.autocast_dtype = resolve_precision(precision, self.device)
        # a disabled scaler passes everything through unchanged
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def forward_context(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def gradients_ready(self) -> None:
        self.scaler.unscale_(self.optimizer)  # hooks and clipping see the true gradients

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)  # (skipped by an fp16 scaler when the gradients overflowed)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
