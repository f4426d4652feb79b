"""Writing a generated dataset in COCO format: atomically, marked with the fingerprint of its parameters.

Shared by the built-in dataset (:mod:`detkit.data.builtin`) and the generalization suite
(:mod:`detkit.data.suite`): a generator renders each image from its own seed, so the bytes do not depend on the
number of worker processes, and writes through :func:`write_atomically`; :func:`ensure_complete` regenerates a
folder whose ``.complete`` fingerprint differs from the wanted parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2


def write_coco_split(root: Path, name: str, results: Iterable[tuple[bytes, int, int, list]],
                     categories: list[dict], info: dict) -> None:
    """Write ``images/<name>/000000.jpg ...`` and ``annotations/instances_<name>.json`` under ``root``.

    ``results`` yields (JPEG bytes, width, height, objects) per image, objects being (xyxy box in absolute
    pixels, 0-based label); label ``i`` is ``categories[i]["id"]``.
    """
    image_dir = root / "images" / name
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for i, (jpeg, width, height, objects) in enumerate(results):
        file_name = f"{i:06d}.jpg"
        (image_dir / file_name).write_bytes(jpeg)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for box, label in objects:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": categories[label]["id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco))


def _init_worker(preload: Callable[[], object]) -> None:
    cv2.setNumThreads(1)  # the pool already uses every core
    preload()


def _remove_stale_partials(root: Path) -> None:
    """Delete ``ROOT.tmp-<pid>`` folders left by interrupted runs whose process no longer exists."""
    for tmp in root.parent.glob(f"{root.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def write_atomically(root: str | Path, write: Callable[[Path, Any], None], fingerprint: dict,
                     preload: Callable[[], object], workers: int) -> Path:
    """Call ``write(folder, pool)`` into ``ROOT.tmp-<pid>``, mark it ``.complete`` with the JSON
    ``fingerprint`` and rename it onto ``root`` (replacing whatever is there), so an interrupted run never
    leaves a folder that looks complete. ``pool`` is a spawn pool of ``workers`` processes that each ran
    the picklable ``preload`` first, or None (``preload`` runs here) when ``workers`` <= 1. Returns ``root``.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pool = None
    if workers > 1:
        # spawn, not fork: a child forked from a process whose OpenCV (or OpenMP) threads ever ran can deadlock
        # on a lock copied mid-use; each worker runs ``preload`` once instead.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(preload,))
    else:
        preload()
    try:
        write(tmp, pool)
        (tmp / ".complete").write_text(json.dumps(fingerprint))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def ensure_complete(root: str | Path, fingerprint: dict, generate: Callable[[], object], message: str) -> Path:
    """Call ``generate()`` (printing ``message`` and the time it took) unless ``root/.complete`` holds
    ``fingerprint``, i.e. ``root`` already holds a complete dataset made with these parameters. Returns
    ``root``."""
    root = Path(root)
    if _is_complete(root, fingerprint):
        return root
    # Two runs started at once on a fresh machine would both generate, and the second's rename would replace
    # the folder under the first while it reads it ("image file missing"): one generates, the other waits and
    # then finds the folder complete.
    with _generation_lock(root):
        if _is_complete(root, fingerprint):
            return root
        print(f"{message} ...", end=" ", flush=True)
        start = time.perf_counter()
        generate()
        print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
    return root


def _is_complete(root: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((root / ".complete").read_text()) == fingerprint
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on generating ``root``, across processes (``flock`` on a file in the temp folder named
    after ``root``'s absolute path, so the data folder holds only data); no lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"detkit-generate-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield
