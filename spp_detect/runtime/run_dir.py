"""The only code that knows where artefacts live under a run directory (docs/contracts.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PARENT = Path("runs")  # without --run-dir, a run goes to runs/<config name>


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, run_dir: str | Path | None, config_name: str) -> RunDir:
        """``--run-dir``, or ``runs/<config name>`` without it."""
        return cls(Path(run_dir) if run_dir else DEFAULT_PARENT / config_name)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def timings_path(self) -> Path:
        """Seconds and peak memory of each stage's last run (for the report)."""
        return self.root / "timings.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    # propose
    def proposals_dir(self, split: str) -> Path:
        return self.root / "proposals" / split

    def proposal_path(self, split: str, image_id: str) -> Path:
        return self.proposals_dir(split) / f"{image_id}.npz"

    def proposal_report_path(self, split: str) -> Path:
        return self.proposals_dir(split) / "report.json"

    # extract
    def features_dir(self, split: str) -> Path:
        return self.root / "features" / split

    def feature_path(self, split: str, image_id: str) -> Path:
        return self.features_dir(split) / f"{image_id}.npz"

    # finetune
    @property
    def finetune_dir(self) -> Path:
        return self.root / "finetune"

    @property
    def head_path(self) -> Path:
        return self.finetune_dir / "head.pt"

    @property
    def history_path(self) -> Path:
        return self.finetune_dir / "history.json"

    @property
    def trunk_path(self) -> Path:
        """The fine-tuned conv trunk (end-to-end fine-tuning only), loadable as weights."""
        return self.finetune_dir / "trunk.pt"

    @property
    def checkpoint_path(self) -> Path:
        return self.finetune_dir / "checkpoint.pt"

    # train-svm
    @property
    def svm_dir(self) -> Path:
        return self.root / "svm"

    @property
    def svm_path(self) -> Path:
        return self.svm_dir / "svms.npz"

    @property
    def svm_report_path(self) -> Path:
        return self.svm_dir / "report.json"

    # train-bbox
    @property
    def bbox_dir(self) -> Path:
        return self.root / "bbox_reg"

    @property
    def bbox_path(self) -> Path:
        return self.bbox_dir / "regressors.npz"

    @property
    def bbox_report_path(self) -> Path:
        return self.bbox_dir / "report.json"

    # test
    @property
    def detections_dir(self) -> Path:
        return self.root / "detections"

    def detections_path(self, split: str) -> Path:
        return self.detections_dir / f"{split}.npz"

    def detection_parts_dir(self, split: str) -> Path:
        """Per-image detections of a split (the test stage's resumable items)."""
        return self.detections_dir / split

    def detection_part_path(self, split: str, image_id: str) -> Path:
        return self.detection_parts_dir(split) / f"{image_id}.npz"

    # eval
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_path(self, split: str) -> Path:
        return self.eval_dir / f"{split}.json"

    def devkit_dir(self, name: str) -> Path:
        """``name``: the split, or ``<split>_combined`` for a model combination."""
        return self.eval_dir / name

    def devkit_paths(self, name: str, split: str, class_names: Sequence[str]) -> list[Path]:
        """One devkit result file per class, ``comp4_det_<split>_<class>.txt`` (the devkit's
        naming; comp4 = trained on data outside VOC)."""
        folder = self.devkit_dir(name)
        return [folder / f"comp4_det_{split}_{class_name}.txt" for class_name in class_names]

    def coco_results_path(self, name: str) -> Path:
        """The detections as a COCO results JSON (`eval --metric coco`)."""
        return self.devkit_dir(name) / "coco_results.json"

    def pr_curve_path(self, name: str) -> Path:
        return self.eval_dir / f"{name}_pr.png"

    # detect and demo
    @property
    def detect_dir(self) -> Path:
        """Default output folder of `spp-detect detect`."""
        return self.root / "detect"

    def demo_picture_path(self, image_id: str) -> Path:
        return self.root / "demo" / f"{image_id}.png"

    def lock_path(self, stage: str, split: str) -> Path:
        """The lock file a process holds while it writes ``stage`` of ``split``."""
        return self.root / ".locks" / f"{stage}.{split}.lock"

    def rank_token_path(self, stage: str, split: str) -> Path:
        """The token rank 0 writes under torchrun for the other ranks to read back (they must
        share the run directory)."""
        return self.root / ".locks" / f"{stage}.{split}.token"

    # the folder whose manifest.json closes each stage
    def stage_dir(self, stage: str, split: str) -> Path:
        """The folder whose manifest.json closes ``stage`` (for ``split``, where it has one)."""
        return {
            "propose": self.proposals_dir(split),
            "extract": self.features_dir(split),
            "finetune": self.finetune_dir,
            "train-svm": self.svm_dir,
            "train-bbox": self.bbox_dir,
            "test": self.detection_parts_dir(split),
            "eval": self.devkit_dir(split),
        }[stage]
