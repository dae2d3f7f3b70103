"""The base class of every config section.

Sections live next to the code that reads them (pipelines/config.py, training/config.py, ...) and are
assembled into one tree by core/config.py. Every field carries a one-line docstring, which pydantic
keeps as its description, so `raylm check RECIPE --explain` and error messages can show it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
    )
