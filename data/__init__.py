"""The repository's data/ folder, installed as the resource package `sparsegpt_pipeline_data` (see README.md here)."""
