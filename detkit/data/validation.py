"""Dataset problems shared by every reader: where a defect is, what it is, and the error that lists them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detkit.errors import UserError

ON_INVALID = ("error", "drop")
UNREADABLE_JSON = ("malformed JSON", "bad top-level structure")  # kinds that on_invalid="drop" cannot mend


@dataclass(frozen=True)
class Problem:
    """One defect of a dataset, located by file, image and annotation.

    ``file`` is the annotation file (COCO json, VOC xml, YOLO txt), or the image file for problems of the image
    file itself; ``kind`` is a short class of the problem ("zero or negative box size") used to count problems.
    ``record`` names the record inside ``file`` when it is not a COCO annotation id ("object 2", "line 5");
    ``ann_id`` then holds its number.
    """

    file: str
    image_id: int | None
    ann_id: int | None
    message: str
    file_name: str | None = None
    kind: str = ""
    record: str | None = None

    def __str__(self) -> str:
        where = []
        if self.image_id is not None:
            where.append(f"image {self.image_id}" + (f" ({self.file_name!r})" if self.file_name else ""))
        if self.record:
            where.append(self.record)
        elif self.ann_id is not None:
            where.append(f"annotation {self.ann_id}")
        return ": ".join([Path(self.file).name, *([", ".join(where)] if where else []), self.message])


def count_kinds(problems: list[Problem]) -> str:
    """``"2 × zero or negative box size, 1 × missing image file"``, most frequent first."""
    kinds = Counter(p.kind or p.message for p in problems)
    return ", ".join(f"{n} × {kind}" for kind, n in kinds.most_common())


class DatasetError(UserError, ValueError):
    """All problems found in a dataset: a summary line, then the first ``shown`` problems one per line."""

    def __init__(self, file: str | Path, problems: list[Problem], shown: int = 20) -> None:
        self.file, self.problems, self.shown = str(file), list(problems), shown
        n, k = len(problems), len({p.kind or p.message for p in problems})
        lines = [f"{n} problem{'s' * (n != 1)} in {file} ({k} kind{'s' * (k != 1)}: {count_kinds(problems)})"]
        lines += [f"  {p}" for p in problems[:shown]]
        lines += [f"  ... and {n - shown} more"] if n > shown else []
        if any(p.kind not in UNREADABLE_JSON for p in problems):
            lines.append("Fix the data, or pass on_invalid='drop' (data.on_invalid=drop) to drop what is "
                         "invalid with a warning.")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable (DataLoader workers) despite the custom signature
        return type(self), (self.file, self.problems, self.shown)


def image_file_problem(path: Path, width: float, height: float) -> tuple[str, str] | None:
    """(kind, message) of a missing, unreadable or wrongly sized image file; None if it looks fine.

    PIL reads the header and ``verify()`` checks PNG chunk CRCs, decoding no pixels. Only a JPEG without
    an end-of-image marker in its last KiB is decoded, to tell truncation from harmless trailing bytes.
    """
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(f.seek(0, 2) - 1024, 0))
                truncated = b"\xff\xd9" not in f.read()
            if truncated:
                with Image.open(path) as im:
                    im.load()
    except FileNotFoundError:
        return "missing image file", f"image file missing: {path}"
    except Exception as exc:  # PIL raises many types for corrupt files
        return "unreadable image", f"image file unreadable: {path} ({type(exc).__name__}: {exc})"
    if size != (width, height):
        return "image size mismatch", (
            f"image size mismatch: file is {size[0]}x{size[1]}, annotation says {width}x{height}")
    return None
