"""No secret leaves the machine: a token in a shard URL is masked in everything vitpipe writes, and push refuses
to upload a file that holds the token it uploads with."""

import json
from pathlib import Path

import pytest

from finetune.share import PushError, push
from vit import ModelInfo, create_model, save_checkpoint

from .helpers import pretrain_cmd, randomize, vitpipe_cmd

HF_SECRET = "hf_QwErTyUiOpAsDfGhJkLzXcVbNm123456"
AWS_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
PLAIN_SECRET = "opensesame-4711"  # no recognisable shape: masked only where it follows a credential word


def _scan(root: Path, secrets: list[str]) -> list[str]:
    """Every file under ``root`` (binary ones too: TensorBoard events, safetensors headers) that holds a secret."""
    return [f"{p}: {s}" for p in sorted(root.rglob("*")) if p.is_file() for s in secrets
            if s.encode() in p.read_bytes()]


class RecordingApi:
    """The hub, out of reach here: records what an upload would publish."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kw):
        pass

    def upload_folder(self, folder_path, repo_id, **kw):
        self.uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})


def test_a_token_in_a_pipe_url_is_in_no_written_or_pushed_file(shards, tmp_path, run_here, monkeypatch):
    tars = sorted(shards.glob("*.tar"))[:2]
    urls = [f"pipe:HF_TOKEN={HF_SECRET} cat {tars[0]} # Authorization: Bearer {HF_SECRET}",
            f"pipe:AWS_SECRET_ACCESS_KEY={AWS_SECRET} cat {tars[1]} --api-key='{PLAIN_SECRET}' 2>/dev/null || "
            f"cat {tars[1]}"]
    run = tmp_path / "run"
    res = run_here(pretrain_cmd(f"data.train={json.dumps(urls)}", "data.num_samples=32", "train.max_steps=2",
                                "train.checkpoint_every=2", f"train.output_dir={run}"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["data"]["train"][0] == \
        f"pipe:HF_TOKEN=*** cat {tars[0]} # Authorization: ***"  # still says where the data came from
    for fmt in ("vitpipe", "timm", "transformers"):
        res = run_here(vitpipe_cmd("export", str(run / "final"), str(tmp_path / "export" / fmt), "--format", fmt))
        assert res.returncode == 0, res.stderr[-2000:]
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    res = run_here(vitpipe_cmd("push", str(run / "final"), "--repo-id", "team/vit", "--dry-run"))
    assert res.returncode == 0 and "would upload README.md" in res.stdout, res.stderr[-2000:]
    api = RecordingApi()
    push(run / "final", "team/vit", "transformers", api=api)
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in api.uploaded.items():
        (pushed / name).write_bytes(data)
    assert len(api.uploaded) == 4 and len(list((run / "checkpoints").rglob("*.json"))) >= 3
    assert _scan(tmp_path, [HF_SECRET, AWS_SECRET, PLAIN_SECRET]) == []
    # the run resumes from its redacted record: the same URLs are the same recipe
    res = run_here(pretrain_cmd(f"data.train={json.dumps(urls)}", "data.num_samples=32", "train.max_steps=4",
                                "train.checkpoint_every=2", f"train.output_dir={run}"))
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr, res.stderr[-2000:]


def test_an_error_line_masks_the_secret_in_the_url(tmp_path, run_here):
    res = run_here(pretrain_cmd(f"data.train=https://alice:{PLAIN_SECRET}@example.invalid/shards/",
                                f"train.output_dir={tmp_path}"))
    assert res.returncode == 2 and "alice:***@example.invalid" not in res.stderr
    assert PLAIN_SECRET not in res.stdout + res.stderr and "https://***@example.invalid" in res.stderr


@pytest.fixture
def leaky_checkpoint(tmp_path):
    """A checkpoint (as an older vitpipe, or a careless hand, wrote it) whose labels hold a token of no known shape."""
    model = randomize(create_model("vit_ti8", image_size=16, depth=1, embed_dim=24, num_heads=2, mlp_dim=48,
                                   num_classes=2))
    return save_checkpoint(model, tmp_path / "leaky", ModelInfo(labels=["cat", PLAIN_SECRET]))


def test_push_refuses_a_file_that_holds_its_token(leaky_checkpoint, run_here, monkeypatch):
    api = RecordingApi(token=PLAIN_SECRET)
    with pytest.raises(PushError, match="the exported README.md holds the hub token this push uses"):
        push(leaky_checkpoint, "team/vit", "transformers", api=api)
    assert api.uploaded == {}
    assert push(leaky_checkpoint, "team/vit", "transformers", api=RecordingApi(token="another-token"))
    monkeypatch.setenv("HF_TOKEN", PLAIN_SECRET)
    res = run_here(vitpipe_cmd("push", str(leaky_checkpoint), "--repo-id", "team/vit", "--dry-run"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "holds the hub token" in res.stderr and PLAIN_SECRET not in res.stderr + res.stdout
