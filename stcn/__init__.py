"""STCN in four layers: `model` (the network and its weights), `inference` (memory bank and
propagation), `train` (stages, loop, checkpoints) and `evaluation` (data sets, scoring, reports,
benchmarks). Imports point one way: inference and train use model; evaluation may use all three
(`tests/test_architecture.py` checks it)."""
