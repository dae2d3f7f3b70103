"""Config of the training stage (`train:` in a recipe)."""

from __future__ import annotations

from core.schema import Section


class TrainConfig(Section):
    data_dir: str | None = None
    """Curated data folder (shards/, tokenizer/, manifest.json); defaults to the curate stage's output."""
    output: str | None = None
    """Output folder (checkpoints live under storage_path, export/ and manifest.json here); defaults to <run_dir>/train."""
