"""The command-line surface: console commands on PATH after `pip install .`, one option
vocabulary across the tools, and the shared --quiet/--verbose and progress behaviour."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TOOLS, load_tool, tool_path

REPO = Path(__file__).resolve().parents[1]


def tool_scripts() -> list[str]:
    return sorted(p.name for p in TOOLS.iterdir()
                  if p.is_file() and not p.name.startswith(("_", ".")) and "." not in p.name)


def console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_tool_has_a_console_command():
    """stcn-NAME for every tools/NAME, pointing at the same script."""
    scripts = console_scripts()
    expected = {"stcn-" + name.replace("_", "-"): f"stcn_tools:{name}" for name in tool_scripts()}
    assert scripts == expected


@pytest.mark.timeout(300)
@pytest.mark.slow  # pip installs the package into a fresh venv
def test_installed_commands_run_outside_the_checkout(tmp_path):
    """pip install . into a fresh venv, then each command's --help from another folder runs
    the installed copy (not the checkout)."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "demo_out", ".pytest_cache"))
    venv = tmp_path / "venv"
    # System site packages provide torch & co.; the system pip and setuptools build the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source)], check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    located = subprocess.run([str(python), "-c", "import stcn, stcn_tools; print(stcn.__file__); "
                              "print(stcn_tools.__file__)"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    assert len(located) == 2 and all(Path(p).is_relative_to(venv) for p in located), located
    for command in console_scripts():
        result = subprocess.run([command, "--help"], cwd=elsewhere, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert f"Usage: {command} " in result.stdout, (command, result.stdout[:300])


# ---- one option vocabulary ------------------------------------------------------------

# Competing spellings of the shared options (README "Commands and shared options"):
# none may be visible in any --help; the former ones still work, with a warning.
SYNONYMS = {"--out": ("--output", "--json-out", "--output-dir", "--out-dir"),
            "--workers": ("--score-workers", "--num-workers", "--jobs"),
            "--config": ("--stage-config",),
            "--shards": ("--shard-root",),
            "--quiet": ("--no-progress", "--progress", "--silent")}
# What a shared option's help must mention wherever it appears (same name, same meaning).
MEANING = {"--workers": "process", "--device": "auto", "--seed": "seed", "--run-dir": "run",
           "--quiet": "warnings", "--verbose": "debug"}


def all_commands():
    """(command path, click command, context) of every tool command and subcommand."""
    import click

    for name in tool_scripts():
        main = load_tool(name).main
        ctx = click.Context(main, info_name=name)
        if isinstance(main, click.Group):
            for sub_name, sub in main.commands.items():
                yield f"{name} {sub_name}", sub, click.Context(sub, info_name=sub_name, parent=ctx)
        else:
            yield name, main, ctx


def _has_default(param) -> bool:
    # click >= 8.3 marks "no default" with a sentinel rather than None
    return param.default is not None and "UNSET" not in repr(param.default) and param.default != ()


def test_every_option_is_explained_with_its_default_under_the_shared_names():
    import click

    problems = []
    for path, command, ctx in all_commands():
        names = set()
        for param in command.get_params(ctx):
            if not isinstance(param, click.Option) or param.hidden:
                continue
            names.update(param.opts + param.secondary_opts)
            record = param.get_help_record(ctx)
            if not param.help:
                problems.append(f"{path} {param.opts[0]}: no help")
            elif (not param.is_flag and not param.required and _has_default(param)
                  and "default" not in record[1].lower()):
                problems.append(f"{path} {param.opts[0]}: default {param.default!r} not shown")
            for option in param.opts:
                if option in MEANING and MEANING[option] not in param.help.lower():
                    problems.append(f"{path} {option}: help does not say {MEANING[option]!r}")
        for canonical, others in SYNONYMS.items():
            problems += [f"{path}: {other} instead of {canonical}" for other in others if other in names]
        if not {"--quiet", "--verbose"} <= names:
            problems.append(f"{path}: lacks --quiet/--verbose")
    assert not problems, "\n".join(problems)


def test_former_spellings_still_work_and_warn():
    from click.testing import CliRunner

    plan = load_tool("make_shards").main
    result = CliRunner().invoke(plan, ["plan", "--stage", "3", "--root", "old-root"])
    assert result.exit_code == 0, result.output
    assert "--root is deprecated" in result.output and "use --shards" in result.output
    assert "old-root/davis/skip5" in result.output
    result = CliRunner().invoke(plan, ["plan", "--stage", "3", "--shards", "new-root"])
    assert "deprecated" not in result.output and "new-root/davis/skip5" in result.output


# ---- progress and verbosity (shards.console) ------------------------------------------

def test_progress_in_logs_is_plain_periodic_lines():
    """Not a terminal: lines at the interval plus a final one, with rate and ETA, and no
    carriage returns."""
    import io

    from shards import console

    clock = iter(range(0, 1000, 10)).__next__   # each reading 10 s later
    stream = io.StringIO()
    bar = console.LineProgress(total=100, desc="verify", unit="shard", interval=25,
                               stream=stream, clock=clock)
    for _ in range(10):
        bar.update(10)
    bar.set_postfix(loss=0.5)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # start at t=0; updates at t=10..100, a line whenever 25 s passed since the last: 30, 60, 90
    assert len(lines) == 4, lines
    assert lines[0].startswith("verify: 30/100 (30%) 1 shard/s, elapsed 0:00:30, ETA 0:01:10")
    assert lines[-1].startswith("verify: 100/100 (100%)") and lines[-1].endswith("loss=0.5")


def _run_tool(args, stderr_tty=False, env_extra=None):
    """Run a tool script with stderr on a pipe or on a pseudo-terminal; its stderr text."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, **(env_extra or {})}
    env.pop("STCN_PROGRESS", None)
    if not stderr_tty:
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stderr
    leader, follower = pty.openpty()
    # A real terminal's size (a fresh pseudo-terminal reports 0 columns).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=follower,
                          env=env) as process:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:    # the terminal closes when the process ends
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=120) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny_shard_set(tmp_path_factory):
    from shards.sample_clips import write_synthetic_set

    url = str(tmp_path_factory.mktemp("console") / "set")
    write_synthetic_set(url, 6, size=32, max_count=2, progress=False)
    return url


def test_verify_progress_bar_on_terminal_lines_in_logs_quiet_and_verbose(tiny_shard_set):
    verify = tool_path("verify_shards")
    on_terminal = _run_tool([verify, tiny_shard_set], stderr_tty=True)
    assert "\r" in on_terminal and "3/3" in on_terminal
    in_log = _run_tool([verify, tiny_shard_set])
    assert "\r" not in in_log
    assert [line for line in in_log.splitlines() if "3/3 (100%)" in line and "shard/s" in line]
    assert "checked" not in in_log
    assert _run_tool([verify, tiny_shard_set, "--quiet"]).strip() == ""
    assert _run_tool([verify, tiny_shard_set, "--quiet"], stderr_tty=True).strip() == ""
    verbose = _run_tool([verify, tiny_shard_set, "--verbose"])
    assert len([line for line in verbose.splitlines() if line.startswith("checked ")]) == 3


# ---- contact sheets and inspect_shards ----------------------------------------------------

def _pipeline_like_clip(key="vid-a-000003"):
    """A clip with the meta fields pipelines write (source video, frames, indices, augment)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(90, 110, (3, 64, 64, 3), dtype=np.uint8)  # near-grey, low contrast
    masks = np.zeros((3, 64, 64), np.uint8)
    masks[:, 8:30, 8:30] = 1
    masks[:, 36:60, 30:58] = 2
    meta = {"source": "davis", "video": "vid-a", "frames": ["00004", "00007", "00009"],
            "frame_index": [4, 7, 9], "max_skip": 5, "round": 3, "objects": [1],
            "augment": {"clip": {"crop": [1, 2, 30, 40], "ratio": 0.9},
                        "frames": [{"angle": 1.5, "shear": -2.0}, {"angle": 3.25, "shear": 0.5},
                                   {"angle": -7.0, "shear": 1.0}]}}
    return {"__key__": key, "frames": frames, "masks": masks, "meta": meta}


def test_contact_sheet_overlays_are_visible_with_a_legend():
    from shards import contact_sheet as cs

    sample = _pipeline_like_clip()
    thumb = 64
    block = cs.clip_block(sample, thumb)
    tiles = block[-thumb:]                             # the overlaid frames, bottom of the block
    header = block[:-thumb]
    red, green = cs.object_colour(1), cs.object_colour(2)
    assert not np.array_equal(red, green)
    for t in range(3):
        tile = tiles[:, t * thumb:(t + 1) * thumb].astype(int)
        frame = sample["frames"][t].astype(int)
        # outline: solid object colour along the border, inside the object
        assert (tile[8, 8:30] == red).all() and (tile[29, 8:30] == red).all()
        assert (tile[36, 30:58] == green).all()
        # fill: translucent, clearly tinted towards the colour but not opaque
        inner = (slice(14, 24), slice(14, 24))
        shift = np.abs(tile[inner] - frame[inner]).sum(-1).mean()
        assert shift > 100, shift
        assert not (tile[inner] == red).all(-1).any()
        # background untouched
        assert (tile[0:6, 34:64] == frame[0:6, 34:64]).all()
    # legend: a swatch of each object's colour in the header, and the unused object marked
    for colour in (red, green):
        assert (header == colour).all(-1).sum() >= 50
    info = cs.describe(sample)
    assert info["video"] == "vid-a" and info["frame_index"] == [4, 7, 9]
    assert info["frame_augment"][1] == {"angle": 3.25, "shear": 0.5}
    assert info["clip_augment"] == {"clip": {"crop": [1, 2, 30, 40], "ratio": 0.9}}
    assert info["objects_used"] == [1] and info["objects_present"] == [1, 2]


def test_inspect_shards_shows_source_frames_and_augmentation(tmp_path):
    import json

    import cv2
    from click.testing import CliRunner

    from shards.manifest import Manifest, write_manifest
    from shards.writer import ShardWriter

    url = str(tmp_path / "set")
    with ShardWriter(url, max_count=4) as writer:
        writer.write(_pipeline_like_clip("vid-a-000003"))
        writer.write(_pipeline_like_clip("vid-a-000004"))
    write_manifest(url, Manifest(shards=writer.infos, config={"generator": "test"}))
    out = tmp_path / "sheet.png"
    tool = load_tool("inspect_shards")
    result = CliRunner().invoke(tool.main, [url, "--out", str(out), "--thumb", "64"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [line["key"] for line in lines] == ["vid-a-000003", "vid-a-000004"]
    assert lines[0]["video"] == "vid-a" and lines[0]["frames"] == ["00004", "00007", "00009"]
    assert lines[0]["frame_index"] == [4, 7, 9] and lines[0]["frame_augment"][2]["angle"] == -7.0
    sheet = cv2.imread(str(out))
    assert sheet.shape[1] == 3 * 64 and sheet.shape[0] > 2 * 64


def test_one_progress_helper():
    """Every progress display goes through shards.console (bar on a terminal, lines in
    logs, silent with --quiet): no module of ours uses tqdm directly."""
    offenders = []
    for package in ("shards", "pipelines", "stcn", "tools"):
        for path in (REPO / package).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or path.parent == TOOLS) \
                    and path != REPO / "shards" / "console.py" and "__pycache__" not in path.parts:
                text = path.read_text(errors="replace")
                if "import tqdm" in text or "from tqdm" in text:
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
