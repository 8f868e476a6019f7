"""Every device rule in one place: which device a command runs on, the device's errors, copies
to it that do not wait, and the precision layers run in (docs/gpu.md).

* Which device: ``default_device`` (cuda when there is one), ``rank_device`` (one GPU per rank
  under torchrun) and ``resolve_device`` (a usable torch device, or one line naming the fix).
* Its errors: ``device_errors`` turns an error of the CUDA device, or out of the machine's own
  memory, into one line naming the image and the images kept (``DeviceFailure``);
  ``is_out_of_memory`` tells a failed allocation, on the device or the host.
* Copies (docs/method.md#gpu-path): the per-image work is planned on the CPU (window cells,
  pooling look-ups, row orders) and run on the device. A copy from ordinary (pageable) host
  memory makes the host wait until the device has finished the work queued before it, which
  would stall the CPU once per copy. A copy from page-locked memory with ``non_blocking=True``
  is only queued, and torch keeps the page-locked block until the copy is done, so the CPU plans
  the next image while the device works (``to_device``).
* Precision: the dtype that conv and linear layers run in under ``torch.autocast``. ``fp32``
  (the default) runs everything in float32. ``bf16`` and ``fp16`` run the conv trunk
  (``extract.precision``) or fc6/fc7 (``test.precision``) under ``torch.autocast`` on the
  device; their outputs are returned as float32. They pay off on GPUs with tensor cores; on a
  CPU without bf16/fp16 instructions they are several times slower than fp32
  (docs/benchmarks-history.md). How far they move the scores and the mAP is tested on the toy set
  (tests/test_pipeline.py).

The one module of ``runtime/`` that loads torch (and OpenCV, whose allocation errors it reads):
the CLI imports it only once the config has passed its checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import torch
from torch import Tensor

from spp_detect.errors import UserError
from spp_detect.runtime.distributed import Dist

# a RuntimeError raised by the CUDA device (kernel, cuBLAS, cuDNN) says one of these
CUDA_ERROR_MARKERS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error")
# How a failed allocation in host memory reads: torch's CPU allocator ("DefaultCPUAllocator:
# can't allocate memory"), OpenCV ("Insufficient memory", "Failed to allocate"); numpy raises
# MemoryError.
HOST_MEMORY_MARKERS = ("can't allocate memory", "Insufficient memory", "Failed to allocate")
REASON_CHARS = 160  # a device error's reason is cut to this length in the one-line message


# --- which device -------------------------------------------------------------------------------


def default_device() -> str:
    """``cuda`` when this machine has a CUDA device, else ``cpu`` (``--device``'s default)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def rank_device(dist: Dist, device: str) -> str:
    """The device this rank uses: plain ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per
    rank); an explicit index or the CPU stays as given."""
    return f"cuda:{dist.local_rank}" if dist.active and device == "cuda" else device


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device; UserError for a malformed name, a device type other than cpu and
    cuda, no CUDA device, or a CUDA index beyond the machine's devices."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a torch device; use cpu or cuda") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: unsupported device type; use cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device available; use --device cpu")
    count = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if resolved.index is not None and resolved.type == "cuda" and resolved.index >= count:
        raise UserError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; pick one of them or use --device cuda"
        )
    return resolved


# --- its errors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFailure:
    """An error raised by the CUDA device while a stage worked on one image: ``out_of_memory``,
    and ``reason``, the error's first sentence (without "CUDA error: ", cut to REASON_CHARS);
    ``on_host``: out of the machine's own memory instead."""

    out_of_memory: bool
    reason: str
    on_host: bool = False

    def message(self, where: str, doing: str, done: int, lower_memory: str) -> str:
        """The one line of a stage stopped by this error at ``where`` (the image) while
        ``doing`` ("extracting"), with ``done`` images of the split kept; ``lower_memory`` names
        the settings that lower memory."""
        kept = {0: "no image done yet", 1: "the 1 image done is kept"}.get(
            done, f"the {done} images done are kept"
        )
        if self.on_host:
            what = f"out of memory while {doing} ({self.reason}); lower it with {lower_memory}"
        elif self.out_of_memory:
            what = f"out of GPU memory while {doing}; lower it with {lower_memory}"
        else:
            what = f"CUDA error while {doing} ({self.reason})"
        return f"{where}: {what}; {kept}; rerun to resume"


def device_failure(exc: BaseException) -> DeviceFailure | None:
    """What ``exc`` says about the CUDA device; None when the device did not raise it.

    The device's errors: ``torch.cuda.OutOfMemoryError``, ``torch.AcceleratorError`` (in the
    torch versions that have it: a failed CUDA call), and a RuntimeError whose text holds one of
    CUDA_ERROR_MARKERS (older torch, cuBLAS, cuDNN). After an error other than out of memory
    the CUDA context is usually unusable, so a stage stops instead of carrying on."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    raised_by_device = (
        isinstance(exc, torch.cuda.OutOfMemoryError)
        or (accelerator_error is not None and isinstance(exc, accelerator_error))
        or (isinstance(exc, RuntimeError) and any(m in text for m in CUDA_ERROR_MARKERS))
    )
    if not raised_by_device:
        return None
    first = _first_sentence(exc)
    reason = first.removeprefix("CUDA error: ") or type(exc).__name__
    out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first
    return DeviceFailure(out_of_memory, _cut(reason))


def host_memory_failure(exc: BaseException) -> DeviceFailure | None:
    """``exc`` as a failed allocation in the machine's own memory (numpy's MemoryError, or
    HOST_MEMORY_MARKERS in torch's or OpenCV's error); None for any other error."""
    text = str(exc)
    failed = isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError | cv2.error) and any(m in text for m in HOST_MEMORY_MARKERS)
    )
    if not failed:
        return None
    sentences = text.strip().split("\n")[0].split(". ")  # torch's starts "[enforce fail ...]"
    reason = next((p for p in sentences if any(m in p for m in HOST_MEMORY_MARKERS)), sentences[0])
    return DeviceFailure(True, _cut(reason.rstrip(".") or type(exc).__name__), on_host=True)


def _first_sentence(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0].split(". ")[0].strip().rstrip(".")


def _cut(reason: str) -> str:
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"


@contextlib.contextmanager
def device_errors(
    where: str, doing: str, done: int, lower_memory: str, before: Callable[[], None] | None = None
) -> Iterator[None]:
    """An error of the CUDA device inside, or out of the machine's memory, becomes a UserError
    with the one line of :meth:`DeviceFailure.message`; ``before()`` runs first (to finish
    writing the images done). Any other error passes through."""
    try:
        yield
    except (RuntimeError, MemoryError, cv2.error) as exc:
        failure = device_failure(exc) or host_memory_failure(exc)
        if failure is None:
            raise
        if before is not None:
            before()
        raise UserError(failure.message(where, doing, done, lower_memory)) from None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: ``torch.cuda.OutOfMemoryError``, numpy's
    ``MemoryError``, or a RuntimeError that says so (torch's CPU allocator, older CUDA)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


# --- copies -------------------------------------------------------------------------------------


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


# --- precision --------------------------------------------------------------------------------

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
