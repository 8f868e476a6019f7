"""Reading images, resizing them to a shorter side, and normalising them for a backbone.

Images are numpy uint8 (H, W, 3) in RGB order everywhere in the package.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from spp_detect.errors import UserError


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB; grayscale is replicated to 3 channels."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found; check data.root and the split file")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"{path}: not a readable image; replace the file or drop its id from the split")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
