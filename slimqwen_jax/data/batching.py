"""Packing, windows and the grain pipelines that feed training, evaluation and calibration.

Documents are tokenized and joined into ONE 1-D stream with EOS after each document. Window i of
a stream of length n is `tokens[i*L : i*L + L + 1]` for i < (n - 1) // L: inputs are `[:-1]` and
targets `[1:]` of the same window, and consecutive windows overlap by one token, so every token
but the first is a target exactly once per epoch.

Shape letters: B batch, L sequence length, N samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from slimqwen_jax.data import sources
from slimqwen_jax.data.sources import DataError
from slimqwen_jax.data.tokenizers import Tokenizer

CACHE_VERSION = 1
# Windows are cheap memmap slices: a few threads and a short buffer of ready batches suffice.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def data_config_problems(data_cfg: Any) -> list[str]:
    """Every unusable field of `data_cfg` (fields and defaults: `run_config.data_section`), one line
    each (nothing is read)."""
    problems = []
    if data_cfg.source not in sources.SOURCES:
        problems.append(f"unknown source {data_cfg.source!r}; choose from {sources.SOURCES}")
    elif data_cfg.source != "stdlib" and not data_cfg.paths:
        problems.append(f"source {data_cfg.source!r} needs paths")
    if not 0 < data_cfg.heldout_fraction < 1:
        problems.append(f"heldout_fraction must be in (0, 1), got {data_cfg.heldout_fraction}")
    if data_cfg.seq_len < 1:
        problems.append(f"seq_len must be positive, got {data_cfg.seq_len}")
    if data_cfg.token_dtype not in sources.TOKEN_DTYPES:
        problems.append(f"token_dtype {data_cfg.token_dtype!r} not in {sorted(sources.TOKEN_DTYPES)}")
    if not 0 <= data_cfg.shuffle_seed < 2**32:
        problems.append(f"shuffle_seed must be in [0, 2**32), got {data_cfg.shuffle_seed}")
    return problems


def validate_data_config(data_cfg: Any) -> None:
    """Raise one DataError naming every unusable field of `data_cfg`."""
    problems = data_config_problems(data_cfg)
    if problems:
        raise DataError("invalid data config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------- packing
def stream_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def pack_documents(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """One 1-D stream [sum(len_i + 1)]: each document's tokens followed by EOS."""
    encoded = tokenizer.encode_batch(texts)
    stream = np.empty(sum(len(ids) + 1 for ids in encoded), stream_dtype(tokenizer.vocab_size))  # [n]
    pos = 0
    for ids in encoded:
        stream[pos : pos + len(ids)] = ids
        stream[pos + len(ids)] = tokenizer.eos_id
        pos += len(ids) + 1
    return stream


def _tokenized_splits(data_cfg: Any, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    docs = sources.read_documents(data_cfg.source, data_cfg.paths, data_cfg.jsonl_field)
    texts = sources.split_documents(docs, data_cfg.heldout_fraction)
    return {split: pack_documents(texts[split], tokenizer) for split in sources.SPLITS}


def _cache_key(data_cfg: Any, tokenizer: Tokenizer) -> str:
    """Hash of everything the tokenized splits depend on, file sizes and mtimes included."""
    if data_cfg.source == "stdlib":
        files = [str(sources.stdlib_root()), sys.version]
    else:
        paths = sources.resolve_paths(data_cfg.paths)
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    fields = dict(
        version=CACHE_VERSION, source=data_cfg.source, files=files, jsonl_field=data_cfg.jsonl_field,
        tokenizer=tokenizer.name, heldout_fraction=data_cfg.heldout_fraction,
    )  # fmt: skip
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _save_atomically(path: pathlib.Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def token_stream(data_cfg: Any, split: str, tokenizer: Tokenizer) -> np.ndarray:
    """The 1-D token stream [n] of `split` ("train" | "heldout"), EOS after each document.

    `tokens` sources are memory-mapped and split by position (the last `heldout_fraction` is
    held out). Document sources are split by a hash of each document's key and tokenized; with
    `cache_dir` set both splits are saved as `.npy` under a hash of the source, its files, the
    tokenizer and the split fraction, and later calls memory-map them.
    """
    validate_data_config(data_cfg)
    if split not in sources.SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {sources.SPLITS}")
    if data_cfg.source == "tokens":
        tokens = sources.load_token_file(data_cfg.paths, data_cfg.token_dtype)
        return sources.split_tokens(tokens, split, data_cfg.heldout_fraction)
    if not data_cfg.cache_dir:
        return _tokenized_splits(data_cfg, tokenizer)[split]
    cache_dir = pathlib.Path(data_cfg.cache_dir).expanduser()
    key = _cache_key(data_cfg, tokenizer)
    paths = {s: cache_dir / f"{data_cfg.source}-{key}-{s}.npy" for s in sources.SPLITS}
    if not all(p.exists() for p in paths.values()):
        splits = _tokenized_splits(data_cfg, tokenizer)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for s, stream in splits.items():
                _save_atomically(paths[s], stream)
        except OSError as e:
            raise DataError(
                f"data.cache_dir {cache_dir}: cannot write the tokenized cache ({e.strerror or e}); point it at a "
                "writable directory, or unset it to tokenize in memory"
            ) from None
    return np.load(paths[split], mmap_mode="r")


def check_token_ids(data_cfg: Any, vocab_size: int) -> None:
    """A `tokens` source's ids must index the model's vocabulary (one streaming pass over the
    memory map); raise DataError naming the file and the range otherwise."""
    if data_cfg.source != "tokens":
        return
    tokens = sources.load_token_file(data_cfg.paths, data_cfg.token_dtype)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise DataError(
            f"{data_cfg.paths}: token ids span [{low}, {high}], outside the model's vocabulary 0..{vocab_size - 1}; "
            "re-tokenize with the model's tokenizer"
        )


# ---------------------------------------------------------------------------- windows
class WindowSource(grain.sources.RandomAccessDataSource):
    """Random access to the fixed-length windows of a token stream: item i is int32 [L + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens = tokens
        self._seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self._tokens) - 1) // self._seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self._seq_len
        return np.asarray(self._tokens[start : start + self._seq_len + 1], np.int32)  # [L + 1]


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def train_iterator(
    data_cfg: Any,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of this host's train batches, int32 [B, L + 1], resumable exactly.

    Pipeline: windows -> shuffle(data_cfg.shuffle_seed) -> repeat forever -> every
    process_count-th window from process_index -> batch(B, drop_remainder) -> prefetching iterator.
    grain's `repeat` reseeds the shuffle each epoch (epoch e is permuted with seed
    shuffle_seed + e), so epochs differ in order but each holds every window once; batches may
    straddle an epoch boundary. `it.get_state()` is a small dict (the next batch index);
    `set_state` on a fresh iterator of the same config continues with the same batches.
    """
    windows = WindowSource(token_stream(data_cfg, "train", tokenizer), data_cfg.seq_len)
    process_index, process_count = _resolve_process(process_index, process_count)
    if len(windows) < batch_size * process_count:
        raise DataError(
            f"the train split has {len(windows)} windows of {data_cfg.seq_len} tokens, fewer than one global batch "
            f"({batch_size} x {process_count} processes); use more data, a shorter seq_len or a smaller batch"
        )
    dataset = (
        grain.MapDataset.source(windows)
        .shuffle(seed=data_cfg.shuffle_seed)
        .repeat()[process_index::process_count]
        .batch(batch_size, drop_remainder=True)
    )
    return iter(dataset.to_iter_dataset(READ_OPTIONS))


def heldout_batches(data_cfg: Any, tokenizer: Tokenizer, *, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """The first min(num_batches, available) held-out batches in order, each int32 [B, L + 1]."""
    windows = WindowSource(token_stream(data_cfg, "heldout", tokenizer), data_cfg.seq_len)
    count = min(num_batches, len(windows) // batch_size)
    if count < 1:
        raise DataError(
            f"the held-out split has {len(windows)} windows of {data_cfg.seq_len} tokens, fewer than one batch of "
            f"{batch_size}; raise heldout_fraction or lower seq_len / batch_size"
        )
    return [np.stack([windows[b * batch_size + i] for i in range(batch_size)]) for b in range(count)]


def calibration_samples(
    data_cfg: Any, tokenizer: Tokenizer, *, num_samples: int, seq_len: int | None = None, seed: int = 0
) -> np.ndarray:
    """int32 [N, L]: N distinct non-overlapping train sequences drawn at random (fixed by `seed`)."""
    seq_len = data_cfg.seq_len if seq_len is None else seq_len
    tokens = token_stream(data_cfg, "train", tokenizer)
    available = len(tokens) // seq_len
    if num_samples > available:
        raise DataError(
            f"asked for {num_samples} calibration samples of {seq_len} tokens; the train split has {available}"
        )
    starts = np.random.default_rng(seed).choice(available, size=num_samples, replace=False) * seq_len  # [N]
    return np.stack([np.asarray(tokens[s : s + seq_len], np.int32) for s in starts])  # [N, L]


def row_digests(batch: np.ndarray) -> list[str]:
    """A short sha1 of each row of `batch` [B, ...]: names in a log line what a process read."""
    return [hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()[:8] for row in batch]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequencies: the loss of the best context-free predictor."""
    counts = np.bincount(np.asarray(tokens).reshape(-1))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
