"""Streamed, atomic, resumable writer of Hugging Face safetensors checkpoints.

The engine hands over one *unit* at a time (a decoder block, or the embeddings/norm/lm_head): its tensors under
their on-disk HF names, already in the output dtype. Each unit is written to its own shard files
(``blockprune-part-<unit:05d>-<k:03d>.safetensors``) and then recorded in ``blockprune_manifest.json``; the manifest
rewrite is the unit's commit point. ``finalize`` renames the parts to ``model-0000i-of-0000N.safetensors`` (or
``model.safetensors``), writes ``config.json``, tokenizer/generation files and extra files, and last
``model.safetensors.index.json``, which is the checkpoint's commit point.

Every file is written under a temporary name (``<name>.tmp``), flushed, ``fsync``'d, renamed, and its directory
``fsync``'d. A run killed at any point resumes from the manifest and produces byte-identical files: shard bytes are
a pure function of the tensors (``safetensors.torch.save_file`` with metadata ``{"format": "pt"}`` and tensors in
sorted name order), file names depend only on the commit order, and the manifest holds no timestamps or paths
(per-unit measurements such as timings go to ``blockprune_measurements.json``, the one file that differs).

Safety: one writer per output at a time (``blockprune.lock``, `sharding.lock`); ``overwrite`` removes only files
this writer can prove it wrote, only in a directory holding our manifest, and never in or around a protected path
(the input model, the calibration data, the cwd, the home directory); SIGINT/SIGTERM are deferred over the
commit's rename + registration and the cleanup of a failed unit consults the manifest on disk.
The on-disk layout, manifest schema and resume rules are in ``docs/formats-writer.md``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sharding.errors import BlockpruneError
from sharding.lock import LOCK_NAME, LockError, OutputLock
from sharding.signals import deferred_signals

logger = logging.getLogger(__name__)

MANIFEST_NAME = "blockprune_manifest.json"
MEASUREMENTS_NAME = "blockprune_measurements.json"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "blockprune-writer-manifest"
MEASUREMENTS_FORMAT = "blockprune-writer-measurements"
MANIFEST_VERSION = 1
PART_PREFIX = "blockprune-part-"
TMP_SUFFIX = ".tmp"
SHARD_METADATA = {"format": "pt"}
# Files copied verbatim from the source checkpoint by `finalize` (those that exist there).
SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_PART_RE = re.compile(r"blockprune-part-\d{5}-\d{3}\.safetensors")
_FINAL_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_SAFETENSORS_TMP_RE = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # save_file writes `.tmpXXXXXX` and renames it
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 16 << 20
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_ERRNO_KIND = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
_IO_ERRORS = (OSError, SafetensorError)


class WriterError(BlockpruneError, RuntimeError):
    """A checkpoint could not be written, resumed or finalized; the message names the file, unit or tensor."""


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like ``"5GB"`` (10^9, as in transformers) or ``"512MiB"`` (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise WriterError(f"max_shard_size {size!r} is not a size; use bytes or e.g. '5GB', '500MB', '1GiB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise WriterError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Greedy packing of ``(name, nbytes)`` in the given order into groups of at most `limit` tensor bytes.

    A tensor larger than `limit` gets a group of its own. Header bytes are not counted (as in transformers)."""
    groups: list[list[str]] = []
    used = limit  # forces a new group for the first tensor
    for name, nbytes in sizes:
        if used + nbytes > limit or not groups:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares storage with nothing (safetensors refuses shared storages)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    out.copy_(t.detach())
    return out


def _errno_of(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if code is None:  # safetensors reports Rust I/O errors as text: "... (os error 28) ..."
        m = re.search(r"os error (\d+)", str(err))
        code = int(m.group(1)) if m else None
    return code


def _io_message(err: BaseException, where: str) -> str:
    """One line: ``disk full while writing unit 'x' to DIR: No space left on device``."""
    code = _errno_of(err)
    reason = os.strerror(code) if code else str(err).splitlines()[0]
    kind = _ERRNO_KIND.get(code, "I/O error") if code is not None else "I/O error"
    return f"{kind} {where}: {reason}"


def _fsync_dir(path: Path) -> None:
    """Make renames and creations inside `path` durable."""
    if not hasattr(os, "O_DIRECTORY"):  # not POSIX: directories cannot be opened
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of the file at `path`, after ``fsync``-ing it."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to ``<path>.tmp``, fsync it, rename it over `path`, fsync the directory."""
    _replace_with(path, data)
    _fsync_dir(path.parent)


def _replace_with(path: Path, data: bytes) -> None:
    """`atomic_write` without the directory fsync: after it returns, `path` holds `data` or its old content."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(obj: Any, *, sort_keys: bool = False) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()


def _without_auto_map(path: Path) -> bytes:
    """`path`'s bytes; a JSON object loses its ``auto_map`` (e.g. tokenizer_config.json naming a custom tokenizer
    class): it points at code the output does not ship (or at another hub repository's), and no output of ours may
    make ``trust_remote_code=True`` run code that is not ours."""
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        return data  # not ours to repair: copied as it is, as transformers would read it
    if not isinstance(obj, dict) or "auto_map" not in obj:
        return data
    logger.warning("dropping %s's auto_map %s: outputs reference no foreign code", path.name, obj.pop("auto_map"))
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


# ---- which files are ours ---------------------------------------------------------------------------------------


def _name_problem(name: Any) -> str | None:
    """Why `name` cannot be a file name of ours inside the output, or None. Allowed: a plain name, or one directory
    level (``plots/sparsity.png``); no part empty or starting with '.', no backslash or NUL (so never ``..``)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    parts = name.split("/")
    if len(parts) > 2 or any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return "not a plain file name or dir/name (no '..', leading '.', backslash or NUL)"
    return None


def _is_reserved(name: str) -> bool:
    """Names the writer itself manages; extra files may not take them (nor their directory part)."""
    first = name.split("/")[0]
    fixed = {MANIFEST_NAME, MEASUREMENTS_NAME, INDEX_NAME, CONFIG_NAME, LOCK_NAME}
    return first in fixed or first.startswith((PART_PREFIX, LOCK_NAME)) or bool(_FINAL_RE.fullmatch(first))


def _is_our_temp(name: str, ours: set[str]) -> bool:
    """A temporary this writer (or safetensors inside it) makes: ``<one of ours>.tmp``,
    ``blockprune-part-...safetensors.tmp`` or ``.tmpXXXXXX`` (save_file's own)."""
    if _SAFETENSORS_TMP_RE.fullmatch(name):
        return True
    stem = name[: -len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else None
    fixed = (MANIFEST_NAME, MEASUREMENTS_NAME)
    return stem is not None and (stem in ours or stem in fixed or bool(_PART_RE.fullmatch(stem)))


def _manifest_names(manifest: dict[str, Any]) -> set[str]:
    """Every file name a (validated) manifest proves we wrote: itself, measurements, shards under their part and
    final names, and the files finalize recorded before writing them."""
    names = {MANIFEST_NAME, MEASUREMENTS_NAME}
    names |= {s["file"] for u in manifest["units"] for s in u["shards"]}
    fin = manifest.get("finalize")
    if fin is not None:
        names |= {final for _, final in fin["renames"]} | set(fin.get("files", []))
    return names


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a parsed manifest, or None. Checked before any name in it is used to open, hash or remove a
    file, so a crafted manifest cannot point outside the output (``"file": "../model/x"``)."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if not isinstance(m.get("run_id"), (str, type(None))):
        return "run_id is not a string"
    if type(m.get("max_shard_size")) is not int or m["max_shard_size"] <= 0:
        return "max_shard_size is not a positive integer"
    if not isinstance(m.get("finalized"), bool):
        return "finalized is not a boolean"
    units = m.get("units")
    if not isinstance(units, list):
        return "units is not a list"
    seen_units: set[str] = set()
    seen_tensors: set[str] = set()
    files: list[str] = []
    for i, u in enumerate(units):
        if not isinstance(u, dict) or not isinstance(u.get("name"), str) or not u["name"] or u["name"] in seen_units:
            return f"units[{i}] has no name or a repeated one"
        seen_units.add(u["name"])
        if type(u.get("nbytes")) is not int or u["nbytes"] < 0 or not isinstance(u.get("metadata"), dict):
            return f"units[{i}] has a bad nbytes or metadata"
        if not isinstance(u.get("shards"), list):
            return f"units[{i}].shards is not a list"
        for k, s in enumerate(u["shards"]):
            where = f"units[{i}].shards[{k}]"
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _PART_RE.fullmatch(s["file"]):
                return f"{where}.file is not a blockprune part name"
            if s["file"] in files:
                return f"{where}.file {s['file']!r} appears twice"
            files.append(s["file"])
            if any(type(s.get(key)) is not int or s[key] < 0 for key in ("size", "tensor_bytes")):
                return f"{where} has a bad size or tensor_bytes"
            if not isinstance(s.get("sha256"), str) or not _SHA256_RE.fullmatch(s["sha256"]):
                return f"{where}.sha256 is not a sha256 hex digest"
            tensors = s.get("tensors")
            if not isinstance(tensors, list) or not all(isinstance(t, str) and t for t in tensors):
                return f"{where}.tensors is not a list of names"
            if seen_tensors & set(tensors) or len(set(tensors)) != len(tensors):
                return f"{where} repeats a tensor name"
            seen_tensors |= set(tensors)
    return _finalize_problem(m.get("finalize"), files)


def _finalize_problem(fin: Any, files: list[str]) -> str | None:
    if fin is None:
        return None
    if not isinstance(fin, dict) or not isinstance(fin.get("renames"), list):
        return "finalize is not an object with renames"
    renames = fin["renames"]
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in renames):
        return "finalize.renames is not a list of [part, final] pairs"
    if [r[0] for r in renames] != files:
        return "finalize.renames does not list the committed shards in order"
    finals = [r[1] for r in renames]
    if len(set(finals)) != len(finals) or not all(_FINAL_RE.fullmatch(f) for f in finals):
        return "finalize.renames has a final name that is not model[-i-of-n].safetensors, or repeats one"
    recorded = fin.get("files", [])
    if not isinstance(recorded, list) or any(_name_problem(f) for f in recorded):
        return "finalize.files is not a list of plain file names"
    return None


def _resolve_shard(out_dir: Path, manifest: dict[str, Any], part: str) -> Path:
    """Where a committed shard is now: its part name, or its final name once finalize renamed it."""
    src = out_dir / part
    plan = manifest.get("finalize")
    if plan is None or src.exists():
        return src
    return out_dir / dict(plan["renames"]).get(part, part)


def _new_manifest(run_id: str | None, max_shard_size: int) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "run_id": run_id,
        "max_shard_size": max_shard_size,
        "units": [],
        "finalize": None,
        "finalized": False,
    }


# ---- where overwrite may remove ---------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink resolved (a symlink to the model is the model)."""
    return Path(os.path.realpath(os.fspath(path)))


def _labelled(protected: Mapping[str | os.PathLike, str] | Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``[(path, label)]`` from ``{path: "the input model"}`` or a plain list of paths (label: "a protected path")."""
    if isinstance(protected, (str, os.PathLike)):
        protected = [protected]
    if isinstance(protected, Mapping):
        pairs = [(Path(p), str(label)) for p, label in protected.items()]
    else:
        pairs = [(Path(p), "a protected path") for p in protected]
    for p, label in pairs:
        if not os.fspath(p).strip():
            raise WriterError(f"protected path for {label} is empty")
    return pairs


def _check_output_path(out_dir: str | os.PathLike, protected: list[tuple[Path, str]]) -> None:
    """Refusals that need no disk access but a stat: an empty path (it would mean the cwd), a non-directory,
    an output that is itself a protected path (the model directory, the calibration file)."""
    if not os.fspath(out_dir).strip():
        raise WriterError(
            "output path is empty: give a dedicated output directory (an empty path would be the current directory)"
        )
    path = Path(out_dir)
    real = _real(path)
    for p, label in protected:
        if real == _real(p):
            raise WriterError(f"output {path} is {label} ({p}); choose another output directory")
    if path.exists() and not path.is_dir():
        raise WriterError(f"output {path} exists and is not a directory")


def _removal_refusal(out_dir: Path, protected: list[tuple[Path, str]]) -> str | None:
    """Why nothing may be removed from `out_dir`, or None: it is, contains or lies inside a protected path; it is or
    contains the current directory or the home directory; it is a filesystem root."""
    real = _real(out_dir)
    for p, label in protected:
        rp = _real(p)
        if real == rp:
            return f"it is {label} ({p})"
        if rp.is_relative_to(real):
            return f"it contains {label} ({p})"
        if real.is_relative_to(rp):
            return f"it is inside {label} ({p})"
    if real == Path(real.anchor):
        return "it is a filesystem root"
    places = []
    with contextlib.suppress(OSError):  # a deleted cwd cannot be inside the output
        places.append(("the current directory", Path.cwd()))
    with contextlib.suppress(RuntimeError, KeyError):  # no HOME and no passwd entry: no home to protect
        places.append(("the home directory", Path.home()))
    for label, place in places:
        rp = _real(place)
        if real == rp:
            return f"it is {label}"
        if rp.is_relative_to(real):
            return f"it contains {label} ({rp})"
    return None


# ---- the writer -------------------------------------------------------------------------------------------------


class CheckpointWriter:
    """Writes a safetensors checkpoint unit by unit into `out_dir`; see the module docstring.

    `run_id` identifies what is being written (the engine passes a hash of recipe and input checkpoint); a resumed
    run must present the same one. `protected`: paths this run reads (``{model_dir: "the input model",
    calibration_file: "the calibration data"}`` or a list): the output may not be one, and overwrite removes
    nothing in an output that is, contains or lies inside one. `own_files`: names (``x`` or ``dir/x``) the caller
    itself writes into the output (a score cache, report files written after finalize): overwrite removes them too.

    The writer holds ``blockprune.lock`` in `out_dir` from construction to `finalize` or `close` (also released
    when the object is collected or the interpreter exits); use it as a context manager in library code.
    ``total_size``: tensor bytes of all committed units (the index's total_size); ``bytes_written``: shard-file
    bytes written by this object (units committed by an earlier process excluded).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        resume: bool = False,
        run_id: str | None = None,
        protected: Mapping[str | os.PathLike, str] | Iterable[str | os.PathLike] = (),
        own_files: Iterable[str] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)
        self.run_id = run_id
        self.bytes_written = 0
        self._manifest: dict[str, Any] = {}
        self._units: dict[str, dict[str, Any]] = {}
        self._owner: dict[str, str] = {}  # tensor name -> unit
        self._measurements: dict[str, dict] = {}  # unit -> measurements (blockprune_measurements.json)
        self._protected = _labelled(protected)
        self._own_files = self._check_own_files(own_files)
        self._closed = False
        _check_output_path(out_dir, self._protected)
        self._lock = OutputLock(self.out_dir)
        self._release = weakref.finalize(self, self._lock.release)
        try:
            self._refuse_foreign(self._entries(), overwrite, resume)  # read-only: a foreign directory stays untouched
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            if resume and (self.out_dir / MANIFEST_NAME).is_file():
                self._resume(overwrite)
            else:
                self._start(overwrite, resume)
        except BaseException as e:
            self._release()
            if isinstance(e, LockError):
                raise WriterError(str(e)) from None
            if isinstance(e, _IO_ERRORS):
                raise WriterError(_io_message(e, f"while opening output {self.out_dir}")) from e
            raise

    # ---- public API -------------------------------------------------------------------------------------------

    @property
    def total_size(self) -> int:
        """Sum of the tensor bytes of all committed units."""
        return sum(u["nbytes"] for u in self._manifest["units"])

    def committed_units(self) -> list[str]:
        """Committed unit names, in commit order."""
        return [u["name"] for u in self._manifest["units"]]

    def is_committed(self, unit: str) -> bool:
        return unit in self._units

    def unit_metadata(self, unit: str) -> dict:
        """The `metadata` stored with `unit` (a JSON round-tripped copy)."""
        return json.loads(json.dumps(self._unit(unit)["metadata"]))

    def unit_measurements(self, unit: str) -> dict:
        """The `measurements` stored with `unit` ({} if none were given, or if a kill lost them: they are not
        part of the commit's guarantees)."""
        self._unit(unit)
        return json.loads(json.dumps(self._measurements.get(unit, {})))

    def read_unit(self, unit: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of a committed unit, read back from its shards, in sorted name order."""
        out: dict[str, torch.Tensor] = {}
        for shard in self._unit(unit)["shards"]:
            path = self._shard_path(shard["file"])
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in shard["tensors"]:
                    out[name] = f.get_tensor(name)
        return dict(sorted(out.items()))

    def write_unit(
        self,
        unit: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: dict | None = None,
        *,
        measurements: dict | None = None,
    ) -> None:
        """Write `tensors` into shards of their own and commit `unit` with `metadata` in the manifest.

        `metadata` must be deterministic (same work, same bytes: it is part of the byte-identical manifest);
        values that differ between runs of the same work (timings, memory) go in `measurements`, kept in
        blockprune_measurements.json. On any failure, KeyboardInterrupt included, the unit's files are removed
        unless the manifest on disk already commits it; the manifest keeps a valid content either way."""
        self._check_unit(unit, tensors)
        meta = self._check_metadata(unit, metadata, "metadata")
        meas = None if measurements is None else self._check_metadata(unit, measurements, "measurements")
        self._require_lock(f"write unit {unit!r}")
        sizes = [(name, _tensor_nbytes(tensors[name])) for name in sorted(tensors)]
        seq = len(self._manifest["units"])
        created: list[Path] = []
        pending: dict[str, Any] = {}
        try:
            shards = [
                self._write_shard(seq, k, names, tensors, created)
                for k, names in enumerate(plan_shards(sizes, self.max_shard_size))
            ]
            entry = {"name": unit, "nbytes": sum(n for _, n in sizes), "shards": shards, "metadata": meta}
            self._commit(entry, meas, pending)
        except BaseException as e:
            if not self._committed_after_failure(unit, pending):
                for path in created:
                    path.unlink(missing_ok=True)
            if isinstance(e, _IO_ERRORS):
                raise WriterError(_io_message(e, f"while writing unit {unit!r} to {self.out_dir}")) from e
            raise
        logger.info(
            "committed unit %r: %d tensors, %d shard(s), %d bytes", unit, len(sizes), len(shards), entry["nbytes"]
        )

    def finalize(
        self,
        config: dict,
        *,
        source_dir: str | os.PathLike | None = None,
        extra_files: Mapping[str, str | bytes] | None = None,
        index_metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Turn the committed units into an HF checkpoint; returns `out_dir`. Resumable and idempotent.
        `index_metadata`: further keys of the index's ``metadata`` (e.g. ``total_parameters``, as transformers
        writes it), JSON, never ``total_size`` (the writer's).

        Order: record the rename plan and the names of the files about to be written in the manifest; rename parts
        to ``model-0000i-of-0000N.safetensors``; write config.json, the SOURCE_FILES found in `source_dir` (JSON
        ones without their ``auto_map``), `extra_files` (``name`` or ``dir/name``); then the index (commit point);
        then ``finalized: true`` in the manifest. Then the output lock is released (a later call takes it again)."""
        extra = dict(extra_files or {})
        meta = dict(index_metadata or {})
        self._check_finalizable(config, extra, source_dir)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise WriterError(f"index metadata for {self.out_dir / INDEX_NAME} is not JSON: {e}") from e
        if "total_size" in meta:
            raise WriterError("index metadata: `total_size` is the writer's own key")
        self._require_lock("finalize")
        src = Path(source_dir) if source_dir is not None else None
        try:
            copies = [n for n in SOURCE_FILES if n not in extra and src is not None and (src / n).is_file()]
            plan = self._record_finalize_plan([CONFIG_NAME, *copies, *extra, INDEX_NAME])
            self._apply_renames(plan)
            atomic_write(self.out_dir / CONFIG_NAME, _json_bytes(config, sort_keys=True))
            for name in copies:
                assert src is not None  # copies come from source_dir
                atomic_write(self.out_dir / name, _without_auto_map(src / name))
                logger.debug("copied %s", src / name)
            for name, content in sorted(extra.items()):
                self._write_extra(name, content.encode() if isinstance(content, str) else bytes(content))
            atomic_write(self.out_dir / INDEX_NAME, _json_bytes(self._index(dict(plan), meta), sort_keys=True))
            self._save_manifest({**self._manifest, "finalized": True})
        except _IO_ERRORS as e:
            raise WriterError(_io_message(e, f"while finalizing {self.out_dir}")) from e
        self._lock.release()
        logger.info("finalized %s: %d shard(s), %d bytes of tensors", self.out_dir, len(plan), self.total_size)
        return self.out_dir

    def close(self) -> None:
        """Release the output lock; this object writes no more. Idempotent. Runs by itself when the object is
        garbage collected or the interpreter exits, but not on SIGKILL (the next run takes the stale lock over)."""
        self._closed = True
        self._release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- opening: new run or resume -------------------------------------------------------------------------

    def _entries(self) -> list[Path]:
        """The directory's entries, sorted, without the lock's files (``blockprune.lock*``: another run's or ours;
        only `sharding.lock` manages them)."""
        if not self.out_dir.is_dir():
            return []
        return sorted(p for p in self.out_dir.iterdir() if not p.name.startswith(LOCK_NAME))

    def _refuse_foreign(self, entries: list[Path], overwrite: bool, resume: bool) -> None:
        """Refuse a non-empty directory that is not ours to take: without a manifest it is not a blockprune output
        (overwrite included: nothing is removed); with one, only resume or overwrite may touch it."""
        if not entries:
            return
        d = self.out_dir
        what = f"not empty ({len(entries)} entries, e.g. {entries[0].name!r})"
        if any(p.name == MANIFEST_NAME for p in entries):
            if not (d / MANIFEST_NAME).is_file():
                raise WriterError(f"{d / MANIFEST_NAME} is not a regular file; choose another output directory")
            if overwrite or resume:
                return
            raise WriterError(
                f"output directory {d} is {what}; pass overwrite=True to replace it or resume=True to "
                "continue the run written there"
            )
        if (resume or overwrite) and all(p.is_file() and _is_our_temp(p.name, set()) for p in entries):
            return  # a run killed before its first manifest left only temporaries
        if overwrite:
            raise WriterError(
                f"refusing to overwrite {d}: it is {what} and holds no {MANIFEST_NAME}, so it is not a "
                "blockprune output; nothing was removed. Choose another output directory"
            )
        if resume:
            raise WriterError(
                f"cannot resume: output directory {d} is {what} but holds no {MANIFEST_NAME}; choose another "
                "output directory"
            )
        raise WriterError(f"output directory {d} is {what} and is not a blockprune output; choose another one")

    def _start(self, overwrite: bool, resume: bool) -> None:
        """New run: `out_dir` is empty, holds only our temporaries, or (overwrite) is a blockprune output whose
        files are removed first."""
        d = self.out_dir
        entries = self._entries()
        self._refuse_foreign(entries, overwrite, resume)
        if entries:
            self._clear(entries, overwrite)
        self._manifest = _new_manifest(self.run_id, self.max_shard_size)
        atomic_write(d / MANIFEST_NAME, _json_bytes(self._manifest))
        self._units, self._owner, self._measurements = {}, {}, {}
        logger.info("writing a new checkpoint to %s (max shard size %d bytes)", d, self.max_shard_size)

    def _clear(self, entries: list[Path], overwrite: bool) -> None:
        """Remove the files we can prove are ours: names the old manifest lists (shards, finalize's files, the
        measurements), part files and our temporaries, `own_files`. Anything else stays (logged). The old manifest
        is not removed but replaced by the new one, so the directory is recognisable at every moment."""
        d = self.out_dir
        if overwrite:
            why = _removal_refusal(d, self._protected)
            if why is not None:
                raise WriterError(f"refusing to overwrite {d}: {why}; nothing was removed")
        ours = set(self._own_files)
        if (d / MANIFEST_NAME).is_file():
            ours |= _manifest_names(self._manifest_for_clearing())
        remove: list[Path] = []
        kept: list[Path] = []
        for p in entries:
            if not overwrite:  # a new run over a kill before the first manifest: only our temporaries go
                (remove if p.is_file() and _is_our_temp(p.name, set()) else kept).append(p)
                continue
            if p.is_dir() and not p.is_symlink():
                inner = {n.split("/", 1)[1] for n in ours if n.startswith(p.name + "/")}
                for q in sorted(p.iterdir()) if inner else []:
                    (remove if q.name in inner or _is_our_temp(q.name, inner) else kept).append(q)
                if not inner:
                    kept.append(p)
            elif p.name != MANIFEST_NAME:
                (remove if p.name in ours or _PART_RE.fullmatch(p.name) or _is_our_temp(p.name, ours) else kept).append(
                    p
                )
        for p in remove:
            if p.is_dir() and not p.is_symlink():
                kept.append(p)
                continue
            logger.warning("overwrite: removing %s", p)
            p.unlink(missing_ok=True)
        for sub in {p.parent for p in remove if p.parent != d}:
            with contextlib.suppress(OSError):
                sub.rmdir()  # only if we emptied it: rmdir refuses a non-empty directory
        if kept:
            names = ", ".join(repr(str(Path(p).relative_to(d))) for p in kept[:5])
            logger.warning("overwrite %s: kept %d entries blockprune did not write: %s", d, len(kept), names)

    def _manifest_for_clearing(self) -> dict[str, Any]:
        """The old manifest, validated; refuse to clear when it cannot say which files are ours."""
        path = self.out_dir / MANIFEST_NAME
        problem: str | None
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"it is not valid JSON ({e})"
        else:
            problem = (
                f"it is not a version-{MANIFEST_VERSION} blockprune manifest"
                if not isinstance(manifest, dict)
                or manifest.get("format") != MANIFEST_FORMAT
                or manifest.get("version") != MANIFEST_VERSION
                else _manifest_problem(manifest)
            )
        if problem is None:
            return manifest
        raise WriterError(
            f"refusing to overwrite {self.out_dir}: its {MANIFEST_NAME} cannot tell which files are ours ({problem}); "
            "nothing was removed. Choose another output directory or empty this one yourself"
        )

    def _resume(self, overwrite: bool) -> None:
        """Load and verify the manifest; with `overwrite`, anything unusable means a new run instead of an error."""
        try:
            manifest = self._load_manifest()
            self._verify_shards(manifest)
        except WriterError as e:
            if not overwrite:
                raise
            logger.warning("%s; overwrite=True: starting a new run", e)
            self._start(overwrite=True, resume=True)
            return
        self._manifest = manifest
        self._units = {u["name"]: u for u in manifest["units"]}
        self._owner = {t: u["name"] for u in manifest["units"] for s in u["shards"] for t in s["tensors"]}
        self._measurements = self._load_measurements()
        if manifest["max_shard_size"] != self.max_shard_size:
            logger.warning(
                "resuming %s with max_shard_size %d; it was written with %d",
                self.out_dir,
                self.max_shard_size,
                manifest["max_shard_size"],
            )
        self._remove_strays()
        logger.info(
            "resuming %s: %d unit(s) committed%s",
            self.out_dir,
            len(self._units),
            ", finalize in progress" if manifest["finalize"] else "",
        )

    def _load_manifest(self) -> dict[str, Any]:
        path = self.out_dir / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise WriterError(f"manifest {path} is not valid JSON ({e}); use a new output or overwrite") from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise WriterError(f"{path} is not a blockprune writer manifest; use a new output or overwrite")
        if manifest.get("version") != MANIFEST_VERSION:
            raise WriterError(
                f"manifest {path} has version {manifest.get('version')!r}; this writer reads version {MANIFEST_VERSION}"
            )
        problem = _manifest_problem(manifest)
        if problem is not None:
            raise WriterError(f"manifest {path} is malformed: {problem}; use a new output")
        if manifest.get("run_id") != self.run_id:
            raise WriterError(
                f"output {self.out_dir} was written by a different recipe or input checkpoint (run id "
                f"{manifest.get('run_id')!r}, this run {self.run_id!r}); use a new output or overwrite"
            )
        return manifest

    def _load_measurements(self) -> dict[str, dict]:
        """Measurements of committed units; a missing or unreadable file only loses them (logged)."""
        path = self.out_dir / MEASUREMENTS_NAME
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError) as e:
            logger.warning("ignoring unreadable %s (%s)", path, e)
            return {}
        units = doc.get("units") if isinstance(doc, dict) and doc.get("format") == MEASUREMENTS_FORMAT else None
        if not isinstance(units, dict):
            logger.warning("ignoring %s: not a %s file", path, MEASUREMENTS_FORMAT)
            return {}
        return {k: v for k, v in units.items() if k in self._units and isinstance(v, dict)}

    def _verify_shards(self, manifest: dict[str, Any]) -> None:
        """Every committed shard exists (under its part or final name) with the recorded size and sha256."""
        for unit in manifest["units"]:
            for shard in unit["shards"]:
                path = _resolve_shard(self.out_dir, manifest, shard["file"])
                where = f"committed shard {path} of unit {unit['name']!r}"
                if not path.is_file():
                    raise WriterError(f"{where} is missing; use a new output or overwrite")
                size, digest = _hash_file(path)
                if size != shard["size"]:
                    raise WriterError(
                        f"{where} has {size} bytes, the manifest says {shard['size']} (truncated or "
                        "replaced); use a new output or overwrite"
                    )
                if digest != shard["sha256"]:
                    raise WriterError(
                        f"{where} does not match its sha256 in the manifest (modified after it was "
                        "written); use a new output or overwrite"
                    )

    def _remove_strays(self) -> None:
        """Remove our temporaries and part files that no committed unit references (a unit killed before commit)."""
        referenced = {s["file"] for u in self._manifest["units"] for s in u["shards"]}
        ours = _manifest_names(self._manifest) | set(self._own_files)
        for p in self._entries():
            stray = _is_our_temp(p.name, ours) or (_PART_RE.fullmatch(p.name) and p.name not in referenced)
            if stray and p.is_file():
                logger.info("resume: removing uncommitted file %s", p)
                p.unlink()

    # ---- writing units ----------------------------------------------------------------------------------------

    def _require_lock(self, what: str) -> None:
        """The lock must be ours before any write: re-taken after finalize released it; refused after close()
        or when a newer writer of this process took it over."""
        if self._closed:
            raise WriterError(f"cannot {what}: the writer of {self.out_dir} is closed")
        try:
            if self._lock.lost_to is not None:
                self._lock.check()
            self._lock.acquire()
        except LockError as e:
            raise WriterError(f"cannot {what}: {e}") from None

    def _unit(self, unit: str) -> dict[str, Any]:
        if unit not in self._units:
            raise WriterError(f"unit {unit!r} is not committed in {self.out_dir}")
        return self._units[unit]

    def _check_unit(self, unit: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse before any byte is written: finalizing, a committed unit, a tensor name seen before, bad tensors."""
        if self._manifest["finalize"] is not None:
            raise WriterError(f"cannot write unit {unit!r}: {self.out_dir} is finalized or being finalized")
        if unit in self._units:
            raise WriterError(f"unit {unit!r} is already committed in {self.out_dir}")
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise WriterError(f"unit {unit!r}: tensor names must be non-empty strings, got {name!r}")
            if name in self._owner:
                raise WriterError(f"unit {unit!r}: tensor {name!r} was already written by unit {self._owner[name]!r}")
            if not isinstance(t, torch.Tensor):
                raise WriterError(f"unit {unit!r}: tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.is_meta or t.layout != torch.strided:
                raise WriterError(
                    f"unit {unit!r}: tensor {name!r} has no dense data (device {t.device}, layout {t.layout})"
                )

    @staticmethod
    def _check_metadata(unit: str, metadata: dict | None, what: str) -> dict:
        """The JSON round-trip of `metadata`, so a resumed run sees exactly what an uninterrupted one holds."""
        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise WriterError(f"unit {unit!r}: {what} must be a dict, got {type(metadata).__name__}")
        try:
            return json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            raise WriterError(f"unit {unit!r}: {what} is not JSON-serialisable: {e}") from e

    @staticmethod
    def _check_own_files(own_files: Iterable[str]) -> tuple[str, ...]:
        names = (own_files,) if isinstance(own_files, str) else tuple(own_files)
        for name in names:
            problem = _name_problem(name)
            if problem is not None:
                raise WriterError(f"own_files entry {name!r} is {problem}")
        return names

    def _write_shard(
        self, seq: int, k: int, names: list[str], tensors: Mapping[str, torch.Tensor], created: list[Path]
    ) -> dict[str, Any]:
        """Write one shard as ``.tmp``, fsync, rename, fsync the directory; return its manifest entry."""
        name = f"{PART_PREFIX}{seq:05d}-{k:03d}.safetensors"
        final, tmp = self.out_dir / name, self.out_dir / (name + TMP_SUFFIX)
        created += [tmp, final]
        cpu = {n: _cpu_copy(tensors[n]) for n in names}  # one shard of copies at a time
        save_file(cpu, str(tmp), metadata=SHARD_METADATA)
        del cpu
        size, digest = _fsync_and_hash(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        self.bytes_written += size
        logger.debug("wrote %s: %d tensors, %d bytes", final, len(names), size)
        return {
            "file": name,
            "size": size,
            "sha256": digest,
            "tensor_bytes": sum(_tensor_nbytes(tensors[n]) for n in names),
            "tensors": names,
        }

    def _commit(self, entry: dict[str, Any], measurements: dict | None, pending: dict[str, Any]) -> None:
        """Rewrite the manifest with `entry` appended; the rename of the manifest is the unit's commit point.

        The measurements file is replaced first (an entry of an uncommitted unit in it is ignored on resume). The
        renames and the in-memory registration run with SIGINT/SIGTERM deferred (main thread), so an interrupt
        cannot land between the commit on disk and the object's knowledge of it; `pending` tells the caller's
        cleanup which manifest bytes may be on disk (the cleanup must be right without the deferral too)."""
        d = self.out_dir
        manifest = {**self._manifest, "units": [*self._manifest["units"], entry]}
        meas = None if measurements is None else {**self._measurements, entry["name"]: measurements}
        pending.update(data=_json_bytes(manifest), manifest=manifest, entry=entry, measurements=meas)
        with deferred_signals():
            if meas is not None:
                doc = {"format": MEASUREMENTS_FORMAT, "version": MANIFEST_VERSION, "units": meas}
                _replace_with(d / MEASUREMENTS_NAME, _json_bytes(doc))
            _replace_with(d / MANIFEST_NAME, pending["data"])
            self._register(manifest, entry, meas)
        _fsync_dir(d)

    def _register(self, manifest: dict[str, Any], entry: dict[str, Any], measurements: dict | None) -> None:
        """Make this object agree with a manifest that commits `entry`. Idempotent: an interrupted call is redone."""
        self._manifest = manifest
        self._units[entry["name"]] = entry
        self._owner.update({t: entry["name"] for s in entry["shards"] for t in s["tensors"]})
        if measurements is not None:
            self._measurements = measurements

    def _committed_after_failure(self, unit: str, pending: dict[str, Any]) -> bool:
        """Whether `unit` is committed although its write raised: the object knows it, or the manifest on disk holds
        exactly the bytes that commit it (then the object is brought up to date). If the manifest cannot be read
        we cannot tell, and keep the files: a resume removes unreferenced parts anyway."""
        if unit in self._units:
            return True
        if not pending:
            return False  # the manifest rename was never attempted
        try:
            on_disk = (self.out_dir / MANIFEST_NAME).read_bytes()
        except OSError as e:
            logger.warning("cannot read the manifest after a failed commit of %r (%s): keeping its files", unit, e)
            return True
        if on_disk != pending["data"]:
            return False
        self._register(pending["manifest"], pending["entry"], pending["measurements"])
        logger.info("unit %r was committed on disk before the interruption; its files are kept", unit)
        return True

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.out_dir / MANIFEST_NAME, _json_bytes(manifest))
        self._manifest = manifest

    # ---- finalize -------------------------------------------------------------------------------------------

    def _check_finalizable(
        self, config: dict, extra: dict[str, str | bytes], source_dir: str | os.PathLike | None
    ) -> None:
        if not any(u["shards"] for u in self._manifest["units"]):
            raise WriterError(f"nothing to finalize: no tensors were written to {self.out_dir}")
        try:
            json.dumps(config)
        except (TypeError, ValueError) as e:
            raise WriterError(f"config for {self.out_dir / CONFIG_NAME} is not JSON-serialisable: {e}") from e
        dirs = {name.split("/")[0] for name in extra if isinstance(name, str) and "/" in name}
        for name, content in extra.items():
            if _name_problem(name) is not None or _is_reserved(name) or name in dirs:
                raise WriterError(
                    f"extra file name {name!r} is not allowed (a plain file name, or dir/name, that is not "
                    "config.json, the index, the manifest, the lock or a shard)"
                )
            if not isinstance(content, (str, bytes, bytearray)):
                raise WriterError(f"extra file {name!r}: content must be str or bytes, got {type(content).__name__}")
        for sub in dirs:
            p = self.out_dir / sub
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                raise WriterError(f"extra files under {sub}/: {p} exists and is not a directory of this output")
        if source_dir is not None and not Path(source_dir).is_dir():
            raise WriterError(f"source_dir {source_dir} is not a directory")

    def _record_finalize_plan(self, files: list[str]) -> list[tuple[str, str]]:
        """Part -> final name, in unit commit order, and the names of the files finalize writes; stored in the
        manifest before the first rename or write (so overwrite can later remove exactly those files)."""
        fin = self._manifest["finalize"]
        if fin is None:
            parts = [s["file"] for u in self._manifest["units"] for s in u["shards"]]
            n = len(parts)
            single = ["model.safetensors"]
            finals = single if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
            fin = {"renames": [list(r) for r in zip(parts, finals)], "files": sorted(set(files))}
            self._save_manifest({**self._manifest, "finalize": fin})
        elif not set(files) <= set(fin.get("files", [])):  # a resumed finalize with more files than recorded
            fin = {**fin, "files": sorted(set(fin.get("files", [])) | set(files))}
            self._save_manifest({**self._manifest, "finalize": fin})
        return [tuple(r) for r in fin["renames"]]

    def _apply_renames(self, plan: list[tuple[str, str]]) -> None:
        """Rename each part still under its part name; one already under its final name was renamed before a kill."""
        for part, final in plan:
            src, dst = self.out_dir / part, self.out_dir / final
            if src.is_file():
                os.replace(src, dst)
            elif not dst.is_file():
                raise WriterError(f"shard {part} (final name {final}) is missing from {self.out_dir}")
        _fsync_dir(self.out_dir)

    def _write_extra(self, name: str, data: bytes) -> None:
        path = self.out_dir / name
        if path.parent != self.out_dir and not path.parent.is_dir():
            path.parent.mkdir()
            _fsync_dir(self.out_dir)
        atomic_write(path, data)

    def _shard_path(self, part: str) -> Path:
        return _resolve_shard(self.out_dir, self._manifest, part)

    def _index(self, renames: dict[str, str], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"metadata": {"total_size": ..., **metadata}, "weight_map": {tensor: file}}`` as transformers writes it."""
        weight_map = {t: renames[s["file"]] for u in self._manifest["units"] for s in u["shards"] for t in s["tensors"]}
        meta = {**dict(metadata or {}), "total_size": self.total_size}
        return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
