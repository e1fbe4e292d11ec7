"""The documents of a named corpus: its files interleaved by bytes, decontaminated against the held-out
evaluation documents, capped at a byte budget; or the corpus streamed from its Hugging Face source.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from mhmoe.data.corpora import CORPORA, CorpusSpec, check_complete, corpus_spec, prepared_file, source_files
from mhmoe.data.readers import READERS, read_jsonl, split_wikitext
from mhmoe.errors import DataError
from mhmoe.fileio import sha256_file

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
    spec = corpus_spec(name)
    if max_bytes < 0:
        raise DataError(f"max_bytes: {max_bytes} is negative; use 0 (no cap) or a positive byte count")
    groups = source_files(spec, root)
    check_complete(name, root, groups)
    if not any(files for _, files in groups):
        prepared = prepared_file(name, root)
        if prepared is None:
            return _cap_bytes(load_hub_corpus(name), max_bytes)
        _verify_prepared(prepared)
        docs = read_jsonl(prepared)
    else:
        streams = [
            (sum(p.stat().st_size for p in files), _chain_files(READERS[s.reader], files)) for s, files in groups
        ]
        docs = streams[0][1] if len(streams) == 1 else _interleave(streams)
    if spec.role == "train":
        docs = _decontaminate(docs, _heldout_hashes(root))
    return _cap_bytes(docs, max_bytes)


def _doc_hash(doc: str) -> bytes:
    return hashlib.sha256(doc.strip().encode("utf-8")).digest()


def heldout_files(root: Path) -> list[Path]:
    """Files of every evaluation corpus present under `root` (the training corpus is filtered against them)."""
    out: list[Path] = []
    for spec in CORPORA.values():
        if spec.role == "eval":
            groups = source_files(spec, root)
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
        groups = source_files(spec, root)
        if all(files for _, files in groups):
            for s, files in groups:
                hashes.update(_doc_hash(d) for d in _chain_files(READERS[s.reader], files))
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


def one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg[:200]}"


def load_hub_corpus(name: str) -> Iterator[str]:
    """Documents of corpus `name` streamed from the Hugging Face hub (needs the optional `datasets` package).

    Used by `iter_documents` only when the corpus's files are absent. DataError, naming the files to place under
    the data root instead, when the corpus has no hub source, `datasets` is missing or the hub is unreachable.
    """
    spec = corpus_spec(name)
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
            f"corpus {name!r}: cannot stream {hub.path} from the Hugging Face hub ({one_line(e)}); "
            f"put {_where(spec)} under the data root instead"
        ) from None
    return _hub_documents(name, spec, ds)


def _hub_documents(name: str, spec: CorpusSpec, ds: Iterable[dict[str, Any]]) -> Iterator[str]:
    hub = spec.hub
    assert hub is not None
    try:
        if hub.select == "wikitext":
            # The hub stores WikiText one line per record; rebuild the raw text and split it like read_wikitext.
            yield from split_wikitext("".join(r["text"] for r in ds))
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
            f"corpus {name!r}: streaming {hub.path} failed ({one_line(e)}); put {_where(spec)} under the data root"
        ) from None
