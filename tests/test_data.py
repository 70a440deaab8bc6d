"""Data pipeline: sources, splits, tokenizers, packing, grain iteration, sharding and resume."""

import collections
import hashlib
import json
import math
import os
import sysconfig
import types

import numpy as np
import pytest

from slimqwen_jax.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    WindowSource,
    calibration_samples,
    heldout_batches,
    make_tokenizer,
    pack_documents,
    sources,
    token_stream,
    train_iterator,
    unigram_entropy,
)
from slimqwen_jax.run_config import data_section

BYTE = ByteTokenizer()
DOCS = ["def f(x):\n    return x\n", "héllo wörld ✓", "a", "\n\n", "0123456789" * 7, "∑ over ∞"]


def config(**overrides):
    cfg = data_section()
    cfg.update(overrides)
    return cfg


def namespace_config(**overrides):
    """Any attribute object works as a data config; unlike a ConfigDict it takes `paths` as a list."""
    return types.SimpleNamespace(**{**data_section().to_dict(), **overrides})


def naive_stream(texts, eos=256):
    """Byte stream built the slow obvious way: bytes of each text, then EOS."""
    out = []
    for t in texts:
        out += list(t.encode("utf-8")) + [eos]
    return out


def is_heldout(key, fraction):
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64 < fraction


def window_ids(batch, seq_len):
    """Window index of each row of a batch drawn from an `np.arange` token stream."""
    assert np.array_equal(batch[:, 1:] - batch[:, :-1], np.ones_like(batch[:, 1:]))
    assert np.all(batch[:, 0] % seq_len == 0)
    return list(batch[:, 0] // seq_len)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    ids = BYTE.encode(DOCS[1])
    assert ids.dtype == np.int32 and list(ids) == list(DOCS[1].encode("utf-8"))
    assert BYTE.decode(np.concatenate([ids, [256], BYTE.encode("x")])) == DOCS[1] + "<|endoftext|>x"
    with pytest.raises(DataError, match=r"ids must lie in \[0, 256\]"):
        BYTE.decode([257])


@pytest.fixture(scope="module")
def hf_tokenizer_path(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"])
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ate the cat", "the end"], trainer)
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_encode_decode_and_eos(hf_tokenizer_path, tmp_path):
    vocab = json.loads(hf_tokenizer_path.read_text())["model"]["vocab"]
    tok = make_tokenizer(str(hf_tokenizer_path))
    assert isinstance(tok, HFTokenizer) and make_tokenizer(str(hf_tokenizer_path.parent)).name == tok.name
    assert tok.eos_id == vocab["<|endoftext|>"] and tok.vocab_size == len(vocab)
    ids = tok.encode("the cat ate a zebra")
    assert ids.dtype == np.int32
    assert list(ids) == [vocab[w] for w in ("the", "cat", "ate", "a")] + [vocab["[UNK]"]]
    assert tok.decode(tok.encode("a dog sat")) == "a dog sat"

    lines = ["the cat sat", "on the mat", "the end", "a dog"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = config(source="jsonl", paths=str(tmp_path / "docs.jsonl"), heldout_fraction=0.3, seq_len=2)
    both = [token_stream(cfg, split, tok) for split in ("train", "heldout")]
    expected = {s: [] for s in ("train", "heldout")}
    for t in lines:
        expected["heldout" if is_heldout(t, 0.3) else "train"] += [vocab[w] for w in t.split()] + [tok.eos_id]
    assert [list(s) for s in both] == [expected["train"], expected["heldout"]]


def test_hf_tokenizer_eos_errors(hf_tokenizer_path):
    assert HFTokenizer(hf_tokenizer_path, eos_token="[UNK]").eos_id == 0
    with pytest.raises(DataError, match=r"none of the EOS tokens \['</s>'\]"):
        HFTokenizer(hf_tokenizer_path, eos_token="</s>")


# ---------------------------------------------------------------------------- packing and windows
def test_packing_and_windows_match_naive_concatenation():
    stream = pack_documents(DOCS, BYTE)
    expected = naive_stream(DOCS)
    assert stream.dtype == np.uint16 and list(stream) == expected
    seq_len = 5
    windows = WindowSource(stream, seq_len)
    assert len(windows) == (len(expected) - 1) // seq_len
    for i in range(len(windows)):
        assert windows[i].dtype == np.int32 and list(windows[i]) == expected[i * seq_len : i * seq_len + seq_len + 1]
    # Every token but the first is a target exactly once per epoch (up to the ragged tail).
    targets = np.concatenate([windows[i][1:] for i in range(len(windows))])
    assert list(targets) == expected[1 : len(windows) * seq_len + 1]


def test_wide_vocabularies_pack_as_uint32():
    class Wide(ByteTokenizer):
        vocab_size, eos_id = 70_000, 69_999

    stream = pack_documents(["ab", "c"], Wide())
    assert stream.dtype == np.uint32 and list(stream) == [97, 98, 69_999, 99, 69_999]


def test_unigram_entropy_against_counter():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, size=1000) ** 2
    counts = collections.Counter(tokens.tolist())
    expected = -sum(c / 1000 * math.log(c / 1000) for c in counts.values())
    assert unigram_entropy(tokens) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5, np.uint16)) == pytest.approx(math.log(4), rel=1e-12)


# ---------------------------------------------------------------------------- the stdlib corpus
@pytest.fixture(scope="module")
def stdlib_docs():
    return sources.stdlib_documents()


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory):
    return config(seq_len=64, cache_dir=str(tmp_path_factory.mktemp("token_cache")))


def test_stdlib_split_is_deterministic_disjoint_and_complete(stdlib_docs):
    root = sysconfig.get_paths()["stdlib"]
    listed = sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith(".py") and "site-packages" not in os.path.relpath(d, root).split(os.sep)
    )
    keys = [key for key, _ in stdlib_docs]
    assert keys == listed and len(keys) > 500
    mask = sources.heldout_mask(keys, 0.01)
    assert np.array_equal(mask, sources.heldout_mask(list(keys), 0.01))
    assert list(mask) == [is_heldout(k, 0.01) for k in keys]
    assert 0 < mask.sum() < 0.05 * len(keys)
    split = sources.split_documents(stdlib_docs, 0.01)
    assert len(split["train"]) + len(split["heldout"]) == len(stdlib_docs)
    assert split["heldout"] == [t for (_, t), held in zip(stdlib_docs, mask) if held]
    # Held out is never empty, even when no hash falls below the fraction.
    assert sources.heldout_mask(keys, 1e-12).sum() == 1


def test_stdlib_token_stream_and_cache(stdlib_cfg, stdlib_docs):
    # Empty files (many __init__.py) are no documents: they add no lone EOS.
    split = sources.split_documents([d for d in stdlib_docs if d[1]], stdlib_cfg.heldout_fraction)
    for name in ("train", "heldout"):
        stream = token_stream(stdlib_cfg, name, BYTE)
        assert stream.dtype == np.uint16 and stream[-1] == BYTE.eos_id
        assert len(stream) == sum(len(t.encode("utf-8")) + 1 for t in split[name])
        assert np.count_nonzero(stream == BYTE.eos_id) == len(split[name])
    cached = sorted(os.listdir(stdlib_cfg.cache_dir))
    assert len(cached) == 2 and all(f.endswith(".npy") for f in cached)
    again = token_stream(stdlib_cfg, "heldout", BYTE)
    assert isinstance(again, np.memmap) and list(again[:200]) == naive_stream(split["heldout"])[:200]

    batch = next(train_iterator(stdlib_cfg, BYTE, batch_size=4))
    assert batch.shape == (4, 65) and batch.dtype == np.int32
    held = heldout_batches(stdlib_cfg, BYTE, batch_size=4, num_batches=3)
    assert len(held) == 3 and list(held[0][1]) == naive_stream(split["heldout"])[64 : 64 + 65]


# ---------------------------------------------------------------------------- file formats
def write_source(kind, tmp_path, rng):
    """Writes a small source of `kind`; returns (config overrides, expected train + held-out streams)."""
    if kind in ("npy", "bin-uint16", "bin-uint32"):
        high = 2**20 if kind == "bin-uint32" else 2**16
        tokens = rng.integers(0, high, size=500).astype(np.uint32 if kind == "bin-uint32" else np.uint16)
        if kind == "npy":
            np.save(tmp_path / "tokens.npy", tokens)
            overrides = dict(source="tokens", paths=str(tmp_path / "tokens.npy"))
        else:
            tokens.tofile(tmp_path / "tokens.bin")
            overrides = dict(source="tokens", paths=[str(tmp_path / "tokens.bin")], token_dtype=kind[4:])
        boundary = 500 - math.ceil(500 * 0.1)
        return overrides, (list(tokens[:boundary]), list(tokens[boundary:]))
    texts = [f"document {i}: " + "xyzé"[i % 4] * int(rng.integers(5, 40)) for i in range(30)]
    if kind == "jsonl":
        for part in range(2):
            lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts[part::2])]
            (tmp_path / f"part{part}.jsonl").write_text("\n".join(lines) + "\n\n")
        overrides = dict(source="jsonl", paths=f"{tmp_path}/part0.jsonl, {tmp_path}/part1.jsonl", jsonl_field="body")
        texts = texts[0::2] + texts[1::2]
    else:
        (tmp_path / "docs").mkdir()
        for i, t in enumerate(texts):
            (tmp_path / "docs" / f"{i:02d}.txt").write_text(t, encoding="utf-8")
        (tmp_path / "docs" / "ignored.md").write_text("not matched by the glob")
        overrides = dict(source="text", paths=f"{tmp_path}/docs/*.txt")
    held = [is_heldout(t, 0.1) for t in texts]
    assert 0 < sum(held) < len(texts)
    train, heldout = [t for t, h in zip(texts, held) if not h], [t for t, h in zip(texts, held) if h]
    return overrides, (naive_stream(train), naive_stream(heldout))


@pytest.mark.parametrize("kind", ["npy", "bin-uint16", "bin-uint32", "jsonl", "text"])
def test_formats_round_trip_through_the_pipeline(kind, tmp_path):
    overrides, (train, heldout) = write_source(kind, tmp_path, np.random.default_rng(1))
    seq_len = 4
    cfg = namespace_config(heldout_fraction=0.1, seq_len=seq_len, **overrides)
    assert list(token_stream(cfg, "train", BYTE)) == train
    assert list(token_stream(cfg, "heldout", BYTE)) == heldout
    held = np.concatenate(heldout_batches(cfg, BYTE, batch_size=2, num_batches=100))
    num_windows = (len(heldout) - 1) // seq_len // 2 * 2
    assert held.shape == (num_windows, seq_len + 1)
    assert [list(row) for row in held] == [heldout[i * seq_len : i * seq_len + seq_len + 1] for i in range(num_windows)]
    epoch = (len(train) - 1) // seq_len
    rows = np.concatenate(take(train_iterator(cfg, BYTE, batch_size=epoch, process_index=0, process_count=1), 1))
    expected = [tuple(train[i * seq_len : i * seq_len + seq_len + 1]) for i in range(epoch)]
    assert sorted(map(tuple, rows)) == sorted(expected)


# ---------------------------------------------------------------------------- shuffling, sharding, resume
SEQ_LEN, NUM_WINDOWS = 8, 96


@pytest.fixture
def arange_cfg(tmp_path):
    """A token file whose train split is exactly NUM_WINDOWS windows, each identified by its first token."""
    train_len = NUM_WINDOWS * SEQ_LEN + 1
    tokens = np.arange(train_len + 8, dtype=np.uint32)  # the last ceil(777 * 0.01) = 8 tokens are held out
    np.save(tmp_path / "arange.npy", tokens)
    return config(source="tokens", paths=str(tmp_path / "arange.npy"), seq_len=SEQ_LEN, shuffle_seed=3)


def epoch_ids(cfg, batch_size, num_epochs=1, **shard):
    it = train_iterator(cfg, BYTE, batch_size=batch_size, **{"process_index": 0, "process_count": 1, **shard})
    count = num_epochs * NUM_WINDOWS // batch_size // shard.get("process_count", 1)
    return [i for batch in take(it, count) for i in window_ids(batch, SEQ_LEN)]


def test_shuffle_is_deterministic_per_seed_and_reshuffles_each_epoch(arange_cfg):
    ids = epoch_ids(arange_cfg, 8, num_epochs=2)
    assert ids == epoch_ids(arange_cfg, 8, num_epochs=2)
    first, second = ids[:NUM_WINDOWS], ids[NUM_WINDOWS:]
    assert sorted(first) == sorted(second) == list(range(NUM_WINDOWS))
    assert first != list(range(NUM_WINDOWS)) and first != second
    other_seed = config(**{**arange_cfg.to_dict(), "shuffle_seed": 11})
    assert epoch_ids(other_seed, 8) != first


def test_host_shards_are_disjoint_and_cover_the_epoch(arange_cfg):
    unsharded = epoch_ids(arange_cfg, 4)
    shards = [epoch_ids(arange_cfg, 4, process_index=h, process_count=2) for h in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(unsharded) == list(range(NUM_WINDOWS))
    assert shards[0] == unsharded[0::2] and shards[1] == unsharded[1::2]


def test_iterator_state_resumes_exactly(arange_cfg):
    it = train_iterator(arange_cfg, BYTE, batch_size=8, process_index=0, process_count=1)
    take(it, 10)
    state = it.get_state()
    expected = take(it, 5)  # crosses the epoch boundary at batch 12
    fresh = train_iterator(arange_cfg, BYTE, batch_size=8, process_index=0, process_count=1)
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    assert all(np.array_equal(a, b) for a, b in zip(take(fresh, 5), expected, strict=True))


def test_calibration_samples_are_deterministic_slices(arange_cfg):
    samples = calibration_samples(arange_cfg, BYTE, num_samples=10, seq_len=16, seed=5)
    assert samples.shape == (10, 16) and samples.dtype == np.int32
    assert np.array_equal(samples, calibration_samples(arange_cfg, BYTE, num_samples=10, seq_len=16, seed=5))
    assert not np.array_equal(samples, calibration_samples(arange_cfg, BYTE, num_samples=10, seq_len=16, seed=6))
    starts = samples[:, 0]
    assert np.array_equal(samples, starts[:, None] + np.arange(16)) and np.all(starts % 16 == 0)
    assert len(set(starts.tolist())) == 10 and starts.max() + 16 <= NUM_WINDOWS * SEQ_LEN + 1
    assert calibration_samples(arange_cfg, BYTE, num_samples=2).shape == (2, SEQ_LEN)


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise_data_errors(tmp_path, arange_cfg):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    cases = [
        (config(source="text", paths=str(tmp_path / "missing.txt")), r"path '.*missing.txt' does not exist"),
        (config(source="text", paths=f"{tmp_path}/*.none"), r"glob '.*\*.none' matches no file"),
        (config(source="text", paths=str(tmp_path / "empty.txt")), r"text source .* is empty"),
        (config(source="jsonl", paths=str(tmp_path / "rows.jsonl")), r"rows.jsonl:2: no field 'text'"),
        (config(source="parquet", paths="x"), r"unknown source 'parquet'"),
        (config(source="text", paths=""), r"source 'text' needs paths"),
    ]
    for cfg, message in cases:
        with pytest.raises(DataError, match=message):
            token_stream(cfg, "train", BYTE)
    with pytest.raises(DataError, match=r"heldout_fraction must be in \(0, 1\).*\n.*seq_len must be positive"):
        token_stream(config(heldout_fraction=0.0, seq_len=0), "train", BYTE)
    with pytest.raises(DataError, match=r"unknown tokenizer 'gpt9'"):
        make_tokenizer("gpt9")
    with pytest.raises(DataError, match=r"96 windows of 8 tokens, fewer than one global batch \(64 x 2 processes\)"):
        train_iterator(arange_cfg, BYTE, batch_size=64, process_index=0, process_count=2)
    with pytest.raises(DataError, match=r"held-out split has 0 windows"):
        heldout_batches(config(**{**arange_cfg.to_dict(), "seq_len": 16}), BYTE, batch_size=1, num_batches=1)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"3 bytes is not a whole number of uint16 tokens"):
        token_stream(config(source="tokens", paths=str(odd)), "train", BYTE)
