"""STCN: network, memory and inference core, losses, trainer and evaluation."""
