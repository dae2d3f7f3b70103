"""Config of the serving stage (`serve:` in a recipe)."""

from __future__ import annotations

from core.schema import Section


class ServeConfig(Section):
    model: str | None = None
    """Local path of the HF model to serve; defaults to the train stage's export/."""
