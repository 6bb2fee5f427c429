"""Seeds derived from names, not drawn from a generator: a run resumed at any step draws what it would have."""

from __future__ import annotations

import hashlib


def seed_for(*parts) -> int:
    """A 64-bit seed that depends only on ``parts`` (e.g. ``("shuffle", seed, epoch, rank)``), the same in every
    process and every Python (``hash()`` of a string is not)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def torch_seed(*parts) -> int:
    """``seed_for`` below 2**63, as the training loop has always seeded torch's generators: kept so that published
    results reproduce and checkpoints written before resume bit-exactly."""
    return seed_for(*parts) % 2**63
