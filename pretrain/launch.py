"""The processes of a launch: the accelerator (CPU, DDP, DeepSpeed), each rank's share of the batch, checks run on
the main process for every rank, and the output folder's lock."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import USER_ERRORS, Stopped
from common.lock import FolderLock
from pretrain.config import Config, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator


def threads_per_process(setting: int | None, environ: dict, cores: int) -> tuple[int, str]:
    """Torch threads for each process of a launch, and where the number came from: ``train.threads``, else
    ``OMP_NUM_THREADS``, else the cores this process may use divided by the launch's processes on this machine
    (torch alone would take every core in every process: on a busy machine 3-4x slower)."""
    if setting is not None:
        return setting, "train.threads"
    if (omp := environ.get("OMP_NUM_THREADS", "")).isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    local = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local), f"{cores} cores / {local} process{'es' if local > 1 else ''} on this machine"


def set_threads(setting: int | None) -> tuple[int, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads_per_process(setting, dict(os.environ), cores)
    torch.set_num_threads(threads[0])
    return threads


CHECKOUT = Path(__file__).resolve().parents[1]  # where configs/deepspeed/*.json ship
DEEPSPEED_CONFIG = "ACCELERATE_DEEPSPEED_CONFIG_FILE"  # accelerate launch passes deepspeed_config_file in it


def resolve_deepspeed_config(env: dict = os.environ) -> None:
    """The accelerate configs we ship name ``configs/deepspeed/*.json`` relative to the checkout: found from any
    folder (the env variable made absolute), or one line naming the file, instead of DeepSpeed's traceback."""
    path = env.get(DEEPSPEED_CONFIG)
    if not path or path == "none" or path.lstrip().startswith("{") or Path(path).is_file():
        return
    if not Path(path).is_absolute() and (CHECKOUT / path).is_file():
        env[DEEPSPEED_CONFIG] = str(CHECKOUT / path)
        return
    raise ConfigError(f"{path}: the DeepSpeed config that the accelerate config's deepspeed_config_file names does "
                      f"not exist (a relative path is looked for in {os.getcwd()} and in {CHECKOUT})")


def make_accelerator(cfg: Config, hidden: int) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cuda = torch.cuda.is_available()
    # DeepSpeed on CPU needs gloo named explicitly; plain CPU runs get it from cpu=True
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and distributed and not cuda else []
    if deepspeed:
        resolve_deepspeed_config()
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed, mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum, log_with="tensorboard",
        project_dir=cfg.train.output_dir, kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # our loaders are not passed to prepare(), so DeepSpeed is told the batch and clipping here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_rank_batch(cfg, accelerator.num_processes)
        plugin.deepspeed_config["gradient_clipping"] = cfg.optim.clip_grad_norm or 0.0
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        # what accelerate derives from a transformers model's config.hidden_size, from ours
        for key, value in (("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden),
                           ("reduce_bucket_size", hidden * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    return accelerator


def per_rank_batch(cfg: Config, world: int) -> int:
    g, a = cfg.data.batch_size, cfg.train.grad_accum
    if g % (world * a):
        raise ConfigError(f"data.batch_size: global batch {g} is not divisible by {world} processes x "
                          f"{a} accumulation steps")
    return g // (world * a)


def on_main(accelerator, check) -> object:
    """Run ``check`` on the main process only; a user error there is raised on every rank (none waits alone
    in a collective), and its result is returned on every rank."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = check()
        except USER_ERRORS as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result


@contextmanager
def launch_lock(accelerator, out: Path, stage: str):
    """One launch per output folder: its main process holds the lock for all of its ranks and machines (they
    share the folder), so only another launch is refused."""
    world = accelerator.num_processes
    lock = FolderLock(out, f"vitpipe {stage}" + (f" ({world} processes)" if world > 1 else ""))

    def take() -> None:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    on_main(accelerator, take)
    try:
        yield
    finally:
        lock.release()


class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM or SIGINT (a preemption notice, Ctrl-C) sets ``stop.received``
    for the loop to stop at the end of the step in progress; a second one ends the process at once, by the
    signal's default action. Only the process that entered the block acts: a forked DataLoader worker inherits
    the handler and ignores the signal, so a signal sent to a whole process group (Ctrl-C, SLURM) does not
    kill the workers the step in progress reads from."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.pid = os.getpid()
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return
        if self.received is None:
            self.received = signum
            return
        print(f"second {signal.Signals(signum).name}: stopping at once, without a checkpoint", file=sys.stderr)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def agreed_stop(accelerator, stop: StopSignals) -> int | None:
    """The signal any rank received, on every rank (one 1-element all-reduce per step), so that all ranks
    stop after the same step and write one checkpoint together; None to go on."""
    received = stop.received or 0
    if accelerator.num_processes > 1:
        flag = torch.tensor([received], device=accelerator.device)
        received = int(accelerator.reduce(flag, "max").item())
    return received or None


def stopped(accelerator, signum: int, step: int) -> Stopped:
    """What a run stopped by ``signum`` after ``step`` raises: the one line (main process only) and the exit
    status 128 + signal number."""
    name = signal.Signals(signum).name
    line = f"stopped at step {step} on {name}; rerun the same command to continue"
    return Stopped(line if accelerator.is_main_process else "", 128 + signum)
