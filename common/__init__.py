"""Shared by the four subprojects: data, meters, checkpoints, run logging, distributed helpers, published numbers."""
