import logging
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random, non-zero weights everywhere (heads and norms included), so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name and name.endswith(".weight") else noise)
    return model.eval()


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 real-photo crops in 2 classes, 4 shards of 16: the small training set of the launch tests."""
    from data_tools.shard import ShardOptions, shard

    from .corpus import write_folder

    root = tmp_path_factory.mktemp("train")
    write_folder(root / "src", {"a": 32, "b": 32}, size=(40, 56))
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=16), progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def env():
    """The environment of a launched training process: one thread, this checkout on the path."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # DeepSpeed JIT-compiles ops on first use; one cache for the whole test session (and CI run)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return e


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's) on localhost for the whole session, found by the standard
    ``AWS_ENDPOINT_URL`` with throwaway credentials; nothing leaves the machine. Yields an s3fs filesystem."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


S3_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "vitpipe-test-key",
          "AWS_SECRET_ACCESS_KEY": "vitpipe-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
