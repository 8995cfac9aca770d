"""Checks of what a mode will write, made before anything is loaded or computed: a path that cannot
be written fails at once, naming it, instead of after the work."""

from __future__ import annotations

import os


def check_output_folder(path: str, what: str) -> None:
    """NotADirectoryError or PermissionError, naming `what` (e.g. "the attention maps"), when `path`
    cannot be a folder we write into: it, or the nearest part of it that exists, is a file or is
    not writable. A folder that does not exist yet is fine (it will be made)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "it is a file" if existing == os.path.abspath(path) else f"{existing} is a file"
        raise NotADirectoryError(f"cannot write {what} into the folder {path}: {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {what} into the folder {path}: {existing} is not writable")


def check_output_file(path: str, what: str) -> None:
    """IsADirectoryError, NotADirectoryError or PermissionError, naming `what`, when `path` cannot
    be written as a file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} to {path}: it is a folder; expected a file name")
    check_output_folder(os.path.dirname(os.path.abspath(path)), what)
