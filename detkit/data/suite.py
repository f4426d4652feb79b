"""The generalization suite: generated COCO datasets unlike the built-in digits, to test a recipe on data it
was not tuned on.

Each kind differs from :mod:`detkit.data.builtin` in what its objects are (shapes, letters, textured patches),
their size (tiny, up to most of the image), their density, the image size and aspect, and the class count
(:data:`KINDS`). Backgrounds, clutter, contrast-aware alpha pasting, JPEG noise and the atomic, fingerprinted
writing are the built-in dataset's; only the objects are drawn here (with PIL and numpy, nothing downloaded).
Image ``index`` of split ``s`` takes its randomness from ``SeedSequence([seed, kind.number, s, index])``, so the
same seed gives the same bytes whatever the number of worker processes.

Layout under ``root``: the built-in one (``images/{train,val}``, ``annotations/instances_{train,val}.json``,
``.complete``), plus ``images/tune`` and ``annotations/instances_tune.json`` when ``num_tune`` > 0: a split held
out from training to choose settings on, so that ``val`` scores the final recipe only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detkit.data.builtin import background, background_photos, draw_clutter, encode_jpeg, place
from detkit.data.generated import ensure_complete, write_atomically, write_coco_split
from detkit.errors import ConfigError

SUITE_VERSION = 1
SPLITS = ("train", "val", "tune")
_SUPERSAMPLE = 8
_LETTERS = "ABDEFGHKMNPQRSTVWXYZ"  # C I J L O U left out: the built-in clutter draws arcs, rings and curves


def _tight_box(mask: np.ndarray) -> np.ndarray | None:
    """Float64 (4,) xyxy box around the pixels of ``mask`` (h, w) with alpha >= 0.3, or None if there are none."""
    rows, cols = np.flatnonzero(mask.max(1) >= 0.3), np.flatnonzero(mask.max(0) >= 0.3)
    if len(rows) == 0 or len(cols) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _outline(name: str, angle: float) -> list[tuple[float, float]] | None:
    """The polygon of shape ``name`` in [-1, 1]², rotated by ``angle`` radians; None for the round shapes."""
    if name in ("disc", "ring"):
        return None
    if name == "square":
        points = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    elif name == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in -math.pi / 2 + np.arange(3) * 2 * math.pi / 3]
    elif name == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, np.arange(10) * math.pi / 5, strict=True)]
    elif name == "cross":
        a, b = 0.22, 1.0
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                  (-a, -a)]
    else:
        raise ValueError(f"unknown shape {name!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def shape_mask(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
    """Soft float32 alpha mask (h, w) of shape ``name`` whose longer side is ``size`` pixels, randomly rotated
    (squares by ±15° only) and squeezed to 75–100% across, with a 1-pixel margin; drawn at 8× and averaged
    down, so even a 4-pixel shape has anti-aliased edges."""
    squeeze = rng.uniform(0.75, 1.0)
    w, h = (size, size * squeeze) if rng.random() < 0.5 else (size * squeeze, size)
    angle = rng.uniform(-math.pi / 12, math.pi / 12) if name == "square" else rng.uniform(0, 2 * math.pi)
    out_w, out_h = max(round(w), 2) + 2, max(round(h), 2) + 2
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (out_w * ss, out_h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, rx, ry = out_w * ss / 2, out_h * ss / 2, (out_w - 2) * ss / 2, (out_h - 2) * ss / 2
    points = _outline(name, angle)
    if points is None:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        if name == "ring":
            draw.ellipse((cx - 0.55 * rx, cy - 0.55 * ry, cx + 0.55 * rx, cy + 0.55 * ry), fill=0)
    else:
        # scaled so that the rotated polygon spans the box: the shape keeps its size whatever the angle
        extent_x = max(abs(x) for x, _ in points)
        extent_y = max(abs(y) for _, y in points)
        draw.polygon([(cx + x / extent_x * rx, cy + y / extent_y * ry) for x, y in points], fill=255)
    mask = np.asarray(canvas, dtype=np.float32) / 255
    return cv2.resize(mask, (out_w, out_h), interpolation=cv2.INTER_AREA)


@lru_cache(maxsize=64)
def _letter_glyph(letter: str, stroke: int) -> np.ndarray:
    """Float32 alpha glyph of ``letter`` (~64 px tall) in PIL's default font, cropped tight."""
    try:
        font = ImageFont.load_default(size=64)
    except TypeError:  # Pillow < 10.1: the small bitmap font only, upscaled by the caller
        font = ImageFont.load_default()
    canvas = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(canvas).text((40, 40), letter, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    glyph = np.asarray(canvas, dtype=np.float32) / 255
    box = _tight_box(glyph).astype(int)
    return glyph[box[1] : box[3], box[0] : box[2]]


def letter_mask(rng: np.random.Generator, letter: str, size: float) -> np.ndarray:
    """Soft float32 alpha mask (h, w) of ``letter`` ``size`` pixels tall in a random weight, width (70–120%)
    and slant (±10°), with a margin of 8% of its height."""
    glyph = _letter_glyph(letter, int(rng.integers(0, 4)))
    h = max(round(size), 4)
    w = max(round(h * glyph.shape[1] / glyph.shape[0] * rng.uniform(0.7, 1.2)), 2)
    shrink = h < glyph.shape[0]
    mask = cv2.resize(glyph, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    pad = max(round(0.08 * h), 1)
    mask = np.pad(np.clip(mask, 0, 1), pad)
    rotation = cv2.getRotationMatrix2D((mask.shape[1] / 2, mask.shape[0] / 2), rng.uniform(-10, 10), 1.0)
    return cv2.warpAffine(mask, rotation, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_LINEAR)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Texture ``name`` in [0, 1] at rotated pixel coordinates ``u``, ``v`` (h, w) with ``period`` pixels."""
    phase_u, phase_v = 2 * np.pi * u / period, 2 * np.pi * v / period
    if name == "stripes":
        return 0.5 + 0.5 * np.clip(2 * np.cos(phase_u), -1, 1)
    if name == "checker":
        return 0.5 + 0.5 * np.clip(3 * np.cos(phase_u) * np.cos(phase_v), -1, 1)
    if name == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return np.clip(0.3 * period - np.hypot(du, dv) + 0.5, 0, 1)
    if name == "rings":
        return 0.5 + 0.5 * np.clip(2 * np.cos(2 * np.pi * np.hypot(u, v) / period), -1, 1)
    if name == "grid":
        line_u = np.clip(1.5 - np.abs((u % period) - period / 2), 0, 1)
        line_v = np.clip(1.5 - np.abs((v % period) - period / 2), 0, 1)
        return np.maximum(line_u, line_v)
    raise ValueError(f"unknown texture {name!r}")


def texture_mask(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
    """Soft float32 alpha mask (h, w) of a patch (ellipse or rectangle, 60–100% as wide as tall, any way up)
    ``size`` pixels long, fully opaque where the texture ``name`` (period a 3rd to a 5th of the patch, ≥ 4 px,
    any angle) is on and 40% opaque where it is off, with a 1-pixel margin."""
    squeeze = rng.uniform(0.6, 1.0)
    w, h = (size, size * squeeze) if rng.random() < 0.5 else (size * squeeze, size)
    out_w, out_h = max(round(w), 3) + 2, max(round(h), 3) + 2
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32) + 0.5
    xs, ys = xs - out_w / 2, ys - out_h / 2
    half_w, half_h = (out_w - 2) / 2, (out_h - 2) / 2
    if rng.random() < 0.5:  # ellipse: 1 inside, fading over one pixel at the border
        radius = np.hypot(xs / half_w, ys / half_h)
        body = np.clip((1 - radius) * min(half_w, half_h) + 0.5, 0, 1)
    else:
        body = np.clip(np.minimum(half_w - np.abs(xs), half_h - np.abs(ys)) + 0.5, 0, 1)
    theta = rng.uniform(0, math.pi)
    u = xs * math.cos(theta) + ys * math.sin(theta) + rng.uniform(0, 100)
    v = -xs * math.sin(theta) + ys * math.cos(theta) + rng.uniform(0, 100)
    period = max(size / rng.uniform(3, 5), 4.0)
    if name == "rings":  # concentric around the patch's centre
        u, v = u - u[out_h // 2, out_w // 2], v - v[out_h // 2, out_w // 2]
    return (body * (0.4 + 0.6 * _pattern(name, u, v, period))).astype(np.float32)


def draw_scribbles(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draw ``count`` unannotated distractors in place on float32 (H, W, 3) ``image``: long straight or waving
    thin strokes, nothing closed, so none can pass for a shape of the suite."""
    h, w = image.shape[:2]
    for _ in range(count):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        length = rng.uniform(0.15, 0.6) * max(h, w)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.linspace(-0.5, 0.5, 24)
        bend = rng.uniform(0, 0.15) * length * np.sin(2 * math.pi * (rng.uniform(0.5, 1.5) * t + rng.random()))
        theta = rng.uniform(0, 2 * math.pi)
        xs = cx + t * length * math.cos(theta) - bend * math.sin(theta)
        ys = cy + t * length * math.sin(theta) + bend * math.cos(theta)
        pts = np.stack([xs, ys], 1).astype(np.int32)
        cv2.polylines(image, [pts], False, color, int(rng.integers(1, 3)), cv2.LINE_AA)


@dataclass(frozen=True)
class Kind:
    """One dataset of the suite. Object sizes are the longer side of the drawn object, log-uniform in
    ``sizes``: pixels, or fractions of the image's shorter side when ``relative``."""

    number: int                    # in every image's seed: kinds never share random numbers
    family: str                    # shapes | letters | textures
    classes: tuple[str, ...]
    category_ids: tuple[int, ...]  # deliberately non-contiguous
    widths: tuple[int, int]        # image width, uniform
    aspects: tuple[float, float]   # width / height, uniform
    objects: tuple[int, int]       # objects per image, uniform (fewer when placement fails)
    sizes: tuple[float, float]
    relative: bool
    clutter: tuple[int, int]       # unannotated distractors per image, uniform
    empty_fraction: float          # images without objects
    tries: int                     # placements tried per object before it is left out
    tests: str                     # what the kind tests, for the README table


KINDS: dict[str, Kind] = {
    "tiny": Kind(1, "shapes", ("disc", "square", "triangle", "cross"), (5, 10, 15, 20), (320, 416), (1.0, 1.4),
                 (4, 24), (4, 16), False, (2, 8), 0.05, 8, "tiny objects, many per image, 4 classes"),
    "large": Kind(2, "letters", tuple(_LETTERS), tuple(ord(c) for c in _LETTERS), (160, 224), (0.8, 1.25),
                  (1, 3), (0.3, 0.95), True, (0, 4), 0.05, 8, "large objects in small images, 20 classes"),
    "crowded": Kind(3, "textures", ("stripes", "checker", "dots", "rings", "grid"), (2, 5, 8, 11, 14),
                    (288, 352), (0.9, 1.1), (20, 60), (12, 36), False, (0, 4), 0.0, 24,
                    "20–60 objects per image told apart by texture"),
    "wide": Kind(4, "shapes", ("star", "ring", "cross"), (7, 14, 21), (512, 640), (2.0, 2.0), (2, 12), (12, 160),
                 False, (2, 8), 0.05, 8, "wide 2:1 images, sizes over a 13× range, 3 classes"),
}
_DRAW: dict[str, Callable[[np.random.Generator, str, float], np.ndarray]] = {
    "shapes": shape_mask, "letters": letter_mask, "textures": texture_mask}


def render_suite_image(kind: str, seed: int, split: int, index: int
                       ) -> tuple[bytes, int, int, list[tuple[np.ndarray, int]]]:
    """Draw image ``index`` of split number ``split`` (0 train, 1 val, 2 tune) of ``kind`` for ``seed``.

    Returns (JPEG bytes, width, height, objects), each object being (float64 (4,) xyxy box in absolute pixels,
    tight around the object where its alpha >= 0.3; 0-based class index), like the built-in
    :func:`~detkit.data.builtin.render_image`. Objects lie wholly inside the image; each has IoU <= 0.25 with,
    and is covered <= 35% by, the objects drawn after it.
    """
    spec = KINDS[kind]
    rng = np.random.default_rng(np.random.SeedSequence([seed, spec.number, split, index]))
    width = int(rng.integers(spec.widths[0], spec.widths[1] + 1))
    height = int(round(width / rng.uniform(*spec.aspects)))
    image = np.ascontiguousarray(background(rng, width, height))
    clutter = draw_scribbles if spec.family == "shapes" else draw_clutter
    clutter(rng, image, int(rng.integers(spec.clutter[0], spec.clutter[1] + 1)))
    count = 0 if rng.random() < spec.empty_fraction else int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    scale = min(width, height) if spec.relative else 1.0
    log_range = (math.log(spec.sizes[0] * scale), math.log(spec.sizes[1] * scale))
    placed: list[np.ndarray] = []
    objects = []
    for _ in range(count):
        label = int(rng.integers(len(spec.classes)))
        for _attempt in range(spec.tries):  # rejection sampling; giving up means one object fewer
            mask = _DRAW[spec.family](rng, spec.classes[label], math.exp(rng.uniform(*log_range)))
            tight = _tight_box(mask)
            if tight is None or mask.shape[0] > height or mask.shape[1] > width:
                continue
            box = place(rng, image, mask, tight, placed)
            if box is not None:
                objects.append((box, label))
                break
    return encode_jpeg(rng, image), width, height, objects


def _render_task(args: tuple[str, int, int, int]) -> tuple[bytes, int, int, list]:
    return render_suite_image(*args)


def _preload() -> None:
    background_photos()


def _check(kind: str, counts: tuple[int, int, int]) -> Kind:
    if kind not in KINDS:
        raise ConfigError(f"kind={kind}: not a suite dataset; choose one of {', '.join(KINDS)} (or builtin)")
    if min(counts) < 0:
        raise ConfigError(f"image counts must be >= 0, got {counts}")
    return KINDS[kind]


def _fingerprint(kind: str, num_train: int, num_val: int, num_tune: int, seed: int) -> dict:
    return {"generator": "suite", "kind": kind, "version": SUITE_VERSION, "num_train": num_train,
            "num_val": num_val, "num_tune": num_tune, "seed": seed}


def generate_suite(kind: str, root: str | Path, num_train: int = 600, num_val: int = 150, num_tune: int = 100,
                   seed: int = 0, workers: int = 2) -> Path:
    """Write suite dataset ``kind`` to ``root``, replacing whatever is there, and return ``root``. The bytes
    depend only on the parameters, not on ``workers``; a ``tune`` split is written when ``num_tune`` > 0."""
    spec = _check(kind, (num_train, num_val, num_tune))
    categories = [{"id": c, "name": n, "supercategory": spec.family}
                  for c, n in zip(spec.category_ids, spec.classes, strict=True)]

    def write(folder: Path, pool) -> None:
        for split, count in enumerate((num_train, num_val, num_tune)):
            if split == 2 and count == 0:
                continue
            tasks = [(kind, seed, split, i) for i in range(count)]
            results = pool.imap(_render_task, tasks, chunksize=8) if pool else map(_render_task, tasks)
            info = {"description": f"detkit generalization suite, {kind} ({spec.tests}), {SPLITS[split]} split",
                    "version": str(SUITE_VERSION), "seed": seed}
            write_coco_split(folder, SPLITS[split], results, categories, info)

    total = num_train + num_val + num_tune
    return write_atomically(root, write, _fingerprint(kind, num_train, num_val, num_tune, seed), _preload,
                            workers if total > 1 else 1)


def ensure_suite(kind: str, root: str | Path, num_train: int = 600, num_val: int = 150, num_tune: int = 100,
                 seed: int = 0, workers: int = 2) -> Path:
    """Generate suite dataset ``kind`` into ``root`` unless it already holds a complete one with these
    parameters (``workers`` does not change the output). Returns ``root``."""
    _check(kind, (num_train, num_val, num_tune))
    return ensure_complete(
        root, _fingerprint(kind, num_train, num_val, num_tune, seed),
        lambda: generate_suite(kind, root, num_train, num_val, num_tune, seed, workers),
        f"generating the suite dataset {kind} into {root} ({num_train} train / {num_tune} tune / {num_val} val "
        f"images, seed {seed})")
