"""What the `python -m slimqwen_jax.<tool>` entry points share: flag parsing and logging set-up."""

from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns an unknown config key or a bad value into one clear line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        sys.stderr.write(f"error: bad command line: {error}\n")
        sys.exit(2)


def setup_logging() -> None:
    """Our progress lines at INFO; library chatter (orbax, jax) only from WARNING up."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("slimqwen_jax").setLevel(logging.INFO)
