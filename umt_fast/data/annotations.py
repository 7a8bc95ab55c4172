"""Annotation lists: one video per line, as the reference writes them.

Accepted line forms (a path may itself contain spaces and commas):
    path,label        the reference's CSV form
    path label        the space-separated form
    path              no label
The label is split off from the right, once. A `path,label` header is allowed as the
first entry; blank lines and lines starting with '#' are skipped.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["VideoRecord", "read_annotation_list"]

_INT_RE = re.compile(r"[+-]?\d+")
_HEADERS = ("path,label", "pathlabel")


@dataclass(frozen=True)
class VideoRecord:
    """One video of an annotation list. `label` is None when the line has none."""

    path: str
    label: int | None


def _split_line(line: str) -> tuple[str, int | None]:
    """Split `line` (already stripped) into (path, label) from the right, once."""
    head, comma, tail = line.rpartition(",")
    if comma and _INT_RE.fullmatch(tail.strip()):
        return head.strip(), int(tail)
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and _INT_RE.fullmatch(parts[1]):
        return parts[0].strip(), int(parts[1])
    return line, None


def read_annotation_list(list_path: str, root: str = "") -> list[VideoRecord]:
    """Read an annotation list into records, in file order.

    Args:
        list_path: the list file (UTF-8; a byte-order mark is tolerated).
        root: prefixed (os.path.join) to every relative path when non-empty.

    Raises:
        FileNotFoundError: `list_path` does not exist.
        ValueError: a malformed line (named by file and 1-based line number), a file
            that is not UTF-8 text, or a list without any entry.
    """
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"annotation list not found: {list_path!r}")
    try:
        with open(list_path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{list_path}: annotation list is not UTF-8 text ({e})") from e

    records = []
    seen_entry = False
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        is_first_entry = not seen_entry
        seen_entry = True
        if is_first_entry and re.sub(r"\s+", "", line).lower() in _HEADERS:
            continue
        path, label = _split_line(line)
        if not path:
            raise ValueError(f"{list_path}:{line_no}: empty video path in line {raw!r}")
        if root and not os.path.isabs(path):
            path = os.path.join(root, path)
        records.append(VideoRecord(path=path, label=label))

    if not records:
        raise ValueError(f"{list_path}: annotation list has no video entries")
    return records
