"""``vitpipe push``: export a checkpoint and upload it to the Hugging Face hub."""

from __future__ import annotations

import tempfile
from pathlib import Path

from common.errors import VitpipeError
from finetune.evaluate import load_report
from vit import export_checkpoint, load_model


class PushError(VitpipeError, RuntimeError):
    """The upload failed; one line, never the token."""


def export_with_card(ckpt: str | Path, out: str | Path, fmt: str, repo: str = "REPO_ID") -> list[str]:
    model, info = load_model(ckpt)
    return export_checkpoint(model, info, out, fmt, metrics=load_report(ckpt), repo=repo)


def push(ckpt: str | Path, repo_id: str, fmt: str = "vitpipe", private: bool = False, revision: str | None = None,
         dry_run: bool = False, api=None) -> list[tuple[str, int]]:
    """Upload ``ckpt`` (exported as ``fmt``) to ``repo_id``; returns [(file, bytes)] uploaded (or to upload).

    The token comes from HF_TOKEN or the usual ``huggingface-cli login``; it is never printed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        notes = export_with_card(ckpt, tmp, fmt, repo_id)
        files = sorted((p.name, p.stat().st_size) for p in Path(tmp).iterdir() if p.is_file())
        if dry_run:
            return files
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision,
                              commit_message=f"Upload {fmt} export from vitpipe" + (f" ({notes[0]})" if notes else ""))
        except Exception as e:  # network, auth and hub errors all end the same way for the user
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PushError(f"upload to {repo_id} failed: {type(e).__name__}: {msg}") from None
        return files
