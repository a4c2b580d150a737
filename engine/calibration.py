"""Calibration token ids: ``[samples, seq_len]`` int64 windows drawn deterministically from a text source.

Sources (detected from the path, see ``docs/calibration.md``):

* a text file (``.txt`` or any other UTF-8 text that is not JSONL): one document;
* a directory of ``.txt`` files, found recursively and read in sorted relative-path order: one document per file;
* JSONL (``.jsonl``, ``.ndjson``, ``.json`` with one object per line): one document per record, taken from the
  ``text_field`` string, or from a chat ``"messages"`` list rendered with ``tokenizer.apply_chat_template``;
* a ``datasets.save_to_disk`` directory (has ``dataset_info.json``, ``state.json`` or ``dataset_dict.json``): one
  document per row, same fields as JSONL (``datasets`` is imported only then).

Sampling rule. Documents are tokenized without special tokens and concatenated into one stream ``s`` with the EOS
id between documents. Reading stops once ``len(s) >= STREAM_FACTOR * samples * w + w`` tokens (``w = seq_len - 1``
when a BOS id is prepended, else ``seq_len``), so a 1 GB file is never read or tokenized whole. The stream is cut
into ``n = len(s) // w`` disjoint slots; with ``g = torch.Generator().manual_seed(seed)`` a shift
``r ~ U{0 .. len(s) - n*w}`` and ``slots = randperm(n, g)[:samples]`` give window ``i = s[r + slots[i]*w : ... + w]``.
Windows never overlap, so ``len(s) >= samples * w`` is required; otherwise a ``CalibrationError`` names the source,
the tokens found and the tokens needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharding.errors import BlockpruneError, CheckpointError

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 18  # longest text piece handed to the tokenizer (a long document is cut at a line/space)
BATCH_CHARS = 1 << 20  # characters tokenized per tokenizer call (short documents are batched)
STREAM_FACTOR = 2  # read until the stream holds this many times the tokens the windows need (plus one window)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
UNSUPPORTED_SUFFIXES = frozenset(
    {
        ".parquet",
        ".arrow",
        ".csv",
        ".tsv",
        ".gz",
        ".bz2",
        ".xz",
        ".zst",
        ".zip",
        ".tar",
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".npy",
        ".npz",
        ".pkl",
        ".pdf",
    }
)
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUPPORTED = "a text file, a directory of .txt files, JSONL, or a datasets.save_to_disk directory"

Documents = Iterator[Iterator[str]]  # documents, each an iterator of text pieces of at most ~CHUNK_CHARS


class CalibrationError(BlockpruneError, ValueError):
    """A calibration source that cannot give the requested windows; the message is one line naming the source."""


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how many ``seq_len``-token windows to draw from it."""

    data: str  # path: text file, directory of .txt, JSONL, or datasets.save_to_disk directory
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    text_field: str = "text"  # JSONL / datasets field holding the text
    add_bos: bool = True  # prepend tokenizer.bos_token_id to each window (if the tokenizer has one)

    def __post_init__(self) -> None:
        if not str(self.data).strip():
            raise CalibrationError("calibration.data is empty: give a file or directory path")
        if self.samples < 1:
            raise CalibrationError(f"calibration.samples must be >= 1, got {self.samples}")
        if self.seq_len < (2 if self.add_bos else 1):
            raise CalibrationError(f"calibration.seq_len must be >= 2 with add_bos, got {self.seq_len}")
        if not self.text_field:
            raise CalibrationError("calibration.text_field is empty")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of the checkpoint in `path`, built from transformers' own classes only.

    ``trust_remote_code=False``: a ``tokenizer_config.json`` whose ``auto_map`` names a custom tokenizer class would
    otherwise make transformers ask on stdin whether to run that code (and wait for an answer); blockprune never
    runs a checkpoint's code. When the stock class its ``tokenizer_class`` names can read the files, that is used;
    else a CheckpointError says what to change."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise CheckpointError(
            f"{path}: its tokenizer is custom code (auto_map in tokenizer_config.json) and blockprune never runs a "
            "checkpoint's code; set tokenizer_class there to a transformers tokenizer that reads its files"
        ) from None


def load_calibration(cfg: CalibrationConfig, tokenizer: Any) -> torch.Tensor:
    """Token ids ``[cfg.samples, cfg.seq_len]`` int64 (BOS first when ``add_bos``), deterministic in ``cfg.seed``.

    ``tokenizer`` is a transformers tokenizer (``__call__`` with ``add_special_tokens``, ``bos_token_id``,
    ``eos_token_id``, and ``apply_chat_template`` for chat records). Raises ``CalibrationError`` on bad input.
    """
    path = Path(cfg.data).expanduser()
    bos = _bos_id(cfg, tokenizer)
    window = cfg.seq_len - (bos is not None)
    needed = cfg.samples * window
    cap = STREAM_FACTOR * needed + window
    fmt, docs = _open_source(path, cfg, tokenizer)
    logger.info("calibration: reading %s (%s), up to %d tokens", path, fmt, cap)
    stream = _tokenize(docs, tokenizer, cap)
    if stream.numel() < needed:
        raise CalibrationError(
            f"{path}: {stream.numel()} tokens found, {needed} needed ({cfg.samples} samples x {window} tokens"
            f"{' + BOS' if bos is not None else ''}); add text or lower calibration.samples / seq_len"
        )
    ids = _sample_windows(stream, cfg.samples, window, cfg.seed)
    if bos is not None:
        ids = torch.cat([torch.full((cfg.samples, 1), bos, dtype=torch.int64), ids], dim=1)
    logger.info(
        "calibration: %d windows of %d tokens from a %d-token stream (seed %d)",
        cfg.samples,
        cfg.seq_len,
        stream.numel(),
        cfg.seed,
    )
    return ids


def _bos_id(cfg: CalibrationConfig, tokenizer: Any) -> int | None:
    if not cfg.add_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        logger.warning("calibration: add_bos is set but the tokenizer has no bos_token; windows start without BOS")
    return bos


def _sample_windows(stream: torch.Tensor, samples: int, window: int, seed: int) -> torch.Tensor:
    """``samples`` disjoint windows ``s[r + k*w : r + k*w + w]``, ``k = randperm(n)[:samples]``, ``n = len(s)//w``."""
    n_slots = stream.numel() // window
    g = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, stream.numel() - n_slots * window + 1, (1,), generator=g))
    slots = torch.randperm(n_slots, generator=g)[:samples]
    index = shift + slots[:, None] * window + torch.arange(window)
    return stream[index]


# --- sources -----------------------------------------------------------------------------------------------------


def _open_source(path: Path, cfg: CalibrationConfig, tokenizer: Any) -> tuple[str, Documents]:
    """Detect the format of ``path``; return its name and a lazy iterator of documents."""
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.is_dir():
        if any((path / m).is_file() for m in DATASET_MARKERS):
            return "datasets.save_to_disk directory", _dataset_documents(path, cfg, tokenizer)
        return "directory of .txt files", _directory_documents(path)
    if path.stat().st_size == 0:
        raise CalibrationError(f"calibration file is empty: {path}")
    head = _head(path)
    if path.suffix.lower() in UNSUPPORTED_SUFFIXES or b"\x00" in head:
        raise CalibrationError(f"unsupported calibration format: {path} (expected {SUPPORTED})")
    if path.suffix.lower() in JSONL_SUFFIXES:
        if path.suffix.lower() == ".json" and head.lstrip().startswith(b"["):
            raise CalibrationError(f"unsupported calibration format: {path} is a JSON array; write one object per line")
        return "JSONL", _jsonl_documents(path, cfg, tokenizer)
    return "text file", iter([_file_pieces(path)])


def _head(path: Path, size: int = 8192) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def _directory_documents(root: Path) -> Documents:
    files = sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CalibrationError(f"no .txt files under {root} (nor dataset_info.json/state.json of a datasets directory)")
    if all(p.stat().st_size == 0 for p in files):
        raise CalibrationError(f"all {len(files)} .txt files under {root} are empty")
    logger.info("calibration: %d .txt files under %s", len(files), root)
    return (_file_pieces(p) for p in files)


def _file_pieces(path: Path) -> Iterator[str]:
    """The UTF-8 text of ``path`` in pieces of at most ~CHUNK_CHARS characters, read lazily."""
    try:
        with path.open(encoding="utf-8") as f:
            yield from _pieces(f.read)
    except UnicodeDecodeError as e:
        raise CalibrationError(f"unsupported calibration format: {path} is not UTF-8 text ({e.reason})") from e


def _pieces(read: Callable[[int], str]) -> Iterator[str]:
    """Split a text source into pieces, cutting a full chunk after its last newline (else before its last space)."""
    carry = ""
    while True:
        chunk = read(CHUNK_CHARS)
        text = carry + chunk
        if len(chunk) < CHUNK_CHARS:  # end of text
            if text:
                yield text
            return
        cut = _cut_point(text)
        carry = text[cut:]
        yield text[:cut]


def _cut_point(text: str) -> int:
    """A cut in the second half of ``text`` that keeps words whole (the space goes with the following word)."""
    half = len(text) // 2
    newline = text.rfind("\n", half)
    if newline >= 0:
        return newline + 1
    space = text.rfind(" ", half)
    return space if space > 0 else len(text)


def _jsonl_documents(path: Path, cfg: CalibrationConfig, tokenizer: Any) -> Documents:
    """One document per JSON line; blank lines skipped; records with empty text skipped."""
    n_records = n_text = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n_records += 1
                text = _record_text(_parse_json_line(path, lineno, line), cfg.text_field, tokenizer, f"{path}:{lineno}")
                if text:
                    n_text += 1
                    yield _pieces(io.StringIO(text).read)
    except UnicodeDecodeError as e:
        raise CalibrationError(f"unsupported calibration format: {path} is not UTF-8 text ({e.reason})") from e
    if n_records == 0:
        raise CalibrationError(f"no JSON records in {path}")
    if n_text == 0:
        raise CalibrationError(f"all {n_records} records in {path} have empty text")


def _parse_json_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}:{lineno}: line is not valid JSON ({e.msg} at column {e.colno})") from e


def _record_text(record: Any, field: str, tokenizer: Any, where: str) -> str:
    """The record's ``field`` string, or its ``messages`` rendered with the tokenizer's chat template."""
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field in record:
        value = record[field]
        if not isinstance(value, str):
            raise CalibrationError(f"{where}: field '{field}' is {type(value).__name__}, expected a string")
        return value
    if "messages" in record:
        return _render_chat(record["messages"], tokenizer, where)
    found = ", ".join(map(str, record)) or "none"
    raise CalibrationError(f"{where}: no '{field}' or 'messages' field (fields found: {found})")


def _render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(f"{where}: chat 'messages' record but the tokenizer has no chat_template")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CalibrationError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2 raises its own error types for bad templates or messages
        raise CalibrationError(f"{where}: chat template failed: {type(e).__name__}: {e}") from e


def _dataset_documents(path: Path, cfg: CalibrationConfig, tokenizer: Any) -> Documents:
    """Rows of a ``datasets.save_to_disk`` directory (the ``train`` split of a DatasetDict, else its first split)."""
    ds = _load_dataset(path)
    columns = list(ds.column_names)
    if cfg.text_field in columns:
        column = cfg.text_field
    elif "messages" in columns:
        column = "messages"
    else:
        raise CalibrationError(
            f"{path}: no '{cfg.text_field}' or 'messages' column (columns found: {', '.join(columns)})"
        )
    if len(ds) == 0:
        raise CalibrationError(f"{path}: the dataset has no rows")
    n_text = 0
    for start, batch in zip(range(0, len(ds), 256), ds.select_columns([column]).iter(batch_size=256)):
        for i, value in enumerate(batch[column]):
            text = _record_text({column: value}, cfg.text_field, tokenizer, f"{path} row {start + i}")
            if text:
                n_text += 1
                yield _pieces(io.StringIO(text).read)
    if n_text == 0:
        raise CalibrationError(f"all {len(ds)} rows of {path} have empty '{column}'")


def _load_dataset(path: Path) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(
            f"{path} is a datasets.save_to_disk directory but the 'datasets' package is not installed "
            "(pip install datasets)"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        logger.info("calibration: using split '%s' of %s", split, path)
        ds = ds[split]
    return ds


# --- tokenization --------------------------------------------------------------------------------------------------


class _TokenStream:
    """Token ids of the documents concatenated with EOS between them; tokenized in batches of ~BATCH_CHARS."""

    def __init__(self, tokenizer: Any, cap: int) -> None:
        self.tokenizer, self.cap = tokenizer, cap
        self.eos: int | None = getattr(tokenizer, "eos_token_id", None)
        self.ids = array("q")  # int64, compact: the stream is held whole (at most cap + one batch of tokens)
        self.documents = 0
        self._pending: list[str | None] = []  # text pieces, None = EOS between documents
        self._pending_chars = 0
        self._in_document = False

    @property
    def count(self) -> int:
        return len(self.ids)

    def begin_document(self) -> None:
        self._in_document = False

    def add(self, piece: str) -> None:
        if not piece:
            return
        if not self._in_document:
            if self.documents and self.eos is not None:
                self._pending.append(None)
            self.documents += 1
            self._in_document = True
        self._pending.append(piece)
        self._pending_chars += len(piece)
        # Flush early near the cap (a token rarely spans more than 4 characters) so reading stops soon after it.
        if self._pending_chars >= min(BATCH_CHARS, 4 * (self.cap - self.count) + 1024):
            self.flush()

    def flush(self) -> None:
        texts = [p for p in self._pending if p is not None]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        for p in self._pending:
            if p is not None:
                self.ids.extend(next(encoded))
            elif self.eos is not None:
                self.ids.append(self.eos)
        self._pending.clear()
        self._pending_chars = 0
        logger.debug("calibration: %d tokens from %d documents", self.count, self.documents)

    def tensor(self) -> torch.Tensor:
        self.flush()
        if not self.ids:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(self.ids[: self.cap], dtype=torch.int64).clone()


def _tokenize(docs: Documents, tokenizer: Any, cap: int) -> torch.Tensor:
    """The first ``cap`` tokens of the document stream (fewer if the source is shorter); stops reading at ``cap``."""
    stream = _TokenStream(tokenizer, cap)
    if stream.eos is None:
        logger.warning("calibration: the tokenizer has no eos_token; documents are joined without a separator")
    with contextlib.closing(docs) if hasattr(docs, "close") else contextlib.nullcontext():  # type: ignore[type-var]
        for doc in docs:
            stream.begin_document()
            with contextlib.closing(doc) if hasattr(doc, "close") else contextlib.nullcontext():  # type: ignore[type-var]
                for piece in doc:
                    stream.add(piece)
                    if stream.count >= cap:
                        break
            if stream.count >= cap:
                logger.info("calibration: stopped reading at %d tokens (enough for the windows)", stream.count)
                break
    return stream.tensor()
