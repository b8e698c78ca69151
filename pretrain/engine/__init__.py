"""Distributed execution: process groups and the DeepSpeed engine."""
