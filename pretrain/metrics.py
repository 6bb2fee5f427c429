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
from common.io import open_append, open_update, write_json
from common.redact import redacted
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
    nonfinite: int = 0  # steps whose update was skipped (train.on_nonfinite=skip): not in ``sums`` or ``steps``
    started: float = 0.0
    untimed: int = 0  # steps restored from a checkpoint: taken before ``started``

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.skipped, self.started = dict.fromkeys(self.names, 0.0), 0, 0, time.perf_counter()
        self.nonfinite = self.untimed = 0

    def state(self) -> dict:
        """What a checkpoint taken mid-window keeps, so that the resumed run logs the same line."""
        return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped, "nonfinite": self.nonfinite}

    def load(self, state: dict) -> None:
        self.sums, self.steps, self.skipped = dict(state["sums"]), state["steps"], state["skipped"]
        self.nonfinite = state.get("nonfinite", 0)
        self.untimed = self.steps + self.nonfinite

    def add(self, values: list[float]) -> None:
        for name, value in zip(self.names, values):
            self.sums[name] += value
        self.steps += 1


def log_window(run: Run, window: Window, grad_norm, bar) -> None:
    """One metrics line (jsonl + TensorBoard) averaging the steps since the last, then a fresh window."""
    taken = window.steps + window.nonfinite
    images_per_s = (taken - window.untimed) * run.cfg.data.batch_size / (time.perf_counter() - window.started)
    record = {
        "step": run.pos.step, "epoch": run.pos.epoch,
        **{m: window.sums[m] / window.steps if window.steps else None for m in run.metrics},
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images_per_s,
        "mfu": images_per_s * run.flops_per_image / (run.peak_flops * run.accelerator.num_processes),
        "skipped_samples": window.skipped,
        "nonfinite_steps": window.nonfinite,
    }
    run.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=run.pos.step)
    if run.accelerator.is_main_process:
        append_line(run.out / METRICS, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}" if window.steps else "-", lr=f"{record['lr']:.2e}")
    window.reset()


def append_line(path: Path, record: dict) -> None:
    with open_append(path) as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def record_run(out: Path, cfg: Config, stage: str, step: int) -> None:
    """The run's config.json, and its metric logs and sample records cut back to ``step`` (what a killed run logged
    past it; records of ranks a resume on fewer processes no longer has, too)."""
    for path in (out / METRICS, out / VAL_METRICS, *sorted((out / "samples").glob("rank*.jsonl"))):
        rewind_metrics(path, step)
    write_json(out / "config.json", redacted({"stage": stage, **cfg.to_dict()}))


def rewind_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines the killed run logged past its checkpoint (a torn last line too:
    it was being written when the run died, so it is past the checkpoint).

    The lines are in step order (appended as the run goes, cut back at each resume), so what goes is a tail:
    read from the end back to the first line at or before ``step``, then truncated there. The cost grows with the
    lines logged past the checkpoint, not with the run's length (a sample record holds every key trained on).
    """
    if not path.is_file():
        return
    with open_update(path) as f:
        end = f.seek(0, 2)
        cut, last = end, True
        for start, line in _lines_from_end(f, end):
            if not line.strip():
                cut = start
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if not last:
                    raise TrainingError(f"{path}:{_line_number(f, start)}: not a JSON line; fix or remove it to "
                                        "resume") from None
                record = None
            last = False
            if record is not None and record["step"] <= step:
                break
            cut = start
        # one truncate: the file is either as it was or cut back, never half-written
        f.truncate(cut)
        if cut:
            f.seek(cut - 1)
            if f.read(1) != b"\n":  # a complete last record whose newline was not written yet
                f.write(b"\n")


def _lines_from_end(f, end: int, chunk: int = 1 << 16):
    """(offset, bytes) of each line of the binary file ``f`` before byte ``end``, the last first, without its
    newline; memory bounded by the longest line."""
    head, pos = b"", end
    while pos > 0:
        size = min(chunk, pos)
        pos -= size
        f.seek(pos)
        head, *lines = (f.read(size) + head).split(b"\n")
        offset = pos + len(head) + 1
        starts = []
        for line in lines:
            starts.append(offset)
            offset += len(line) + 1
        yield from reversed(list(zip(starts, lines)))
    yield 0, head


def _line_number(f, offset: int, chunk: int = 1 << 20) -> int:
    f.seek(0)
    return sum(f.read(min(chunk, offset - at)).count(b"\n") for at in range(0, offset, chunk)) + 1


def train_flops_per_image(model: VisionTransformer) -> float:
    """Forward + backward (3x forward) FLOPs of the encoder for one image: matmuls and attention."""
    c = model.cfg
    n, d = c.num_patches + 1, c.embed_dim
    per_layer = 2 * n * (4 * d * d + 2 * d * c.mlp_dim) + 4 * n * n * d
    embed = 2 * c.num_patches * d * c.in_chans * c.patch_size**2
    return 3.0 * (c.depth * per_layer + embed)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """Best of a few timings of an n x n matmul in ``dtype`` (the run's: bf16 under bf16 autocast): the
    denominator of MFU on this device. On CUDA n is 8192 and ten matmuls are timed at once (one 2048 matmul
    is over before the launch is)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048 if dtype == torch.float32 else 512)  # bf16 on a CPU may be emulated: slow
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    repeat = 10 if cuda else 1
    best = float("inf")
    for _ in range(4):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / repeat)
    return 2 * n**3 / best
