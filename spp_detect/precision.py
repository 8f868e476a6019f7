"""Mixed precision: the dtype that conv and linear layers run in under ``torch.autocast``.

``fp32`` (the default) runs everything in float32. ``bf16`` and ``fp16`` run the conv trunk
(``extract.precision``) or fc6/fc7 (``test.precision``) under ``torch.autocast`` on the device;
their outputs are returned as float32. They pay off on GPUs with tensor cores; on a CPU without
bf16/fp16 instructions they are several times slower than fp32 (docs/benchmarks-history.md).
How far they move the scores and the mAP is tested on the toy set (tests/test_pipeline.py).
"""

from __future__ import annotations

import contextlib

import torch

from spp_detect.errors import UserError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_precision(precision: str, key: str) -> None:
    """UserError naming the config ``key`` when ``precision`` is not fp32, bf16 or fp16."""
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"{key}: must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs conv and linear layers on ``device`` in ``precision``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
