"""The one bridge from the config to the library: the objects a stage or the Python API works
with, built from the config and the run directory's checked outputs (the conv trunk, the feature
source, the trained detector, proposal settings, an image's proposals, the feature scale).

The library modules are imported inside the builders: the propose stage (whose worker processes
import the stages) uses only ``proposal_params`` and must not pay for torch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spp_detect.config import BboxRegConfig, Config, ProposeConfig, SvmConfig
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import load_npz
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import split_records
from spp_detect.stages.manifests import (
    check_classes,
    check_file,
    check_item,
    check_trained_on,
    check_trunk,
    maps_origin,
    require_upstream,
    trunk_digest,
)
from spp_detect.stages.provenance import file_digest, item_fingerprint, log_trunk
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)


def pool_geometry(config: Config, stride: int, offset0: float):
    """The ``spp.PoolGeometry`` of a trunk's ``stride`` and ``offset0`` under ``spp``."""
    from spp_detect.ops.spp import PoolGeometry

    spp = config.spp
    return PoolGeometry(stride, offset0, spp.offset, tuple(spp.levels), spp.target_size)


def build_trunk(config: Config, run_dir: RunDir, announce: bool = True):
    """The conv trunk whose conv5 maps the later stages use: ``extract.backbone`` with
    ``extract.weights``, or, with ``finetune.conv_from``, the trunk fine-tuned end to end.
    ``announce`` logs the trunk line (a stage's second source passes False)."""
    from spp_detect.models.weights import build_backbone

    settings = config.extract
    if announce:
        log_trunk(config)
    if not config.finetune.conv_from:
        return build_backbone(settings.backbone, settings.weights, settings.last_stage)
    expected = trunk_digest(config, run_dir)
    if not run_dir.trunk_path.is_file() or file_digest(run_dir.trunk_path) != expected:
        raise UserError(
            f"{run_dir.trunk_path}: missing or not the trunk its finetune manifest names; rerun "
            "`spp-detect finetune --force`"
        )
    return build_backbone(settings.backbone, str(run_dir.trunk_path), settings.last_stage)


def open_feature_source(
    config: Config, run_dir: RunDir, split: str, device: str, announce: bool = True
):
    """Conv5 maps of ``split`` as a ``features.FeatureSource``: the extract cache (its manifest
    checked) when ``extract.cache`` is disk, else a backbone that computes them on the fly.
    ``announce``: log the trunk line, once per stage (False for a stage's second source)."""
    from spp_detect.models.features import FeatureSource

    if config.extract.cache != "disk":
        return live_feature_source(config, run_dir, device, announce)
    manifest = require_upstream(config, run_dir, "extract", split)
    origin = maps_origin(config, run_dir)
    check_trunk(config, run_dir, manifest, run_dir.features_dir(split), split)
    if announce:
        log_trunk(config)
    return FeatureSource(
        config.extract.scales,
        pool_geometry(config, int(manifest["stride"]), float(manifest["offset0"])),
        int(manifest["channels"]),
        device,
        cache_path=functools.partial(run_dir.feature_path, split),
        cache_fingerprint=functools.partial(item_fingerprint, config, "extract", model=origin),
        max_long_side=config.extract.max_long_side,
    )


def open_split(config: Config, run_dir: RunDir, split: str, limit: int | None, device: str):
    """The split's records and conv5 maps, after checking that its proposals are complete."""
    records = split_records(config, split, limit)
    require_upstream(config, run_dir, "propose", split)
    return records, open_feature_source(config, run_dir, split, device)


def live_feature_source(config: Config, run_dir: RunDir, device: str, announce: bool = True):
    """A ``features.FeatureSource`` that runs the trunk (``build_trunk``) on each image (no
    cache needed)."""
    from spp_detect.models.features import FeatureSource

    settings = config.extract
    backbone = build_trunk(config, run_dir, announce)
    return FeatureSource(
        settings.scales,
        pool_geometry(config, backbone.stride, backbone.offset0),
        backbone.channels,
        device,
        backbone=backbone,
        max_long_side=settings.max_long_side,
        precision=settings.precision,
    )


def load_trained_head(config: Config, run_dir: RunDir, device: str, check_data: bool = True):
    """The fine-tuned head (eval mode, on ``device``), checked against the config and, with
    ``check_data``, against the training split's data now (``check_trained_on``)."""
    from spp_detect.models.head import load_head

    path = _trained_file(config, run_dir, "finetune", run_dir.head_path, check_data)
    return load_head(path, device)


def _trained_file(
    config: Config, run_dir: RunDir, stage: str, path: Path, check_data: bool
) -> Path:
    """``path``, once checked against the manifest of the ``stage`` that trained it."""
    split = config.data.train_split
    manifest = require_upstream(config, run_dir, stage, split)
    check_classes(manifest, config.data.classes, path, stage)
    check_file(manifest, path, stage, split)
    check_trained_on(config, run_dir, stage, manifest, path, check_data)
    return path


def build_detector(config: Config, run_dir: RunDir, device: str, check_data: bool = True):
    """The run's trained head, SVMs and (when ``test.bbox_reg``) regressors as a
    ``detector.TrainedDetector`` with the config's test settings, each checked to be trained on
    ``data.train_split`` with the others (and, with ``check_data``, on its data as it is now:
    ``check_trained_on``)."""
    from spp_detect.models.detector import TrainedDetector
    from spp_detect.models.linear import BoxRegressors, SvmModel

    head = load_trained_head(config, run_dir, device, check_data)
    svms = None
    if config.test.scorer == "svm":
        path = _trained_file(config, run_dir, "train-svm", run_dir.svm_path, check_data)
        svms = SvmModel.load(path)
    regressors = None
    if config.test.bbox_reg and config.test.regressor == "ridge":
        path = _trained_file(config, run_dir, "train-bbox", run_dir.bbox_path, check_data)
        regressors = BoxRegressors.load(path)
    return TrainedDetector(head, svms, regressors, detection_settings(config), device)


def detection_settings(config: Config):
    """The ``detector.DetectionSettings`` of ``config.test``."""
    from spp_detect.models.detector import DetectionSettings

    test = config.test
    softmax = test.scorer == "softmax"
    return DetectionSettings(
        score_thresh=test.softmax_thresh if softmax else test.score_thresh,
        nms_thresh=test.nms_thresh, max_per_class=test.max_per_class,
        batch_windows=test.batch_windows, precision=test.precision, scorer=test.scorer,
        head_boxes=test.bbox_reg and test.regressor == "head",
        fc_compression=test.fc_compression, svd_ranks=(test.svd_rank_fc6, test.svd_rank_fc7),
    )  # fmt: skip


def estimate_scale(
    settings: SvmConfig | BboxRegConfig,
    window_counts: Sequence[int],
    features_of: Callable[[int, np.ndarray], Any],
    layer: str,
) -> float:
    """The feature scale of the ``layer`` features (fc7 for the SVMs, pool5 for the regressors)
    that ``features_of(image number, window indices)`` computes, sampled as ``settings`` (the
    svm or bbox_reg section) says (``window_features.estimate_feature_scale``)."""
    from spp_detect.train.window_features import estimate_feature_scale

    scale = estimate_feature_scale(
        window_counts, features_of, settings.norm_images, settings.norm_windows, settings.seed,
        settings.target_norm,
    )  # fmt: skip
    logger.info("%s feature scale %.4f (mean norm -> %g)", layer, scale, settings.target_norm)
    return scale


def proposal_params(propose: ProposeConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`proposals.propose_image` from the config section."""
    return {
        "method": propose.method,
        "mode": propose.mode,
        "base_k": propose.base_k,
        "inc_k": propose.inc_k,
        "sigma": propose.sigma,
        "edge_model": propose.edge_model or None,
        "edge_max_boxes": propose.edge_max_boxes,
        "max_side": propose.max_side,
        "min_size": propose.min_size,
        "max_per_image": propose.max_per_image,
    }


def load_proposals(config: Config, run_dir: RunDir, split: str, record: ImageRecord) -> np.ndarray:
    """Proposal boxes (R, 4) float32 of one image, checked to come from this image and config;
    a missing or foreign file names the stage to run."""
    path = run_dir.proposal_path(split, record.image_id)
    rerun = f"run `spp-detect propose --split {split}`"
    if not path.is_file():
        raise UserError(f"{path}: no proposals for this image; {rerun}")
    arrays = load_npz(path)
    check_item(path, arrays, item_fingerprint(config, "propose", record), rerun)
    return arrays["boxes"].astype(np.float32, copy=False)
