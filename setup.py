"""Only what setup.cfg cannot say: the folder tools/ installs as the package stcn_tools
(its scripts are package data that the stcn-* console commands load; tools/__init__.py)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["shards", "shards.*", "pipelines", "pipelines.*",
                                      "stcn", "stcn.*"]) + ["stcn_tools"],
      package_dir={"stcn_tools": "tools"})
