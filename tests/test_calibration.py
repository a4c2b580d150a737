"""engine.calibration: formats, sampling rule, determinism and errors, with real tokenizers built offline."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine import calibration
from engine.calibration import CalibrationConfig, CalibrationError, load_calibration

UNK, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3, 4
OFFSET = 5  # id of word "w{i}" is OFFSET + i
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"


def word_tokenizer(n_words: int = 1000, bos: bool = True, chat: bool = True) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose ids reveal positions: "w{i}" -> OFFSET + i (whitespace split)."""
    vocab = {"[UNK]": UNK, "<s>": BOS, "</s>": EOS, "<|user|>": USER, "<|assistant|>": ASSISTANT}
    vocab.update({f"w{i}": OFFSET + i for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>", unk_token="[UNK]"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def words(start: int, stop: int, per_line: int = 0) -> str:
    """ "w{start} ... w{stop-1}", with a newline after every `per_line` words when per_line > 0."""
    out = []
    for i in range(start, stop):
        out.append(f"w{i}")
        out.append("\n" if per_line and (i + 1) % per_line == 0 else " ")
    return "".join(out).rstrip()


def ids(start: int, stop: int) -> list[int]:
    return list(range(OFFSET + start, OFFSET + stop))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def load(path: Path, tokenizer=None, **kw) -> torch.Tensor:
    return load_calibration(CalibrationConfig(data=str(path), **kw), tokenizer or word_tokenizer())


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(words(0, 1000, per_line=13))
    return path


# --- sampling -----------------------------------------------------------------------------------------------------


def test_text_file_shape_bos_and_disjoint_windows(text_file: Path) -> None:
    out = load(text_file, samples=8, seq_len=33)
    assert out.shape == (8, 33) and out.dtype == torch.int64
    assert torch.all(out[:, 0] == BOS)
    body = out[:, 1:] - OFFSET  # word positions in the stream
    assert torch.all(body.diff(dim=1) == 1), "each window is a contiguous slice of the stream"
    starts = body[:, 0]
    assert len(set(starts.tolist())) == 8 and len(set((starts % 32).tolist())) == 1, "windows sit on disjoint slots"
    cap = calibration.STREAM_FACTOR * 8 * 32 + 32
    assert int(body.max()) < cap, "windows come from the first STREAM_FACTOR*samples*window + window tokens"


def test_same_seed_same_ids_other_seed_other_ids(text_file: Path) -> None:
    a = load(text_file, samples=8, seq_len=33, seed=3)
    assert torch.equal(a, load(text_file, samples=8, seq_len=33, seed=3))
    assert not torch.equal(a, load(text_file, samples=8, seq_len=33, seed=4))


def test_without_bos(text_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = load(text_file, samples=4, seq_len=32, add_bos=False)
    assert out.shape == (4, 32) and torch.all(out.diff(dim=1) == 1)
    with caplog.at_level(logging.WARNING, logger="engine.calibration"):
        out = load(text_file, word_tokenizer(bos=False), samples=4, seq_len=32, add_bos=True)
    assert out.shape == (4, 32) and torch.all(out.diff(dim=1) == 1)
    assert "no bos_token" in caplog.text


def test_exact_fit_uses_every_token(tmp_path: Path) -> None:
    path = tmp_path / "exact.txt"
    path.write_text(words(0, 64))
    out = load(path, samples=4, seq_len=17)  # 4 windows x 16 tokens = the whole 64-token stream
    assert sorted((out[:, 1:] - OFFSET).flatten().tolist()) == list(range(64))


def test_bpe_tokenizer_windows_are_slices_of_the_reference_tokenization(tmp_path: Path) -> None:
    rng = random.Random(0)
    vocab = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "model", "block", "layer", "weight"]
    text = "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 15))) + "." for _ in range(400))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path / "prose.txt"
    path.write_text(text)
    out = load(path, tokenizer, samples=6, seq_len=48)
    reference = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.shape == (6, 48) and torch.all(out[:, 0] == tokenizer.bos_token_id)
    for row in out[:, 1:].tolist():
        assert any(reference[i : i + 47] == row for i in range(len(reference) - 46)), "window not in the stream"


# --- formats --------------------------------------------------------------------------------------------------------


def test_directory_sorted_recursive_joined_with_eos(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / "b" / "2.txt").write_text(words(20, 30))
    (root / "a.txt").write_text(words(0, 10))
    (root / "b" / "1.txt").write_text(words(10, 20))
    (root / "empty.txt").write_text("")  # skipped: no double EOS
    (root / "notes.md").write_text(words(900, 999))  # not .txt: ignored
    out = load(root, samples=1, seq_len=33)  # 30 words + 2 EOS = one 32-token window
    assert out[0].tolist() == [BOS, *ids(0, 10), EOS, *ids(10, 20), EOS, *ids(20, 30)]


def test_jsonl_text_records_and_custom_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 10)}, "", {"text": ""}, {"text": words(10, 20)}])
    assert load(path, samples=1, seq_len=22)[0].tolist() == [BOS, *ids(0, 10), EOS, *ids(10, 20)]
    path = write_jsonl(tmp_path / "d.json", [{"body": words(0, 5), "id": 1}, {"body": words(5, 10), "id": 2}])
    out = load(path, samples=1, seq_len=11, add_bos=False, text_field="body")
    assert out[0].tolist() == [*ids(0, 5), EOS, *ids(5, 10)]


def test_jsonl_chat_messages_use_the_chat_template(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat, {"text": words(7, 9)}])
    out = load(path, samples=1, seq_len=9)
    assert out[0].tolist() == [BOS, USER, *ids(1, 3), ASSISTANT, *ids(3, 4), EOS, *ids(7, 9)]


def test_long_documents_are_cut_between_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "CHUNK_CHARS", 40)
    path = tmp_path / "long.txt"
    path.write_text(words(0, 300, per_line=17))
    assert load(path, samples=1, seq_len=301)[0, 1:].tolist() == ids(0, 300)
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": words(0, 150)}, {"text": words(150, 300)}])
    assert load(path, samples=1, seq_len=301, add_bos=False)[0].tolist() == [*ids(0, 150), EOS, *ids(150, 300)]


def test_reading_stops_once_the_stream_is_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with path.open("wb") as f:  # ~400 KB of words, then a byte that is not UTF-8
        f.write(" ".join(f"w{i % 1000}" for i in range(80_000)).encode())
        f.write(b" \xff\xfe tail")
    assert load(path, samples=2, seq_len=16).shape == (2, 16)  # never decodes the bad byte
    with pytest.raises(CalibrationError, match=re.escape(f"{path} is not UTF-8 text")):
        load(path, samples=20_000, seq_len=16)


def test_datasets_save_to_disk_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [words(0, 10), "", words(10, 20)]}).save_to_disk(tmp_path / "ds")
    assert load(tmp_path / "ds", samples=1, seq_len=22)[0].tolist() == [BOS, *ids(0, 10), EOS, *ids(10, 20)]
    chat = [[{"role": "user", "content": "w1"}], [{"role": "assistant", "content": "w2"}]]
    split = datasets.Dataset.from_dict({"messages": chat})
    datasets.DatasetDict({"train": split, "test": split.select([0])}).save_to_disk(tmp_path / "dd")
    assert load(tmp_path / "dd", samples=1, seq_len=5, add_bos=False)[0].tolist() == [
        USER,
        OFFSET + 1,
        EOS,
        ASSISTANT,
        OFFSET + 2,
    ]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(CalibrationError, match=r"no 'text' or 'messages' column \(columns found: body\)"):
        load(tmp_path / "bad", samples=1, seq_len=4)


def test_datasets_directory_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(CalibrationError, match="'datasets' package is not installed"):
        load(tmp_path / "ds", samples=1, seq_len=4)


# --- errors ---------------------------------------------------------------------------------------------------------


def _bad_sources(tmp: Path) -> list[tuple[Path, str]]:
    (tmp / "empty_dir").mkdir()
    (tmp / "blank_dir" / "sub").mkdir(parents=True)
    (tmp / "blank_dir" / "sub" / "x.txt").write_text("")
    (tmp / "empty.txt").write_text("")
    (tmp / "data.parquet").write_bytes(b"PAR1")
    (tmp / "blob.dat").write_bytes(b"ab\x00cd")
    (tmp / "array.json").write_text('[{"text": "w1"}]')
    cases = [
        (tmp / "missing.txt", "calibration data not found: {p}"),
        (tmp / "empty.txt", "calibration file is empty: {p}"),
        (tmp / "empty_dir", "no .txt files under {p}"),
        (tmp / "blank_dir", "all 1 .txt files under {p} are empty"),
        (tmp / "data.parquet", "unsupported calibration format: {p}"),
        (tmp / "blob.dat", "unsupported calibration format: {p}"),
        (tmp / "array.json", "unsupported calibration format: {p} is a JSON array"),
        (write_jsonl(tmp / "badline.jsonl", [{"text": "w1"}, "", '{"text": "w2"']), "{p}:3: line is not valid JSON"),
        (
            write_jsonl(tmp / "field.jsonl", [{"body": "w1", "id": 3}]),
            "{p}:1: no 'text' or 'messages' field (fields found: body, id)",
        ),
        (write_jsonl(tmp / "type.jsonl", [{"text": 7}]), "{p}:1: field 'text' is int, expected a string"),
        (write_jsonl(tmp / "list.jsonl", [[1, 2]]), "{p}:1: expected a JSON object, got list"),
        (write_jsonl(tmp / "blank.jsonl", ["", "  "]), "no JSON records in {p}"),
        (write_jsonl(tmp / "allempty.jsonl", [{"text": ""}, {"text": ""}]), "all 2 records in {p} have empty text"),
        (write_jsonl(tmp / "msgs.jsonl", [{"messages": "hi"}]), "{p}:1: 'messages' must be a list"),
        (write_jsonl(tmp / "short.jsonl", [{"text": words(0, 30)}]), "{p}: 30 tokens found, 64 needed (4 samples x 16"),
    ]
    return [(p, msg.format(p=p)) for p, msg in cases]


def test_errors_are_one_line_and_name_the_source(tmp_path: Path) -> None:
    for path, message in _bad_sources(tmp_path):
        with pytest.raises(CalibrationError) as info:
            load(path, samples=4, seq_len=17)
        text = str(info.value)
        assert message in text, f"{path.name}: {text!r} lacks {message!r}"
        assert "\n" not in text


def test_chat_records_need_a_chat_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w1"}]}])
    with pytest.raises(CalibrationError, match=re.escape(f"{path}:1: chat 'messages' record but the tokenizer has no")):
        load(path, word_tokenizer(chat=False), samples=1, seq_len=2)


@pytest.mark.parametrize("kw", [{"samples": 0}, {"seq_len": 1}, {"data": " "}, {"text_field": ""}])
def test_config_validation(kw: dict) -> None:
    with pytest.raises(CalibrationError, match="calibration"):
        CalibrationConfig(**{"data": "x.txt", **kw})
