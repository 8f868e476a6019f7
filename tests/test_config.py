"""Config: the paper's defaults (docs/method.md), YAML diffs, --set parsing, strict errors,
fingerprints, round trips."""

from __future__ import annotations

import re
import site
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from spp_detect.config import (
    DEFAULT_SCALES,
    MAX_SIZED_ITERATIONS,
    MIN_SIZED_ITERATIONS,
    PAPER_SCALES,
    VOC_CLASSES,
    Config,
    load_config,
    sized_finetune,
)
from spp_detect.errors import UserError
from spp_detect.stages.provenance import sections_fingerprint


def test_defaults_are_the_paper_values_except_the_trunk_and_the_schedule():
    """Where the defaults differ (trunk, scales, fc width, schedule, proposal image size),
    test_voc07_configs_keep_the_papers_settings checks the paper's values."""
    config = load_config()
    assert config.name == "default"
    assert config.svm.C == 1e-3 and config.svm.pos_weight == 2.0
    assert config.svm.intercept_scaling == 10.0 and config.svm.target_norm == 20.0
    assert config.svm.hard_thresh == -1.0001 and config.svm.evict_thresh == -1.2
    assert config.test.nms_thresh == 0.3 and config.test.score_thresh == -1.5
    assert config.test.max_per_class == 100
    assert config.spp.levels == (6, 3, 2, 1) and config.spp.target_size == 224.0
    assert config.spp.offset == 6.5
    assert config.extract.scales == (480, 576, 688)
    assert config.finetune.batch_size == 128 and config.finetune.fg_fraction == 0.25
    assert config.bbox_reg.ridge_lambda == 4000.0
    assert config.data.classes == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert (config.data.train_split, config.data.test_split) == ("trainval", "test")
    assert config.eval.iou_thresh == 0.5 and config.eval.use_07_metric is True


def test_yaml_diff_over_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  classes: [raccoon]\nextract:\n  scales: [688]\nsvm:\n  C: 1e-2\n")
    config = load_config(path)
    assert config.name == "mine"
    assert config.data.classes == ("raccoon",) and config.extract.scales == (688,)
    assert config.svm.C == 0.01 and isinstance(config.svm.C, float)
    assert config.svm.pos_weight == 2.0 and config.test == Config().test  # the rest: defaults
    path.write_text("name: other\nspp:\n  levels: [4, 1]\n")
    assert load_config(path).name == "other"


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("finetune.iterations=500", "finetune", "iterations", 500),
        ("test.nms_thresh=0.4", "test", "nms_thresh", 0.4),
        ("svm.C=1e-3", "svm", "C", 1e-3),  # PyYAML reads this as a string
        ("svm.C=1", "svm", "C", 1.0),  # int accepted for float
        ("extract.scales=[480, 688]", "extract", "scales", (480, 688)),
        ("extract.scales=688", "extract", "scales", (688,)),  # a scalar becomes a 1-tuple
        ("extract.flip=true", "extract", "flip", True),
        ("eval.use_07_metric=false", "eval", "use_07_metric", False),
        ("data.root=/some/where/VOC2007", "data", "root", "/some/where/VOC2007"),
        ("data.classes=[a, b, c]", "data", "classes", ("a", "b", "c")),
        ("propose.edge_model=", "propose", "edge_model", ""),
        ("test.score_thresh=-2.5", "test", "score_thresh", -2.5),
    ],
)
def test_set_parsing(override, section, key, expected):
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected and type(value) is type(expected)


def test_set_overrides_yaml_and_later_set_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("test:\n  nms_thresh: 0.5\n  max_per_class: 7\nsvm:\n")
    config = load_config(path, ["test.nms_thresh=0.6", "test.nms_thresh=0.7", "svm.C=2"])
    assert config.test.nms_thresh == 0.7 and config.test.max_per_class == 7
    assert config.svm.C == 2.0


def test_unknown_section():
    with pytest.raises(
        UserError,
        match=r"unknown config section 'svn' \(did you mean svm\?\); valid: data, propose",
    ):
        load_config(None, ["svn.C=1"])


def test_unknown_key_names_the_valid_ones(tmp_path):
    with pytest.raises(
        UserError,
        match=r"^--set svm\.c=1: unknown key svm\.c \(did you mean svm\.C\?\); valid keys: C, ",
    ):
        load_config(None, ["svm.c=1"])
    path = tmp_path / "typo.yaml"
    path.write_text("test:\n  nms_tresh: 0.3\n")
    with pytest.raises(
        UserError,
        match=r"typo\.yaml: unknown key test\.nms_tresh \(did you mean test\.nms_thresh\?\); ",
    ):
        load_config(path)
    with pytest.raises(UserError, match=r"unknown key svm\.zzz; valid keys"):  # nothing close
        load_config(None, ["svm.zzz=1"])


def test_a_string_where_a_list_is_expected_shows_the_list_form():
    expected = "data.classes must be a YAML list, got the string 'circle, square'; write classes: "
    with pytest.raises(UserError, match=re.escape(expected + "[circle, square]") + "$"):
        load_config(None, ["data.classes=circle, square"])
    assert load_config(None, ["extract.scales=688"]).extract.scales == (688,)  # a number is fine


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("extract.scales=[300000]", "extract.scales must be at most 10000 px"),
        ("extract.max_long_side=99999", "extract.max_long_side must be 0 (no cap) to 10000"),
        ("propose.max_side=99999", "propose.max_side must be 0 (never) to 10000 px"),
        ("spp.levels=[600, 1]", "spp.levels must be at most 32 bins a side"),
        ("finetune.fc_dim=100000", "finetune.fc_dim must be 1 to 16384"),
        ("finetune.batch_size=1000000", "finetune.batch_size must be 1 to 65536"),
    ],
)
def test_every_size_has_an_upper_bound_naming_the_key(setting, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [setting])


def test_set_typo_names_the_set_not_the_file(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("svm:\n  C: 0.1\n")
    with pytest.raises(UserError, match=r"^--set svm\.CC=1: unknown key") as info:
        load_config(path, ["svm.CC=1"])
    assert "good.yaml" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("test.nms_thresh=abc", "test.nms_thresh must be float, got 'abc' (str)"),
        ("finetune.iterations=1.5", "finetune.iterations must be int, got 1.5 (float)"),
        ("finetune.iterations=true", "finetune.iterations must be int, got True (bool)"),
        ("extract.scales=[480, big]", "extract.scales must be int, got 'big' (str)"),
        ("extract.flip=3", "extract.flip must be bool, got 3 (int)"),
        # values of the right type that no stage can work with, checked when the config loads
        ("finetune.lr=-0.1", "finetune.lr must be positive"),
        ("finetune.batch_size=0", "finetune.batch_size must be 1 to 65536"),
        ("test.nms_thresh=1.5", "test.nms_thresh must be an IoU in [0, 1]"),
        ("svm.C=0", "svm.C must be positive"),
        ("finetune.bg_thresh_hi=0.7", "bg_thresh_lo <= bg_thresh_hi <= fg_thresh"),
        ("propose.method=mat", "propose.mat_file: empty"),
        ("propose.method=sliding", "propose.method: unknown 'sliding'"),
        ("extract.backbone=resnet", "extract.backbone"),
        ("extract.precision=int8", "extract.precision"),
        ("spp.levels=[6, 0]", "spp.levels"),
        ("test.precision=fp8", "test.precision"),
        ("test.fc_compression=zip", "test.fc_compression must be one of none, svd, int8"),
        ("test.svd_rank_fc7=0", "test.svd_rank_fc7 must be at least 1"),
    ],
)
def test_wrong_type_or_bad_value_names_the_key(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


def test_int8_fc_needs_fp32():
    overrides = ["test.fc_compression=int8", "test.precision=bf16"]
    with pytest.raises(
        UserError, match=re.escape("test.fc_compression=int8 needs test.precision=fp32")
    ):
        load_config(None, overrides)
    assert load_config(None, overrides[:1]).test.fc_compression == "int8"


@pytest.mark.parametrize("override", ["svm.C", "svmC=1", "=1"])
def test_malformed_set(override):
    with pytest.raises(UserError, match=r"expected section\.key=value"):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("svm: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML \(line \d+\); fix the syntax"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match=r"bad\.yaml: expected a mapping of sections"):
        load_config(bad)
    bad.write_text("svm: 3\n")
    with pytest.raises(UserError, match="section 'svm' must be a mapping"):
        load_config(bad)


def test_fingerprint_stable_and_sensitive():
    fingerprint = sections_fingerprint
    base = load_config()
    assert fingerprint(base, "svm", "test") == fingerprint(load_config(), "svm", "test")
    assert len(fingerprint(base, "svm")) == 16
    changed = load_config(None, ["svm.C=0.002"])
    assert fingerprint(changed, "svm") != fingerprint(base, "svm")
    assert fingerprint(changed, "test", "data") == fingerprint(base, "test", "data")  # others
    assert fingerprint(base, "svm", "test") == fingerprint(base, "test", "svm")  # order-free
    renamed = load_config(None, ["svm.C=0.001"])  # same values spelt differently
    assert fingerprint(renamed, "svm") == fingerprint(base, "svm")


def test_dump_load_round_trip(tmp_path):
    config = load_config(
        None, ["svm.C=1e-10", "extract.scales=[688]", "data.classes=[raccoon]", "extract.flip=true"]
    )
    path = tmp_path / "run" / "config.yaml"
    config.dump(path)
    again = load_config(path)
    assert again == config
    sections = ("svm", "extract", "data")
    assert sections_fingerprint(again, *sections) == sections_fingerprint(config, *sections)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(AttributeError):
        config.svm.C = 1.0  # type: ignore[misc]


def test_bundled_configs_load_from_a_source_tree_that_is_not_installed():
    """scripts/gpu_check.sh runs the package from the source tree (PYTHONPATH=., nothing
    installed), where no install maps configs/ to spp_detect.configs; ``-c toy`` still works.
    ``python -S`` skips the .pth files, so the editable install's import hooks are not there."""
    root = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path[:0] = [{str(root)!r}]; sys.path += {site.getsitepackages()!r}; "
        "import importlib.util as u; assert u.find_spec('spp_detect.configs') is None; "
        "from spp_detect.config import load_config; print(load_config('toy').name)"
    )
    found = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert found.returncode == 0 and found.stdout.strip() == "toy", found.stderr[-2000:]


def test_every_bundled_config_loads_and_passes_the_value_checks():
    from spp_detect.config import bundled_configs

    names = bundled_configs()
    assert {"toy", "raccoon", "raccoon_conv", "voc07_zf5_5scale"} <= set(names)
    for name in names:
        assert load_config(name).name == name


# --- inputs from the wild (issue 27) ---------------------------------------------------------


def test_a_key_given_twice_in_a_yaml_file_is_one_line(tmp_path):
    """Two `finetune:` sections (or two keys in one): PyYAML kept the last one silently, so
    the run used the defaults of what the first set."""
    path = tmp_path / "twice.yaml"
    path.write_text("finetune:\n  iterations: 30\ndata:\n  root: x\nfinetune:\n  lr: 0.01\n")
    message = (
        f"{path}: line 5: key 'finetune' is given twice (also on line 1), and only the last "
        "would count; keep one"
    )
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        load_config(path)
    path.write_text("svm:\n  C: 1\n  seed: 2\n  C: 3\n")
    with pytest.raises(UserError, match=r"line 4: key 'C' is given twice \(also on line 2\)"):
        load_config(path)


def test_a_class_listed_twice_is_one_line():
    """[circle, circle, square, triangle]: one AP row overwrote the other (mAP 100 of 75)."""
    message = "data.classes lists 'circle' more than once; list each class once"
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, ["data.classes=[circle, circle, square, 'triangle']"])
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, ["data.classes=[circle, 'circle ', square]"])


def _numeric_keys(kind: type) -> list[str]:
    """Every config key holding numbers of ``kind`` (or a list of them)."""
    import dataclasses
    import typing

    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "name":
            continue
        hints = typing.get_type_hints(type(getattr(Config(), section.name)))
        for key, hint in hints.items():
            if hint is kind or typing.get_args(hint)[:1] == (kind,):
                keys.append(f"{section.name}.{key}")
    return keys


@pytest.mark.parametrize("key", _numeric_keys(float))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_key_refuses_numbers_that_are_not_numbers(key, value):
    """NaN passes no comparison: a NaN test.score_thresh kept no detection, without a word.
    Infinity is only svm.cache_gib's "no cap"."""
    if key == "svm.cache_gib" and value == ".inf":
        assert load_config(None, [f"{key}={value}"]).svm.cache_gib == float("inf")
        return
    requirement = "positive" if key == "svm.cache_gib" else "a finite number"
    with pytest.raises(UserError, match=rf"{re.escape(key)} must be {requirement}"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("key", _numeric_keys(int))
def test_every_int_key_refuses_minus_one(key):
    """Every integer key is range-checked when the config loads (seeds were not: svm.seed=-1
    and finetune.seed=-1 crashed inside the stage). finetune.iterations takes -1 (sized to the
    split), so it is refused from -2."""
    value = "[-1]" if key in ("extract.scales", "spp.levels", "finetune.lr_steps") else "-1"
    value = "-2" if key == "finetune.iterations" else value
    with pytest.raises(UserError, match=re.escape(key)):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("svm.seed=-1", "svm.seed must be in [0, 4294967295], got -1"),
        ("finetune.seed=4294967296", "finetune.seed must be in [0, 4294967295]"),
        ("bbox_reg.ridge_lambda=0", "bbox_reg.ridge_lambda must be positive, got 0.0"),
        ("bbox_reg.whiten_eps=0", "bbox_reg.whiten_eps must be positive, got 0.0"),
        ("test.score_thresh=nan", "test.score_thresh must be a finite number, got nan"),
        ("propose.base_k=0", "propose.base_k must be at least 1, got 0"),
        ("propose.inc_k=-1", "propose.inc_k must be at least 0, got -1"),
        ("propose.sigma=-0.5", "propose.sigma must be at least 0, got -0.5"),
        ("spp.offset=-1", "spp.offset must be at least 0 (px), got -1.0"),
        ("finetune.lr_steps=[0]", "finetune.lr_steps must be iterations of at least 1"),
    ],
)
def test_values_without_a_range_before_are_refused(override, message):
    """svm.seed=-1 and bbox_reg.ridge_lambda=0 passed the range check and crashed the stage
    (numpy's seed error, a Cholesky error); the other keys here had no range check."""
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


PAPER_CONFIGS = (
    "voc07_zf5_5scale",
    "voc07_zf5_1scale",
    "voc07_alexnet_5scale",
    "voc07_vgg16_5scale",
)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_voc07_configs_keep_the_papers_settings(name):
    """The code defaults are sized for your own data on a CPU; the voc07_* configs spell out
    where the paper differs (docs/method.md#where-the-defaults-differ-from-the-paper)."""
    config = load_config(name)
    finetune = config.finetune
    assert (finetune.fc_dim, finetune.iterations, finetune.lr_steps) == (
        4096,
        90000,
        (30000, 60000),
    )
    assert config.extract.scales == ((688,) if "1scale" in name else PAPER_SCALES)
    assert config.extract.backbone in ("zf5", "alexnet", "vgg16")
    assert config.propose.max_side == 0
    assert config.data.classes == VOC_CLASSES
    assert (config.spp.target_size, config.spp.offset, finetune.lr) == (224.0, 6.5, 1e-3)
    assert (config.svm.C, config.bbox_reg.ridge_lambda, config.test.nms_thresh) == (1e-3, 4000, 0.3)


def test_own_data_defaults_are_the_pretrained_trunk_and_a_sized_schedule():
    config = load_config(None, ["data.root=photos", "data.classes=[cat, dog]"])
    assert (config.extract.backbone, config.extract.weights) == ("efficientnet_lite0", "imagenet")
    assert config.finetune.iterations == -1 and config.extract.scales == DEFAULT_SCALES
    sized = sized_finetune(config.finetune, 160)
    assert (sized.iterations, sized.lr_steps) == (1280, (853,))
    assert sized_finetune(config.finetune, 10).iterations == MIN_SIZED_ITERATIONS
    assert sized_finetune(config.finetune, 10**6).iterations == MAX_SIZED_ITERATIONS
    fixed = replace(config.finetune, iterations=300, lr_steps=(200,))
    assert sized_finetune(fixed, 160) is fixed


def test_lr_steps_without_iterations_is_refused():
    expected = r"finetune\.lr_steps needs finetune\.iterations set \(-1 sizes both"
    with pytest.raises(UserError, match=expected):
        load_config(None, ["finetune.lr_steps=[700]"])
