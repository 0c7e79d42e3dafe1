"""Preprocessing: source readers, triplet sampling, augmentation and the job driver that
turns raw training sets into shard sets (written through `shards`)."""
