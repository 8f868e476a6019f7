"""``spp_detect.spp``: the stable name of the pooling contract (docs/contracts.md#public-functions).
The ops live in ``spp_detect.ops.spp``."""

from spp_detect.ops.spp import (
    SpatialPyramidPool,
    project_boxes,
    pyramid_dim,
    select_scale,
    spatial_pyramid_pool,
)

__all__ = [
    "SpatialPyramidPool",
    "project_boxes",
    "pyramid_dim",
    "select_scale",
    "spatial_pyramid_pool",
]
