"""Errors that end a command with a clear message and a chosen exit code, never a traceback."""

from __future__ import annotations


class RaylmError(Exception):
    """A failure the user can fix; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class ConfigError(RaylmError):
    """A bad recipe, override or input path: found before Ray starts, exit code 2."""

    exit_code = 2


class InputError(ConfigError):
    """Input that cannot be used at all (a missing path, an empty corpus): exit code 2."""
