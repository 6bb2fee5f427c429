"""The one training loop (both stages): accelerate (CPU, DDP, DeepSpeed ZeRO), resumable exactly.

Every source of randomness in a step is seeded from (seed, step, rank), and the data stream is
a pure function of (seed, epoch, rank, worker), so a run resumed from a checkpoint repeats the
uninterrupted run bit for bit (CPU, float32) without restoring any RNG state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from common.errors import USER_ERRORS, VitpipeError
from common.lock import FolderLock
from data_tools.loader import ShardSet, eval_loader, resolve_shards, train_loader
from data_tools.transforms import EvalTransform, TrainTransform
from pretrain.config import Config, ConfigError
from pretrain.monitor import knn_top1, pooled_features
from pretrain.objectives import Task
from pretrain.resume import check_resume, deepspeed_safe_globals, weights_only_loads, write_manifest
from vit import ModelInfo, VisionTransformer
from vit.checkpoint import save_state_dict
from common.io import atomic_path, fsync_dir, write_json

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.json"


class TrainingError(VitpipeError, RuntimeError):
    """The run cannot go on (a non-finite loss, ...); one line for the user."""


def seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % (2**63)


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


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


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


def _accelerator(cfg: Config, per_rank_batch_of, hidden: int):
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
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_rank_batch_of(accelerator.num_processes)
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
        gen.manual_seed(seed_for(seed, "val", accelerator.process_index, i))
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


def train(cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo, stage: str,
          shards: ShardSet | None = None) -> Path:
    """Run (or resume) the configured training; returns the final model folder."""
    shards = shards or resolve_shards(cfg.data.train, cfg.data.num_samples)
    accelerator = _accelerator(cfg, lambda world: per_rank_batch(cfg, world), model.cfg.embed_dim)
    try:
        with _launch_lock(accelerator, Path(cfg.train.output_dir), stage):
            return _run(accelerator, cfg, model, objective, info, stage, shards)
    finally:
        accelerator.end_training()  # also ends the process group


def _run(accelerator, cfg: Config, model: VisionTransformer, objective: torch.nn.Module, info: ModelInfo,
         stage: str, shards: ShardSet) -> Path:
    out = Path(cfg.train.output_dir)
    resume_from = find_resume(cfg)
    if resume_from is not None and (note := _on_main(accelerator, lambda: check_resume(resume_from, cfg, stage))):
        accelerator.print(f"note: {note}")
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = per_rank_batch(cfg, world)
    norm = (tuple(cfg.data.mean), tuple(cfg.data.std))
    transform = TrainTransform(model.cfg.image_size, *norm, (cfg.data.crop_scale_min, 1.0)) if cfg.data.augment \
        else EvalTransform(model.cfg.image_size, *norm)

    def loader(epoch: int, skip: int):
        return train_loader(shards, transform, micro, rank=rank, world_size=world, workers=cfg.data.workers,
                            seed=cfg.train.seed, epoch=epoch, resampled=cfg.data.resampled,
                            shuffle_buffer=cfg.data.shuffle_buffer, skip_batches=skip)

    batches_per_epoch = len(loader(0, 0))  # also checks shards vs ranks x workers before any work
    val_shards = resolve_shards(cfg.data.val) if cfg.data.val else None
    val_transform = EvalTransform(model.cfg.image_size, *norm)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    task = Task(model, objective)
    optimizer = build_optimizer(cfg, task)
    forward = torch.compile(task) if cfg.train.compile else task
    task_p, optimizer = accelerator.prepare(forward, optimizer)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    monitor_shards = resolve_shards(cfg.data.monitor) if cfg.data.monitor else None
    monitor_bank = resolve_shards(cfg.data.monitor_bank) if cfg.data.monitor_bank else None
    for key, labelled in (("data.monitor", monitor_shards), ("data.monitor_bank", monitor_bank)):
        if labelled is not None and not labelled.classes:
            raise ConfigError(f"{key}: the kNN monitor needs labelled shards (their index.json lists no classes)")
    if deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3 and (val_shards or monitor_shards):
        accelerator.print("note: data.val and data.monitor are not evaluated under ZeRO-3 (its parameters are "
                          "sharded across ranks)")
        val_shards = monitor_shards = None

    pos = Position()
    if resume_from is not None:
        with weights_only_loads(deepspeed_safe_globals() if deepspeed else []):
            accelerator.load_state(str(resume_from / "state"))
        pos = Position(**json.loads((resume_from / TRAINER_STATE).read_text())["position"])
        accelerator.print(f"resumed from {resume_from} at step {pos.step}")
    metrics_path, val_path = out / "metrics.jsonl", out / "val_metrics.jsonl"

    def record_run() -> None:
        _rewind_metrics(metrics_path, pos.step)
        _rewind_metrics(val_path, pos.step)
        write_json(out / "config.json", {"stage": stage, **cfg.to_dict()})

    _on_main(accelerator, record_run)
    accelerator.init_trackers(stage)
    flops = train_flops_per_image(model)
    peak = (cfg.train.peak_tflops * 1e12) if cfg.train.peak_tflops else measure_peak_flops(accelerator.device)
    saved_at = pos.step if resume_from is not None else None

    def micro_batches(p: Position):
        epoch, skip = p.epoch, p.batch
        while True:
            for i, batch in enumerate(loader(epoch, skip), skip):
                nxt = (epoch, i + 1) if i + 1 < batches_per_epoch else (epoch + 1, 0)
                yield batch, nxt
            epoch, skip = epoch + 1, 0

    stream = micro_batches(pos)
    bar = tqdm(total=cfg.train.max_steps, initial=pos.step, desc=stage, disable=not accelerator.is_main_process)
    names = ("loss", *objective.metrics)
    window = {**dict.fromkeys(names, 0.0), "steps": 0, "skipped": 0, "t": time.perf_counter()}
    task_p.train()
    try:
        while pos.step < cfg.train.max_steps:
            factor = lr_factor(pos.step, cfg.schedule.warmup_steps, cfg.train.max_steps, cfg.schedule.decay,
                               cfg.schedule.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0) * factor
            step_loss = torch.zeros(len(names), device=accelerator.device)
            grad_norm = None
            for k in range(cfg.train.grad_accum):
                batch, (pos.epoch, pos.batch) = next(stream)
                window["skipped"] += int(batch.pop("skipped"))
                batch = {key: v.to(accelerator.device) for key, v in batch.items()}
                torch.manual_seed(seed_for(cfg.train.seed, "step", pos.step, k, rank))  # dropout, drop path
                gen = torch.Generator(device=accelerator.device)
                gen.manual_seed(seed_for(cfg.train.seed, "objective", pos.step, k, rank))
                with accelerator.accumulate(task_p), accelerator.autocast():
                    loss, extra = task_p(batch, gen)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and not deepspeed and cfg.optim.clip_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(task_p.parameters(), cfg.optim.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                values = [loss.detach().float(), *(extra[m].float() for m in objective.metrics)]
                step_loss += torch.stack(values) / cfg.train.grad_accum
            if deepspeed:
                grad_norm = task_p.get_global_grad_norm()
            step_loss = accelerator.reduce(step_loss, "mean")
            if not torch.isfinite(step_loss).all():
                last = latest_checkpoint(out)
                raise TrainingError(f"step {pos.step}: loss is {step_loss[0].item()}; stopping. Last good checkpoint: "
                                    f"{last or 'none (no checkpoint written yet)'}")
            pos.step += 1
            for name, value in zip(names, step_loss.tolist()):
                window[name] += value
            window["steps"] += 1
            bar.update(1)
            if pos.step % cfg.train.log_every == 0 or pos.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window["t"]
                images_per_s = window["steps"] * cfg.data.batch_size / elapsed
                record = {
                    "step": pos.step, "epoch": pos.epoch, **{m: window[m] / window["steps"] for m in names},
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "images_per_s": images_per_s, "mfu": images_per_s * flops / (peak * world),
                    "skipped_samples": window["skipped"],
                }
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=pos.step)
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window.update(dict.fromkeys(names, 0.0), steps=0, skipped=0, t=time.perf_counter())
            if pos.step % cfg.train.checkpoint_every == 0 or pos.step == cfg.train.max_steps:
                if val_shards is not None or monitor_shards is not None:
                    unwrapped = accelerator.unwrap_model(task_p)
                    val = {"step": pos.step}
                    if val_shards is not None:
                        val.update(validate(accelerator, unwrapped, val_shards, val_transform, micro, cfg.data.workers,
                                            cfg.train.seed))
                    if monitor_shards is not None:
                        val.update(monitor(accelerator, unwrapped.model, monitor_shards, monitor_bank, val_transform,
                                           micro, cfg.data.workers))
                    accelerator.log({k: v for k, v in val.items() if k != "step"}, step=pos.step)
                    if accelerator.is_main_process:
                        with open(val_path, "a") as f:
                            f.write(json.dumps(val) + "\n")
                        bar.write(f"step {pos.step}: " + ", ".join(
                            f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float)))
                save_training_checkpoint(accelerator, task_p, pos, cfg, info, stage)
                saved_at = pos.step
        if saved_at != pos.step:  # max_steps already reached when resumed
            save_training_checkpoint(accelerator, task_p, pos, cfg, info, stage)
        final = out / "final"
        if accelerator.is_main_process:
            tmp = out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / CHECKPOINTS / f"step_{pos.step:08d}" / "model", tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(out)
        accelerator.wait_for_everyone()
    finally:
        bar.close()
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


def save_training_checkpoint(accelerator, task_p, pos: Position, cfg: Config, info: ModelInfo, stage: str) -> Path:
    """Full state (for resume) + a model folder, written to ``step_N.tmp`` and renamed when complete."""
    root = Path(cfg.train.output_dir) / CHECKPOINTS
    final = root / f"step_{pos.step:08d}"
    tmp = root / f"step_{pos.step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        state = accelerator.get_state_dict(task_p)  # gathers ZeRO-3 shards; every rank must call it
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the manifest hashes them
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(task_p).model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if weights.keys() != model.state_dict().keys():
            raise TrainingError(f"gathered weights do not match the model ({len(weights)} of "
                                f"{len(model.state_dict())} tensors); not writing {final.name}")
        provenance = {"stage": stage, "objective": cfg.objective.name, "step": pos.step, "config": cfg.to_dict()}
        with _writing(tmp):
            save_state_dict(model.cfg, weights, tmp / "model", ModelInfo(info.labels, info.mean, info.std,
                                                                          {**info.provenance, **provenance}))
        write_json(tmp / TRAINER_STATE, {"position": pos.__dict__, "stage": stage})
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in step_folders(root)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
