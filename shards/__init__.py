"""Tar shard format for pre-augmented 3-frame clips: writing, manifests, reading and
streaming to DDP ranks. Depends on nothing else in this project."""
