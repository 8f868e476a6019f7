"""``spp_detect.backbones``: the stable name of the trunk contract
(docs/contracts.md#public-functions). The trunks live in ``spp_detect.models.backbones``."""

from spp_detect.models.backbones import conv_layout, receptive_center
from spp_detect.models.weights import CAFFE_MEAN_KEY, LRN_BEFORE_POOL_KEY, build_backbone

__all__ = [
    "CAFFE_MEAN_KEY",
    "LRN_BEFORE_POOL_KEY",
    "build_backbone",
    "conv_layout",
    "receptive_center",
]
