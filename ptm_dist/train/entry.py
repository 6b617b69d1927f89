"""The Ray Train entry point of pretraining, kept light for the driver.

TorchTrainer pickles its loop function by reference (module and name), so the driver has to
import the module that defines it. ``ptm_dist.train.loop`` imports torch, transformers and the
engine (3.0-3.7 s on the 2-core machine), work only the workers need: importing this module
instead takes that off the driver's path to starting Ray and the workers. Each worker imports
the loop on its first call, as it did before.
"""

from __future__ import annotations


def train_loop(config: dict) -> None:
    """Ray Train entry point (one call per worker): ``ptm_dist.train.loop.train_loop``."""
    from ptm_dist.train.loop import train_loop as run

    run(config)
