"""Versioned SQL for the PostgreSQL authority: ``NNN_name.sql`` applied in order."""

from __future__ import annotations

from importlib import resources

#: The schema version this kansas needs.
SCHEMA_VERSION = 1


def schema_files() -> list[tuple[int, str]]:
    """(version, SQL) of every migration shipped, in order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)
