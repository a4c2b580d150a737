"""overwrite=True never removes what is not ours (issue 16, item 1).

A table of dangerous outputs, each tried plain and with a planted (valid) blockprune manifest, with and without
resume: every one is refused with a message saying why, and not one file of the whole test tree changes. Then a
real output into which the user put files of their own: overwrite removes exactly our files and keeps theirs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from sharding.lock import LOCK_NAME
from sharding.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    MEASUREMENTS_NAME,
    CheckpointWriter,
    WriterError,
    _json_bytes,
    _new_manifest,
)

RUN_ID = "run-a"


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: content hash, or 'dir' / 'link -> target'} of everything under `root`, symlinks not followed."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():
                out[rel] = "special"  # a FIFO: reading it would block
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def units(n: int = 2) -> list[tuple[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [(f"u{i}.", {f"u{i}.w{j}": torch.randn(8, 8, generator=g) for j in range(2)}) for i in range(n)]


def write_output(out: Path, run_id: str = RUN_ID, **kwargs) -> None:
    """A finished output with every kind of file: shards, config, copied files, extra files in a subdirectory."""
    with CheckpointWriter(out, max_shard_size=300, run_id=run_id, **kwargs) as w:
        for unit, tensors in units():
            w.write_unit(unit, tensors, metadata={"unit": unit}, measurements={"time_s": 0.5})
        w.finalize(
            {"model_type": "llama"},
            extra_files={"blockprune_recipe.yaml": "x: 1\n", "plots/sparsity.png": b"png", "report.md": "# r\n"},
        )


@pytest.fixture
def world(tmp_path, monkeypatch):
    """root/{models/llama (the input model), data/calib.txt, home (HOME), work (the cwd)}, all with content."""
    root = tmp_path / "root"
    model = root / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")
    (root / "models" / "notes.txt").write_text("mine")
    calib = root / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("calibration text")
    (root / "data" / "other.txt").write_text("other")
    home = root / "home"
    (home / "projects").mkdir(parents=True)
    (home / ".bashrc").write_text("# rc")
    work = root / "work"
    work.mkdir()
    (work / "script.py").write_text("print(1)")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (root / "link-to-model").symlink_to(model, target_is_directory=True)
    return {"root": root, "model": model, "calib": calib, "home": home, "work": work}


def _protected(w: dict) -> dict:
    return {w["model"]: "the input model", w["calib"]: "the calibration data"}


# (output, why it is refused) — output as a function of the world
DANGEROUS = {
    "parent_of_model": (lambda w: w["model"].parent, "contains the input model|not a blockprune output"),
    "grandparent_of_model": (lambda w: w["root"], "contains the input model|not a blockprune output"),
    "the_model": (lambda w: w["model"], "is the input model"),
    "symlink_to_model": (lambda w: w["root"] / "link-to-model", "is the input model"),
    "dir_of_calibration": (lambda w: w["calib"].parent, "contains the calibration data|not a blockprune output"),
    "the_calibration_file": (lambda w: w["calib"], "is the calibration data"),
    "inside_model": (lambda w: w["model"] / "pruned", "inside the input model"),
    "cwd_dot": (lambda w: Path("."), "current directory|not a blockprune output"),
    "cwd_absolute": (lambda w: w["work"], "current directory|not a blockprune output"),
    "parent_of_cwd": (lambda w: Path(".."), "contains the|not a blockprune output"),
    "empty": (lambda w: "", "output path is empty"),
    "spaces": (lambda w: "   ", "output path is empty"),
    "home": (lambda w: w["home"], "home directory|not a blockprune output"),
    "root": (lambda w: Path("/"), "filesystem root|not a blockprune output"),
    "foreign_dir": (lambda w: w["home"] / "projects", "not a blockprune output"),
}


@pytest.mark.parametrize("plant", [False, True], ids=["plain", "planted_manifest"])
@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
@pytest.mark.parametrize("case", sorted(DANGEROUS))
def test_dangerous_output_is_refused_and_nothing_changes(world, case, plant, resume):
    make_out, why = DANGEROUS[case]
    out = make_out(world)
    if case == "foreign_dir":
        if plant:
            pytest.skip("a directory holding our manifest is ours: test_overwrite_removes_only_our_files")
        (Path(out) / "thesis.tex").write_text("years of work")
    if case == "inside_model":
        write_output(Path(out), run_id="older-run")  # an earlier output inside the model directory
    planted = plant and str(out).strip() and Path(out).is_dir() and Path(out) != Path("/")
    if planted:  # the worst case: the directory looks like ours, and its manifest claims the model's files
        manifest = {**_new_manifest("other-run", 1000), "finalize": {"renames": [], "files": ["config.json"]}}
        (Path(out) / MANIFEST_NAME).write_bytes(_json_bytes(manifest))
    before = snapshot(world["root"])
    with pytest.raises(WriterError, match=why) as info:
        CheckpointWriter(out, overwrite=True, resume=resume, run_id=RUN_ID, protected=_protected(world))
    assert "\n" not in str(info.value)
    assert snapshot(world["root"]) == before, f"{case}: something changed"


def test_crafted_manifest_cannot_point_outside(world, tmp_path):
    """A manifest naming '../' paths is refused as malformed; the victim beside the output survives."""
    out = world["root"] / "out"
    write_output(out)
    victim = world["root"] / "victim.safetensors"
    victim.write_bytes(b"precious")
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["units"][0]["shards"][0]["file"] = "../victim.safetensors"
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    before = snapshot(world["root"])
    for resume in (False, True):
        with pytest.raises(WriterError, match="malformed|cannot tell which files are ours"):
            CheckpointWriter(out, overwrite=True, resume=resume, run_id=RUN_ID)
    assert snapshot(world["root"]) == before
    m["units"][0]["shards"][0]["file"] = "blockprune-part-00000-000.safetensors"
    m["finalize"]["files"].append("plots/../../victim.safetensors")
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(WriterError, match="cannot tell which files are ours"):
        CheckpointWriter(out, overwrite=True, run_id=RUN_ID)
    assert victim.read_bytes() == b"precious"


def test_overwrite_removes_only_our_files(world):
    """An output in which the user put files of their own (beside ours, in our plots/ directory, a directory, a
    symlink to their data): overwrite removes every file we wrote and nothing else, then a new run works there."""
    out = world["root"] / "out"
    write_output(out, own_files=["blockprune_scores.json"])
    (out / "blockprune_scores.json").write_text("{}")  # written by the caller itself, declared in own_files
    (out / "blockprune-part-00007-000.safetensors").write_bytes(b"orphan part")  # a killed unit's part: ours
    (out / "blockprune_manifest.json.tmp").write_bytes(b"{")  # our temporary
    (out / "notes.txt").write_text("the user's")
    (out / "plots" / "mine.png").write_bytes(b"the user's plot")
    (out / "mine").mkdir()
    (out / "mine" / "config.json").write_text("the user's")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"the user's")  # a final-like name we never wrote
    (out / "data-link").symlink_to(world["calib"].parent, target_is_directory=True)
    ours = set(json.loads((out / MANIFEST_NAME).read_text())["finalize"]["files"])
    assert {"config.json", INDEX_NAME, "plots/sparsity.png", "report.md", "blockprune_recipe.yaml"} <= ours
    outside = {k: v for k, v in snapshot(world["root"]).items() if not k.startswith("out")}
    w = CheckpointWriter(
        out, overwrite=True, run_id="run-b", protected=_protected(world), own_files=["blockprune_scores.json"]
    )
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == sorted(
        [
            MANIFEST_NAME,
            LOCK_NAME,
            "notes.txt",
            "plots",
            "plots/mine.png",
            "mine",
            "mine/config.json",
            "model-00009-of-00009.safetensors",
            "data-link",
        ]
    )
    assert json.loads((out / MANIFEST_NAME).read_text())["run_id"] == "run-b"
    for unit, tensors in units():
        w.write_unit(unit, tensors)
    w.finalize({"model_type": "llama"})
    assert (out / "notes.txt").read_text() == "the user's" and (
        out / "mine" / "config.json"
    ).read_text() == "the user's"
    assert not (out / MEASUREMENTS_NAME).exists()  # this run gave no measurements; the old file was ours
    assert {k: v for k, v in snapshot(world["root"]).items() if not k.startswith("out")} == outside


def test_overwrite_removes_emptied_subdirectory_and_resume_fallback(world):
    out = world["root"] / "out"
    write_output(out)
    # resume with another run id and overwrite: the fallback new run clears through the same guarded path
    w = CheckpointWriter(out, overwrite=True, resume=True, run_id="run-b", protected=_protected(world))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, MANIFEST_NAME]  # plots/ emptied and removed
    w.close()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


def test_output_symlinked_subdirectory_is_not_followed(world):
    """plots -> the user's directory: neither overwrite nor finalize touch the files behind the link."""
    out = world["root"] / "out"
    write_output(out)
    (out / "plots" / "sparsity.png").unlink()
    (out / "plots").rmdir()
    theirs = world["root"] / "their-plots"
    theirs.mkdir()
    (theirs / "sparsity.png").write_bytes(b"theirs")
    (out / "plots").symlink_to(theirs, target_is_directory=True)
    w = CheckpointWriter(out, overwrite=True, run_id=RUN_ID)
    assert (theirs / "sparsity.png").read_bytes() == b"theirs"
    for unit, tensors in units():
        w.write_unit(unit, tensors)
    with pytest.raises(WriterError, match="is not a directory of this output"):
        w.finalize({}, extra_files={"plots/sparsity.png": b"ours"})
    assert (theirs / "sparsity.png").read_bytes() == b"theirs"
    w.close()


BAD_NAMES = ["../x", "a/b/c", ".hidden", "plots/.x", "a\\b", "", "a//b"]


@pytest.mark.parametrize(
    "name", [*BAD_NAMES, "config.json", "blockprune.lock", "model.safetensors", "blockprune-part-x"]
)
def test_extra_file_names_are_checked(tmp_path, name):
    with CheckpointWriter(tmp_path / "out") as w:
        w.write_unit(*units(1)[0])
        with pytest.raises(WriterError, match="extra file name"):
            w.finalize({}, extra_files={name: "x"})
        with pytest.raises(WriterError, match="extra file name 'plots'"):  # a file and a directory of one name
            w.finalize({}, extra_files={"plots": "x", "plots/a.png": b""})


@pytest.mark.parametrize("name", BAD_NAMES)
def test_own_file_names_are_checked(tmp_path, name):
    with pytest.raises(WriterError, match="own_files entry"):
        CheckpointWriter(tmp_path / "out", own_files=[name])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path, overwrite):
    """A FIFO named like our manifest must neither hang a resume nor turn it into a silent new run."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / MANIFEST_NAME)
    (out / "blockprune-part-00000-000.safetensors").write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(WriterError, match="is not a regular file"):
        CheckpointWriter(out, resume=True, overwrite=overwrite, run_id=RUN_ID)
    assert snapshot(tmp_path) == before
