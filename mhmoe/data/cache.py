"""The token cache: a corpus tokenised once into a memmapped array with an eos after every document.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.data.corpora import CACHE_FORMAT, corpus_files, corpus_spec
from mhmoe.data.documents import heldout_files, iter_documents
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import DataError
from mhmoe.fileio import atomic_write_bytes, sha256_file

# --------------------------------------------------------------------------------------------------------------------
# Token cache


@dataclass
class TokenizedCorpus:
    """A tokenised corpus: documents joined with eos after each, as a read-only memmap.

    Attributes:
        name: the corpus name.
        tokens: 1-D token ids (uint16 when the vocabulary fits, else uint32).
        doc_offsets: int64 [num_docs + 1]; document i is tokens[doc_offsets[i]:doc_offsets[i+1]] (eos included).
        manifest: the cache manifest (inputs, tokenizer, counts); empty when built in memory.
    """

    name: str
    tokens: np.ndarray
    doc_offsets: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1


def _token_dtype(vocab_size: int, dtype: str | None) -> np.dtype:
    if dtype is None:
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"dtype: {dtype!r} is not supported; use 'uint16', 'uint32' or None (smallest that fits)")
    if dtype == "uint16" and vocab_size > 2**16:
        raise DataError(f"dtype: vocab too large for uint16 ({vocab_size} ids > 65536); use dtype='uint32' or None")
    return np.dtype(dtype)


def doc_batches(docs: Iterable[str], max_docs: int = 512, max_chars: int = 8_000_000) -> Iterator[list[str]]:
    # Bounded batches keep memory flat on big corpora while still giving encode_batch enough work to parallelise.
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _open_cache(name: str, stem: Path, manifest: dict[str, Any]) -> TokenizedCorpus | None:
    """The cached corpus, or None when any file is missing or inconsistent with the manifest (then rebuild)."""
    bin_path, docs_path = stem.with_suffix(".bin"), stem.with_suffix(".docs.npy")
    try:
        dt = np.dtype(manifest["dtype"])
        n = int(manifest["num_tokens"])
        if n == 0 or bin_path.stat().st_size != n * dt.itemsize:
            return None
        offsets = np.load(docs_path, allow_pickle=False)
        if offsets.dtype != np.int64 or offsets.shape != (int(manifest["num_docs"]) + 1,) or int(offsets[-1]) != n:
            return None
        tokens = np.memmap(bin_path, dtype=dt, mode="r", shape=(n,))
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return TokenizedCorpus(name, tokens, offsets, manifest)


def tokenize_corpus(
    name: str,
    tokenizer: Tokenizer,
    root: Path,
    cache_dir: Path,
    max_bytes: int = 0,
    dtype: str | None = None,
) -> TokenizedCorpus:
    """Tokenise corpus `name` once into `cache_dir/<name>-<key>.bin` (+ `.docs.npy`, `.json` manifest).

    The key covers the tokenizer fingerprint, max_bytes and dtype; the manifest also records the sha256 of every
    input file, and the cache is reused only when all of it matches (else rebuilt in place). Every file is written
    atomically and the manifest last, so an interrupted build is never mistaken for a finished one.
    """
    spec = corpus_spec(name)
    dt = _token_dtype(tokenizer.vocab_size, dtype)
    if max_bytes < 0:
        raise DataError(f"max_bytes: {max_bytes} is negative; use 0 (no cap) or a positive byte count")
    root, cache_dir = Path(root), Path(cache_dir)
    files = corpus_files(name, root)
    if files and spec.role == "train":
        # The training documents depend on the held-out files too (identical documents are dropped).
        files = sorted(set(files) | set(heldout_files(root)), key=lambda p: p.as_posix())
    if files:
        inputs = {p.relative_to(root).as_posix(): sha256_file(p) for p in files}
    else:
        # Hub corpora cannot be hashed up front; the dataset id stands in (iter_documents explains a missing hub).
        hub = spec.hub
        inputs = {f"hub:{hub.path}/{hub.config}/{hub.split}/{hub.select}": ""} if hub else {}
    key_fields = {
        "format": CACHE_FORMAT,
        "corpus": name,
        "tokenizer": tokenizer.fingerprint,
        "max_bytes": int(max_bytes),
        "dtype": dt.name,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    stem = cache_dir / f"{name}-{key}"
    manifest_path = stem.with_suffix(".json")
    expected = {**key_fields, "inputs": inputs}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if all(manifest.get(k) == v for k, v in expected.items()):
            cached = _open_cache(name, stem, manifest)
            if cached is not None:
                return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Invalidate first: a crash mid-rebuild must not leave an old manifest vouching for a half-new .bin.
    manifest_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    docs = iter_documents(name, root, max_bytes)
    offsets = [0]
    text_bytes = 0
    fd, tmp_bin = tempfile.mkstemp(dir=cache_dir, prefix=f".{stem.name}.bin.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for batch in doc_batches(docs):
                ids = tokenizer.encode_batch(batch)
                text_bytes += sum(len(d.encode("utf-8")) for d in batch)
                flat: list[int] = []
                for x in ids:
                    flat.extend(x)
                    flat.append(tokenizer.eos_id)
                    offsets.append(offsets[-1] + len(x) + 1)
                np.asarray(flat, dtype=dt).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        if len(offsets) == 1:
            raise DataError(f"corpus {name!r}: no documents (every input is empty or max_bytes is too small)")
        offsets_arr = np.asarray(offsets, dtype=np.int64)
        atomic_write_bytes(stem.with_suffix(".docs.npy"), npy_bytes(offsets_arr))
        os.replace(tmp_bin, stem.with_suffix(".bin"))
    except BaseException:
        Path(tmp_bin).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    num_tokens = int(offsets_arr[-1])
    manifest = {
        **expected,
        "tokenizer_name": tokenizer.name,
        "num_tokens": num_tokens,
        "num_docs": len(offsets) - 1,
        "text_bytes": text_bytes,
        "bytes_per_token": round(text_bytes / max(num_tokens, 1), 4),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(num_tokens / max(seconds, 1e-9)),
    }
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    opened = _open_cache(name, stem, manifest)
    assert opened is not None, f"token cache {stem} unreadable right after writing it"
    return opened


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
