"""Sweeps: a grid of one-shot runs under one run root (`stages.sweep.config`), and what they did (`.summary`)."""
