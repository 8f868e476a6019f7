"""Host → device copies that do not wait for the device (docs/method.md#gpu-path).

The per-image work is planned on the CPU (window cells, pooling look-ups, row orders) and run on
the device. A copy from ordinary (pageable) host memory makes the host wait until the device has
finished the work queued before it, which would stall the CPU once per copy. A copy from
page-locked memory with ``non_blocking=True`` is only queued, and torch keeps the page-locked
block until the copy is done, so the CPU plans the next image while the device works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """CPU ``tensors`` (all one dtype; ValueError otherwise) on ``device``, in one queued copy
    on CUDA.

    On CUDA they are packed into one page-locked buffer, so one copy serves them all; the
    results are views of one device buffer. On the CPU they are returned as they are; on any
    other device (``meta`` in the tests) copied with ``.to``.
    """
    if device.type == "cpu" or not tensors:
        return list(tensors)
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise ValueError(f"to_device packs tensors of one dtype, got {dtypes}")
    on_cuda = device.type == "cuda"
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=on_cuda)
    torch.cat([t.reshape(-1) for t in tensors], out=flat)
    flat = flat.to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors, strict=True)]
