import importlib
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT, S3_ENV, deepspeed_args, free_port, launch, launch_env, pretrain_cmd

MAINS = {"pretrain": "pretrain.run", "finetune": "finetune.run", "vitpipe": "vitpipe.cli"}


@pytest.fixture(scope="session")
def env():
    return launch_env()


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """64 real-photo crops in 2 classes, 4 shards of 16: the small training set of the launch tests."""
    from data_tools.shard import ShardOptions, shard

    from .corpus import write_folder

    root = tmp_path_factory.mktemp("train")
    write_folder(root / "src", {"a": 32, "b": 32}, size=(40, 56))
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=16), progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def deepspeed_run(shards, env, tmp_path_factory):
    """``deepspeed_run(zero, dest)`` copies to ``dest`` a 2-process ZeRO-``zero`` run of 3 steps on ``shards``,
    checkpointed at step 3, for a test to resume or tamper with. Each stage is launched once per session:
    DeepSpeed launches are the slowest thing in this suite."""
    made = {}

    def copy(zero: int, dest):
        if zero not in made:
            out = tmp_path_factory.mktemp(f"zero{zero}") / "run"
            res = launch(pretrain_cmd(*deepspeed_args(shards, out), "train.max_steps=3",
                                      launcher=f"deepspeed_zero{zero}.yaml"), env, timeout=900)
            assert res.returncode == 0, res.stderr[-3000:]
            made[zero] = out
        shutil.copytree(made[zero], dest)
        return dest

    return copy


@pytest.fixture
def run_here(capfd, monkeypatch):
    """``python -m pretrain|finetune|vitpipe ARGS`` as that module's ``main(ARGS)`` in this process, for tests
    where no process boundary is under test: a CompletedProcess with the exit code and everything written to
    file descriptors 1 and 2 (so also what a library writes past sys.stderr)."""
    monkeypatch.chdir(ROOT)

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        assert cmd[:2] == [sys.executable, "-m"], cmd
        main = importlib.import_module(MAINS[cmd[2]]).main
        capfd.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a launched process (helpers.launch_env)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # which a run reads for its threads (train.threads unset)
        try:
            code = main(cmd[3:])
        except SystemExit as e:  # argparse: --help, or a usage error
            code = e.code
        finally:
            torch.set_num_threads(threads)
            _forget_accelerate_state()
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(cmd, code, out, err)

    return run


def _forget_accelerate_state():
    """Accelerate keeps its process state in singletons: the next run in this process starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's) on localhost for the whole session, found by the standard
    ``AWS_ENDPOINT_URL`` with throwaway credentials; nothing leaves the machine. Yields an s3fs filesystem."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in S3_ENV.items():
            mp.setenv(key, value.format(port=port))
        mp.delenv("AWS_PROFILE", raising=False)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield s3fs.S3FileSystem()
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
