"""The one training loop (both stages): accelerate (CPU, DDP, DeepSpeed ZeRO), resumable exactly.

Read it as an engine of named steps: ``train`` runs ``set_up`` (accelerator, loaders, optimizer,
resume), then ``optimizer_step`` until ``train.max_steps`` with ``log_window``, ``evaluate`` and
``save_training_checkpoint`` on schedule, then ``finish`` (``final/``); the steps share one ``Run``.

Every source of randomness in a step is seeded from (seed, step, rank), and the data stream is
a pure function of (seed, epoch, rank, worker), so a run resumed from a checkpoint repeats the
uninterrupted run bit for bit (CPU, float32) without restoring any RNG state.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from common.errors import USER_ERRORS, VitpipeError
from common.io import atomic_path, fresh_tmp_dir, replace_dir, tmp_beside, write_json
from common.lock import FolderLock
from common.seeding import torch_seed
from data_tools.loader import ShardSet, eval_loader, resolve_shards, train_loader
from data_tools.transforms import EvalTransform, TrainTransform
from pretrain.config import Config, ConfigError
from pretrain.monitor import knn_top1, pooled_features
from pretrain.objectives import Task
from pretrain.resume import check_resume, deepspeed_safe_globals, weights_only_loads, write_manifest
from vit import ModelInfo, VisionTransformer
from vit.checkpoint import save_state_dict

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.json"
METRICS, VAL_METRICS = "metrics.jsonl", "val_metrics.jsonl"


class TrainingError(VitpipeError, RuntimeError):
    """The run cannot go on (a non-finite loss, ...); one line for the user."""


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Evals:
    """What is evaluated at every checkpoint: the objective on held-out shards, and the kNN monitor."""

    val: ShardSet | None
    monitor: ShardSet | None
    bank: ShardSet | None
    transform: EvalTransform


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
    evals: Evals
    pos: Position
    resumed: bool
    flops_per_image: float
    peak_flops: float
    metrics: tuple[str, ...]  # "loss", then the objective's

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def micro(self) -> int:
        return per_rank_batch(self.cfg, self.accelerator.num_processes)


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line."""

    names: tuple[str, ...]
    sums: dict = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    started: float = 0.0

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.skipped, self.started = dict.fromkeys(self.names, 0.0), 0, 0, time.perf_counter()

    def add(self, values: list[float]) -> None:
        for name, value in zip(self.names, values):
            self.sums[name] += value
        self.steps += 1


def train(cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo, stage: str,
          shards: ShardSet) -> Path:
    """Run (or resume) the configured training on ``shards``; returns the final model folder."""
    accelerator = _accelerator(cfg, model.cfg.embed_dim)
    try:
        with _launch_lock(accelerator, Path(cfg.train.output_dir), stage):
            run = set_up(accelerator, cfg, model, objective, info, stage, shards)
            return run_steps(run)
    finally:
        accelerator.end_training()  # also ends the process group


def run_steps(run: Run) -> Path:
    """Optimizer steps up to ``train.max_steps``, logging and checkpointing on schedule; then ``final/``."""
    cfg = run.cfg.train
    stream = micro_batches(run)
    window = Window(run.metrics)
    saved_at = run.pos.step if run.resumed else None
    run.task.train()
    with tqdm(total=cfg.max_steps, initial=run.pos.step, desc=run.stage,
              disable=not run.accelerator.is_main_process) as bar:
        while run.pos.step < cfg.max_steps:
            grad_norm = optimizer_step(run, stream, window)
            bar.update(1)
            last = run.pos.step == cfg.max_steps
            if run.pos.step % cfg.log_every == 0 or last:
                log_window(run, window, grad_norm, bar)
            if run.pos.step % cfg.checkpoint_every == 0 or last:
                evaluate(run, bar)
                save_training_checkpoint(run)
                saved_at = run.pos.step
        if saved_at != run.pos.step:  # max_steps already reached when resumed
            save_training_checkpoint(run)
        return finish(run)


# ---- setting up -----------------------------------------------------------------------------------------------------

def set_up(accelerator: Accelerator, cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo,
           stage: str, shards: ShardSet) -> Run:
    """Everything before the first step: resume checks, loaders, evaluation sets, optimizer, restored state,
    the run's config.json and rewound metrics."""
    resume_from = find_resume(cfg)
    if resume_from is not None and (note := _on_main(accelerator, lambda: check_resume(resume_from, cfg, stage))):
        accelerator.print(f"note: {note}")
    d = cfg.data
    norm = (tuple(d.mean), tuple(d.std))
    transform = TrainTransform(model.cfg.image_size, *norm, (d.crop_scale_min, 1.0)) if d.augment \
        else EvalTransform(model.cfg.image_size, *norm)
    batches = partial(train_loader, shards, transform, per_rank_batch(cfg, accelerator.num_processes),
                      rank=accelerator.process_index, world_size=accelerator.num_processes, workers=d.workers,
                      seed=cfg.train.seed, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer)
    len(batches(epoch=0, skip_batches=0))  # checks shards vs ranks x workers before any work
    evals = evaluation_sets(accelerator, cfg, EvalTransform(model.cfg.image_size, *norm))
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    task = Task(model, objective)
    optimizer = build_optimizer(cfg, task)
    task_p, optimizer = accelerator.prepare(torch.compile(task) if cfg.train.compile else task, optimizer)
    pos = restore(accelerator, resume_from)
    _on_main(accelerator, lambda: record_run(Path(cfg.train.output_dir), cfg, stage, pos.step))
    accelerator.init_trackers(stage)
    peak = (cfg.train.peak_tflops * 1e12) if cfg.train.peak_tflops else measure_peak_flops(accelerator.device)
    return Run(cfg, accelerator, stage, info, task_p, optimizer, batches, evals, pos, resume_from is not None,
               train_flops_per_image(model), peak, ("loss", *objective.metrics))


def evaluation_sets(accelerator, cfg: Config, transform: EvalTransform) -> Evals:
    """The held-out and kNN-monitor shards (None: not configured, or not evaluated under ZeRO-3)."""
    d = cfg.data
    val, monitor_shards, bank = (resolve_shards(s) if s else None for s in (d.val, d.monitor, d.monitor_bank))
    for key, labelled in (("data.monitor", monitor_shards), ("data.monitor_bank", bank)):
        if labelled is not None and not labelled.classes:
            raise ConfigError(f"{key}: the kNN monitor needs labelled shards (their index.json lists no classes)")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3 and (val or monitor_shards):
        accelerator.print("note: data.val and data.monitor are not evaluated under ZeRO-3 (its parameters are "
                          "sharded across ranks)")
        val = monitor_shards = None
    return Evals(val, monitor_shards, bank, transform)


def restore(accelerator, resume_from: Path | None) -> Position:
    """Load the checkpoint's full state (weights, optimizer, ...) into the prepared objects; where it stopped."""
    if resume_from is None:
        return Position()
    deepspeed = accelerator.state.deepspeed_plugin is not None
    with weights_only_loads(deepspeed_safe_globals() if deepspeed else []):
        accelerator.load_state(str(resume_from / "state"))
    pos = Position(**json.loads((resume_from / TRAINER_STATE).read_text())["position"])
    accelerator.print(f"resumed from {resume_from} at step {pos.step}")
    return pos


def record_run(out: Path, cfg: Config, stage: str, step: int) -> None:
    """The run's config.json, and its metric logs cut back to ``step`` (what a killed run logged past it)."""
    _rewind_metrics(out / METRICS, step)
    _rewind_metrics(out / VAL_METRICS, step)
    write_json(out / "config.json", {"stage": stage, **cfg.to_dict()})


# ---- one optimizer step ---------------------------------------------------------------------------------------------

def micro_batches(run: Run) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Micro-batches from where the run is, forever: each with the (epoch, batch) that comes after it."""
    epoch, skip = run.pos.epoch, run.pos.batch
    while True:
        loader = run.batches(epoch=epoch, skip_batches=skip)
        end = skip + len(loader)  # the epoch's number of batches (the loader has the rest)
        for i, batch in enumerate(loader, skip):
            yield batch, ((epoch, i + 1) if i + 1 < end else (epoch + 1, 0))
        epoch, skip = epoch + 1, 0


def optimizer_step(run: Run, stream: Iterator, window: Window) -> torch.Tensor | float | None:
    """``train.grad_accum`` micro-batches, one optimizer update; stops the run on a non-finite loss.
    Returns the gradient norm (None when not clipping)."""
    cfg, accelerator = run.cfg, run.accelerator
    factor = lr_factor(run.pos.step, cfg.schedule.warmup_steps, cfg.train.max_steps, cfg.schedule.decay,
                       cfg.schedule.min_lr_ratio)
    for g in run.optimizer.param_groups:
        g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0) * factor
    step_values = torch.zeros(len(run.metrics), device=accelerator.device)
    grad_norm = None
    for k in range(cfg.train.grad_accum):
        batch, (run.pos.epoch, run.pos.batch) = next(stream)
        window.skipped += int(batch.pop("skipped"))
        values, norm = micro_step(run, batch, k)
        step_values += values / cfg.train.grad_accum
        grad_norm = norm if norm is not None else grad_norm
    if run.deepspeed:
        grad_norm = run.task.get_global_grad_norm()
    step_values = accelerator.reduce(step_values, "mean")
    if not torch.isfinite(step_values).all():
        last = latest_checkpoint(run.out)
        raise TrainingError(f"step {run.pos.step}: loss is {step_values[0].item()}; stopping. Last good checkpoint: "
                            f"{last or 'none (no checkpoint written yet)'}")
    run.pos.step += 1
    window.add(step_values.tolist())
    return grad_norm


def micro_step(run: Run, batch: dict, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward of the ``k``-th micro-batch of the step (the update on the last); its loss and
    metrics, and the clipped gradient's norm when it updated."""
    accelerator, seed, clip = run.accelerator, run.cfg.train.seed, run.cfg.optim.clip_grad_norm
    batch = {key: v.to(accelerator.device) for key, v in batch.items()}
    torch.manual_seed(torch_seed(seed, "step", run.pos.step, k, accelerator.process_index))  # dropout, drop path
    gen = torch.Generator(device=accelerator.device)
    gen.manual_seed(torch_seed(seed, "objective", run.pos.step, k, accelerator.process_index))
    grad_norm = None
    with accelerator.accumulate(run.task), accelerator.autocast():
        loss, extra = run.task(batch, gen)
        accelerator.backward(loss)
        if accelerator.sync_gradients and not run.deepspeed and clip:
            grad_norm = accelerator.clip_grad_norm_(run.task.parameters(), clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return torch.stack([loss.detach().float(), *(extra[m].float() for m in run.metrics[1:])]), grad_norm


# ---- logging, evaluating, checkpointing, finishing ------------------------------------------------------------------

def log_window(run: Run, window: Window, grad_norm, bar) -> None:
    """One metrics line (jsonl + TensorBoard) averaging the steps since the last, then a fresh window."""
    images_per_s = window.steps * run.cfg.data.batch_size / (time.perf_counter() - window.started)
    record = {
        "step": run.pos.step, "epoch": run.pos.epoch, **{m: window.sums[m] / window.steps for m in run.metrics},
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images_per_s,
        "mfu": images_per_s * run.flops_per_image / (run.peak_flops * run.accelerator.num_processes),
        "skipped_samples": window.skipped,
    }
    run.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=run.pos.step)
    if run.accelerator.is_main_process:
        _append_line(run.out / METRICS, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    window.reset()


def evaluate(run: Run, bar) -> None:
    """Held-out loss and kNN monitor (those configured), logged to val_metrics.jsonl and TensorBoard."""
    evals, accelerator = run.evals, run.accelerator
    if evals.val is None and evals.monitor is None:
        return
    unwrapped = accelerator.unwrap_model(run.task)
    record = {"step": run.pos.step}
    if evals.val is not None:
        record.update(validate(accelerator, unwrapped, evals.val, evals.transform, run.micro, run.cfg.data.workers,
                               run.cfg.train.seed))
    if evals.monitor is not None:
        record.update(monitor(accelerator, unwrapped.model, evals.monitor, evals.bank, evals.transform, run.micro,
                              run.cfg.data.workers))
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.pos.step)
    if accelerator.is_main_process:
        _append_line(run.out / VAL_METRICS, record)
        bar.write(f"step {run.pos.step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_training_checkpoint(run: Run) -> Path:
    """Full state (for resume) + a model folder, written to ``step_N.tmp`` and renamed when complete."""
    accelerator, pos, cfg = run.accelerator, run.pos, run.cfg
    root = run.out / CHECKPOINTS
    final = root / f"step_{pos.step:08d}"
    tmp = tmp_beside(final)
    if accelerator.is_main_process:
        fresh_tmp_dir(final)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        state = accelerator.get_state_dict(run.task)  # gathers ZeRO-3 shards; every rank must call it
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the manifest hashes them
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.task).model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if weights.keys() != model.state_dict().keys():
            raise TrainingError(f"gathered weights do not match the model ({len(weights)} of "
                                f"{len(model.state_dict())} tensors); not writing {final.name}")
        provenance = {"stage": run.stage, "objective": cfg.objective.name, "step": pos.step, "config": cfg.to_dict()}
        info = run.info
        with _writing(tmp):
            save_state_dict(model.cfg, weights, tmp / "model", ModelInfo(info.labels, info.mean, info.std,
                                                                          {**info.provenance, **provenance}))
        write_json(tmp / TRAINER_STATE, {"position": pos.__dict__, "stage": run.stage})
        write_manifest(tmp)
        replace_dir(tmp, final)
        for old in step_folders(root)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _writing(folder: Path):
    """torch's and safetensors' writers report a full (or failing) disk as RuntimeError or SafetensorError,
    not OSError: one line naming the folder instead."""
    try:
        yield
    except (RuntimeError, SafetensorError) as e:
        if not any(mark in str(e) for mark in ("inline_container", "PytorchStreamWriter", "I/O error")):
            raise
        free = shutil.disk_usage(folder).free / 2**20
        raise TrainingError(f"{folder}: writing the checkpoint failed ({free:.1f} MiB free on that disk; "
                            f"{str(e).splitlines()[0]})") from None


def finish(run: Run) -> Path:
    """``final/``: a copy of the last checkpoint's model folder, renamed into place when complete."""
    final = run.out / "final"
    if run.accelerator.is_main_process:
        tmp = fresh_tmp_dir(final)
        shutil.copytree(run.out / CHECKPOINTS / f"step_{run.pos.step:08d}" / "model", tmp, dirs_exist_ok=True)
        replace_dir(tmp, final)
    run.accelerator.wait_for_everyone()
    return final


# ---- schedule and optimizer -----------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 over ``warmup`` steps, then linear or cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def layer_id(name: str, depth: int) -> int:
    """MAE's (and BEiT's) layer of a ViT parameter: 0 for the patch and position embeddings and the
    class token, 1..depth for the blocks, depth + 1 for what follows them (norm, fc_norm, head)."""
    if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(module: torch.nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on biases, norms, embeddings or tokens.

    Each group has an ``lr_scale`` (the loop multiplies the scheduled lr by it): 1, or with
    ``layer_decay`` (MAE's layer-wise lr decay) ``layer_decay ** (depth + 1 - layer_id)`` for the
    ViT inside ``module``, one group per layer and decay; parameters outside the ViT (an
    objective's) count as its top layer. The top layer (scale 1) comes first.
    """
    prefix, depth = "", 0
    if layer_decay is not None:
        found = next(((n, m) for n, m in module.named_modules() if isinstance(m, VisionTransformer)), None)
        if found is None:
            raise ConfigError("optim.layer_decay: the trained module holds no VisionTransformer")
        prefix, depth = (found[0] + "." if found[0] else ""), len(found[1].blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        layer = layer_id(name[len(prefix):], depth) if layer_decay is not None and name.startswith(prefix) \
            else depth + 1
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - layer)
        groups.setdefault((layer, flat), {"params": [], "weight_decay": 0.0 if flat else weight_decay,
                                          "lr_scale": scale})["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def build_optimizer(cfg: Config, module: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(module, o.weight_decay, o.layer_decay)
    for g in groups:
        g["lr"] = o.lr * g["lr_scale"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


# ---- throughput -----------------------------------------------------------------------------------------------------

def train_flops_per_image(model: VisionTransformer) -> float:
    """Forward + backward (3x forward) FLOPs of the encoder for one image: matmuls and attention."""
    c = model.cfg
    n, d = c.num_patches + 1, c.embed_dim
    per_layer = 2 * n * (4 * d * d + 2 * d * c.mlp_dim) + 4 * n * n * d
    embed = 2 * c.num_patches * d * c.in_chans * c.patch_size**2
    return 3.0 * (c.depth * per_layer + embed)


def measure_peak_flops(device: torch.device, n: int = 2048) -> float:
    """Best of three timings of an fp32 n x n matmul: the denominator of MFU on this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---- checkpoints on disk --------------------------------------------------------------------------------------------

def find_resume(cfg: Config) -> Path | None:
    r = cfg.train.resume
    if r == "none":
        return None
    if r != "auto":
        path = Path(r)
        if not (path / TRAINER_STATE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
        return path
    return latest_checkpoint(cfg.train.output_dir)


def step_folders(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place, oldest first (``step_N.tmp`` ones were not)."""
    return sorted(p for p in root.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: one still named ``.tmp`` was interrupted mid-write."""
    done = [p for p in step_folders(Path(output_dir) / CHECKPOINTS) if (p / TRAINER_STATE).is_file()]
    return done[-1] if done else None


def _rewind_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines the killed run logged past its checkpoint (a torn last line too:
    it was being written when the run died, so it is past the checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise TrainingError(f"{path}:{n}: not a JSON line; fix or remove it to resume") from None
        if record["step"] <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


# ---- accelerate and the processes of a launch -----------------------------------------------------------------------

def _accelerator(cfg: Config, hidden: int) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cuda = torch.cuda.is_available()
    # DeepSpeed on CPU needs gloo named explicitly; plain CPU runs get it from cpu=True
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and distributed and not cuda else []
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed, mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum, log_with="tensorboard",
        project_dir=cfg.train.output_dir, kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # our loaders are not passed to prepare(), so DeepSpeed is told the batch and clipping here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_rank_batch(cfg, accelerator.num_processes)
        plugin.deepspeed_config["gradient_clipping"] = cfg.optim.clip_grad_norm or 0.0
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        # what accelerate derives from a transformers model's config.hidden_size, from ours
        for key, value in (("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden),
                           ("reduce_bucket_size", hidden * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    return accelerator


def per_rank_batch(cfg: Config, world: int) -> int:
    g, a = cfg.data.batch_size, cfg.train.grad_accum
    if g % (world * a):
        raise ConfigError(f"data.batch_size: global batch {g} is not divisible by {world} processes x "
                          f"{a} accumulation steps")
    return g // (world * a)


def _on_main(accelerator, check) -> object:
    """Run ``check`` on the main process only; a user error there is raised on every rank (none waits alone
    in a collective), and its result is returned on every rank."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = check()
        except USER_ERRORS as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result


@contextmanager
def _launch_lock(accelerator, out: Path, stage: str):
    """One launch per output folder: its main process holds the lock for all of its ranks and machines (they
    share the folder), so only another launch is refused."""
    world = accelerator.num_processes
    lock = FolderLock(out, f"vitpipe {stage}" + (f" ({world} processes)" if world > 1 else ""))

    def take() -> None:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    _on_main(accelerator, take)
    try:
        yield
    finally:
        lock.release()


# ---- evaluation -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(accelerator, task: Task, shards: ShardSet, transform, batch_size: int, workers: int, seed: int) -> dict:
    """The objective's loss and metrics on held-out shards, every sample once across ranks.

    Runs the unwrapped module, so ranks with different batch counts never meet in a collective
    until the single reduction at the end.
    """
    task.eval()
    names = task.objective.metrics
    totals = torch.zeros(2 + len(names), dtype=torch.float64)
    loader = eval_loader(shards, transform, batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=workers)
    for i, batch in enumerate(loader):
        n = len(batch["labels"])
        if not n:
            continue
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "skipped"}
        gen = torch.Generator(device=accelerator.device)
        gen.manual_seed(torch_seed(seed, "val", accelerator.process_index, i))
        with accelerator.autocast():
            loss, extra = task(batch, gen)
        totals += torch.tensor([n, loss.item() * n, *(extra[k].item() * n for k in names)], dtype=torch.float64)
    task.train()
    totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    means = (totals[1:] / totals[0]).tolist()
    return {"val_samples": int(totals[0]), **{f"val_{k}": v for k, v in zip(("loss", *names), means)}}


@torch.no_grad()
def monitor(accelerator, model: VisionTransformer, queries: ShardSet, bank: ShardSet | None, transform,
            batch_size: int, workers: int) -> dict:
    """kNN top-1 of the model's frozen pooled features (leave-one-out when there is no separate bank)."""
    from accelerate.utils import gather_object

    model.eval()
    sets = {}
    for name, shards in (("queries", queries), ("bank", bank)):
        if shards is not None:
            mine = pooled_features(model, shards, transform, batch_size, accelerator.process_index,
                                   accelerator.num_processes, workers, accelerator.device)
            parts = gather_object([mine])
            sets[name] = (torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]))
    model.train()
    classes = len(queries.classes)
    if "bank" in sets:
        return {"knn_top1": knn_top1(sets["bank"], sets["queries"], classes), "knn_queries": len(sets["queries"][1])}
    return {"knn_top1": knn_top1(sets["queries"], None, classes), "knn_queries": len(sets["queries"][1])}
