"""Corpus readers, image checks, the shard writer and index, verify / inspect, the streaming loader."""
