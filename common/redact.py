"""Secrets out of everything vitpipe records: a shard URL often carries one (``https://user:pass@host``,
``s3://KEY:SECRET@bucket``, a presigned ``?X-Amz-Signature=``, ``pipe:curl -H 'Authorization: Bearer hf_...'``),
and configs, model cards, indexes and error lines copy the URL. ``redact`` replaces each secret with ``***`` and
leaves the rest readable, so the record still says where the data came from.

Over-redacting is the safe side: a harmless ``AWS_REGION=...`` or ``monkey=...`` loses its value too.
"""

from __future__ import annotations

import re

MASK = "***"

# a word that marks the value after it as a secret (inside a longer name too: HF_TOKEN, X-Amz-Security-Token)
_WORD = r"(?:token|secret|passw(?:or)?d|pwd|key|credential|auth|signature|sig|session|cookie)"
_NAME = rf"[\w.-]*{_WORD}[\w.-]*"
# a value: quoted (to its closing quote, spaces and all) or a bare word (to a space, '&', ';' or '#')
_VALUE = r"""(?:(?<=')[^']*'|(?<=")[^"]*"|(?<!['"])[^\s&;#'"]+)"""

_PATTERNS: list[tuple[re.Pattern, str]] = [
    # scheme://user:pass@host or scheme://token@host (a password may hold '/': up to the first '@')
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/@'\"]*:[^\s@'\"]*@", re.I), rf"\g<scheme>{MASK}@"),
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/:@'\"]+@", re.I), rf"\g<scheme>{MASK}@"),
    # a header: 'Authorization: Bearer X', 'X-Api-Key: X', 'Cookie: X' (the scheme word goes too), to the closing
    # quote or the end of the line (a value may hold spaces and '; '); not an error's name (NoCredentialsError: ...)
    (re.compile(rf"(?P<name>\b(?:authorization|{_NAME})(?<!error)(?<!exception)(?<!warning)\s*:\s*)(?!\*\*\*)[^\s'\"][^'\"\n]*", re.I),
     rf"\g<name>{MASK}"),
    (re.compile(r"\b(?P<name>bearer|basic)\s+(?!\*\*\*)[^\s'\"]+", re.I), rf"\g<name> {MASK}"),
    # NAME=value: environment variables, query parameters, --flag=value
    (re.compile(rf"(?P<name>\b(?:AWS_\w+|{_NAME})=)(?P<q>['\"]?){_VALUE}", re.I), rf"\g<name>\g<q>{MASK}\g<q>"),
    # --flag value, and curl's -u / --user user:pass
    (re.compile(rf"(?<![\w-])(?P<name>--{_NAME}|-u|--user)(?P<gap>\s+)(?P<q>['\"]?)(?!-){_VALUE}", re.I),
     rf"\g<name>\g<gap>\g<q>{MASK}\g<q>"),
    # tokens recognisable by their shape alone: Hugging Face, GitHub, GitLab, AWS key ids, OpenAI, Slack, JWTs
    (re.compile(r"\b(?:hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_\w{16,}|glpat-[\w-]{16,}"
                r"|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[\w-]{16,}|xox[abpr]-[\w-]{10,}"
                r"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+)"), MASK),
]


def redact(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``***`` (idempotent)."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redacted(obj):
    """``redact`` applied to every string in a JSON-like value (dict keys stay)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redacted(v) for v in obj]
    return obj
