"""Model combination: two runs' detections of a split pooled, then NMS (SPP-net §4.4;
docs/method.md#evaluation-rules).

Shapes: M detections, N images.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from spp_detect.models.inference import by_class
from spp_detect.structures import Detections


def combine_detections(first: Detections, second: Detections, nms_thresh: float) -> Detections:
    """The union of two runs' detections, reduced by per-image, per-class NMS.

    The paper's model combination (SPP-net §4.4: pool both models' detections, then NMS).
    Images are matched by id; the result lists ``first``'s images, then any only in ``second``,
    and its detections ordered by image, class, then descending score.
    """
    image_ids = list(first.image_ids.tolist())
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    for image_id in second.image_ids.tolist():
        if image_id not in position:
            position[image_id] = len(image_ids)
            image_ids.append(image_id)
    remap = np.array([position[i] for i in second.image_ids.tolist()], np.int64)
    image_index = np.concatenate([first.image_index, remap[second.image_index]])
    boxes = torch.from_numpy(np.concatenate([first.boxes, second.boxes]))
    scores = torch.from_numpy(np.concatenate([first.scores, second.scores]))
    labels = torch.from_numpy(np.concatenate([first.labels, second.labels]))
    by_image = np.argsort(image_index, kind="stable")
    images, starts = np.unique(image_index[by_image], return_index=True)
    kept = []
    for group in np.split(by_image, starts[1:]) if len(images) else []:
        rows = torch.from_numpy(group)
        keep = rows[batched_nms(boxes[rows], scores[rows], labels[rows], nms_thresh)]
        kept.append(keep[by_class(labels[keep], scores[keep], None)])
    keep = torch.cat(kept).numpy() if kept else np.zeros(0, np.int64)
    return Detections(
        image_ids=np.asarray(image_ids, dtype=str),
        image_index=image_index[keep],
        boxes=boxes.numpy()[keep],
        scores=scores.numpy()[keep],
        labels=labels.numpy()[keep],
    )
