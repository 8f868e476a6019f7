"""The `spp-detect` command line: a click group of thin commands over `spp_detect.stages`.

Every command turns a :class:`UserError` (and a failed write: full disk, read-only or forbidden
folder) into one line on stderr and exit code 2, and Ctrl-C into "interrupted; rerun to resume"
and exit code 130.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from spp_detect._version import __version__
from spp_detect.config import EVAL_METRICS, Config, load_config
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import is_write_error, write_error
from spp_detect.runtime.distributed import Dist, RankStopped, from_env, start, stop
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext

logger = logging.getLogger(__name__)
# click's complaint about a word no option takes: `--set a=1 b=2` leaves "b=2" over
STRAY_SET = re.compile(r"unexpected extra arguments? \((.*)\)")
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's convention
VOC2007_TEST = "test"  # the split `eval --voc2007` evaluates (VOC 2007's ImageSets/Main/test.txt)
STOPPED_EXIT = 143  # 128 + SIGTERM: torchrun stopped this rank because another one failed


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            message = with_hint_options(str(exc), ctx.meta.get(HINT_OPTIONS))
            click.echo(f"{_rank_prefix()}error: {message}", err=True)
            ctx.exit(2)
        except click.UsageError as exc:
            stray = STRAY_SET.search(exc.format_message())
            if stray is None or "=" not in stray.group(1):
                raise
            click.echo(
                f"error: {stray.group(1)}: not an option; give each value its own --set "
                "(--set a.x=1 --set b.y=2)",
                err=True,
            )
            ctx.exit(2)
        except OSError as exc:  # a write outside artifacts.atomic_path (a folder, a log)
            if not is_write_error(exc):
                raise
            click.echo(f"error: {write_error(exc.filename or Path.cwd(), exc)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:  # every artefact is written atomically: nothing half-written
            click.echo("interrupted; rerun to resume", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except RankStopped as exc:  # under torchrun: files are atomic, a rerun resumes
            click.echo(f"{_rank_prefix()}stopped: {exc}; rerun to resume", err=True)
            ctx.exit(STOPPED_EXIT)


def _rank_prefix() -> str:
    """The prefix "rank N: " under torchrun (every rank prints to one terminal), else ""."""
    try:
        dist = from_env()
    except UserError:
        return ""
    return f"rank {dist.rank}: " if dist.active else ""


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool, dist: Dist) -> None:
    """Log lines on stderr; under torchrun, prefixed with the rank, and only warnings from the
    ranks other than 0 (whose INFO lines would repeat rank 0's)."""
    handler = _TqdmHandler()
    prefix = f"rank {dist.rank}: " if dist.active else ""
    handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s: %(message)s"))
    root = logging.getLogger("spp_detect")
    root.handlers[:] = [handler]
    quiet = not dist.is_main and not verbose
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def require_torchvision() -> None:
    """Stop with one line when torchvision's compiled ops do not match the installed torch."""
    try:
        import torch
        import torchvision.ops

        torchvision.ops.nms(torch.zeros((0, 4)), torch.zeros(0), 0.5)
    except (ImportError, RuntimeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"torchvision does not work with the installed torch ({reason}); install a matching "
            "pair: pip install --upgrade torch torchvision (do not pin torch alone)"
        ) from None


def stage_options(
    func: Callable[..., Any] | None = None,
    *,
    default_config: str | None = None,
    reads_run: bool = False,
    keeps_sections: tuple[str, ...] = (),
    workers: bool = False,
    limit: bool = True,
    force: bool = True,
) -> Callable[..., Any]:
    """The options every stage shares (docs/contracts.md#cli); passes a ``ctx: StageContext``.

    Without -c, the config is the run directory's saved `config.yaml` when there is one (so
    `--run-dir DIR` alone picks up that run), else ``default_config`` or the code defaults.
    A command that ``reads_run`` (detect, eval) leaves the run's saved config as it is: its
    ``--set`` values are for this call, and the run may be read-only; one that changes only
    ``keeps_sections`` of a saved config (test: its test and eval settings) leaves it too.
    ``workers``, ``limit`` and ``force``: whether the command takes those options (a verb shows
    only the options it uses).
    """
    if func is None:
        return functools.partial(
            stage_options,
            default_config=default_config,
            reads_run=reads_run,
            keeps_sections=keeps_sections,
            workers=workers,
            limit=limit,
            force=force,
        )
    used = {"workers": workers, "limit": limit, "force": force}
    for name, option in OPTIONAL.items():
        # an option a verb does not use stays accepted (scripts that pass it keep working) but
        # hidden from its help, and says it is ignored when given
        func = option(hidden=not used[name])(func)

    @click.option(
        "-c",
        "--config",
        "config_path",
        help="YAML file, or a bundled config name (configs/): what differs from the defaults.",
    )
    @click.option(
        "--run-dir",
        type=click.Path(file_okay=False),
        help="Where artefacts go. Default: runs/<config name>.",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (YAML syntax); repeatable.",
    )
    @click.option("--device", default=None, help="torch device. Default: cuda when available.")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
    @functools.wraps(func)
    def wrapper(
        config_path, run_dir, overrides, device, verbose, workers=None, limit=None, force=False,
        **kw,
    ):  # fmt: skip
        dist = from_env()  # torchrun's ranks; world 1 otherwise
        if not dist.is_main:
            # progress bars on rank 0 only; tqdm reads this when first imported (just below)
            os.environ["TQDM_DISABLE"] = "1"
        _setup_logging(verbose, dist)
        given = {"workers": workers is not None, "limit": limit is not None, "force": force}
        for name in (name for name, value in given.items() if value and not used[name]):
            logger.warning("--%s does nothing for this command; ignored", name)
        # 1. The config first, before torch loads: a typo is reported at once.
        if run_dir:
            check_folder_option(Path(run_dir), "--run-dir")
        explicit = config_path
        if config_path is None:
            saved = RunDir(run_dir).config_path if run_dir else None
            config_path = saved if saved and saved.is_file() else default_config
        config = load_config(config_path, overrides)
        root = RunDir.of(run_dir, config.name).root
        click.get_current_context().meta[HINT_OPTIONS] = hint_options(explicit, root, overrides)
        if config_path is None and not run_dir:
            logger.info(
                "no -c or --run-dir: the code defaults (data.root %s), writing to %s",
                config.data.root, root,
            )  # fmt: skip
        # 2. torch and the device: a bad or absent device stops here, before any work.
        require_torchvision()
        from spp_detect.runtime.device import default_device, rank_device, resolve_device

        device = rank_device(dist, device or default_device())
        resolve_device(device)
        ctx = StageContext(
            config=config,
            run_dir=RunDir(root),
            device=device,
            # the ranks on one machine share its cores
            workers=workers or max(1, (os.cpu_count() or 1) // dist.local_world),
            limit=limit,
            force=force,
            dist=start(dist, device),
        )
        # 3. The run's record. A first run's is written when it starts, so that --run-dir alone
        # resumes it after an interruption; a finished run's changes only when a command
        # succeeds, so that a call its artefacts refuse leaves the record as it was.
        records = ctx.dist.is_main and records_run(reads_run, keeps_sections, config, ctx.run_dir)
        if records and not ctx.run_dir.config_path.is_file():
            config.dump(ctx.run_dir.config_path)
        result = func(ctx=ctx, **kw)
        if records:
            config.dump(ctx.run_dir.config_path)
        stop(ctx.dist)
        return result

    return wrapper


# The options only some verbs use, each a click.option with ``hidden`` still to choose
OPTIONAL = {
    "workers": functools.partial(
        click.option, "--workers", type=click.IntRange(min=1), default=None,
        help="Processes computing proposals (one image each). Default: all cores.",
    ),
    "limit": functools.partial(
        click.option, "--limit", type=click.IntRange(min=1), default=None,
        help="Use only the first N images of the split.",
    ),
    "force": functools.partial(
        click.option, "--force", is_flag=True, help="Recompute outputs that already exist.",
    ),
}  # fmt: skip


def records_run(
    reads_run: bool, keeps_sections: tuple[str, ...], config: Config, run_dir: RunDir
) -> bool:
    """Whether a command writes its config as the run's record (``stage_options``)."""
    if reads_run:
        return False
    if not keeps_sections or not run_dir.config_path.is_file():
        return True
    try:
        saved = load_config(run_dir.config_path)
    except UserError:
        return True  # a damaged record is replaced
    changed = [
        section
        for section, value in config.to_dict().items()
        if section != "name" and saved.to_dict().get(section) != value
    ]
    return not set(changed) <= set(keeps_sections)


# What a "run `spp-detect ...` first" hint must carry so that pasting it acts on the same run
HINT_OPTIONS = "spp_detect.hint_options"
HINT = re.compile(
    r"`(spp-detect (?:propose|extract|finetune|train-svm|train-bbox|test|eval|run)\b[^`]*)`"
)


def hint_options(config_path: str | None, root: Path, overrides: Sequence[str]) -> list[str]:
    """-c (when given), --run-dir and each --set of this call, shell-quoted."""
    options = ["-c", config_path] if config_path else []
    options += ["--run-dir", str(root)]
    for item in overrides:
        options += ["--set", item]
    return [shlex.quote(str(option)) for option in options]


def with_hint_options(message: str, options: Sequence[str] | None) -> str:
    """``message`` with this call's options added to each `spp-detect VERB ...` it suggests
    (an option the hint names already is left as it is)."""
    if not options:
        return message

    def complete(match: re.Match) -> str:
        hint, extra = match.group(1), []
        for flag, value in zip(options[::2], options[1::2], strict=True):
            if (flag in ("-c", "--run-dir") and flag in hint) or f"{flag} {value}" in hint:
                continue
            extra += [flag, value]
        return f"`{' '.join([hint, *extra])}`"

    return HINT.sub(complete, message)


# Linux's NAME_MAX: the longest name of one file or folder, in bytes.
NAME_MAX_BYTES = 255


def check_folder_option(folder: Path, option: str) -> None:
    """Refuse a folder option that no file can be written under, before any work: a part of it
    is an existing file (ENOTDIR), or a name in it is too long (ENAMETOOLONG)."""
    for part in folder.parts:
        if len(part.encode()) > NAME_MAX_BYTES:
            raise UserError(
                f"{option} {folder}: the name {part[:40]}... is {len(part.encode())} bytes, "
                f"longer than the {NAME_MAX_BYTES} a file system allows; use a shorter {option}"
            )
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(
                f"{option} {folder}: {parent} is a file, not a folder; use another {option}"
            )


def split_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--split",
        default=None,
        help="Image split (ImageSets/Main/<split>.txt). Default: the stage's own.",
    )(func)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spp-detect")
def cli() -> None:
    """SPP-net object detection, stage by stage.

    Typical use: `spp-detect demo` (toy data, CPU, minutes), or `spp-detect run -c CONFIG` on a
    VOC-layout dataset. Each stage writes under --run-dir and resumes where it stopped.
    """


@cli.command("make-toy")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--num-train", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--num-test", type=click.IntRange(min=1), default=30, show_default=True)
# the toy's numpy generators take seeds 0 to 2**32 - 1 (config.MAX_SEED)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def make_toy(out: str, num_train: int, num_test: int, seed: int) -> None:
    """Write the deterministic toy dataset (VOC layout) to OUT."""
    from spp_detect.data.toy import make_toy_dataset

    summary = make_toy_dataset(Path(out), num_train=num_train, num_test=num_test, seed=seed)
    click.echo(summary)


@cli.command("convert-weights")
@click.argument("model", type=click.Path(dir_okay=False))
# backbones.BACKBONES, spelled out: importing it here would load torch for every command
@click.option(
    "--backbone", required=True, type=click.Choice(["zf5", "alexnet", "vgg16", "caffenet"])
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write (.pt).")
@click.option("--mean", default=None, help="B,G,R pixel mean instead of the backbone's usual one.")
@click.option(
    "--mean-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A Caffe mean.binaryproto; its per-channel mean is used.",
)
def convert_weights(
    model: str, backbone: str, out: str, mean: str | None, mean_file: str | None
) -> None:
    """Convert a Caffe MODEL (.caffemodel) into a weights file for extract.weights."""
    from spp_detect.models.caffe import convert_caffemodel

    mean_path = Path(mean_file) if mean_file else None
    click.echo(convert_caffemodel(Path(model), backbone, Path(out), mean, mean_path))


@cli.command("propose")
@stage_options(workers=True)
@split_option
@click.option(
    "--report-only",
    is_flag=True,
    help="Only print and save the recall report of existing proposals.",
)
def propose(ctx: StageContext, split: str | None, report_only: bool) -> None:
    """Region proposals per image (selective search, EdgeBoxes or a .mat file) + recall report."""
    from spp_detect.stages.propose import run_propose

    click.echo(run_propose(ctx, split or ctx.config.data.train_split, report_only=report_only))


@cli.command("extract")
@stage_options
@split_option
def extract(ctx: StageContext, split: str | None) -> None:
    """Cache conv5 maps of every image at every scale (float16 .npz per image)."""
    from spp_detect.stages.extract import run_extract

    click.echo(run_extract(ctx, split or ctx.config.data.train_split))


@cli.command("finetune")
@stage_options
@split_option
def finetune(ctx: StageContext, split: str | None) -> None:
    """Fine-tune fc6, fc7 and a (K+1)-way classifier (and the conv layers from
    finetune.conv_from, end to end from images); resumes when killed."""
    from spp_detect.stages.finetune import run_finetune

    click.echo(run_finetune(ctx, split or ctx.config.data.train_split))


@cli.command("train-svm")
@stage_options
@split_option
def train_svm(ctx: StageContext, split: str | None) -> None:
    """Per-class linear SVMs on fine-tuned fc7, with one hard-negative mining pass."""
    from spp_detect.stages.train_svm import run_train_svm

    click.echo(run_train_svm(ctx, split or ctx.config.data.train_split))


@cli.command("train-bbox")
@stage_options
@split_option
def train_bbox(ctx: StageContext, split: str | None) -> None:
    """Class-specific bounding-box regression on pool5 features."""
    from spp_detect.stages.train_bbox import run_train_bbox

    click.echo(run_train_bbox(ctx, split or ctx.config.data.train_split))


@cli.command("test")
@stage_options(keeps_sections=("test", "eval"))
@split_option
def test(ctx: StageContext, split: str | None) -> None:
    """Detections for every image of a split (default data.test_split)."""
    from spp_detect.stages.test import run_test

    click.echo(run_test(ctx, split or ctx.config.data.test_split))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def report(run_dir: str, verbose: bool) -> None:
    """Write RUN_DIR/report.html, one page to open in a browser: provenance, AP and PR curves,
    fine-tuning curves, stage times and memory, proposal recall, and test images with their
    hits, misses and false positives (`run` writes it at its end)."""
    _setup_logging(verbose, Dist())
    saved = RunDir(Path(run_dir)).config_path
    if not saved.is_file():
        raise UserError(f"{saved}: not found; pass the --run-dir of a run (it saves config.yaml)")
    config = load_config(saved)
    from spp_detect.stages.report import write_report

    click.echo(f"wrote {write_report(config, RunDir(Path(run_dir)))}")


@cli.command("eval")
@stage_options(reads_run=True, force=False)
@split_option
@click.option(
    "--voc2007",
    is_flag=True,
    help="The VOC2007 test split with the 11-point metric as the headline.",
)
@click.option(
    "--combine",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Another run directory: merge its detections with NMS and evaluate both.",
)
@click.option(
    "--metric",
    type=click.Choice(EVAL_METRICS),
    default=None,
    help="coco: also AP@[.5:.95], AP50, AP75, small/medium/large (pycocotools). "
    "Default: eval.metric.",
)
def eval_(
    ctx: StageContext, split: str | None, voc2007: bool, combine: str | None, metric: str | None
) -> None:
    """VOC AP (11-point and area) of a split's detections; runs test first when needed."""
    from spp_detect.evaluation.coco_eval import require_pycocotools
    from spp_detect.stages.eval import has_detections, run_eval
    from spp_detect.stages.test import run_test

    metric = metric or ctx.config.eval.metric
    if metric == "coco":
        require_pycocotools()  # before running test
    if voc2007 and split not in (None, VOC2007_TEST):
        raise UserError(
            f"--voc2007 evaluates the {VOC2007_TEST!r} split; drop --split {split} or --voc2007"
        )
    split = VOC2007_TEST if voc2007 else split or ctx.config.data.test_split
    if not ctx.dist.broadcast(has_detections(ctx, split)):  # under torchrun: rank 0 decides
        click.echo(f"no detections for {split} yet: running test first", err=True)
        click.echo(run_test(ctx, split), err=True)
        if ctx.dist.is_main:  # test wrote to the run: its config is the run's record
            ctx.config.dump(ctx.run_dir.config_path)
    use_07 = True if voc2007 else ctx.config.eval.use_07_metric
    click.echo(run_eval(ctx, split, use_07, Path(combine) if combine else None, metric))


@cli.command("run")
@stage_options(workers=True)
def run(ctx: StageContext) -> None:
    """Every stage in order, skipping those already complete; a time table at the end."""
    from spp_detect.stages.run import run_all

    click.echo(run_all(ctx))


@cli.command("detect")
@stage_options(reads_run=True, limit=False, force=False)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder. Default: <run-dir>/detect.",
)
@click.option(
    "--score-thresh",
    type=float,
    default=0.0,
    show_default=True,
    help="Keep detections scoring at least this (SVM margin; probability with softmax).",
)
def detect(
    ctx: StageContext, images: tuple[str, ...], out_dir: str | None, score_thresh: float
) -> None:
    """Detect objects in IMAGES with a trained run: one JSON and one drawn PNG per image."""
    from spp_detect.stages.detect import run_detect

    _one_process_only(ctx, "detect")
    out = Path(out_dir) if out_dir else ctx.run_dir.detect_dir
    check_folder_option(out, "--out")
    click.echo(run_detect(ctx, [Path(p) for p in images], out, score_thresh))


@cli.command("demo")
@stage_options(default_config="toy", workers=True, limit=False)
def demo(ctx: StageContext) -> None:
    """Build the toy dataset (data/toy) and run the whole pipeline on it: minutes on a CPU, on
    the GPU when there is one (--device cpu to keep to the CPU)."""
    from spp_detect.stages.demo import run_demo

    _one_process_only(ctx, "demo")
    click.echo(run_demo(ctx, Path(ctx.config.data.root)))


def _one_process_only(ctx: StageContext, verb: str) -> None:
    if ctx.dist.active:
        raise UserError(
            f"{verb}: runs as one process, not under torchrun (which the stage verbs and `run` "
            f"support); run `spp-detect {verb} ...` directly"
        )


def main() -> None:
    try:
        cli(prog_name="spp-detect")
    finally:
        # The command is over, its files written or its error shown. A Ctrl-C during the
        # interpreter's shutdown (joining the reader and writer threads) would end it killed by
        # the signal, as if it had failed; ignore it from here on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
