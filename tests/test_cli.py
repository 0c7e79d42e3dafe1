"""The command-line surface: console commands on PATH after `pip install .`, one option
vocabulary across the tools, and the shared --quiet/--verbose and progress behaviour."""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


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
    assert all(Path(p).is_relative_to(venv) for p in located), located
    for command in console_scripts():
        result = subprocess.run([command, "--help"], cwd=elsewhere, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert f"Usage: {command} " in result.stdout, (command, result.stdout[:300])
