"""Tests of mhmoe.data: readers, corpus splits, tokenizers, the token cache and the samplers.

Most tests build a miniature data root in tmp_path; the few that read the real corpora (cheap ones only) skip when
neither $MHMOE_DATA_ROOT nor ../shared/data exists.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mhmoe.data.cache import TokenizedCorpus, tokenize_corpus
from mhmoe.data.corpora import (
    CORPORA,
    EOS,
    SAMPLE_ROOT,
    DataConfig,
    corpus_files,
    resolve_data_root,
)
from mhmoe.data.documents import iter_documents, load_hub_corpus
from mhmoe.data.readers import (
    read_gutenberg,
    read_jsonl,
    read_plain_text,
    read_wikiextractor,
    read_wikitext,
)
from mhmoe.data.sampler import TrainSampler, eval_windows
from mhmoe.data.tokenizer import Tokenizer, build_tokenizer
from mhmoe.errors import ConfigError, DataError

RP_DOMAINS = ("arxiv", "c4-rp", "cc", "github", "stackexchange")
WORDS = (
    "the of and to in a is was for on as with by he that at from his it an were are which this be or has "
    "also first had one their its new after who they two her she been other when time during there into "
    "school year city between high world"
).split()


def _text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(5, 15))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines)


def _one_line_error(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "meta": {"i": i}}) + "\n" for i, t in enumerate(texts)))


def make_root(base: Path) -> Path:
    """A miniature data root with every corpus of CORPORA, in the real layout and formats."""
    root = base / "data"
    wiki = root / "wikipedia_en" / "dump" / "AA"
    wiki.mkdir(parents=True)
    for f in range(2):
        docs = [
            f'<doc id="{f}{i}" url="http://x/{f}{i}" title="T{f}{i}">\n'
            f"T{f}{i}\n\n{_text(100 + 10 * f + i, 150)}\n</doc>\n"
            for i in range(4)
        ]
        (wiki / f"wiki_0{f}").write_text("".join(docs))
    books = root / "books_gutenberg"
    books.mkdir()
    for b in range(2):
        body = _text(200 + b, 1500).replace("\n", "\r\n")
        (books / f"book{b}.txt").write_bytes(
            (
                f"The Project Gutenberg EBook of Book {b}\r\nLicence header\r\n\r\n"
                f"*** START OF THIS PROJECT GUTENBERG EBOOK BOOK {b} ***\r\n\r\n{body}\r\n\r\n"
                f"*** END OF THIS PROJECT GUTENBERG EBOOK BOOK {b} ***\r\nLicence footer\r\n"
            ).encode()
        )
    for j, d in enumerate(RP_DOMAINS):
        for part in (1, 2):
            texts = [f"{d} part {part} doc {i}. " + _text(1000 * part + 50 * j + i, 60) for i in range(6)]
            _write_jsonl(root / "redpajama_sample" / d / f"sample_{d}{part}.jsonl", texts)
    (root / "redpajama_sample" / "wiki").mkdir()
    _write_jsonl(root / "redpajama_sample" / "wiki" / "sample_wiki1.jsonl", ["Български текст"])
    wt = root / "wikitext2"
    wt.mkdir()
    for split, seed in (("test", 300), ("valid", 400)):
        arts = [
            f" = {split} Article {a} = \n \n {_text(seed + a, 80)} @-@ end \n \n"
            f" = = Section = = \n \n {_text(seed + 50 + a, 40)} \n \n"
            for a in range(3)
        ]
        (wt / f"{split}.txt").write_text(" \n" + "".join(arts))
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(_text(7, 6000))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def small_bpe(root: Path) -> Tokenizer:
    return build_tokenizer(DataConfig(train_corpus="tinyshakespeare", vocab_size=400), root)


def real_root() -> Path:
    """The full corpora when present, else the real-text sample carried in the package (a fresh clone)."""
    for cand in (os.environ.get("MHMOE_DATA_ROOT"), Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand and (Path(cand) / "redpajama_sample").is_dir():
            return Path(cand).resolve()
    return SAMPLE_ROOT


def _corpus(tokens: np.ndarray, name: str = "t") -> TokenizedCorpus:
    return TokenizedCorpus(name, tokens, np.array([0, len(tokens)], dtype=np.int64))


# ------------------------------------------------------------------------------------------------ readers


def test_read_wikitext_splits_at_top_level_headings_only(tmp_path: Path) -> None:
    text = (
        " \n = Alpha = \n \n Alpha text with 1 @,@ 000 and well @-@ known . \n \n = = Sub = = \n \n more \n"
        " = Qualified for the next round \n = Beta = \n \n beta text \n"
    )
    p = tmp_path / "w.txt"
    p.write_text(text)
    docs = list(read_wikitext(p))
    assert len(docs) == 2
    assert docs[0].startswith(" \n = Alpha = \n") and " = = Sub = = " in docs[0] and "next round" in docs[0]
    assert docs[1].startswith(" = Beta = \n")
    assert "".join(docs) == text  # raw WikiText kept byte for byte, @-@ included


def test_read_wikiextractor_bodies(tmp_path: Path) -> None:
    p = tmp_path / "wiki_00"
    p.write_text(
        '<doc id="1" url="u1" title="A">\nA\n\nAlpha body.\n</doc>\n'
        '<doc id="2" url="u2" title="Empty">\n\n</doc>\n'
        '<doc id="3" url="u3" title="B">\nB\n\nBeta <b>body</b>.\n</doc>\n'
    )
    assert list(read_wikiextractor(p)) == ["A\n\nAlpha body.", "B\n\nBeta <b>body</b>."]
    bad = tmp_path / "wiki_01"
    bad.write_text('<doc id="1" url="u" title="A">\nA\n</doc>\nstray line\n<doc id="2" url="u" title="B">\nB\n')
    with pytest.raises(DataError) as e:
        list(read_wikiextractor(bad))
    _one_line_error(e, "wiki_01:4")  # the stray line
    unclosed = tmp_path / "wiki_02"
    unclosed.write_text('<doc id="1" url="u" title="A">\nA\n<doc id="2" url="u" title="B">\nB\n</doc>\n')
    with pytest.raises(DataError) as e:
        list(read_wikiextractor(unclosed))
    _one_line_error(e, "wiki_02:1", "</doc>")


def test_read_gutenberg_strips_header_footer_with_crlf(tmp_path: Path) -> None:
    p = tmp_path / "pg.txt"
    p.write_bytes(
        b"\xef\xbb\xbfThe Project Gutenberg EBook\r\nLICENCE HEADER\r\n"
        b"***START OF THE PROJECT GUTENBERG EBOOK\r\nA LONG TITLE***\r\n\r\n"  # marker wrapped over two lines
        b"Chapter 1\r\n\r\nIt was a dark night.\r\n\r\n"
        b"        *** END OF THE PROJECT GUTENBERG EBOOK A LONG TITLE ***\r\nLICENCE FOOTER\r\n"
    )
    assert list(read_gutenberg(p)) == ["Chapter 1\n\nIt was a dark night."]
    nomark = tmp_path / "plain.txt"
    nomark.write_text("just a text\n")
    with pytest.raises(DataError) as e:
        list(read_gutenberg(nomark))
    _one_line_error(e, "plain.txt", "START OF")


def test_read_jsonl_and_plain(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text(
        '{"text": "first \\u00e9", "meta": {}}\n\n{"pred_label": "w", "text": "second\\nline"}\n{"text": ""}\n'
    )
    assert list(read_jsonl(p)) == ["first é", "second\nline"]
    t = tmp_path / "t.txt"
    t.write_bytes(b"a\r\nb\n")
    assert list(read_plain_text(t)) == ["a\nb\n"]


@pytest.mark.parametrize("reader", [read_plain_text, read_wikitext, read_wikiextractor, read_gutenberg, read_jsonl])
def test_empty_file_is_a_one_line_error(tmp_path: Path, reader) -> None:
    p = tmp_path / "empty_input.txt"
    p.write_bytes(b"")
    with pytest.raises(DataError) as e:
        list(reader(p))
    _one_line_error(e, "empty_input.txt", "empty")


def test_non_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(read_plain_text(p))
    _one_line_error(e, "latin1.txt", "UTF-8", "offset 3")
    j = tmp_path / "latin1.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        list(read_jsonl(j))
    _one_line_error(e, "latin1.jsonl:2", "UTF-8")


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "unterminated\n{"text": "ok"}\n')
    with pytest.raises(DataError) as e:
        list(read_jsonl(p))
    _one_line_error(e, "bad.jsonl:2", "malformed JSON")
    q = tmp_path / "notext.jsonl"
    q.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError) as e:
        list(read_jsonl(q))
    _one_line_error(e, "notext.jsonl:1", '"text"')


# ------------------------------------------------------------------------------------------------ roots and corpora


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MHMOE_DATA_ROOT", raising=False)
    assert resolve_data_root(None) == SAMPLE_ROOT  # a fresh clone: the embedded sample
    assert resolve_data_root(None, "demo") == SAMPLE_ROOT and resolve_data_root(None, "smoke") == SAMPLE_ROOT
    with pytest.raises(DataError) as e:
        resolve_data_root(None, "cpu")
    _one_line_error(e, "preset 'cpu' needs the full corpora", "mhmoe data prepare --preset cpu", "MHMOE_DATA_ROOT")
    with pytest.raises(DataError) as e:
        resolve_data_root(tmp_path / "nope")
    _one_line_error(e, "nope", "MHMOE_DATA_ROOT")
    monkeypatch.setenv("MHMOE_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_root(other) == other.resolve()  # the explicit argument wins over the environment


def test_unknown_corpus_name(root: Path, small_bpe: Tokenizer, tmp_path: Path) -> None:
    for call in (
        lambda: iter_documents("wikipedia2", root),
        lambda: corpus_files("wikipedia2", root),
        lambda: tokenize_corpus("wikipedia2", small_bpe, root, tmp_path),
    ):
        with pytest.raises(DataError) as e:
            call()
        _one_line_error(e, "'wikipedia2'", "redpajama-mix")


def test_data_config_validation() -> None:
    assert DataConfig().tokenizer == "bpe"
    assert DataConfig.from_dict({"eval_domains": "c4,wikipedia"}).eval_domains == ("c4", "wikipedia")
    bads = (
        {"vocab_size": 256},
        {"vocab_size": 2**32},
        {"train_corpus": "nope"},
        {"train_corpus": "c4"},  # a held-out corpus
        {"eval_domains": ["redpajama-mix"]},  # training data is not an evaluation domain
        {"max_train_bytes": -1},
    )
    for bad in bads:
        with pytest.raises(ConfigError) as e:
            DataConfig.from_dict(bad)
        _one_line_error(e, next(iter(bad)))


def test_corpus_document_counts_and_order(root: Path) -> None:
    assert len(list(iter_documents("wikipedia", root))) == 3
    assert len(list(iter_documents("c4", root))) == 6
    assert len(list(iter_documents("redpajama", root))) == 30
    mix = list(iter_documents("redpajama-mix", root))
    assert len(mix) == 8 + 2 + 30  # wiki articles + books + RP *1 docs; the Bulgarian wiki domain is skipped
    assert not any("Български" in d for d in mix)
    assert mix == list(iter_documents("redpajama-mix", root))


def test_train_mix_prefix_interleaves_domains(root: Path) -> None:
    full = list(iter_documents("redpajama-mix", root))
    cap = 12_000
    prefix = list(iter_documents("redpajama-mix", root, max_bytes=cap))
    assert sum(len(d.encode()) for d in prefix) <= cap
    assert prefix[:-1] == full[: len(prefix) - 1] and full[len(prefix) - 1].startswith(prefix[-1])
    source_of = {}
    for f in sorted((root / "wikipedia_en").rglob("wiki_*")):
        source_of.update({d: "wiki" for d in read_wikiextractor(f)})
    for f in sorted((root / "books_gutenberg").glob("*.txt")):
        source_of.update({d: "book" for d in read_gutenberg(f)})
    for d in RP_DOMAINS:
        source_of.update({t: d for t in read_jsonl(root / "redpajama_sample" / d / f"sample_{d}1.jsonl")})
    kinds = {source_of[d] for d in prefix[:-1]}
    assert {"wiki", "book"} <= kinds and len(kinds & set(RP_DOMAINS)) >= 3, kinds


def test_train_and_eval_share_no_file(root: Path) -> None:
    train = set(corpus_files("redpajama-mix", root))
    for name, spec in CORPORA.items():
        if spec.role == "eval":
            assert train.isdisjoint(corpus_files(name, root)), name


def test_train_drops_documents_identical_to_eval(tmp_path: Path) -> None:
    r = make_root(tmp_path)
    dup = "A templated README that occurs verbatim in both files."
    for part in (1, 2):
        p = r / "redpajama_sample" / "github" / f"sample_github{part}.jsonl"
        p.write_text(p.read_text() + json.dumps({"text": dup}) + "\n")
    assert dup in list(iter_documents("redpajama", r))
    assert dup not in list(iter_documents("redpajama-mix", r))


def test_partial_corpus_and_missing_hub(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = make_root(tmp_path)
    (partial / "redpajama_sample" / "cc" / "sample_cc1.jsonl").unlink()
    with pytest.raises(DataError) as e:
        iter_documents("redpajama-mix", partial)
    _one_line_error(e, "sample_cc1.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        iter_documents("c4", empty)
    _one_line_error(e, "redpajama_sample/c4-rp/sample_c4-rp2.jsonl", "datasets")
    with pytest.raises(DataError) as e:
        load_hub_corpus("tinyshakespeare")
    _one_line_error(e, "tinyshakespeare/input.txt")


def test_hub_fallback_with_stub_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(path: str, config: str | None, split: str, streaming: bool) -> list[dict[str, str]]:
        assert streaming
        if path == "allenai/c4":
            raise ConnectionError("hub unreachable\nwith a multi-line traceback")
        if path == "Salesforce/wikitext":  # the hub stores raw WikiText one line per record
            return [{"text": t} for t in ("", " = A = \n", " a \n", " = = S = = \n", " = B = \n", " b \n")]
        assert path == "DKYoon/SlimPajama-6B"  # parquet with its own splits, not the loading-script sample
        return [{"text": f"redpajama {split} doc {i}"} for i in range(500)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    empty = tmp_path / "empty_root"
    empty.mkdir()
    assert list(iter_documents("wikipedia", empty)) == [" = A = \n a \n = = S = = \n", " = B = \n b \n"]
    train, val = list(iter_documents("redpajama-mix", empty)), list(iter_documents("redpajama", empty))
    assert len(train) == len(val) == 500 and set(train).isdisjoint(val)  # the source's train / validation splits
    assert train[0] == "redpajama train doc 0" and val[0] == "redpajama validation doc 0"
    with pytest.raises(DataError) as e:
        list(iter_documents("c4", empty))
    _one_line_error(e, "allenai/c4", "ConnectionError", "sample_c4-rp2.jsonl")


# ------------------------------------------------------------------------------------------------ tokenizers

TRICKY = ["Hello world", "  two  spaces\r\n\ttab", "caf\u00e9 \U0001f600 \u4e2d\u6587", "x" * 300, "a" + EOS + "b", ""]


def test_bpe_training_is_deterministic_and_lossless(root: Path, small_bpe: Tokenizer) -> None:
    again = build_tokenizer(DataConfig(train_corpus="tinyshakespeare", vocab_size=400), root)
    assert again.fingerprint == small_bpe.fingerprint
    assert small_bpe.name == "bpe-400" and small_bpe.vocab_size == 400 and small_bpe.eos_id == 0
    sample = _text(7, 200)
    assert again.encode(sample) == small_bpe.encode(sample)
    assert len(small_bpe.encode(sample)) < len(sample.encode()) / 2  # merges learned: well under one id per byte
    for s in TRICKY:
        assert small_bpe.decode(small_bpe.encode(s)) == s
    assert small_bpe.encode(EOS) == [small_bpe.eos_id]
    assert small_bpe.encode_batch(TRICKY) == [small_bpe.encode(s) for s in TRICKY]


def test_tokenizer_save_load_roundtrip(tmp_path: Path, small_bpe: Tokenizer) -> None:
    small_bpe.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.load(tmp_path / "tok")
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == (small_bpe.name, small_bpe.vocab_size, small_bpe.eos_id)
    assert loaded.fingerprint == small_bpe.fingerprint
    assert loaded.encode_batch(TRICKY) == small_bpe.encode_batch(TRICKY)
    with pytest.raises(DataError) as e:
        Tokenizer.load(tmp_path / "missing")
    _one_line_error(e, "tokenizer.json")


def test_gpt2_tokenizer_real_files(tmp_path: Path) -> None:
    r = real_root()
    gpt2 = build_tokenizer(DataConfig(tokenizer="gpt2"), r)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.name, gpt2.vocab_size, gpt2.eos_id) == ("gpt2", 50257, 50256)
    for s in TRICKY:
        assert gpt2.decode(gpt2.encode(s)) == s
    gpt2.save(tmp_path)
    assert Tokenizer.load(tmp_path).name == "gpt2"
    # Per-article tokenisation of raw WikiText-2 test matches the whole-file GPT-2 count (286,221 for the full
    # file, PROVENANCE.md; for the sample's prefix of whole articles, the count of that prefix as one string).
    wiki = tokenize_corpus("wikipedia", gpt2, r, tmp_path / "cache")
    if r == SAMPLE_ROOT:
        whole = gzip.decompress((r / "wikitext2" / "test.txt.gz").read_bytes()).decode()
        assert wiki.num_docs == 15 and wiki.num_tokens - wiki.num_docs == len(gpt2.encode(whole))
    else:
        assert wiki.num_docs == 62 and wiki.num_tokens - wiki.num_docs == 286_221


# ------------------------------------------------------------------------------------------------ token cache


class _Counting:
    def __init__(self, tok: Tokenizer) -> None:
        self.calls = 0
        self._encode_batch = tok.encode_batch

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return self._encode_batch(texts)


def test_tokenize_layout_eos_and_offsets(tmp_path: Path, root: Path, small_bpe: Tokenizer) -> None:
    c = tokenize_corpus("redpajama", small_bpe, root, tmp_path)
    docs = list(iter_documents("redpajama", root))
    assert c.tokens.dtype == np.uint16 and c.doc_offsets.dtype == np.int64
    assert c.num_docs == len(docs) and c.doc_offsets[0] == 0 and c.doc_offsets[-1] == c.num_tokens
    assert (c.tokens[c.doc_offsets[1:] - 1] == small_bpe.eos_id).all()
    for i in (0, 7, len(docs) - 1):
        a, b = c.doc_offsets[i], c.doc_offsets[i + 1]
        assert small_bpe.decode(c.tokens[a : b - 1].tolist()) == docs[i]
    assert c.manifest["num_tokens"] == c.num_tokens and c.manifest["tokenizer"] == small_bpe.fingerprint
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    wide = tokenize_corpus("redpajama", small_bpe, root, tmp_path, dtype="uint32")
    assert wide.tokens.dtype == np.uint32 and np.array_equal(wide.tokens, c.tokens)


def test_cache_reuse_and_invalidation(tmp_path: Path, small_bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_root(tmp_path)
    cache = tmp_path / "cache"
    counter = _Counting(small_bpe)
    monkeypatch.setattr(small_bpe, "encode_batch", counter)
    first = tokenize_corpus("c4", small_bpe, r, cache)
    built = counter.calls
    assert built >= 1
    (bin_path,) = cache.glob("c4-*.bin")
    mtime = bin_path.stat().st_mtime_ns
    second = tokenize_corpus("c4", small_bpe, r, cache)
    assert counter.calls == built and bin_path.stat().st_mtime_ns == mtime  # reused, not re-tokenised
    assert np.array_equal(first.tokens, second.tokens)
    src = r / "redpajama_sample" / "c4-rp" / "sample_c4-rp2.jsonl"
    _write_jsonl(src, ["a changed document"] + [json.loads(x)["text"] for x in src.read_text().splitlines()])
    third = tokenize_corpus("c4", small_bpe, r, cache)
    assert counter.calls > built and third.num_docs == first.num_docs + 1
    assert small_bpe.decode(third.tokens[: third.doc_offsets[1] - 1].tolist()) == "a changed document"
    recorded = third.manifest["inputs"]["redpajama_sample/c4-rp/sample_c4-rp2.jsonl"]
    assert recorded == hashlib.sha256(src.read_bytes()).hexdigest()
    calls, expected = counter.calls, np.array(third.tokens)  # copy: the memmap's file is truncated next
    del third
    bin_path.write_bytes(bin_path.read_bytes()[:-2])  # a truncated .bin no longer matches the manifest's count
    assert np.array_equal(tokenize_corpus("c4", small_bpe, r, cache).tokens, expected)
    assert counter.calls > calls
    capped = tokenize_corpus("c4", small_bpe, r, cache, max_bytes=500)
    assert capped.manifest["text_bytes"] <= 500 and len(list(cache.glob("c4-*.bin"))) == 2


def test_interrupted_build_is_not_reused(
    tmp_path: Path, root: Path, small_bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tokenize_corpus("wikipedia", small_bpe, root, tmp_path)
    (manifest,) = tmp_path.glob("wikipedia-*.json")
    manifest.write_text(manifest.read_text().replace(good.manifest["inputs"]["wikitext2/test.txt"], "0" * 64))

    def boom(texts: list[str]) -> list[list[int]]:
        raise KeyboardInterrupt

    monkeypatch.setattr(small_bpe, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus("wikipedia", small_bpe, root, tmp_path)
    assert not list(tmp_path.glob("wikipedia-*.json")) and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert np.array_equal(tokenize_corpus("wikipedia", small_bpe, root, tmp_path).tokens, good.tokens)


def test_vocab_too_large_for_uint16(tmp_path: Path, root: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {f"w{i}": i for i in range(70_000)} | {EOS: 70_000, "[UNK]": 70_001}
    big = Tokenizer(HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    with pytest.raises(DataError) as e:
        tokenize_corpus("c4", big, root, tmp_path, dtype="uint16")
    _one_line_error(e, "vocab too large for uint16", "uint32")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ samplers


def test_train_sampler_is_a_pure_function_of_seed_and_step() -> None:
    corpus = _corpus(np.arange(10_000, dtype=np.uint16))
    a = TrainSampler(corpus, seq_len=16, batch_size=4, seed=1)
    b = TrainSampler(corpus, seq_len=16, batch_size=4, seed=1)  # a "resumed" run: fresh object, same step
    x, y = a.batch(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, b.batch(5)[0]) and torch.equal(y, b.batch(5)[1])
    assert not torch.equal(x, a.batch(6)[0])
    assert not torch.equal(x, a.batch(5, micro=1)[0])
    assert not torch.equal(x, TrainSampler(corpus, 16, 4, seed=2).batch(5)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(y - x, torch.ones_like(x))  # contiguous windows (tokens here are their own offsets)


def test_train_sampler_two_ranks_equal_one_rank_double_batch() -> None:
    corpus = _corpus(np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16))
    single = TrainSampler(corpus, seq_len=32, batch_size=6, seed=3)
    ranks = [TrainSampler(corpus, seq_len=32, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for step, micro in ((0, 0), (9, 2)):
        xs, ys = single.batch(step, micro)
        parts = [rk.batch(step, micro) for rk in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), xs)
        assert torch.equal(torch.cat([p[1] for p in parts]), ys)


def test_train_sampler_rejects_short_corpus() -> None:
    with pytest.raises(DataError) as e:
        TrainSampler(_corpus(np.arange(16, dtype=np.uint16), "tiny"), seq_len=16, batch_size=1, seed=0)
    _one_line_error(e, "'tiny'", "seq_len")
    TrainSampler(_corpus(np.arange(17, dtype=np.uint16)), seq_len=16, batch_size=1, seed=0).batch(0)  # exactly fits


def test_eval_windows_tile_targets_without_overlap() -> None:
    tokens = np.arange(1000, dtype=np.uint32)
    corpus = _corpus(tokens)
    w = eval_windows(corpus, seq_len=64)
    assert w.shape == (999 // 64, 65) and w.dtype == torch.int64
    assert torch.equal(w, eval_windows(corpus, seq_len=64))
    assert torch.equal(w[1:, 0], w[:-1, -1])  # each window's context starts at the previous window's last target
    targets = w[:, 1:].reshape(-1)
    assert torch.equal(targets, torch.arange(1, 1 + targets.numel()))  # every target once, from token 1, in order
    capped = eval_windows(corpus, seq_len=64, max_tokens=200)
    assert capped.shape[0] * 64 <= 200 and torch.equal(capped, w[: capped.shape[0]])
    with pytest.raises(DataError) as e:
        eval_windows(corpus, seq_len=64, max_tokens=10)
    _one_line_error(e, "seq_len")


# ------------------------------------------------------------------------------------------------ real data


def test_real_train_and_eval_share_no_file_or_document() -> None:
    r = real_root()
    train_files = set(corpus_files("redpajama-mix", r))
    assert len(train_files) == 54
    train = {hashlib.sha256(d.strip().encode()).digest() for d in iter_documents("redpajama-mix", r)}
    for name in ("redpajama", "wikipedia", "wikipedia-valid", "c4"):
        if name == "wikipedia-valid" and r == SAMPLE_ROOT:
            continue  # the sample carries the reported test split only
        assert train_files.isdisjoint(corpus_files(name, r)), name
        held = {hashlib.sha256(d.strip().encode()).digest() for d in iter_documents(name, r)}
        assert held and train.isdisjoint(held), name
