"""The only code that knows where artefacts live under a run directory (ARCHITECTURE.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

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

    # eval
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_path(self, split: str) -> Path:
        return self.eval_dir / f"{split}.json"

    def devkit_dir(self, split: str) -> Path:
        return self.eval_dir / split

    def devkit_path(self, split: str, class_name: str) -> Path:
        return self.devkit_dir(split) / f"comp4_det_{split}_{class_name}.txt"
