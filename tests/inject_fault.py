"""Run a tool with a fault injected while orbax writes one checkpoint step, in orbax's background
commit thread as a real fault would arrive:

    python tests/inject_fault.py <enospc|sigint> <step> -m slimqwen_jax.<tool> [args ...]

`enospc`: writing the step's JSON items fails with OSError(ENOSPC), as on a full disk. `sigint`: the
process gets one SIGINT (Ctrl-C) while the step is being written; the write then goes on.
"""

import errno
import os
import runpy
import signal
import sys

from orbax.checkpoint._src.handlers import json_checkpoint_handler


def inject(fault: str, step: str) -> None:
    save = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    interrupted = []

    async def faulty_save(self, item, directory):
        if directory.parent.name.split(".")[0] == step:  # <step>.orbax-checkpoint-tmp-*/<item>
            if fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
            if not interrupted:  # the step has several JSON items: one Ctrl-C, not one per item
                interrupted.append(True)
                os.kill(os.getpid(), signal.SIGINT)
        return await save(self, item, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = faulty_save


if __name__ == "__main__":
    fault, step, flag, module, *args = sys.argv[1:]
    assert fault in ("enospc", "sigint") and flag == "-m", sys.argv
    inject(fault, step)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
