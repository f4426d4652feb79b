"""The built-in dataset: handwritten digits on real photos, written as a standard COCO dataset.

Everything it draws ships inside installed packages (no download): the objects are scikit-learn's 1,797
handwritten 8×8 digits (10 classes), the backgrounds are photos bundled with scikit-image and scikit-learn.
Each image's randomness comes from ``SeedSequence([seed, split, index])``, so the same seed gives the same
bytes whatever the number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
# Deliberately non-contiguous, like COCO's, so the label <-> category id mapping is exercised by default.
CATEGORY_IDS: tuple[int, ...] = tuple(1 + 2 * d for d in range(10))
GENERATOR_VERSION = 1
SPLITS = ("train", "val")
_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "horse.png", "brick.png", "grass.png",
           "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png", "color.png", "coins.png",
           "camera.png", "page.png", "text.png", "moon.png", "immunohistochemistry.png", "ihc.png")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, list[np.ndarray]]:
    """(1797, 8, 8) glyphs scaled to [0, 1] and, per class, the indices of its glyphs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)
    return glyphs, [np.flatnonzero(digits.target == c) for c in range(10)]


@lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    """RGB uint8 background photos from scikit-image's data folder and scikit-learn's sample images."""
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
    return photos


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    photo = _photos()[rng.integers(len(_photos()))]
    ph, pw = photo.shape[:2]
    crop_h = int(min(ph, pw * height / width) * rng.uniform(0.3, 1.0))
    crop_w = min(int(crop_h * width / height), pw)
    y, x = rng.integers(0, ph - crop_h + 1), rng.integers(0, pw - crop_w + 1)
    image = cv2.resize(photo[y : y + crop_h, x : x + crop_w], (width, height), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    gain = rng.uniform(0.7, 1.25, size=3) * rng.uniform(0.8, 1.15)
    return np.clip(image.astype(np.float32) * gain, 0, 255)


def _clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Unannotated distractors: filled or outlined circles, ellipses, rectangles, triangles and curves."""
    h, w = image.shape[:2]
    for _ in range(rng.integers(0, 7)):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        thick = -1 if rng.random() < 0.5 else int(rng.integers(1, 4))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.uniform(4, min(h, w) / 4))
        kind = rng.integers(5)
        if kind == 0:
            cv2.circle(image, (cx, cy), r, color, thick, cv2.LINE_AA)
        elif kind == 1:
            axes = (r, max(int(r * rng.uniform(0.3, 0.9)), 2))
            cv2.ellipse(image, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, color, thick, cv2.LINE_AA)
        elif kind == 2:
            cv2.rectangle(image, (cx - r, cy - int(r * rng.uniform(0.4, 1))), (cx + r, cy + r), color, thick)
        elif kind == 3:
            pts = (np.array([cx, cy]) + rng.uniform(-r, r, (3, 2))).astype(np.int32)
            if thick < 0:
                cv2.fillPoly(image, [pts], color, cv2.LINE_AA)
            else:
                cv2.polylines(image, [pts], True, color, thick, cv2.LINE_AA)
        else:  # a smooth arc, never a short straight stroke (that would look like a "1")
            axes = (r, max(int(r * rng.uniform(0.5, 1.0)), 2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(image, (cx, cy), axes, 0.0, start, start + float(rng.uniform(90, 200)), color,
                        max(thick, 1), cv2.LINE_AA)


def _overlaps_too_much(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_b = (box[2] - box[0]) * (box[3] - box[1])
        area_o = (other[2] - other[0]) * (other[3] - other[1])
        if inter / (area_b + area_o - inter) > 0.25 or inter / area_o > 0.35:
            return True
    return False


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A saturated random colour whose luminance differs from ``under``'s mean by at least ~70."""
    lum_bg = float(under.reshape(-1, 3).mean(0) @ np.array([0.299, 0.587, 0.114]))
    hue = rng.uniform(0, 6)
    base = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV hue → RGB at S=V=1
    color = 255 * (1 - rng.uniform(0.3, 1.0) * (1 - base))
    lum = float(color @ np.array([0.299, 0.587, 0.114]))
    target = lum_bg - 90 if lum_bg > 128 else lum_bg + 90
    target = float(np.clip(target + rng.uniform(-20, 20), 0, 255))
    if target < lum:
        color = color * target / max(lum, 1e-3)
    else:
        color = color + (255 - color) * (target - lum) / max(255 - lum, 1e-3)
    return np.clip(color, 0, 255).astype(np.float32)


def _paste_digit(rng: np.random.Generator, image: np.ndarray, glyph: np.ndarray, x0: int, y0: int, w: int,
                 h: int) -> np.ndarray | None:
    """Alpha-blend a coloured glyph into ``image`` at (x0, y0) with size (w, h); returns its tight xyxy box
    (alpha ≥ 0.3) or None if nothing visible remains."""
    mask = np.clip(cv2.resize(glyph, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
    rows, cols = np.flatnonzero(mask.max(1) >= 0.3), np.flatnonzero(mask.max(0) >= 0.3)
    if len(rows) == 0 or len(cols) == 0:
        return None
    region = image[y0 : y0 + h, x0 : x0 + w]
    color = _contrasting_color(rng, region)
    if rng.random() < 0.3:  # a vertical gradient towards a second colour of similar luminance
        other = _contrasting_color(rng, region)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        fill = color * (1 - t) + other * t
    else:
        fill = np.broadcast_to(color, region.shape)
    alpha = (mask * rng.uniform(0.85, 1.0))[..., None]
    region[:] = region * (1 - alpha) + fill * alpha
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float64)


def render_image(seed: int, split: int, index: int, min_size: int, max_size: int) -> tuple[bytes, int, int, list]:
    """One image: (JPEG bytes, width, height, [(xyxy box, class index), ...])."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = np.ascontiguousarray(_background(rng, width, height))
    _clutter(rng, image)
    glyphs, by_class = _digits()
    count = 0 if rng.random() < 0.05 else int(rng.integers(1, 9))
    largest = min(width, height) / 3
    placed: list[np.ndarray] = []
    objects = []
    for _ in range(count):
        for _attempt in range(10):
            h = int(round(math.exp(rng.uniform(math.log(8), math.log(largest)))))
            w = max(int(round(h * rng.uniform(0.65, 1.0))), 4)
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if not _overlaps_too_much(np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64), placed):
                break
        else:
            continue
        label = int(rng.integers(10))
        glyph = glyphs[by_class[label][rng.integers(len(by_class[label]))]]
        box = _paste_digit(rng, image, glyph, x0, y0, w, h)
        if box is not None:
            placed.append(box)
            objects.append((box, label))
    noise = rng.normal(0, rng.uniform(0, 6), image.shape)
    pixels = np.clip(image + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), width, height, objects


def _render_task(args: tuple) -> tuple[bytes, int, int, list]:
    return render_image(*args)


def _write_split(root: Path, split: int, count: int, seed: int, min_size: int, max_size: int, pool) -> None:
    name = SPLITS[split]
    image_dir = root / "images" / name
    image_dir.mkdir(parents=True)
    tasks = [(seed, split, i, min_size, max_size) for i in range(count)]
    results = pool.imap(_render_task, tasks, chunksize=16) if pool else map(_render_task, tasks)
    images, annotations = [], []
    for i, (jpeg, width, height, objects) in enumerate(results):
        file_name = f"{i:06d}.jpg"
        (image_dir / file_name).write_bytes(jpeg)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for box, label in objects:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": c, "name": n, "supercategory": "digit"} for c, n in zip(CATEGORY_IDS, CLASS_NAMES)]
    coco = {"info": {"description": f"detkit built-in dataset, {name} split", "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco))


def _fingerprint(num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> dict:
    return {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
            "min_size": min_size, "max_size": max_size}


def generate_builtin(root: str | Path, num_train: int = 4000, num_val: int = 500, seed: int = 0,
                     min_size: int = 256, max_size: int = 320, workers: int = 2) -> Path:
    """Write the dataset to ``root`` (replacing what is there) through a temporary folder and a rename.

    Layout: ``annotations/instances_{train,val}.json``, ``images/{train,val}/NNNNNN.jpg`` and ``.complete``
    holding the generation parameters.
    """
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for split, count in enumerate((num_train, num_val)):
            _write_split(tmp, split, count, seed, min_size, max_size, pool)
    finally:
        if pool:
            pool.terminate()
    (tmp / ".complete").write_text(json.dumps(_fingerprint(num_train, num_val, seed, min_size, max_size)))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def ensure_builtin(root: str | Path, num_train: int = 4000, num_val: int = 500, seed: int = 0,
                   min_size: int = 256, max_size: int = 320, workers: int = 2) -> Path:
    """Generate the dataset unless ``root`` already holds a complete one with the same parameters."""
    root = Path(root)
    marker = root / ".complete"
    wanted = _fingerprint(num_train, num_val, seed, min_size, max_size)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    print(f"generating the built-in dataset into {root} ({num_train} train / {num_val} val images, seed {seed})")
    start = time.perf_counter()
    generate_builtin(root, num_train, num_val, seed, min_size, max_size, workers)
    print(f"built-in dataset generated in {time.perf_counter() - start:.1f}s")
    return root
