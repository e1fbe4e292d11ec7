"""`mhmoe eval --text` and `mhmoe generate` on a 2-step smoke run (and its ternary export): exact losses against
evaluate_corpus, file formats and folders that agree, seeded and greedy sampling, streaming, one-line errors."""

import gzip
import json
import math

import numpy as np
import pytest
import torch
from conftest import shared_data_root

from mhmoe.cli import main
from mhmoe.data.cache import TokenizedCorpus
from mhmoe.data.corpora import corpus_files
from mhmoe.data.readers import read_plain_text
from mhmoe.generate import StreamDecoder, sample_tokens, stream_generation
from mhmoe.training.evaluate import evaluate_corpus
from mhmoe.training.rundir import load_run

ROOT = shared_data_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="real corpora not available (set MHMOE_DATA_ROOT)")
KEYS = {"loss", "ppl", "tokens", "docs"}


def _shakespeare(start: int, n: int) -> str:
    (text,) = read_plain_text(corpus_files("tinyshakespeare", ROOT)[0])  # input.txt, or .txt.gz in the sample
    return text[start : start + n]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(out, cache, *extra):
    argv = ["train", "--preset", "smoke", "--model", "mhmoe-h2", "--out", str(out), "--set", "steps=2",
            "--set", "threads=1", *extra, "--no-progress", "--data-root", str(ROOT), "--cache-dir", str(cache)]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "h2"
    _train(out, cache)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache):
    base = tmp_path_factory.mktemp("bitnet")
    _train(base / "run", cache, "--set", "model.bitnet=true")
    assert main(["export", str(base / "run"), str(base / "out")]) == 0
    return base / "out"


@pytest.fixture(scope="module")
def loaded(run, cache):
    return load_run(run, None, str(ROOT), str(cache))


def _expected(loaded, docs, max_tokens=0):
    """evaluate_corpus on `docs` tokenised one by one with Tokenizer.encode, eos after each (the cache's layout)."""
    tok, cfg = loaded.tokenizer, loaded.cfg
    ids, offsets = [], [0]
    for d in docs:
        x = tok.encode(d) + [tok.eos_id]
        ids += x
        offsets.append(offsets[-1] + len(x))
    corpus = TokenizedCorpus("expected", np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64))
    return evaluate_corpus(loaded.model, corpus, cfg.seq_len, cfg.batch_size, max_tokens, loaded.device, loaded.dtype)


def _eval_json(capsys, run, path, *extra):
    capsys.readouterr()
    assert main(["eval", str(run), "--text", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_txt_equals_evaluate_corpus_exactly(tmp_path, capsys, run, loaded):
    text = _shakespeare(0, 6000)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    res = _eval_json(capsys, run, tmp_path / "play.txt")
    assert list(res["domains"]) == ["text:play.txt"]  # only the text without --domains
    got = res["domains"]["text:play.txt"]
    assert got == _expected(loaded, [text])
    assert got["tokens"] % loaded.cfg.seq_len == 0 and got["docs"] == 1 and math.isfinite(got["loss"])


def test_max_tokens_caps_the_text_like_a_domain(tmp_path, capsys, run, loaded):
    text = _shakespeare(0, 6000)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    got = _eval_json(capsys, run, tmp_path / "play.txt", "--max-tokens", "150")["domains"]["text:play.txt"]
    assert got["tokens"] == 128 and got == _expected(loaded, [text], 150)


def test_jsonl_and_gz_forms_equal_the_txt_form(tmp_path, capsys, run):
    text = _shakespeare(10_000, 5000)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    line = json.dumps({"text": text, "id": 7}) + "\n"
    (tmp_path / "a.jsonl").write_text("\n" + line, encoding="utf-8")  # blank lines are skipped
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(line.encode("utf-8"), mtime=0))
    results = {name: _eval_json(capsys, run, tmp_path / name)["domains"][f"text:{name}"]
               for name in ("a.txt", "a.jsonl", "a.txt.gz", "a.jsonl.gz")}
    assert len({json.dumps(r, sort_keys=True) for r in results.values()}) == 1, results


def test_folder_equals_its_files_concatenated_in_sorted_order(tmp_path, capsys, run, loaded):
    docs = [_shakespeare(20_000 + 1500 * i, 1500) for i in range(4)]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(docs[1], encoding="utf-8")  # written first: order must come from the names
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    records = "".join(json.dumps({"text": d}) + "\n" for d in docs[2:])
    (folder / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(records.encode("utf-8"), mtime=0))
    (folder / "README.md").write_text("not text for the model", encoding="utf-8")  # unsupported: ignored
    (folder / ".hidden.txt").write_bytes(b"\x00 binary")  # hidden: ignored (would fail if read)
    got = _eval_json(capsys, run, folder)["domains"]["text:corpus"]
    assert got == _expected(loaded, docs)
    assert got["docs"] == 4
    one = tmp_path / "all.jsonl"  # the same documents as one file: the same document boundaries, the same loss
    one.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert _eval_json(capsys, run, one)["domains"]["text:all.jsonl"] == got


def test_text_row_has_the_builtin_domains_shape(tmp_path, capsys, run, cache):
    (tmp_path / "t.txt").write_text(_shakespeare(0, 3000), encoding="utf-8")
    res = _eval_json(capsys, run, tmp_path / "t.txt", "--domains", "wikipedia", "--max-tokens", "128",
                     "--cache-dir", str(cache))
    assert list(res["domains"]) == ["wikipedia", "text:t.txt"]
    assert set(res["domains"]["wikipedia"]) == set(res["domains"]["text:t.txt"]) == KEYS
    assert set(res) == {"run", "step", "tokens_seen", "variant", "preset", "domains"}
    assert main(["eval", str(run), "--text", str(tmp_path / "t.txt")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["domain", "ppl", "loss", "tokens", "docs"] and table[2].split()[0] == "text:t.txt"


def test_text_and_generate_need_no_data_root(tmp_path, capsys, run, monkeypatch):
    monkeypatch.delenv("MHMOE_DATA_ROOT", raising=False)
    (tmp_path / "t.txt").write_text(_shakespeare(0, 3000), encoding="utf-8")
    assert _eval_json(capsys, run, tmp_path / "t.txt")["domains"]["text:t.txt"]["tokens"] > 0
    assert main(["generate", str(run), "--prompt", "KING:", "--max-new-tokens", "5"]) == 0


def _generate(capsys, run, *extra, prompt="ROMEO:"):
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "30", *extra]) == 0
    return capsys.readouterr().out


def _greedy(model, ids, n):
    """Greedy continuation computed directly: full forward each step (no KV cache), argmax of the last logits."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_generate_is_deterministic_per_seed(capsys, run):
    a, b = _generate(capsys, run, "--seed", "3"), _generate(capsys, run, "--seed", "3")
    assert a == b and a.startswith("ROMEO:") and a.endswith("\n")
    assert _generate(capsys, run, "--seed", "4") != a


def test_temperature_zero_is_the_greedy_continuation(capsys, run, loaded):
    out = _generate(capsys, run, "--temperature", "0")
    tok = loaded.tokenizer
    assert out == tok.decode(_greedy(loaded.model, tok.encode("ROMEO:"), 30)) + "\n"


def test_sampling_draws_like_transformer_generate(loaded):
    tok, model = loaded.tokenizer, loaded.model
    assert tok.vocab_size == model.cfg.vocab_size  # no vocab masking: the draws must coincide
    ids = tok.encode("JULIET: O")
    ours = list(sample_tokens(model, ids, 25, 0.8, 50, torch.Generator().manual_seed(11)))
    ref = model.generate(torch.tensor([ids]), 25, 0.8, 50, generator=torch.Generator().manual_seed(11))
    assert ours == ref[0, len(ids):].tolist()


def test_streamed_output_equals_the_final_text(capsys, run, loaded):
    tok = loaded.tokenizer
    pieces = []
    text = stream_generation(loaded.model, tok, "ROMEO:", 30, 1.5, 500, 5, pieces.append)
    ids = tok.encode("ROMEO:")
    drawn = list(sample_tokens(loaded.model, ids, 30, 1.5, 500, torch.Generator().manual_seed(5)))
    assert "".join(pieces) == text == tok.decode(ids + drawn)[len("ROMEO:"):]
    out = _generate(capsys, run, "--temperature", "1.5", "--top-k", "500", "--seed", "5")
    assert out == "ROMEO:" + text + "\n"


def test_stream_decoder_prints_multibyte_characters_whole(loaded):
    tok = loaded.tokenizer
    text = "héllo 日本語 🙂 naïve — ok"
    ids = tok.encode(text)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # some token splits a char
    dec = StreamDecoder(tok, tok.encode("Say: "))
    pieces = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_export_folder_evaluates_and_generates(tmp_path, capsys, exported, cache):
    text = _shakespeare(0, 3000)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    got = _eval_json(capsys, exported, tmp_path / "t.txt", "--max-tokens", "128")["domains"]["text:t.txt"]
    ints = load_run(exported, None, str(ROOT), str(cache))
    assert got == _expected(ints, [text], 128)
    out = _generate(capsys, exported, "--temperature", "0")
    tok = ints.tokenizer
    assert out == tok.decode(_greedy(ints.model, tok.encode("ROMEO:"), 30)) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit code 2 and one line naming the flag and the fix


def _one_line_error(capsys, argv, command):
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"mhmoe {command}: error: ")
    return lines[0]


BAD_TEXT = {  # file name -> (content, fragments of the message)
    "nope.txt": (None, ["--text:", "does not exist"]),
    "empty.txt": (b"", ["--text:", "empty.txt: file is empty"]),
    "blank.txt": (b"  \n\n\t", ["file is empty"]),
    "bom.txt": (b"\xef\xbb\xbf \n", ["bom.txt: no text after decoding"]),
    "nul.txt": (b"abc\x00def", ["nul.txt: binary data (NUL byte at offset 3)"]),
    "latin1.txt": (b"caf\xe9 au lait", ["latin1.txt: not valid UTF-8 (byte 0xe9 at offset 3)", "iconv"]),
    "plain.txt.gz": (b"just text", ["plain.txt.gz: not a valid gzip file", "re-compress"]),
    "cut.txt.gz": (gzip.compress(b"x" * 5000, mtime=0)[:20], ["cut.txt.gz: not a valid gzip file"]),
    "bin.txt.gz": (gzip.compress(b"\x00\x01\x02", mtime=0), ["bin.txt.gz: binary data"]),
    "bad.jsonl": (b'{"text": "fine"}\n{"text": oops}\n', ["bad.jsonl:2: not JSON", "fix or delete that line"]),
    "notext.jsonl": (b'{"body": "x"}\n', ['notext.jsonl:1: record has no string "text" field']),
    "number.jsonl": (b'{"text": "ok"}\n\n{"text": 5}\n', ['number.jsonl:3: record has no string "text"']),
    "list.jsonl": (b'["text"]\n', ["list.jsonl:1: record has no string"]),
    "emptytexts.jsonl": (b'{"text": ""}\n{"text": "  "}\n', ['all 2 "text" fields are empty']),
    "short.txt": (b"hi there", ["short.txt has", "fewer than the 65 one evaluation window needs", "longer text"]),
    "table.csv": (b"a,b\n1,2\n", ["table.csv is not a supported file type", ".txt"]),
}


@pytest.mark.parametrize("name", list(BAD_TEXT))
def test_bad_text_gives_one_line_error(tmp_path, capsys, run, name):
    content, fragments = BAD_TEXT[name]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    msg = _one_line_error(capsys, ["eval", str(run), "--text", str(tmp_path / name)], "eval")
    for f in fragments:
        assert f in msg, msg


def test_bad_text_folder_and_max_tokens(tmp_path, capsys, run):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("hello", encoding="utf-8")
    msg = _one_line_error(capsys, ["eval", str(run), "--text", str(tmp_path / "docs")], "eval")
    assert "folder" in msg and "has no .txt, .jsonl, .txt.gz, .jsonl.gz files" in msg
    (tmp_path / "t.txt").write_text(_shakespeare(0, 3000), encoding="utf-8")
    msg = _one_line_error(capsys, ["eval", str(run), "--text", str(tmp_path / "t.txt"), "--max-tokens", "10"], "eval")
    assert "--max-tokens: 10 is less than one evaluation window of 64" in msg and ">= 64" in msg


@pytest.mark.parametrize("extra, fragments", [
    (["--prompt", ""], ["--prompt: empty", "--prompt '<|endoftext|>'"]),
    (["--prompt", "ROMEO and JULIET " * 40, "--max-new-tokens", "1"],
     ["--prompt:", "tokens, longer than the model's context of 64 tokens", "shorten the prompt"]),
    (["--prompt", "ROMEO:", "--max-new-tokens", "-1"], ["--max-new-tokens: must be >= 0, got -1"]),
    (["--prompt", "ROMEO:"], ["--max-new-tokens:", "+ 100 new tokens exceed the model's context of 64 tokens",
                              "use --max-new-tokens <= "]),
    (["--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "-0.5"], ["--temperature: must be", ">= 0"]),
    (["--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "nan"], ["--temperature: must be a finite"]),
    (["--prompt", "ROMEO:", "--max-new-tokens", "5", "--top-k", "0"], ["--top-k: must be >= 1 (1 = greedy), got 0"]),
])
def test_bad_generate_flags_give_one_line_errors(capsys, run, extra, fragments):
    msg = _one_line_error(capsys, ["generate", str(run), *extra], "generate")
    for f in fragments:
        assert f in msg, msg


def test_generate_on_a_missing_run(tmp_path, capsys):
    msg = _one_line_error(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "x"], "generate")
    assert "RUN_DIR:" in msg and "is not a directory" in msg
