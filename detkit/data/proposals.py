"""External region proposals (Selective Search, EdgeBoxes, an RPN's output) as a COCO-style json file.

The file is a list of ``{"image_id": int, "bbox": [x, y, w, h], "score": float (optional)}``, the format of
COCO's detection results, boxes in pixels of the original image. Inside detkit proposals are xyxy tensors per
image id; a proposal file that does not follow the format is rejected with its path and the offending entry.

A dataset delivers them (``data.proposals_file``): :class:`WithProposals` puts each image's proposals in its
:class:`~detkit.data.sample.Sample`, the transforms map them with the boxes into network-input pixels, and the
target carries them as ``proposals``; the model never sees the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detkit.data.sample import DatasetWrapper, Sample
from detkit.errors import UserError

__all__ = ["ProposalFileError", "load_proposals", "save_proposals", "proposals_for", "WithProposals"]


class ProposalFileError(UserError, ValueError):
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


class WithProposals(DatasetWrapper):
    """Dataset wrapper: each sample gets its image's proposals from the json at ``path`` (original image pixels,
    found by ``image_id``), which the dataset's transforms map like its boxes (letterbox, scale, shift, flip:
    :func:`~detkit.data.transforms.place_proposals`); ``dataset[i]`` is then ``(image, target)`` with
    ``target["proposals"]`` (P, 4) float32 xyxy pixels of ``image``.

    ``dataset`` is a reader (``get_sample(index)``, ``transforms``, ``image_ids``). An image of the dataset
    without proposals in the file raises :class:`ProposalFileError` naming the file and the image id, here
    rather than at its first batch.
    """

    def __init__(self, dataset, path: str | Path) -> None:
        super().__init__(dataset)
        self.path = str(path)
        self.proposals = load_proposals(path)
        missing = [i for i in dataset.image_ids if len(self.proposals.get(int(i), ())) == 0]
        if missing:
            more = f" (and {len(missing) - 1} other images of the dataset)" if len(missing) > 1 else ""
            raise ProposalFileError(f"proposals file {self.path!r} has no proposals for image_id {missing[0]}{more}")

    def get_sample(self, index: int) -> Sample:
        sample = self.dataset.get_sample(index)
        sample.proposals = proposals_for(self.proposals, sample.image_id, self.path).numpy()
        return sample

    def __getitem__(self, index: int) -> Any:
        sample = self.get_sample(index)
        transforms = self.dataset.transforms
        return transforms(sample, index) if transforms else sample
