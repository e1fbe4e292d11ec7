"""Readers: a file of one of the corpora's formats -> its documents (non-empty strings).

Plain-text formats get their line endings normalised to "\n"; .gz files are read transparently.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from mhmoe.errors import DataError

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


def read_bytes(path: Path) -> bytes:
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
        raw = read_bytes(path)
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
    yield from split_wikitext(_read_text(path))


def split_wikitext(text: str) -> Iterator[str]:
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
        fh = io.BytesIO(read_bytes(path)) if path.suffix == ".gz" else open(path, "rb")
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


READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    "plain": read_plain_text,
    "wikitext": read_wikitext,
    "wikiextractor": read_wikiextractor,
    "gutenberg": read_gutenberg,
    "jsonl": read_jsonl,
}
