"""`blockprune inspect CKPT`: shapes and sparsity per layer, and shard verification against the writer's manifest.

The checkpoint is validated by `sharding.CheckpointReader` first (every header, the index); its CheckpointError
propagates. Tensors are then read one layer at a time (a decoder block `model.layers.N.`, then everything else:
embeddings, final norm, lm_head), so memory stays bounded by the largest layer. Per layer and in total:

    params   = Σ numel(t)              nonzero  = Σ count_nonzero(t)          sparsity = 1 − nonzero / params
    bytes    = Σ numel(t) · itemsize   linear_sparsity = the same over the layer's 2-D tensors (its linears)

Sparsity metadata: when config.json has a `sparsity_config` (engine/report/card.py, compressed-tensors' fields)
whose `sparsity_structure` is "N:M", every 2-D weight its `targets` / `ignore` select is checked as it is read:
`nm_violations` = the groups of M consecutive inputs of a row with more than N nonzeros. Any violation makes `ok`
False (the metadata claims a pattern the weights break, e.g. after a LoRA merge); a `global_sparsity` that differs
from the measured one by more than 0.001 is a note.

Verification (`verify=True`): the SHA-256 of every shard. When `blockprune_manifest.json` (sharding.writer) is
present, each shard's size and digest must equal the manifest's record of it; the manifest records shards under
their part names (`blockprune-part-*.safetensors`) and, once finalized, `finalize.renames` maps those to the final
names (`model-0000i-of-0000N.safetensors`). A mismatch, a shard missing from the checkpoint or one the manifest
does not record makes `ok` False and is listed in `verification.problems`. Without a manifest the digests are
only reported.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.arch import adapter_for
from engine.report.card import SPARSITY_KEY, count_nonzero, module_selected, nm_violations, parse_nm  # noqa: F401
from sharding.reader import SAFETENSORS_INDEX, CheckpointReader
from sharding.writer import MANIFEST_NAME

log = logging.getLogger(__name__)

OTHER_LAYER = "other"
_LAYER_RE = re.compile(r"^(model\.layers\.(\d+)\.)")


def inspect_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Inspect the checkpoint directory `path`; returns a JSON-serialisable dict.

    Keys: `path`, `format`, `model_type`, `arch_supported`, `files` (shard names), `layers` (list of
    {name, prefix, params, nonzero, bytes, sparsity, linear_params, linear_nonzero, linear_sparsity,
    tensors: [{name, shape, dtype, params, nonzero, sparsity}]}), `totals` ({tensors, params, nonzero, bytes,
    sparsity}), `verification` (None when `verify` is False, else {manifest, files: [{file, size, sha256,
    expected_sha256, status}], problems, notes}) and `ok` (False iff verification found a problem).
    Raises CheckpointError when the checkpoint fails validation.
    """
    reader = CheckpointReader(path)
    model_type, supported, groups = _layer_groups(reader)
    claim = _nm_claim(reader.config)
    layers = [_inspect_layer(reader, name, prefix, names, claim) for name, prefix, names in groups]
    verification = verify_shards(reader) if verify else None
    sparsity = _sparsity_check(reader.config, claim, layers)
    info = {
        "path": str(reader.model_dir),
        "format": reader.format,
        "model_type": model_type,
        "arch_supported": supported,
        "files": [_relative(reader, f) for f in reader.files],
        "layers": layers,
        "totals": _totals(layers),
        "verification": verification,
        "sparsity_config": sparsity,
        "ok": (verification is None or not verification["problems"]) and (sparsity is None or sparsity["ok"]),
    }
    return info


# --------------------------------------------------------------------------------------------- sparsity metadata


def _nm_claim(config: dict) -> tuple[int, int, list[str], list[str]] | None:
    """(N, M, targets, ignore) when config.json's `sparsity_config` claims an N:M structure, else None."""
    sc = config.get(SPARSITY_KEY)
    if not isinstance(sc, dict):
        return None
    nm = parse_nm(sc.get("sparsity_structure"))
    if nm is None:
        return None
    targets = list(sc.get("targets") or ["Linear"])  # compressed-tensors: no targets = every layer
    return nm[0], nm[1], targets, list(sc.get("ignore") or [])


def _sparsity_check(config: dict, claim, layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `sparsity_config` of config.json and what the weights say about it (module docstring); None without one."""
    sc = config.get(SPARSITY_KEY)
    if not isinstance(sc, dict):
        return None
    rows = [t for layer in layers for t in layer["tensors"] if "nm_violations" in t]
    params, nonzero = _sum(layers, "params"), _sum(layers, "nonzero")
    measured = _sparsity(params, nonzero)
    notes = []
    claimed = sc.get("global_sparsity")
    if isinstance(claimed, (int, float)) and abs(float(claimed) - measured) > 1e-3:
        notes.append(f"global_sparsity {claimed} in config.json, measured {measured:.6f}")
    out = {
        "config": sc,
        "structure": sc.get("sparsity_structure"),
        "global_sparsity_measured": measured,
        "linears_checked": len(rows),
        "violations": {t["name"]: t["nm_violations"] for t in rows if t["nm_violations"]},
        "notes": notes,
    }
    if claim is not None and not rows:
        notes.append("the sparsity_config targets select no 2-D weight of the checkpoint")
    out["ok"] = not out["violations"]
    return out


# --------------------------------------------------------------------------------------------- layers


def _relative(reader: CheckpointReader, path: Path) -> str:
    """`path` relative to the checkpoint directory (shards always lie inside it)."""
    return path.relative_to(reader.model_dir).as_posix()


def _layer_groups(reader: CheckpointReader) -> tuple[str | None, bool, list[tuple[str, str, list[str]]]]:
    """(model_type, supported, [(layer name, prefix, tensor names)]): blocks in order, then the rest as "other".

    Blocks come from the architecture adapter when the model type is supported; otherwise every distinct
    `model.layers.N.` prefix is a block."""
    names = reader.names()
    model_type = reader.config.get("model_type")
    try:
        adapter = adapter_for(reader.config)
        prefixes, supported = [adapter.block_prefix(i) for i in range(adapter.num_layers)], True
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # unsupported or unusual config: group by name
        log.info("%s: %s; grouping tensors by 'model.layers.N.'", reader.model_dir, e)
        found = {int(m.group(2)): m.group(1) for n in names if (m := _LAYER_RE.match(n))}
        prefixes, supported = [found[i] for i in sorted(found)], False
    groups: list[tuple[str, str, list[str]]] = []
    taken: set[str] = set()
    for prefix in prefixes:
        members = reader.names_with_prefix(prefix)
        if members:
            groups.append((prefix.rstrip("."), prefix, members))
            taken.update(members)
    rest = [n for n in names if n not in taken]
    if rest:
        groups.append((OTHER_LAYER, "", rest))
    return (str(model_type) if model_type is not None else None), supported, groups


def _inspect_layer(reader: CheckpointReader, name: str, prefix: str, names: list[str], claim=None) -> dict[str, Any]:
    """Read the layer's tensors (one layer in memory at a time) and count them; with an N:M `claim`
    ((N, M, targets, ignore)), the violations of every selected 2-D weight."""
    tensors = []
    for tname, t in reader.read(names).items():
        nz = count_nonzero(t)
        row = {
            "name": tname,
            "shape": list(t.shape),
            "dtype": reader.info(tname).dtype,
            "params": t.numel(),
            "nonzero": nz,
            "sparsity": _sparsity(t.numel(), nz),
        }
        module = tname.removesuffix(".weight")
        if claim is not None and t.ndim == 2 and module != tname and "embed_tokens" not in module:
            n, m, targets, ignore = claim
            if module_selected(module, targets, ignore):
                row["nm_violations"], row["nm_groups"] = nm_violations(t, n, m)
        tensors.append(row)
    linears = [t for t in tensors if len(t["shape"]) == 2]  # type: ignore[arg-type]
    params, nonzero = _sum(tensors, "params"), _sum(tensors, "nonzero")
    lin_params, lin_nonzero = _sum(linears, "params"), _sum(linears, "nonzero")
    return {
        "name": name,
        "prefix": prefix,
        "params": params,
        "nonzero": nonzero,
        "bytes": reader.nbytes(names),
        "sparsity": _sparsity(params, nonzero),
        "linear_params": lin_params,
        "linear_nonzero": lin_nonzero,
        "linear_sparsity": _sparsity(lin_params, lin_nonzero),
        "tensors": tensors,
    }


def _sum(rows: Iterable[dict[str, Any]], key: str) -> int:
    return sum(r[key] for r in rows)


def _sparsity(params: int, nonzero: int) -> float:
    return 1.0 - nonzero / params if params else 0.0


def _totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    params, nonzero = _sum(layers, "params"), _sum(layers, "nonzero")
    return {
        "tensors": sum(len(x["tensors"]) for x in layers),
        "params": params,
        "nonzero": nonzero,
        "bytes": _sum(layers, "bytes"),
        "sparsity": _sparsity(params, nonzero),
    }


# --------------------------------------------------------------------------------------------- verification


def verify_shards(reader: CheckpointReader) -> dict[str, Any]:
    """SHA-256 of every shard of `reader`, checked against `blockprune_manifest.json` when present.

    Returns {manifest: bool, files: [{file, size, sha256, expected_sha256, status}], problems: [str],
    notes: [str]}; status is "ok", "mismatch" (size or digest differs), "unrecorded" (the manifest lacks the
    shard) or "unverified" (no manifest). The index's `total_size` must equal the shards' tensor bytes: a problem
    for a blockprune checkpoint (the writer computed it), only a note for others (some hubs' indexes are off)."""
    digests = reader.verify_sha256()
    sizes = {_relative(reader, f): f.stat().st_size for f in reader.files}
    manifest_path = reader.model_dir / MANIFEST_NAME
    problems: list[str] = []
    expected = _manifest_records(manifest_path, problems) if manifest_path.is_file() else None
    files = []
    for name, digest in digests.items():
        row = {"file": name, "size": sizes[name], "sha256": digest, "expected_sha256": None, "status": "unverified"}
        if expected is not None:
            row.update(_check_file(name, sizes[name], digest, expected.get(name), problems))
        files.append(row)
    if expected is not None:
        for name in sorted(set(expected) - set(digests)):
            problems.append(f"{name}: recorded in {MANIFEST_NAME} but not a shard of the checkpoint")
    notes: list[str] = []
    _check_total_size(reader, problems if expected is not None else notes)
    for p in problems + notes:
        log.warning("%s: %s", reader.model_dir, p)
    return {"manifest": expected is not None, "files": files, "problems": problems, "notes": notes}


def _check_file(name: str, size: int, digest: str, record: dict[str, Any] | None, problems: list[str]) -> dict:
    if record is None:
        problems.append(f"{name}: not recorded in {MANIFEST_NAME}")
        return {"status": "unrecorded"}
    out = {"expected_sha256": record["sha256"], "status": "ok"}
    if size != record["size"]:
        problems.append(f"{name}: {size} bytes, {MANIFEST_NAME} records {record['size']}")
        out["status"] = "mismatch"
    elif digest != record["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}… differs from {MANIFEST_NAME}'s {record['sha256'][:16]}…")
        out["status"] = "mismatch"
    return out


def _manifest_records(path: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    """{shard file name as it is now: {size, sha256}} from the writer's manifest; an unreadable manifest is a
    problem (and yields no records)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        renames = dict((manifest.get("finalize") or {}).get("renames", []))
        records = {}
        for unit in manifest["units"]:
            for shard in unit["shards"]:
                part = shard["file"]
                final = part if (path.parent / part).is_file() else renames.get(part, part)
                records[final] = {"size": int(shard["size"]), "sha256": str(shard["sha256"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
        return {}
    if not manifest.get("finalized"):
        problems.append(f"{path.name}: the run that wrote this checkpoint did not finish finalize")
    return records


def _check_total_size(reader: CheckpointReader, problems: list[str]) -> None:
    """The index's `metadata.total_size`, when given, must equal the tensor bytes of the shards."""
    index = reader.model_dir / SAFETENSORS_INDEX
    if reader.format != "safetensors" or not index.is_file():
        return
    try:
        total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
    except (OSError, ValueError, AttributeError):
        return  # the reader parsed it already; a metadata field of another shape is not ours to judge
    if isinstance(total, int) and total != reader.total_bytes:
        problems.append(
            f"{SAFETENSORS_INDEX}: total_size {total} but the shards hold {reader.total_bytes} tensor bytes"
        )


# --------------------------------------------------------------------------------------------- formatting


def format_inspection(info: dict[str, Any]) -> str:
    """A table with one line per layer (params, nonzero, sparsity, linear sparsity, the linears' shapes), the
    totals, then the verification result."""
    arch = info["model_type"] or "unknown model_type"
    lines = [f"checkpoint {info['path']}  ({arch}, {len(info['files'])} {info['format']} file(s))", ""]
    head = f"{'layer':<18} {'params':>13} {'nonzero':>13} {'sparsity':>8} {'lin.sp.':>8}  linears"
    lines += [head, "-" * len(head)]
    for layer in info["layers"]:
        lines.append(_layer_line(layer["name"], layer, compact_linears(layer)))
    t = info["totals"]
    lines.append("-" * len(head))
    lines.append(_layer_line("total", {**t, "linear_sparsity": None}, f"{t['tensors']} tensors, {_mb(t['bytes'])}"))
    lines += ["", *_verification_lines(info["verification"]), *_sparsity_lines(info.get("sparsity_config"))]
    return "\n".join(lines)


def _sparsity_lines(sp: dict[str, Any] | None) -> list[str]:
    if sp is None:
        return []
    head = f"sparsity_config: {sp['structure']}, global_sparsity {sp['config'].get('global_sparsity')} "
    head += f"(measured {sp['global_sparsity_measured']:.6f})"
    lines = [head]
    if sp["linears_checked"]:
        bad = sp["violations"]
        if bad:
            lines.append(f"  FAILED: {len(bad)} of {sp['linears_checked']} linears break {sp['structure']}:")
            lines += [f"    {name}: {n} group(s)" for name, n in list(bad.items())[:20]]
            lines += [f"    ... and {len(bad) - 20} more"] if len(bad) > 20 else []
        else:
            lines.append(f"  OK: {sp['linears_checked']} linears follow {sp['structure']}")
    return lines + [f"  note: {n}" for n in sp["notes"]]


def _layer_line(name: str, row: dict[str, Any], tail: str) -> str:
    lin = "" if row.get("linear_sparsity") is None else f"{row['linear_sparsity']:.4f}"
    return f"{name:<18} {row['params']:>13,} {row['nonzero']:>13,} {row['sparsity']:>8.4f} {lin:>8}  {tail}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def compact_linears(layer: dict[str, Any]) -> str:
    """The layer's 2-D tensors, compactly: names relative to the layer without `.weight`, expert indices folded
    (`mlp.experts.*.w1 64x32 ×8`), names of one parent and shape merged (`self_attn.{q,o}_proj 64x64`)."""
    counts: dict[tuple[str, str, tuple[int, ...]], int] = {}
    for t in layer["tensors"]:
        if len(t["shape"]) != 2:
            continue
        rel = t["name"][len(layer["prefix"]) :].removesuffix(".weight")
        rel = re.sub(r"(^|\.)\d+(?=\.)", r"\1*", rel)
        parent, _, leaf = rel.rpartition(".")
        key = (parent, leaf, tuple(t["shape"]))
        counts[key] = counts.get(key, 0) + 1
    merged: dict[tuple[str, tuple[int, ...], int], list[str]] = {}
    for (parent, leaf, shape), n in counts.items():
        merged.setdefault((parent, shape, n), []).append(leaf)
    parts = []
    for (parent, shape, n), leaves in merged.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        name = f"{parent}.{leaf}" if parent else leaf
        parts.append(f"{name} {'x'.join(map(str, shape))}" + (f" ×{n}" if n > 1 else ""))
    return ", ".join(parts)


def _verification_lines(v: dict[str, Any] | None) -> list[str]:
    if v is None:
        return ["verify: skipped"]
    return [*_result_lines(v), *(f"note: {n}" for n in v.get("notes", []))]


def _result_lines(v: dict[str, Any]) -> list[str]:
    if v["problems"]:
        return [f"verify: FAILED ({len(v['problems'])} problem(s))", *(f"  {p}" for p in v["problems"])]
    if v["manifest"]:
        return [f"verify: OK, {len(v['files'])} shard(s) match the sizes and sha256 in {MANIFEST_NAME}"]
    return [
        f"verify: no {MANIFEST_NAME} to compare with; sha256 of each shard:",
        *(f"  {f['sha256']}  {f['file']}" for f in v["files"]),
    ]
