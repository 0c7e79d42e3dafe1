"""Making a job's clips: what a worker process runs. A clip is its kind's `make_clip` of one
item and round (pure: pipelines.clips), read from the listed source or from the frames of
one streamed video."""
from __future__ import annotations

import shards

from pipelines.clips import clip_order
from pipelines.job.units import Plan
from pipelines.sources import MemoryFrames


def make_clip(plan: Plan, item, round_: int, store=None) -> dict:
    """Clip `round_` of `item`: an index into the listed source's items, or, with `store`
    (a FrameStore holding a streamed video), that `Video`."""
    kind = plan.kind
    if store is None:
        store, item = plan.source, kind.items(plan.source)[item]
    return kind.make_clip(kind, store, item, round_, plan.job)


def listed_samples(plan: Plan, start: int, stop: int):
    """Clips start..stop-1 of a listed source's set, in set order, as a worker makes them
    (the benchmark times this too)."""
    for item, round_ in clip_order(plan.job.seed, plan.job.kind, len(plan.items), start, stop):
        yield make_clip(plan, item, round_)


def video_clips(plan: Plan, video, frames: dict, rounds, progress=None) -> list[dict[str, bytes]]:
    """Clips `rounds` of one streamed video (frames {name: (jpg, png)}), encoded here, in the
    worker, so that the task process only cuts bytes into shards."""
    store = MemoryFrames({video.name: frames})
    encoded = []
    for round_ in rounds:
        encoded.append(shards.encode_sample(make_clip(plan, video, round_, store)))
        if progress is not None:
            progress(1)
    return encoded
