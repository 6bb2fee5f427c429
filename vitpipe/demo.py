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
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import VitpipeError
from common.io import write_json

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
    for i, (img, label) in enumerate(tqdm(zip(images, labels), total=len(images), desc=f"write {root.name}",
                                          unit="img")):
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


class DemoError(VitpipeError):
    """A step of the demo failed; the step has said why on the line above."""


def shown(argv) -> str:
    """``vitpipe ARGV`` as a user in this folder would type it: paths below the cwd relative to it."""
    here = os.getcwd().rstrip(os.sep) + os.sep
    return shlex.join(["vitpipe", *(str(a).replace(here, "") for a in argv)])


class Steps:
    """Times each step and prints it, and each command in it, as a user would type it.

    ``vitpipe``: the command line's entry point (``vitpipe.cli.main``, handed over by the ``demo`` verb, so the
    demo does not import the CLI that imports it), for the quick verbs run in this process."""

    def __init__(self, vitpipe: Callable[[list[str]], int]):
        self.vitpipe = vitpipe
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 1)

    def run(self, *argv) -> None:
        """``vitpipe ARGV`` in a process of its own, as the user would run it."""
        print(f"$ {shown(argv)}", flush=True)
        code = subprocess.run([sys.executable, "-m", "vitpipe", *map(str, argv)]).returncode
        if code:
            raise DemoError(f"vitpipe {argv[0]} exited with status {code}")

    def run_here(self, *argv) -> None:
        """``vitpipe ARGV`` in this process: for quick verbs, which then skip a second import of torch."""
        print(f"$ {shown(argv)}", flush=True)
        if code := self.vitpipe([str(a) for a in argv]):
            raise DemoError(f"vitpipe {argv[0]} exited with status {code}")


class Demo:
    """One run of the demo: its data, budget and folders, and each step as a method, in the order they run."""

    def __init__(self, out: Path, dataset: str, reduced: bool, seed: int, vitpipe: Callable[[list[str]], int]):
        self.out, self.seed = out, seed
        self.name, self.classes, (self.xtr, self.ytr), (self.xte, self.yte) = load_dataset(dataset)
        budget = BUDGETS[self.name]
        self.budget = Budget(**{**budget.__dict__, **REDUCED}) if reduced else budget
        self.labelled = stratified(self.ytr, self.budget.labelled_fraction, seed)
        self.objective = objective_name(self.budget)
        self.data, self.shards, self.runs = out / "data", out / "shards", out / "runs"
        self.steps = Steps(vitpipe)
        self.common = [f"train.seed={seed}", "data.workers=1"]  # every training run's

    def write_corpus(self) -> None:
        with self.steps.step("write the dataset as a folder of class subfolders of PNGs"):
            files = write_image_folder(self.data / "train", self.xtr, self.ytr, self.classes)
            test_files = write_image_folder(self.data / "test", self.xte, self.yte, self.classes)
            write_manifest(self.data / "labelled.csv", [files[i] for i in self.labelled], self.ytr[self.labelled],
                           self.classes)
            few = np.sort(np.random.default_rng(self.seed).permutation(len(self.xte))[:self.budget.fewshot_test])
            write_manifest(self.data / "fewshot_test.csv", [test_files[i] for i in few], self.yte[few], self.classes)

    def shard(self) -> None:
        from common.text import plural
        from data_tools.shard import ShardError, ShardOptions, shard

        with self.steps.step("shard the training and test images and the labelled subsets"):
            for dst, name in (("train", "train"), ("test", "test"), ("labelled", "labelled.csv"),
                              ("fewshot_test", "fewshot_test.csv")):
                src = self.data / name
                argv = ["shard", src, self.shards / dst, "--samples-per-shard", 2000, "--workers", 2]
                print(f"$ {shown(argv)}", flush=True)
                options = ShardOptions(samples_per_shard=2000)
                try:
                    index = shard(str(src), self.shards / dst, options, workers=2)
                except ShardError as e:  # left by an older demo with other sharding arguments
                    print(f"  {e}: sharding {dst} again\n$ {shown([*argv, '--overwrite'])}", flush=True)
                    index = shard(str(src), self.shards / dst, options, workers=2, overwrite=True)
                print(f"  {dst}: {plural(index['total_samples'], 'sample')} in {plural(len(index['shards']), 'shard')}, "
                      f"{len(index['skipped'])} skipped")

    def pretrain(self) -> None:
        b, runs = self.budget, self.runs
        with self.steps.step(f"pretrain: {self.objective.upper()} on all {len(self.xtr)} training images, "
                             "labels unused"):
            self.steps.run(
                "pretrain", "--config", CONFIGS / "pretrain" / b.pretrain_config, f"data.train={self.shards / 'train'}",
                f"model.image_size={b.pretrain_size}", *b.model, f"data.batch_size={b.pretrain_batch}",
                f"train.max_steps={b.pretrain_steps}", f"train.checkpoint_every={max(1, b.pretrain_steps // 2)}",
                f"data.monitor={self.shards / 'labelled'}", f"train.output_dir={runs / 'pretrain'}",
                "data.resampled=true", "train.log_every=20", *b.pretrain_args, *self.common)

    def finetune(self, config: str, recipe: tuple[str, ...], init: Path, output: Path) -> None:
        b = self.budget
        self.steps.run("finetune", "--config", CONFIGS / "finetune" / config, f"init={init}",
                       f"data.train={self.shards / 'labelled'}", f"model.image_size={b.finetune_size}",
                       f"data.batch_size={b.finetune_batch}", f"train.max_steps={b.finetune_steps}",
                       f"train.checkpoint_every={b.finetune_steps}", "train.log_every=10", *recipe, *self.common,
                       f"train.output_dir={output}")

    def finetune_pretrained(self) -> None:
        b = self.budget
        with self.steps.step(f"fine-tune at {b.finetune_size}px on {len(self.labelled)} labelled images (zero head, "
                             "interpolated position embeddings)"):
            self.finetune(b.finetune_config, b.finetune_args, self.runs / "pretrain" / "final",
                          self.runs / "pretrained_finetune")

    def train_from_scratch(self) -> None:
        b, init = self.budget, self.runs / "scratch_init"
        dims = [f"--{k.split('=')[0].split('.')[1].replace('_', '-')}={k.split('=')[1]}" for k in b.model]
        with self.steps.step("from scratch: the same model, resolution, labels and fine-tuning budget"):
            self.steps.run("init", "vit_ti4", init, "--img-size", b.finetune_size, "--num-classes",
                           len(self.classes), "--labels", *sorted(self.classes), "--seed", self.seed, *dims)
        with self.steps.step("train from scratch (the recipe that suits a random init: SGD, higher lr)"):
            self.finetune(b.scratch_config, b.scratch_args, init, self.runs / "scratch")

    def baseline(self) -> float:
        with self.steps.step("baseline: logistic regression on the pixels of the same labelled images"):
            return pixel_baseline(self.xtr[self.labelled], self.ytr[self.labelled], self.xte, self.yte)

    def evaluate(self) -> dict:
        """Top-1 of both fine-tuned models on the test set; few-shot linear on the frozen features of the
        pretrained encoder and of the random one."""
        from finetune.evaluate import load_report

        reports = {}
        with self.steps.step("evaluate on the test set (top-1) and few-shot linear on frozen features"):
            for run_name in ("pretrained_finetune", "scratch"):
                final = self.runs / run_name / "final"
                self.steps.run_here("eval", final, "--data", self.shards / "test", "--workers", 2)
                reports[run_name] = load_report(final)
            shots = self.affordable_shots()
            for run_name, folder in (("pretrained", self.runs / "pretrain" / "final"),
                                     ("scratch_init", self.runs / "scratch_init")):
                out = self.out / "fewshot" / run_name
                self.steps.run_here("eval", folder, "--data", self.shards / "fewshot_test", "--fewshot-train",
                                    self.shards / "labelled", "--shots", *shots, "--workers", 2, "--out", out)
                reports[f"{run_name}_fewshot"] = load_report(out)["fewshot"]
        return reports

    def affordable_shots(self) -> list[int]:
        """1, 5, 10 and 25 shots, those the smallest class of the labelled images has enough images for (eval
        refuses a K-shot evaluation that would silently be a fewer-shot one)."""
        from data_tools.shard import read_index

        fewest = min(read_index(self.shards / "labelled")["class_counts"].values())
        return [k for k in (1, 5, 10, 25) if k <= fewest] or [1]

    def export(self, best: str) -> None:
        with self.steps.step("export the best model in transformers hub format with its model card"):
            self.steps.run("export", self.runs / best / "final", self.out / "export", "--format", "transformers")

    def plot(self) -> None:
        runs = self.runs
        with self.steps.step("plots: position embeddings, attention distance, attention rollout, training curves"):
            self.steps.run("plot", runs / "pretrained_finetune" / "final", "--out", self.out / "plots", "--images",
                           self.shards / "test", "--metrics", f"pretrain={runs / 'pretrain' / 'metrics.jsonl'}",
                           f"pretrained+finetune={runs / 'pretrained_finetune' / 'metrics.jsonl'}",
                           f"scratch={runs / 'scratch' / 'metrics.jsonl'}")

    def results(self, evals: dict, baseline: float, reduced: bool, seconds: float) -> dict:
        pre, scr, b = evals["pretrained_finetune"], evals["scratch"], self.budget
        knn = map(json.loads, (self.runs / "pretrain" / "val_metrics.jsonl").read_text().splitlines())
        return {
            "dataset": self.name, "seed": self.seed, "reduced": reduced,
            "labelled_images": len(self.labelled), "train_images": int(len(self.xtr)),
            "test_images": int(len(self.xte)),
            "pretrain_resolution": b.pretrain_size, "finetune_resolution": b.finetune_size,
            "objective": self.objective, "pretrain_steps": b.pretrain_steps, "finetune_steps": b.finetune_steps,
            "pretrained_top1": pre["top1"], "scratch_top1": scr["top1"], "baseline_top1": baseline,
            "pretrained_top5": pre.get("top5"), "scratch_top5": scr.get("top5"),
            "pretrain_knn_top1": {r["step"]: r["knn_top1"] for r in knn},
            "fewshot": {k: evals[k] for k in ("pretrained_fewshot", "scratch_init_fewshot")},
            "seconds": {**self.steps.seconds, "total": seconds},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "outputs": {"runs": str(self.runs), "export": str(self.out / "export"), "plots": str(self.out / "plots"),
                        "shards": str(self.shards)},
        }


def run_demo(out: str | Path, vitpipe: Callable[[list[str]], int], dataset: str = "auto", reduced: bool = False,
             seed: int = 0) -> dict:
    """The whole demo; ``vitpipe``: the command line's entry point, for the verbs it runs in this process."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, dataset, reduced, seed, vitpipe)
    print(f"dataset: {demo.name} ({len(demo.xtr)} train / {len(demo.xte)} test real images, {len(demo.classes)} "
          "classes)" + ("" if demo.name == "fashion-mnist" else "; install Debian's dataset-fashion-mnist for the "
                        "full demo"))
    demo.write_corpus()
    demo.shard()
    demo.pretrain()
    demo.finetune_pretrained()
    demo.train_from_scratch()
    baseline = demo.baseline()
    evals = demo.evaluate()
    demo.export(max(("pretrained_finetune", "scratch"), key=lambda r: evals[r]["top1"]))
    demo.plot()
    results = demo.results(evals, baseline, reduced, round(time.perf_counter() - t0, 1))
    write_json(out / "results.json", results)
    print_table(results)
    return results


def objective_name(budget: Budget) -> str:
    """The pretraining objective the demo runs: its config's with the demo's overrides, as the run will load it."""
    from pretrain.config import load_config

    config = load_config(CONFIGS / "pretrain" / budget.pretrain_config, budget.pretrain_args, stage="pretrain",
                         need_data=False)
    return config.objective.name


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
    if r["pretrained_top5"] is not None:  # more than 5 classes
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
