"""What a run reports: a window of steps averaged into one metrics line (jsonl + TensorBoard), the metric files
cut back to a resumed step, and the FLOP counts behind MFU."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import TrainingError
from common.io import atomic_path, write_json
from pretrain.config import Config
from vit import VisionTransformer

if TYPE_CHECKING:
    from pretrain.loop import Run

METRICS, VAL_METRICS = "metrics.jsonl", "val_metrics.jsonl"


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line."""

    names: tuple[str, ...]
    sums: dict = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    started: float = 0.0
    untimed: int = 0  # steps restored from a checkpoint: taken before ``started``

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.skipped, self.started = dict.fromkeys(self.names, 0.0), 0, 0, time.perf_counter()
        self.untimed = 0

    def state(self) -> dict:
        """What a checkpoint taken mid-window keeps, so that the resumed run logs the same line."""
        return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped}

    def load(self, state: dict) -> None:
        self.sums, self.steps, self.skipped = dict(state["sums"]), state["steps"], state["skipped"]
        self.untimed = self.steps

    def add(self, values: list[float]) -> None:
        for name, value in zip(self.names, values):
            self.sums[name] += value
        self.steps += 1


def log_window(run: Run, window: Window, grad_norm, bar) -> None:
    """One metrics line (jsonl + TensorBoard) averaging the steps since the last, then a fresh window."""
    images_per_s = (window.steps - window.untimed) * run.cfg.data.batch_size / (time.perf_counter() - window.started)
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
        append_line(run.out / METRICS, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    window.reset()


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def record_run(out: Path, cfg: Config, stage: str, step: int) -> None:
    """The run's config.json, and its metric logs cut back to ``step`` (what a killed run logged past it)."""
    rewind_metrics(out / METRICS, step)
    rewind_metrics(out / VAL_METRICS, step)
    write_json(out / "config.json", {"stage": stage, **cfg.to_dict()})


def rewind_metrics(path: Path, step: int) -> None:
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
