"""Console behaviour every command shares: verbosity, progress, option aliases.

- Verbosity: ``--quiet`` (warnings, errors and results only), default (plus progress and
  informational lines), ``--verbose`` (plus debug detail). One process-wide setting,
  applied to Python logging and read by ``progress``.
- Progress: on a terminal a tqdm bar with ETA; otherwise (batch logs, SLURM output files,
  pipes) one plain line every ``PROGRESS_INTERVAL_S`` seconds and one at the end, no
  carriage returns. ``STCN_PROGRESS=bar|lines|off`` overrides the choice and
  ``STCN_PROGRESS_INTERVAL`` the period (seconds).
- Click helpers: ``ToolCommand`` / ``ToolGroup``, the command classes of every tool:
  --quiet/--verbose, -h, defaults shown in --help, and old option spellings accepted as
  hidden aliases that warn.

It lives in ``shards`` because that is the one package every tool, pipeline and trainer
module may import (shards depends on nothing else of ours).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Mapping

import click

from . import errors

QUIET, NORMAL, VERBOSE = 0, 1, 2
PROGRESS_INTERVAL_S = 30.0
PROGRESS_MODES = ("bar", "lines", "off")
LOGGERS = ("shards", "pipelines", "stcn")

_verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """Set the process-wide verbosity (QUIET, NORMAL, VERBOSE) and route our loggers to
    stderr at the matching level."""
    global _verbosity
    _verbosity = level
    log_level = {QUIET: logging.WARNING, NORMAL: logging.INFO}.get(level, logging.DEBUG)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(log_level)
        if not any(getattr(h, "_stcn_console", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                                   "%H:%M:%S"))
            handler._stcn_console = True
            logger.addHandler(handler)


def verbosity() -> int:
    return _verbosity


def info(message: str) -> None:
    """An informational line on stderr, unless --quiet."""
    if _verbosity >= NORMAL:
        click.echo(message, err=True)


def debug(message: str) -> None:
    """A detail line on stderr, only with --verbose."""
    if _verbosity >= VERBOSE:
        click.echo(message, err=True)


def progress_mode(stream=None) -> str:
    """'off' when quiet, else STCN_PROGRESS if set, else 'bar' on a terminal, 'lines' otherwise."""
    if _verbosity <= QUIET:
        return "off"
    forced = os.environ.get("STCN_PROGRESS")
    if forced:
        if forced not in PROGRESS_MODES:
            raise ValueError(f"STCN_PROGRESS={forced!r}: expected one of {', '.join(PROGRESS_MODES)}")
        return forced
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", initial: float = 0, enabled: bool = True, stream=None):
    """A progress reporter with tqdm's core interface (iteration, update, set_postfix,
    write, close, context manager): a bar on a terminal, plain lines in logs, nothing when
    ``enabled`` is false or the process is quiet."""
    mode = progress_mode(stream) if enabled else "off"
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if mode == "bar":
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                    dynamic_ncols=True, file=stream)
    interval = float(os.environ.get("STCN_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        interval=interval, stream=stream, silent=mode == "off")


class LineProgress:
    """Progress as plain lines (no carriage returns), at most one per ``interval`` seconds
    plus a final one: ``desc: 120/500 (24%) 3.1 clip/s, elapsed 0:00:38, ETA 0:02:02``."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0,
                 interval=PROGRESS_INTERVAL_S, stream=None, silent=False, clock=time.monotonic):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.interval = interval
        self.stream = stream
        self.silent = silent
        self.clock = clock
        self.postfix = ""
        self.start = self.last = clock()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return len(self.iterable) if self.iterable is not None else int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: Mapping | None = None, refresh: bool = True, **kwargs) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        """tqdm redraws here; a log gets its lines on the interval only."""

    def write(self, text: str) -> None:
        """A message between progress lines; stdout, as tqdm.write."""
        click.echo(text)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit(self.clock())

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: " if self.desc else "", _count(self.n)]
        if self.total:
            parts.append(f"/{_count(self.total)} ({100.0 * self.n / self.total:.0f}%)")
        parts.append(f" {rate:.0f}" if rate >= 100 else f" {rate:.3g}")
        parts.append(f" {self.unit}/s, elapsed {_duration(elapsed)}")
        if self.total and rate > 0:
            parts.append(f", ETA {_duration(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(f", {self.postfix}")
        return "".join(parts)

    def _emit(self, now: float) -> None:
        if not self.silent:
            click.echo(self.line(now), file=self.stream or sys.stderr)


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- click helpers -------------------------------------------------------------------

def _set_verbosity_option(ctx, param, value):
    # Both eager flags report here (given or not); once both have, set the level.
    # --quiet wins over --verbose, and neither means the default.
    flags = ctx.__dict__.setdefault("_stcn_verbosity_flags", {})
    flags[param.name] = value
    if len(flags) == 2:
        set_verbosity(QUIET if flags["quiet"] else VERBOSE if flags["verbose"] else NORMAL)
    return value


def verbosity_options() -> list[click.Option]:
    """--quiet/-q and --verbose/-v, the same on every command (see the module docstring)."""
    return [click.Option(["--quiet", "-q"], is_flag=True, is_eager=True, expose_value=False,
                         callback=_set_verbosity_option,
                         help="Only warnings, errors and results: no progress, no info lines."),
            click.Option(["--verbose", "-v"], is_flag=True, is_eager=True, expose_value=False,
                         callback=_set_verbosity_option, help="Also print debug detail.")]


# Every tool's help: -h too, wide enough for the option texts, and each option's default.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100,
                    "show_default": True}


def rewrite_aliases(args: list[str], aliases: Mapping[str, str], command: str = "") -> list[str]:
    """Replace old option spellings in ``args`` by their new names, warning once for each.
    An alias maps to a new option name, or, for a removed flag, to a replacement flag."""
    out, warned = [], set()
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, sep, value = arg.partition("=")
        if name in aliases:
            new = aliases[name]
            if name not in warned:
                warned.add(name)
                click.echo(f"warning: {command + ' ' if command else ''}{name} is deprecated and will "
                           f"be removed in the next release; use {new}", err=True)
            arg = new + sep + value
        out.append(arg)
    return out


class ToolCommand(click.Command):
    """The command class of every tool: --quiet/--verbose, the shared help settings, and
    ``aliases={"--old": "--new"}``: old spellings still work, hidden from --help, with a
    warning (kept for one release)."""

    def __init__(self, *args, aliases: Mapping[str, str] | None = None, **kwargs):
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        self.params.extend(verbosity_options() + [errors.debug_option()])
        self.aliases = dict(aliases or {})

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, rewrite_aliases(args, self.aliases, ctx.command_path))

    def main(self, *args, **kwargs):
        # errors as one line naming the file and the fix, exit 1; --debug: traceback
        return errors.run_main(super().main, *args, **kwargs)


class ToolGroup(click.Group):
    """A click group whose subcommands are ToolCommands (see there); --quiet/--verbose
    belong to the subcommands."""
    command_class = ToolCommand

    def __init__(self, *args, aliases: Mapping[str, str] | None = None, **kwargs):
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, rewrite_aliases(args, self.aliases, ctx.command_path))

    def main(self, *args, **kwargs):
        return errors.run_main(super().main, *args, **kwargs)
