"""Teaches the plain `lm_eval` command our model: `lm_eval --model slimqwen_jax --model_args path=...`.

lm-eval 0.4.13 has no plugin entry point: its command looks models up in a registry that only its
own `lm_eval.models` fills. `pip install .` therefore installs this file a second time, as the
top-level module `slimqwen_jax_lm_eval_hook`, with a `.pth` file that calls `install()` at every
interpreter start (setup.py). That costs one import-system hook and nothing else: no jax, no
lm-eval, and not the slimqwen_jax package (whose installed copy would then shadow a source
checkout). When `lm_eval.models` has filled the registry, `slimqwen_jax` is added to it as the lazy
entry "slimqwen_jax.lm_eval_model:SlimQwenLM", imported from whichever slimqwen_jax comes first on
sys.path when a run asks for it. A refused model or generation argument (`RequestError`) then ends
the command in one line instead of a traceback.
"""

import importlib.abc
import importlib.util
import sys

MODEL_NAME = "slimqwen_jax"
MODEL_CLASS = "slimqwen_jax.lm_eval_model:SlimQwenLM"
REGISTRY_MODULE = "lm_eval.models"


def register_model() -> None:
    """Adds our model to lm-eval's registry (unless one of that name is there) and reports its
    refused arguments in one line."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_CLASS)
    sys.excepthook = _one_line_request_errors(sys.excepthook)


def _one_line_request_errors(previous):
    def excepthook(kind, error, traceback):
        if kind.__module__ == "slimqwen_jax.lm_eval_model" and kind.__name__ == "RequestError":
            sys.stderr.write(f"error: {error}\n")
        else:
            previous(kind, error, traceback)

    return excepthook


class RegisterAfterRegistryModule(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` through the other finders and registers our model once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def run_then_register(module):
                run_module(module)
                register_model()

            spec.loader.exec_module = run_then_register
        return spec


def install() -> None:
    """Registers our model as soon as lm-eval fills its registry (now, if it already has)."""
    if REGISTRY_MODULE in sys.modules:
        register_model()
    elif not any(type(finder).__name__ == RegisterAfterRegistryModule.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterRegistryModule())
