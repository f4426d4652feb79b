"""The built-in dataset: handwritten digits on real photos, written as a standard COCO dataset.

Everything it draws ships inside installed packages (no download): the objects are scikit-learn's 1,797
handwritten 8×8 digits (10 classes), the backgrounds are photos bundled with scikit-image and scikit-learn,
the unannotated distractors are drawn shapes. Each image's randomness comes from
``SeedSequence([seed, split, index])``, so the same seed gives the same bytes whatever the number of worker
processes.

Layout written under ``root``::

    annotations/instances_train.json, annotations/instances_val.json   (COCO, xywh float pixel boxes)
    images/train/000000.jpg ...,       images/val/000000.jpg ...
    .complete                          (written last: JSON fingerprint of the generation parameters)
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from detkit.data.generated import ensure_complete, write_atomically, write_coco_split
from detkit.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
# Deliberately non-contiguous, like COCO's, so the label <-> category id mapping is exercised by default.
CATEGORY_IDS: tuple[int, ...] = tuple(1 + 2 * d for d in range(10))
GENERATOR_VERSION = 3
SPLITS = ("train", "val")
# text.png (handwritten formulas with digits) and page.png (printed text) are left out on purpose: their
# unannotated characters would be digit look-alikes, i.e. label noise.
_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "horse.png", "brick.png",
           "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png",
           "color.png", "coins.png", "camera.png", "moon.png", "ihc.png", "cell.png")
_EMPTY_FRACTION = 0.05
_MAX_OBJECTS = 8
_PLACEMENT_TRIES = 8
_MIN_DIGIT_HEIGHT = 8
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, list[np.ndarray]]:
    """(1797, 8, 8) float32 glyphs in [0, 1] and, per class, the indices of its glyphs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)
    return glyphs, [np.flatnonzero(digits.target == c) for c in range(10)]


@lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """RGB uint8 (H, W, 3) background photos from scikit-image's data folder and scikit-learn's samples.

    Files are read directly from disk (never through ``skimage.data``'s fetchers, which may download).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    folder = Path(os.path.dirname(skimage.data.__file__))
    photos = []
    for name in _PHOTOS:
        path = folder / name
        if path.is_file():
            with Image.open(path) as im:
                photos.append(np.asarray(im.convert("RGB")))
    photos += [np.ascontiguousarray(im[..., :3]) for im in load_sample_images().images]
    if len(photos) < 4:
        raise RuntimeError(f"too few background photos found in {folder} and scikit-learn's sample images")
    return tuple(photos)


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A jittered random crop of a random photo: float32 (height, width, 3) RGB in [0, 255]."""
    photos = background_photos()
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    aspect = width / height * rng.uniform(0.85, 1.15)
    crop_h = max(int(min(ph, pw / aspect) * rng.uniform(0.35, 1.0)), 16)
    crop_w = min(max(int(crop_h * aspect), 16), pw)
    y, x = int(rng.integers(0, ph - crop_h + 1)), int(rng.integers(0, pw - crop_w + 1))
    crop = photo[y : y + crop_h, x : x + crop_w]
    shrink = crop_w > width and crop_h > height
    image = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image.astype(np.float32)
    gray = image.mean(axis=2, keepdims=True)
    image = gray + (image - gray) * np.float32(rng.uniform(0.5, 1.3))  # saturation
    gain = rng.uniform(0.75, 1.25, size=3) * rng.uniform(0.7, 1.2)  # tint and brightness
    return np.clip(image * gain.astype(np.float32), 0, 255)


def draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draw ``count`` unannotated distractors in place on float32 (H, W, 3) ``image``.

    Blobs, rings, wide ellipses, squat rectangles, fat triangles and long curves: nothing is a short
    straight vertical stroke (a "1") or an upright ellipse outline (a "0").
    """
    h, w = image.shape[:2]
    for _ in range(count):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        r = int(math.exp(rng.uniform(math.log(4), math.log(min(h, w) / 4))))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        thick = int(rng.integers(1, max(2, r // 4) + 1))
        filled = rng.random() < 0.5
        kind = int(rng.integers(6))
        if kind == 0:
            cv2.circle(image, (cx, cy), r, color, -1 if filled else thick, cv2.LINE_AA)
        elif kind == 1:  # filled: any orientation but not thin; outline: lying, so never an upright "0"
            ratio = rng.uniform(0.5, 0.9) if filled else rng.uniform(0.3, 0.7)
            angle = rng.uniform(0, 180) if filled else rng.uniform(-30, 30)
            axes = (r, max(int(r * ratio), 2))
            cv2.ellipse(image, (cx, cy), axes, float(angle), 0, 360, color, -1 if filled else thick,
                        cv2.LINE_AA)
        elif kind == 2:
            half_h = max(int(r * rng.uniform(0.6, 1.0)), 2)
            cv2.rectangle(image, (cx - r, cy - half_h), (cx + r, cy + half_h), color, -1 if filled else thick)
        elif kind == 3:  # a jittered equilateral triangle: never a sliver
            angles = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3, 3)
            pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
            if filled:
                cv2.fillPoly(image, [pts], color, cv2.LINE_AA)
            else:
                cv2.polylines(image, [pts], True, color, thick, cv2.LINE_AA)
        elif kind == 4:  # an arc of a circle
            start = float(rng.uniform(0, 360))
            end = start + float(rng.uniform(100, 220))
            cv2.ellipse(image, (cx, cy), (r, r), 0.0, start, end, color, thick, cv2.LINE_AA)
        else:  # a long, waving curve, never steeper than 50° (a near-vertical one could pass for a "1")
            length = rng.uniform(3, 6) * r
            t = np.linspace(-0.5, 0.5, 24)
            phase = 2 * math.pi * (rng.uniform(0.5, 1.2) * t + rng.random())
            along, across = t * length, r * rng.uniform(0.4, 0.8) * np.sin(phase)
            theta = math.radians(rng.uniform(-50, 50))
            xs = cx + along * math.cos(theta) - across * math.sin(theta)
            ys = cy + along * math.sin(theta) + across * math.cos(theta)
            cv2.polylines(image, [np.stack([xs, ys], 1).astype(np.int32)], False, color, thick, cv2.LINE_AA)


def _glyph_alpha(glyph: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Upscale an (8, 8) glyph in [0, 1] to a soft alpha mask whose 8×8 cell is ``w × h`` pixels.

    The glyph gets a one-cell empty margin first, so the (round(1.25 h), round(1.25 w)) mask keeps soft
    edges. Returns (mask, xyxy box tight around alpha ≥ 0.3 in mask pixels), or None if nothing is visible.
    """
    padded = np.pad(glyph, 1)
    mask = cv2.resize(padded, (round(w * 1.25), round(h * 1.25)), interpolation=cv2.INTER_CUBIC)
    mask = np.clip((mask - 0.08) * 1.5, 0, 1)  # crisper strokes than a plain bicubic blur
    rows, cols = np.flatnonzero(mask.max(1) >= 0.3), np.flatnonzero(mask.max(0) >= 0.3)
    if len(rows) == 0 or len(cols) == 0:
        return None
    return mask, np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _luminance_target(rng: np.random.Generator, under: np.ndarray) -> tuple[float, float]:
    """A random (low, high) luminance band for a digit drawn over pixels of luminance ``under`` (N,).

    Preferably the band lies ≥ 70 from their mean and ≥ 20 beyond their 10th (dark digit) or 90th (light
    digit) percentile, so a digit also stands out on a busy background; the darker or lighter side is picked
    at random among the feasible ones. When neither is feasible the background spans most of the range
    (e.g. black and white halves) and the band sits halfway between the two percentiles, ≥ 75 from both.
    """
    mean = float(under.mean())
    low, high = (float(v) for v in np.percentile(under, [10, 90]))
    dark_limit, light_limit = min(mean - 70, low - 20), max(mean + 70, high + 20)
    dark_ok, light_ok = dark_limit >= 0, light_limit <= 255
    if dark_ok and light_ok:
        dark_ok = rng.random() < dark_limit / (dark_limit + 255 - light_limit + 1e-6)
    elif not (dark_ok or light_ok):
        middle = (low + high) / 2
        return middle - 5, middle + 5
    if dark_ok:
        return max(dark_limit - 80, 0.0, mean - 160), dark_limit
    return light_limit, min(light_limit + 80, 255.0, mean + 160)


def _contrasting_color(rng: np.random.Generator, band: tuple[float, float]) -> np.ndarray:
    """A random-hue (3,) float32 RGB colour whose luminance is uniform in ``band``."""
    hue = rng.uniform(0, 6)
    base = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV hue → RGB at S=V=1
    color = 255 * (1 - rng.uniform(0.4, 1.0) * (1 - base))
    lum = float(color @ _LUMA)
    target = rng.uniform(*band) if band[1] > band[0] else band[0]
    if target < lum:
        color = color * target / max(lum, 1e-3)
    else:
        color = color + (255 - color) * (target - lum) / max(255 - lum, 1e-3)
    return np.clip(color, 0, 255).astype(np.float32)


def _digit_fill(rng: np.random.Generator, region: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float32 (h, w, 3) fill for a digit with alpha ``mask`` (h, w) over ``region`` (h, w, 3): solid,
    gradient or texture of colours that all contrast with the region under the glyph on the same side."""
    under = (region @ _LUMA)[mask >= 0.3]
    band = _luminance_target(rng, under if under.size else (region @ _LUMA).ravel())
    first = _contrasting_color(rng, band)
    kind = rng.random()
    if kind < 0.6:
        return np.broadcast_to(first, region.shape)
    second = _contrasting_color(rng, band)
    h, w = region.shape[:2]
    if kind < 0.85:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * math.pi)
        t = np.add.outer(np.arange(h) * math.sin(theta), np.arange(w) * math.cos(theta))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    else:  # blotchy texture: coarse noise, smoothly upsampled
        grid = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6))), dtype=np.float32)
        t = np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
    t = t.astype(np.float32)[..., None]
    return first * (1 - t) + second * t


def paste(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    """Blend a contrasting fill (:func:`_digit_fill`) through alpha ``mask`` (h, w) into float32 (H, W, 3)
    ``image`` in place, the mask's top-left corner at pixel (x0, y0), at a random opacity of 0.85–1."""
    mh, mw = mask.shape
    region = image[y0 : y0 + mh, x0 : x0 + mw]
    fill = _digit_fill(rng, region, mask)
    opacity = (mask * np.float32(rng.uniform(0.85, 1.0)))[..., None]
    region[:] = region * (1 - opacity) + fill * opacity


def overlaps_too_much(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    """True if xyxy ``box`` has IoU > 0.25 with, or covers > 35% of, any earlier box in ``placed``."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_o = (other[2] - other[0]) * (other[3] - other[1])
        if inter / (area + area_o - inter) > 0.25 or inter / area_o > 0.35:
            return True
    return False


def place(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, tight: np.ndarray,
          placed: list[np.ndarray]) -> np.ndarray | None:
    """Try alpha ``mask`` (h, w; no larger than ``image``) at a random position of float32 (H, W, 3) ``image``:
    refused if its ``tight`` xyxy box (mask pixels) would overlap too much a box in ``placed``
    (:func:`overlaps_too_much`), else pasted (:func:`paste`). Returns the box in image pixels, also appended
    to ``placed``, or None when refused."""
    mh, mw = mask.shape
    height, width = image.shape[:2]
    x0, y0 = int(rng.integers(0, width - mw + 1)), int(rng.integers(0, height - mh + 1))
    box = tight + np.array([x0, y0, x0, y0])
    if overlaps_too_much(box, placed):
        return None
    paste(rng, image, mask, x0, y0)
    placed.append(box)
    return box


def render_image(seed: int, split: int, index: int, min_size: int = 256, max_size: int = 320,
                 object_size: tuple[float, float] | None = None, max_objects: int = _MAX_OBJECTS
                 ) -> tuple[bytes, int, int, list[tuple[np.ndarray, int]]]:
    """Draw image ``index`` of split number ``split`` (0 train, 1 val) for ``seed``: 0 (5% of the images) or 1 to
    ``max_objects`` digits whose heights are log-uniform in ``object_size`` (fractions of the image's shorter
    side; None: 8 px to a third of it).

    Returns (JPEG bytes, width, height, objects) where each object is (float64 (4,) xyxy box in absolute
    pixels, tight around the glyph where its alpha ≥ 0.3; 0-based class index).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = np.ascontiguousarray(background(rng, width, height))
    draw_clutter(rng, image, int(rng.integers(0, 7)))
    glyphs, by_class = _digits()
    count = 0 if rng.random() < _EMPTY_FRACTION else int(rng.integers(1, max_objects + 1))
    short = min(width, height)
    log_range = ((math.log(_MIN_DIGIT_HEIGHT), math.log(short / 3)) if object_size is None else
                 (math.log(max(object_size[0] * short, 4)), math.log(object_size[1] * short)))
    placed: list[np.ndarray] = []
    objects = []
    for _ in range(count):
        label = int(rng.integers(10))
        glyph = glyphs[by_class[label][rng.integers(len(by_class[label]))]]
        for _attempt in range(_PLACEMENT_TRIES):  # rejection sampling; giving up means one object fewer
            h = int(round(math.exp(rng.uniform(*log_range))))
            alpha = _glyph_alpha(glyph, max(int(round(h * rng.uniform(0.65, 1.0))), 4), h)
            if alpha is None:
                break
            box = place(rng, image, *alpha, placed)
            if box is None:
                continue
            objects.append((box, label))
            break
    return encode_jpeg(rng, image), width, height, objects


def encode_jpeg(rng: np.random.Generator, image: np.ndarray) -> bytes:
    """Float32 (H, W, 3) RGB ``image`` in [0, 255] with random sensor noise (σ uniform in 0–5), as JPEG bytes
    (quality 90)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 5))
    pixels = np.clip(image + noise + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _render_task(args: tuple) -> tuple[bytes, int, int, list]:
    return render_image(*args)


def _preload() -> None:
    _digits(), background_photos()


def _write_split(root: Path, split: int, count: int, seed: int, sizes: tuple, pool) -> None:
    name = SPLITS[split]
    tasks = [(seed, split, i, *sizes) for i in range(count)]
    results = pool.imap(_render_task, tasks, chunksize=8) if pool else map(_render_task, tasks)
    categories = [{"id": c, "name": n, "supercategory": "digit"}
                  for c, n in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)]
    info = {"description": f"detkit built-in dataset (handwritten digits on photos), {name} split",
            "version": str(GENERATOR_VERSION), "seed": seed}
    write_coco_split(root, name, results, categories, info)


def _fingerprint(num_train: int, num_val: int, seed: int, min_size: int, max_size: int,
                 object_size: tuple[float, float] | None, max_objects: int) -> dict:
    objects = {} if object_size is None and max_objects == _MAX_OBJECTS else \
        {"object_size": None if object_size is None else [float(v) for v in object_size], "max_objects": max_objects}
    return {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
            "min_size": min_size, "max_size": max_size, **objects}


def _options(min_size: int, max_size: int, num_train: int, num_val: int, object_size, max_objects: int) -> tuple:
    """The (min_size, max_size, object_size, max_objects) that :func:`render_image` takes after the images'
    arguments, ``object_size`` a tuple; a ConfigError naming the ``data.builtin`` key whose value cannot be
    generated."""
    if not 32 <= min_size <= max_size:
        raise ConfigError(f"data.builtin.min_size={min_size} max_size={max_size}: need 32 <= min_size <= max_size")
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"data.builtin.num_train={num_train} num_val={num_val}: image counts must be >= 0")
    if object_size is not None and (len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1):
        raise ConfigError(f"data.builtin.object_size={list(object_size)}: need [min, max], fractions of the shorter "
                          "image side with 0 < min <= max <= 1 (null: 8 px to a third of it)")
    if max_objects < 1:
        raise ConfigError(f"data.builtin.max_objects={max_objects}: need >= 1")
    return min_size, max_size, None if object_size is None else tuple(object_size), max_objects


def generate_builtin(root: str | Path, num_train: int = 4000, num_val: int = 500, seed: int = 0,
                     min_size: int = 256, max_size: int = 320, workers: int = 2,
                     object_size: tuple[float, float] | None = None, max_objects: int = _MAX_OBJECTS) -> Path:
    """Write the dataset to ``root``, replacing whatever is there, and return ``root``.

    Images are ``width × height`` with both independently uniform in [min_size, max_size]; ``object_size`` and
    ``max_objects`` as in :func:`render_image`. Written by :func:`write_atomically`; the bytes depend only on the
    parameters, not on ``workers``.
    """
    sizes = _options(min_size, max_size, num_train, num_val, object_size, max_objects)

    def write(folder: Path, pool) -> None:
        for split, count in enumerate((num_train, num_val)):
            _write_split(folder, split, count, seed, sizes, pool)

    return write_atomically(root, write, _fingerprint(num_train, num_val, seed, *sizes), _preload,
                            workers if num_train + num_val > 1 else 1)


def ensure_builtin(root: str | Path, num_train: int = 4000, num_val: int = 500, seed: int = 0,
                   min_size: int = 256, max_size: int = 320, workers: int = 2,
                   object_size: tuple[float, float] | None = None, max_objects: int = _MAX_OBJECTS) -> Path:
    """Generate the dataset into ``root`` unless it already holds a complete one with these parameters.

    ``workers`` does not change the output, so it is not part of the fingerprint. Returns ``root``.
    """
    sizes = _options(min_size, max_size, num_train, num_val, object_size, max_objects)
    return ensure_complete(
        root, _fingerprint(num_train, num_val, seed, *sizes),
        lambda: generate_builtin(root, num_train, num_val, seed, min_size, max_size, workers, *sizes[2:]),
        f"generating the built-in dataset into {root} ({num_train} train / {num_val} val images, seed {seed})")
