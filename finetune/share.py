"""``vitpipe push``: export a checkpoint and upload it to the Hugging Face hub."""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors import SafetensorError

from common.disk import free_space
from common.errors import VitpipeError
from finetune.evaluate import load_report
from vit import export_checkpoint, load_model, nonfinite_parameters


class PushError(VitpipeError, RuntimeError):
    """The upload failed; one line, never the token."""


class ExportError(VitpipeError, ValueError):
    """A model that should not be shared as it is, or an export that could not be written; one line."""


def export_with_card(ckpt: str | Path, out: str | Path, fmt: str, repo: str = "REPO_ID",
                     force: bool = False) -> list[str]:
    """Export ``ckpt`` to ``out``; a model with NaN or inf weights is refused unless ``force``."""
    model, info = load_model(ckpt)
    if (bad := nonfinite_parameters(model)) and not force:
        raise ExportError(f"{ckpt}: the model's weights hold NaN or inf ({', '.join(bad[:3])}"
                          f"{' ...' if len(bad) > 3 else ''}); refusing to share it (--force to export it anyway)")
    try:
        return export_checkpoint(model, info, out, fmt, metrics=load_report(ckpt), repo=repo)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        raise ExportError(f"{out}: cannot write the export ({_reason(e)}; {free_space(out)})") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_repo_id(repo_id: str) -> None:
    """The hub's own rules (huggingface_hub's validator), checked before anything is exported: a dry run too."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--repo-id: {repo_id!r} is not a hub repository id ({str(e).split(':')[0]})") from None


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
         dry_run: bool = False, api=None, force: bool = False) -> list[tuple[str, int]]:
    """Upload ``ckpt`` (exported as ``fmt``) to ``repo_id``; returns [(file, bytes)] uploaded (or to upload).

    The token comes from HF_TOKEN or the usual ``huggingface-cli login``; it is never printed, and no file that
    holds it is uploaded (nor passes ``dry_run``).
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        notes = export_with_card(ckpt, tmp, fmt, repo_id, force=force)
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
