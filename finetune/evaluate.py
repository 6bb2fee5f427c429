"""Evaluation: top-1 / top-5 / per-class accuracy with a confusion matrix, and the paper's few-shot
linear evaluation (closed-form regularised least squares on frozen features, as big_vision's
``fewshot_lsr``), plus a logistic-regression linear probe.

Every eval sample is counted exactly once: the eval loader splits samples across ranks and
workers without padding, and the counts are summed across ranks at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.devices import rank_and_world
from common.errors import VitpipeError
from common.io import atomic_path, write_json
from common.redact import redact
from data_tools.index import class_list_difference
from data_tools.loader import LoaderError, ShardSet, resolve_shards
from data_tools.transforms import EvalTransform
from pretrain.features import extract, features
from vit import ModelInfo, VisionTransformer, nonfinite_parameters


def representation(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The frozen features few-shot and the linear probe read: the pooled features the fine-tune
    starts from (class token or average, as the checkpoint pools, after its final norm), then for
    a pretraining head the pre-logits after its tanh layer (the paper's representation)."""
    return features(model, tokens, "pre_logits")


@torch.no_grad()
def features_and_labels(model: VisionTransformer, shards: ShardSet, info: ModelInfo, batch_size: int = 64,
                        workers: int = 0, logits: bool = False, device="cpu",
                        stats: dict | None = None, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (or logits) and labels of every sample this rank sees; a progress bar
    (``desc``, main process) counts the images of all ranks at this rank's rate.

    ``stats``, if given, gets ``skipped``: the samples this rank lost (damaged shards, images that
    do not decode)."""
    rank, world = rank_and_world()
    transform = EvalTransform(model.cfg.image_size, tuple(info.mean), tuple(info.std), interpolation=info.resize_filter)
    model.eval().to(device)
    # on a terminal only (disable=None): a log or a captured stderr keeps its lines, errors included
    with tqdm(total=shards.num_samples, desc=desc or "features", unit="img", disable=True if rank else None,
              leave=False) as bar:
        feats, labels, skipped = extract(model, shards, transform, batch_size, rank, world, workers, device,
                                         "logits" if logits else "pre_logits",
                                         lambda b: bar.update((len(b["labels"]) + int(b["skipped"])) * world))
    if stats is not None:
        stats["skipped"] = skipped
    return feats, labels


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def untrained_head(provenance: dict) -> bool:
    """A head nothing has trained: ``vitpipe init``'s, or a fine-tune's prepared with ``train.max_steps=0``."""
    return provenance.get("stage") == "init" or ("stage" not in provenance and "init_stage" in provenance)


def in_shard_order(logits: torch.Tensor, model_labels: list[str] | None, shard_classes: list[str]) -> torch.Tensor:
    """The logits' columns in the shards' class order (the eval labels index it), when the model names the same
    classes in another order; as they are otherwise."""
    if not model_labels or list(model_labels) == list(shard_classes) or sorted(model_labels) != sorted(shard_classes):
        return logits
    return logits[:, [list(model_labels).index(c) for c in shard_classes]]


def classification_report(logits: torch.Tensor, labels: torch.Tensor, names: list[str] | None) -> dict:
    """Top-1, per-class accuracy and the confusion matrix (rows: true class), and top-5 for more than 5 classes."""
    k = logits.shape[1]
    cm = confusion_matrix(logits.argmax(1), labels, k)
    top5 = (logits.topk(min(5, k), dim=1).indices == labels[:, None]).any(1).float().sum().item()
    rank, world = rank_and_world()
    counts = torch.tensor([top5], dtype=torch.float64)
    if world > 1:  # one reduction per evaluation: every rank reaches it exactly once
        torch.distributed.all_reduce(cm)
        torch.distributed.all_reduce(counts)
    total = int(cm.sum())
    names = names or [str(i) for i in range(k)]
    per_class = {names[i]: (cm[i, i].item() / cm[i].sum().item() if cm[i].sum() else None) for i in range(k)}
    return {"samples": total, "top1": cm.diag().sum().item() / max(1, total),
            **({"top5": counts.item() / max(1, total)} if k > 5 else {}), "per_class": per_class,
            "confusion": cm.tolist(), "classes": names}


def plot_confusion(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion"], dtype=float)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(report["classes"])
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), report["classes"], rotation=90)
    ax.set_yticks(range(n), report["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {report['top1']:.1%} on {report['samples']} images")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


BIAS_CONSTANT = 100.0


def fewshot_lsr(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                num_classes: int, l2: float = 2.0**10) -> float:
    """Closed-form regularised least squares to {-1, 1}^K targets on standardised features; accuracy.

    As big_vision's fewshot_lsr: standardise with the training features' mean and std, then append
    a constant feature ``BIAS_CONSTANT`` for the bias, large so that the bias is almost unregularised.
    """
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True, unbiased=False) + 1e-6
    x_train, x_test = (torch.nn.functional.pad((x - mean) / std, (0, 1), value=BIAS_CONSTANT)
                       for x in (x_train, x_test))
    y = 2.0 * torch.nn.functional.one_hot(y_train, num_classes).double() - 1.0
    d = x_train.shape[1]
    w = torch.linalg.solve(x_train.T @ x_train + l2 * torch.eye(d, dtype=torch.float64), x_train.T @ y)
    return ((x_test @ w).argmax(1) == y_test).double().mean().item()


def sample_shots(labels: torch.Tensor, shots: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` examples per class (fewer if a class has fewer), chosen by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked)


def fewshot(train: tuple, test: tuple, num_classes: int, shots=(1, 5, 10, 25), seeds: int = 3,
            l2: float = 2.0**10) -> dict:
    (xtr, ytr), (xte, yte) = train, test
    out = {}
    for k in shots:
        accs = [fewshot_lsr(xtr[i], ytr[i], xte, yte, num_classes, l2)
                for i in (sample_shots(ytr, k, num_classes, s) for s in range(seeds))]
        out[f"{k}-shot"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
    return out


def linear_probe(train: tuple, test: tuple, num_classes: int, weight_decay: float = 1e-4, steps: int = 200) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS)."""
    (xtr, ytr), (xte, yte) = train, test
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    layer = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xtr), ytr) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (layer(xte).argmax(1) == yte).float().mean().item()


class EvalError(VitpipeError, ValueError):
    """An evaluation that cannot give a meaningful number; one line naming the flag, shards or checkpoint."""


def check_eval_options(shots, seeds: int, batch_size: int, workers: int) -> None:
    """The numbers ``vitpipe eval`` range-checks, checked again for callers of the Python API."""
    for flag, value, low in (("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--seeds", seeds, 1),
                             *(("--shots", k, 1) for k in shots)):
        if value < low:
            raise EvalError(f"{flag} must be >= {low}, got {value}")


def check_finite(model: torch.nn.Module, where: str) -> None:
    """A model whose weights hold NaN or inf is named as such: its accuracy would be a number that means nothing."""
    if bad := nonfinite_parameters(model):
        raise EvalError(f"{where}: the model's weights hold NaN or inf ({', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}): the training run diverged")


def _check_same_classes(train: list[str] | None, test: list[str], fewshot_train, data) -> None:
    """Few-shot labels are class numbers: the training shards must number the test shards' classes alike, else
    every accuracy compares labels that name different classes."""
    why = class_list_difference(test, train)
    if why is None:
        return
    raise EvalError(f"--fewshot-train {fewshot_train}: its classes are not those of {data} ({why}); both must list "
                    "the same classes in the same order")


def _check_shots(labels: torch.Tensor, shots, classes: list[str], data) -> None:
    """Every class has at least max(shots) examples, else a K-shot result would silently be a fewer-shot one."""
    if len(labels) == 0:
        raise EvalError(f"{data}: no few-shot training sample decodes (vitpipe verify {data} names the damage)")
    counts = torch.bincount(labels, minlength=len(classes))
    fewest = int(counts.argmin())
    if max(shots) > counts[fewest]:
        raise EvalError(f"--shots {max(shots)}: {data} has only {int(counts[fewest])} decodable images of class "
                        f"{classes[fewest] if fewest < len(classes) else fewest!r} (the fewest of any class); use "
                        f"--shots up to {int(counts[fewest])}")


def evaluate(model: VisionTransformer, info: ModelInfo, data, out_dir: str | Path | None = None,
             fewshot_train=None, shots=(1, 5, 10, 25), seeds: int = 3, probe: bool = False,
             batch_size: int = 64, workers: int = 0, device="cpu", where: str = "the model") -> dict:
    """Top-1 (if the model has a head) and few-shot / linear probe (if ``fewshot_train`` is given)."""
    check_eval_options(shots, seeds, batch_size, workers)
    check_finite(model, where)
    test = resolve_shards(data)
    if not test.classes:
        raise LoaderError(f"{data}: eval shards without labels (their index.json lists no classes)")
    report: dict = {"data": redact(str(data))}
    has_head = isinstance(model.head, torch.nn.Linear) and not untrained_head(info.provenance)
    if isinstance(model.head, torch.nn.Linear) and not has_head:
        report["note"] = "no top-1: the model's head is untrained (" + \
            ("vitpipe init" if info.provenance.get("stage") == "init" else "prepared, train.max_steps=0") + ")"
    lost: dict = {}
    read = dict(batch_size=batch_size, workers=workers, device=device)
    if has_head:
        report.update(top1_report(model, info, test, data, lost, **read))
    fewshot_samples = 0
    if fewshot_train is not None:
        fewshot_samples = fewshot_report(model, info, test, data, fewshot_train, shots, seeds, probe, lost, report,
                                         **read)
    if lost:
        _count_losses(report, lost["skipped"], 0 if has_head else fewshot_samples, test.num_samples)
    if out_dir is not None and rank_and_world()[0] == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "eval.json", report)
        if has_head:
            plot_confusion(report, out_dir / "confusion.png")
    return report


def top1_report(model: VisionTransformer, info: ModelInfo, test: ShardSet, data, lost: dict, **read) -> dict:
    """Top-1 / top-5 / per-class accuracy and the confusion matrix of the model's own head on ``test``."""
    if model.cfg.num_classes != len(test.classes):
        raise LoaderError(f"{data}: {len(test.classes)} classes but the model has {model.cfg.num_classes}")
    t = time.perf_counter()
    logits, labels = features_and_labels(model, test, info, logits=True, stats=lost, desc="eval", **read)
    ordered = in_shard_order(logits, info.labels, test.classes)
    names = test.classes if ordered is not logits else info.labels or test.classes
    report = classification_report(ordered, labels, names)
    _check_decoded(report["samples"], lost["skipped"], data)
    report["images_per_s"] = report["samples"] / (time.perf_counter() - t)
    return report


def fewshot_report(model: VisionTransformer, info: ModelInfo, test: ShardSet, data, fewshot_train, shots, seeds: int,
                   probe: bool, lost: dict, report: dict, **read) -> int:
    """Few-shot linear accuracy (and the linear probe's) on frozen pre-logits, into ``report``; the test samples
    this rank read."""
    train = resolve_shards(fewshot_train)
    _check_same_classes(train.classes, test.classes, fewshot_train, data)
    xtr = features_and_labels(model, train, info, desc="few-shot train", **read)
    _check_shots(xtr[1], shots, test.classes, fewshot_train)
    xte = features_and_labels(model, test, info, stats=lost, desc="few-shot test", **read)
    _check_decoded(len(xte[1]), lost["skipped"], data)
    k = len(test.classes)
    report["fewshot"] = fewshot(xtr, xte, k, shots, seeds)
    if probe:
        report["linear_probe_top1"] = linear_probe(xtr, xte, k)
    return len(xte[1])


def _count_losses(report: dict, skipped: int, samples: int, expected: int) -> None:
    """The samples lost across ranks, and a warning when fewer were read than the index lists."""
    totals = torch.tensor([skipped, samples])
    if rank_and_world()[1] > 1:  # every rank reaches this once
        torch.distributed.all_reduce(totals)
    report.setdefault("samples", int(totals[1]))
    report.update(skipped_samples=int(totals[0]), expected_samples=expected)
    if report["samples"] < expected:
        report["warning"] = (f"{report['data']}: saw {report['samples']} of the {expected} samples the index lists "
                             f"({report['skipped_samples']} lost to damaged shards or images that do not "
                             "decode; vitpipe verify names them)")


def _check_decoded(samples: int, skipped: int, data) -> None:
    if samples == 0:
        raise EvalError(f"{data}: no sample decodes ({skipped} lost to damaged shards or images; vitpipe verify "
                        f"{data} names them)")


def summary(report: dict) -> str:
    lines = [f"warning: {report['warning']}"] if "warning" in report else []
    lines += [f"note: {report['note']}"] if "note" in report else []
    if "top1" in report:
        top5 = f"  top-5 {report['top5']:.2%}" if "top5" in report else ""
        lines.append(f"top-1 {report['top1']:.2%}{top5}  on {report['samples']} images "
                     f"({report['images_per_s']:.0f} img/s incl. decoding)")
    for k, v in report.get("fewshot", {}).items():
        lines.append(f"{k:>8s} linear: {v['mean']:.2%} ± {v['std']:.2%} over {len(v['runs'])} seeds")
    if "linear_probe_top1" in report:
        lines.append(f"linear probe: {report['linear_probe_top1']:.2%}")
    return "\n".join(lines)


def load_report(folder: str | Path) -> dict | None:
    path = Path(folder) / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None
