"""Pipeline stages: plain functions that take typed configs and paths and write files.

Subpackages in data-flow order, each importing only those below it (tests/test_layering.py):
`config` (the typed config tree), `run` (run directory, shards), `data` (dataset and task
SPECs, calibration), `model` (models, block surgery, capture, assembly), `report`,
`prune`, `finetune`, `evaluate`, `progressive`. None of them imports Prefect, so every
stage can be called and tested on its own.
"""
