"""`mhmoe data prepare --preset P --data-root DIR`: fetch what a preset needs into a data root, from the hub.

Each corpus of the preset (its training mix and evaluation domains) is streamed from its Hugging Face source
(`mhmoe.data.CORPORA[...].hub`, parquet/JSON datasets only) into DIR/hub/<corpus>.jsonl, one {"text": ...} per
line, up to the bytes the preset reads. The download is resumable: records are appended to <corpus>.jsonl.part
and flushed one by one, so an interrupted prepare continues after the last whole record. When the budget is
reached (or the source ends), the file's sha256 goes into <corpus>.manifest.json and the .part file is renamed
into place atomically; `mhmoe.data` then reads that file instead of streaming, and checks it against the
manifest's sha256 first. Corpora already on disk under DIR (their usual files) are left alone. GPT-2 presets
also get tokenizer/gpt2/, copied from the package's sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from mhmoe.data.corpora import CORPORA, PREPARED_DIR, SAMPLE_ROOT
from mhmoe.data.documents import load_hub_corpus
from mhmoe.data.readers import read_bytes
from mhmoe.errors import DataError
from mhmoe.fileio import atomic_write_text, sha256_file

BYTES_PER_TOKEN = 5  # upper end of what the project's BPEs measure on English web text (4-4.5 bytes/token)
DEFAULT_EVAL_BYTES = 16_000_000  # an evaluation domain the preset reads whole (max_eval_tokens = 0)


def preset_needs(cfg: Any) -> dict[str, int]:
    """{corpus: bytes of text} that training and evaluating `cfg` read at most."""
    d = cfg.data
    # Training samples windows at random from the whole corpus: a quarter more text than tokens it trains on.
    train = max(cfg.steps * cfg.tokens_per_step * BYTES_PER_TOKEN * 5 // 4, d.tokenizer_train_bytes)
    if d.max_train_bytes:
        train = min(train, max(d.max_train_bytes, d.tokenizer_train_bytes))
    need = {d.train_corpus: train}
    for name in d.eval_domains:
        need[name] = 8 * (d.max_eval_tokens + cfg.seq_len + 1) if d.max_eval_tokens else DEFAULT_EVAL_BYTES
    return need


def _resume_point(part: Path) -> tuple[int, int]:
    """(records, bytes of text) already in a .part file; a torn last line (a killed write) is cut off."""
    if not part.is_file():
        return 0, 0
    raw = part.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with open(part, "r+b") as f:
            f.truncate(len(keep))
    lines = keep.splitlines()
    return len(lines), sum(len(json.loads(l)["text"].encode("utf-8")) for l in lines)


def prepare_corpus(name: str, root: Path, max_bytes: int, progress: bool = True,
                   documents: Iterable[str] | None = None) -> dict[str, Any]:
    """Stream corpus `name` into root/hub/<name>.jsonl until `max_bytes` of text; returns its manifest.

    documents: the stream to store (default: the corpus's hub source, `load_hub_corpus`).
    """
    from tqdm.auto import tqdm

    out_dir = Path(root) / PREPARED_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    final, part = out_dir / f"{name}.jsonl", out_dir / f"{name}.jsonl.part"
    manifest_path = final.with_suffix(".manifest.json")
    spec = CORPORA[name]
    source = {"path": spec.hub.path, "config": spec.hub.config, "split": spec.hub.split} if spec.hub else None
    if final.is_file() and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("source") == source and (manifest["bytes"] >= max_bytes or manifest["complete"]):
            if sha256_file(final) != manifest["sha256"]:
                raise DataError(f"{final}: sha256 differs from its manifest; delete it and prepare again")
            return manifest
        os.replace(final, part)  # a larger budget than last time: extend the finished file
        manifest_path.unlink()
    records, size = _resume_point(part)
    stream: Iterator[str] = iter(documents if documents is not None else load_hub_corpus(name))
    for _ in range(records):  # the stream is deterministic: skip what the .part file holds
        next(stream, None)
    complete = True
    bar = tqdm(total=max_bytes, initial=min(size, max_bytes), unit="B", unit_scale=True, desc=name,
               disable=not progress)
    with open(part, "a", encoding="utf-8") as f:
        for text in stream:
            if size >= max_bytes:
                complete = False
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            f.flush()
            records += 1
            n = len(text.encode("utf-8"))
            size += n
            bar.update(min(n, max(0, max_bytes - bar.n)))
    bar.close()
    if records == 0:
        part.unlink(missing_ok=True)
        raise DataError(f"corpus {name!r}: its hub source gave no documents; check `mhmoe data prepare` output")
    manifest = {"corpus": name, "source": source, "records": records, "bytes": size, "complete": complete,
                "sha256": sha256_file(part)}
    os.replace(part, final)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def prepare_gpt2_tokenizer(root: Path) -> Path:
    """tokenizer/gpt2/{encoder.json,vocab.bpe} under `root`, copied from the sample carried in the package (the
    official GPT-2 files, sha256-checked there; no download needed)."""
    folder = Path(root) / "tokenizer" / "gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.json", "vocab.bpe"):
        if not (folder / name).is_file():
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(read_bytes(SAMPLE_ROOT / "tokenizer" / "gpt2" / f"{name}.gz"))
            os.replace(tmp, folder / name)
    return folder
