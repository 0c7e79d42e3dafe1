"""How every tool ends on an error: one line naming the file and the fix, exit status 1.

`run_main(click_main, ...)` wraps a click command's `main` (shards.console.ToolCommand and
ToolGroup call it, so every tool gets it):
  - the project's own error classes (defined in shards, pipelines or stcn), OSError,
    ValueError and RuntimeError print `Error: <message>` on one line and exit 1; an
    OSError names its path and what to do (disk full, permissions, missing path);
  - `--debug` (every command has it) shows the full traceback instead;
  - Ctrl-C that reaches here (a second Ctrl-C during training, or any tool without its
    own handling) exits 130, the shells' convention, not click's "Aborted!" with 1;
  - anything else (KeyError, TypeError, ...) is a bug: its traceback is shown.

It lives in shards because that is the one package every tool may import (shards depends
on nothing else of ours); the project's classes are recognised by their module.
"""
from __future__ import annotations

import errno
import sys
import traceback

import click

PROJECT_PACKAGES = ("shards", "pipelines", "stcn")
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT

#: What to do about an OSError, by errno.
FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or write to another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space, or write elsewhere",
    errno.EACCES: "permission denied: check the file's owner and mode, or use another path",
    errno.EPERM: "operation not permitted: check the file's owner and mode, or use another path",
    errno.EROFS: "the file system is read-only: write to another location",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a component of the path is not a directory: check the path",
    errno.EISDIR: "it is a directory: give a file path",
    errno.EIO: "I/O error: check the disk (dmesg) and retry",
    errno.EMFILE: "too many open files: raise `ulimit -n` or use fewer workers",
}

_debug = False


def debug_enabled() -> bool:
    return _debug


def _set_debug(ctx, param, value):
    global _debug
    _debug = _debug or bool(value)
    return value


def debug_option() -> click.Option:
    """--debug: show the full traceback of an error instead of one line."""
    return click.Option(["--debug"], is_flag=True, is_eager=True, expose_value=False,
                        callback=_set_debug,
                        help="On an error, show the full Python traceback instead of one line.")


def is_project_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in PROJECT_PACKAGES


def describe_os_error(error: OSError) -> str:
    """`PATH: what happened; what to do` for an OSError."""
    where = error.filename
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    fix = FIXES.get(error.errno)
    what = error.strerror or str(error)
    if fix is None:
        fix = what
    elif what and what.lower() not in fix.lower():
        fix = f"{what}; {fix.split(': ', 1)[1] if ': ' in fix else fix}"
    return f"{where}: {fix}" if where is not None else f"{str(error)}"


def describe(error: BaseException) -> str | None:
    """The one-line message for an error a user can act on; None for a bug."""
    if isinstance(error, OSError) and not is_project_error(error):
        return describe_os_error(error)
    if is_project_error(error) or isinstance(error, (OSError, ValueError, RuntimeError)):
        text = str(error).strip() or type(error).__name__
        return text
    return None


def run_main(click_main, *args, **kwargs):
    """Call a click command's `main` (non-standalone) and end the process as described in
    the module docstring."""
    kwargs["standalone_mode"] = False
    try:
        click_main(*args, **kwargs)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.Abort:  # click's name for KeyboardInterrupt / EOF at a prompt
        click.echo("Aborted (Ctrl-C).", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except KeyboardInterrupt:
        click.echo("Aborted (Ctrl-C).", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except click.ClickException as error:
        if _debug and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        error.show()
        sys.exit(error.exit_code)
    except Exception as error:
        line = describe(error)
        if line is None or _debug:
            raise
        click.echo(f"Error: {line}", err=True)
        sys.exit(1)
    sys.exit(0)  # a command that returns ends well; failures raise or call sys.exit


__all__ = ["run_main", "describe", "describe_os_error", "debug_option", "debug_enabled",
           "is_project_error", "INTERRUPTED_EXIT_CODE"]
