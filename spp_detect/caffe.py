"""``spp_detect.caffe``: the stable name of the Caffe conversion contract
(docs/contracts.md#public-functions). The converter lives in ``spp_detect.models.caffe``."""

from spp_detect.models.caffe import caffe_messages, convert_caffemodel, read_caffemodel

__all__ = ["caffe_messages", "convert_caffemodel", "read_caffemodel"]
