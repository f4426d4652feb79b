"""External region proposals (Selective Search, EdgeBoxes, an RPN's output) as a COCO-style json file.

The file is a list of ``{"image_id": int, "bbox": [x, y, w, h], "score": float (optional)}``, the format of
COCO's detection results, boxes in pixels of the original image. Inside detkit proposals are xyxy tensors per
image id; a proposal file that does not follow the format is rejected with its path and the offending entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ProposalFileError", "load_proposals", "save_proposals", "proposals_for"]


class ProposalFileError(ValueError):
    """A proposals json that cannot be used; the message names the file and the entry or image id."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object with 'image_id' and 'bbox'"
    image_id = entry.get("image_id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        return f"has image_id {image_id!r}; expected an integer"
    bbox = entry.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        return f"(image_id {image_id}) has bbox {bbox!r}; expected [x, y, w, h], four finite numbers"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"(image_id {image_id}) has bbox {bbox!r} with zero or negative width or height"
    if "score" in entry and not _number(entry["score"]):
        return f"(image_id {image_id}) has score {entry['score']!r}; expected a finite number"
    return None


def load_proposals(path: str | Path, with_scores: bool = False) -> dict[int, Tensor]:
    """Read a proposals json → {image_id: (N, 4) xyxy float32 pixel boxes}, in file order per image.

    With ``with_scores`` each value is (N, 5): the boxes then the score (0 where the entry has none).
    Raises :class:`ProposalFileError` naming ``path`` and the first bad entry (index and image id), or
    FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proposals file {str(path)!r} does not exist")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProposalFileError(f"proposals file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise ProposalFileError(f"proposals file {str(path)!r} must hold a list of {{'image_id', 'bbox'}} "
                                f"entries, got a {type(entries).__name__}")
    rows: dict[int, list[list[float]]] = {}
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            raise ProposalFileError(f"proposals file {str(path)!r}: entry {i} {problem}")
        x, y, w, h = entry["bbox"]
        rows.setdefault(entry["image_id"], []).append([x, y, x + w, y + h, entry.get("score", 0.0)])
    width = 5 if with_scores else 4
    return {k: torch.tensor(v, dtype=torch.float32)[:, :width] for k, v in rows.items()}


def save_proposals(path: str | Path, proposals: Mapping[int, Tensor]) -> None:
    """Write {image_id: (N, 4) xyxy boxes, or (N, 5) with a score column} as a proposals json."""
    entries = []
    for image_id, boxes in proposals.items():
        for row in boxes.tolist():
            x1, y1, x2, y2 = row[:4]
            entry = {"image_id": int(image_id), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if len(row) > 4:
                entry["score"] = row[4]
            entries.append(entry)
    Path(path).write_text(json.dumps(entries))


def proposals_for(proposals: Mapping[int, Tensor], image_id: int, path: str | Path = "<proposals>") -> Tensor:
    """The (N, 4) boxes of ``image_id``; a ProposalFileError naming the file and the image id if it has none."""
    boxes = proposals.get(int(image_id))
    if boxes is None or len(boxes) == 0:
        raise ProposalFileError(f"proposals file {str(path)!r} has no proposals for image_id {int(image_id)}")
    return boxes[:, :4]
