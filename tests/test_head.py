"""The fine-tuning head: shapes, dropout, initialisation, optimizer recipe, save/load."""

from __future__ import annotations

import pytest
import torch

from spp_detect.errors import UserError
from spp_detect.models.head import (
    HEAD_KEYS,
    STD_FLOOR,
    Head,
    head_state,
    init_from_classifier,
    init_random,
    input_normalization_for,
    load_head,
)
from spp_detect.runtime.artifacts import save_torch
from spp_detect.train.finetune import make_optimizer, set_learning_rate, step_learning_rate

CHANNELS = 4
LEVELS = (3, 2, 1)
IN_DIM = CHANNELS * sum(n * n for n in LEVELS)  # 56


def _classifier(fc_dim: int = 8, pooled: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc6.weight": torch.randn(fc_dim, CHANNELS * pooled * pooled, generator=gen),
        "fc6.bias": torch.randn(fc_dim, generator=gen),
        "fc7.weight": torch.randn(fc_dim, fc_dim, generator=gen),
        "fc7.bias": torch.randn(fc_dim, generator=gen),
    }


def test_shapes_and_eval_determinism():
    head = Head(IN_DIM, 16, num_classes=3, dropout=0.5)
    pooled = torch.randn(5, IN_DIM)
    assert head(pooled).shape == (5, 4)
    assert head.features(pooled).shape == (5, 16)
    assert head.num_classes == 3 and head.in_dim == IN_DIM
    head.eval()
    assert torch.equal(head(pooled), head(pooled))
    # features() ignores dropout even in training mode, and equals the eval-mode fc7 path
    head.train()
    fc7 = torch.relu(head.fc7(torch.relu(head.fc6(pooled))))
    assert torch.equal(head.features(pooled), fc7)
    assert (head.features(pooled) >= 0).all()


def test_dropout_follows_generator():
    head = Head(IN_DIM, 64, num_classes=2, dropout=0.5).train()
    pooled = torch.randn(7, IN_DIM)
    first = head(pooled, generator=torch.Generator().manual_seed(1))
    again = head(pooled, generator=torch.Generator().manual_seed(1))
    other = head(pooled, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # inverted dropout keeps the expected activation: mean over many masks ≈ eval output
    head_eval = head.features(pooled)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.relu(head.fc6(pooled))
    from spp_detect.models.head import _dropout

    mean = torch.stack([_dropout(hidden, 0.5, True, gen) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean, hidden, atol=0.1 * hidden.abs().max().item())
    assert head_eval.shape == (7, 64)


def test_init_random_classifier_distribution():
    head = Head(IN_DIM, 512, num_classes=20)
    init_random(head, torch.Generator().manual_seed(0))
    weight = head.cls.weight
    assert weight.shape == (21, 512)
    assert abs(weight.std().item() - 0.01) < 0.001
    assert abs(weight.mean().item()) < 0.001
    assert torch.all(head.cls.bias == 1.0)
    assert torch.all(head.fc6.bias == 0.0)
    # He-normal fc layers
    assert abs(head.fc6.weight.std().item() - (2 / IN_DIM) ** 0.5) < 0.02
    # same seed, same head
    other = Head(IN_DIM, 512, num_classes=20)
    init_random(other, torch.Generator().manual_seed(0))
    assert torch.equal(head.fc6.weight, other.fc6.weight)


def test_init_from_classifier_copies_first_level_columns():
    classifier = _classifier(fc_dim=8, pooled=3)
    head = Head(IN_DIM, 8, num_classes=2)
    init_random(head, torch.Generator().manual_seed(0))
    cls_before = head.cls.weight.clone()
    init_from_classifier(head, classifier, CHANNELS, LEVELS)
    first = CHANNELS * 9
    assert torch.equal(head.fc6.weight[:, :first], classifier["fc6.weight"])
    assert torch.all(head.fc6.weight[:, first:] == 0)
    assert torch.equal(head.fc6.bias, classifier["fc6.bias"])
    assert torch.equal(head.fc7.weight, classifier["fc7.weight"])
    assert torch.equal(head.fc7.bias, classifier["fc7.bias"])
    assert torch.equal(head.cls.weight, cls_before)
    # A pooled vector whose first level is the classifier's flattened (C, 3, 3) input gives the
    # classifier's fc6 output whatever the other levels hold.
    level0 = torch.randn(2, CHANNELS, 3, 3)
    pooled = torch.cat([level0.flatten(1), torch.randn(2, IN_DIM - first)], dim=1)
    expected = level0.flatten(1) @ classifier["fc6.weight"].T + classifier["fc6.bias"]
    assert torch.allclose(head.fc6(pooled), expected, atol=1e-5)


def test_init_from_classifier_rejects_mismatches():
    head = Head(IN_DIM, 8, num_classes=2)
    with pytest.raises(UserError, match=r"spp\.levels"):
        init_from_classifier(head, _classifier(pooled=2), CHANNELS, LEVELS)  # first level is 3
    with pytest.raises(UserError, match=r"finetune\.fc_dim"):
        init_from_classifier(head, _classifier(fc_dim=16), CHANNELS, LEVELS)
    bad = _classifier()
    bad["fc6.weight"] = torch.randn(8, 37)
    with pytest.raises(UserError, match=r"extract\.weights"):
        init_from_classifier(head, bad, CHANNELS, LEVELS)


def test_optimizer_groups_and_schedule():
    head = Head(IN_DIM, 8, num_classes=2)
    optimizer = make_optimizer(head, momentum=0.9, weight_decay=5e-4)
    set_learning_rate(optimizer, 1e-3)
    by_param = {
        id(p): (g["lr"], g["weight_decay"], g["momentum"])
        for g in optimizer.param_groups
        for p in g["params"]
    }
    assert by_param[id(head.fc6.weight)] == (1e-3, 5e-4, 0.9)
    assert by_param[id(head.fc7.bias)] == (2e-3, 5e-4, 0.9)
    assert by_param[id(head.cls.weight)] == (1e-3, 5e-4, 0.9)
    assert by_param[id(head.cls.bias)] == (2e-3, 0.0, 0.9)
    assert len(by_param) == 6
    steps = (30000, 60000)
    assert step_learning_rate(0, 1e-3, steps) == pytest.approx(1e-3)
    assert step_learning_rate(29999, 1e-3, steps) == pytest.approx(1e-3)
    assert step_learning_rate(30000, 1e-3, steps) == pytest.approx(1e-4)
    assert step_learning_rate(60000, 1e-3, steps) == pytest.approx(1e-5)
    assert step_learning_rate(150000, 1e-3, steps) == pytest.approx(1e-5)


def test_save_load_round_trip(tmp_path):
    head = Head(IN_DIM, 16, num_classes=3)
    init_random(head, torch.Generator().manual_seed(0))
    path = tmp_path / "head.pt"
    save_torch(path, head_state(head))
    assert set(torch.load(path, weights_only=True)) == set(head.state_dict())
    loaded = load_head(path)
    assert not loaded.training
    assert (loaded.in_dim, loaded.fc6.out_features, loaded.num_classes) == (IN_DIM, 16, 3)
    pooled = torch.randn(4, IN_DIM)
    assert torch.equal(loaded(pooled), head.eval()(pooled))


def test_load_head_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"corrupt\.pt"):
        load_head(corrupt)
    foreign = tmp_path / "foreign.pt"
    save_torch(foreign, {"weight": torch.zeros(2)})
    with pytest.raises(UserError, match="not a fine-tuned head"):
        load_head(foreign)
    with pytest.raises(UserError, match="not found"):
        load_head(tmp_path / "missing.pt")


def test_input_normalization_standardises_and_folds(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, 1, IN_DIM) * 1000  # large inputs, scales spanning 10×
    pooled = torch.rand(500, IN_DIM, generator=gen) * scales
    pooled[:, 0] = 7.0  # a constant input: its std is floored, not divided by zero
    shift, scale = input_normalization_for(pooled)
    standard = (pooled - shift) * scale
    assert torch.allclose(standard.mean(0), torch.zeros(IN_DIM), atol=1e-3)
    assert torch.allclose(standard[:, 1:].std(0, unbiased=False), torch.ones(IN_DIM - 1), atol=1e-3)
    floor = STD_FLOOR * float(pooled[:, 1:].std(0, unbiased=False).sum() / IN_DIM)
    assert scale[0].item() == pytest.approx(1 / floor, rel=1e-3)
    head = Head(IN_DIM, 16, num_classes=3)
    init_random(head, gen)
    raw_logits = head.eval()(pooled)
    head.set_input_normalization(shift, scale)
    logits = head(pooled)
    assert not torch.allclose(logits, raw_logits)
    # saved heads take raw features: the normalisation is folded into fc6
    path = tmp_path / "head.pt"
    save_torch(path, head_state(head))
    assert set(torch.load(path, weights_only=True)) == set(HEAD_KEYS)
    loaded = load_head(path)
    assert loaded.input_scale is None
    assert torch.allclose(loaded(pooled), logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(loaded.features(pooled), head.features(pooled), rtol=1e-4, atol=1e-4)


def test_box_branch_is_saved_with_its_normalisation_folded_in():
    from spp_detect.models.head import BOX_DELTA_STDS, head_from_state, init_random

    head = Head(12, 8, 3, dropout=0.0, box_branch=True)
    init_random(head, torch.Generator().manual_seed(0))
    torch.nn.init.normal_(head.bbox.weight)  # a trained branch: not the tiny initial weights
    head.eval()
    pooled = torch.randn(5, 12)
    _, normalised = head.forward_with_boxes(pooled)  # (5, 3, 4), in units of BOX_DELTA_STDS
    saved = head_from_state(head_state(head)).eval()
    labels = torch.tensor([0, 2, 1, 1, 0])
    fc7 = saved.features(pooled)
    expected = normalised[torch.arange(5), labels] * torch.tensor(BOX_DELTA_STDS)
    torch.testing.assert_close(saved.box_deltas(fc7, labels), expected)


def test_window_loss_regresses_foreground_windows_only():
    from spp_detect.models.head import BOX_DELTA_STDS
    from spp_detect.train.finetune import window_loss

    head = Head(6, 4, 2, dropout=0.0, box_branch=True)
    features, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 2])  # 2 fg, 2 bg (K = 2)
    box_targets = torch.randn(4, 4)
    generator = torch.Generator()
    plain, _ = window_loss(head, features, labels, generator)
    with_boxes, _ = window_loss(head, features, labels, generator, box_targets, 2.0)
    _, deltas = head.forward_with_boxes(features)
    fg = deltas[[0, 1], [0, 1]]
    wanted = box_targets[:2] / torch.tensor(BOX_DELTA_STDS)
    box_loss = torch.nn.functional.smooth_l1_loss(fg, wanted, reduction="sum") / 4
    torch.testing.assert_close(with_boxes, plain + 2.0 * box_loss)
    box_targets[2:] = 1e6  # background targets never count
    torch.testing.assert_close(window_loss(head, features, labels, generator, box_targets, 2.0)[0],
                               with_boxes)  # fmt: skip


# ---------------------------------------------------------------- test-time compression

LOW_RANK = 6  # rank of the synthetic "trained" fc6/fc7 below
LOW_RANK_NOISE = 1e-3  # relative size of the full-rank rest
SVD_TOLERANCE = 0.01  # max |fc7 - uncompressed fc7| / max |fc7| at the weights' own rank
# int8 weights and activations (per tensor): measured 1.5-1.9% of the largest fc7 on random heads
INT8_TOLERANCE = 0.03


def _low_rank_head(in_dim: int = 40, fc_dim: int = 32) -> Head:
    """A head whose fc6/fc7 weights have rank LOW_RANK plus small noise: the decaying spectrum of
    trained fc layers, on which truncation loses little (random weights have a flat one)."""
    gen = torch.Generator().manual_seed(0)
    head = Head(in_dim, fc_dim, 3).eval()
    with torch.no_grad():
        for layer in (head.fc6, head.fc7):
            out, into = layer.weight.shape
            left = torch.randn(out, LOW_RANK, generator=gen)
            low = left @ torch.randn(LOW_RANK, into, generator=gen)
            noise = torch.randn(out, into, generator=gen)
            layer.weight.copy_(low + LOW_RANK_NOISE * low.std() * noise)
            layer.bias.normal_(0.0, 1.0, generator=gen)
    return head


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize(("in_dim", "out_dim"), [(40, 24), (24, 40)])  # W·Wᵀ, Wᵀ·W
def test_truncated_svd_is_the_best_approximation_of_its_rank(in_dim, out_dim):
    from spp_detect.models.head import truncated_svd

    torch.manual_seed(0)
    layer = torch.nn.Linear(in_dim, out_dim)
    two = truncated_svd(layer, 5)
    assert two[0].weight.shape == (5, in_dim) and two[1].weight.shape == (out_dim, 5)
    torch.testing.assert_close(two[1].bias, layer.bias)
    weight = layer.weight.detach().double()
    error = torch.linalg.matrix_norm(weight - (two[1].weight @ two[0].weight).double())
    # Eckart–Young: the Frobenius error of the best rank-5 matrix is the norm of the rest of
    # the singular values
    expected = torch.linalg.svdvals(weight)[5:].norm()
    torch.testing.assert_close(error, expected, rtol=1e-5, atol=1e-6)
    whole = truncated_svd(layer, 100)  # rank ≥ min(in, out): the layer itself, refactored
    x = torch.randn(10, in_dim)
    torch.testing.assert_close(whole(x), layer(x), rtol=1e-5, atol=1e-5)


def test_compressed_features_against_the_uncompressed_head():
    from spp_detect.models.head import compressed_features

    head = _low_rank_head()
    pooled = torch.rand(64, head.in_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = head.features(pooled)
        none = compressed_features(head, "none", (1, 1))(pooled)
        svd = compressed_features(head, "svd", (LOW_RANK, LOW_RANK))(pooled)
        too_low = compressed_features(head, "svd", (2, 2))(pooled)
        int8 = compressed_features(head, "int8", (1, 1))(pooled)
    torch.testing.assert_close(none, expected)
    assert _relative_error(expected, svd) <= SVD_TOLERANCE
    assert _relative_error(expected, too_low) > 10 * SVD_TOLERANCE  # below the rank it costs
    assert _relative_error(expected, int8) <= INT8_TOLERANCE
    assert head.fc6.weight.shape == (32, 40)  # the head itself is left alone


def test_bad_compression_settings_are_refused():
    from spp_detect.models.detector import DetectionSettings, TrainedDetector
    from spp_detect.models.head import compressed_features

    head = _low_rank_head()
    with pytest.raises(ValueError, match="unknown fc compression 'zip'"):
        compressed_features(head, "zip", (1, 1))
    settings = DetectionSettings(0.05, 0.3, 100, 4096, "fp32", "softmax", fc_compression="int8")
    with pytest.raises(UserError, match="int8 runs on the CPU only"):  # checked before any copy
        TrainedDetector(head, None, None, settings, "cuda")
