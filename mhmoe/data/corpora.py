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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mhmoe.configbase import Config
from mhmoe.errors import ConfigError, DataError

EOS = "<|endoftext|>"
ENV_DATA_ROOT = "MHMOE_DATA_ROOT"
GPT2_EOS_ID = 50256
# Bump when the on-disk token cache layout or the document extraction changes, so old caches are rebuilt.
CACHE_FORMAT = 1



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


def corpus_spec(name: str) -> CorpusSpec:
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


def source_files(spec: CorpusSpec, root: Path) -> list[tuple[Source, list[Path]]]:
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
    groups = source_files(corpus_spec(name), root)
    check_complete(name, root, groups)
    files = [p for _, files in groups for p in files]
    if not files and (prepared := prepared_file(name, root)) is not None:
        return [prepared]
    return files


def check_complete(name: str, root: Path, groups: list[tuple[Source, list[Path]]]) -> None:
    missing = [s.pattern for s, files in groups if not files]
    if missing and len(missing) < len(groups):
        # A silently partial mix would train on different data than the config says; refuse instead.
        raise DataError(
            f"corpus {name!r}: no files match {missing[0]} under {root} although other sources exist; "
            f"restore it (see PROVENANCE.md) or remove the whole corpus to use the hub fallback"
        )
