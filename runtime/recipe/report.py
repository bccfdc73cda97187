"""The run report: PNG plots from ``metrics.jsonl`` and a one-page HTML summary.

Plots (each only when the run logged something for it): rewards (progress, format, tool-call,
the trained-on reward, validation progress), the curriculum (stage and zero-variance share),
throughput, staleness and learner health (loss, KL, entropy, gradient norm). Stage promotions are
vertical lines on every plot. Metric names are matched by pattern, not a fixed list, so a metric a
component adds later shows up without touching this file.

Left out: computing metrics (the run does), any interactivity. matplotlib runs on the Agg backend,
chosen explicitly so a report never needs a display.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from envtune.runtime.recipe.report_summary import headline, stage_reward_figure, warnings
from envtune.runtime.recipe.run_folder import RunFolder

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PlotSpec:
    """One figure: which metric keys go on it."""

    file_name: str
    """PNG file name inside ``report/``."""
    title: str
    """Figure title."""
    select: Callable[[str], bool]
    """Predicate on a metric key."""
    ylabel: str = ""
    """Y-axis label."""


def _reward_key(key: str) -> bool:
    return key in {
        "train/reward",
        "train/progress",
        "train/format_reward",
        "train/tool_reward",
        "validation/progress",
        "validation/accuracy",
        "validation/format_reward",
    }


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("rewards.png", "Rewards: progress, format, tool-call", _reward_key, "reward"),
    PlotSpec(
        "curriculum.png",
        "Curriculum: stage and zero-variance groups",
        lambda k: k in {"curriculum/stage", "train/zero_variance_share"},
    ),
    PlotSpec(
        "throughput.png",
        "Throughput",
        lambda k: "throughput" in k or "per_s" in k or k.endswith("_per_second"),
        "per second",
    ),
    PlotSpec("staleness.png", "Staleness (policy versions behind)", lambda k: "staleness" in k, "versions"),
    PlotSpec(
        "learner.png",
        "Learner",
        lambda k: (
            k.startswith(("learner/", "optim/"))
            and not k.rsplit("/", 1)[-1].startswith("num_")  # num_loss_tokens is a count, not a loss
            and any(w in k for w in ("loss", "kl", "entropy", "grad_norm", "clip"))
        ),
    ),
)
"""The report's figures, in page order."""


def split_records(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, deduplicated by step keeping the last; event records)."""
    steps: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for record in records:
        if "event" in record:
            events.append(dict(record))
        elif "step" in record:
            steps[int(record["step"])] = dict(record)
    return [steps[s] for s in sorted(steps)], events


def _series(steps: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in steps:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(record["step"]))
            ys.append(float(value))
    return xs, ys


def _numeric_keys(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: set[str] = set()
    for record in steps:
        keys.update(k for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool))
    keys.discard("step")
    return sorted(keys)


def _plot(
    spec: PlotSpec, steps: Sequence[Mapping[str, Any]], promotions: Sequence[Mapping[str, Any]], out: Path
):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    keys = [k for k in _numeric_keys(steps) if spec.select(k)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    try:
        for key in keys:
            xs, ys = _series(steps, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        for promotion in promotions:
            label = f"→ {promotion.get('to_name') or 'end'}"
            ax.axvline(promotion["step"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                label,
                (promotion["step"], 1),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="right",
                color="grey",
            )
        ax.set_title(spec.title)
        ax.set_xlabel("learner step")
        if spec.ylabel:
            ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / spec.file_name
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_rows(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    if not steps:
        return []
    last: dict[str, Any] = {}
    for record in steps:  # latest value of every key, even if the last step did not log it
        last.update({k: v for k, v in record.items() if k != "step"})
    return [(k, _fmt(last[k])) for k in sorted(last)]


def write_report(folder: RunFolder, title: str = "") -> Path:
    """Write ``report/*.png`` and ``report/index.html`` for ``folder``; returns the HTML path."""
    out = folder.report_dir
    out.mkdir(parents=True, exist_ok=True)
    steps, events = split_records(folder.read_metrics())
    promotions = [e for e in events if e.get("event") == "promotion"]
    images = [p for spec in PLOTS if (p := _plot(spec, steps, promotions, out)) is not None]
    stage_plot = stage_reward_figure(steps, promotions, out)
    images = [stage_plot, *images] if stage_plot is not None else images
    config_text = folder.config_path.read_text(encoding="utf-8") if folder.config_path.exists() else ""
    other_events = [e for e in events if e.get("event") not in ("promotion", "runtime")]
    name = title or folder.path.name
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:540px}.grid{display:flex;flex-wrap:wrap;gap:8px}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f"<p>Run folder <code>{html.escape(str(folder.path))}</code>; report written "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC; "
        f"{len(steps)} learner steps logged.</p>",
        f"<p><b>{html.escape(headline(steps).text())}</b></p>",
        *(f"<p style='color:#a00'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings(steps, events)),
        "<h2>Stage promotions</h2>",
    ]
    if promotions:
        parts.append(
            "<table><tr><th>step</th><th>from</th><th>to</th><th>reason</th><th>metric</th>"
            "<th>window mean</th><th>steps in stage</th><th>why</th></tr>"
        )
        for p in promotions:
            parts.append(
                "<tr>"
                + "".join(
                    f"<td>{_fmt(v)}</td>"
                    for v in (
                        p.get("step"),
                        p.get("from_name"),
                        p.get("to_name") or "(end)",
                        p.get("reason"),
                        p.get("metric") or "-",
                        p.get("value") if p.get("value") is not None else "-",
                        p.get("steps_in_stage"),
                        p.get("detail") or "-",
                    )
                )
                + "</tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Plots</h2><div class='grid'>")
    parts.extend(
        f"<a href='{html.escape(p.name)}'><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></a>"
        for p in images
    )
    parts.append("</div><h2>Final metrics</h2><table>")
    parts.extend(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in _summary_rows(steps))
    parts.append("</table>")
    if other_events:
        parts.append("<h2>Events</h2><pre>")
        parts.extend(html.escape(json.dumps(e)) + "\n" for e in other_events[-50:])
        parts.append("</pre>")
    parts.append(
        f"<h2>Config</h2><details><summary>config.toml</summary><pre>{html.escape(config_text)}</pre>"
        "</details></body></html>\n"
    )
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    log.info("report_written", path=str(index), plots=[p.name for p in images])
    return index
