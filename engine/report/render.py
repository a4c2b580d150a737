"""Human report of a run: `report.md` and PNG plots rendered from the report dict (`blockprune_report.json`).

Per block, from the dict's `blocks` entries (see `engine.pipeline._process_block`):

    achieved sparsity  = Σ_l sparsity_l · n_l / Σ_l n_l            over the block's pruned linears l, n_l = numel
    planned sparsity   = block["planned_sparsity"] when present, else the same weighted mean of the linears'
                         `planned` (the target of the stages that pruned them); "-" when neither is recorded
    mean linear error  = mean_l error_l                             (relative layer error; only linears that have one)
    output error       = block["output_error"]                      (relative block output error)

Number rule of `report.md` (the test reads it back): integers in full; every other number is
`format(x, ".6g")` of the value in the dict (or of the per-block formula above); "-" where absent.
Plots (matplotlib, Agg canvas, default style, PNG without the Software/time metadata):
`plots/sparsity.png` (planned vs achieved per block), `plots/error.png` (output and mean linear error per block),
`plots/time_memory.png` (stacked load/stats/solve/forward/write seconds per block; peak and current RSS per block,
and the device's peak memory per block when the run recorded it); with a global allocation (the report's
`allocation` section, docs/allocation.md) also `plots/allocation.png`: per layer the rule's plan, the plan on the
exact budget, the plan when the layer was visited (after re-balancing) and what it achieved, and a `## Allocation`
table in report.md. A block without pruned linears but with an `allocation` record (structured stages) shows that
record's planned and achieved fractions of its parameters in the per-block table and `sparsity.png`.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sharding.writer import atomic_write

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
SPARSITY_PNG = "plots/sparsity.png"
ERROR_PNG = "plots/error.png"
TIME_MEMORY_PNG = "plots/time_memory.png"
ALLOCATION_PNG = "plots/allocation.png"
TIME_PHASES = ("load", "stats", "solve", "forward", "write")

# (column header, key of the per-block row) of the per-block table, in order
BLOCK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("block", "block"),
    ("planned sparsity", "planned"),
    ("achieved sparsity", "achieved"),
    ("params", "params"),
    ("nonzero", "nonzero"),
    ("output error", "output_error"),
    ("mean linear error", "mean_linear_error"),
    *((f"{p} (s)", f"time_{p}") for p in TIME_PHASES),
    ("total (s)", "time_total"),
    ("peak RSS (MB)", "peak_rss_mb"),
    ("RSS (MB)", "rss_mb"),
    ("peak device (MB)", "peak_device_mb"),
)


def fmt_number(x: Any) -> str:
    """The report.md number rule: None -> "-", int -> in full, float -> `format(x, ".6g")`, else `str`."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return format(x, ".6g")
    return str(x)


# --------------------------------------------------------------------------------------------- per-block rows


def _weighted_mean(pairs: Iterable[tuple[float, int]]) -> float | None:
    pairs = list(pairs)
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


def block_row(block: dict[str, Any]) -> dict[str, Any]:
    """The per-block values of the table and plots (see the module docstring for the formulas)."""
    linears = list(block.get("linears", {}).values())
    sizes = [(rec, _numel(rec["shape"])) for rec in linears]
    planned = block.get("planned_sparsity")
    if planned is None and linears and all("planned" in rec for rec in linears):
        planned = _weighted_mean((rec["planned"], n) for rec, n in sizes)
    alloc = block.get("allocation") or {}
    if planned is None and not linears:
        planned = alloc.get("planned")
    errors = [rec["error"] for rec in linears if rec.get("error") is not None]
    times = block.get("time_s", {})
    return {
        "block": block.get("block"),
        "planned": planned,
        "achieved": _weighted_mean((rec["sparsity"], n) for rec, n in sizes) if linears else alloc.get("achieved"),
        "params": block.get("params"),
        "nonzero": block.get("nonzero"),
        "output_error": block.get("output_error"),
        "mean_linear_error": sum(errors) / len(errors) if errors else None,
        **{f"time_{p}": times.get(p) for p in (*TIME_PHASES, "total")},
        "peak_rss_mb": block.get("peak_rss_mb"),
        "rss_mb": block.get("rss_mb"),
        "peak_device_mb": block.get("peak_device_mb"),
        "resumed": bool(block.get("resumed", False)),
    }


# --------------------------------------------------------------------------------------------- markdown


def _cell(x: Any) -> str:
    return fmt_number(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _stages_text(stages: Any) -> str:
    """`stages` as recorded: method names, or stage dicts ({method, sparsity, pattern, ...})."""
    out = []
    for s in stages or []:
        if isinstance(s, dict):
            extra = " ".join(f"{k}={fmt_number(s[k])}" for k in ("sparsity", "pattern") if k in s)
            out.append(f"{s.get('method', '?')} {extra}".strip())
        else:
            out.append(str(s))
    return ", ".join(out) or "-"


def summary_rows(report: dict[str, Any]) -> list[list[Any]]:
    """(label, value) pairs of the summary table; values straight from the report dict."""
    cal = report.get("calibration") or {}
    return [
        ["model", report.get("model")],
        ["arch", report.get("model_type")],
        ["layers", report.get("num_layers")],
        ["stages", _stages_text(report.get("stages"))],
        ["calibration", f"{fmt_number(cal.get('samples'))} samples × {fmt_number(cal.get('seq_len'))} tokens"],
        ["device / dtype", f"{fmt_number(report.get('device'))} / {fmt_number(report.get('dtype'))}"],
        ["sequential", report.get("sequential")],
        ["wall time (s)", report.get("wall_time_s")],
        ["peak RSS (MB)", report.get("peak_rss_mb")],
        ["pruned linear sparsity", report.get("pruned_linear_sparsity")],
        ["pruned linear params", report.get("pruned_linear_params")],
        ["block sparsity", report.get("block_sparsity")],
        ["block params", report.get("block_params")],
        ["total params", report.get("total_params")],
        ["activation cache", report.get("cache_tier")],
        ["run id", report.get("run_id")],
    ]


def render_markdown(report: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> str:
    """report.md: summary table, links to the plots, per-block table (numbers by `fmt_number`)."""
    rows = [block_row(b) for b in report.get("blocks", [])] if rows is None else rows
    lines = [
        "# blockprune run report",
        "",
        'Numbers are those of `blockprune_report.json`: integers in full, other numbers as `format(x, ".6g")`, '
        "`-` where absent. Block sparsities are parameter-weighted means over the block's pruned linears; the mean "
        "linear error is the mean of their relative layer errors.",
        "",
        "## Summary",
        "",
        *_table(["", "value"], summary_rows(report)),
        "",
        "## Plots",
        "",
        f"![planned and achieved sparsity per block]({SPARSITY_PNG})",
        "",
        f"![reconstruction error per block]({ERROR_PNG})",
        "",
        f"![time and memory per block]({TIME_MEMORY_PNG})",
        "",
        "## Per block",
        "",
        *_table([h for h, _ in BLOCK_COLUMNS], [[r[k] for _, k in BLOCK_COLUMNS] for r in rows]),
    ]
    resumed = [str(r["block"]) for r in rows if r["resumed"]]
    if resumed:
        lines += ["", f"Blocks {', '.join(resumed)} were written by an earlier, interrupted run (times of that run)."]
    one_pass = [str(b["block"]) for b in report.get("blocks", []) if b.get("output_error_on") == "first sample"]
    if one_pass:
        lines += [
            "",
            f"Blocks {', '.join(one_pass)} took the one-pass true-sequential path: their output error is "
            "measured on the first calibration sample (of each rank), not on all samples.",
        ]
    lines += allocation_markdown(report.get("allocation") or {})
    return "\n".join(lines) + "\n"


# (column header, key of an `allocation.layers` row) of the allocation table, in order
ALLOCATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"),
    ("params", "params"),
    ("energy", "energy"),
    ("outlier ratio", "outlier_ratio"),
    ("influence", "influence"),
    ("rule", "rule"),
    ("planned", "planned"),
    ("at visit", "planned"),
    ("achieved", "achieved"),
    ("removed", "removed"),
)


def allocation_markdown(alloc: dict[str, Any]) -> list[str]:
    """The `## Allocation` section of report.md (nothing without per-layer rows)."""
    rows = alloc.get("layers") or []
    if not rows:
        return []
    head = (
        f"Rule `{alloc.get('rule')}` (energy `{alloc.get('energy')}`, T = {fmt_number(alloc.get('temperature'))}, "
        f"bounds [{fmt_number(alloc.get('min'))}, {fmt_number(alloc.get('max'))}]) over "
        f"{fmt_number(alloc.get('planned_params'))} parameters: target {fmt_number(alloc.get('S'))}, achieved "
        f"{fmt_number(alloc.get('achieved'))} (error {fmt_number(alloc.get('error'))} parameters, within "
        f"tolerance: {fmt_number(alloc.get('within_tolerance'))}). Fractions of each layer's prunable parameters: "
        "*rule* the rule's plan, *planned* on the exact budget, *at visit* after re-balancing, *achieved* after "
        "rounding."
    )
    keys = [k if h != "at visit" else "_visit" for h, k in ALLOCATION_COLUMNS]
    body = [
        [r.get("planned") if k == "_visit" else (r.get("planned_start") if k == "planned" else r.get(k)) for k in keys]
        for r in rows
    ]
    return [
        "",
        "## Allocation",
        "",
        head,
        "",
        f"![per-layer allocation]({ALLOCATION_PNG})",
        "",
        *_table([h for h, _ in ALLOCATION_COLUMNS], body),
    ]


# --------------------------------------------------------------------------------------------- plots


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if r[key] is None else float(r[key]) for r in rows]


def _figure(height: float, nrows: int = 1):
    """A Figure on an Agg canvas (no pyplot, no GUI backend, no global figure state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.grid(True, axis="y", alpha=0.3)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _legend(ax) -> None:
    """Legend outside the axes, right of them (constrained layout makes room), so it never hides data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _label(label: str, ys: list[float]) -> str:
    return label if any(not math.isnan(v) for v in ys) else f"{label} (not recorded)"


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_sparsity(rows: list[dict[str, Any]], title: str) -> bytes:
    fig, (ax,) = _figure(3.6)
    x = [r["block"] for r in rows]
    planned, achieved = _values(rows, "planned"), _values(rows, "achieved")
    ax.bar([i - 0.2 for i in x], planned, width=0.4, label=_label("planned", planned), color="#9ecae1")
    ax.bar([i + 0.2 for i in x], achieved, width=0.4, label=_label("achieved", achieved), color="#3182bd")
    if all(math.isnan(v) for v in planned + achieved):
        _no_data(ax, "sparsity")
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity of pruned linears")
    ax.set_title(f"{title}: planned and achieved sparsity per block")
    _legend(ax)
    return _png(fig)


def plot_error(rows: list[dict[str, Any]], title: str) -> bytes:
    fig, (ax,) = _figure(3.6)
    x = [r["block"] for r in rows]
    series = {
        "block output error": _values(rows, "output_error"),
        "mean linear error": _values(rows, "mean_linear_error"),
    }
    finite = [v for ys in series.values() for v in ys if not math.isnan(v)]
    for (label, ys), marker in zip(series.items(), ("o", "s")):
        ax.plot(x, ys, marker=marker, label=_label(label, ys))
    if not finite:
        _no_data(ax, "reconstruction error")
    elif min(finite) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("relative error")
    ax.set_title(f"{title}: reconstruction error per block")
    _legend(ax)
    return _png(fig)


def plot_time_memory(rows: list[dict[str, Any]], title: str) -> bytes:
    fig, (ax_t, ax_m) = _figure(6.4, nrows=2)
    x = [r["block"] for r in rows]
    bottom = [0.0] * len(rows)
    for phase in TIME_PHASES:
        ys = [0.0 if math.isnan(v) else v for v in _values(rows, f"time_{phase}")]
        ax_t.bar(x, ys, bottom=bottom, label=phase)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax_t.set_ylabel("seconds")
    ax_t.set_title(f"{title}: time per block")
    _legend(ax_t)
    peak, rss = _values(rows, "peak_rss_mb"), _values(rows, "rss_mb")
    ax_m.plot(x, peak, marker="o", label=_label("peak RSS\n(process, so far)", peak))
    ax_m.plot(x, rss, marker="s", label=_label("RSS after\nthe block", rss))
    device = _values(rows, "peak_device_mb")
    if any(not math.isnan(v) for v in device):  # accelerator runs: the device's peak of each block
        ax_m.plot(x, device, marker="^", label="peak device\nmemory")
    top = max((v for v in peak + rss + device if not math.isnan(v)), default=0.0)
    ax_m.set_ylim(0, top * 1.15 or 1.0)  # from 0: flat in depth is the property to see; zooming would hide it
    ax_m.set_ylabel("MB")
    ax_m.set_title("host memory per block")
    _legend(ax_m)
    return _png(fig)


def plot_allocation(alloc: dict[str, Any], title: str) -> bytes:
    """Per layer: the rule's plan, the plan on the exact budget, the plan at the layer's visit and what it achieved;
    the global target as a line."""
    fig, (ax,) = _figure(3.6)
    rows = alloc.get("layers") or []
    x = [r["layer"] for r in rows]
    for key, label, style in (
        ("rule", "rule", ":"),
        ("planned_start", "planned (exact budget)", "--"),
        ("planned", "at visit", "-"),
    ):
        ys = [math.nan if r.get(key) is None else float(r[key]) for r in rows]
        ax.plot(x, ys, linestyle=style, marker=".", label=_label(label, ys))
    ach = [math.nan if r.get("achieved") is None else float(r["achieved"]) for r in rows]
    ax.bar(x, ach, width=0.6, alpha=0.5, color="#3182bd", label=_label("achieved", ach))
    if alloc.get("S") is not None:
        ax.axhline(float(alloc["S"]), color="grey", linewidth=0.8, label="global target")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of the layer removed")
    ax.set_title(f"{title}: {alloc.get('rule')} allocation, planned and achieved per layer")
    _legend(ax)
    return _png(fig)


# --------------------------------------------------------------------------------------------- entry points


def render_report(report: dict[str, Any]) -> dict[str, bytes]:
    """{"report.md", "plots/sparsity.png", "plots/error.png", "plots/time_memory.png": bytes} of `report`."""
    import matplotlib.style

    rows = [block_row(b) for b in report.get("blocks", [])]
    title = str(report.get("model_type") or "model")
    with matplotlib.style.context("default"):  # independent of the user's matplotlibrc
        files = {
            SPARSITY_PNG: plot_sparsity(rows, title),
            ERROR_PNG: plot_error(rows, title),
            TIME_MEMORY_PNG: plot_time_memory(rows, title),
        }
        if (report.get("allocation") or {}).get("layers"):
            files[ALLOCATION_PNG] = plot_allocation(report["allocation"], title)
    return {REPORT_MD: render_markdown(report, rows).encode(), **files}


def write_report_files(out_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Render `report` and write each file under `out_dir` atomically (temporary name, fsync, rename)."""
    out = Path(out_dir)
    paths = []
    for name, data in render_report(report).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        paths.append(path)
    log.info("wrote %s and %d plots in %s", REPORT_MD, len(paths) - 1, out)
    return paths
