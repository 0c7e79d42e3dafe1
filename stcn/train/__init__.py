"""The training layer: stages and their phases (`stages.py`, `clip_ranges.py`), the loop
(`trainer.py`), losses, on-device augmentation, seeding, DDP helpers, checkpoints, pre-flight
checks, run records and monitoring. It imports only `stcn.model` (and `shards`)."""
