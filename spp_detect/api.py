"""The Python API: a trained run as one object, for notebooks and scripts.

    from spp_detect import Detector

    detector = Detector.from_run("runs/voc07_zf5_5scale", device="cuda")
    for found in detector("photo.jpg"):          # or an RGB uint8 array (H, W, 3)
        print(found.label, found.score, found.box)
    fc7 = detector.features("photo.jpg", boxes, layer="fc7")   # (R, F) float32

Detection is exactly `spp-detect test`'s (``detector.TrainedDetector``: the same object, the same
code), on conv5 maps computed on the fly in float32 where `test` reads them from the float16
cache. `spp-detect detect` is this object applied to files. Boxes are continuous pixel XYXY
(x2, y2 exclusive; docs/method.md#conventions-and-box-format).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spp_detect.config import Config, load_config
from spp_detect.data.image import read_image
from spp_detect.data.proposals import propose_image
from spp_detect.errors import UserError
from spp_detect.models.detector import TrainedDetector
from spp_detect.models.features import FeatureSource
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.builders import build_detector, live_feature_source, proposal_params
from spp_detect.structures import ImageDetections, ImageRecord

LAYERS = ("pool5", "fc7")
_array_ids = itertools.count()  # names images given as arrays, which have no file


@dataclass(frozen=True)
class Detection:
    """One detection: class name, score, box (x1, y1, x2, y2) in continuous pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]


class Detector:
    """A trained run ready for new images: proposals with the run's settings, conv5 maps,
    spatial pyramid pooling, fc6/fc7, scoring, regression and NMS."""

    def __init__(
        self,
        core: TrainedDetector,
        source: FeatureSource,
        proposal_settings: dict,
        class_names: Sequence[str],
    ) -> None:
        self.core, self.source = core, source
        self.proposal_settings = dict(proposal_settings)
        self.class_names = tuple(class_names)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str = "cpu", overrides: Sequence[str] = ()
    ) -> Detector:
        """The run in ``run_dir`` with the config it was trained with (its ``config.yaml``),
        ``overrides`` (``"section.key=value"``, as ``--set``) applied; on ``device``."""
        run = RunDir(Path(run_dir))
        if not run.config_path.is_file():
            raise UserError(f"{run.config_path}: no config; is {run_dir} a trained run directory?")
        return cls.from_config(load_config(run.config_path, overrides), run, device)

    @classmethod
    def from_config(cls, config: Config, run_dir: RunDir, device: str) -> Detector:
        """The trained models of ``run_dir``, checked against ``config`` (but for the training
        data, which a trained run may travel without: ``stages.manifests.check_trained_on``)."""
        core = build_detector(config, run_dir, device, check_data=False)
        source = live_feature_source(config, run_dir, device)
        return cls(core, source, proposal_params(config.propose), config.data.classes)

    def __call__(
        self, image: str | Path | np.ndarray, proposals: np.ndarray | None = None
    ) -> list[Detection]:
        """The detections of ``image`` (a file, or uint8 (H, W, 3) RGB), best first.
        ``proposals`` (R, 4): windows to score instead of the run's proposal method."""
        found = self.detect(image, proposals)
        order = np.argsort(-found.scores, kind="stable")
        return [
            Detection(
                label=self.class_names[int(found.labels[i])],
                score=float(found.scores[i]),
                box=tuple(float(v) for v in found.boxes[i]),
            )
            for i in order
        ]

    def detect(
        self, image: str | Path | np.ndarray, proposals: np.ndarray | None = None
    ) -> ImageDetections:
        """The detections of ``image`` as arrays (``structures.ImageDetections``)."""
        record, pixels = self._prepare(image)
        if proposals is None:
            proposals = propose_image(pixels, **self.proposal_settings)
        return self.core.detect(self.source, record, np.asarray(proposals, np.float32))

    @torch.inference_mode()
    def features(
        self, image: str | Path | np.ndarray, boxes: np.ndarray, layer: str = "pool5"
    ) -> np.ndarray:
        """Per-box features float32 of ``boxes`` (R, 4) on ``image``, each box pooled at its
        best scale: ``pool5`` (R, D), the spatial pyramid, or ``fc7`` (R, F), what the SVMs
        score."""
        if layer not in LAYERS:
            raise UserError(f"layer={layer!r}: use one of {', '.join(LAYERS)}")
        record, _ = self._prepare(image)
        pooled, _ = self.source.pool(record, np.asarray(boxes, np.float32).reshape(-1, 4))
        if layer == "fc7":
            pooled = self.core.fc7_features(pooled)
        return pooled.float().cpu().numpy()

    def _prepare(self, image: str | Path | np.ndarray) -> tuple[ImageRecord, np.ndarray]:
        """A record for ``image`` and its pixels, with its conv5 maps computed."""
        if isinstance(image, np.ndarray):
            pixels, path = _checked_array(image), Path(f"<array {next(_array_ids)}>")
        else:
            path = Path(image)
            pixels = read_image(path)
        record = image_record(path, pixels.shape[:2])
        self.source.compute_from(record, pixels)
        return record, pixels


def image_record(path: Path, image_hw: tuple[int, int]) -> ImageRecord:
    """An unannotated record of an image of ``image_hw`` (H, W)."""
    empty = np.zeros((0, 4), np.float32)
    height, width = (int(v) for v in image_hw)
    return ImageRecord(path.stem, path, height, width, empty, np.zeros(0), np.zeros(0, bool))


def _checked_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(
            f"image array of {image.dtype} {image.shape}: give uint8 (H, W, 3) RGB (or a file path)"
        )
    return np.ascontiguousarray(image)
