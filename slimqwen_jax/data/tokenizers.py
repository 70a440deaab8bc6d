"""Tokenizers behind one small interface: `encode`, `encode_batch`, `decode`, `vocab_size`, `eos_id`.

`ByteTokenizer` (UTF-8 bytes, EOS = 256) needs no files; `HFTokenizer` reads any HF
`tokenizer.json` through the `tokenizers` package. `name` identifies a tokenizer for cache keys.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from slimqwen_jax.data.sources import DataError

COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256 (vocab_size 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    eos_token = "<|endoftext|>"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)  # [n]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Bytes decoded as UTF-8 (invalid sequences replaced); each EOS shows as `<|endoftext|>`."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > self.eos_id):
            raise DataError(f"byte tokenizer ids must lie in [0, {self.eos_id}], got [{ids.min()}, {ids.max()}]")
        pieces = np.split(ids, np.flatnonzero(ids == self.eos_id))
        texts = [bytes(p[p != self.eos_id].astype(np.uint8)).decode("utf-8", errors="replace") for p in pieces]
        return self.eos_token.join(texts)


class HFTokenizer:
    """A HF `tokenizer.json`; EOS is `eos_token` or else the first of COMMON_EOS_TOKENS in the vocab."""

    def __init__(self, path: str | pathlib.Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer  # the `tokenizers` package, not this module

        path = pathlib.Path(path)
        try:
            self._tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"cannot load tokenizer {path}: {e}") from None
        candidates = (eos_token,) if eos_token is not None else COMMON_EOS_TOKENS
        found = [(tok, self._tokenizer.token_to_id(tok)) for tok in candidates]
        found = [(tok, i) for tok, i in found if i is not None]
        if not found:
            raise DataError(f"tokenizer {path} has none of the EOS tokens {list(candidates)}; pass eos_token=")
        self.eos_token, self.eos_id = found[0]
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        self.name = f"hf-{digest}-eos{self.eos_id}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)  # [n]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes in parallel on the Rust side."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids) -> str:
        """Text with special tokens (EOS included) kept visible."""
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def make_tokenizer(name_or_path: str, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """ "byte", or a HF `tokenizer.json` (or a directory holding one)."""
    if name_or_path == "byte":
        return ByteTokenizer()
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path, eos_token)
    raise DataError(f"unknown tokenizer {name_or_path!r}: use 'byte' or a path to a HF tokenizer.json")
