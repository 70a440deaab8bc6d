"""python -m slimqwen_jax.sweep --config configs/sweep_quickstart.py [--list] [--only 'lr0.003_*']

A sweep of the quickstart run (configs/quickstart.py, 200 steps here): the peak learning rate over
two values, times two seeds (the random init and the order of the training windows). Each of the
four points trains in runs/sweep_quickstart/<point>; the table of held-out losses (each point, and
the mean +- std over the seeds) goes to sweep.md, every point's record to sweep.json, the plot to
sweep.png. Rerunning the command skips the finished points and resumes an interrupted one. Any
`--config.key=value` applies to every point (`--config.train.steps=50` for a quicker look).
"""

import ml_collections

from configs.quickstart import MODEL
from slimqwen_jax import sweep
from slimqwen_jax.run_config import base_config, model_section


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.workdir = "runs/sweep_quickstart"  # the sweep's directory: one subdirectory per point
    config.model = model_section(MODEL)
    config.train.update(steps=200, eval_every=50, checkpoint_every=50)
    return config


def get_sweep() -> sweep.Sweep:
    return sweep.Sweep(sweep.product(sweep.axis("lr", "optimizer.peak_lr", [1e-3, 3e-3]), sweep.seeds([0, 1])))
