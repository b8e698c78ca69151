"""Shard format, sample order, streaming loaders, decoding and transforms."""
