"""report.md and the PNG plots of a run: valid images of the right plots; report.md's numbers equal the JSON's."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from engine.config import config_from_dict
from engine.pipeline import run
from engine.report.render import (
    ERROR_PNG,
    REPORT_MD,
    SPARSITY_PNG,
    TIME_MEMORY_PNG,
    render_report,
    write_report_files,
)
from tests.tiny_models import recipe, tiny_text

ACHIEVED_BLUE = (0x31, 0x82, 0xBD)  # the "achieved" bars of sparsity.png
TAB_ORANGE, TAB_RED = (255, 127, 14), (214, 39, 40)  # "stats" and "forward" in time_memory.png (tab10)
PHASES = ("load", "stats", "solve", "forward", "write", "total")


@pytest.fixture(scope="module")
def run_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """A SparseGPT 50% run of the tiny llama (SparseGPT records a per-linear error)."""
    d = tmp_path_factory.mktemp("render")
    calib = d / "calib.txt"
    calib.write_text(tiny_text(3000, seed=0))
    out = d / "out"
    stages = [{"method": "sparsegpt", "sparsity": 0.5}]
    run(config_from_dict(recipe(tiny_ckpt("llama"), out, calib, stages, report_plots=True)))
    return out


def test_run_writes_report_and_plots(run_dir, rendered):
    """The pipeline itself writes report.md and the PNGs into its output, equal to a fresh rendering."""
    assert (run_dir / "report.md").read_text() == rendered["report.md"].decode()
    for name in ("plots/sparsity.png", "plots/error.png", "plots/time_memory.png"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 1000


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "blockprune_report.json").read_text())


@pytest.fixture(scope="module")
def rendered(report) -> dict[str, bytes]:
    return render_report(report)


def md_tables(md: str) -> dict[str, list[list[str]]]:
    """{section title: rows of cells (header first, separator dropped)} of every table in `md`."""
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in md.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and not set(line) <= set("|-"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip()[1:-1].split(" | ")]
            tables.setdefault(section, []).append(cells)
    return tables


def as_number(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def g6(x) -> float | None:
    """The documented rule: the JSON value printed with 6 significant digits."""
    return None if x is None else float(format(x, ".6g"))


def open_png(data: bytes) -> Image.Image:
    Image.open(io.BytesIO(data)).verify()  # structure and CRCs; the object is unusable afterwards
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    assert img.width > 100 and img.height > 100, img.size
    return img.convert("RGB")


def colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return {c for _, c in img.getcolors(maxcolors=1 << 20)}


# ------------------------------------------------------------------------------------------ the plots


def test_render_returns_report_and_three_valid_pngs(rendered):
    assert sorted(rendered) == sorted([REPORT_MD, SPARSITY_PNG, ERROR_PNG, TIME_MEMORY_PNG])
    images = {name: open_png(rendered[name]) for name in (SPARSITY_PNG, ERROR_PNG, TIME_MEMORY_PNG)}
    for name, img in images.items():
        assert len(colours(img)) > 20, f"{name} looks blank"
    assert ACHIEVED_BLUE in colours(images[SPARSITY_PNG])
    assert {TAB_ORANGE, TAB_RED} <= colours(images[TIME_MEMORY_PNG])  # stacked stats and forward bars
    assert images[TIME_MEMORY_PNG].height > images[SPARSITY_PNG].height  # two panels: time and memory


def test_plots_follow_the_data(report, rendered):
    """Changing a block's sparsity, error or time changes exactly the plot that shows it."""
    changed = json.loads(json.dumps(report))
    for rec in changed["blocks"][1]["linears"].values():
        rec["sparsity"] = 0.9
    again = render_report(changed)
    assert again[SPARSITY_PNG] != rendered[SPARSITY_PNG]
    assert again[ERROR_PNG] == rendered[ERROR_PNG] and again[TIME_MEMORY_PNG] == rendered[TIME_MEMORY_PNG]
    changed["blocks"][0]["output_error"] *= 10
    changed["blocks"][2]["time_s"]["solve"] += 1.0
    again2 = render_report(changed)
    assert again2[ERROR_PNG] != rendered[ERROR_PNG] and again2[TIME_MEMORY_PNG] != rendered[TIME_MEMORY_PNG]


# ------------------------------------------------------------------------------------------ report.md


def test_report_md_numbers_equal_the_json(report, rendered):
    md = rendered[REPORT_MD].decode()
    for png in (SPARSITY_PNG, ERROR_PNG, TIME_MEMORY_PNG):
        assert f"]({png})" in md
    tables = md_tables(md)
    summary = {row[0]: row[1] for row in tables["Summary"][1:]}
    assert summary["model"] == report["model"] and summary["arch"] == "llama"
    assert summary["stages"] == "sparsegpt"
    for label, key in [
        ("wall time (s)", "wall_time_s"),
        ("peak RSS (MB)", "peak_rss_mb"),
        ("pruned linear sparsity", "pruned_linear_sparsity"),
        ("block sparsity", "block_sparsity"),
        ("total params", "total_params"),
        ("layers", "num_layers"),
    ]:
        assert as_number(summary[label]) == g6(report[key]), label

    header, *rows = tables["Per block"]
    assert len(rows) == len(report["blocks"]) == 3
    for cells, block in zip(rows, report["blocks"]):
        row = dict(zip(header, cells))
        assert int(row["block"]) == block["block"]
        assert int(row["params"]) == block["params"] and int(row["nonzero"]) == block["nonzero"]
        assert as_number(row["output error"]) == g6(block["output_error"])
        for phase in PHASES:
            assert as_number(row[f"{phase} (s)"]) == g6(block["time_s"][phase]), phase
        assert as_number(row["peak RSS (MB)"]) == g6(block["peak_rss_mb"])
        assert as_number(row["RSS (MB)"]) == g6(block["rss_mb"])
        linears = block["linears"].values()
        sizes = [math.prod(rec["shape"]) for rec in linears]
        achieved = sum(rec["sparsity"] * n for rec, n in zip(linears, sizes)) / sum(sizes)
        assert as_number(row["achieved sparsity"]) == g6(achieved)
        assert achieved == pytest.approx(0.5, abs=0.01)
        errors = [rec["error"] for rec in linears]
        assert as_number(row["mean linear error"]) == g6(sum(errors) / len(errors))
        assert 0 < as_number(row["mean linear error"]) < 1


def _synthetic() -> dict:
    lin = lambda s, shape, **kw: {"sparsity": s, "shape": shape, **kw}
    return {
        "model": "/m|odel",
        "model_type": "llama",
        "num_layers": 2,
        "stages": [{"method": "wanda", "sparsity": 0.5}],
        "calibration": {"samples": 4, "seq_len": 16},
        "device": "cpu",
        "dtype": "float32",
        "sequential": True,
        "wall_time_s": 12.3456789,
        "peak_rss_mb": 1024.0,
        "pruned_linear_sparsity": 0.35,
        "block_sparsity": 0.25,
        "total_params": 123456789,
        "blocks": [
            {
                "block": 0,
                "linears": {
                    "a": lin(0.5, [2, 2], planned=0.5, error=0.1),
                    "b": lin(0.3, [3, 4], planned=0.25, error=0.2),
                },
                "output_error": 0.123456789,
                "params": 20,
                "nonzero": 12,
                "time_s": {"load": 0.1, "stats": 0.2, "solve": 0.3, "forward": 0.4, "write": 0.5, "total": 1.5},
                "peak_rss_mb": 500.5,
                "rss_mb": 400.25,
                "peak_device_mb": 77.0,
            },
            {
                "block": 1,
                "planned_sparsity": 0.6,
                "linears": {"a": lin(0.6, [4, 4])},
                "output_error": None,
                "params": 16,
                "nonzero": 7,
                "time_s": {"load": 0.1, "stats": 0.2, "solve": 0.3, "forward": 0.4},
                "peak_rss_mb": 501.0,
                "rss_mb": 401.0,
                "peak_device_mb": None,
                "resumed": True,
            },
        ],
    }


def test_synthetic_report_exact_cells():
    files = render_report(_synthetic())
    tables = md_tables(files[REPORT_MD].decode())
    summary = {row[0]: row[1] for row in tables["Summary"][1:]}
    assert summary["model"] == "/m|odel"  # a '|' is escaped, the table stays intact
    assert summary["stages"] == "wanda sparsity=0.5"
    assert summary["wall time (s)"] == "12.3457" and summary["total params"] == "123456789"
    header, r0, r1 = tables["Per block"]
    r0, r1 = dict(zip(header, r0)), dict(zip(header, r1))
    # planned (0.5*4 + 0.25*12)/16 = 0.3125, achieved (0.5*4 + 0.3*12)/16 = 0.35, mean error (0.1+0.2)/2 = 0.15
    assert (r0["planned sparsity"], r0["achieved sparsity"], r0["mean linear error"]) == ("0.3125", "0.35", "0.15")
    assert (r0["output error"], r0["total (s)"], r0["RSS (MB)"], r0["peak device (MB)"]) == (
        "0.123457",
        "1.5",
        "400.25",
        "77",
    )
    # block 1: a block-level plan, no linear error, a resumed block without write/total times
    assert (r1["planned sparsity"], r1["achieved sparsity"], r1["mean linear error"]) == ("0.6", "0.6", "-")
    assert (r1["output error"], r1["write (s)"], r1["total (s)"], r1["peak device (MB)"]) == ("-", "-", "-", "-")
    assert "Blocks 1 were written by an earlier" in files[REPORT_MD].decode()
    for name in (SPARSITY_PNG, ERROR_PNG, TIME_MEMORY_PNG):
        open_png(files[name])


def test_empty_report_still_renders():
    files = render_report({"model": "m", "blocks": []})
    header, *rows = md_tables(files[REPORT_MD].decode())["Per block"]
    assert rows == [] and header[0] == "block"
    for name in (SPARSITY_PNG, ERROR_PNG, TIME_MEMORY_PNG):
        open_png(files[name])


def test_write_report_files(report, rendered, tmp_path):
    paths = write_report_files(tmp_path, report)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == sorted(rendered)
    for p in paths:
        assert p.read_bytes() == rendered[p.relative_to(tmp_path).as_posix()]  # rendering is deterministic
    assert not list(tmp_path.rglob("*.tmp"))
