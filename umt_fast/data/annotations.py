"""Annotation lists, in the reference's two formats.

Text lists (stage 1 and fine-tuning): one video per line; a path may itself contain spaces
and commas:
    path,label        the reference's CSV form
    path label        the space-separated form
    path              no label
The label is split off from the right, once. A `path,label` header is allowed as the
first entry; blank lines and lines starting with '#' are skipped.

JSON lists (stage 2, a file ending in .json): a list of objects
    {"video": path, "caption": "a caption" | ["caption", ...]}
    {"image": path, "caption": ...}

A shard set's ``manifest.json`` (``python -m umt_fast.prepare shard``) reads as the list it was
made from (`umt_fast.data.shards`). Lists, manifests and videos may be fsspec URLs (``s3://``,
``gs://``, ``http(s)://``, ``file://``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

__all__ = ["VideoRecord", "check_labels", "read_annotation_list", "read_labelled_list"]

_INT_RE = re.compile(r"[+-]?\d+")
_HEADERS = ("path,label", "pathlabel")


@dataclass(frozen=True)
class VideoRecord:
    """One entry of an annotation list.

    Attributes:
        path: the video (or image) file, joined to the list's root when relative.
        label: the class label; None when the entry has none (always for JSON lists).
        captions: the entry's captions (JSON lists), else empty.
        media: "video", or "image" for a JSON entry given by "image".
        line: the entry's 1-based line in a text list (0 when unknown).
        text: the line as written (for messages).
    """

    path: str
    label: int | None
    captions: tuple[str, ...] = ()
    media: str = "video"
    line: int = field(default=0, compare=False)
    text: str = field(default="", compare=False)


def _split_line(line: str) -> tuple[str, int | None]:
    """Split `line` (already stripped) into (path, label) from the right, once."""
    head, comma, tail = line.rpartition(",")
    if comma and _INT_RE.fullmatch(tail.strip()):
        return head.strip(), int(tail)
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and _INT_RE.fullmatch(parts[1]):
        return parts[0].strip(), int(parts[1])
    return line, None


def _join(root: str, path: str) -> str:
    return os.path.join(root, path) if root and not os.path.isabs(path) else path


def _read_json_list(list_path: str, text: str, root: str) -> list[VideoRecord]:
    """The records of a stage-2 JSON list; errors name the entry's 0-based index."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{list_path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise ValueError(f"{list_path}: a JSON annotation list must be a list of objects, got {type(entries).__name__}")
    records = []
    for i, entry in enumerate(entries):
        where = f"{list_path}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with \"video\" or \"image\" and \"caption\", got {entry!r:.80}")
        media = [key for key in ("video", "image") if key in entry]
        if len(media) != 1:
            raise ValueError(f"{where}: needs exactly one of \"video\" or \"image\", has keys {sorted(entry)}")
        path = entry[media[0]]
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where}: \"{media[0]}\" must be a non-empty path string, got {path!r:.80}")
        if "caption" not in entry:
            raise ValueError(f"{where}: missing \"caption\"")
        caption = entry["caption"]
        captions = (caption,) if isinstance(caption, str) else caption
        if (
            not isinstance(captions, (list, tuple))
            or not captions
            or not all(isinstance(c, str) and c.strip() for c in captions)
        ):
            raise ValueError(
                f"{where}: \"caption\" must be a non-empty string or a non-empty list of them, got {caption!r:.80}"
            )
        records.append(VideoRecord(_join(root, path.strip()), None, tuple(captions), media[0]))
    return records


def read_annotation_list(list_path: str, root: str = "") -> list[VideoRecord]:
    """Read an annotation list into records, in file order.

    A file whose name ends in .json is read as a stage-2 JSON list, anything else as a
    text list (see the module docstring).

    Args:
        list_path: the list file (UTF-8; a byte-order mark is tolerated).
        root: prefixed (os.path.join) to every relative path when non-empty.

    Raises:
        FileNotFoundError: `list_path` does not exist.
        ValueError: a malformed line (named by file and 1-based line number) or JSON entry
            (named by file and 0-based entry index), a file that is not UTF-8 text, or a
            list without any entry.
    """
    from umt_fast.data.storage import is_url, read_all

    if is_url(list_path):
        from umt_fast.data.decoding import VideoDecodeError

        try:
            raw = read_all(list_path)
        except VideoDecodeError as e:
            raise FileNotFoundError(f"annotation list {list_path!r}: {e.reason}") from None
    elif not os.path.isfile(list_path):
        raise FileNotFoundError(f"annotation list not found: {list_path!r}")
    else:
        with open(list_path, "rb") as f:
            raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{list_path}: annotation list is not UTF-8 text ({e})") from e
    if list_path.lower().endswith(".json"):
        from umt_fast.data.shards import is_shard_manifest, read_shard_manifest

        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if is_shard_manifest(parsed):
            return read_shard_manifest(list_path, parsed)
        records = _read_json_list(list_path, text, root)
        if not records:
            raise ValueError(f"{list_path}: annotation list has no entries")
        return records
    lines = text.splitlines()

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
        records.append(VideoRecord(path=_join(root, path), label=label, line=line_no, text=line))

    if not records:
        raise ValueError(f"{list_path}: annotation list has no video entries")
    return records


def read_labelled_list(list_path: str, root: str = "", num_classes: int | None = None,
                       what: str = "annotation list") -> list[VideoRecord]:  # fmt: skip
    """`read_annotation_list` for a list whose every line needs a label: an integer in
    [0, num_classes) (num_classes None: any label >= 0). ValueError naming the file and the line
    of the first line without one, or with one out of range."""
    records = read_annotation_list(list_path, root)
    check_labels(records, list_path, num_classes, what)
    return records


def check_labels(records: list[VideoRecord], list_path: str, num_classes: int | None, what: str = "annotation list",
                 relabelled: str = "") -> None:  # fmt: skip
    """ValueError naming ``list_path`` and the line of the first record without a label or with
    one outside [0, num_classes) (num_classes None: any label >= 0); ``relabelled`` says how a
    mix changed the labels."""
    for r in records:
        if r.label is None:
            raise ValueError(f"{list_path}:{r.line}: {r.text!r} has no label: {what} lines are 'path,label' (or "
                             "'path label') with an integer label")  # fmt: skip
        if r.label < 0 or (num_classes is not None and r.label >= num_classes):
            allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{list_path}:{r.line}: label {r.label}{relabelled} is out of range: labels must be in "
                             f"{allowed}" + (f" for {num_classes} classes" if num_classes is not None else ""))  # fmt: skip
