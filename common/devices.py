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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes in its torch.distributed group; (0, 1) outside one."""
    import torch

    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def is_main_process() -> bool:
    """Rank 0 of a launch (``accelerate launch`` / torchrun set ``RANK``, read before the group is set up), or a
    plain process: once-per-launch messages are printed there only."""
    return os.environ.get("RANK", "0") == "0"
