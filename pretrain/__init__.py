"""Pretraining library: models, data, engine, checkpoints, trainer."""
