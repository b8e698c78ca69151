"""Offline data tools: synthetic data, shard building, verification, inspection."""
