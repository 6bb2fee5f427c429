"""Training-step throughput of our ViT vs timm's VisionTransformer of the same configuration.

Each model runs in its own fresh process (so peak memory is its own), with the same batch,
threads, optimizer and inputs; the script prints images/s, the ratio ours/timm, peak memory and
achieved GFLOP/s against a matmul peak measured in the same run.

    python bench/model.py [--model vit_s16] [--img-size 224] [--batch 8] [--steps 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(which: str, name: str, img_size: int) -> torch.nn.Module:
    from vit import create_model

    ours = create_model(name, image_size=img_size, num_classes=1000)
    if which == "ours":
        return ours
    import timm

    c = ours.cfg
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_dim / c.embed_dim, num_classes=1000)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_flops(model, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_one(which: str, args) -> dict:
    torch.manual_seed(0)
    model = build(which, args.model, args.img_size).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    flops = train_flops(model, x, y)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(args.device)
    best = float("inf")
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        best = min(best, (time.perf_counter() - t) / args.steps)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": args.batch / best, "step_s": best, "gflops": flops / best / 1e9, "peak_mb": peak_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_s16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per model, alternating")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", choices=["ours", "timm"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    child = list(sys.argv[1:])
    results = {}
    for _ in range(args.repeats):  # alternate fresh processes, keep each one's best: the machine drifts
        for which in ("timm", "ours"):
            out = subprocess.run([sys.executable, __file__, *child, "--threads", str(args.threads), "--only", which],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if which not in results or r["images_per_s"] > results[which]["images_per_s"]:
                results[which] = r
    from pretrain.metrics import measure_peak_flops

    peak = measure_peak_flops(torch.device(args.device)) / 1e9
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads} threads"
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, AdamW fp32, fwd+bwd+step, {device}")
    print(f"matmul peak (fp32, measured now): {peak:.1f} GFLOP/s")
    for which, r in results.items():
        print(f"  {which:5s} {r['images_per_s']:8.2f} img/s  {r['gflops']:7.1f} GFLOP/s ({r['gflops'] / peak:5.1%} of peak)"
              f"  peak memory {r['peak_mb']:8.0f} MB")
    ratio = results["ours"]["images_per_s"] / results["timm"]["images_per_s"]
    print(f"ratio ours/timm images/s: {ratio:.3f} (target >= 1.0)")


if __name__ == "__main__":
    main()
