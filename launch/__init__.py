"""Launchers: local multi-process, Cloud TPU pods, SLURM GPU clusters, and the AOT compile check."""
