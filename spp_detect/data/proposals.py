"""Region proposals: selective search (fast/quality), EdgeBoxes, .mat import, filters and recall.

Shapes: R proposal boxes, G gt boxes, H×W image. Boxes are float32 (R, 4) XYXY in continuous pixel
coordinates of the original image, x2/y2 exclusive (docs/method.md#conventions-and-box-format). The
two conversions into that format that live here: OpenCV ``(x, y, w, h)`` → ``(x, y, x+w, y+h)`` and
the R-CNN / SPP-net ``.mat`` ``[y1 x1 y2 x2]`` (1-based, inclusive) → ``(x1−1, y1−1, x2, y2)``.

Every function takes explicit arguments; nothing here reads the config.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from spp_detect.errors import UserError
from spp_detect.ops.boxes import clip_boxes
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

METHODS = ("selective_search", "edge_boxes", "mat")
SELECTIVE_SEARCH_MODES = ("fast", "quality")


def check_method(method: str, mode: str) -> None:
    """UserError for an unknown ``propose.method``, or ``propose.mode`` of selective search."""
    if method not in METHODS:
        raise UserError(f"propose.method: unknown {method!r}; use one of {', '.join(METHODS)}")
    if method == "selective_search" and mode not in SELECTIVE_SEARCH_MODES:
        raise UserError(f"propose.mode: unknown {mode!r}; use fast or quality")


def require_ximgproc(method: str) -> None:
    """UserError when ``method`` needs OpenCV's contrib module ximgproc and this OpenCV lacks it:
    opencv-python(-headless) alone, or installed beside opencv-contrib-python-headless, whose
    ``cv2`` it then shadows."""
    if method in ("selective_search", "edge_boxes") and not hasattr(cv2, "ximgproc"):
        raise UserError(
            f"propose.method={method}: this OpenCV ({cv2.__version__}) lacks the contrib module "
            "cv2.ximgproc; pip uninstall -y opencv-python opencv-python-headless "
            "opencv-contrib-python-headless, then pip install opencv-contrib-python-headless; "
            "or give proposals made elsewhere with propose.method=mat"
        )


# OpenCV ranks selective-search regions with C rand() (selectivesearchsegmentation.cpp,
# hierarchicalGrouping); seeding it before each image makes the order reproducible. 1 is the
# state of a fresh process (glibc treats srand(0) as srand(1)).
C_RAND_SEED = 1
# OpenCV's EdgeBoxes port adds 1 to x and y, as Dollár's MATLAB code does for 1-based output
# (edgeboxes.cpp, getBoundingBoxes).
EDGE_BOXES_ORIGIN = 1
# Gaussian sigma (px) smoothing the image before the gradient fallback edge map: suppresses
# texture and JPEG noise so that object outlines dominate (Canny's usual pre-blur).
GRADIENT_BLUR_SIGMA = 1.5
# Recall report: top-N cut-offs and IoU thresholds (Hosang et al. 2015; COCO-style AR over
# IoU 0.5:0.05:0.95).
RECALL_TOP_N = (100, 500, 1000, 2000)
RECALL_IOUS = (0.5, 0.7)
AVERAGE_RECALL_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# --- conversions (the two edges into the box format) -------------------------------------------


def opencv_rects_to_boxes(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rects (R, 4) → float32 (R, 4) XYXY ``(x, y, x+w, y+h)``."""
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def mat_to_boxes(mat_boxes: np.ndarray) -> np.ndarray:
    """R-CNN ``.mat`` boxes ``[y1 x1 y2 x2]`` (R, 4), 1-based inclusive → continuous XYXY."""
    mat_boxes = np.asarray(mat_boxes, dtype=np.float64).reshape(-1, 4)
    y1, x1, y2, x2 = mat_boxes.T
    return np.stack([x1 - 1, y1 - 1, x2, y2], axis=1).astype(np.float32)


# --- methods ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _c_library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig or a compiler: once per process
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        libc.srand  # noqa: B018  (fails here when the library has no srand)
    except (OSError, AttributeError, TypeError):
        logger.warning("cannot seed C rand(); selective-search box order may vary between runs")
        return None
    return libc


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's rand(), which OpenCV's selective search ranks regions with."""
    libc = _c_library()
    if libc is not None:
        libc.srand(ctypes.c_uint(seed))


def selective_search(
    image_rgb: np.ndarray, mode: str, base_k: int, inc_k: int, sigma: float
) -> np.ndarray:
    """OpenCV selective search on uint8 (H, W, 3) RGB → boxes float32 (R, 4), OpenCV's rank order.

    ``mode`` "fast": HSV and Lab, k ∈ {base_k, base_k + inc_k, base_k + 2·inc_k}, two strategies;
    "quality": five colour spaces, five k values, four strategies (OpenCV ximgproc). ``sigma``
    is the graph segmentation's Gaussian sigma. The same input gives the same boxes in the same
    order (C rand() is seeded first).
    """
    if mode not in SELECTIVE_SEARCH_MODES:
        raise ValueError(f"mode must be one of {SELECTIVE_SEARCH_MODES}, got {mode!r}")
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if mode == "fast":
        search.switchToSelectiveSearchFast(int(base_k), int(inc_k), float(sigma))
    else:
        search.switchToSelectiveSearchQuality(int(base_k), int(inc_k), float(sigma))
    _seed_c_rand(C_RAND_SEED)
    return opencv_rects_to_boxes(search.process())


@functools.lru_cache(maxsize=2)
def _structured_edge_detector(model_path: str):
    return cv2.ximgproc.createStructuredEdgeDetection(model_path)


def check_edge_model(model_path: str | Path) -> None:
    """Raise :class:`UserError` unless ``model_path`` loads as a structured-edge model.

    OpenCV may kill the process (SIGFPE) on a file that is not a model: call it in a child process.
    """
    path = Path(model_path)
    if not path.is_file():
        raise UserError(
            f"{path}: structured-edge model not found; download model.yml.gz (see README) or "
            "set propose.edge_model to '' for gradient edges"
        )
    try:
        _structured_edge_detector(str(path))
    except cv2.error:
        raise UserError(
            f"{path}: not a structured-edge model (OpenCV could not load it); use the "
            "model.yml.gz from opencv_extra (see README)"
        ) from None


def structured_edges(image_rgb: np.ndarray, model_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Structured-forest edges (Dollár & Zitnick) after NMS, and their orientation.

    Returns edges float32 (H, W) in [0, 1] and orientation float32 (H, W) in [0, π).
    """
    detector = _structured_edge_detector(str(model_path))
    edges = detector.detectEdges(image_rgb.astype(np.float32) / 255.0)  # the model expects RGB
    orientation = detector.computeOrientation(edges)
    return detector.edgesNms(edges, orientation), orientation


def gradient_edges(image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A cheap stand-in for structured edges: colour Sobel magnitude, thinned by NMS.

    Lower quality than the structured-edge model (texture edges compete with object outlines).
    Returns edges float32 (H, W) in [0, 1] and the gradient (edge-normal) orientation float32
    (H, W) in [0, π), the convention of ``StructuredEdgeDetection.computeOrientation``.
    """
    image = cv2.GaussianBlur(image_rgb.astype(np.float32) / 255.0, (0, 0), GRADIENT_BLUR_SIGMA)
    grad_x = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    grad_y = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    magnitude_c = np.sqrt(grad_x**2 + grad_y**2)  # (H, W, 3)
    strongest = magnitude_c.argmax(axis=2)[..., None]  # per pixel, the channel with most contrast
    magnitude = np.take_along_axis(magnitude_c, strongest, axis=2)[..., 0]
    angle = np.arctan2(
        np.take_along_axis(grad_y, strongest, axis=2)[..., 0],
        np.take_along_axis(grad_x, strongest, axis=2)[..., 0],
    )
    orientation = np.mod(angle, np.pi).astype(np.float32)
    thin = _edge_nms(magnitude, orientation)
    peak = float(thin.max())
    edges = thin / peak if peak > 0 else thin
    return edges.astype(np.float32), orientation


def _edge_nms(magnitude: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Zero every pixel that is not a maximum along its edge normal (4 quantised directions)."""
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape
    direction = np.round(orientation / (np.pi / 4)).astype(np.int64) % 4  # 0°, 45°, 90°, 135°
    steps = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) along the normal, image rows down
    keep = np.zeros(magnitude.shape, dtype=bool)
    for index, (dy, dx) in enumerate(steps):
        ahead = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        behind = padded[1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        is_max = (magnitude >= ahead) & (magnitude >= behind)
        keep |= (direction == index) & is_max
    return np.where(keep, magnitude, 0.0).astype(np.float32)


def edge_boxes(image_rgb: np.ndarray, model_path: str | None, max_boxes: int) -> np.ndarray:
    """OpenCV EdgeBoxes on uint8 (H, W, 3) RGB → boxes float32 (R, 4), best score first.

    ``model_path`` names the structured-edge model (``model.yml.gz``); empty or None falls back to
    :func:`gradient_edges`, which gives lower recall.
    """
    if model_path:
        edges, orientation = structured_edges(image_rgb, model_path)
    else:
        edges, orientation = gradient_edges(image_rgb)
    detector = cv2.ximgproc.createEdgeBoxes()
    detector.setMaxBoxes(int(max_boxes))
    result = detector.getBoundingBoxes(edges, orientation)
    rects = result[0] if isinstance(result, tuple) else result  # OpenCV ≥ 4.5 adds scores
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    rects[:, :2] -= EDGE_BOXES_ORIGIN
    return opencv_rects_to_boxes(rects)


def load_mat_proposals(path: str | Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Boxes of ``image_ids`` from an R-CNN / SPP-net proposal ``.mat`` (``images``, ``boxes``).

    ``boxes{i}`` is (R, 4) ``[y1 x1 y2 x2]`` 1-based inclusive for ``images{i}``; returned as
    float32 (R, 4) XYXY continuous, in file order. Raises :class:`UserError` for a missing or
    unreadable file, missing variables, or an id that the file lacks.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: proposal .mat file not found; set propose.mat_file to an existing file"
        )
    try:
        contents = scipy.io.loadmat(path, variable_names=("images", "boxes"))
    except NotImplementedError:
        raise UserError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported; "
            "re-save it with save(f, 'images', 'boxes', '-v7')"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a readable .mat file ({exc})") from None
    if "images" not in contents or "boxes" not in contents:
        raise UserError(f"{path}: expected variables 'images' and 'boxes' (R-CNN proposal format)")
    names = [_mat_string(item) for item in np.asarray(contents["images"]).ravel()]
    cells = np.asarray(contents["boxes"], dtype=object).ravel()
    if len(cells) != len(names):
        raise UserError(
            f"{path}: {len(names)} images but {len(cells)} box arrays; the file is damaged"
        )
    by_id = dict(zip(names, cells, strict=True))
    missing = [image_id for image_id in image_ids if image_id not in by_id]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise UserError(
            f"{path}: no boxes for {len(missing)} image(s) of the split ({shown}); "
            "use the proposal file made for this split"
        )
    return {image_id: mat_to_boxes(by_id[image_id]) for image_id in image_ids}


def _mat_string(item: object) -> str:
    """An image id from a ``.mat`` cell (array of one string) or a char-matrix row."""
    while isinstance(item, np.ndarray):
        if item.size == 0:
            return ""
        item = item.ravel()[0] if item.dtype == object or item.size == 1 else "".join(item.ravel())
    return str(item).strip()


# --- post-processing ----------------------------------------------------------------------------


def filter_boxes(boxes: np.ndarray, min_size: int, max_per_image: int) -> np.ndarray:
    """Drop boxes narrower or shorter than ``min_size`` px, then exact duplicates, then cap.

    Order is kept (first occurrence of a duplicate wins), so a cap keeps the best-ranked boxes.
    ``max_per_image`` 0 keeps all. Returns float32 (R', 4).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    boxes = boxes[(widths >= min_size) & (heights >= min_size)]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return boxes[:max_per_image] if max_per_image > 0 else boxes


def downscale_factor(image_hw: tuple[int, int], max_side: int) -> float:
    """Factor (≤ 1) that brings the longer side down to ``max_side``; 1 when ``max_side`` is 0."""
    longer = max(image_hw)
    return max_side / longer if 0 < max_side < longer else 1.0


def propose_image(
    image_rgb: np.ndarray,
    method: str,
    *,
    mode: str = "fast",
    base_k: int = 150,
    inc_k: int = 150,
    sigma: float = 0.8,
    edge_model: str | None = None,
    edge_max_boxes: int = 2000,
    max_side: int = 0,
    min_size: int = 20,
    max_per_image: int = 0,
) -> np.ndarray:
    """Proposals of one image: downscale if needed, run ``method``, map back, clip, filter.

    ``method`` is "selective_search" or "edge_boxes" (see those functions for the other
    arguments). An image whose longer side exceeds ``max_side`` (> 0) is shrunk for the proposal
    step only; boxes come back in original pixels. ``min_size`` applies in original pixels.
    Returns float32 (R, 4).
    """
    require_ximgproc(method)
    image_hw = image_rgb.shape[:2]
    factor = downscale_factor(image_hw, max_side)
    small = image_rgb
    if factor < 1.0:
        size = (max(1, round(image_hw[1] * factor)), max(1, round(image_hw[0] * factor)))
        small = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    if method == "selective_search":
        boxes = selective_search(small, mode, base_k, inc_k, sigma)
    elif method == "edge_boxes":
        boxes = edge_boxes(small, edge_model, edge_max_boxes)
    else:
        raise ValueError(f"method must be selective_search or edge_boxes, got {method!r}")
    if factor < 1.0:
        scale_back = np.array(
            [image_hw[1] / small.shape[1], image_hw[0] / small.shape[0]] * 2, dtype=np.float32
        )
        boxes = boxes * scale_back
    return filter_boxes(clip_boxes(boxes, image_hw), min_size, max_per_image)


def windows_of(record: ImageRecord, proposals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All windows of an image, gt first as in the original roidb.

    docs/method.md#conventions-and-box-format.

    Returns boxes (G + R, 4) float32 and is_gt (G + R,) bool.
    """
    boxes = np.concatenate([record.gt_boxes, proposals]).astype(np.float32, copy=False)
    is_gt = np.zeros(len(boxes), dtype=bool)
    is_gt[: len(record.gt_boxes)] = True
    return boxes, is_gt


# --- recall report ------------------------------------------------------------------------------


def best_overlaps(gt_boxes: np.ndarray, boxes: np.ndarray, top_n: Sequence[int]) -> np.ndarray:
    """For each gt box, the best IoU with the first N proposals, for each N in ``top_n``.

    gt_boxes (G, 4), boxes (R, 4) in rank order; N = 0 means all boxes. Returns (len(top_n), G).
    """
    import torch
    from torchvision.ops import box_iou

    gt_count = len(gt_boxes)
    if gt_count == 0 or len(boxes) == 0:
        return np.zeros((len(top_n), gt_count), dtype=np.float32)
    iou = box_iou(torch.as_tensor(gt_boxes, dtype=torch.float32), torch.as_tensor(boxes)).numpy()
    running = np.maximum.accumulate(iou, axis=1)  # (G, R): best IoU among the first r+1 boxes
    last = [min(n, len(boxes)) - 1 if n > 0 else len(boxes) - 1 for n in top_n]
    return running[:, last].T


def proposal_recall(
    gt_boxes_per_image: Sequence[np.ndarray],
    boxes_per_image: Sequence[np.ndarray],
    top_n: Sequence[int] = (*RECALL_TOP_N, 0),
) -> dict[str, dict[str, float]]:
    """Recall over all gt boxes of a split at IoU 0.5 and 0.7, and average recall (AR).

    AR is the mean recall over IoU 0.5:0.05:0.95. ``top_n`` 0 means all boxes. Returns
    ``{"100": {"recall_0.5": r, "recall_0.7": r, "average_recall": ar}, …, "all": {…}}``.
    """
    columns = [
        best_overlaps(gt, boxes, top_n)
        for gt, boxes in zip(gt_boxes_per_image, boxes_per_image, strict=True)
    ]
    overlaps = np.concatenate(columns, axis=1) if columns else np.zeros((len(top_n), 0))
    report: dict[str, dict[str, float]] = {}
    for row, n in zip(overlaps, top_n, strict=True):
        if row.size == 0:
            recall = dict.fromkeys(RECALL_IOUS, 0.0)
            average = 0.0
        else:
            recall = {t: float((row >= t).mean()) for t in RECALL_IOUS}
            average = float(np.mean([(row >= t).mean() for t in AVERAGE_RECALL_IOUS]))
        entry = {f"recall_{t}": value for t, value in recall.items()}
        entry["average_recall"] = average
        report[str(n) if n > 0 else "all"] = entry
    return report


def format_recall_table(recall: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of :func:`proposal_recall`'s result, one row per top-N."""
    header = f"{'top N':>6}  {'recall@0.5':>10}  {'recall@0.7':>10}  {'AR@0.5:0.95':>11}"
    lines = [header, "-" * len(header)]
    for name, entry in recall.items():
        lines.append(
            f"{name:>6}  {entry['recall_0.5']:>10.3f}  {entry['recall_0.7']:>10.3f}  "
            f"{entry['average_recall']:>11.3f}"
        )
    return "\n".join(lines)
