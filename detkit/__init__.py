"""detkit: an object-detection training framework on PyTorch.

    import detkit
    detector = detkit.load("outputs/.../best.pt")
    detections = detector.predict("image.jpg")   # [{"boxes", "scores", "labels", "names"}]
"""

from detkit.api import Detector, load, train
from detkit.utils.resolvers import config_dir
from detkit.utils.resolvers import register as _register_resolvers

__all__ = ["Detector", "config_dir", "load", "train"]

_register_resolvers()
