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
sorted name order), file names depend only on the commit order, and the manifest holds no timestamps or paths.
The on-disk layout, manifest schema and resume rules are in ``docs/formats-writer.md``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sharding.errors import BlockpruneError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "blockprune_manifest.json"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "blockprune-writer-manifest"
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
    return f"{_ERRNO_KIND.get(code, 'I/O error')} {where}: {reason}"


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


def _is_temp_name(name: str) -> bool:
    """Our ``*.tmp`` files and safetensors' own ``.tmpXXXXXX`` files (it writes to one and renames)."""
    return name.endswith(TMP_SUFFIX) or name.startswith(".tmp")


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


class CheckpointWriter:
    """Writes a safetensors checkpoint unit by unit into `out_dir`; see the module docstring.

    `run_id` identifies what is being written (the engine passes a hash of recipe and input checkpoint); a resumed
    run must present the same one. ``total_size``: tensor bytes of all committed units (the index's total_size);
    ``bytes_written``: shard-file bytes written by this object (units committed by an earlier process excluded).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        resume: bool = False,
        run_id: str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)
        self.run_id = run_id
        self.bytes_written = 0
        self._manifest: dict[str, Any] = {}
        self._units: dict[str, dict[str, Any]] = {}
        self._owner: dict[str, str] = {}  # tensor name -> unit
        try:
            if resume and (self.out_dir / MANIFEST_NAME).is_file():
                self._resume(overwrite)
            else:
                self._start(overwrite, resume)
        except _IO_ERRORS as e:
            raise WriterError(_io_message(e, f"while opening output {self.out_dir}")) from e

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

    def read_unit(self, unit: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of a committed unit, read back from its shards, in sorted name order."""
        out: dict[str, torch.Tensor] = {}
        for shard in self._unit(unit)["shards"]:
            path = self._shard_path(shard["file"])
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in shard["tensors"]:
                    out[name] = f.get_tensor(name)
        return dict(sorted(out.items()))

    def write_unit(self, unit: str, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
        """Write `tensors` into shards of their own and commit `unit` with `metadata` in the manifest.

        On any failure the unit's files are removed and the manifest keeps its previous, valid content."""
        self._check_unit(unit, tensors)
        meta = self._check_metadata(unit, metadata)
        sizes = [(name, _tensor_nbytes(tensors[name])) for name in sorted(tensors)]
        seq, created = len(self._manifest["units"]), []
        try:
            shards = [
                self._write_shard(seq, k, names, tensors, created)
                for k, names in enumerate(plan_shards(sizes, self.max_shard_size))
            ]
            entry = {"name": unit, "nbytes": sum(n for _, n in sizes), "shards": shards, "metadata": meta}
            self._commit(entry)
        except BaseException as e:
            if not self.is_committed(unit):  # a failed directory fsync after the commit keeps the unit
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
    ) -> Path:
        """Turn the committed units into an HF checkpoint; returns `out_dir`. Resumable and idempotent.

        Order: record the rename plan in the manifest; rename parts to ``model-0000i-of-0000N.safetensors``;
        write config.json, the SOURCE_FILES found in `source_dir`, `extra_files`; then the index (commit point);
        then ``finalized: true`` in the manifest."""
        extra = dict(extra_files or {})
        self._check_finalizable(config, extra, source_dir)
        try:
            plan = self._record_rename_plan()
            self._apply_renames(plan)
            atomic_write(self.out_dir / CONFIG_NAME, _json_bytes(config, sort_keys=True))
            self._copy_source_files(Path(source_dir) if source_dir is not None else None, skip=set(extra))
            for name, content in sorted(extra.items()):
                atomic_write(self.out_dir / name, content.encode() if isinstance(content, str) else bytes(content))
            atomic_write(self.out_dir / INDEX_NAME, _json_bytes(self._index(dict(plan)), sort_keys=True))
            self._save_manifest({**self._manifest, "finalized": True})
        except _IO_ERRORS as e:
            raise WriterError(_io_message(e, f"while finalizing {self.out_dir}")) from e
        logger.info("finalized %s: %d shard(s), %d bytes of tensors", self.out_dir, len(plan), self.total_size)
        return self.out_dir

    # ---- opening: new run or resume -------------------------------------------------------------------------

    def _start(self, overwrite: bool, resume: bool) -> None:
        """New run: `out_dir` must be empty (or only hold temporaries of a run killed before its first commit)."""
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise WriterError(f"output {d} exists and is not a directory")
        entries = sorted(d.iterdir()) if d.exists() else []
        if entries and not overwrite and not (resume and all(_is_temp_name(p.name) for p in entries)):
            what = f"not empty ({len(entries)} entries, e.g. {entries[0].name!r})"
            if resume:
                raise WriterError(
                    f"cannot resume: output directory {d} is {what} but holds no {MANIFEST_NAME}; "
                    "pass overwrite=True to replace it"
                )
            raise WriterError(
                f"output directory {d} is {what}; pass overwrite=True to replace it or resume=True to "
                "continue the run written there"
            )
        self._clear(entries)
        d.mkdir(parents=True, exist_ok=True)
        self._manifest = _new_manifest(self.run_id, self.max_shard_size)
        atomic_write(d / MANIFEST_NAME, _json_bytes(self._manifest))
        self._units, self._owner = {}, {}
        logger.info("writing a new checkpoint to %s (max shard size %d bytes)", d, self.max_shard_size)

    def _clear(self, entries: list[Path]) -> None:
        d = self.out_dir.resolve()
        if entries and (d == Path(d.anchor) or d == Path.home().resolve()):
            raise WriterError(f"refusing to clear {d}: choose a dedicated output directory")
        for p in entries:
            logger.warning("clearing output: removing %s", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

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
        if manifest.get("run_id") != self.run_id:
            raise WriterError(
                f"output {self.out_dir} was written by a different recipe or input checkpoint (run id "
                f"{manifest.get('run_id')!r}, this run {self.run_id!r}); use a new output or overwrite"
            )
        return manifest

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
        """Remove temporaries and part files that no committed unit references (a unit killed before commit)."""
        referenced = {s["file"] for u in self._manifest["units"] for s in u["shards"]}
        for p in sorted(self.out_dir.iterdir()):
            if p.is_file() and (_is_temp_name(p.name) or (p.name.startswith(PART_PREFIX) and p.name not in referenced)):
                logger.info("resume: removing uncommitted file %s", p)
                p.unlink()

    # ---- writing units ----------------------------------------------------------------------------------------

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
    def _check_metadata(unit: str, metadata: dict | None) -> dict:
        """The JSON round-trip of `metadata`, so a resumed run sees exactly what an uninterrupted one holds."""
        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise WriterError(f"unit {unit!r}: metadata must be a dict, got {type(metadata).__name__}")
        try:
            return json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            raise WriterError(f"unit {unit!r}: metadata is not JSON-serialisable: {e}") from e

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

    def _commit(self, entry: dict[str, Any]) -> None:
        """Rewrite the manifest with `entry` appended; the rename of the manifest is the unit's commit point."""
        manifest = {**self._manifest, "units": [*self._manifest["units"], entry]}
        _replace_with(self.out_dir / MANIFEST_NAME, _json_bytes(manifest))
        self._manifest = manifest
        self._units[entry["name"]] = entry
        self._owner.update({t: entry["name"] for s in entry["shards"] for t in s["tensors"]})
        _fsync_dir(self.out_dir)

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
        reserved = {MANIFEST_NAME, INDEX_NAME, CONFIG_NAME}
        for name, content in extra.items():
            bad = (
                not name
                or "/" in name
                or "\\" in name
                or name.startswith(".")
                or name in reserved
                or name.startswith(PART_PREFIX)
                or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name)
            )
            if bad:
                raise WriterError(
                    f"extra file name {name!r} is not allowed (a plain file name that is not "
                    "config.json, the index, the manifest or a shard)"
                )
            if not isinstance(content, (str, bytes, bytearray)):
                raise WriterError(f"extra file {name!r}: content must be str or bytes, got {type(content).__name__}")
        if source_dir is not None and not Path(source_dir).is_dir():
            raise WriterError(f"source_dir {source_dir} is not a directory")

    def _record_rename_plan(self) -> list[tuple[str, str]]:
        """Part -> final name, in unit commit order; stored in the manifest before the first rename."""
        if self._manifest["finalize"] is not None:
            return [tuple(r) for r in self._manifest["finalize"]["renames"]]
        parts = [s["file"] for u in self._manifest["units"] for s in u["shards"]]
        n = len(parts)
        finals = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        plan = list(zip(parts, finals))
        self._save_manifest({**self._manifest, "finalize": {"renames": [list(r) for r in plan]}})
        return plan

    def _apply_renames(self, plan: list[tuple[str, str]]) -> None:
        """Rename each part still under its part name; one already under its final name was renamed before a kill."""
        for part, final in plan:
            src, dst = self.out_dir / part, self.out_dir / final
            if src.is_file():
                os.replace(src, dst)
            elif not dst.is_file():
                raise WriterError(f"shard {part} (final name {final}) is missing from {self.out_dir}")
        _fsync_dir(self.out_dir)

    def _shard_path(self, part: str) -> Path:
        return _resolve_shard(self.out_dir, self._manifest, part)

    def _index(self, renames: dict[str, str]) -> dict[str, Any]:
        """``{"metadata": {"total_size": ...}, "weight_map": {tensor: file}}`` as transformers writes it."""
        weight_map = {t: renames[s["file"]] for u in self._manifest["units"] for s in u["shards"] for t in s["tensors"]}
        return {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}

    def _copy_source_files(self, source_dir: Path | None, skip: set[str]) -> None:
        if source_dir is None:
            return
        for name in SOURCE_FILES:
            src = source_dir / name
            if name not in skip and src.is_file():
                atomic_write(self.out_dir / name, src.read_bytes())
                logger.debug("copied %s", src)
