"""What the process is meant to run on, said before the libraries that guess it are imported."""

from __future__ import annotations

import os


def cpu_for_deepspeed_without_a_gpu() -> None:
    """DeepSpeed (imported with accelerate) looks for a GPU and, finding none, warns in every process that it
    could not detect one. Where torch sees none (CUDA, XPU, Apple's MPS), tell it the CPU is meant, before its
    import; a ``DS_ACCELERATOR`` the user set stays."""
    import torch

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if not (torch.cuda.is_available() or xpu or torch.backends.mps.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def is_main_process() -> bool:
    """Rank 0 of a launch (``accelerate launch`` / torchrun set ``RANK``), or a plain process: once-per-launch
    messages are printed there only."""
    return os.environ.get("RANK", "0") == "0"
