"""Token packs: a run on a pack equals the run on the data root it was built from; a pack that does not hold what a
config reads, or whose files changed, is refused with one line."""

import json

import pytest
from conftest import shared_data_root

from mhmoe.cli import main
from mhmoe.data.pack import MANIFEST, Pack, build_pack, is_pack
from mhmoe.errors import DataError
from mhmoe.training.loop import train
from mhmoe.training.presets import preset

ROOT = shared_data_root()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("pack")
    cfg = preset("smoke", "smoe").replace(steps=4, eval_every=2)
    m = build_pack(cfg.data, cfg.data.max_eval_tokens + cfg.seq_len, ROOT, base / "pack", base / "cache", "smoke")
    return base, cfg, m


def _lines(path):
    return path.read_text().splitlines()


def test_a_run_on_the_pack_equals_the_run_on_the_data_root(packed):
    base, cfg, m = packed
    assert is_pack(base / "pack") and m["built_for"] == "smoke" and m["data"]["vocab_size"] == 512
    assert set(m["corpora"]) == {"tinyshakespeare", *cfg.data.eval_domains}
    train(cfg, base / "from-root", ROOT, base / "cache", progress=False)
    train(cfg, base / "from-pack", base / "pack", base / "other-cache", progress=False)
    losses = [[json.loads(l)["loss"] for l in _lines(base / r / "metrics.jsonl")] for r in ("from-root", "from-pack")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert _lines(base / "from-root" / "evals.jsonl") == _lines(base / "from-pack" / "evals.jsonl")
    assert not (base / "other-cache").exists()  # nothing tokenised: the pack is read as it is
    # evaluation from the pack (the milestone evaluation reads max_eval_tokens per domain)
    assert main(["eval", str(base / "from-pack"), "--data-root", str(base / "pack"), "--json"]) == 0


def test_a_pack_refuses_another_config_and_changed_files(packed, tmp_path):
    base, cfg, _ = packed
    pack = Pack(base / "pack")
    with pytest.raises(DataError, match=r"data.vocab_size: the pack .* was built for 512, the run reads 1024"):
        pack.check(cfg.data.replace(vocab_size=1024))
    with pytest.raises(DataError, match="holds no corpus 'redpajama-mix'"):
        pack.corpus("redpajama-mix", pack.tokenizer)
    with pytest.raises(DataError, match="fewer than the"):
        pack.corpus("c4", pack.tokenizer, tokens=10**9)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base / "pack", copy)
    data = bytearray((copy / "c4.bin").read_bytes())
    data[0] ^= 1
    (copy / "c4.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"c4.bin: missing or not the file the pack was built with"):
        Pack(copy).corpus("c4", pack.tokenizer)
    (copy / MANIFEST).write_text("{")
    with pytest.raises(DataError, match="unreadable"):
        Pack(copy)


def test_pack_cli_size_cap_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["data", "pack", "--preset", "smoke", "--data-root", str(ROOT), "--out", str(out), "--cache-dir",
            str(tmp_path / "cache")]
    assert main(argv + ["--max-mib", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-mib: the pack would take" in err and not out.exists()
    assert main(argv) == 0 and is_pack(out)
    assert "train from it with --data-root" in capsys.readouterr().out
    # a run whose config differs from the pack's: one line, before the run directory is written
    assert main(["train", "--preset", "smoke", "--model", "smoe", "--out", str(tmp_path / "r"), "--data-root",
                 str(out), "--set", "data.vocab_size=1024", "--set", "model.vocab_size=1024", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.vocab_size: the pack" in err and not (tmp_path / "r").exists()
