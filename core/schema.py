"""The base class of every config section, and the field types every section builds on.

Sections live next to the code that reads them (pipelines/config.py, training/config.py, ...) and are
assembled into one tree by core/config.py. Every field carries a one-line docstring, which pydantic
keeps as its description, so `raylm check RECIPE --explain` and error messages can show it.

Numbers, switches and paths use the types below rather than bare `int` / `float` / `bool` / `str`:
pydantic's lax mode would otherwise take `true` as 1, `1` or `"yes"` as a switch, `.nan` as a learning
rate and `ftp://...` as a path, and each of those would only fail (or silently misbehave) deep inside a
Ray job. Each numeric field also states the range that makes sense for it (`Field(ge=..., le=...)`).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's default_rng, torch.manual_seed and random.seed all take 0..2**32-1
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; object store keys are shorter still

# Schemes that pyarrow.fs opens (core/storage.py reads every path through it). file:// is turned into
# a plain local path by core/config.py.
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def reject_bool(value: Any) -> Any:
    # bool is a subclass of int, so lax mode would read `true` as 1 (and `false` as a seed of 0).
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def absolute(path: str) -> str:
    """An absolute local path (~ expanded); file:// URIs become local paths, other URIs (s3://bucket/x)
    and builtin sources are returned unchanged. Stages, Ray workers (which run in other working
    directories) and transformers' from_pretrained then all see one form, resolved against the directory
    the command was started in."""
    if path.lower().startswith("file://"):
        path = unquote(urlsplit(path).path)
    elif "://" in path or path.startswith("builtin:"):
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_path(value: str) -> str:
    """A local path, or a URI whose scheme pyarrow.fs can open; raises ValueError otherwise."""
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL character")
    match = _SCHEME.match(value)
    if match is None:
        return value  # a local path
    scheme, rest = match.group(1).lower(), value[match.end() :]
    if scheme not in URI_SCHEMES:
        supported = ", ".join(f"{s}://" for s in URI_SCHEMES)
        raise ValueError(f"unsupported URI scheme '{scheme}://' (use a local path or {supported})")
    if scheme == "file":
        if not rest.startswith("/") and not rest.startswith("localhost/"):
            raise ValueError("a file:// URI needs an absolute local path (file:///path/to/x)")
    elif not rest.split("/", 1)[0]:
        raise ValueError(f"a {scheme}:// URI needs a bucket or host after '{scheme}://'")
    return value


Int = Annotated[int, BeforeValidator(reject_bool), Field(ge=INT64_MIN, le=INT64_MAX)]
"""An integer that fits the int64 every library stores it in; booleans are refused."""
Float = Annotated[float, BeforeValidator(reject_bool)]
"""A finite float (Section sets allow_inf_nan=False); integers are accepted, booleans are refused."""
Bool = Annotated[bool, Strict()]
"""true or false only: 1, "yes" or "on" as a quoted string are refused."""
Seed = Annotated[Int, Field(ge=0, le=SEED_MAX)]
"""A random seed in the range numpy, torch and random all accept."""
Fraction = Annotated[Float, Field(ge=0, le=1)]
"""A share of something, 0 to 1."""
PathOrUri = Annotated[
    str, Field(max_length=MAX_PATH_CHARS), AfterValidator(check_path), AfterValidator(absolute)
]
"""A local path (made absolute) or a URI pyarrow.fs opens (s3://, gs://, gcs://, hdfs://, abfs://, ...)."""


class Section(BaseModel):
    """A strict config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
        # NaN passes every `ge` / `le` check (all comparisons with it are false) and inf passes `gt=0`.
        allow_inf_nan=False,
    )
