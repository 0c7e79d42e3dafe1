"""Making a job's clips: what a worker process runs. A clip is its kind's `make_clip` of one
item and round (pure: pipelines.clips), read from the listed source or from the frames of
one streamed video."""
from __future__ import annotations

import shards

from pipelines.clips import DecodedFrames, clip_order
from pipelines.job.units import Plan
from pipelines.sources import MemoryFrames


def make_clip(plan: Plan, item, round_: int, store=None, cache: DecodedFrames | None = None
              ) -> dict:
    """Clip `round_` of `item`: an index into the listed source's items, or, with `store`
    (a FrameStore holding a streamed video), that `Video`. `cache`: decoded frames shared
    with other clips of the same item (pipelines.clips.DecodedFrames)."""
    kind = plan.kind
    if store is None:
        store, item = plan.source, kind.items(plan.source)[item]
    return kind.make_clip(kind, store, item, round_, plan.job, cache)


def listed_encoded(plan: Plan, start: int, stop: int, progress=None) -> list[dict[str, bytes]]:
    """Clips start..stop-1 of a listed source's set, encoded, in set order, as a worker
    makes them (the benchmark times this too). They are made item by item, so that the
    clips of one video share its decoded frames (`DecodedFrames`); each is encoded as soon
    as it is made, so a unit holds its clips' bytes, not their arrays."""
    order = clip_order(plan.job.seed, plan.job.kind, len(plan.items), start, stop)
    by_item: dict[int, list[int]] = {}
    for position, (item, _) in enumerate(order):
        by_item.setdefault(item, []).append(position)
    encoded: list = [None] * len(order)
    for item, positions in by_item.items():
        cache = DecodedFrames()
        for position in positions:
            encoded[position] = shards.encode_sample(
                make_clip(plan, item, order[position][1], cache=cache))
            if progress is not None:
                progress(1)
    return encoded


def video_clips(plan: Plan, video, frames: dict, rounds, progress=None) -> list[dict[str, bytes]]:
    """Clips `rounds` of one streamed video (frames {name: (jpg, png)}), encoded here, in the
    worker, so that the task process only cuts bytes into shards; they share the video's
    decoded frames."""
    store = MemoryFrames({video.name: frames})
    cache = DecodedFrames()
    encoded = []
    for round_ in rounds:
        encoded.append(shards.encode_sample(make_clip(plan, video, round_, store, cache)))
        if progress is not None:
            progress(1)
    return encoded
