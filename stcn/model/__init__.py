"""The model layer: the STCN network (`network.py`, built from `resnet.py` and `modules.py`), the
affinity and readout maths it shares with inference (`memory_ops.py`, `aggregate.py`), its
weights and the official checkpoint layout (`weights.py`), input statistics (`inputs.py`) and
precision (`precision.py`). It imports nothing else of `stcn`."""
