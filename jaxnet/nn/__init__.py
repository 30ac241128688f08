"""Layers and their composition."""
