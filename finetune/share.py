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


def hub_token(api=None) -> str | None:
    """The token an upload through ``api`` would send: its own, else HF_TOKEN or the saved login."""
    from huggingface_hub import get_token

    return getattr(api, "token", None) or get_token()


def holds(path: Path, secret: bytes, chunk: int = 1 << 20) -> bool:
    """Whether ``secret`` occurs in the file (read in chunks that overlap by its length: one pass, O(1) memory)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if secret in tail + block:
                return True
            tail = block[-(len(secret) - 1):] if len(secret) > 1 else b""
    return False


def refuse_files_holding(token: str | None, folder: Path, repo_id: str) -> None:
    """A file about to be uploaded that holds the token would publish it: one line naming the file, never the token."""
    if not token:
        return
    for path in sorted(folder.iterdir()):
        if path.is_file() and holds(path, token.encode()):
            raise PushError(f"not uploading to {repo_id}: the exported {path.name} holds the hub token this push "
                            "uses (in the checkpoint's provenance or labels?); remove it there, then push again")


def push(ckpt: str | Path, repo_id: str, fmt: str = "vitpipe", private: bool = False, revision: str | None = None,
         dry_run: bool = False, api=None) -> list[tuple[str, int]]:
    """Upload ``ckpt`` (exported as ``fmt``) to ``repo_id``; returns [(file, bytes)] uploaded (or to upload).

    The token comes from HF_TOKEN or the usual ``huggingface-cli login``; it is never printed, and no file that
    holds it is uploaded (nor passes ``dry_run``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        notes = export_with_card(ckpt, tmp, fmt, repo_id)
        files = sorted((p.name, p.stat().st_size) for p in Path(tmp).iterdir() if p.is_file())
        if api is None and not dry_run:
            from huggingface_hub import HfApi

            api = HfApi()
        refuse_files_holding(hub_token(api), Path(tmp), repo_id)
        if dry_run:
            return files
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
