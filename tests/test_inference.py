import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.evaluation.combine import combine_detections
from spp_detect.models.inference import (
    by_class,
    detect_image,
    finalize_detections,
    select_detections,
)
from spp_detect.structures import Detections
from spp_detect.testing import cpu_and_cuda

# Two heavily overlapping boxes (IoU 0.82), one apart, one overlapping the first by IoU 0.25.
BOXES = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [1.0, 0.0, 11.0, 10.0],
        [50.0, 50.0, 60.0, 60.0],
        [0.0, 0.0, 10.0, 2.5],
    ]
)


def test_threshold_is_strict():
    scores = torch.tensor([[-1.5], [-1.49], [-2.0], [-1.5]])
    windows, labels, kept = select_detections(scores, BOXES, -1.5, 0.3, 100)
    assert windows.tolist() == [1] and labels.tolist() == [0]
    torch.testing.assert_close(kept, torch.tensor([-1.49]))


def test_nms_is_per_class():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.5, -5.0], [0.4, -5.0]])
    windows, labels, kept = select_detections(scores, BOXES, -1.5, 0.3, 100)
    # class 0: window 1 suppressed by window 0 (IoU 0.82); window 3 kept (IoU 0.25 ≤ 0.3)
    # class 1: windows 0 and 1 overlap, the higher-scoring window 1 wins
    assert list(zip(labels.tolist(), windows.tolist(), strict=True)) == [
        (0, 0),
        (0, 2),
        (0, 3),
        (1, 1),
    ]
    torch.testing.assert_close(kept, torch.tensor([0.9, 0.5, 0.4, 0.7]))


def test_nms_keeps_iou_equal_to_threshold():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # IoU exactly 0.5
    windows, _, _ = select_detections(torch.tensor([[1.0], [0.5]]), boxes, -1.5, 0.5, 100)
    assert windows.tolist() == [0, 1]


def test_top_k_per_class():
    boxes = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(6)])
    scores = torch.tensor([[0.1 * i, 1.0 - 0.1 * i] for i in range(6)])
    windows, labels, kept = select_detections(scores, boxes, -1.5, 0.3, 2)
    assert labels.tolist() == [0, 0, 1, 1]
    assert windows.tolist() == [5, 4, 0, 1]
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.4, 1.0, 0.9]))


def reference_by_class(labels, scores, max_per_class):
    """Per class in ascending order, its indices by descending score, ties by index; top k."""
    kept = []
    for label in sorted(set(labels.tolist())):
        rows = [i for i in range(len(labels)) if labels[i] == label]
        kept += sorted(rows, key=lambda i: (-float(scores[i]), i))[:max_per_class]
    return kept


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("max_per_class", [None, 1, 3])
def test_detections_are_ordered_by_class_then_score_as_the_reference(max_per_class, device):
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 5, 200))
    scores = torch.from_numpy(rng.integers(0, 8, 200).astype(np.float32))  # many ties
    expected = reference_by_class(labels, scores, max_per_class)
    assert by_class(labels.to(device), scores.to(device), max_per_class).tolist() == expected
    assert by_class(labels[:0], scores[:0], max_per_class).tolist() == []


def test_empty_input():
    windows, labels, kept = select_detections(
        torch.zeros((0, 3)), torch.zeros((0, 4)), -1.5, 0.3, 100
    )
    assert windows.shape == labels.shape == kept.shape == (0,)
    found = detect_image(torch.full((4, 2), -9.0), BOXES, (100, 100), -1.5, 0.3, 10)
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,) and found.labels.shape == (0,)


def test_finalize_clips_and_runs_nms_again():
    boxes = torch.tensor([[-5.0, -5.0, 10.0, 10.0], [0.0, 0.0, 10.5, 10.0], [90.0, 0.0, 130.0, 8]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 1])
    kept = finalize_detections(boxes, scores, labels, (50, 100), 0.3)
    np.testing.assert_allclose(kept.boxes, [[0.0, 0.0, 10.0, 10.0], [90.0, 0, 100, 8]])
    np.testing.assert_allclose(kept.scores, [0.9, 0.7])
    assert kept.labels.tolist() == [0, 1]


def test_detect_image_uses_the_regressed_boxes():
    scores = torch.tensor([[0.9], [-5.0], [0.5], [-5.0]])
    calls = []

    def regress(window_index, labels):
        calls.append((window_index.tolist(), labels.tolist()))
        return torch.tensor([[50.0, 50.0, 60.0, 60.0], [50.0, 50.0, 60.0, 64.0]])

    found = detect_image(scores, BOXES, (200, 200), -1.5, 0.3, 100, regress)
    assert calls == [([0, 2], [0, 0])]
    # the regressed boxes now overlap (IoU 0.71): the second NMS keeps the better one only
    np.testing.assert_allclose(found.boxes, [[50.0, 50.0, 60.0, 60.0]])
    np.testing.assert_allclose(found.scores, [0.9])
    assert found.labels.tolist() == [0]
    found = detect_image(scores, BOXES, (200, 200), -1.5, 0.3, 100)
    np.testing.assert_allclose(found.boxes, BOXES[[0, 2]].numpy())


def test_combine_detections_pools_two_runs_then_nms():
    first = Detections(
        image_ids=np.array(["a", "b"]),
        image_index=np.array([0, 1]),
        boxes=np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32),
        scores=np.array([0.5, 0.4], np.float32),
        labels=np.array([0, 0]),
    )
    second = Detections(
        image_ids=np.array(["c", "a"]),
        image_index=np.array([1, 1, 1, 0]),
        boxes=np.array(
            [[1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60], [5, 5, 9, 9]], np.float32
        ),
        scores=np.array([0.9, 0.3, 0.2, 0.1], np.float32),
        labels=np.array([0, 1, 0, 0]),
    )
    combined = combine_detections(first, second, 0.3)
    assert combined.image_ids.tolist() == ["a", "b", "c"]
    # image a, class 0: second's 0.9 box suppresses first's 0.5 one (IoU 0.82); class 1 survives
    assert combined.image_index.tolist() == [0, 0, 0, 1, 2]
    assert combined.labels.tolist() == [0, 0, 1, 0, 0]
    np.testing.assert_allclose(combined.scores, [0.9, 0.2, 0.3, 0.4, 0.1])
    np.testing.assert_array_equal(combined.boxes[0], [1, 0, 11, 10])


# --- `spp-detect test`: a CUDA error on one image (injected, so no GPU is needed) -------------

TRAINED_SETTINGS = [
    "data.classes=[circle,square,triangle]",
    "extract.scales=[96]",
    "propose.method=mat",
    "finetune.fc_dim=16",
    "finetune.iterations=2",
    "finetune.lr_steps=[1]",
    "finetune.batch_size=16",
    "test.scorer=softmax",  # no train-svm
    "test.bbox_reg=false",  # no train-bbox
]
ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call"
)


def _trained_args(root, run, mat) -> list[str]:
    sets = [f"data.root={root}", f"propose.mat_file={mat}", *TRAINED_SETTINGS]
    options = ["--run-dir", str(run), "--device", "cpu", "--workers", "1"]
    return options + [part for item in sets for part in ("--set", item)]


@pytest.fixture(scope="module")
def trained_run(toy_root, tmp_path_factory):
    """The smallest trained toy run that `test` accepts (.mat proposals, a 2-iteration head,
    the softmax scorer, no box regression), with the test split's proposals and maps: the run
    folder and its CLI arguments."""
    from spp_detect.data.toy import TOY_CLASSES
    from spp_detect.data.voc import read_split
    from spp_detect.testing import write_proposal_mat

    folder = tmp_path_factory.mktemp("trained")
    records = [r for s in ("trainval", "test") for r in read_split(toy_root, s, TOY_CLASSES)]
    mat = write_proposal_mat(folder / "proposals.mat", records, 50)
    run = folder / "run"
    args = _trained_args(toy_root, run, mat)
    train = ["--limit", "3"]  # enough for a head that runs
    for command in (["propose", *train], ["extract", *train], ["finetune", *train],
                    ["propose", "--split", "test"], ["extract", "--split", "test"]):  # fmt: skip
        result = CliRunner().invoke(cli, [*command, *args])
        assert result.exit_code == 0, result.output
    return run, args


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            RuntimeError(ILLEGAL_ACCESS),
            "CUDA error while testing (an illegal memory access was encountered); the 2 images "
            "done are kept; rerun to resume",
        ),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of GPU memory while testing; lower it with a smaller test.batch_windows (e.g. "
            "1024) or test.precision=bf16; the 2 images done are kept; rerun to resume",
        ),
    ],
    ids=["illegal access", "out of memory"],
)
def test_a_cuda_error_mid_test_is_one_line_and_keeps_the_images_done(
    trained_run, toy_root, tmp_path, monkeypatch, error, line
):
    """The 3rd image of the test split fails: one line naming it, exit 2, the first two
    images' detection files kept and skipped by the rerun, which completes."""
    from spp_detect.data.toy import TOY_CLASSES
    from spp_detect.data.voc import read_split
    from spp_detect.models.detector import TrainedDetector
    from spp_detect.runtime.run_dir import RunDir

    run = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    args = [str(run) if a == str(trained_run[0]) else a for a in trained_run[1]]
    records = read_split(toy_root, "test", TOY_CLASSES)
    detect, calls = TrainedDetector.detect, []

    def faulty(self, source, record, proposals):
        calls.append(record.image_id)
        if len(calls) == 3:
            raise error
        return detect(self, source, record, proposals)

    with monkeypatch.context() as patch:
        patch.setattr(TrainedDetector, "detect", faulty)
        result = CliRunner().invoke(cli, ["test", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [text for text in result.output.splitlines() if text.startswith("error:")]
    assert errors == [f"error: {records[2].path}: {line}"]
    parts = [RunDir(run).detection_part_path("test", r.image_id) for r in records]
    assert [path.is_file() for path in parts[:3]] == [True, True, False]
    assert not RunDir(run).detections_path("test").exists()
    stamps = [path.stat().st_mtime_ns for path in parts[:2]]
    result = CliRunner().invoke(cli, ["test", *args])
    assert result.exit_code == 0, result.output
    assert f"test: {len(records) - 2} items" in result.output
    assert [path.stat().st_mtime_ns for path in parts[:2]] == stamps
    assert RunDir(run).detections_path("test").is_file()
