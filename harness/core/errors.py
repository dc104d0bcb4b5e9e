"""Errors the CLI turns into exit code 2 (bad input or usage)."""
from __future__ import annotations


class InputError(Exception):
    """Bad input: a file, key or argument the user gave is wrong.

    The message must name the file, key or argument at fault.
    """

    exit_code = 2
