"""What is evaluated at every checkpoint: the registered evaluators the config switches on (``data.val``: the
objective's loss on held-out shards; ``data.monitor``: the kNN monitor), each a small class over the one feature
extractor (``pretrain.features``). A new evaluator is a class with ``title``, ``prepare``, ``metrics`` and
``__call__`` plus one ``EVALUATORS.add`` line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.errors import TrainingError
from common.registry import Registry
from common.seeding import torch_seed
from data_tools.index import class_list_difference
from data_tools.loader import ShardSet, eval_loader, resolve_shards
from data_tools.transforms import EvalTransform
from pretrain.checkpoints import mark_best
from pretrain.config import Config, ConfigError
from pretrain.features import extract
from pretrain.metrics import VAL_METRICS, append_line
from pretrain.monitor import knn_top1
from pretrain.objectives import Task
from vit import VisionTransformer

if TYPE_CHECKING:
    from pretrain.loop import Run


class Evaluator(Protocol):
    """One thing evaluated at every checkpoint, on the frozen model; switched on by config keys it reads."""

    title: str  # how the run banner lists it
    keys: tuple[str, ...]  # the config keys it reads; setting the first switches it on

    def prepare(self, cfg: Config) -> Any:
        """What it evaluates on (resolved shards), or None: not configured. A bad key is one ConfigError line."""

    def metrics(self, objective_metrics: tuple[str, ...]) -> list[str]:
        """The names it records (``train.keep_best`` may name one)."""

    def __call__(self, run: Run, task: Task, sets: Any) -> dict:
        """Its record at this step; runs on every rank (each reduces across ranks itself)."""


EVALUATORS: Registry[Evaluator] = Registry("evaluator", ConfigError)


@dataclass
class Evals:
    """The evaluators this run's config switches on, with what each evaluates on, in registry order."""

    active: list[tuple[Evaluator, Any]]
    transform: EvalTransform


def evaluation_sets(accelerator, cfg: Config, transform: EvalTransform) -> Evals:
    """The configured evaluators and their shards (none under ZeRO-3)."""
    active = [(e, sets) for _, e in EVALUATORS.items() if (sets := e.prepare(cfg)) is not None]
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3 and active:
        accelerator.print("note: data.val and data.monitor are not evaluated under ZeRO-3 (its parameters are "
                          "sharded across ranks)")
        active = []
    return Evals(active, transform)


def evaluated_metrics(evals: Evals, objective_metrics: tuple[str, ...]) -> list[str]:
    """The names ``evaluate`` records at each checkpoint."""
    return [name for e, _ in evals.active for name in e.metrics(objective_metrics)]


def evaluate(run: Run, bar) -> None:
    """The configured evaluators' records, logged to val_metrics.jsonl and TensorBoard."""
    evals, accelerator = run.evals, run.accelerator
    if not evals.active:
        return
    unwrapped = accelerator.unwrap_model(run.task)
    record = {"step": run.pos.step}
    for evaluator, sets in evals.active:
        record.update(evaluator(run, unwrapped, sets))
    if run.cfg.train.keep_best:
        mark_best(run, record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.pos.step)
    if accelerator.is_main_process:
        append_line(run.out / VAL_METRICS, record)
        bar.write(f"step {run.pos.step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))


def _named(shards: ShardSet) -> str:
    """The shards as a message names them: their folder, or the first one and how many there are."""
    folders = {u.rsplit("/", 1)[0] for u in shards.urls}
    return folders.pop() if len(folders) == 1 else f"{shards.urls[0]} (and {len(shards.urls) - 1} more shards)"


@torch.no_grad()
def validate(accelerator, task: Task, shards: ShardSet, transform, batch_size: int, workers: int, seed: int,
             stall_timeout: float = 0) -> dict:
    """The objective's loss and metrics on held-out shards, every sample once across ranks.

    Runs the unwrapped module, so ranks with different batch counts never meet in a collective
    until the single reduction at the end.
    """
    task.eval()
    names = task.objective.metrics
    totals = torch.zeros(2 + len(names), dtype=torch.float64)
    loader = eval_loader(shards, transform, batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=workers, stall_timeout=stall_timeout)
    for i, batch in enumerate(loader):
        n = len(batch["labels"])
        if not n:
            continue
        batch = transform.to_device(batch, accelerator.device)
        gen = torch.Generator(device=accelerator.device)
        gen.manual_seed(torch_seed(seed, "val", accelerator.process_index, i))
        with accelerator.autocast():
            loss, extra = task(batch, gen)
        totals += torch.tensor([n, loss.item() * n, *(extra[k].item() * n for k in names)], dtype=torch.float64)
    task.train()
    totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    if totals[0] == 0:  # every rank sees the same sum: they all stop here, none waits at a collective
        raise TrainingError(f"data.val: no sample of {_named(shards)} decodes; the validation loss would be NaN "
                            f"(vitpipe verify names the damage)")
    means = (totals[1:] / totals[0]).tolist()
    return {"val_samples": int(totals[0]), **{f"val_{k}": v for k, v in zip(("loss", *names), means)}}


@torch.no_grad()
def monitor(accelerator, model: VisionTransformer, queries: ShardSet, bank: ShardSet | None, transform,
            batch_size: int, workers: int, stall_timeout: float = 0) -> dict:
    """kNN top-1 of the model's frozen pooled features (leave-one-out when there is no separate bank)."""
    from accelerate.utils import gather_object

    model.eval()
    sets = {}
    for name, shards in (("queries", queries), ("bank", bank)):
        if shards is not None:
            mine = extract(model, shards, transform, batch_size, accelerator.process_index,
                           accelerator.num_processes, workers, accelerator.device, "pooled",
                           stall_timeout=stall_timeout)[:2]
            parts = gather_object([mine])
            sets[name] = (torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]))
    model.train()
    for (_, labels), key, shards in zip(sets.values(), ("data.monitor", "data.monitor_bank"), (queries, bank)):
        if len(labels) == 0:  # gathered: the same on every rank
            raise TrainingError(f"{key}: no sample of {_named(shards)} decodes; the kNN monitor would be NaN "
                                f"(vitpipe verify names the damage)")
    classes = len(queries.classes)
    if "bank" in sets:
        return {"knn_top1": knn_top1(sets["bank"], sets["queries"], classes), "knn_queries": len(sets["queries"][1])}
    return {"knn_top1": knn_top1(sets["queries"], None, classes), "knn_queries": len(sets["queries"][1])}


class HeldOutLoss:
    title = "held-out loss (data.val)"
    keys = ("data.val",)

    def prepare(self, cfg: Config) -> ShardSet | None:
        return resolve_shards(cfg.data.val) if cfg.data.val else None

    def metrics(self, objective_metrics: tuple[str, ...]) -> list[str]:
        return [f"val_{m}" for m in ("loss", *objective_metrics)]

    def __call__(self, run: Run, task: Task, shards: ShardSet) -> dict:
        return validate(run.accelerator, task, shards, run.evals.transform, run.micro, run.cfg.data.workers,
                        run.cfg.train.seed, run.cfg.data.stall_timeout)


class KnnMonitor:
    title = "kNN monitor (data.monitor)"
    keys = ("data.monitor", "data.monitor_bank")

    def prepare(self, cfg: Config) -> tuple[ShardSet, ShardSet | None] | None:
        d = cfg.data
        queries, bank = (resolve_shards(s) if s else None for s in (d.monitor, d.monitor_bank))
        for key, labelled in (("data.monitor", queries), ("data.monitor_bank", bank)):
            if labelled is not None and not labelled.classes:
                raise ConfigError(f"{key}: the kNN monitor needs labelled shards (their index.json lists no classes)")
        why = class_list_difference(queries.classes, bank.classes) if queries and bank else None
        if why is not None:  # the bank's labels vote for the queries' classes by number
            raise ConfigError(f"data.monitor_bank {d.monitor_bank}: its classes are not those of data.monitor "
                              f"{d.monitor} ({why}); both must list the same classes in the same order")
        return None if queries is None else (queries, bank)

    def metrics(self, objective_metrics: tuple[str, ...]) -> list[str]:
        return ["knn_top1"]

    def __call__(self, run: Run, task: Task, sets: tuple[ShardSet, ShardSet | None]) -> dict:
        return monitor(run.accelerator, task.model, *sets, run.evals.transform, run.micro, run.cfg.data.workers,
                       run.cfg.data.stall_timeout)


EVALUATORS.add("val", HeldOutLoss())
EVALUATORS.add("knn", KnnMonitor())
