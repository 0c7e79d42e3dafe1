"""The command-line tools, also as console commands on PATH after `pip install .`.

Each tool is an executable click script in this folder (`tools/NAME`, run from a
checkout). Installed, this folder is the package `stcn_tools` (setup.py maps it) and the
scripts are its package data; the console command `stcn-NAME` (NAME with dashes, declared
in setup.cfg) loads the script NAME as a module and calls its click command. Both routes
run the same code, and the scripts stay thin: no logic lives here either.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def command_name(tool: str) -> str:
    """The console command of a tool: make_shards -> stcn-make-shards."""
    return "stcn-" + tool.replace("_", "-")


def load(tool: str):
    """The script `tool` of this folder as a module (its `__main__` block does not run)."""
    name = f"{__name__}.{tool}"
    if name in sys.modules:
        return sys.modules[name]
    path = HERE / tool
    if not path.is_file():
        raise FileNotFoundError(f"no tool script {path}; reinstall the package (pip install .)")
    # The scripts have no .py suffix (they are run as tools/NAME), so name the loader.
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run(tool: str, args=None):
    """Run the click command of `tool` under its console name (what `stcn-NAME` does)."""
    return load(tool).main(args=args, prog_name=command_name(tool))


def __getattr__(attribute: str):
    """`stcn_tools:NAME`, the console entry point of the script NAME (PEP 562 lookup, so a
    new script needs only its console_scripts line in setup.cfg)."""
    if not attribute.startswith("_") and (HERE / attribute).is_file():
        return lambda: run(attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
