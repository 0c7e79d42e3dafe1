"""The demo's visual report: one static HTML page with its images (no server, no scripts
fetched from anywhere), written from what the demo's steps left in its output folder.

    from stcn.evaluation.report import collect, write_report, summary_lines
    demo = collect("demo_out")
    write_report(demo, "demo_out/report")     # demo_out/report/index.html + PNG/SVG files
    print("\\n".join(summary_lines(demo)))

The folder layout is the demo's (jobs/local/demo.sh): data/<kind> (the synthetic sets;
data/heldout the scored videos), shards/ (shard sets), runs/s0 and runs/s03 (stage 0 and
stage 3 run directories), eval/{untrained,trained,copy_first_frame} (tools/eval outputs) and
steps.tsv (one line per step: name, wall seconds, CPU seconds of the step's processes, reused or run).

The verdict is computed from the saved scores, never assumed: the trained network "learned"
only when it beats both the untrained network and the copy-first-frame baseline on the
standard J&F and on the J&F without empty-vs-empty object-frames.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from shards.contact_sheet import overlay, write_contact_sheet

# The three evaluations the demo compares: folder under eval/ -> label.
EVALUATIONS = {"trained": "trained (stage 0 -> 3)",
               "untrained": "untrained (random weights)",
               "copy_first_frame": "copy the first-frame mask"}
RUNS = {"stage 0": "s0", "stage 3": "s03"}
CURVES = {"loss": ("train/loss",), "IoU of the target object": ("train/iou_frame1", "train/iou_frame2")}
CONTACT_SETS = ("static", "davis/skip5")
STRIP_FRAMES = 6       # frames shown per held-out video
STRIP_HEIGHT = 144     # pixels per frame in the strips (small synthetic frames are enlarged)
LABEL_WIDTH = 190
COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")


@dataclass
class DemoResults:
    root: Path
    steps: list[dict] = field(default_factory=list)
    scores: dict[str, dict] = field(default_factory=dict)      # evaluation -> results.json
    # run -> tag -> points
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)   # run -> summary.json

    @property
    def heldout(self) -> Path:
        """The DAVIS-layout set whose 2017 val videos every evaluation scored."""
        return self.root / "data" / "heldout" / "2017" / "trainval"


def add_step(demo: DemoResults, name: str, wall: float, cpu: float, how: str = "run") -> None:
    """Record a finished step in demo.steps and in ROOT/steps.tsv (the demo's own format)."""
    demo.steps.append({"name": name, "wall": wall, "cpu": cpu, "how": how})
    with open(demo.root / "steps.tsv", "a") as steps:
        steps.write(f"{name}\t{wall:.0f}\t{cpu:.1f}\t{how}\n")


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, wall, cpu, how = (line.split("\t") + ["", "", "", ""])[:4]
            steps.append({"name": name, "wall": float(wall or 0), "cpu": float(cpu or 0), "how": how})
    return steps


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run: tag -> [(iteration, value)]."""
    events = run_dir / "tensorboard"
    if not events.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    return {tag: [(e.step, float(e.value)) for e in accumulator.Scalars(tag)]
            for tag in sorted(tags) if any(tag in names for names in CURVES.values())}


def collect(root) -> DemoResults:
    root = Path(root)
    demo = DemoResults(root, steps=read_steps(root / "steps.tsv"))
    for name in EVALUATIONS:
        path = root / "eval" / name / "results.json"
        if path.is_file():
            demo.scores[name] = json.loads(path.read_text())
    for label, folder in RUNS.items():
        demo.curves[label] = read_curves(root / "runs" / folder)
        summary = root / "runs" / folder / "summary.json"
        if summary.is_file():
            demo.summaries[label] = json.loads(summary.read_text())
    return demo


# ----------------------------------------------------------------------------- verdict
def jf(demo: DemoResults, name: str, variant: str = "standard") -> float | None:
    scores = demo.scores.get(name, {}).get("scores", {})
    value = scores.get("J&F") if variant == "standard" else scores.get("without_empty", {}).get("J&F")
    return None if value is None else float(value)


def verdict(demo: DemoResults) -> tuple[bool, list[str]]:
    """(learned, one sentence per comparison): trained against untrained and copy, both J&Fs."""
    lines, learned = [], True
    for variant, wording in (("standard", "standard J&F"),
                             ("without_empty", "J&F without empty-vs-empty frames")):
        trained = jf(demo, "trained", variant)
        for other in ("untrained", "copy_first_frame"):
            value = jf(demo, other, variant)
            if trained is None or value is None:
                learned = False
                lines.append(f"{wording}: no score for {'trained' if trained is None else other}")
                continue
            beats = trained > value
            learned &= beats
            lines.append(f"{wording}: trained {trained:.1f} {'beats' if beats else 'does NOT beat'} "
                         f"{EVALUATIONS[other].split(' (')[0]} {value:.1f} ({trained - value:+.1f})")
    return learned, lines


def data_warnings(demo: DemoResults) -> list[str]:
    """Stages that streamed mostly clips without a target object (the trainer warns too)."""
    from stcn.train.trainer import EMPTY_CLIP_WARN_SHARE

    warnings = []
    for label, summary in demo.summaries.items():
        share = summary.get("clips_without_target_share")
        if share is not None and share > EMPTY_CLIP_WARN_SHARE:
            warnings.append(f"{label}: {share:.0%} of the {summary.get('clips_seen')} clips it streamed "
                            "had no target object (all-background masks)")
    return warnings


def _mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def summary_lines(demo: DemoResults, report: Path | None = None) -> list[str]:
    """The console summary the demo ends with."""
    wall = sum(s["wall"] for s in demo.steps)
    cpu = sum(s["cpu"] for s in demo.steps)
    lines = ["=" * 72, f"STCN demo finished in {_mmss(wall)} ({cpu:.0f} CPU seconds)", "  steps:"]
    lines += [f"    {s['name']:<30} {_mmss(s['wall']):>6}  {s['cpu']:7.1f} CPU s  {s['how']}"
              for s in demo.steps]
    lines.append("  held-out synthetic DAVIS 2017 val, J&F (%)   standard   without empty-vs-empty")
    for name, label in EVALUATIONS.items():
        standard, without = jf(demo, name), jf(demo, name, "without_empty")
        lines.append(f"    {label:<28} {_fmt(standard):>14} {_fmt(without):>14}")
    learned, comparisons = verdict(demo)
    lines.append("  verdict: " + ("the trained network beats the untrained network and the copy baseline on "
                                  "both J&F variants" if learned else
                                  "the figures do NOT show that the network learned more than "
                                  "the baselines:"))
    lines += [f"    {line}" for line in comparisons]
    lines += [f"  WARNING {w}" for w in data_warnings(demo)]
    trained = demo.scores.get("trained", {})
    if trained:
        lines.append(f"  inference speed (trained):    {trained.get('fps', 0):.1f} FPS amortised, "
                     "file IO excluded")
    lines.append(f"  TensorBoard:                  {tensorboard_command(demo)}")
    if report is not None:
        lines.append(f"  report:                       {report}")
    lines.append("=" * 72)
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def tensorboard_command(demo: DemoResults) -> str:
    return f"tensorboard --logdir {demo.root / 'runs'}"


# ----------------------------------------------------------------------------- images
def svg_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
             dividers: dict[float, str] | None = None, width: int = 560, height: int = 300) -> str:
    """A line plot as a standalone SVG document (no plotting library needed)."""
    left, right, top, bottom = 56, 16, 28, 44
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    y1 += 0.05 * (y1 - y0)

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for k in range(5):  # y grid and ticks
        y = y0 + k * (y1 - y0) / 4
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for k in range(5):  # x ticks
        x = x0 + k * (x1 - x0) / 4
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
               f'{html.escape(xlabel)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               'fill="none" stroke="#888"/>')
    for x, label in (dividers or {}).items():
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" '
                   'stroke="#999" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{sx(x) + 3:.1f}" y="{top + 12}">{html.escape(label)}</text>')
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        if finite:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<rect x="{left + 8}" y="{top + 8 + 14 * k}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text x="{left + 22}" y="{top + 12 + 14 * k}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def curve_plots(demo: DemoResults) -> dict[str, str]:
    """file name -> SVG: one plot per quantity, stage 0 then stage 3 on one iteration axis."""
    plots = {}
    for n, (quantity, tags) in enumerate(CURVES.items()):
        series: dict[str, list[tuple[float, float]]] = {}
        dividers, offset = {}, 0
        for label, curves in demo.curves.items():
            steps = [s for tag in tags for s, _ in curves.get(tag, [])]
            if not steps:
                continue
            if offset:
                dividers[offset] = label
            for tag in tags:
                name = label if len(tags) == 1 else f"{label} {tag.rsplit('_', 1)[-1]}"
                series[name] = [(offset + s, v) for s, v in curves.get(tag, [])]
            offset += max(steps)
        if series:
            plots[f"curve{n}.svg"] = svg_plot(series, f"training {quantity}",
                                              "iteration (stage 0, then stage 3)", dividers)
    return plots


def _read_ids(path: Path, size: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        return np.zeros(size, np.uint8)
    with Image.open(path) as image:
        ids = np.array(image.convert("P") if image.mode not in ("P", "L") else image)
    return ids if ids.shape == size else cv2.resize(ids, size[::-1], interpolation=cv2.INTER_NEAREST)


def _label(text: list[str], height: int) -> np.ndarray:
    block = np.full((height, LABEL_WIDTH, 3), 255, np.uint8)
    for k, line in enumerate(text):
        cv2.putText(block, line, (6, 22 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return block


def video_strip(demo: DemoResults, video: str, frames: int = STRIP_FRAMES) -> np.ndarray:
    """RGB image, one row per mask source (ground truth, trained, untrained, copy) over the
    same evenly spaced frames of `video`, each object filled and outlined in its colour."""
    images = sorted((demo.heldout / "JPEGImages" / "480p" / video).glob("*.jpg"))
    chosen = [images[i] for i in sorted(set(np.linspace(0, len(images) - 1, frames).round().astype(int)))]
    rows = [("ground truth", demo.heldout / "Annotations" / "480p" / video, None)]
    rows += [(EVALUATIONS[name], demo.root / "eval" / name / video, name) for name in EVALUATIONS]
    out = []
    for title, folder, name in rows:
        tiles = []
        for jpg in chosen:
            rgb = cv2.cvtColor(cv2.imread(str(jpg)), cv2.COLOR_BGR2RGB)
            scale = STRIP_HEIGHT / rgb.shape[0]
            size = (round(rgb.shape[1] * scale), STRIP_HEIGHT)
            ids = _read_ids(folder / f"{jpg.stem}.png", rgb.shape[:2])
            tile = overlay(cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR),
                           cv2.resize(ids, size, interpolation=cv2.INTER_NEAREST))
            cv2.putText(tile, jpg.stem, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                        cv2.LINE_AA)
            tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        text = [title.split(" (")[0]] + ([f"({title.split(' (')[1]}"] if " (" in title else [])
        if name is not None:
            scores = demo.scores.get(name, {}).get("scores", {}).get("per_video", {}).get(video)
            if scores:
                text.append(f"J&F {scores['J&F']:.1f} / {scores['without_empty']['J&F']:.1f}")
        out.append(np.concatenate([_label(text, tiles[0].shape[0])] + tiles, axis=1))
    return np.concatenate(out, axis=0)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"PNG encoding failed for {path}")
    path.write_bytes(data.tobytes())


# ----------------------------------------------------------------------------- page
# Runs when the page loads: counts images that decoded and J&F table rows, and writes the
# result into the page (a headless browser's --dump-dom shows it; tests/test_demo.py).
SELF_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.getAttribute("src"); });
  var rows = document.querySelectorAll("#jf-table tbody tr").length;
  var check = document.getElementById("self-check");
  check.textContent = "self-check: images=" + images.length + " decoded=" + (images.length - broken.length) +
    " broken=[" + broken.join(",") + "] jf_rows=" + rows;
  check.setAttribute("data-ok", broken.length === 0 && rows > 0 ? "yes" : "no");
});
</script>"""

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}.good{color:#1a7f37}.bad{color:#b3261e}
img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3;padding:2px 4px}
.warn{background:#fff3cd;padding:6px 10px;border:1px solid #e0c36b}#self-check{color:#888;font-size:11px}"""


def write_report(demo: DemoResults, out, images: bool = True) -> Path:
    """Write OUT/index.html and its images (images=False: only the page, over images
    written before); returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    learned, comparisons = verdict(demo)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>STCN demo report</title>"
             f"<style>{STYLE}</style></head><body>", "<h1>STCN demo report</h1>",
             f"<p>Output folder: <code>{esc(str(demo.root))}</code></p>",
             "<h2>Verdict</h2>",
             f"<p class='{'good' if learned else 'bad'}'><b>"
             + ("The trained network beats the untrained network and the copy-first-frame baseline on both "
                "J&amp;F variants." if learned else
                "These figures do NOT show that the network learned more than the baselines.")
             + "</b></p><ul>" + "".join(f"<li>{esc(line)}</li>" for line in comparisons) + "</ul>"]
    for warning in data_warnings(demo):
        parts.append(f"<p class='warn'>Data warning: {esc(warning)}</p>")

    parts.append("<h2>Held-out J&amp;F (synthetic DAVIS 2017 val)</h2>")
    parts.append("<table id='jf-table'><thead><tr><th>masks from</th><th>J&amp;F</th><th>J</th><th>F</th>"
                 "<th>J&amp;F without empty-vs-empty</th><th>object-frames left out</th><th>FPS</th>"
                 "</tr></thead><tbody>")
    for name, label in EVALUATIONS.items():
        scores = demo.scores.get(name, {}).get("scores")
        if not scores:
            continue
        left = scores.get("left_out", {})
        fps = demo.scores[name].get("fps")
        parts.append(f"<tr><td>{esc(label)}</td><td>{_fmt(scores.get('J&F'))}</td>"
                     f"<td>{_fmt(scores.get('J'))}</td>"
                     f"<td>{_fmt(scores.get('F'))}</td>"
                     f"<td>{_fmt(scores.get('without_empty', {}).get('J&F'))}</td>"
                     f"<td>{left.get('object_frames', '-')} of {left.get('of', '-')}</td>"
                     f"<td>{'-' if not fps else f'{fps:.1f}'}</td></tr>")
    parts.append("</tbody></table><p>The standard J&amp;F counts an object-frame where both the ground truth "
                 "and the prediction are empty as perfect; the second variant leaves those out, so an "
                 "all-background guess does not score.</p>")

    parts.append("<h2>Held-out videos</h2><p>Rows: ground truth, trained, untrained, copy baseline "
                 "(per-video J&amp;F standard / without empty-vs-empty). Each object: translucent fill "
                 "and outline in its colour.</p>")
    videos = sorted(demo.scores.get("trained", demo.scores.get("copy_first_frame", {})).get("scores", {})
                    .get("per_video", {}))
    for k, video in enumerate(videos):
        name = f"video{k}.png"
        if images:
            _write_png(out / name, video_strip(demo, video))
        parts.append(f"<h3>{esc(video)}</h3><img src='{name}' alt='{esc(video)}'>")

    parts.append("<h2>Training curves</h2>")
    for name, svg in curve_plots(demo).items():
        if images:
            (out / name).write_text(svg)
        parts.append(f"<img src='{name}' alt='{name}'> ")
    for label, summary in demo.summaries.items():
        parts.append(f"<p>{esc(label)}: {summary.get('iterations_done')} iterations, status "
                     f"{esc(str(summary.get('status')))}, final loss {_fmt(summary.get('final_loss'))}, "
                     f"{summary.get('clips_per_s', 0):.1f} clips/s, "
                     f"{summary.get('wall_seconds', 0):.0f} s</p>")

    parts.append("<h2>Shard clips</h2><p>The first clips of the shard sets as the trainer reads them "
                 "(tools/inspect_shards draws the same sheets).</p>")
    for shard_set in CONTACT_SETS:
        url = demo.root / "shards" / shard_set
        if (url / "manifest.json").is_file():
            name = f"clips_{shard_set.replace('/', '_')}.png"
            if images:
                write_contact_sheet(str(url), str(out / name), count=3, thumb=160)
            parts.append(f"<h3>{esc(shard_set)}</h3><img src='{name}' alt='{esc(shard_set)}'>")

    parts.append("<h2>Steps</h2><table><thead><tr><th>step</th><th>wall time</th><th>CPU seconds</th>"
                 "<th></th></tr></thead><tbody>")
    for s in demo.steps:
        parts.append(f"<tr><td>{esc(s['name'])}</td><td>{_mmss(s['wall'])}</td><td>{s['cpu']:.1f}</td>"
                     f"<td>{esc(s['how'])}</td></tr>")
    total_wall, total_cpu = sum(s["wall"] for s in demo.steps), sum(s["cpu"] for s in demo.steps)
    parts.append(f"<tr><td><b>total</b></td><td><b>{_mmss(total_wall)}</b></td><td><b>{total_cpu:.1f}</b></td>"
                 "<td></td></tr></tbody></table>")
    parts.append(f"<h2>TensorBoard</h2><p><code>{esc(tensorboard_command(demo))}</code> (scalars, and "
                 "training frames with ground truth and prediction)</p>")
    parts.append(f"<p id='self-check' data-ok='pending'>self-check: pending</p>{SELF_CHECK}</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


__all__ = ["DemoResults", "collect", "add_step", "write_report", "summary_lines", "verdict", "svg_plot",
           "video_strip"]
