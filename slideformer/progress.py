"""What a run reports: a progress bar, metrics as JSONL and to the sinks the config names (TensorBoard when
installed, Weights & Biases) and to Python callbacks, a loss curve."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slideformer.schedule.memory import GiB


MetricsCallback = Callable[[dict], None]  # called with every record: a step's metrics, or an eval loss


class SilentLog:
    """The log of a data-parallel rank other than the first: rank 0 records the run."""

    def record(self, entry: dict) -> None:
        pass

    def step(self, entry: dict) -> None:
        pass

    def __enter__(self) -> SilentLog:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RunLog:
    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        start_step: int,
        report_to: Sequence[str] = ("tensorboard",),
        callbacks: Sequence[MetricsCallback] = (),
        run_config: dict | None = None,
    ) -> None:
        from tqdm import tqdm

        self.path = out_dir / "metrics.jsonl"
        if start_step and self.path.exists():  # a resumed run keeps the history up to its checkpoint
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not start_step:
            self.path.write_text("")
        self.file = self.path.open("a")
        self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True, unit="step")
        self.callbacks = list(callbacks)
        self.tb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass  # TensorBoard is optional: metrics.jsonl has everything
        self.wandb = None
        if "wandb" in report_to:  # the config checked that wandb is installed
            import wandb

            self.wandb = wandb.init(
                project="slideformer", name=out_dir.name, dir=str(out_dir), config=run_config, resume="allow"
            )

    def record(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, entry["step"])
        if self.wandb:
            self.wandb.log(scalars, step=entry["step"])
        for callback in self.callbacks:
            callback(dict(entry))

    def step(self, entry: dict) -> None:
        entry |= memory()
        self.record(entry)
        self.bar.set_postfix_str(
            f"loss {entry['loss']:.4f}  {entry['tokens_per_s']:,.0f} tok/s  "
            f"{entry['tflops']:.0f} TFLOPS  GPU {entry['gpu_gib']:.1f} GiB  "
            f"host {entry['host_gib']:.1f} GiB",
            refresh=False,
        )
        self.bar.update(1)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def memory() -> dict:
    gpu = torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else 0.0
    return {"gpu_gib": gpu, "host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def loss_curve(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
