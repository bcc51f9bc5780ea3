"""Fine-tuning: config -> data -> plan -> engine -> steps with eval, checkpoints and records."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from slideformer.schedule.profile import Profile
from slideformer.checkpoint import (
    check_free_space,
    checkpoint_bytes,
    load_checkpoint,
    newest_valid_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from slideformer.dataset import (
    Batches,
    DataError,
    Example,
    cut_rows,
    examples_from_rows,
    load_examples,
    to_sequences,
    unit_order,
)
from slideformer.health import TrainingStopped, check_step
from slideformer.models import RandomWeights, load_model_config
from slideformer.models.config import GENERIC, ModelConfig, parse_model_spec
from slideformer.models.weights import CheckpointError, check_weights, open_weights
from slideformer.schedule.plan import Plan, PlanError, uniform_plan
from slideformer.schedule.memory import GiB
from slideformer.planner.search import (
    DISK_BUDGET_FRACTION,
    GPU_BUDGET_FRACTION,
    HOST_BUDGET_FRACTION,
    Budgets,
    choose_plan,
)
from slideformer.progress import MetricsCallback, RunLog, SilentLog, loss_curve
from slideformer.run_dir import claim_output_dir
from slideformer.runtime import AdamWConfig, Engine
from slideformer.runtime.ranks import Ranks
from slideformer.learning_rate import learning_rate
from slideformer.tokenizer import HFTokenizer, Tokenizer
from slideformer.train_config import ConfigError, TrainConfig, resume_changes


@dataclass
class Sequences:
    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None  # packed per sample: each token's position in its sample

    def rows(self, index: torch.Tensor | slice) -> Sequences:
        return Sequences(self.ids[index], self.labels[index], None if self.positions is None else self.positions[index])


def weights_for(cfg: TrainConfig, model_cfg: ModelConfig):
    """A model directory's weights, checked against its config (names and shapes), or seeded random weights
    for a preset."""
    path = Path(parse_model_spec(cfg.model)[0])
    if not path.is_dir():
        return RandomWeights(model_cfg, seed=cfg.seed)
    reader = open_weights(path)
    check_weights(reader, model_cfg)
    return reader


def sequences(cfg: TrainConfig, examples: list[Example], tok: Tokenizer, split: str, chunk: int = 1) -> Sequences:
    """The rows as sequences (padding-free bins of the plan's `chunk` of them); rows that lose trained tokens to
    seq are counted, reported, and stop the run above max_cut_fraction."""
    truncated, dropped = cut_rows(examples, cfg.seq, cfg.pack)
    if truncated or dropped:
        share = (truncated + dropped) / len(examples)
        report = (
            f"{split} data: of {len(examples)} rows, {truncated} longer than seq {cfg.seq} were truncated and "
            f"{dropped} dropped (no trained token within seq)"
        )
        if share > cfg.max_cut_fraction:
            raise DataError(
                f"{report}: {share:.1%} of the rows, above max_cut_fraction {cfg.max_cut_fraction}; "
                "raise seq, set pack: true, or raise max_cut_fraction"
            )
        print(report, file=sys.stderr)
    return Sequences(
        *to_sequences(examples, cfg.seq, tok, cfg.pack, not cfg.cross_sample_attention, cfg.packing, chunk)
    )


def bin_rows(cfg: TrainConfig, chunk: int) -> int:
    """Sequences kept together as one unit of the data: a padding-free bin is the plan's chunk of them."""
    return chunk if cfg.pack and cfg.packing == "padding_free" else 1


def tokenized_data(
    cfg: TrainConfig,
    tok: Tokenizer,
    rows: Iterable[dict] | None = None,
    eval_rows: Iterable[dict] | None = None,
    chunk: int = 1,
) -> tuple[Sequences, Sequences | None]:
    """The training and held-out sequences: from the config's files, or from rows given in Python; `chunk`
    the plan's (packing 'padding_free' fills bins of that many sequences, held out as a whole)."""
    examples = examples_from_rows(rows, "dataset", tok) if rows is not None else load_examples(cfg.data, tok)
    train = sequences(cfg, examples, tok, "train", chunk)
    if cfg.eval_data or eval_rows is not None:
        held_examples = (
            examples_from_rows(eval_rows, "eval_dataset", tok)
            if eval_rows is not None
            else load_examples(cfg.eval_data, tok)
        )
        held_out = sequences(cfg, held_examples, tok, "eval", chunk)
        if not len(held_out.ids):
            where = "eval_dataset" if eval_rows is not None else f"eval_data {', '.join(cfg.eval_data)}"
            raise DataError(f"{where}: no row has a trained token within seq {cfg.seq}; fix the eval data or raise seq")
        return train, held_out
    if cfg.eval_fraction:
        unit = bin_rows(cfg, chunk)
        order = unit_order(len(train.ids), unit, cfg.seed)
        n_eval = max(1, int(len(order) // unit * cfg.eval_fraction)) * unit
        held, kept = order[:n_eval], order[n_eval:]
        return train.rows(kept), train.rows(held)
    return train, None


def device_of(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available")
    return cfg.device


def available_host_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_plan(cfg: TrainConfig, model_cfg: ModelConfig, device: str, world: int = 1) -> Plan:
    """This process's plan (batch x accumulation sequences of every step), for `world` data-parallel ranks, which
    share the host's RAM."""
    batch = cfg.sequences_per_step
    if cfg.plan != "auto":
        plan = Plan.load(cfg.plan)
        plan.validate(model_cfg.num_layers)
        if (plan.batch, plan.seq) != (batch, cfg.seq):
            raise PlanError(
                f"{cfg.plan}: plan is for batch {plan.batch} x seq {plan.seq}, the config asks for "
                f"{batch} (batch x accumulation) x {cfg.seq}"
            )
        if plan.ranks != world:
            raise PlanError(
                f"{cfg.plan}: plan is for {plan.ranks} ranks, the run has {world}; set its ranks to {world}"
            )
        if plan.device != device:
            raise PlanError(
                f"{cfg.plan}: plan is for device {plan.device!r}, the run is on {device!r}; set device "
                f"or make the plan for {device!r}"
            )
        return plan
    # Clipping and skipping a non-finite step need the global norm before any update.
    update = "after_norm" if cfg.max_grad_norm is not None or cfg.nonfinite == "skip" else "during_backward"
    if device == "cpu":
        return uniform_plan(
            cfg.model,
            model_cfg.num_layers,
            batch,
            cfg.seq,
            chunk=cfg.batch,
            window=min(2, model_cfg.num_layers),
            activation="recompute",
            update=update,
            device="cpu",
            ranks=world,
        )
    budgets = Budgets(
        int(torch.cuda.mem_get_info()[0] * GPU_BUDGET_FRACTION),
        int(available_host_bytes() * HOST_BUDGET_FRACTION),  # the planner counts every rank's host memory
        disk_budget(cfg),
    )
    verdict = choose_plan(
        model_cfg,
        cfg.model,
        cfg.seq,
        batch,
        Profile.load(cfg.profile),
        budgets,
        clip=update == "after_norm",
        ranks=world,
    )
    if not verdict.fits:
        raise PlanError(f"no plan fits batch {batch} x seq {cfg.seq}: " + "; ".join(verdict.shortfalls))
    assert verdict.plan is not None, "a plan that fits is returned with the verdict"
    return verdict.plan


def disk_budget(cfg: TrainConfig) -> int:
    if cfg.disk_dir is None:
        return 0
    if cfg.disk_budget_gb is not None:
        return int(cfg.disk_budget_gb * GiB)
    Path(cfg.disk_dir).mkdir(parents=True, exist_ok=True)
    return int(shutil.disk_usage(cfg.disk_dir).free * DISK_BUDGET_FRACTION)


class FineTune:
    """The fine-tuning recipe, in three phases: `setup` (resume checks, the engine, a restored state, the run's
    records), `train` (the steps, with eval and checkpoints) and `close` (the engine, the loss curve and the
    summary). `run` calls them in order; the demo runs the same recipe on its own data."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        source,
        train: Sequences,
        held_out: Sequences | None,
        tokenizer_files: list[Path],
        plan: Plan,
        callbacks: Sequence[MetricsCallback] = (),
        ranks: Ranks | None = None,
    ) -> None:
        """`ranks`: this process's data-parallel ranks; each trains its share of every step, rank 0 alone
        evaluates and writes the run's files."""
        self.cfg, self.model_cfg, self.source, self.plan = cfg, model_cfg, source, plan
        self.held_out, self.tokenizer_files, self.callbacks, self.ranks = held_out, tokenizer_files, callbacks, ranks
        self.lead = ranks is None or ranks.rank == 0
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        world, first = (ranks.world, ranks.rank * cfg.sequences_per_step) if ranks else (1, 0)
        self.share = slice(first, first + cfg.sequences_per_step)  # this rank's rows of every step's batch
        self.batches = Batches(
            train.ids,
            train.labels,
            cfg.sequences_per_step * world,
            cfg.seed,
            train.positions,
            bin_rows(cfg, plan.chunk),
        )
        self.total = cfg.max_steps or cfg.epochs * self.batches.steps_per_epoch
        self.data_sha = fingerprint(train, held_out)
        self.start, self.saved_at = 0, None  # type: int, Path | None

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.warmup_steps > self.total:
            raise ConfigError(f"warmup_steps {cfg.warmup_steps} is longer than the run's {self.total} steps")
        resume_from = self._resume_point() if cfg.resume else None  # checked before the engine loads any weights
        self.engine = Engine(
            self.model_cfg,
            self.plan,
            self.source,
            AdamWConfig(
                lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                skip_nonfinite=cfg.nonfinite == "skip",
            ),
            disk_dir=cfg.disk_dir,
            ranks=self.ranks,
        )
        if resume_from is not None:
            self.batches.restore(load_checkpoint(resume_from, self.engine)["data"])
        self.saved_at = resume_from
        if not self.lead:
            self.log: RunLog | SilentLog = SilentLog()
            return
        self.out.mkdir(parents=True, exist_ok=True)  # claimed by train_from_config; the demo calls run directly
        check_free_space(self.out, checkpoint_bytes(self.model_cfg, self.tokenizer_files), "a checkpoint")
        (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        (self.out / "plan.json").write_text(self.plan.to_json())
        self.log = RunLog(self.out, self.total, self.start, cfg.report_to, self.callbacks, dataclasses.asdict(cfg))

    def _resume_point(self) -> Path:
        """The newest valid checkpoint, refused if it was trained with other settings or data."""
        cfg = self.cfg
        resume_from, skipped = newest_valid_checkpoint(self.ckpt_root)
        for line in skipped:
            print(f"resume: skipping {line}", file=sys.stderr)
        if resume_from is None:
            raise CheckpointError(
                f"resume: no valid checkpoint under {self.ckpt_root}" + "".join(f"; {s}" for s in skipped)
            )
        print(f"resume: from {resume_from.name}", file=sys.stderr)
        saved = read_trainer_state(resume_from)
        self.start = saved["step"]
        changes = resume_changes(saved["config"], cfg)
        if saved.get("data_sha256") != self.data_sha:
            changes.append(
                "the tokenized data (its files' content, the tokenizer, the eval split or how packed samples "
                "are kept apart)"
            )
        if changes:
            raise ConfigError(
                f"resume: {resume_from} was trained with other settings ({'; '.join(changes)}); "
                "restore them, or start again with --overwrite"
            )
        if self.total <= self.start:
            raise ConfigError(
                f"resume: {resume_from} is at step {self.start}, the run ends at step {self.total}; "
                "raise max_steps (or epochs) to train on"
            )
        return resume_from

    def evaluate(self, step: int) -> None:
        if self.held_out is None or not self.lead:  # rank 0 evaluates alone; the others wait at the next step
            return
        n = self.cfg.sequences_per_step
        total_loss = total_tokens = 0.0
        for i in range(0, len(self.held_out.ids), n):
            part = self.held_out.rows(slice(i, i + n))
            tokens = int((part.labels >= 0).sum())
            total_loss += self.engine.eval_loss(part.ids, part.labels, part.positions) * tokens
            total_tokens += tokens
        self.log.record({"step": step, "eval_loss": total_loss / max(total_tokens, 1)})

    def checkpoint(self, step: int) -> Path:
        if not self.lead:  # the states are gathered from every rank; rank 0 writes them
            self.engine.training_state()
            return self.ckpt_root / f"step-{step:06d}"
        return save_checkpoint(
            self.ckpt_root,
            step,
            self.model_cfg,
            self.engine,
            self.tokenizer_files,
            {
                "step": step,
                "data": self.batches.state(),
                "config": dataclasses.asdict(self.cfg),
                "data_sha256": self.data_sha,
            },
            self.cfg.keep_checkpoints,
        )

    def train(self) -> None:
        cfg, engine, batches, total, log = self.cfg, self.engine, self.batches, self.total, self.log
        flops_per_step = self.model_cfg.model_flops_per_token(cfg.seq) * cfg.sequences_per_step * cfg.seq
        if self.start == 0:
            self.evaluate(0)
        self.started = time.perf_counter()
        with StopRequests() as stop, log:
            for step in range(self.start, total):
                lr = learning_rate(step, cfg.lr, total, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
                engine.set_lr(lr)
                ids, labels, positions = batches.next()
                mine = self.share  # this rank's share of the step's sequences
                t = time.perf_counter()
                r = engine.train_step(ids[mine], labels[mine], None if positions is None else positions[mine])
                dt = time.perf_counter() - t
                log.step(
                    {
                        "step": step + 1,
                        "loss": r.loss,
                        "grad_norm": r.grad_norm,
                        "lr": lr,
                        "trained_tokens": r.tokens,
                        "step_s": dt,
                        "tokens_per_s": ids.numel() / dt,
                        "tflops": flops_per_step / dt / 1e12,
                        "epoch": batches.epoch,
                    }
                )
                check_step(step + 1, r.loss, r.grad_norm, cfg.nonfinite, self.saved_at.name if self.saved_at else None)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                    self.evaluate(step + 1)
                stopping = stop.signal is not None
                if self.ranks is not None:  # every rank stops at the same step
                    stopping = self.ranks.any(stopping, engine.device)
                if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (stopping and step + 1 < total):
                    self.saved_at = self.checkpoint(step + 1)
                if stopping and step + 1 < total:
                    signum = stop.signal or signal.SIGTERM  # another rank's
                    raise TrainingStopped(
                        f"stopped by {signum.name} after step {step + 1}: saved {self.saved_at}; "
                        "continue with --resume",
                        exit_code=128 + signum,
                    )
            self.evaluate(total)
            if self.saved_at is None or not self.saved_at.name.endswith(f"{total:06d}"):
                self.saved_at = self.checkpoint(total)

    def close(self) -> dict:
        """The run's summary (also written to output_dir/summary.json; {} on ranks but the first)."""
        self.engine.close()
        if not self.lead:
            return {}
        out = self.out
        loss_curve(out / "metrics.jsonl", out / "loss.png")
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # resumed runs too
        losses = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        summary = {
            "steps": self.total,
            "resumed_from": self.start or None,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "eval_loss_before": evals[0] if evals else None,
            "eval_loss_after": evals[-1] if evals else None,
            "seconds": time.perf_counter() - self.started,
            "checkpoint": str(self.saved_at),
            "plan": str(out / "plan.json"),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def run(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    source,
    train: Sequences,
    held_out: Sequences | None,
    tokenizer_files: list[Path],
    plan: Plan,
    callbacks: Sequence[MetricsCallback] = (),
    ranks: Ranks | None = None,
) -> dict:
    """The whole recipe: setup, train, close; returns the run's summary."""
    recipe = FineTune(cfg, model_cfg, source, train, held_out, tokenizer_files, plan, callbacks, ranks)
    recipe.setup()
    recipe.train()
    return recipe.close()


def fingerprint(train: Sequences, held_out: Sequences | None) -> str:
    """SHA-256 of the tokenized sequences: a resumed run must see the same data, split and packed the same way."""
    h = hashlib.sha256()
    for part in (train, held_out):
        for t in (part.ids, part.labels, part.positions) if part is not None else ():
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


class StopRequests:
    """SIGINT and SIGTERM ask the loop to save a checkpoint at the next step boundary and stop (main thread only)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._request)
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signal is not None:  # asked twice: stop now, losing the steps since the last checkpoint
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train_from_config(
    cfg: TrainConfig,
    rows: Iterable[dict] | None = None,
    eval_rows: Iterable[dict] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
) -> dict:
    """Everything `slideformer train --config` does; `rows` and `eval_rows` (from Python) stand in for the
    config's data and eval_data files, `callbacks` get every metrics record. With `gpus` > 1 it starts one
    process per GPU (under torchrun, each process is one rank already) and returns the first rank's summary."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.gpus > 1 and world == 1:
        return launch_ranks(cfg, rows, eval_rows, callbacks)
    model_cfg = load_model_config(cfg.model)
    if cfg.seq > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"seq {cfg.seq} is longer than the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}; lower seq"
        )
    if cfg.pack and cfg.packing == "padding_free" and model_cfg.family == GENERIC:
        raise ConfigError(
            "packing 'padding_free' runs on our own numerics (Llama, Qwen, Mistral); this model takes the generic "
            "path, whose masks would span a whole chunk: use packing: best_fit"
        )
    model_dir = parse_model_spec(cfg.model)[0]
    tok_dir = cfg.tokenizer or (model_dir if Path(model_dir).is_dir() else None)
    if tok_dir is None:
        raise ConfigError(f"model {cfg.model!r} is a preset: set tokenizer to a directory with tokenizer.json")
    tok = HFTokenizer(tok_dir)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, the model's embedding {model_cfg.vocab_size}")
    source = weights_for(cfg, model_cfg)  # names and shapes only: weights are read as the engine starts
    device = device_of(cfg)
    ranks = join_ranks(device) if world > 1 else None
    plan = make_plan(cfg, model_cfg, device, world)  # refuses a job that does not fit before any data or weights load
    lead = ranks is None or ranks.rank == 0
    with claim_output_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite) if lead else contextlib.nullcontext():
        if ranks is not None:  # rank 0 has claimed (and with --overwrite cleared) the output directory
            dist.barrier()
        train, held_out = tokenized_data(cfg, tok, rows, eval_rows, plan.chunk)
        summary = run(cfg, model_cfg, source, train, held_out, tok.files(), plan, callbacks, ranks)
        if ranks is not None:  # no rank leaves (closing its connections) before every rank's last collective
            dist.barrier()
        return summary


def join_ranks(device: str) -> Ranks:
    """This process as one rank of the group torchrun (or `launch_ranks`) described in its environment."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks.from_default_group()


class RankFailed(RuntimeError):
    """A data-parallel rank stopped with an error (its message follows)."""


def launch_ranks(
    cfg: TrainConfig, rows: Iterable[dict] | None, eval_rows: Iterable[dict] | None, callbacks: Sequence
) -> dict:
    """`cfg.gpus` processes on this host, one per GPU, each one rank of the run; the first rank's summary."""
    import socket

    import torch.multiprocessing as mp

    if callbacks:
        raise ConfigError("callbacks run in the calling process: with gpus > 1, start the ranks with torchrun")
    if device_of(cfg) == "cuda" and cfg.gpus > torch.cuda.device_count():
        raise ConfigError(f"gpus {cfg.gpus}: this host has {torch.cuda.device_count()} CUDA devices")
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows, eval_rows = (None if r is None else list(r) for r in (rows, eval_rows))
    try:
        mp.spawn(_rank_main, args=(cfg, port, rows, eval_rows), nprocs=cfg.gpus)
    except mp.ProcessRaisedException as e:
        raise RankFailed(str(e).strip().splitlines()[-1]) from None
    return json.loads((Path(cfg.output_dir) / "summary.json").read_text())


def _rank_main(rank: int, cfg: TrainConfig, port: int, rows: list | None, eval_rows: list | None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.gpus), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    train_from_config(cfg, rows, eval_rows)
    dist.destroy_process_group()


def print_summary(summary: dict) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    print(
        f"\n{summary['steps']} steps in {summary['seconds']:.0f} s"
        + (f" (resumed at step {summary['resumed_from']})" if summary["resumed_from"] else "")
        + f"; train loss {fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])}; "
        f"eval loss {fmt(summary['eval_loss_before'])} -> {fmt(summary['eval_loss_after'])}\n"
        f"checkpoint (Hugging Face directory): {summary['checkpoint']}"
    )
