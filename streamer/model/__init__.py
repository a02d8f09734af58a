"""Autoencoder models: presets, scaling, training and checkpoints (torch)."""
