"""The run report: PNG plots from ``metrics.jsonl`` and a one-page HTML summary.

Plots (each only when the run logged something for it): rewards (progress, format, tool-call,
the trained-on reward, validation progress), the curriculum (stage and zero-variance share),
throughput, staleness and learner health (losses, KLs, entropy, gradient norm, clip fractions).
Series of different scales go on separate panels of one figure (small multiples), so a token count
never flattens a loss. Stage promotions are vertical lines on every panel. Metric names are matched
by pattern, not a fixed list, so a metric a component adds later shows up without touching this file.

The learner actor rewrites the report after every validation and checkpoint, so it is a live view
of a running run; every file is replaced atomically (written beside, then renamed), so a reader never
sees half a page or half a PNG.

Left out: computing metrics (the run does), any interactivity. matplotlib is used through its
object API on the Agg canvas (no pyplot state), so a report can be drawn from a worker thread and
never needs a display.
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
from envtune.runtime.recipe.run_folder import RunFolder, atomic_write_text

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PlotSpec:
    """One figure: which metric keys go on it, and on which panel."""

    file_name: str
    """PNG file name inside ``report/``."""
    title: str
    """Figure title."""
    select: Callable[[str], bool]
    """Predicate on a metric key."""
    ylabel: str = ""
    """Y-axis label."""
    panel: Callable[[str], str] | None = None
    """Panel title of a selected key (keys of one panel share a y-axis); None: one panel."""
    panel_order: tuple[str, ...] = ()
    """Panels listed here come first, in this order; the rest follow as first seen."""

    def panels(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """The selected ``keys`` by panel."""
        out: dict[str, list[str]] = {}
        for key in keys:
            if self.select(key):
                out.setdefault(self.panel(key) if self.panel else self.title, []).append(key)
        rank = {title: i for i, title in enumerate(self.panel_order)}
        return dict(sorted(out.items(), key=lambda item: rank.get(item[0], len(rank))))


def _learner_panel(key: str) -> str | None:
    """Which learner-health panel a key belongs on (None: not a health metric)."""
    name = key.rsplit("/", 1)[-1]
    if name == "loss" or name.endswith("_loss"):  # not num_loss_tokens: a count, not a loss
        return "loss"
    if name == "kl" or name.startswith("kl_") or name.endswith("_kl"):
        return "KL"
    if name == "entropy":
        return "entropy"
    if name == "grad_norm":
        return "gradient norm"
    if name.endswith("clip_fraction"):
        return "clip fraction"
    return None


def _rate_panel(key: str) -> str:
    return "tokens / s" if "token" in key else "episodes / s" if "episode" in key else "per second"


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
        panel=lambda k: "stage" if k == "curriculum/stage" else "zero-variance share",
    ),
    PlotSpec(
        "throughput.png",
        "Throughput",
        lambda k: "throughput" in k or "per_s" in k or k.endswith("_per_second"),
        "per second",
        panel=_rate_panel,
    ),
    PlotSpec("staleness.png", "Staleness (policy versions behind)", lambda k: "staleness" in k, "versions"),
    PlotSpec(
        "learner.png",
        "Learner",
        lambda k: k.startswith(("learner/", "optim/")) and _learner_panel(k) is not None,
        panel=lambda k: _learner_panel(k) or "",
        panel_order=("loss", "KL", "entropy", "gradient norm", "clip fraction"),
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
) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = spec.panels(_numeric_keys(steps))
    if not panels:
        return None
    columns = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(8 if columns == 1 else 10, 4 if rows == 1 else 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (title, keys) in zip(axes, panels.items(), strict=False):
        for key in keys:
            xs, ys = _series(steps, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        for promotion in promotions:
            ax.axvline(promotion["step"], color="grey", linestyle="--", linewidth=1)
        if len(panels) > 1:
            ax.set_title(title, fontsize=9)
        elif spec.ylabel:
            ax.set_ylabel(spec.ylabel)
        ax.set_xlabel("learner step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")  # "best" searches the data for a free spot
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    first = axes[0]
    for promotion in promotions:  # once, on the first panel: the labels would crowd small ones
        first.annotate(
            f"→ {promotion.get('to_name') or 'end'}",
            (promotion["step"], 0.98),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
            color="grey",
        )
    fig.suptitle(spec.title)
    # Fixed margins, not tight_layout(): that measures every text artist with extra draws and was
    # half the report's CPU time, spent again at every validation and checkpoint of a live run.
    one_row = rows == 1
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=0.1 if one_row else 0.07, top=0.9 if one_row else 0.93, hspace=0.45
    )
    path = out / spec.file_name
    tmp = out / f".{spec.file_name}.tmp"
    fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 1})  # fast zlib: the page is local
    tmp.replace(path)
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
    images = [png for spec in PLOTS if (png := _plot(spec, steps, promotions, out)) is not None]
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
    atomic_write_text(index, "\n".join(parts))
    log.debug("report_written", path=str(index), plots=[p.name for p in images])  # often, while live
    return index
