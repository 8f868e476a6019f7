"""End-to-end fine-tuning: the conv trunk from a chosen layer on, the pyramid, fc6, fc7 and the
classifier, trained from images (docs/method.md#conv-fine-tuning).

Shapes: N entries (an image or its mirror), R windows of an entry, B windows of a minibatch,
C channels, D = C·Σn² pooled dim, K foreground classes.

Sampling follows Fast R-CNN: each minibatch takes ``images_per_batch`` entries (every image
appears as itself and mirrored), at a uniformly random scale each, and B / images windows from
each, ``fg_fraction`` of them foreground where the entry has enough. Entries are visited in a
fresh permutation per epoch; an iteration's draw depends only on (seed, iteration), so a resumed
run draws what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.data.image import flip_image, image_to_tensor, resize_short_side
from spp_detect.errors import UserError
from spp_detect.models.backbones import Backbone
from spp_detect.models.features import effective_scales, read_record_image
from spp_detect.models.head import BatchRows, input_normalization_for
from spp_detect.ops.spp import PoolGeometry, trainable_pyramid_pool, window_cells
from spp_detect.runtime.device import is_out_of_memory
from spp_detect.runtime.distributed import Dist
from spp_detect.structures import ImageRecord
from spp_detect.train.finetune import (
    BIAS_LR_MULT,
    RankShare,
    SgdSchedule,
    StepFn,
    Trainer,
    train_step,
)
from spp_detect.train.sampling import WindowPool

logger = logging.getLogger(__name__)

NORMALIZATION_ENTRIES = 16  # entries whose pooled windows set a random head's input statistics
# Seed-sequence keys (seed, index, stream): the epoch permutations, the windows of each iteration
# and the draw for the input statistics never share random numbers.
PERMUTATION_STREAM, WINDOW_STREAM, NORMALIZATION_STREAM = 0, 1, 2


@dataclass(frozen=True)
class ImageSampling:
    """How end-to-end minibatches are made: ``images_per_batch`` entries, each at one of
    ``scales`` (shorter sides, px; longer side capped at ``max_long_side`` when > 0)."""

    images_per_batch: int
    scales: tuple[int, ...]
    max_long_side: int


@dataclass
class TrainingImages:
    """The training split for end-to-end fine-tuning: records and their labelled windows, the
    pool's windows grouped by entry (``entry_start`` (N+1,) offsets; the pool lists each entry's
    windows contiguously), the entries with at least one window (``usable`` (N',), the ones
    minibatches draw from: an image without objects of the classes may have none), and how
    windows map to conv cells."""

    records: Sequence[ImageRecord]
    pool: WindowPool
    entry_start: np.ndarray
    usable: np.ndarray
    geometry: PoolGeometry

    @classmethod
    def from_pool(
        cls, records: Sequence[ImageRecord], pool: WindowPool, geometry: PoolGeometry
    ) -> TrainingImages:
        if np.any(np.diff(pool.window_entry) < 0):
            raise ValueError("the pool must list each entry's windows contiguously")
        starts = np.searchsorted(pool.window_entry, np.arange(len(pool.entry_image) + 1))
        usable = np.flatnonzero(np.diff(starts) > 0)
        if len(usable) == 0:
            raise ValueError("no entry has a window to train on")
        return cls(records, pool, starts, usable, geometry)

    def entries(self, count: int, iteration: int, seed: int) -> np.ndarray:
        """The ``count`` usable entries of an iteration (``iteration_entries``)."""
        return self.usable[iteration_entries(len(self.usable), count, iteration, seed)]


def freeze_below(trunk: Backbone, first_trainable: int) -> list[nn.Parameter]:
    """Make the trunk's layers from index ``first_trainable`` on trainable, the ones before it
    frozen; returns the trainable parameters."""
    trunk.requires_grad_(False)
    trainable = [p for layer in trunk.features[first_trainable:] for p in layer.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def add_trunk_to_optimizer(
    optimizer: torch.optim.Optimizer, trunk: Backbone, first_trainable: int, lr_mult: float
) -> None:
    """The trainable conv layers join the head's SGD at ``lr_mult`` times its rate, biases
    twice that (the head's multipliers, docs/method.md#fine-tuning-and-sampling)."""
    # inside blocks too: a Lite trunk's layers are MBConv blocks, not convs
    convs = [m for m in trunk.features[first_trainable:].modules() if isinstance(m, nn.Conv2d)]
    weights = [conv.weight for conv in convs]
    biases = [conv.bias for conv in convs if conv.bias is not None]
    optimizer.add_param_group({"params": weights, "lr_mult": lr_mult})
    optimizer.add_param_group({"params": biases, "lr_mult": lr_mult * BIAS_LR_MULT})


def iteration_entries(num_entries: int, images_per_batch: int, iteration: int, seed: int):
    """The entries (images_per_batch,) of one iteration: consecutive positions of a seeded
    permutation of all entries, a new permutation per epoch."""
    positions = np.arange(iteration * images_per_batch, (iteration + 1) * images_per_batch)
    epochs, offsets = np.divmod(positions, num_entries)

    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, PERMUTATION_STREAM]).permutation(num_entries)

    return np.array(
        [permutation(int(epoch))[offset] for epoch, offset in zip(epochs, offsets, strict=True)],
        dtype=np.int64,
    )


def sample_entry_windows(
    rng: np.random.Generator,
    labels: np.ndarray,
    num_classes: int,
    windows_per_image: int,
    fg_fraction: float,
) -> np.ndarray:
    """Rows (≤ windows_per_image,) of one entry's windows with labels (R,): up to
    round(fg_fraction · windows_per_image) foreground, background for the rest, each drawn
    without replacement (Fast R-CNN ``_sample_rois``)."""
    foreground = np.flatnonzero(labels < num_classes)
    background = np.flatnonzero(labels == num_classes)
    num_fg = min(round(fg_fraction * windows_per_image), len(foreground))
    num_bg = min(windows_per_image - num_fg, len(background))
    chosen = [
        rng.choice(foreground, num_fg, replace=False),
        rng.choice(background, num_bg, replace=False),
    ]
    return np.concatenate(chosen).astype(np.int64)


@dataclass
class EndToEnd:
    """A trunk trained from layer index ``first_trainable`` on, the images it learns from and
    how minibatches are drawn, on ``device``."""

    trunk: Backbone
    first_trainable: int
    images: TrainingImages
    sampling: ImageSampling
    device: torch.device

    def draw(
        self, rng: np.random.Generator, entry: int, windows_per_image: int, fg_fraction: float
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """An entry's sampled window rows (≤ windows_per_image,), their labels and a uniformly
        random training scale of ``sampling.scales``. Rows index the entry's windows: pool row
        ``entry_start[entry] + row``."""
        images = self.images
        labels = images.pool.labels[images.entry_start[entry] : images.entry_start[entry + 1]]
        rows = sample_entry_windows(
            rng, labels, images.pool.num_classes, windows_per_image, fg_fraction
        )
        scales = self.sampling.scales
        return rows, labels[rows], int(scales[int(rng.integers(len(scales)))])

    def pooled(self, entry: int, rows: np.ndarray, scale: int) -> Tensor:
        """Pooled features (len(rows), D) of windows ``rows`` of ``entry`` at ``scale``, with
        gradients to the trainable conv layers. Frozen layers run without autograd, so they keep
        no activations for the backward pass."""
        pool, trunk = self.images.pool, self.trunk
        record = self.images.records[int(pool.entry_image[entry])]
        image = read_record_image(record)
        if pool.entry_flipped[entry]:
            image = flip_image(image)
        max_long_side = self.sampling.max_long_side
        resized = resize_short_side(image, scale, max_long_side)
        # the shorter side the image really got (less than the scale under a long-side cap)
        short_side = effective_scales(record.image_hw, [scale], max_long_side)[0]
        pixels = image_to_tensor(resized, trunk.normalization, self.device)
        x = pixels[None].contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            x = trunk.features[: self.first_trainable](x)
        fmap = trunk.features[self.first_trainable :](x)[0]
        boxes = pool.boxes[self.images.entry_start[entry] + rows]
        g = self.images.geometry
        cells = window_cells(
            boxes, record.image_hw, [short_side], torch.zeros(len(rows), dtype=torch.long),
            [tuple(fmap.shape[1:])], g,
        )  # fmt: skip
        return trainable_pyramid_pool(fmap, cells, g.levels)


def end_to_end_step(
    trainer: Trainer, model: EndToEnd, schedule: SgdSchedule, dist: Dist | None = None
) -> StepFn:
    """The SGD step of end-to-end fine-tuning for ``finetune.run_sgd``.

    ``dist`` (under torchrun): every rank draws the whole minibatch (the same entries, windows
    and scales), runs the trunk on its share of the images (``image_share``) and the head on
    their windows, and the gradients of the head and the trainable conv layers are summed over
    the ranks before the step (``finetune.RankShare``): the model one process trains, up to
    the order of float sums.
    """
    windows_per_image = schedule.batch_size // model.sampling.images_per_batch
    dist = dist or Dist()

    def step(iteration: int) -> tuple[float, int, int]:
        rng = np.random.default_rng([schedule.seed, iteration, WINDOW_STREAM])
        entries = model.images.entries(model.sampling.images_per_batch, iteration, schedule.seed)
        drawn = [
            model.draw(rng, entry, windows_per_image, schedule.fg_fraction)
            for entry in entries.tolist()
        ]
        mine = image_share(dist, len(drawn))
        starts = np.cumsum([0] + [len(rows) for rows, _, _ in drawn])
        share = None
        if dist.active:
            rows = BatchRows(int(starts[mine.start]), int(starts[mine.stop]), int(starts[-1]))
            share = RankShare(rows, dist)
        features, targets, box_targets = [], [], []
        for entry, (rows, labels, scale) in zip(entries[mine], drawn[mine], strict=True):
            features.append(_guarded(model.pooled, int(entry), rows, scale))
            targets.append(torch.as_tensor(labels, device=model.device))
            pool_rows = model.images.entry_start[entry] + rows
            box_targets.append(torch.as_tensor(model.images.pool.box_targets[pool_rows]))
        # finetune.train_step's backward keeps the activations of both images: OOM-guarded too
        loss, correct = _guarded(
            train_step, trainer.head, trainer.optimizer, torch.cat(features), torch.cat(targets),
            trainer.generator, torch.cat(box_targets), schedule.box_loss_weight, share,
        )  # fmt: skip
        return loss, correct, int(starts[-1])

    return step


def image_share(dist: Dist, images: int) -> slice:
    """This rank's contiguous share of a minibatch's ``images`` (all of them for one process;
    counts within one of each other). Needs ``images ≥ dist.world``."""
    return slice(images * dist.rank // dist.world, images * (dist.rank + 1) // dist.world)


def _guarded(function, *args):
    """``function(*args)``, an out-of-memory error turned into one line naming the settings
    that lower memory."""
    try:
        return function(*args)
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        raise UserError(
            "finetune: out of memory while training the conv layers; lower it with a later "
            "finetune.conv_from, finetune.images_per_batch=1, smaller extract.scales or "
            "extract.max_long_side (e.g. 1000)"
        ) from None


@torch.no_grad()
def input_statistics(model: EndToEnd, schedule: SgdSchedule) -> tuple[Tensor, Tensor]:
    """Shift (D,) and scale (D,) standardising the pooled windows of the first
    NORMALIZATION_ENTRIES entries drawn, from the trunk as it starts (a random head's inputs,
    ``head.input_normalization_for``)."""
    rng = np.random.default_rng([schedule.seed, 0, NORMALIZATION_STREAM])
    windows_per_image = schedule.batch_size // model.sampling.images_per_batch
    count = min(NORMALIZATION_ENTRIES, len(model.images.usable))
    pooled = []
    for entry in model.images.entries(count, 0, schedule.seed).tolist():
        rows, _, scale = model.draw(rng, entry, windows_per_image, schedule.fg_fraction)
        pooled.append(model.pooled(entry, rows, scale))
    return input_normalization_for(torch.cat(pooled))
