"""spp-detect: SPP-net object detection as a staged, resumable pipeline."""

__version__ = "0.1.0"
