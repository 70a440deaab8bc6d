"""Where documents and token streams come from, and how they split into train and held-out.

Document sources (`stdlib`, `text`, `jsonl`) yield `(key, text)` pairs; the key decides the split
through a stable hash (sha1, never Python's salted `hash()`), so a document lands in the same split
on every machine and run. The `tokens` source is a memory-mapped 1-D array whose last
`heldout_fraction` is held out.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import pathlib
import sysconfig
from collections.abc import Sequence

import numpy as np

from slimqwen_jax import storage

DOCUMENT_SOURCES = ("stdlib", "text", "jsonl")
SOURCES = DOCUMENT_SOURCES + ("tokens",)
SPLITS = ("train", "heldout")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}

Document = tuple[str, str]  # (split key, text)


class DataError(ValueError):
    """A data source, tokenizer or data config that cannot feed the pipeline."""


# ---------------------------------------------------------------------------- paths
def resolve_paths(paths: str | Sequence[str]) -> list[pathlib.Path]:
    """Files named by `paths`: a comma-separated string or a list of paths and globs.

    Globs (`*`, `?`, `[`; `**` recurses) expand to their matching files, sorted. Raises one
    DataError naming every missing path and every glob that matches no file.
    """
    entries = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else [str(p).strip() for p in paths]
    entries = [e for e in entries if e]
    if not entries:
        raise DataError("no paths given: set data.paths to files or globs (comma-separated or a list)")
    files, problems = [], []
    for entry in entries:
        expanded = entry if storage.is_url(entry) else os.path.expanduser(entry)
        path = storage.path(expanded)
        if any(c in expanded for c in "*?["):
            matches = _glob(expanded)
            if not matches:
                problems.append(f"glob {entry!r} matches no file")
            files += matches
        elif path.is_dir():
            problems.append(f"{entry!r} is a directory; name its files with a glob such as '{entry}/**/*.txt'")
        elif not path.is_file():
            problems.append(f"path {entry!r} does not exist")
        else:
            files.append(path)
    if problems:  # one line for one problem, else one line each
        raise DataError("cannot read data paths:" + ("\n  " if len(problems) > 1 else " ") + "\n  ".join(problems))
    return files


def _glob(pattern: str) -> list[pathlib.Path]:
    """The files `pattern` matches, sorted; at a URL, through `storage.path` from the pattern's
    last directory before its first wildcard."""
    if not storage.is_url(pattern):
        return [pathlib.Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
    wildcard = min(pattern.index(c) for c in "*?[" if c in pattern)
    root, rest = pattern[: wildcard].rsplit("/", 1)
    return sorted(p for p in storage.path(root).glob(rest + pattern[wildcard:]) if p.is_file())


# ---------------------------------------------------------------------------- document sources
def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Document]:
    """Every `.py` file of this Python's standard library (not site-packages), keyed by relative path."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())
    if not files:
        raise DataError(f"no .py files found under the standard library at {root}")
    return [(p.relative_to(root).as_posix(), p.read_bytes().decode("utf-8", errors="replace")) for p in files]


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 text; binary data (a NUL byte) and other encodings are refused naming `where`, never
    trained on as replacement characters."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"{where}: binary data (a NUL byte at offset {nul}), not text; remove it from data.paths or narrow the glob"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); convert it to UTF-8 or "
            "remove it from data.paths"
        ) from None


def text_documents(paths: str | Sequence[str]) -> list[Document]:
    """One document per UTF-8 file, keyed by its content (identical files share a split)."""
    texts = [decode_text(p.read_bytes(), str(p)) for p in resolve_paths(paths)]
    return [(t, t) for t in texts]


def jsonl_documents(paths: str | Sequence[str], field: str = "text") -> list[Document]:
    """One document per JSON line (blank lines skipped), the string under `field`, keyed by content."""
    docs = []
    for path in resolve_paths(paths):
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                line = decode_text(raw, where)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e}); fix or remove the line") from None
                if not isinstance(record, dict) or field not in record:
                    raise DataError(f"{where}: no field {field!r} (set data.jsonl_field to the text field's name)")
                if not isinstance(record[field], str):
                    raise DataError(
                        f"{where}: field {field!r} holds {type(record[field]).__name__}, not a string; set "
                        "data.jsonl_field to the text field's name"
                    )
                docs.append((record[field], record[field]))
    return docs


def read_documents(source: str, paths: str | Sequence[str] = "", jsonl_field: str = "text") -> list[Document]:
    """The non-empty documents of a document source; DataError if there are none."""
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "text":
        docs = text_documents(paths)
    elif source == "jsonl":
        docs = jsonl_documents(paths, jsonl_field)
    else:
        raise DataError(f"unknown document source {source!r}; choose from {DOCUMENT_SOURCES}")
    docs = [d for d in docs if d[1]]
    if not docs:
        raise DataError(f"{source} source {paths!r} is empty: it holds no non-empty document")
    return docs


# ---------------------------------------------------------------------------- document split
def heldout_mask(keys: Sequence[str], heldout_fraction: float) -> np.ndarray:
    """bool [N]: True for held-out keys, those whose sha1 maps below `heldout_fraction` in [0, 1).

    The key with the smallest hash is held out when no key falls below, so the held-out split is
    never empty; with fewer than two keys one split would be empty, which is a DataError.
    """
    if len(keys) < 2:
        raise DataError(f"a train/held-out split needs at least 2 documents, got {len(keys)}")
    u = np.array([int.from_bytes(hashlib.sha1(k.encode("utf-8")).digest()[:8], "big") / 2.0**64 for k in keys])
    mask = u < heldout_fraction
    if not mask.any():
        mask[np.argmin(u)] = True
    if mask.all():
        mask[np.argmax(u)] = False
    return mask


def split_documents(docs: Sequence[Document], heldout_fraction: float) -> dict[str, list[str]]:
    """{"train": texts, "heldout": texts}, each in source order."""
    mask = heldout_mask([key for key, _ in docs], heldout_fraction)
    return {
        "train": [text for (_, text), held in zip(docs, mask) if not held],
        "heldout": [text for (_, text), held in zip(docs, mask) if held],
    }


# ---------------------------------------------------------------------------- token files
def load_token_file(paths: str | Sequence[str], token_dtype: str = "uint16") -> np.ndarray:
    """A memory-mapped 1-D token array: `.npy` (any unsigned or signed integer dtype) or raw `.bin`.

    `.bin` files hold `token_dtype` values with no header. The tokens must already contain the EOS
    separators between documents. Nothing is read until the array is indexed.
    """
    files = resolve_paths(paths)
    if len(files) != 1:
        raise DataError(f"the tokens source takes exactly one file, got {len(files)}: concatenate them into one")
    path = files[0]
    if storage.is_url(path):
        raise DataError(f"{path}: the tokens source is memory-mapped from a local file; copy it to a local disk first")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise DataError(f"{path}: cannot memory-map ({e})") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{path}: expected a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    elif path.suffix == ".bin":
        if token_dtype not in TOKEN_DTYPES:
            raise DataError(f"token_dtype {token_dtype!r} not in {sorted(TOKEN_DTYPES)}")
        itemsize = np.dtype(TOKEN_DTYPES[token_dtype]).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {token_dtype} tokens")
        if size == 0:
            raise DataError(f"{path}: empty token file")
        tokens = np.memmap(path, dtype=TOKEN_DTYPES[token_dtype], mode="r")
    else:
        raise DataError(f"{path}: token files must end in .npy or .bin, got {path.suffix!r}")
    if tokens.size == 0:
        raise DataError(f"{path}: empty token file")
    return tokens


def split_tokens(tokens: np.ndarray, split: str, heldout_fraction: float) -> np.ndarray:
    """The train prefix or the held-out suffix (the last `heldout_fraction`, at least one token)."""
    num_heldout = max(1, math.ceil(len(tokens) * heldout_fraction))
    if num_heldout >= len(tokens):
        raise DataError(f"{len(tokens)} tokens are too few to hold out {heldout_fraction:.1%} and keep a train split")
    boundary = len(tokens) - num_heldout
    return tokens[:boundary] if split == "train" else tokens[boundary:]
