"""The one training loop (both stages): accelerate (CPU, DDP, DeepSpeed ZeRO), resumable exactly.

Read it as an engine of named steps: ``train`` runs ``set_up`` (accelerator, loaders, optimizer,
resume), then ``optimizer_step`` until ``train.max_steps`` with ``log_window``, ``evaluate`` and
``save_training_checkpoint`` on schedule, then ``finish`` (``final/``); the steps share one ``Run``.
Its rooms: ``optim`` (schedule, parameter groups), ``checkpoints`` (save, verify, restore, the data
position), ``launch`` (accelerator, lock, per-rank batch), ``metrics`` (log lines, FLOPs), ``evaluation``.

Every source of randomness in a step is seeded from (seed, step, rank), and the data stream is
a pure function of (seed, epoch, rank, worker), so a run resumed from a checkpoint repeats the
uninterrupted run bit for bit (CPU, float32) without restoring any RNG state.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from common.seeding import torch_seed
from data_tools.loader import ShardSet, train_loader
from data_tools.transforms import EvalTransform, GpuTrainTransform, TrainTransform
from pretrain.banner import banner, parameter_count, run_facts
from pretrain.checkpoints import (
    DataTrail,
    Position,
    StreamResume,
    check_best_metric,
    find_resume,
    finish,
    keep_best,
    plan_stream_resume,
    recorded_best,
    restore,
    sample_record,
    save_training_checkpoint,
)
from pretrain.config import Config, ConfigError
from pretrain.evaluation import Evals, evaluate, evaluated_metrics, evaluation_sets
from pretrain.launch import (
    StopSignals,
    agreed_stop,
    launch_lock,
    make_accelerator,
    on_main,
    per_rank_batch,
    set_threads,
    stopped,
)
from pretrain.metrics import (
    Window,
    log_window,
    measure_peak_flops,
    record_run,
    train_flops_per_image,
)
from pretrain.nonfinite import apply_update, check_policy, nonfinite_step, save_or_roll_back
from pretrain.objectives import Task
from pretrain.optim import build_optimizer, lr_factor
from pretrain.resume_checks import check_resume
from vit import ModelInfo, VisionTransformer

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Run:
    """What the steps of one run share: made by ``set_up``, then read (and ``pos`` advanced) by the others."""

    cfg: Config
    accelerator: Accelerator
    stage: str
    info: ModelInfo
    task: torch.nn.Module  # model + objective as ``accelerator.prepare`` returned them
    optimizer: torch.optim.Optimizer
    batches: Callable  # (epoch=, skip_batches=) -> this rank's micro-batches of that epoch
    transform: TrainTransform | EvalTransform  # its ``to_device`` makes the model's input of a loader batch
    evals: Evals
    pos: Position
    window: Window  # the steps since the last metrics line
    resumed_from: Path | None
    trail: DataTrail  # the data stream's state past the position, and the sample records
    stream_resume: StreamResume  # how the first epoch's loader goes on from the checkpoint
    flops_per_image: float
    peak_flops: float
    metrics: tuple[str, ...]  # "loss", then the objective's
    best: tuple[int, float] | None = None  # train.keep_best: (step, value) of the best evaluation so far

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def micro(self) -> int:
        return per_rank_batch(self.cfg, self.accelerator.num_processes)


def train(cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo, stage: str,
          shards: ShardSet, changes: list[str] = ()) -> Path:
    """Run (or resume) the configured training on ``shards``; returns the final model folder. ``changes``: what
    a fine-tune changed in the model, for the start banner."""
    threads = set_threads(cfg.train.threads)
    accelerator = make_accelerator(cfg, model.cfg.embed_dim)
    try:
        with StopSignals() as stop, launch_lock(accelerator, Path(cfg.train.output_dir), stage):
            counted = parameter_count(model), parameter_count(objective)  # before ZeRO-3 partitions them
            run = set_up(accelerator, cfg, model, objective, info, stage, shards)
            if accelerator.is_main_process:
                print(banner(run_facts(run, shards, model, counted, threads, list(changes),
                                       run.resumed_from and str(run.resumed_from))), flush=True)
            return run_steps(run, stop)
    finally:
        accelerator.end_training()  # also ends the process group


def run_steps(run: Run, stop: StopSignals) -> Path:
    """Optimizer steps up to ``train.max_steps``, logging and checkpointing on schedule; then ``final/``.
    On a stop signal (any rank's), every rank ends the step in progress, the run checkpoints there and raises
    ``Stopped``."""
    cfg = run.cfg.train
    stream = micro_batches(run, run.stream_resume.resume)
    window = run.window
    saved_at = run.pos.step if run.resumed_from else None
    run.task.train()
    with tqdm(total=cfg.max_steps, initial=run.pos.step, desc=run.stage,
              disable=not run.accelerator.is_main_process) as bar:
        while run.pos.step < cfg.max_steps:
            taken = run.pos.step
            grad_norm = optimizer_step(run, stream, window)
            bar.update(run.pos.step - taken)
            if run.pos.step <= taken:  # rolled back to the last checkpoint (train.on_nonfinite=rollback)
                continue
            last = run.pos.step == cfg.max_steps
            if run.pos.step % cfg.log_every == 0 or last:
                log_window(run, window, grad_norm, bar)
            if run.pos.step % cfg.checkpoint_every == 0 or last:
                evaluate(run, bar)
                if not save_or_roll_back(run):  # the update left the weights not finite: rolled back
                    bar.update(run.pos.step - bar.n)
                    continue
                saved_at = run.pos.step
                if run.best is not None and run.best[0] == run.pos.step:
                    keep_best(run)
            if not last and (signum := agreed_stop(run.accelerator, stop)):
                if saved_at != run.pos.step:
                    save_or_roll_back(run)  # a rollback leaves the run at its newest checkpoint
                raise stopped(run.accelerator, signum, run.pos.step)
        if saved_at != run.pos.step:  # max_steps already reached when resumed
            save_training_checkpoint(run)
        return finish(run)


def set_up(accelerator: Accelerator, cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo,
           stage: str, shards: ShardSet) -> Run:
    """Everything before the first step: resume checks, loaders, evaluation sets, optimizer, restored state,
    the run's config.json and rewound metrics."""
    check_policy(cfg, accelerator.state.deepspeed_plugin is not None)
    resume_from = find_resume(cfg)
    if resume_from is not None and (note := on_main(accelerator, lambda: check_resume(resume_from, cfg, stage, model))):
        accelerator.print(f"note: {note}")
    d = cfg.data
    norm = (tuple(d.mean), tuple(d.std))
    transform = train_transform(cfg, model.cfg.image_size, accelerator.device)
    batches = partial(train_loader, shards, transform, per_rank_batch(cfg, accelerator.num_processes),
                      rank=accelerator.process_index, world_size=accelerator.num_processes, workers=d.workers,
                      seed=cfg.train.seed, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer,
                      stall_timeout=d.stall_timeout)
    per_epoch = len(batches(epoch=0, skip_batches=0))  # checks shards vs ranks x workers before any work
    stream_resume = plan_stream_resume(resume_from, cfg, shards, accelerator.num_processes,
                                       accelerator.process_index, accelerator.state.deepspeed_plugin is not None,
                                       per_epoch, per_rank_batch(cfg, accelerator.num_processes))
    if stream_resume.line:
        accelerator.print(stream_resume.line)
    record = sample_record(Path(cfg.train.output_dir), accelerator.process_index) if d.record_keys else None
    evals = evaluation_sets(accelerator, cfg, EvalTransform(model.cfg.image_size, *norm,
                                                            interpolation=d.resize_filter))
    check_best_metric(cfg, evaluated_metrics(evals, objective.metrics))
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    task = Task(model, objective)
    optimizer = build_optimizer(cfg, task, fused=accelerator.device.type == "cuda")
    task_p, optimizer = accelerator.prepare(torch.compile(task) if cfg.train.compile else task, optimizer)
    window = Window(("loss", *objective.metrics))
    pos = restore(accelerator, resume_from, window)
    if resume_from is not None:
        accelerator.print(f"resumed from {resume_from} at step {pos.step}")
    on_main(accelerator, lambda: record_run(Path(cfg.train.output_dir), cfg, stage, pos.step))
    best = recorded_best(accelerator, cfg)
    accelerator.init_trackers(stage)
    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
    peak = (cfg.train.peak_tflops * 1e12) if cfg.train.peak_tflops else measure_peak_flops(accelerator.device,
                                                                                            matmul_dtype)
    return Run(cfg, accelerator, stage, info, task_p, optimizer, batches, transform, evals, pos, window, resume_from,
               DataTrail(shards.describe(), record), stream_resume, train_flops_per_image(model), peak,
               window.names, best)


def train_transform(cfg: Config, image_size, device: torch.device) -> TrainTransform | EvalTransform:
    """The workers' transform of training images, and what the step does to the batches they hand over."""
    d = cfg.data
    if d.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode=gpu: needs a CUDA device (this process trains on {device}); "
                          "use data.decode=cpu")
    if d.decode == "gpu" and not d.augment:
        raise ConfigError("data.decode=gpu: decodes the random-resized crops of data.augment=true only")
    if d.decode == "gpu" and importlib.util.find_spec("torchvision") is None:
        raise ConfigError("data.decode=gpu: needs torchvision (its decode_jpeg drives nvJPEG): "
                          "pip install 'vitpipe[interop]'")
    norm = (tuple(d.mean), tuple(d.std))
    if d.decode == "gpu":
        return GpuTrainTransform(image_size, *norm, (d.crop_scale_min, 1.0), interpolation=d.resize_filter)
    if d.augment:
        return TrainTransform(image_size, *norm, (d.crop_scale_min, 1.0), interpolation=d.resize_filter)
    return EvalTransform(image_size, *norm, interpolation=d.resize_filter)


def micro_batches(run: Run, resume: dict | None) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Micro-batches from where the run is, forever: each with the (epoch, batch) that comes after it. ``resume``:
    where the loader's streams are at the run's position (``train_loader``'s ``resume``)."""
    epoch, skip = run.pos.epoch, run.pos.batch
    while True:
        loader = run.batches(epoch=epoch, skip_batches=skip, resume=resume)
        end = skip + len(loader)  # the epoch's number of batches (the loader has the rest)
        for i, batch in enumerate(loader, skip):
            yield batch, ((epoch, i + 1) if i + 1 < end else (epoch + 1, 0))
        epoch, skip, resume = epoch + 1, 0, {}


def optimizer_step(run: Run, stream: Iterator, window: Window) -> torch.Tensor | float | None:
    """``train.grad_accum`` micro-batches, one optimizer update, unless the step is non-finite (then
    ``train.on_nonfinite``: stop, skip or roll back). Returns the gradient norm (None when not clipping)."""
    cfg, accelerator = run.cfg, run.accelerator
    factor = lr_factor(run.pos.step, cfg.schedule.warmup_steps, cfg.train.max_steps, cfg.schedule.decay,
                       cfg.schedule.min_lr_ratio)
    for g in run.optimizer.param_groups:
        g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0) * factor
    step_values = torch.zeros(len(run.metrics), device=accelerator.device)
    grad_norm = None
    for k in range(cfg.train.grad_accum):
        batch, after = next(stream)
        window.skipped += int(batch.pop("skipped"))
        batch = run.transform.to_device(batch, accelerator.device)
        window.skipped += len(batch.pop("undecodable", ()))  # data.decode=gpu: JPEGs the device could not decode
        run.trail.took(batch, run.pos.epoch)  # after the device's drops: their keys were not trained on
        run.pos.epoch, run.pos.batch = after
        step_values += micro_step(run, batch, k) / cfg.train.grad_accum
    step_values = accelerator.reduce(step_values, "mean")
    if run.deepspeed:  # its engine updated inside backward
        grad_norm, finite = run.task.get_global_grad_norm(), bool(torch.isfinite(step_values).all())
    else:
        grad_norm, finite = apply_update(run, step_values)
    if not finite:
        return nonfinite_step(run, step_values, grad_norm)
    run.pos.step += 1
    run.trail.step_done(run.pos.step)
    window.add(step_values.tolist())
    return grad_norm


def micro_step(run: Run, batch: dict, k: int) -> torch.Tensor:
    """Forward and backward of the ``k``-th micro-batch of the step (gradients synced on the last); its loss and
    metrics."""
    accelerator, seed = run.accelerator, run.cfg.train.seed
    torch.manual_seed(torch_seed(seed, "step", run.pos.step, k, accelerator.process_index))  # dropout, drop path
    gen = torch.Generator(device=accelerator.device)
    gen.manual_seed(torch_seed(seed, "objective", run.pos.step, k, accelerator.process_index))
    with accelerator.accumulate(run.task), accelerator.autocast():
        loss, extra = run.task(batch, gen)
        accelerator.backward(loss)
    return torch.stack([loss.detach().float(), *(extra[m].float() for m in run.metrics[1:])])
