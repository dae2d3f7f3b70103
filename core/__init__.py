"""raylm's small shared kernel: typed config, CLI, storage, lineage, metrics, Ray session."""

__version__ = "0.1.0"
