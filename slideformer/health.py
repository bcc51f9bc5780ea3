"""Training health: a step whose loss or gradient norm is not finite stops the run before anything of it is saved."""

from __future__ import annotations

import math
import sys


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (divergence, a signal); the message says what was kept and what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_step(step: int, loss: float, grad_norm: float, policy: str, last_checkpoint: str | None) -> None:
    """Stop the run on a non-finite step; with policy 'skip' a non-finite gradient norm is reported and the run goes
    on (the engine applied no update for that step)."""
    # With updates during backward the step's update has already run, so no later checkpoint may be written:
    # stopping here keeps the newest checkpoint the newest finite one.
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    if policy == "skip" and not math.isfinite(grad_norm):
        print(f"step {step}: loss {loss}, gradient norm {grad_norm}: skipped (no update)", file=sys.stderr)
        return
    kept = (
        f"the newest checkpoint, {last_checkpoint}, is from before it"
        if last_checkpoint
        else "no checkpoint was written"
    )
    raise TrainingStopped(
        f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged and stopped "
        f"({kept}); lower lr or set max_grad_norm, then start again with --overwrite"
    )
