"""The hub path, offline: the reader on local datasets in `datasets`' own formats, and `mhmoe data prepare`'s
resumable, sha256-verified cache that `mhmoe.data` then reads instead of streaming."""

import json
from pathlib import Path

import pytest

from mhmoe.data import corpora as D
from mhmoe.data import documents as Doc
from mhmoe.data import prepare as P
from mhmoe.data import readers as Rd
from mhmoe.data import tokenizer as Tok
from mhmoe.errors import DataError
from mhmoe.fileio import sha256_file


@pytest.fixture
def datasets():
    """The `datasets` package, imported by the tests that write its formats (imported when pytest collects this
    module it costs every xdist worker about 0.6 s)."""
    return pytest.importorskip("datasets")


DOCS = [f"Document {i}: " + "word " * (i % 7 + 3) + "ünïcödé ✓" for i in range(40)]


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datasets) -> Path:
    """A parquet dataset folder standing in for the hub source of the `c4` corpus (train split)."""
    folder = tmp_path / "hub-c4"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": DOCS, "url": [f"u{i}" for i in range(len(DOCS))]}).to_parquet(
        str(folder / "train-00000.parquet"))
    spec = D.CORPORA["c4"]
    monkeypatch.setitem(D.CORPORA, "c4", D.CorpusSpec(spec.name, spec.role, spec.description, spec.sources,
                                                      D.HubSource(str(folder), None, "train", "all")))
    return folder


def test_hub_reader_streams_a_local_parquet_dataset(local_hub: Path) -> None:
    assert list(Doc.load_hub_corpus("c4")) == DOCS


def test_hub_reader_rebuilds_wikitext_articles_from_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          datasets) -> None:
    raw = " = Alpha = \n\n Alpha text .\n\n = = Sub = = \n\n more .\n\n = Beta = \n\n Beta text .\n"
    folder = tmp_path / "wt"
    folder.mkdir()
    lines = [l + "\n" for l in raw.split("\n")[:-1]]
    datasets.Dataset.from_dict({"text": lines}).to_json(str(folder / "test.jsonl"))
    spec = D.CORPORA["wikipedia"]
    monkeypatch.setitem(D.CORPORA, "wikipedia", D.CorpusSpec(spec.name, spec.role, spec.description, spec.sources,
                                                             D.HubSource(str(folder), None, "test", "wikitext")))
    src = tmp_path / "test.txt"
    src.write_text(raw)
    assert list(Doc.load_hub_corpus("wikipedia")) == list(Rd.read_wikitext(src))


def test_prepare_writes_a_verified_file_that_replaces_streaming(local_hub: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    m = P.prepare_corpus("c4", root, max_bytes=10**9, progress=False)
    assert m["records"] == len(DOCS) and m["complete"] and m["bytes"] == sum(len(d.encode()) for d in DOCS)
    path = root / "hub" / "c4.jsonl"
    assert sha256_file(path) == m["sha256"] == json.loads((root / "hub" / "c4.manifest.json").read_text())["sha256"]
    assert D.corpus_files("c4", root) == [path]
    assert list(Doc.iter_documents("c4", root)) == DOCS  # read from the prepared file, not the hub

    again = P.prepare_corpus("c4", root, max_bytes=10**9, progress=False, documents=iter(()))
    assert again == m  # already there: nothing fetched, the manifest returned as it is
    path.write_text(path.read_text().replace("Document 3", "Document 9"))  # bit rot
    Doc._VERIFIED.clear()
    with pytest.raises(DataError, match="sha256 differs from its manifest"):
        list(Doc.iter_documents("c4", root))


def test_prepare_stops_at_the_budget_and_extends_later(local_hub: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    small = P.prepare_corpus("c4", root, max_bytes=200, progress=False)
    assert not small["complete"] and 200 <= small["bytes"] < 200 + max(len(d.encode()) for d in DOCS)
    assert list(Doc.iter_documents("c4", root)) == DOCS[: small["records"]]
    full = P.prepare_corpus("c4", root, max_bytes=10**9, progress=False)
    assert full["complete"] and full["records"] == len(DOCS)


def test_prepare_resumes_after_an_interruption_with_identical_bytes(local_hub: Path, tmp_path: Path) -> None:
    ref = P.prepare_corpus("c4", tmp_path / "ref", max_bytes=10**9, progress=False)

    def interrupted():
        for i, d in enumerate(DOCS):
            if i == 17:
                raise KeyboardInterrupt
            yield d

    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        P.prepare_corpus("c4", root, max_bytes=10**9, progress=False, documents=interrupted())
    part = root / "hub" / "c4.jsonl.part"
    with open(part, "a", encoding="utf-8") as f:
        f.write('{"text": "torn')  # a write killed mid-line
    assert D.prepared_file("c4", root) is None  # an unfinished download is never read
    resumed = P.prepare_corpus("c4", root, max_bytes=10**9, progress=False)
    assert resumed["sha256"] == ref["sha256"] and not part.exists()


def test_preset_needs_cover_training_tokens_and_eval_windows() -> None:
    from mhmoe.training.presets import preset

    cfg = preset("cpu", "smoe")
    need = P.preset_needs(cfg)
    assert set(need) == {"redpajama-mix", "redpajama", "wikipedia", "c4"}
    assert need["redpajama-mix"] >= cfg.steps * cfg.tokens_per_step * 4
    assert need["c4"] == 8 * (cfg.data.max_eval_tokens + cfg.seq_len + 1)


def test_prepare_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mhmoe.cli import main

    monkeypatch.delenv("MHMOE_DATA_ROOT", raising=False)
    assert main(["data", "prepare", "--preset", "cpu"]) == 2
    assert "--data-root: required" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["data", "prepare", "--preset", "cpu", "--data-root", str(f)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_gpt2_tokenizer_comes_from_the_package_sample(tmp_path: Path) -> None:
    folder = P.prepare_gpt2_tokenizer(tmp_path)
    assert sha256_file(folder / "encoder.json") == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert sha256_file(folder / "vocab.bpe") == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    tok = Tok.build_tokenizer(D.DataConfig(tokenizer="gpt2"), tmp_path)
    assert tok.encode("Hello world") == [15496, 995]
