"""Shared by sites and server: config schema, label space, models, local training step, metrics."""
