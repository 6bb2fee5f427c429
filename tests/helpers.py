"""What the tests share besides fixtures: paths, the stages run in this process or launched, random weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")
TINY_MAE = str(ROOT / "configs" / "pretrain" / "tiny_mae.yaml")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random, non-zero weights everywhere (heads and norms included), so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name and name.endswith(".weight") else noise)
    return model.eval()


def poison_weights_at(monkeypatch, step):
    """The optimizer's ``step``-th update leaves a NaN in the first weight (what an overflowing update does):
    the loss of that step was finite, the next one's is not."""
    import pretrain.loop

    real = pretrain.loop.build_optimizer

    def build(cfg, task, **kwargs):
        optimizer = real(cfg, task, **kwargs)
        update, calls = optimizer.step, []

        def step(*args, **kwargs):
            result = update(*args, **kwargs)
            calls.append(1)
            if len(calls) == step_at:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
            return result

        optimizer.step = step
        return optimizer

    step_at = step
    monkeypatch.setattr(pretrain.loop, "build_optimizer", build)


def launch_env() -> dict[str, str]:
    """The environment of a launched process: one thread, this checkout on the path, this venv's scripts
    (``vitpipe``) first on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # DeepSpeed JIT-compiles ops on first use; one cache for the whole test session (and CI run)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def launch(cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """A command in its own process, from the checkout's root, its output captured as text."""
    return subprocess.run(cmd, env=env or launch_env(), capture_output=True, text=True, cwd=ROOT, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str | Path) -> list[str]:
    """``accelerate launch`` with a launch config, on a free port: launches running side by side (pytest-xdist,
    another checkout's tests) would otherwise meet on the config's fixed port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port())]


def pretrain_cmd(*overrides: str, config: str = TINY, launcher: str | None = None) -> list[str]:
    """``python -m pretrain`` (or under ``accelerate launch --config_file configs/accelerate/LAUNCHER``)."""
    head = [sys.executable] if launcher is None else accelerate_launch(ROOT / "configs" / "accelerate" / launcher)
    return [*head, "-m", "pretrain", "--config", config, *overrides]


def finetune_cmd(*overrides: str, config: str = "tiny.yaml") -> list[str]:
    return [sys.executable, "-m", "finetune", "--config", str(ROOT / "configs" / "finetune" / config), *overrides]


def vitpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitpipe", *args]


def deepspeed_args(shards: Path, out: Path) -> list[str]:
    """The DeepSpeed tests' run: checkpointed at step 3 (see the deepspeed_run fixture)."""
    return [f"data.train={shards}", f"train.output_dir={out}", "train.checkpoint_every=3", "data.workers=0"]


# the s3 fixture's server and throwaway credentials, found through the standard variables alone
S3_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "vitpipe-test-key",
          "AWS_SECRET_ACCESS_KEY": "vitpipe-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
