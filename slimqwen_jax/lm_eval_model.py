"""Our models in EleutherAI's lm-evaluation-harness, registered as `slimqwen_jax`.

    python -m slimqwen_jax.lm_eval_model --model slimqwen_jax --model_args path=<model>[,tokenizer=...] \\
        --tasks <tasks> [any other lm_eval argument]

After `pip install .` the plain `lm_eval --model slimqwen_jax ...` works too (slimqwen_jax/lm_eval_hook.py);
this module is that command with ours registered first, for source checkouts and editable installs
(from Python: `lm_eval.simple_evaluate(model=SlimQwenLM(path=...))`).
Model arguments: path (an HF directory or one of our checkpoints), tokenizer ("byte" or
an HF tokenizer.json), dtype, batch_size, max_length (context and cache size), max_gen_toks.
loglikelihood / loglikelihood_rolling score batches of right-padded windows with one full forward
each; generate_until decodes batches with the cached `decoding.Decoder` and cuts at the stop strings.
Shapes are bucketed (batch fixed, lengths rounded up to a power of two) so compiles stay few.
"""

from __future__ import annotations

import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from slimqwen_jax import data
from slimqwen_jax.config import ConfigError
from slimqwen_jax.decoding import Decoder
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.loading import load_model

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


class RequestError(ValueError):
    """A model argument or request this model cannot serve; the message names it."""


def bucket(length: int, minimum: int = 16) -> int:
    """The smallest power of two >= length (and >= minimum): one compiled shape per bucket."""
    return max(minimum, 1 << (length - 1).bit_length())


def _target_log_probs(graphdef, params, inputs, targets):
    """inputs, targets [B, L] -> (log p(target) [B, L] float32, target is the argmax [B, L])."""
    logits = nnx.merge(graphdef, params)(inputs, with_mtp=False).logits.astype(jnp.float32)  # [B, L, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return target_log_probs, jnp.argmax(logits, axis=-1) == targets


@register_model("slimqwen_jax")
class SlimQwenLM(TemplateLM):
    """lm-eval model over a slimqwen_jax model; see the module docstring for the arguments."""

    def __init__(
        self,
        path: str,
        tokenizer: str = "byte",
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        seed: int = 0,
        device: str | None = None,  # lm-eval passes it; JAX places arrays itself
        max_batch_size: int | None = None,  # lm-eval passes it; batches here have one fixed size
        **unknown,
    ):
        if unknown:
            known = sorted(set(inspect.signature(SlimQwenLM.__init__).parameters) - {"self", "unknown"})
            raise RequestError(f"slimqwen_jax: unknown model_args {sorted(unknown)}; known: {known}")
        super().__init__()
        del device, max_batch_size
        try:
            self.model = load_model(path, dtype=dtype)
            self.tokenizer = data.make_tokenizer(tokenizer)
        except (FileNotFoundError, ConfigError, CheckpointMismatchError, data.DataError) as error:
            raise RequestError(f"slimqwen_jax: {error}") from error
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length, self.max_gen_toks, self.seed = int(max_length), int(max_gen_toks), int(seed)
        self._graphdef, self._params = nnx.split(self.model)
        self._score = jax.jit(
            lambda params, inputs, targets: _target_log_probs(self._graphdef, params, inputs, targets)
        )
        self._decoder = Decoder(self.model, max_len=self.max_length)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).tolist()

    def tok_decode(self, tokens) -> str:
        """Text of the tokens without EOS and without ids past the tokenizer's vocabulary (a model's
        embedding table may be padded beyond it)."""
        return self.tokenizer.decode([t for t in tokens if t != self.eot_token_id and t < self.tokenizer.vocab_size])

    # ------------------------------------------------------------------ scoring
    def _score_windows(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(tokens, n) -> (sum of log p of the last n tokens given the ones before, all greedy).
        Windows are batched longest first, so that each batch pads little."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = [windows[i] for i in indices]
            length = bucket(max(len(tokens) - 1 for tokens, _ in batch))
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for row, (tokens, _) in enumerate(batch):
                inputs[row, : len(tokens) - 1], targets[row, : len(tokens) - 1] = tokens[:-1], tokens[1:]
            log_probs, greedy = map(np.asarray, self._score(self._params, inputs, targets))
            for row, (i, (tokens, n)) in enumerate(zip(indices, batch)):
                end = len(tokens) - 1
                results[i] = (float(log_probs[row, end - n : end].sum()), bool(greedy[row, end - n : end].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens); the window is
        cut from the left to max_length + 1 tokens."""
        windows = []
        for _, context, continuation in requests:
            if not continuation:
                raise RequestError("slimqwen_jax: loglikelihood request with an empty continuation")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
            windows.append((tokens, len(continuation)))
        return self._score_windows(windows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over each whole text, scored in disjoint windows of max_length tokens."""
        results = []
        for (text,) in [request.args for request in requests]:
            rolling = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )  # fmt: skip
            windows = [
                (list(context) + list(continuation), len(continuation))
                for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling)
            ]
            results.append(sum(log_prob for log_prob, _ in self._score_windows(windows)))
        return results

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, float]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise RequestError(f"slimqwen_jax: unknown generation arguments {unknown}; supported: {list(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        return (
            until,
            int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature,
            float(gen_kwargs.get("top_p", 1.0)),
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context (left-truncated to leave room for max_gen_toks) until a stop string,
        EOS or max_gen_toks, in batches of requests with the same generation arguments."""
        settings = [self._generation_settings(dict(request.args[1])) for request in requests]
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (until, max_new, temperature, top_p) in enumerate(settings):
            groups.setdefault((tuple(until), max_new, temperature, top_p), []).append(i)
        for (until, max_new, temperature, top_p), indices in groups.items():
            room = self.max_length - max_new
            if room < 1:
                raise RequestError(
                    f"slimqwen_jax: max_gen_toks {max_new} leaves no room in max_length {self.max_length}"
                )
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in batch]
                prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # one compiled batch size
                generation = self._decoder.generate(
                    prompts, max_new, temperature=temperature, top_p=top_p, seed=self.seed,
                    stop_tokens=[self.eot_token_id], prompt_len=min(bucket(max(map(len, prompts))), room),
                )  # fmt: skip
                for i, tokens in zip(batch, generation.tokens):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[i] = text
        return outputs


def main() -> None:
    """The `lm_eval` command line with the `slimqwen_jax` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except RequestError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
