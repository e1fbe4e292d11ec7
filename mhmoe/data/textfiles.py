"""The user's own text for `mhmoe eval --text`: .txt, .jsonl and .gz files (or folders of them) as a TokenizedCorpus.

Documents follow the built-in readers of `mhmoe.data`: a .txt file is one document (UTF-8, BOM dropped, CRLF -> LF),
a .jsonl file holds one document per record's "text" field (blank texts dropped), and .txt.gz / .jsonl.gz are the
same after gunzip. They are tokenised like `mhmoe.data.cache.tokenize_corpus` does it (eos after every document), but in
memory: a user's file has no stable place in the token cache and is usually small.

Every problem raises `DataError` with one line that starts with the flag (`--text` or `--max-tokens`), names the
file (and line) and says the fix, so `mhmoe eval` prints it without a traceback.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mhmoe.data.cache import TokenizedCorpus, doc_batches
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import DataError

FLAG = "--text"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_KINDS = "a .txt, .jsonl (one {\"text\": ...} object per line), .txt.gz or .jsonl.gz file, or a folder of them"


def text_kind(path: Path) -> str | None:
    """"txt" or "jsonl" for a supported file name (case-insensitive, optionally .gz), else None."""
    name = path.name.lower()
    name = name[: -len(".gz")] if name.endswith(".gz") else name
    for kind in ("txt", "jsonl"):
        if name.endswith(f".{kind}") and len(name) > len(kind) + 1:
            return kind
    return None


def text_files(path: str | Path) -> list[Path]:
    """The files `--text PATH` stands for: the file itself, or every supported file under the folder, recursively,
    sorted by relative path (so the document order does not depend on the filesystem). Hidden files and folders
    (names starting with ".", e.g. .git or macOS ._ files) are skipped: they are never the user's text."""
    path = Path(path)
    if path.is_file():
        if text_kind(path) is None:
            raise DataError(f"{FLAG}: {path} is not a supported file type; pass {_KINDS} (rename plain text to .txt)")
        return [path]
    if not path.is_dir():
        raise DataError(f"{FLAG}: {path} does not exist; pass {_KINDS}")
    found = [
        p for p in path.rglob("*")
        if p.is_file() and text_kind(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not found:
        raise DataError(f"{FLAG}: folder {path} has no {', '.join(SUFFIXES)} files (searched recursively); "
                        "put your text in such files or pass one file")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def domain_name(path: str | Path) -> str:
    """The row name of `--text PATH` in the eval table and JSON: "text:<file or folder name>"."""
    path = Path(path)
    return f"text:{path.name or path.resolve().name or path}"


# ----------------------------------------------------------------------------------------------------------
# Reading


def _raw_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{FLAG}: {path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; EOFError = truncated
            raise DataError(f"{FLAG}: {path}: not a valid gzip file ({e}); re-compress it with gzip or "
                            "remove the .gz suffix if it is plain text") from None
    if not raw.strip():
        raise DataError(f"{FLAG}: {path}: file is empty; pass a file with text (or remove it from the folder)")
    nul = raw.find(b"\x00")
    if nul != -1:
        raise DataError(f"{FLAG}: {path}: binary data (NUL byte at offset {nul}); pass UTF-8 text, not a binary "
                        "file")
    return raw


def _decode(raw: bytes, path: Path, where: str = "") -> str:
    """Strict UTF-8 (a BOM dropped), like the built-in readers: invalid bytes are an error, never replaced."""
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = e.start + skip
        raise DataError(f"{FLAG}: {path}{where}: not valid UTF-8 (byte 0x{raw[pos]:02x} at offset {pos}); "
                        "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _plain_documents(raw: bytes, path: Path) -> Iterator[str]:
    text = _decode(raw, path).replace("\r\n", "\n")  # CRLF and LF files must tokenise the same
    if not text.strip():
        raise DataError(f"{FLAG}: {path}: no text after decoding (only whitespace); pass a file with text")
    yield text


def _jsonl_documents(raw: bytes, path: Path) -> Iterator[str]:
    records = texts = 0
    for lineno, line_bytes in enumerate(raw.split(b"\n"), 1):
        line = _decode(line_bytes, path, f":{lineno}")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{FLAG}: {path}:{lineno}: not JSON ({e.msg} at column {e.colno}); every line must be "
                            'a JSON object like {"text": "..."}: fix or delete that line') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"{FLAG}: {path}:{lineno}: record has no string \"text\" field; every line must be "
                            'a JSON object like {"text": "..."}')
        records += 1
        if rec["text"].strip():
            texts += 1
            yield rec["text"]
    if texts == 0:
        raise DataError(f"{FLAG}: {path}: all {records} \"text\" fields are empty; pass records with text")


def read_text_file(path: Path) -> Iterator[str]:
    """Documents of one supported file (see the module docstring); DataError on unusable content."""
    path = Path(path)
    kind = text_kind(path)
    if kind is None:
        raise DataError(f"{FLAG}: {path} is not a supported file type; pass {_KINDS}")
    raw = _raw_bytes(path)
    yield from (_jsonl_documents(raw, path) if kind == "jsonl" else _plain_documents(raw, path))


def iter_text_documents(path: str | Path) -> Iterator[str]:
    """Documents of `--text PATH`, file after file in `text_files` order."""
    for p in text_files(path):
        yield from read_text_file(p)


# ----------------------------------------------------------------------------------------------------------
# Tokenising


def text_corpus(path: str | Path, tokenizer: Tokenizer, seq_len: int, max_tokens: int = 0) -> TokenizedCorpus:
    """`--text PATH` tokenised as `tokenize_corpus` would (eos after each document), ready for `eval_windows`.

    With max_tokens > 0 reading stops once the first max_tokens predicted tokens are covered: documents are
    tokenised independently, so those tokens equal the whole text's first ones. DataError (naming both counts)
    when there is less than one evaluation window of seq_len + 1 tokens.
    """
    if 0 < max_tokens < seq_len:
        raise DataError(f"--max-tokens: {max_tokens} is less than one evaluation window of {seq_len} predicted "
                        f"tokens (the run's seq_len); use --max-tokens >= {seq_len}, or 0 for all of {FLAG}")
    need = (max_tokens // seq_len) * seq_len + 1 if max_tokens > 0 else 0
    chunks: list[np.ndarray] = []
    offsets = [0]
    for batch in doc_batches(iter_text_documents(path)):
        for ids in tokenizer.encode_batch(batch):
            chunks.append(np.asarray([*ids, tokenizer.eos_id], dtype=np.uint32))
            offsets.append(offsets[-1] + len(ids) + 1)
        if need and offsets[-1] >= need:
            break
    if offsets[-1] < seq_len + 1:
        raise DataError(f"{FLAG}: {path} has {offsets[-1]} tokens (one eos per document included), fewer than the "
                        f"{seq_len + 1} one evaluation window needs (seq_len {seq_len} + 1); pass a longer text")
    return TokenizedCorpus(domain_name(path), np.concatenate(chunks), np.asarray(offsets, dtype=np.int64),
                           {"source": str(path), "tokenizer_name": tokenizer.name, "num_tokens": offsets[-1]})
