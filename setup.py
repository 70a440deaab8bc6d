"""Build hook beside pyproject.toml: `pip install .` also installs the start-up hook that teaches the
plain `lm_eval` command our model (see slimqwen_jax/lm_eval_hook.py). Editable installs skip it."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = "slimqwen_jax_lm_eval_hook"


class BuildPyWithLmEvalHook(build_py):
    """build_py that adds `<HOOK>.py` (a copy of slimqwen_jax/lm_eval_hook.py) and `<HOOK>.pth`,
    which site-packages runs at interpreter start, to the top level of the wheel."""

    def run(self):
        super().run()
        self.copy_file(os.path.join("slimqwen_jax", "lm_eval_hook.py"), os.path.join(self.build_lib, f"{HOOK}.py"))
        with open(os.path.join(self.build_lib, f"{HOOK}.pth"), "w") as pth:
            pth.write(f"import {HOOK}; {HOOK}.install()\n")

    def get_outputs(self, include_bytecode=True):
        return [
            *super().get_outputs(include_bytecode),
            *(os.path.join(self.build_lib, HOOK + ext) for ext in (".py", ".pth")),
        ]


setup(cmdclass={"build_py": BuildPyWithLmEvalHook})
