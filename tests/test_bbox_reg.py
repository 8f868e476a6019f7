import logging

import numpy as np
import pytest
import torch

from spp_detect.bbox_reg import (
    BoxRegressors,
    fit_box_regressor,
    fit_box_regressors,
    ridge_solve,
    whitening,
)
from spp_detect.boxes import decode_deltas, encode_deltas
from spp_detect.errors import UserError


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    corner = rng.uniform(0, 300, (count, 2))
    return np.concatenate([corner, corner + rng.uniform(20, 150, (count, 2))], axis=1)


def linear_problem(seed: int, count: int, dim: int):
    """Features, proposals and gt whose deltas are exactly features @ weight + bias."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (count, dim)).astype(np.float32)
    weight = rng.normal(0, 0.05, (dim, 4))
    bias = np.array([0.05, -0.02, 0.1, -0.1])
    proposals = random_boxes(rng, count)
    gt_boxes = decode_deltas(proposals, features.astype(np.float64) @ weight + bias)
    return features, proposals, gt_boxes, weight, bias


def reference_fit(features, proposals, gt_boxes, ridge_lambda, whiten_eps):
    """The original's procedure written out: whiten, ridge on [x, 1], un-whiten on predict."""
    targets = encode_deltas(proposals, gt_boxes)
    mean = targets.mean(0)
    centred = targets - mean
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(targets))
    whiten = vectors @ np.diag(1 / np.sqrt(eigenvalues + whiten_eps)) @ vectors.T
    unwhiten = vectors @ np.diag(np.sqrt(eigenvalues + whiten_eps)) @ vectors.T
    design = np.concatenate([features.astype(np.float64), np.ones((len(features), 1))], axis=1)
    beta = np.linalg.solve(
        design.T @ design + ridge_lambda * np.eye(design.shape[1]), design.T @ (centred @ whiten)
    )

    def predict(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1) @ beta @ unwhiten + mean

    return predict


@pytest.mark.parametrize(("count", "dim"), [(300, 10), (40, 64)])  # primal and dual solves
def test_recovers_a_known_linear_map(count, dim):
    features, proposals, gt_boxes, weight, bias = linear_problem(0, count, dim)
    fitted_weight, fitted_bias = fit_box_regressor(features, proposals, gt_boxes, 1e-8, 1e-3)
    assert fitted_weight.shape == (dim, 4) and fitted_weight.dtype == np.float32
    probe = np.random.default_rng(1).normal(0, 1, (20, dim))
    if count > dim:  # determined: the map itself is recovered
        np.testing.assert_allclose(
            probe @ fitted_weight + fitted_bias, probe @ weight + bias, atol=1e-4
        )
    # in both cases the training deltas are reproduced
    train_deltas = features @ fitted_weight + fitted_bias
    np.testing.assert_allclose(train_deltas, features @ weight + bias, atol=1e-4)


@pytest.mark.parametrize(("count", "dim"), [(200, 12), (30, 50)])
def test_folded_model_equals_the_unfolded_reference(count, dim):
    rng = np.random.default_rng(2)
    features = rng.normal(0, 3, (count, dim)).astype(np.float32)
    proposals = random_boxes(rng, count)
    gt_boxes = proposals + rng.normal(0, 8, (count, 4))  # noisy, not a linear map
    weight, bias = fit_box_regressor(features, proposals, gt_boxes, 4000.0, 1e-3)
    reference = reference_fit(features, proposals, gt_boxes, 4000.0, 1e-3)
    probe = rng.normal(0, 3, (15, dim))
    np.testing.assert_allclose(probe @ weight + bias, reference(probe), rtol=1e-4, atol=1e-6)


def test_ridge_primal_and_dual_agree():
    rng = np.random.default_rng(3)
    features = torch.from_numpy(rng.normal(size=(40, 40)))
    targets = torch.from_numpy(rng.normal(size=(40, 4)))
    for count in (40, 30):  # N = D + 1 takes the primal solve, N < D + 1 the dual
        beta = ridge_solve(features[:count, :39], targets[:count], 5.0)
        design = np.concatenate([features.numpy()[:count, :39], np.ones((count, 1))], 1)
        gram = design.T @ design + 5 * np.eye(40)
        expected = np.linalg.solve(gram, design.T @ targets.numpy()[:count])
        np.testing.assert_allclose(beta.numpy(), expected, atol=1e-10)


def test_whitening_whitens():
    targets = np.random.default_rng(4).normal(0, [0.1, 0.2, 0.3, 0.4], (500, 4))
    mean, whiten, unwhiten = whitening(targets, 0.0)
    white = (targets - mean) @ whiten
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(whiten @ unwhiten, np.eye(4), atol=1e-9)


def test_feature_scale_is_folded():
    features, proposals, gt_boxes, _, _ = linear_problem(5, 100, 8)
    scale = 20.0 / 3.0
    weight, bias = fit_box_regressor(features, proposals, gt_boxes, 50.0, 1e-3, feature_scale=scale)
    scaled_weight, scaled_bias = fit_box_regressor(
        features * scale, proposals, gt_boxes, 50.0, 1e-3
    )
    np.testing.assert_allclose(
        features @ weight + bias, (features * scale) @ scaled_weight + scaled_bias, atol=1e-5
    )
    regressors = BoxRegressors(scaled_weight[None], scaled_bias[None]).fold_feature_scale(scale)
    np.testing.assert_allclose(regressors.weight[0], weight, rtol=1e-4, atol=1e-6)


def test_box_regressors_predict_and_apply():
    weight = np.zeros((2, 3, 4), np.float32)
    bias = np.zeros((2, 4), np.float32)
    bias[1] = [0.5, 0.0, np.log(2.0), 0.0]  # class 1: shift right by half a width, double width
    weight[0, 0] = [0.1, 0, 0, 0]  # class 0: t_x = 0.1 · feature 0
    regressors = BoxRegressors(weight, bias)
    features = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]])
    labels = torch.tensor([0, 1, 0])
    deltas = regressors.predict(features, labels)
    torch.testing.assert_close(deltas[:, 0], torch.tensor([0.1, 0.5, 0.2]))
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0], [95, 0, 105, 10]])
    applied = regressors.apply(boxes, features, labels, image_hw=(50, 100))
    torch.testing.assert_close(applied[0], torch.tensor([11.0, 10.0, 21.0, 20.0]))
    torch.testing.assert_close(applied[1], torch.tensor([10.0, 10.0, 30.0, 20.0]))
    torch.testing.assert_close(applied[2], torch.tensor([97.0, 0.0, 100.0, 10.0]))  # clipped


def test_fit_box_regressors_identity_for_empty_class(caplog):
    features, proposals, gt_boxes, _, _ = linear_problem(6, 50, 5)
    empty = (np.zeros((0, 5), np.float32), np.zeros((0, 4)), np.zeros((0, 4)))
    with caplog.at_level(logging.WARNING):
        regressors, report = fit_box_regressors(
            [(features, proposals, gt_boxes), empty], 5, 4000.0, 1e-3
        )
    assert "class 1 has no regression examples" in caplog.text
    assert [r["skipped"] for r in report] == [False, True]
    np.testing.assert_array_equal(regressors.weight[1], 0)
    np.testing.assert_array_equal(regressors.bias[1], 0)
    assert np.abs(regressors.weight[0]).sum() > 0


def test_save_load_round_trip_and_bad_file(tmp_path):
    rng = np.random.default_rng(7)
    regressors = BoxRegressors(rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4)))
    regressors.save(tmp_path / "regressors.npz")
    loaded = BoxRegressors.load(tmp_path / "regressors.npz")
    np.testing.assert_array_equal(loaded.weight, regressors.weight)
    np.testing.assert_array_equal(loaded.bias, regressors.bias)
    np.savez(tmp_path / "bad.npz", weight=np.zeros((3, 6)))
    with pytest.raises(UserError, match=r"bad\.npz"):
        BoxRegressors.load(tmp_path / "bad.npz")


def test_regression_examples_take_windows_above_the_iou_and_their_best_gt():
    from spp_detect.bbox_reg import regression_examples

    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    boxes = np.array(
        [[0, 0, 10, 10], [21, 21, 40, 40], [0, 0, 20, 20], [50, 50, 60, 60]], np.float32
    )
    rows, assigned = regression_examples(boxes, gt, 0.5)
    assert rows.tolist() == [0, 1] and assigned.tolist() == [0, 1]  # IoU 0.25 and 0 are out
    rows, _ = regression_examples(boxes, gt, 1.0)  # strictly above: IoU 1 is not > 1
    assert rows.tolist() == []
    rows, assigned = regression_examples(boxes, np.zeros((0, 4), np.float32), 0.5)
    assert rows.shape == assigned.shape == (0,)
