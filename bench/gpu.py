"""ViT-B/16 on one GPU, bf16, from JPEG shards made here: images/s and MFU end to end (against a bf16 matmul peak
measured in the same run), the loader's share of the step (the same steps on batches already on the device),
CPU against GPU decoding, the largest batch that fits, MAE against MPP, and the loader per core (with the
layout of the run that held it to ~30 images/s per core: a 256-image corpus, a new loader every 4 batches).

The step is the loop's (``Task``, the transform's ``to_device``, bf16 autocast, gradient clipping, fused AdamW,
one host sync for the loss), without accelerate, so that it runs where only torch is installed; packages it
lacks come from ``build/gpu_deps`` (copied there from the venv). Results go to ``--out`` as they come.

    python bench/gpu.py --out results.json [--images 6000] [--workers 15] [--quick]  (--quick: tiny, on the CPU)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT / "build" / "gpu_deps").is_dir():
    sys.path.append(str(ROOT / "build" / "gpu_deps"))  # last: the machine's own packages come first

RESULTS: dict = {}


def record(out: Path | None, key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)
    if out is not None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(RESULTS, indent=1))
        tmp.replace(out)


def _corpus_part(args) -> None:
    from bench.data import make_corpus

    root, n, start = args
    make_corpus(root, n, seed=3, sides=(250, 640), quality=(75, 95), start=start)


def make_shards(root: Path, n: int, per_shard: int, procs: int) -> Path:
    """``n`` ImageNet-like JPEGs (250-640 px, quality 75-95) made in ``procs`` processes, sharded pass-through."""
    from data_tools.images import EncodeOptions
    from data_tools.shard import ShardOptions, shard

    step = -(-n // procs)
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_corpus_part, [(root / "src", min(step, n - s), s) for s in range(0, n, step)])
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=per_shard,
                                                           encode=EncodeOptions(validate="header")),
          workers=procs, progress=False)
    return root / "shards"


def build(kind: str, args, device):
    """Model + objective (ViT-B/16 or, quick, a tiny ViT), fused AdamW on CUDA: what the loop would train."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import Task, build_objective
    from pretrain.optim import build_optimizer
    from vit import create_model

    objective = {"supervised": ["objective.name=supervised"], "mpp": ["objective.name=mpp"],
                 "mae": ["objective.name=mae", "objective.decoder_dim=512", "objective.decoder_depth=8",
                         "objective.decoder_heads=16"]}[kind]
    if args.quick:
        objective = [o for o in objective if "decoder_d" not in o and "decoder_heads" not in o] + \
            (["objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=2"] if kind == "mae" else [])
    cfg = load_config(None, ["data.train=unused", *objective, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]"])
    torch.manual_seed(0)
    size = dict(embed_dim=64, depth=2, num_heads=2, mlp_dim=128) if args.quick else {}
    model = create_model("vit_b16", image_size=args.size, num_classes=1000 if kind == "supervised" else 0,
                         head="pretrain" if kind == "supervised" else "none", **size)
    task = Task(model, build_objective(cfg, model)).to(device)
    return task, build_optimizer(cfg, task, fused=device.type == "cuda")


class Stepper:
    """One training step as the loop runs it, on a batch the loader handed over."""

    def __init__(self, task, optimizer, transform, device, bf16: bool):
        import torch

        self.task, self.optimizer, self.transform, self.device = task, optimizer, transform, device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.gen = torch.Generator(device=device)
        self.params = [p for p in task.parameters() if p.requires_grad]

    def __call__(self, batch: dict, i: int) -> float:
        import torch

        batch = self.transform.to_device(batch, self.device)
        self.gen.manual_seed(i)
        with self.autocast:
            loss, _ = self.task(batch, self.gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the loop's non-finite check syncs once a step too


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step: Stepper, batches, warmup: int, steps: int, batch_size: int) -> float:
    """Images/s over ``steps`` steps after ``warmup``."""
    it = iter(batches)
    for i in range(warmup):
        step(next(it), i)
    sync(step.device)
    t = time.perf_counter()
    for i in range(steps):
        step(next(it), warmup + i)
    sync(step.device)
    return steps * batch_size / (time.perf_counter() - t)


def flops_per_image(step: Stepper, batch: dict) -> float:
    """Forward + backward FLOPs of one step, counted by torch (MAE: only the visible patches go through the encoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch, 0)
    return counter.get_total_flops() / len(batch["labels"])


def resident(batch: dict):
    """The same batch again and again, already on the device: the step without the loader."""
    while True:
        yield batch


def synthetic_batch(n: int, size: int, device) -> dict:
    import torch

    return {"images": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device),
            "labels": torch.randint(0, 10, (n,), device=device)}


def largest_batch(kind: str, args, device, transform, candidates: list[int]) -> tuple[int, dict]:
    """The batch (of ``candidates``) with the best images/s on batches already on the device; those that do not
    fit are reported as such."""
    import torch

    rates = {}
    for n in candidates:
        task, optimizer = build(kind, args, device)
        step = Stepper(task, optimizer, transform, device, args.bf16)
        try:
            rates[n] = timed_steps(step, resident(synthetic_batch(n, args.size, device)), 2, args.sweep_steps, n)
        except torch.cuda.OutOfMemoryError:
            rates[n] = "out of memory"
        del task, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rates[n] == "out of memory":
            break
    fitting = {n: r for n, r in rates.items() if not isinstance(r, str)}
    return max(fitting, key=fitting.get), rates


def loader_rate(make, batches: int, device=None, transform=None) -> float:
    """Images/s the loader delivers (decoded on the device too, for GPU decode) after its first batch."""
    it = iter(make())
    first = next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if transform is not None:
            transform.to_device(b, device)["pixel_values"].sum().item()
        n += len(b["labels"])
    return n / (time.perf_counter() - t) if first is not None else 0.0


def epochs_rate(shards, transform, batch: int, workers: int, epochs: int) -> float:
    """The old benchmark's layout: a new loader (new worker processes) every epoch of a few batches."""
    from data_tools.loader import train_loader

    n, t = 0, time.perf_counter()
    for epoch in range(epochs):
        for b in train_loader(shards, transform, batch, workers=workers, epoch=epoch, shuffle_buffer=64):
            n += len(b["labels"])
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sweep-steps", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="a tiny model, small images, on the CPU: tests the script")
    p.add_argument("--only", nargs="*", default=["loader", "supervised", "mae", "mpp", "gpu_decode", "old_layout"])
    p.add_argument("--batches", nargs="*", default=[], metavar="KIND=N",
                   help="use this batch for an objective (no sweep), e.g. supervised=1024")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's module (time to compile recorded)")
    args = p.parse_args()
    import torch
    import torchvision

    from data_tools.loader import resolve_shards, train_loader
    from data_tools.transforms import GpuTrainTransform, TrainTransform
    from pretrain.metrics import measure_peak_flops

    device = torch.device("cpu" if args.quick else "cuda")
    if args.quick:
        torch.set_num_threads(1)
    args.size, args.bf16 = (32, False) if args.quick else (224, True)
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    record(args.out, "machine", {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                                 "torchvision": torchvision.__version__, "workers": args.workers,
                                 "dev_shm_gib": shm.f_bsize * shm.f_blocks / 2**30 if shm else None})
    cpu_tf, gpu_tf = TrainTransform(args.size), GpuTrainTransform(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()  # before CUDA starts: the corpus is made in forked processes
        folder = make_shards(Path(tmp), args.images, 200, min(16, os.cpu_count() or 1))
        shards = resolve_shards(folder, num_samples=10**7)  # one long epoch: the loader is made once
        old = make_shards(Path(tmp) / "old", 256, 16, min(16, os.cpu_count() or 1))  # the old run's layout
        record(args.out, "corpus", {"images": args.images, "seconds": time.perf_counter() - t})
        record(args.out, "device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        peak = measure_peak_flops(device, torch.bfloat16 if args.bf16 else torch.float32)
        record(args.out, "peak_tflops", peak / 1e12)

        def stream(transform, batch: int, workers: int = args.workers):
            return lambda: train_loader(shards, transform, batch, workers=workers, resampled=True, shuffle_buffer=500)

        def attempt(key: str, fn) -> None:
            """A section that fails is recorded as its error; the others still run."""
            try:
                fn()
            except Exception as exn:  # noqa: BLE001 (one shot on a lent machine: keep what the other sections give)
                import traceback

                traceback.print_exc()
                record(args.out, key, {"error": f"{type(exn).__name__}: {exn}"[:500]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        def loader_section() -> None:
            rates = {"cpu_decode_1_worker": loader_rate(stream(cpu_tf, 64, 1), 6),
                     f"cpu_decode_{args.workers}_workers": loader_rate(stream(cpu_tf, 256), 12)}
            if device.type == "cuda":
                rates[f"gpu_decode_{args.workers}_workers"] = loader_rate(stream(gpu_tf, 256), 12, device, gpu_tf)
            record(args.out, "loader_img_per_s", rates)

        if "loader" in args.only:
            attempt("loader_img_per_s", loader_section)
        candidates = {"supervised": [256, 512, 1024], "mpp": [256, 512, 1024], "mae": [512, 1024, 2048]}

        given = dict(b.split("=") for b in args.batches)

        def objective_section(kind: str) -> None:
            if kind in given:
                batch, sweep = int(given[kind]), None
            else:
                batch, sweep = largest_batch(kind, args, device, cpu_tf, [8, 16] if args.quick else candidates[kind])
            task, optimizer = build(kind, args, device)
            step = Stepper(task, optimizer, cpu_tf, device, args.bf16)
            flops = flops_per_image(step, synthetic_batch(8, args.size, device))
            result = {"batch_sweep_img_per_s": sweep, "batch": batch, "gflop_per_image": flops / 1e9,
                      "workers": args.workers}
            if args.compile:
                step.task = torch.compile(task)
                t = time.perf_counter()
                step(synthetic_batch(batch, args.size, device), 0)
                result["compile_s"] = time.perf_counter() - t
            on_device = timed_steps(step, resident(synthetic_batch(batch, args.size, device)), 2, args.steps, batch)
            result.update(on_device_img_per_s=on_device, on_device_mfu=on_device * flops / peak)
            gpu_decode = device.type == "cuda" and "gpu_decode" in args.only
            for decode, transform in (("cpu", cpu_tf), ("gpu", gpu_tf)) if gpu_decode else (("cpu", cpu_tf),):
                step.transform = transform
                rate = timed_steps(step, stream(transform, batch)(), 3, args.steps, batch)
                result[f"{decode}_decode"] = {"img_per_s": rate, "mfu": rate * flops / peak,
                                              "loader_share": 1 - rate / on_device}
            record(args.out, f"{kind}{'_compiled' if args.compile else ''}_{args.workers}_workers", result)

        for kind in ("supervised", "mae", "mpp"):
            if kind in args.only:
                attempt(kind, lambda kind=kind: objective_section(kind))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        def old_layout_section() -> None:
            old_shards = resolve_shards(old)
            workers = min(14, args.workers)
            record(args.out, "old_layout_img_per_s", {
                f"new_loader_every_4_batches_{workers}_workers": epochs_rate(old_shards, cpu_tf, 64, workers, 6),
                f"one_long_epoch_{workers}_workers": loader_rate(
                    lambda: train_loader(resolve_shards(old, num_samples=10**6), cpu_tf, 64, workers=workers,
                                         resampled=True, shuffle_buffer=64), 24)})

        if "old_layout" in args.only:
            attempt("old_layout_img_per_s", old_layout_section)
        record(args.out, "seconds", time.perf_counter() - t)


if __name__ == "__main__":
    main()
