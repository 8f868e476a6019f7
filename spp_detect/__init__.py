"""spp-detect: SPP-net object detection as a staged, resumable pipeline.

``from spp_detect import Detector`` gives the Python API (``spp_detect.api``), imported on first
use: proposal worker processes import this package and should not pay for torch.
"""

from spp_detect._version import __version__

__all__ = ["Detection", "Detector", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Detection"):
        from spp_detect import api

        return getattr(api, name)
    raise AttributeError(f"module 'spp_detect' has no attribute {name!r}")
