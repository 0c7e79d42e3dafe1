"""`tools/make_shards plan`: every streamed clip distinct by default, phases sharing a set
sized for the trainer's split, GPU headroom, opt-in repeats."""
import re
import subprocess
from pathlib import Path

import pytest

from conftest import tool_command
from pipelines.plan import SOURCE_ITEMS, format_plan, per_set, plan_stage
from stcn.train.clip_ranges import NotEnoughClipsError, check_phase_clips
from stcn.train.stages import load_stage

REPO = Path(__file__).resolve().parents[1]


def _sets_and_totals(stage, needs, root="r"):
    sets = [stage.shard_sets(i, root) for i in range(len(stage.phases))]
    return sets, {f"{root}/{name}": clips for name, clips in per_set(needs, stage).items()}


@pytest.mark.parametrize("stage_index,gpus", [(2, 2), (3, 2), (1, 3), (0, 1)])
def test_published_stages_stream_every_clip_once(stage_index, gpus):
    stage = load_stage(stage_index)
    needs = plan_stage(stage, gpus)
    weighted = {s: w * SOURCE_ITEMS[s] for s, w in stage.sources.items()}
    for phase in range(len(stage.phases)):
        mine = [n for n in needs if n.phase == phase]
        iterations = stage.phase_end_iteration(phase) - stage.phase_start_iteration(phase)
        streamed = iterations * stage.batch_size * gpus
        assert streamed <= sum(n.clips for n in mine) <= streamed + len(mine)
        for n in mine:
            assert n.clips == n.make, "by default no clip is streamed twice"
            # DAVIS x5: five times as many distinct DAVIS clips per video as YouTubeVOS ones
            share = weighted[n.source] / sum(weighted.values())
            assert abs(n.clips - streamed * share) <= 1
    # the trainer, given sets of these sizes, streams every clip once at this GPU count
    sets, totals = _sets_and_totals(stage, needs)
    checks = check_phase_clips(stage, sets, totals, world_size=gpus)
    assert checks and all(p.fits for p in checks)


def test_phases_sharing_max_skip_5_get_the_sum_and_disjoint_ranges():
    stage = load_stage(3)
    needs = plan_stage(stage, 2)
    totals = per_set(needs, stage)
    davis5 = [n.make for n in needs if n.name == "davis/skip5"]
    assert len(davis5) == 2 and totals["davis/skip5"] >= sum(davis5)
    assert stage.set_range([0, 5], 0, totals["davis/skip5"])[1] == \
        stage.set_range([0, 5], 5, totals["davis/skip5"])[0]
    # odd phase lengths: rounded up until the split gives each phase its clips
    odd = load_stage(3, {"iterations": 1001, "batch_size": 3})
    needs = plan_stage(odd, 1)
    sets, totals = _sets_and_totals(odd, needs)
    checks = check_phase_clips(odd, sets, totals, world_size=1)
    assert checks and all(p.fits for p in checks)


def test_more_gpus_than_planned_is_refused_and_fewer_fit():
    stage = load_stage(2, {"iterations": 3000})
    sets, totals = _sets_and_totals(stage, plan_stage(stage, 2))
    checks = check_phase_clips(stage, sets, totals, world_size=1)
    assert checks and all(p.fits for p in checks)
    with pytest.raises(NotEnoughClipsError, match="--gpus G"):
        check_phase_clips(stage, sets, totals, world_size=3)
    # an elastic resume at 2/3 of the run onto 3 GPUs: only the phases left are counted
    # (phase 4 and 5), and with 3-GPU headroom in the plan they fit
    sets, totals = _sets_and_totals(stage, plan_stage(stage, 3))
    left = check_phase_clips(stage, sets, totals, world_size=3, from_iteration=2000)
    assert [p.phase for p in left] == [4, 5] and all(p.fits for p in left)


def test_clips_fraction_repeats_and_says_how_often():
    stage = load_stage(3)  # long enough that every video still gets a clip at 1/4
    needs = plan_stage(stage, 2, clips_fraction=0.25)
    for n in needs:
        assert n.make < n.clips and n.times_streamed == pytest.approx(4, rel=0.01)
    text = format_plan(stage, 2, needs, "r")
    assert "each clip streamed 4.00 times" in text and "--allow-repeats" in text
    sets, totals = _sets_and_totals(stage, needs)
    with pytest.raises(NotEnoughClipsError):
        check_phase_clips(stage, sets, totals, world_size=2)
    allowed = check_phase_clips(stage, sets, totals, world_size=2, allow_repeats=True)
    assert allowed[0].times_streamed() == pytest.approx(4, rel=0.01)


def test_plan_cli_prints_streams_and_make_per_phase_and_set():
    out = subprocess.run(tool_command("make_shards", "plan", "--stage", "2", "--gpus", "2",
                                      "--shards", "S"), capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"phase (\d) .* S/(\S+): streams ([\d,]+) clips, make ([\d,]+)", out.stdout)
    assert len(rows) == 12  # 6 phases x (DAVIS, YouTubeVOS)
    for _, _, streams, make in rows:
        assert int(streams.replace(",", "")) <= int(make.replace(",", ""))
    assert "streamed" not in out.stdout
    commands = re.findall(r"--out S/(\S+) .*--clips (\d+)", out.stdout)
    assert len(commands) == 10  # skip 5 is one set per source
