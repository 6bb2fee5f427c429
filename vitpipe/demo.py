"""``vitpipe demo``: the whole pipeline on real images that ship inside a package, in minutes.

Fashion-MNIST (Debian's dataset-fashion-mnist, 70,000 real photos of clothing) when it is
installed, else scikit-learn's 1,797 real handwritten digits. The demo reproduces, at small
scale, the paper's §4.6 comparison: a ViT pretrained self-supervised (a masked autoencoder) on all
the training images (labels unused) and then fine-tuned at a higher resolution on 1% of the labels,
against the same ViT trained from scratch on the same labels with the same fine-tuning budget, and
beside a logistic regression on the pixels of the same labelled images.
"""

from __future__ import annotations

import csv
import gzip
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


@dataclass(frozen=True)
class Budget:
    pretrain_size: int
    finetune_size: int
    model: list[str]  # model.* overrides
    pretrain_steps: int
    finetune_steps: int
    pretrain_batch: int = 128
    finetune_batch: int = 64
    labelled_fraction: float = 0.01
    fewshot_test: int = 2000
    # each arm's recipe: the best of those tried on a validation split cut from the training images
    pretrain_config: str = "tiny_mae.yaml"
    pretrain_args: tuple[str, ...] = ("schedule.warmup_steps=50",)
    finetune_config: str = "ssl_tiny.yaml"
    finetune_args: tuple[str, ...] = ("optim.lr=0.004", "model.global_pool=token", "schedule.warmup_steps=20")
    scratch_config: str = "tiny.yaml"
    scratch_args: tuple[str, ...] = ("optim.lr=0.03", "schedule.warmup_steps=20")


BUDGETS = {
    "fashion-mnist": Budget(24, 32, ["model.embed_dim=128", "model.depth=6", "model.num_heads=4",
                                     "model.mlp_dim=512"], pretrain_steps=700, finetune_steps=160),
    "digits": Budget(16, 24, ["model.embed_dim=96", "model.depth=4", "model.num_heads=3", "model.mlp_dim=384"],
                     pretrain_steps=600, finetune_steps=300, labelled_fraction=0.1, fewshot_test=600),
}
REDUCED = {"pretrain_steps": 12, "finetune_steps": 12, "pretrain_batch": 32, "finetune_batch": 32}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_dataset(name: str) -> tuple[str, list[str], tuple, tuple]:
    """(name, class names, (train images, labels), (test images, labels)) as uint8 arrays."""
    if name in ("auto", "fashion-mnist") and (FASHION / "train-images-idx3-ubyte.gz").is_file():
        train = (_read_idx(FASHION / "train-images-idx3-ubyte.gz"), _read_idx(FASHION / "train-labels-idx1-ubyte.gz"))
        test = (_read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), _read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"))
        return "fashion-mnist", FASHION_CLASSES, train, test
    if name == "fashion-mnist":
        raise FileNotFoundError(f"{FASHION}: not installed (apt-get install dataset-fashion-mnist)")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.75 * len(images))
    train, test = order[:cut], order[cut:]
    return "digits", [str(d) for d in range(10)], (images[train], digits.target[train]), \
        (images[test], digits.target[test])


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[Path]:
    """A user's corpus: one folder per class, one grayscale PNG per image."""
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        path = root / classes[int(label)] / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(img, "L").save(path, compress_level=1)
        paths.append(path)
    return paths


def stratified(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False))
    return np.sort(np.concatenate(picked))


def write_manifest(path: Path, files: list[Path], labels: np.ndarray, classes: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p, label in zip(files, labels):
            w.writerow([str(p.relative_to(path.parent)), classes[int(label)]])
    return path


class Steps:
    """Times each step and prints what it does, as a user would type it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, cmd: list[str] | None = None, fn=None):
        print(f"\n== {name}" + (f"\n$ {' '.join(cmd)}" if cmd else ""), flush=True)
        t = time.perf_counter()
        if cmd:
            subprocess.run(cmd, check=True)
        result = fn() if fn else None
        self.seconds[name] = round(time.perf_counter() - t, 1)
        return result


def run_demo(out: str | Path, dataset: str = "auto", reduced: bool = False, seed: int = 0) -> dict:
    from data_tools.shard import ShardError, ShardOptions, shard
    from finetune.evaluate import evaluate
    from vit import load_model

    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name, classes, (xtr, ytr), (xte, yte) = load_dataset(dataset)
    budget = BUDGETS[name]
    if reduced:
        budget = Budget(**{**budget.__dict__, **REDUCED})
    print(f"dataset: {name} ({len(xtr)} train / {len(xte)} test real images, {len(classes)} classes)"
          + ("" if name == "fashion-mnist" else "; install Debian's dataset-fashion-mnist for the full demo"))
    steps = Steps()
    vp = [sys.executable, "-m", "vitpipe"]
    data = out / "data"
    labelled = stratified(ytr, budget.labelled_fraction, seed)

    def write_corpus():
        files = write_image_folder(data / "train", xtr, ytr, classes)
        test_files = write_image_folder(data / "test", xte, yte, classes)
        write_manifest(data / "labelled.csv", [files[i] for i in labelled], ytr[labelled], classes)
        few = np.sort(np.random.default_rng(seed).permutation(len(xte))[:budget.fewshot_test])
        write_manifest(data / "fewshot_test.csv", [test_files[i] for i in few], yte[few], classes)
        return len(labelled)

    n_labelled = steps.run("write the dataset as a folder of class subfolders of PNGs", fn=write_corpus)
    shards = out / "shards"

    def shard_all():
        for src, dst in ((data / "train", "train"), (data / "test", "test"), (data / "labelled.csv", "labelled"),
                         (data / "fewshot_test.csv", "fewshot_test")):
            try:
                index = shard(str(src), shards / dst, ShardOptions(samples_per_shard=2000), workers=2,
                              progress=False)
            except ShardError as e:  # left by an older demo with other sharding arguments
                print(f"  {e}: sharding {dst} again")
                index = shard(str(src), shards / dst, ShardOptions(samples_per_shard=2000), workers=2,
                              overwrite=True, progress=False)
            print(f"  {dst}: {index['total_samples']} samples in {len(index['shards'])} shards, "
                  f"{len(index['skipped'])} skipped")

    steps.run(f"shard (vitpipe shard {data / 'train'} {shards / 'train'} --workers 2, and test / labelled subsets)",
              fn=shard_all)

    runs = out / "runs"
    common = [f"train.seed={seed}", "data.workers=1"]
    objective = objective_name(budget)
    steps.run(f"pretrain: {objective.upper()} on all {len(xtr)} training images, labels unused", [
        sys.executable, "-m", "pretrain", "--config", str(CONFIGS / "pretrain" / budget.pretrain_config),
        f"data.train={shards / 'train'}", f"model.image_size={budget.pretrain_size}", *budget.model,
        f"data.batch_size={budget.pretrain_batch}", f"train.max_steps={budget.pretrain_steps}",
        f"train.checkpoint_every={max(1, budget.pretrain_steps // 2)}", f"data.monitor={shards / 'labelled'}",
        f"train.output_dir={runs / 'pretrain'}", "data.resampled=true", "train.log_every=20",
        *budget.pretrain_args, *common])

    def finetune(config: str, recipe: tuple[str, ...], init: Path, output: Path) -> list[str]:
        return [sys.executable, "-m", "finetune", "--config", str(CONFIGS / "finetune" / config), f"init={init}",
                f"data.train={shards / 'labelled'}", f"model.image_size={budget.finetune_size}",
                f"data.batch_size={budget.finetune_batch}", f"train.max_steps={budget.finetune_steps}",
                f"train.checkpoint_every={budget.finetune_steps}", "train.log_every=10", *recipe, *common,
                f"train.output_dir={output}"]

    steps.run(f"fine-tune at {budget.finetune_size}px on {n_labelled} labelled images (zero head, interpolated "
              "position embeddings)", finetune(budget.finetune_config, budget.finetune_args,
                                               runs / "pretrain" / "final", runs / "pretrained_finetune"))
    dims = [f"--{k.split('=')[0].split('.')[1].replace('_', '-')}={k.split('=')[1]}" for k in budget.model]
    steps.run("from scratch: the same model, resolution, labels and fine-tuning budget", [
        *vp, "init", "vit_ti4", str(runs / "scratch_init"), "--img-size", str(budget.finetune_size),
        "--num-classes", str(len(classes)), "--labels", *classes, "--seed", str(seed), *dims])
    steps.run("train from scratch (the recipe that suits a random init: SGD, higher lr)",
              finetune(budget.scratch_config, budget.scratch_args, runs / "scratch_init", runs / "scratch"))
    baseline = steps.run("baseline: logistic regression on the pixels of the same labelled images",
                         fn=lambda: pixel_baseline(xtr[labelled], ytr[labelled], xte, yte))

    def evaluate_all():
        results = {}
        for run_name in ("pretrained_finetune", "scratch"):
            model, info = load_model(runs / run_name / "final")
            results[run_name] = evaluate(model, info, shards / "test", runs / run_name / "final", workers=2)
        for run_name, folder in (("pretrained", runs / "pretrain" / "final"), ("scratch_init", runs / "scratch_init")):
            model, info = load_model(folder)
            report = evaluate(model, info, shards / "fewshot_test", None, fewshot_train=shards / "labelled",
                              shots=(1, 5, 10, 25), seeds=3, workers=2)
            results[f"{run_name}_fewshot"] = report["fewshot"]
        return results

    evals = steps.run("evaluate on the test set (top-1) and few-shot linear on frozen features", fn=evaluate_all)
    best = max(("pretrained_finetune", "scratch"), key=lambda r: evals[r]["top1"])
    export = out / "export"
    steps.run("export the best model in transformers hub format with its model card",
              [*vp, "export", str(runs / best / "final"), str(export), "--format", "transformers"])
    plots = out / "plots"
    steps.run("plots: position embeddings, attention distance, attention rollout, training curves", [
        *vp, "plot", str(runs / "pretrained_finetune" / "final"), "--out", str(plots), "--images",
        str(shards / "test"), "--metrics", f"pretrain={runs / 'pretrain' / 'metrics.jsonl'}",
        f"pretrained+finetune={runs / 'pretrained_finetune' / 'metrics.jsonl'}",
        f"scratch={runs / 'scratch' / 'metrics.jsonl'}"])
    pre, scr = evals["pretrained_finetune"], evals["scratch"]
    results = {
        "dataset": name, "seed": seed, "reduced": reduced,
        "labelled_images": n_labelled, "train_images": int(len(xtr)), "test_images": int(len(xte)),
        "pretrain_resolution": budget.pretrain_size, "finetune_resolution": budget.finetune_size,
        "objective": objective, "pretrain_steps": budget.pretrain_steps, "finetune_steps": budget.finetune_steps,
        "pretrained_top1": pre["top1"], "scratch_top1": scr["top1"], "baseline_top1": baseline,
        "pretrained_top5": pre["top5"], "scratch_top5": scr["top5"],
        "pretrain_knn_top1": {r["step"]: r["knn_top1"] for r in map(
            json.loads, (runs / "pretrain" / "val_metrics.jsonl").read_text().splitlines())},
        "fewshot": {k: evals[k] for k in ("pretrained_fewshot", "scratch_init_fewshot")},
        "seconds": {**steps.seconds, "total": round(time.perf_counter() - t0, 1)},
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}",
        "outputs": {"runs": str(runs), "export": str(export), "plots": str(plots), "shards": str(shards)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return results


def objective_name(budget: Budget) -> str:
    """The pretraining objective the demo runs: its config's, unless an override changes it."""
    import yaml

    name = yaml.safe_load((CONFIGS / "pretrain" / budget.pretrain_config).read_text())["objective"]["name"]
    overrides = [a.split("=", 1)[1] for a in budget.pretrain_args if a.startswith("objective.name=")]
    return overrides[-1] if overrides else name


def pixel_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 of a logistic regression (scikit-learn, C=0.1) on raw pixels scaled to [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0  # noqa: E731
    model = LogisticRegression(C=0.1, max_iter=2000).fit(flat(train_x), train_y)
    return float(model.score(flat(test_x), test_y))


def print_table(r: dict) -> None:
    few_p, few_s = r["fewshot"]["pretrained_fewshot"], r["fewshot"]["scratch_init_fewshot"]
    print("\n" + "=" * 72)
    print(f"vitpipe demo: {r['dataset']}, {r['labelled_images']} labelled of {r['train_images']} training images, "
          f"seed {r['seed']}")
    print(f"{'':32s}{r['objective'].upper() + '-pretrained':>18s}{'from scratch':>18s}")
    print(f"{'fine-tuned top-1 (test)':32s}{r['pretrained_top1']:>18.2%}{r['scratch_top1']:>18.2%}")
    print(f"{'fine-tuned top-5 (test)':32s}{r['pretrained_top5']:>18.2%}{r['scratch_top5']:>18.2%}")
    print(f"{'pixels + logistic regression':32s}{r['baseline_top1']:>18.2%}{'(same labels)':>18s}")
    knn = ", ".join(f"step {k}: {v:.2%}" for k, v in r["pretrain_knn_top1"].items())
    print(f"{'kNN monitor while pretraining':32s}{knn} (leave-one-out on the labelled images)")
    for k in few_p:
        print(f"{k + ' linear, frozen':32s}{few_p[k]['mean']:>18.2%}{few_s[k]['mean']:>18.2%}")
    print("\nseconds per step:")
    for k, v in r["seconds"].items():
        print(f"  {v:7.1f}  {k}")
    print("\noutputs: " + "\n         ".join(f"{k}: {v}" for k, v in r["outputs"].items()))
    print("=" * 72)
