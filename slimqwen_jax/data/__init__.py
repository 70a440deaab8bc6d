"""Data pipeline: sources -> tokenizer -> one packed token stream -> grain windows and batches."""

from slimqwen_jax.data.batching import (
    WindowSource,
    calibration_samples,
    check_token_ids,
    data_config_problems,
    heldout_batches,
    pack_documents,
    row_digests,
    token_stream,
    train_iterator,
    unigram_entropy,
    validate_data_config,
)
from slimqwen_jax.data.sources import DataError
from slimqwen_jax.data.tokenizers import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "WindowSource",
    "calibration_samples",
    "check_token_ids",
    "data_config_problems",
    "heldout_batches",
    "make_tokenizer",
    "pack_documents",
    "row_digests",
    "token_stream",
    "train_iterator",
    "unigram_entropy",
    "validate_data_config",
]
