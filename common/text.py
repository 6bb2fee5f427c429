"""Words for counts, as every message writes them."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 shard``, ``0 shards``, ``2 shards``; ``nouns`` for an irregular plural."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
