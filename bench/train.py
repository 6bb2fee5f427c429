"""Pretraining throughput (MPP, MAE) through our loop vs a minimal hand-written torch loop.

Both read the same shards through the same loader and train the same model with the same
optimizer; the difference is the loop's own machinery (accelerate, schedules, logging,
checkpoint-free steps, non-finite checks). Also MFU against a matmul peak measured in the same
run, and peak memory with and without gradient checkpointing. And MAE against MPP at the same
encoder and batch (MAE encodes a quarter of the patches). Each variant runs in a fresh process.
``--only compile``: ``torch.compile`` against eager over a whole run (500 steps of a small ViT on batches
already in memory), compile time included.

    python bench/train.py [--model vit_ti16] [--img-size 224] [--batch 16] [--steps 12] [--device cpu|cuda]
    python bench/train.py --only compile [--compile-steps 500] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG_EPOCH = 10**7  # samples: the loader is made once per run, as on a real corpus
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Samples this process's RSS (or CUDA peak) while running."""

    def __init__(self, device: str):
        self.device, self.peak, self.done = device, 0.0, False

    def rss(self) -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.base = self.rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch

        self.done = True
        self.thread.join()
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2**20
            self.base = 0.0


def config(args, shards: str, out: str, checkpointing: bool, objective: str = "mpp"):
    from pretrain.config import load_config

    dim, depth, heads = args.mae_decoder
    objective_keys = [f"objective.name={objective}"] if objective == "mpp" else [
        f"objective.name={objective}", f"objective.decoder_dim={dim}", f"objective.decoder_depth={depth}",
        f"objective.decoder_heads={heads}"]
    return load_config(None, [*objective_keys, 
        f"data.train={shards}", f"model.name={args.model}", f"model.image_size={args.img_size}", "model.head=none",
        f"data.batch_size={args.batch}", f"data.workers={args.workers}", "data.shuffle_buffer=64",
        # one long epoch over the 256 images: a new loader (new workers) every 256 // batch steps held the
        # H100 run of 2026-11-25 to ~30 images/s per core (bench/gpu.py's old_layout measures it)
        "data.resampled=true", f"data.num_samples={LONG_EPOCH}",
        f"train.max_steps={args.warmup + args.steps}", f"train.checkpoint_every={10**9}", f"train.output_dir={out}",
        f"train.log_every={args.warmup}", f"model.grad_checkpointing={str(checkpointing).lower()}",
        "schedule.warmup_steps=0", "schedule.decay=constant", "train.resume=none",
        "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]",
    ])


def run_ours(args, shards: str, checkpointing: bool, objective: str = "mpp") -> dict:
    from data_tools.loader import resolve_shards
    from pretrain.objectives import build_objective
    from pretrain.run import build_model

    with tempfile.TemporaryDirectory() as out:
        cfg = config(args, shards, out, checkpointing, objective)
        model = build_model(cfg, None)
        from pretrain.loop import train

        with PeakRSS(args.device) as mem:
            train(cfg, model, build_objective(cfg, model), __import__("vit").ModelInfo(), "bench",
                  resolve_shards(cfg.data.train, cfg.data.num_samples))
        records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    timed = records[1:]  # the first window holds the warm-up steps
    return {"images_per_s": sum(r["images_per_s"] for r in timed) / len(timed), "mfu": timed[-1]["mfu"],
            "peak_mb": mem.peak, "base_mb": mem.base}


def run_bare(args, shards: str) -> dict:
    import torch

    from data_tools.loader import resolve_shards, train_loader
    from data_tools.transforms import TrainTransform
    from pretrain.objectives import build_objective
    from pretrain.optim import build_optimizer
    from pretrain.run import build_model

    cfg = config(args, shards, "unused", False)
    torch.manual_seed(0)
    model = build_model(cfg, None).to(args.device)
    objective = build_objective(cfg, model).to(args.device)
    params = list(model.parameters()) + list(objective.parameters())
    opt = build_optimizer(cfg, torch.nn.ModuleList([model, objective]), fused=args.device == "cuda")
    transform = TrainTransform(args.img_size)
    loader = train_loader(resolve_shards(shards, LONG_EPOCH), transform, args.batch, workers=args.workers,
                          shuffle_buffer=64, resampled=True)
    done, t0 = 0, None
    with PeakRSS(args.device) as mem:
        while done < args.warmup + args.steps:
            for batch in loader:
                if done == args.warmup:
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                loss, _ = objective(model, transform.to_device(batch, args.device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()
                done += 1
                if done == args.warmup + args.steps:
                    break
        if args.device == "cuda":
            torch.cuda.synchronize()
    return {"images_per_s": args.steps * args.batch / (time.perf_counter() - t0), "peak_mb": mem.peak,
            "base_mb": mem.base}


def run_compile(args, compiled: bool) -> dict:
    """``--compile-steps`` steps of a small ViT-Ti/4 at 32 px (MPP, AdamW) on uint8 batches already in memory,
    normalised per step as the loop does: the whole run's seconds, compilation included."""
    import torch

    from data_tools.transforms import normalize
    from pretrain.config import load_config
    from pretrain.objectives import Task, build_objective
    from pretrain.optim import build_optimizer
    from pretrain.run import build_model

    cfg = load_config(None, ["data.train=unused", "model.name=vit_ti4", "model.image_size=32", "model.head=none",
                             "model.embed_dim=96", "model.depth=4", "model.num_heads=3", "model.mlp_dim=384",
                             "objective.name=mpp", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]"])
    if args.device == "cpu":
        torch.set_num_threads(1)  # per core; on a shared machine two threads a step waited on each other 20x
    torch.manual_seed(0)
    model = build_model(cfg, None)
    task = Task(model, build_objective(cfg, model)).to(args.device)
    optimizer = build_optimizer(cfg, task, fused=args.device == "cuda")
    step = torch.compile(task) if compiled else task
    images = torch.randint(0, 256, (4, 64, 32, 32, 3), dtype=torch.uint8, device=args.device)
    gen = torch.Generator(device=args.device)
    t0 = time.perf_counter()
    for i in range(args.compile_steps):
        gen.manual_seed(i)
        loss, _ = step({"pixel_values": normalize(images[i % 4], (0.5,) * 3, (0.5,) * 3)}, gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i == 0:
            loss.item()
            first = time.perf_counter() - t0
    final = loss.item()
    return {"total_s": time.perf_counter() - t0, "first_step_s": first, "final_loss": final}


def bench_compile(args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    runs = {}
    for variant in ("eager", "compiled"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", f"compile_{variant}"]
        runs[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                  env=env).stdout.strip().splitlines()[-1])
    eager, compiled = runs["eager"], runs["compiled"]
    print(f"torch.compile vs eager, ViT-Ti/4 @32 (4 blocks, width 96) MPP, batch 64, {args.compile_steps} steps, "
          f"{args.device}{' (1 thread)' if args.device == 'cpu' else ''}:")
    print(f"  eager     {eager['total_s']:7.1f} s ({eager['first_step_s']:.2f} s first step), final loss "
          f"{eager['final_loss']:.4f}")
    print(f"  compiled  {compiled['total_s']:7.1f} s ({compiled['first_step_s']:.1f} s first step: compilation), "
          f"final loss {compiled['final_loss']:.4f}")
    steady = (compiled["total_s"] - compiled["first_step_s"]) / (eager["total_s"] - eager["first_step_s"])
    print(f"  whole run: compiled takes {compiled['total_s'] / eager['total_s']:.2f}x eager's time; after the first "
          f"step {steady:.2f}x")
    return {"compile_vs_eager": compiled["total_s"] / eager["total_s"], "compile_steady_vs_eager": steady}


def make_shards(root: Path, n: int, size: int) -> str:
    from bench.data import make_corpus
    from data_tools.images import EncodeOptions
    from data_tools.shard import ShardOptions, shard

    make_corpus(root / "src", n)
    opts = ShardOptions(samples_per_shard=16, encode=EncodeOptions(resize_shorter=size + size // 7))
    shard(str(root / "src"), root / "shards", opts, progress=False)
    return str(root / "shards")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_ti16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="loader processes (the corpus has 16 shards: at most 16)")
    p.add_argument("--mae-decoder", type=int, nargs=3, default=[128, 2, 4], metavar=("DIM", "DEPTH", "HEADS"),
                   help="MAE's decoder width, depth and heads (default: 128 2 4, light for ViT-Ti)")
    p.add_argument("--only", choices=["compile"], help="run only this comparison")
    p.add_argument("--compile-steps", type=int, default=500)
    p.add_argument("--variant", choices=["ours", "ours_ckpt", "ours_mae", "bare", "compile_eager", "compile_compiled"],
                   help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant in ("compile_eager", "compile_compiled"):
        print(json.dumps(run_compile(args, args.variant == "compile_compiled")))
        return
    if args.only == "compile":
        print(json.dumps(bench_compile(args)))
        return
    if args.variant:
        result = run_bare(args, args.shards) if args.variant == "bare" else \
            run_ours(args, args.shards, args.variant == "ours_ckpt", "mae" if args.variant == "ours_mae" else "mpp")
        print(json.dumps(result))
        return
    import torch

    from pretrain.metrics import measure_peak_flops

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), 256, args.img_size)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        results = {}
        for variant in ("bare", "ours", "ours_ckpt", "ours_mae"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--shards", shards]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    peak = measure_peak_flops(torch.device(args.device)) / 1e9
    from pretrain.metrics import train_flops_per_image
    from vit import create_model

    gflops = train_flops_per_image(create_model(args.model, image_size=args.img_size)) / 1e9
    bare, ours, ckpt, mae = results["bare"], results["ours"], results["ours_ckpt"], results["ours_mae"]
    print(f"{args.model} @ {args.img_size}, MPP, batch {args.batch}, AdamW fp32, {args.device}")
    print(f"matmul peak measured now: {peak:.0f} GFLOP/s")
    print(f"  bare torch loop  {bare['images_per_s']:7.2f} img/s   peak memory {bare['peak_mb']:7.0f} MB")
    print(f"  vitpipe loop     {ours['images_per_s']:7.2f} img/s   peak memory {ours['peak_mb']:7.0f} MB  "
          f"MFU {ours['images_per_s'] * gflops / peak:.1%}")
    print(f"  + grad ckpt      {ckpt['images_per_s']:7.2f} img/s   peak memory {ckpt['peak_mb']:7.0f} MB")
    print(f"  MAE, same encoder {mae['images_per_s']:7.2f} img/s   peak memory {mae['peak_mb']:7.0f} MB  "
          f"(75% masked, decoder {' / '.join(map(str, args.mae_decoder))} width / depth / heads)")
    print(f"MAE vs MPP images/s: {mae['images_per_s'] / ours['images_per_s']:.2f}x (target >= 2.5x)")
    overhead = 1 - ours["images_per_s"] / bare["images_per_s"]
    print(f"loop overhead vs bare loop: {overhead:+.1%} (target <= 5%); ratio {ours['images_per_s'] / bare['images_per_s']:.3f}")


if __name__ == "__main__":
    main()
