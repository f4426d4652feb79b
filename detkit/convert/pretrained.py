"""Where a backbone's ``pretrained=`` points: a local state-dict file, or a torchvision weights name.

``pretrained`` is either a path to a file written by ``torch.save(state_dict)`` (read with
``weights_only=True``), or the name of a torchvision weights enum entry such as
``ResNet50_Weights.IMAGENET1K_V1`` or ``VGG16_Weights.IMAGENET1K_FEATURES``. A name resolves through
torchvision's own cache and download (``$TORCH_HOME/hub/checkpoints``): on a user's machine it downloads once;
detkit's tests and main job never name one. A path that exists wins over a name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from detkit.errors import UserError


class PretrainedError(UserError, ValueError):
    """A ``pretrained=`` value that is neither a readable state-dict file nor a torchvision weights name."""


def is_weights_name(spec: str) -> bool:
    """Whether ``spec`` looks like a torchvision weights name (``Enum.ENTRY``) rather than a file path."""
    head, dot, entry = spec.partition(".")
    return bool(dot) and head.endswith("_Weights") and entry.isidentifier() and "/" not in spec


def load_state_dict(spec: str | Path, progress: bool = True) -> dict[str, Tensor]:
    """The state dict ``spec`` names: a local file (loaded with ``weights_only=True``), else a torchvision
    weights name resolved by torchvision (its cache first, then its download)."""
    path = Path(spec)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise PretrainedError(f"{path}: not a state dict of tensors (torch.save(model.state_dict(), path))")
        return state
    if not is_weights_name(str(spec)):
        raise PretrainedError(f"pretrained={spec!r}: no such file, and not a torchvision weights name "
                              "(e.g. ResNet50_Weights.IMAGENET1K_V1)")
    from torchvision.models import get_weight

    try:
        weights = get_weight(str(spec))
    except (ValueError, KeyError) as err:
        raise PretrainedError(f"pretrained={spec!r}: torchvision has no such weights ({err})") from None
    return weights.get_state_dict(progress=progress, check_hash=True)


def load_prefixed(module: nn.Module, spec: str | Path, prefix: str = "features.") -> None:
    """Copy the ``prefix`` entries of the state dict ``spec`` names (:func:`load_state_dict`) into ``module``,
    whose own keys are those entries without ``prefix``: every key of ``module`` must be there with its shape
    (entries past the module, such as the layers of a classifier it leaves out, are ignored); otherwise a
    :class:`PretrainedError` names the first keys missing or of another shape."""
    state = load_state_dict(spec)
    found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    # BatchNorm's step counter is absent from state dicts saved before torch 0.4.1, as some published files are
    missing = [k for k in own if k not in found and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(found[k].shape)} for {tuple(v.shape)}" for k, v in own.items()
             if k in found and found[k].shape != v.shape]
    if missing or wrong:
        problems = ([f"missing {', '.join(prefix + k for k in missing[:3])}"] if missing else []) + \
                   ([f"shapes {', '.join(prefix + w for w in wrong[:3])}"] if wrong else [])
        raise PretrainedError(f"pretrained={spec}: not this architecture's weights ({'; '.join(problems)})")
    module.load_state_dict({k: found[k] if k in found else v for k, v in own.items()})
