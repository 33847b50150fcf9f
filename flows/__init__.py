"""Prefect flows that wire the stages, and the `sparsegpt` command line."""
