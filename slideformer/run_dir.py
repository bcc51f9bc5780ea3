"""The output directory: one run at a time (a lock), and never another run's files by accident."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

from slideformer.train_config import ConfigError

LOCK = ".lock"
# What a run writes there; --overwrite removes these and nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "plan.json", "config.yaml", "loss.png", "tensorboard")


def claim_output_dir(out: Path, resume: bool, overwrite: bool) -> IO:
    """Lock `out` for this run (released when the returned file closes, or the process dies) and check that a
    new run does not land on an earlier one's files."""
    out.mkdir(parents=True, exist_ok=True)
    lock = (out / LOCK).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise ConfigError(
            f"output_dir {out} is in use by another run (pid {holder}); wait for it to finish or "
            "choose another output_dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    earlier = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if resume:
        if not (out / "checkpoints").is_dir():
            lock.close()
            raise ConfigError(f"resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
    elif earlier and not overwrite:
        lock.close()
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(earlier[:4])}); continue it with "
            "--resume, replace it with --overwrite, or choose another output_dir"
        )
    elif overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return lock
