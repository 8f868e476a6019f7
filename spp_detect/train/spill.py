"""Regression examples gathered image by image and spilled to disk per class, so that
train-bbox holds one class's features at a time (~13 GB of float16 pool5 at VOC 2007 scale;
docs/method.md#bounding-box-regression)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from spp_detect.runtime.artifacts import is_write_error, write_error

# One raw float16 file per class in the stage folder. The name fits ``atomic_path``'s temporary
# files (".*.tmp"): the stage's start (``locked``: remove_stale_temporaries) deletes what a
# killed run left, and ``folder_token`` skips it (leading ".", not an artefact suffix).
SPILL_NAME = ".examples.class{label:03d}.f16.tmp"


class ExampleSpill:
    """K classes' regression examples gathered image by image: pool5 features (E, D) float16
    appended to one raw file per class in ``folder``, windows and assigned gt (E, 4) kept in RAM
    (32 B an example). A context manager; leaving it, also on an error, deletes the files.
    """

    def __init__(self, folder: str | Path, num_classes: int, dim: int) -> None:
        self.folder = Path(folder)
        self.paths = [self.folder / SPILL_NAME.format(label=k) for k in range(num_classes)]
        self.dim = dim
        self.rows = [0] * num_classes
        self.boxes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.gt: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self._files: dict[int, BinaryIO] = {}

    def __enter__(self) -> ExampleSpill:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._files.values():
            # the file goes anyway, and an error here would hide the one that brought us here
            with contextlib.suppress(OSError):
                handle.close()
        self._files.clear()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def append(self, label: int, features: np.ndarray, boxes: np.ndarray, gt: np.ndarray) -> None:
        """Add E examples of class ``label``: features (E, D), windows (E, 4), their gt (E, 4)."""
        features = np.ascontiguousarray(features, np.float16)
        if features.shape != (len(boxes), self.dim) or len(gt) != len(boxes):
            raise ValueError(f"need features (E, {self.dim}), boxes and gt (E, 4)")
        path = self.paths[label]
        try:
            if label not in self._files:  # a fresh file, or more rows after examples()
                self._files[label] = open(path, "ab" if self.rows[label] else "wb")  # noqa: SIM115
            self._files[label].write(features.data)
        except OSError as exc:
            raise _spill_error(path, exc) from None
        self.rows[label] += len(features)
        self.boxes[label].append(boxes)
        self.gt[label].append(gt)

    def examples(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per class (pool5 (R_k, D) float16, a read-only memmap of the spill when R_k > 0;
        windows (R_k, 4); assigned gt (R_k, 4)). Closes (flushes) the files first; a later
        ``append`` reopens them."""
        self._close()
        return [self._class_examples(label) for label in range(len(self.paths))]

    def _class_examples(self, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.rows[label] == 0:  # no file: a memmap cannot map an empty one
            empty = np.zeros((0, 4), np.float32)
            return np.zeros((0, self.dim), np.float16), empty, empty
        features = np.memmap(
            self.paths[label], np.float16, mode="r", shape=(self.rows[label], self.dim)
        )
        return features, np.concatenate(self.boxes[label]), np.concatenate(self.gt[label])

    def _close(self) -> None:
        """Close the files, raising the first write error (``__exit__`` closes the others)."""
        while self._files:
            label, handle = self._files.popitem()
            try:
                handle.close()  # flushes: a full disk may only show here
            except OSError as exc:
                raise _spill_error(self.paths[label], exc) from None


def _spill_error(path: Path, exc: OSError) -> Exception:
    """A full or read-only disk as one line naming the spill file (``write_error``)."""
    return write_error(path, exc) if is_write_error(exc) else exc
