"""``headrace train``: the trainer alone on an existing cache (``--follow`` keeps waiting)."""

from __future__ import annotations

import threading

from engine.config import HeadraceConfig
from engine.processes import install_stop_signals

__all__ = ["train"]


def train(cfg: HeadraceConfig, *, follow: bool = False, on_progress=None, handle_signals: bool = True) -> dict:
    """Train from the cache's current position (or the last checkpoint); returns the summary
    ``{"trained_samples", "auc", "logloss", "samples_per_s", ...}``. SIGINT/SIGTERM stop it
    after the current step with a checkpoint."""
    import torch

    from trainer.loop import ContinuousTrainer

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)

    stop = threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_stop_signals(stop.set)
    trainer = ContinuousTrainer(cfg, cfg.cache.path, follow=follow, stop=stop, on_progress=on_progress)
    return trainer.run()
