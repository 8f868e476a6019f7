"""The `spp-detect` command line: a click group of thin commands over `spp_detect.stages`.

Every command turns a :class:`UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from spp_detect import __version__
from spp_detect.config import Config, load_config
from spp_detect.errors import UserError
from spp_detect.run_dir import RunDir


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@dataclass(frozen=True)
class StageContext:
    """What every stage gets from the command line."""

    config: Config
    run_dir: RunDir
    device: str
    workers: int
    limit: int | None
    force: bool


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=click.get_text_stream("stderr"))


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("spp_detect")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options every stage shares (ARCHITECTURE.md §5); passes a ``ctx: StageContext``."""

    @click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                  help="YAML file with what differs from the defaults (see configs/).")
    @click.option("--run-dir", type=click.Path(file_okay=False),
                  help="Where artefacts go. Default: runs/<config name>.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one config value (YAML syntax); repeatable.")
    @click.option("--device", default=None, help="torch device. Default: cuda when available.")
    @click.option("--workers", type=click.IntRange(min=1), default=None,
                  help="Worker processes. Default: all cores.")
    @click.option("--limit", type=click.IntRange(min=1), default=None,
                  help="Use only the first N images of the split.")
    @click.option("--force", is_flag=True, help="Recompute outputs that already exist.")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
    @functools.wraps(func)
    def wrapper(config_path, run_dir, overrides, device, workers, limit, force, verbose, **kw):
        _setup_logging(verbose)
        config = load_config(config_path, overrides)
        root = Path(run_dir) if run_dir else Path("runs") / config.name
        ctx = StageContext(
            config=config,
            run_dir=RunDir(root),
            device=device or default_device(),
            workers=workers or os.cpu_count() or 1,
            limit=limit,
            force=force,
        )
        root.mkdir(parents=True, exist_ok=True)
        config.dump(ctx.run_dir.config_path)
        return func(ctx=ctx, **kw)

    return wrapper


def split_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--split", default=None,
                        help="Image split (ImageSets/Main/<split>.txt). Default: the stage's own.")(func)


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
@click.option("--seed", type=int, default=0, show_default=True)
def make_toy(out: str, num_train: int, num_test: int, seed: int) -> None:
    """Write the deterministic toy dataset (VOC layout) to OUT."""
    from spp_detect.toy import make_toy_dataset

    summary = make_toy_dataset(Path(out), num_train=num_train, num_test=num_test, seed=seed)
    click.echo(summary)


def main() -> None:
    cli(prog_name="spp-detect")
