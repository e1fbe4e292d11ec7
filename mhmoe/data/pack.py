"""A token pack: a preset's data, tokenised once, in one small folder that travels with the code.

Machines without the corpora (a GPU machine with no network, a laptop) train and evaluate from a pack exactly as
from a data root: the same tokenizer, the same token arrays, the same windows, so a run on a pack equals the run
on the data root it was built from, loss for loss. `mhmoe data pack --preset P --data-root DIR --out PACK` builds
it; `--data-root PACK` (or MHMOE_DATA_ROOT=PACK) reads it.

    PACK/pack.json              manifest: format, the DataConfig it was built for, the tokenizer's fingerprint,
                                per corpus its files, dtype, token and document counts and sha256
    PACK/tokenizer/tokenizer.json
    PACK/<corpus>.bin           the token cache of `mhmoe.data.cache` (documents joined, eos after each)
    PACK/<corpus>.docs.npy      its document offsets

Evaluation corpora are kept to the tokens the preset evaluates (`eval_tokens`, plus one window); the training
corpus whole, as the preset reads it (`max_train_bytes`). The manifest is written last and every file is checked
against its sha256 when a pack is opened, so a half-copied or edited pack is refused with a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.data.cache import TokenizedCorpus, npy_bytes, tokenize_corpus
from mhmoe.data.corpora import DataConfig
from mhmoe.data.tokenizer import Tokenizer, build_tokenizer
from mhmoe.errors import DataError
from mhmoe.fileio import atomic_write_bytes, atomic_write_text, sha256_file

PACK_FORMAT = 1
MANIFEST = "pack.json"
# The DataConfig fields that decide the tokens: a pack serves a config only when these agree.
_DATA_FIELDS = ("train_corpus", "tokenizer", "vocab_size", "tokenizer_train_bytes", "max_train_bytes")


def is_pack(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def build_pack(data: DataConfig, eval_tokens: int, root: Path, out: Path, cache_dir: Path, label: str,
               max_mib: float = 40.0) -> dict[str, Any]:
    """Write the pack of `data` (read from the data root `root`, token caches in `cache_dir`) into `out`.

    eval_tokens: tokens each evaluation domain needs (the largest the preset evaluates); label: what it was built
    for (the preset's name), recorded. Refuses (DataError) a pack over `max_mib` MiB, before writing anything.
    Returns the manifest.
    """
    out = Path(out)
    if out.exists() and not is_pack(out) and any(out.iterdir()):
        raise DataError(f"--out: {out} exists and is not a pack; choose a new folder")
    tok = build_tokenizer(data, root)
    corpora: dict[str, TokenizedCorpus] = {data.train_corpus: tokenize_corpus(
        data.train_corpus, tok, root, cache_dir, data.max_train_bytes)}
    for name in data.eval_domains:
        full = tokenize_corpus(name, tok, root, cache_dir, 8 * (eval_tokens + 1) if eval_tokens else 0)
        corpora[name] = _prefix(full, eval_tokens + 1) if eval_tokens else full
    size = sum(c.tokens.nbytes + c.doc_offsets.nbytes for c in corpora.values()) + len(tok.to_str())
    if size > max_mib * 2**20:
        raise DataError(f"--max-mib: the pack would take {size / 2**20:.1f} MiB, over {max_mib:g}; lower "
                        "data.max_train_bytes (--set data.max_train_bytes=N) or raise --max-mib")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # invalid while being rewritten
    tok.save(out / "tokenizer")
    files: dict[str, dict[str, Any]] = {}
    for name, c in corpora.items():
        atomic_write_bytes(out / f"{name}.bin", np.ascontiguousarray(c.tokens).tobytes())
        atomic_write_bytes(out / f"{name}.docs.npy", npy_bytes(np.asarray(c.doc_offsets, dtype=np.int64)))
        files[name] = {"dtype": c.tokens.dtype.name, "num_tokens": c.num_tokens, "num_docs": c.num_docs,
                       "sha256": sha256_file(out / f"{name}.bin"),
                       "docs_sha256": sha256_file(out / f"{name}.docs.npy"),
                       "inputs": c.manifest.get("inputs", {})}
    manifest = {"format": PACK_FORMAT, "kind": "mhmoe-token-pack", "built_for": label,
                "data": {k: getattr(data, k) for k in _DATA_FIELDS}, "eval_domains": list(data.eval_domains),
                "eval_tokens": eval_tokens, "tokenizer": tok.fingerprint, "tokenizer_name": tok.name,
                "tokenizer_sha256": sha256_file(out / "tokenizer" / "tokenizer.json"), "corpora": files,
                "bytes": size}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _prefix(c: TokenizedCorpus, tokens: int) -> TokenizedCorpus:
    """The whole documents of c covering its first `tokens` tokens (the eval windows read a prefix)."""
    last = int(np.searchsorted(c.doc_offsets, tokens, side="left"))
    last = min(max(last, 1), c.num_docs)
    offsets = np.asarray(c.doc_offsets[: last + 1], dtype=np.int64)
    return TokenizedCorpus(c.name, np.asarray(c.tokens[: int(offsets[-1])]), offsets, c.manifest)


class Pack:
    """An opened pack: its manifest, tokenizer and corpora, every file checked against the manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.manifest = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.root / MANIFEST}: unreadable ({e}); rebuild the pack with `mhmoe data pack`")
        if self.manifest.get("format") != PACK_FORMAT or self.manifest.get("kind") != "mhmoe-token-pack":
            raise DataError(f"{self.root}: not a pack of format {PACK_FORMAT}; rebuild it with `mhmoe data pack`")
        self._check_file(self.root / "tokenizer" / "tokenizer.json", self.manifest["tokenizer_sha256"])
        self.tokenizer = Tokenizer.load(self.root / "tokenizer")

    def _check_file(self, path: Path, sha: str) -> None:
        if not path.is_file() or sha256_file(path) != sha:
            raise DataError(f"{path}: missing or not the file the pack was built with (sha256 differs); copy the "
                            "pack again or rebuild it with `mhmoe data pack`")

    def check(self, data: DataConfig) -> None:
        """DataError unless this pack holds what `data` reads (the fields that decide the tokens, the domains)."""
        built = self.manifest["data"]
        for k in _DATA_FIELDS:
            if built[k] != getattr(data, k):
                raise DataError(f"data.{k}: the pack {self.root} was built for {built[k]!r}, the run reads "
                                f"{getattr(data, k)!r}; build a pack for this preset (`mhmoe data pack`)")
        missing = [d for d in data.eval_domains if d not in self.manifest["corpora"]]
        if missing:
            raise DataError(f"data.eval_domains: the pack {self.root} has no {', '.join(missing)}; build a pack "
                            "for this preset (`mhmoe data pack`)")

    def corpus(self, name: str, tokenizer: Tokenizer, tokens: int = 0) -> TokenizedCorpus:
        """Corpus `name` as the token cache would give it; `tokens` > 0: the caller reads that many (an eval)."""
        entry = self.manifest["corpora"].get(name)
        if entry is None:
            raise DataError(f"{self.root}: the pack holds no corpus {name!r} (it has "
                            f"{', '.join(self.manifest['corpora'])}); build a pack for this preset")
        if tokenizer.fingerprint != self.manifest["tokenizer"]:
            raise DataError(f"{self.root}: built with another tokenizer than the run's; evaluate the run with "
                            "the data root or pack it was trained on")
        if tokens and name != self.manifest["data"]["train_corpus"] and tokens > entry["num_tokens"]:
            raise DataError(f"{self.root}: {name} holds {entry['num_tokens']:,} tokens, fewer than the "
                            f"{tokens:,} asked for; build the pack with more evaluation tokens")
        path = self.root / f"{name}.bin"
        self._check_file(path, entry["sha256"])
        self._check_file(self.root / f"{name}.docs.npy", entry["docs_sha256"])
        offsets = np.load(self.root / f"{name}.docs.npy", allow_pickle=False)
        tokens_arr = np.memmap(path, dtype=np.dtype(entry["dtype"]), mode="r", shape=(entry["num_tokens"],))
        return TokenizedCorpus(name, tokens_arr, offsets, {"pack": str(self.root), **entry})


def load_corpus(name: str, tokenizer: Tokenizer, root: Path, cache_dir: Path, max_bytes: int = 0,
                tokens: int = 0) -> TokenizedCorpus:
    """Corpus `name` from a pack (when `root` is one) or tokenised from the data root (cached); the one entry
    point for the training loop and evaluation. tokens: how many an evaluation reads (checked against a pack)."""
    if is_pack(root):
        return Pack(root).corpus(name, tokenizer, tokens)
    return tokenize_corpus(name, tokenizer, root, cache_dir, max_bytes)

