"""The results plumbing of `launch/benchmarks/` (no benchmark is run: every heavy step is faked).

`publish_section` / `write_section`: a section is replaced in place between its markers, other sections and the
header are untouched, publishing twice gives the same bytes, a missing section is appended, a missing file gets the
header. Then every section of ``docs/results.md`` is regenerated through its script's ``main`` with faked runs:
the title, command, machine facts, legends and table headers come out byte-identical to the file (the numbers are
fakes), so the scripts and the published results cannot drift apart unnoticed.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from launch.benchmarks import common

INFO = {
    "cpu": "Test CPU",
    "cores": 4,
    "usable_cores": 2,
    "memory_gb": 7.5,
    "torch_threads": 2,
    "python": "3.11.0",
    "torch": "2.0",
    "transformers": "5.0",
    "platform": "Linux-test",
}

EXPECTED = """## A title

Command: `python -m launch.benchmarks.x --write-results`

- CPU: Test CPU, 2 usable of 4 logical cores, 7.5 GiB RAM; torch intra-op threads 2
- Python 3.11.0, torch 2.0, transformers 5.0 (Linux-test)
- load average (`uptime`, 1/5/15 min) before: 1.00, 2.00, 3.00; after: 4.00, 5.00, 6.00 (other processes shared \
the CPU: wall times are noisy when it exceeds the core count)
- model: `m`
- threads: 1

*a*: the legend.

| run | ppl |
|---|---|
| dense | 42.063 |
| wanda | 77.735 |

A note."""


def publish(path: Path, anchor: str = "x", legend: str | None = "*a*: the legend.", ppl: float = 77.735) -> str:
    table = common.markdown_table(["run", "ppl"], [["dense", "42.063"], ["wanda", f"{ppl:.3f}"]])
    return common.publish_section(
        anchor,
        "A title",
        "python -m launch.benchmarks.x --write-results",
        legend,
        [table, "A note."],
        facts={"model": "`m`", "threads": 1},
        load_before="1.00, 2.00, 3.00",
        load_after="4.00, 5.00, 6.00",
        info=INFO,
        path=path,
    )


def test_markdown_table_format():
    assert common.markdown_table(["a", "b c"], [[1, "x"], [2.5, None]]) == (
        "| a | b c |\n|---|---|\n| 1 | x |\n| 2.5 | None |"
    )


def test_publish_section_format(tmp_path):
    path = tmp_path / "results.md"
    text = publish(path)
    assert text == EXPECTED
    assert path.read_text() == f"{common.RESULTS_HEADER}\n<!-- BEGIN x -->\n{EXPECTED}\n<!-- END x -->\n"


def test_publish_section_without_legend(tmp_path):
    text = publish(tmp_path / "r.md", legend=None)
    assert text == EXPECTED.replace("*a*: the legend.\n\n", "")


def test_publish_section_replaces_in_place_and_is_idempotent(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(
        "# Results\n\nintro\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\n"
        "<!-- BEGIN x -->\nold x\n<!-- END x -->\n\n<!-- BEGIN b -->\nold b\n<!-- END b -->\n"
    )
    publish(path)
    once = path.read_text()
    assert once == (
        "# Results\n\nintro\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\n"
        f"<!-- BEGIN x -->\n{EXPECTED}\n<!-- END x -->\n\n<!-- BEGIN b -->\nold b\n<!-- END b -->\n"
    )
    publish(path)
    assert path.read_text() == once
    publish(path, ppl=80.0)  # new numbers: only that line changes
    changed = [(a, b) for a, b in zip(once.splitlines(), path.read_text().splitlines(), strict=True) if a != b]
    assert changed == [("| wanda | 77.735 |", "| wanda | 80.000 |")]


def test_publish_section_appends_a_new_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n")
    publish(path, anchor="new")
    assert path.read_text() == (
        f"# Results\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\n<!-- BEGIN new -->\n{EXPECTED}\n<!-- END new -->\n"
    )


def test_write_section_refuses_unbalanced_markers(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n<!-- BEGIN x -->\nno end\n")
    with pytest.raises(ValueError, match="unbalanced"):
        common.write_section("x", "body", path)
    assert path.read_text() == "# Results\n\n<!-- BEGIN x -->\nno end\n"


def test_command_line_is_relative_to_the_repository(monkeypatch):
    monkeypatch.setattr(sys, "executable", str(common.REPO_ROOT / ".venv" / "bin" / "python"))
    assert (
        common.command_line("launch.benchmarks.x", ["--a", "b c"])
        == ".venv/bin/python -m launch.benchmarks.x --a 'b c'"
    )
    monkeypatch.setattr(sys, "executable", "/elsewhere/python")
    assert common.command_line("m", []) == "/elsewhere/python -m m"


def test_recipes(monkeypatch, tmp_path):
    import launch.assets
    from launch.benchmarks.ranks import random_model_recipe

    monkeypatch.setattr(launch.assets, "real_text", lambda name, *a, **k: Path(f"/texts/{name}.txt"))
    stage = {"method": "sparsegpt", "sparsity": 0.5}
    recipe = random_model_recipe(Path("/m"), Path("/o"), 32, 512, stage, threads=None)
    assert recipe == {
        "model": "/m",
        "output": "/o",
        "overwrite": True,
        "calibration": {"data": "/texts/shakespeare-comedies.txt", "samples": 32, "seq_len": 512, "seed": 0},
        "runtime": {"device": "cpu", "dtype": "float32", "threads": None, "progress": False},
        "prune": [stage],
        "report_plots": False,
    }
    assert list(recipe) == ["model", "output", "overwrite", "calibration", "runtime", "prune", "report_plots"]
    assert list(recipe["runtime"]) == ["device", "dtype", "threads", "progress"]
    assert "threads" not in random_model_recipe(Path("/m"), Path("/o"), 32, 512, stage)["runtime"]

    seen = {}

    def fake_child(cmd, log_path, env=None):
        seen["cmd"], seen["log"] = cmd, log_path
        return common.ChildRun(cmd=cmd, wall_s=1.0, log=log_path)

    monkeypatch.setattr(common, "run_child", fake_child)
    out = tmp_path / "out"
    out.mkdir()
    (out / "blockprune_report.json").write_text('{"wall_time_s": 2.0}')
    report, child = common.run_blockprune({**recipe, "output": str(out)}, tmp_path, "run", ["--nproc", "2"])
    assert report == {"wall_time_s": 2.0} and child.wall_s == 1.0
    assert seen["cmd"] == [sys.executable, "-m", "launch", "run", str(tmp_path / "run.yaml"), "--nproc", "2"]
    assert seen["log"] == tmp_path / "run.log"
    assert "report_plots: false" in (tmp_path / "run.yaml").read_text()


# ------------------------------------------------------------------ every section of docs/results.md, regenerated

DOC = common.REPO_ROOT / "docs" / "results.md"


def doc_section(anchor: str) -> str:
    text = DOC.read_text()
    return text.split(f"<!-- BEGIN {anchor} -->\n", 1)[1].split(f"\n<!-- END {anchor} -->", 1)[0]


def doc_facts(section: str) -> tuple[dict, list[str], list[str]]:
    """(machine info, [load before, load after], the script's argv) as the section states them."""
    cpu = re.search(
        r"- CPU: (.*), (\d+) usable of (\d+) logical cores, (\S+) GiB RAM; torch intra-op threads (\d+)", section
    )
    py = re.search(r"- Python (\S+), torch (\S+), transformers (\S+) \((.*)\)\n", section)
    loads = re.search(r"before: (.*); after: (.*) \(other", section)
    cmd = shlex.split(re.search(r"Command: `(.*)`", section).group(1))
    info = {
        "cpu": cpu[1],
        "usable_cores": int(cpu[2]),
        "cores": int(cpu[3]),
        "memory_gb": float(cpu[4]),
        "torch_threads": int(cpu[5]),
        "python": py[1],
        "torch": py[2],
        "transformers": py[3],
        "platform": py[4],
    }
    return info, [loads[1], loads[2]], cmd[cmd.index("-m") + 2 :]


def fake_report(recipe: dict) -> dict:
    return {
        "wall_time_s": 50.0,
        "peak_rss_mb": 700.0,
        "machine": {"cpus": 2},
        "world_size": 1,
        "blocks": [{"time_s": {"solve": 1.0}, "true_sequential": True}],
        "structured_plan": {"achieved": 0.2, "config": {"num_key_value_heads": 2, "intermediate_size": 1297}},
    }


def fake_allocation(mod):
    def prune_all(args):
        rows = []
        for budget in args.budget_list:
            for name, alloc in mod.runs_for(budget, args):
                rep = {"wall_time_s": 60.0, "structured_plan": {"achieved": budget}}
                if alloc["rule"] != "uniform":
                    rep["allocation"] = {"achieved": budget, "layers": [{"achieved": 0.1}], "scores": {}}
                rows.append({"budget": budget, "run": name, "output": Path(name), "report": rep, "wall_s": 1.0})
        return rows

    return {"prune_all": prune_all, "evaluate": lambda path, args: 50.0 + len(str(path))}


def fake_moe(mod):
    case = {"E": 8, "n_keep": 6, "recovered": True, "stun": 1e-3, "whole": 0.2, "random": 0.1, "random_min": 0.05}
    timing = dict.fromkeys(("decide", "surgery", "stats", "solve", "forward"), 10.0)
    return {
        "run_case": lambda arch, sizes, top_k, *a: {"arch": arch, "top_k": top_k, "sizes": sizes, **case},
        "time_case": lambda *a: timing,
    }


def fake_distill(mod):
    rep = dict.fromkeys(("steps", "tokens", "world_size", "load_s", "train_s", "save_s", "tokens_per_s"), 1)
    rep.update(teacher_share=0.25, loss_first_10pct=0.4, loss_last_10pct=0.3, peak_rss_mb_rank0=5000.0)
    return {
        "prune": lambda args: (Path("pruned"), {"prune_s": 768.0, "reused": True}),
        "distill": lambda student, args: (Path("distilled"), rep, 1000.0),
    }


def fake_llmc(mod):
    def prune_both(method, args, py, calib):
        r = {"wall_s": 10.0, "prune_s": 9.0, "rss": 1000.0, "threads": 2}
        return {"blockprune": {**r, "output": Path("bp")}, "llm-compressor": {**r, "output": Path("lc")}}

    return {
        "ensure_llmc_venv": lambda venv: Path("py"),
        "save_calibration_ids": lambda args: Path("calib"),
        "llmc_versions": lambda py: "llmcompressor 0.14.0.1, torch 2.13.0+cpu, transformers 5.17.0",
        "prune_both": prune_both,
    }


def fake_ranks(mod):
    def run_one(name, recipe, work, extra):
        return {"wall_s": 60.0, "run_s": 50.0, "world": 1, "rss": 900.0, "output": Path(recipe["output"])}

    return {"build_model": lambda path, *a: path, "max_rel_diff": lambda a, b: 0.203, "run_one": run_one}


def fake_depth(mod):
    return {"build_model": lambda path, *a: path, "checkpoint_mb": lambda path: 240.0}


SECTIONS = {  # anchor: (script, fakes of its heavy steps)
    "vs-llmcompressor": ("vs_llmcompressor", fake_llmc),
    "smollm2-unstructured": ("smollm2_unstructured", None),
    "distill": ("smollm2_distill", fake_distill),
    "moe": ("moe_planted", fake_moe),
    "ranks": ("ranks", fake_ranks),
    "structured": ("structured_table", None),
    "memory-depth": ("memory_depth", fake_depth),
    "allocation": ("allocation_table", fake_allocation),
    "allocation-obs": ("allocation_table", fake_allocation),
}


def test_every_covered_section_is_in_the_results():
    """The sections regenerated below all exist in docs/results.md (newer sections, written by `publish_section` with
    no per-script formatting of their own, need no regenerator here)."""
    assert set(SECTIONS) <= set(re.findall(r"<!-- BEGIN (\S+) -->", DOC.read_text()))


@pytest.mark.parametrize("anchor", list(SECTIONS))
def test_section_regenerates_from_docs_results(anchor, monkeypatch, tmp_path, request):
    """The script's ``main`` with faked runs and the section's own machine facts and command writes the section
    docs/results.md holds: the same title, command, facts, legends and table headers, paragraph for paragraph."""
    import launch.assets

    script, fakes = SECTIONS[anchor]
    mod = importlib.import_module(f"launch.benchmarks.{script}")
    want = doc_section(anchor)
    info, loads, argv = doc_facts(want)
    doc_model = re.search(r"- model: `(.*)`", want)
    model = tmp_path / "model"  # the dense config the structured table reads
    model.mkdir()
    (model / "config.json").write_text(
        '{"num_key_value_heads": 3, "num_attention_heads": 9, "intermediate_size": 1536}'
    )

    def resolve_inputs(args):
        args.model, args.calib_path, args.eval_path = model, Path("/t/shakespeare-comedies.txt"), Path("/t/hamlet.txt")
        args.work_dir.mkdir(parents=True, exist_ok=True)

    results = tmp_path / "results.md"
    load_readings = iter(loads)
    for name, value in {
        "RESULTS_MD": results,
        "BENCH_DIR": tmp_path / "bench",
        "machine_info": lambda: dict(info),
        "load_average": lambda: next(load_readings),
        "setup_logging": lambda: None,
        "resolve_inputs": resolve_inputs,
        "run_blockprune": lambda recipe, work, name, extra=(): (fake_report(recipe), common.ChildRun([], 1.0, work)),
        "evaluate_all": lambda paths, args: {n: {"ppl": 40.0 + k, "params": 1e8} for k, n in enumerate(paths)},
        "linear_sparsity": lambda ckpt, *a: 0.5,
    }.items():
        monkeypatch.setattr(common, name, value)
    monkeypatch.setattr(sys, "executable", str(common.REPO_ROOT / ".venv" / "bin" / "python"))
    monkeypatch.setattr(os, "nice", lambda inc: 0)
    monkeypatch.setattr(launch.assets, "real_text", lambda name, *a, **k: Path(f"/t/{name}.txt"))
    for name, value in (fakes(mod) if fakes else {}).items():
        monkeypatch.setattr(mod, name, value)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # moe_planted sets its threads in main
    sharding_log = logging.getLogger("sharding")  # and quiets this logger
    request.addfinalizer(lambda level=sharding_log.level: sharding_log.setLevel(level))

    assert mod.main(argv) == 0
    got = results.read_text().split(f"<!-- BEGIN {anchor} -->\n", 1)[1].split(f"\n<!-- END {anchor} -->", 1)[0]
    if doc_model:
        got = got.replace(f"`{model}`", f"`{doc_model[1]}`")

    assert skeleton(got) == skeleton(want)


RUN_NOTES = ("Distillation recovers ", "Best: ", "- target ")  # notes worded from the measured numbers


def skeleton(section: str) -> list[str]:
    """The section's paragraphs with each table cut to its header and the notes worded from the numbers blanked."""
    out = []
    for para in section.split("\n\n"):
        if para.startswith("|"):
            out.append("\n".join(para.split("\n")[:2]))
        else:
            out.append("<run note>" if para.startswith(RUN_NOTES) else para)
    return out
