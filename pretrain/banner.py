"""The start banner: what a run is about to do, printed once (main process) before its first step.

What will run (stage, objective, model and its parameter count), on what (processes, device, threads,
mixed precision), for how long (steps and epochs, samples per epoch, global batch), from where to
where (shards, output folder), fresh or resumed, and what a fine-tune changed in the model. The
facts are gathered by ``run_facts`` and written by ``banner``, a pure function of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from data_tools.loader import ShardSet
from pretrain.config import best_metric, best_mode, steps_per_epoch
from vit import VisionTransformer
from vit.formats import formats_refusing

if TYPE_CHECKING:
    from pretrain.loop import Run


@dataclass
class RunFacts:
    stage: str
    objective: str
    model: str  # its name, or its shape for a model without one
    parameters: int  # the model's
    objective_parameters: int  # outside the model: MAE's decoder, MPP's prediction layer
    processes: int
    device: str
    engine: str  # "", or "DeepSpeed ZeRO-N"
    threads: tuple[int, str]  # torch threads per process, and where the number came from
    mixed_precision: str
    steps: int
    samples: int  # per epoch: the training shards' count
    global_batch: int
    per_process_batch: int
    grad_accum: int
    data: str
    shards: int
    classes: int | None
    output_dir: str
    resumed_from: str | None
    resumed_step: int
    evaluations: list[str] = field(default_factory=list)  # what runs at each checkpoint
    best: str | None = None  # train.keep_best: "knn_top1 (max)"
    changes: list[str] = field(default_factory=list)  # what a fine-tune changed in the model
    exports: dict[str, str] = field(default_factory=dict)  # format -> why it cannot hold this model


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def epochs_of(steps: int, global_batch: int, samples: int) -> float:
    """The loader's epochs (``steps_per_epoch``) that ``steps`` steps of ``global_batch`` read."""
    return steps / max(1, steps_per_epoch(samples, global_batch))


def banner(f: RunFacts) -> str:
    extra = f" + {_millions(f.objective_parameters)} in the objective" if f.objective_parameters else ""
    threads, source = f.threads
    where = f"{f.processes} process{'es' if f.processes > 1 else ''} on {f.device}" + \
        (f" ({f.engine})" if f.engine else "")
    accum = f" x {f.grad_accum} accumulation steps" if f.grad_accum > 1 else ""
    epochs = epochs_of(f.steps, f.global_batch, f.samples)
    lines = [
        f"vitpipe {f.stage}: {f.objective} objective, {f.model}, {_millions(f.parameters)} parameters{extra}",
        f"  on        {where}, {threads} torch thread{'s' if threads > 1 else ''} each ({source}), "
        f"mixed precision {f.mixed_precision}",
        f"  length    {f.steps:,} step{'s' if f.steps != 1 else ''} = {epochs:.3g} epoch{'s' if epochs != 1 else ''} of {f.samples:,} samples; "
        "global batch "
        f"{f.global_batch} ({f.per_process_batch} per process{accum})",
        f"  data      {f.data} ({f.shards} shard{'s' if f.shards != 1 else ''}"
        + (f", {f.classes} classes)" if f.classes else ", unlabelled)"),
        f"  output    {f.output_dir}",
        "  start     " + (f"resumed from {f.resumed_from} at step {f.resumed_step:,} "
                          f"({max(0, f.steps - f.resumed_step):,} steps to go)" if f.resumed_from else "fresh"),
    ]
    if f.evaluations:
        lines.append(f"  evaluate  {'; '.join(f.evaluations)} at every checkpoint")
    if f.best:
        lines.append(f"  best/     the checkpoint with the best {f.best}")
    if f.changes:
        lines.append(f"  model     {'; '.join(f.changes)}")
    for fmt, why in f.exports.items():
        lines.append(f"  note      export --format {fmt} will refuse this model: {why}")
    return "\n".join(lines)


def model_name(name: str, model: VisionTransformer) -> str:
    c = model.cfg
    shape = f"{c.patch_size}px patches, {c.image_size[0]}x{c.image_size[1]}, width {c.embed_dim}, depth {c.depth}, " \
            f"{c.global_pool} pooling"
    return f"{name} ({shape})" if name else f"ViT ({shape})"


def device_name(device) -> str:
    """``cpu``, or the accelerator's kind and model (``cuda (NVIDIA H200)``): the same for every rank."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_facts(run: Run, shards: ShardSet, model: VisionTransformer, parameters: tuple[int, int],
              threads: tuple[int, str], changes: list[str], resumed_from: str | None) -> RunFacts:
    """``parameters``: the model's and the objective's own, counted before ``accelerator.prepare`` (ZeRO-3
    partitions them across ranks)."""
    cfg, accelerator = run.cfg, run.accelerator
    plugin = accelerator.state.deepspeed_plugin
    evals = [evaluator.title for evaluator, _ in run.evals.active]
    return RunFacts(
        stage=run.stage, objective=cfg.objective.name, model=model_name(cfg.model.name, model),
        parameters=parameters[0], objective_parameters=parameters[1],
        processes=accelerator.num_processes, device=device_name(accelerator.device),
        engine=f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else "", threads=threads,
        mixed_precision=cfg.train.mixed_precision, steps=cfg.train.max_steps, samples=shards.num_samples,
        global_batch=cfg.data.batch_size, per_process_batch=run.micro, grad_accum=cfg.train.grad_accum,
        data=str(cfg.data.train), shards=len(shards.urls), classes=len(shards.classes) if shards.classes else None,
        output_dir=str(cfg.train.output_dir), resumed_from=resumed_from, resumed_step=run.pos.step,
        evaluations=evals, best=f"{best_metric(cfg)} ({best_mode(cfg)})" if cfg.train.keep_best else None,
        changes=changes, exports=formats_refusing(model.cfg) if run.stage == "finetune" else {},
    )
