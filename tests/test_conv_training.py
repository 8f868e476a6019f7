"""End-to-end fine-tuning: the trainable pyramid against the exact one and a slow gradient
reference, minibatch drawing, frozen layers, and the bad inputs (docs/method.md#conv-fine-tuning).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_detect.config import load_config
from spp_detect.errors import UserError
from spp_detect.models.backbones import CONV_LAYERS, conv_layer_index
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import roi_pool_bins_exact, spatial_pyramid_pool, trainable_pyramid_pool
from spp_detect.stages.finetune import warn_fast_conv_rate
from spp_detect.testing import reference_pool
from spp_detect.train import finetune_conv


def _random_cells(rng: np.random.Generator, count: int, height: int, width: int) -> torch.Tensor:
    left, top = rng.integers(0, width, count), rng.integers(0, height, count)
    right = np.minimum(left + rng.integers(0, width, count), width - 1)
    bottom = np.minimum(top + rng.integers(0, height, count), height - 1)
    return torch.as_tensor(np.stack([left, top, right, bottom], axis=1))


def _reference_gradient(fmap: np.ndarray, cells, levels, upstream: np.ndarray) -> np.ndarray:
    """d(sum(upstream · pooled))/d fmap: each bin's gradient to its max cell, by plain loops."""
    grad = np.zeros_like(fmap)
    for row, (left, top, right, bottom) in enumerate(cells.tolist()):
        width, height = right - left + 1, bottom - top + 1
        column = 0
        for n in levels:
            for c in range(fmap.shape[0]):
                for i in range(n):
                    for j in range(n):
                        ys = range(top + i * height // n, top - (-(i + 1) * height // n))
                        xs = range(left + j * width // n, left - (-(j + 1) * width // n))
                        y, x = max(
                            ((y, x) for y in ys for x in xs), key=lambda p: fmap[c, p[0], p[1]]
                        )
                        grad[c, y, x] += upstream[row, column + c * n * n + i * n + j]
            column += fmap.shape[0] * n * n
    return grad


@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (7, 3, 2, 1), (4, 2, 1)])
def test_trainable_pool_equals_the_exact_pool_and_routes_gradients_to_maxima(levels):
    rng = np.random.default_rng(0)
    fmap = torch.rand(3, 9, 13, dtype=torch.float64)  # continuous values: no ties
    cells = _random_cells(rng, 12, 9, 13)
    pooled = trainable_pyramid_pool(fmap.requires_grad_(True), cells, levels)
    exact = spatial_pyramid_pool(fmap.detach(), cells, levels)
    torch.testing.assert_close(pooled.detach(), exact, rtol=0, atol=0)
    np.testing.assert_array_equal(
        pooled.detach().numpy(), reference_pool(fmap.detach().numpy(), cells.tolist(), levels)
    )
    upstream = torch.as_tensor(rng.normal(size=pooled.shape))
    (pooled * upstream).sum().backward()
    expected = _reference_gradient(fmap.detach().numpy(), cells, levels, upstream.numpy())
    np.testing.assert_allclose(fmap.grad.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_roi_pool_bins_are_exact_for_the_paper_levels_only_where_checked():
    assert all(roi_pool_bins_exact(n, 200) for n in (1, 2, 3, 6))
    assert not roi_pool_bins_exact(7, 200)  # VGG16's level: float32 edges are off by a cell


def test_iteration_entries_visit_every_entry_once_per_epoch():
    seen = np.concatenate([finetune_conv.iteration_entries(10, 2, i, seed=3) for i in range(5)])
    assert sorted(seen.tolist()) == list(range(10))
    again = finetune_conv.iteration_entries(10, 2, 4, seed=3)
    np.testing.assert_array_equal(again, seen[8:])  # a pure function of (seed, iteration)
    assert not np.array_equal(
        np.concatenate([finetune_conv.iteration_entries(10, 2, i, 3) for i in range(5, 10)]),
        seen,
    )  # the next epoch is another permutation


def test_sample_entry_windows_takes_a_quarter_foreground_when_there_is_enough():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 200)  # K = 2: label 2 is background
    rows = finetune_conv.sample_entry_windows(np.random.default_rng(0), labels, 2, 64, 0.25)
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    assert (labels[rows] < 2).sum() == 16
    few = np.array([0, 2, 2, 2])
    rows = finetune_conv.sample_entry_windows(np.random.default_rng(0), few, 2, 64, 0.25)
    assert sorted(rows.tolist()) == [0, 1, 2, 3]  # one fg, all three bg


def test_layers_below_the_first_trainable_one_stay_frozen():
    trunk = build_backbone("zf5", "none")
    first = conv_layer_index(trunk, "conv3")
    trainable = finetune_conv.freeze_below(trunk, first)
    convs = [m for m in trunk.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.requires_grad for c in convs] == [False, False, True, True, True]
    assert len(trainable) == 6  # conv3-conv5 weights and biases
    head = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr_mult": 1.0}], lr=0.1)
    finetune_conv.add_trunk_to_optimizer(optimizer, trunk, first, lr_mult=0.1)
    assert [g["lr_mult"] for g in optimizer.param_groups] == [1.0, 0.1, 0.2]


@pytest.mark.parametrize(
    ("backbone", "first"), [("zf5", "conv3"), ("efficientnet_lite0", "stage4")]
)
def test_sgd_moves_exactly_the_trainable_conv_layers(backbone, first):
    trunk = build_backbone(backbone, "none")
    index = conv_layer_index(trunk, first)
    trainable = finetune_conv.freeze_below(trunk, index)
    optimizer = torch.optim.SGD([{"params": [], "lr_mult": 1.0}], lr=0.1)
    finetune_conv.add_trunk_to_optimizer(optimizer, trunk, index, lr_mult=1.0)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable} and trainable
    before = {name: p.detach().clone() for name, p in trunk.named_parameters()}
    trunk(torch.rand(1, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    moved = {name for name, p in trunk.named_parameters() if not torch.equal(p, before[name])}
    expected = {name for name, p in trunk.named_parameters() if p.requires_grad}
    assert moved == expected and len(expected) == len(trainable)


def test_a_pretrained_trunk_far_above_fast_rcnns_rate_is_warned_about(caplog):
    fast = load_config(None, ["finetune.conv_from=stage4", "finetune.lr=0.01"]).finetune
    warn_fast_conv_rate(fast, "imagenet")
    assert "set finetune.conv_lr_mult=0.1" in caplog.text
    caplog.clear()
    warn_fast_conv_rate(fast, "none")  # random filters: the rate is the user's experiment
    steady = load_config(None, ["finetune.conv_from=stage4"]).finetune  # the defaults: 0.001
    warn_fast_conv_rate(steady, "imagenet")
    assert not caplog.records


def test_conv_layer_names_match_the_trunks():
    for name, layers in CONV_LAYERS.items():
        trunk = build_backbone(name, "none")
        convs = [m for m in trunk.features if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == len(layers)
        assert isinstance(trunk.features[conv_layer_index(trunk, layers[-1])], torch.nn.Conv2d)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.conv_from=conv9", "finetune.conv_from: zf5 has no conv layer 'conv9'; use one"),
        ("finetune.conv_from=conv3_1", "conv1, conv2, conv3, conv4, conv5"),
        ("finetune.conv_from=conv3", "efficientnet_lite0 has no stage 'conv3'; use one of stem,"),
        ("test.scorer=vote", "test.scorer must be one of svm, softmax"),
        ("finetune.images_per_batch=0", "finetune.images_per_batch must be 1 to 65536"),
    ],
)
def test_bad_conv_settings_fail_when_the_config_loads(override, message):
    trunk = ["extract.backbone=zf5"] if "conv_from=conv9" in override or "3_1" in override else []
    with pytest.raises(UserError, match=message):
        load_config(None, [*trunk, override])


def test_out_of_memory_names_the_settings_that_lower_it():
    def allocate():
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    with pytest.raises(UserError, match=r"out of memory.*finetune\.conv_from.*images_per_batch"):
        finetune_conv._guarded(allocate)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through
        finetune_conv._guarded(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


@pytest.mark.parametrize(
    ("overrides", "order"),
    [
        ([], ["propose", "propose", "extract", "extract", "finetune", "train-svm", "train-bbox"]),
        (
            ["finetune.conv_from=stage3", "test.scorer=softmax"],
            ["propose", "propose", "finetune", "extract", "extract", "train-bbox"],
        ),
        (
            ["finetune.bbox_loss_weight=1", "test.regressor=head", "extract.cache=none"],
            ["propose", "propose", "finetune", "train-svm"],
        ),
    ],
)
def test_run_knows_the_order_of_both_pipelines(tmp_path, overrides, order):
    from spp_detect.runtime.run_dir import RunDir
    from spp_detect.stages.context import StageContext
    from spp_detect.stages.run import pipeline

    ctx = StageContext(load_config(None, overrides), RunDir(tmp_path), "cpu", 1, None, False)
    stages = [stage for stage, _, _ in pipeline(ctx)]
    assert stages == [*order, "test", "eval"]


def test_entries_without_windows_are_never_drawn(tmp_path):
    """An image with no object of the classes has no window in [bg_thresh_lo, 1]: minibatches
    skip it (and its mirror) instead of training on nothing."""
    from spp_detect.ops.spp import PoolGeometry
    from spp_detect.structures import ImageRecord
    from spp_detect.train.sampling import build_window_pool

    def record(name, gt):
        boxes = np.asarray(gt, np.float32).reshape(-1, 4)
        labels, difficult = np.zeros(len(boxes), np.int64), np.zeros(len(boxes), bool)
        return ImageRecord(name, tmp_path / f"{name}.jpg", 100, 100, boxes, labels, difficult)

    records = [record("a", [[10, 10, 60, 60]]), record("empty", []), record("b", [[5, 5, 50, 90]])]
    proposals = [np.array([[12, 12, 58, 62]], np.float32)] * 3
    pool = build_window_pool(records, proposals, 1, 0.5, 0.1, 0.5, flip=True)
    geometry = PoolGeometry(16, 21.0, 6.5, (1,), 224.0)
    images = finetune_conv.TrainingImages.from_pool(records, pool, geometry)
    assert images.usable.tolist() == [0, 1, 4, 5]  # "empty" and its mirror are entries 2, 3
    drawn = np.concatenate([images.entries(2, i, seed=0) for i in range(6)])
    assert set(drawn.tolist()) == {0, 1, 4, 5}
