"""Where the bytes of a video come from: a local file, an fsspec URL (``s3://``, ``gs://``,
``file://``, ``http(s)://``), or one member of a tar shard read with one ranged read.

A shard member is named by a reference string, so that it travels through the data path as a
record's ``path`` does (into loader workers, error messages and bad-data reports)::

    SHARD#MEMBER@OFFSET+SIZE     the member's bytes are SHARD[OFFSET : OFFSET + SIZE]
    SHARD#MEMBER!REASON          the member cannot be read (a missing, stale or truncated shard
                                 or index, found when the manifest was read): REASON says why

Reads retry a transient error (a timeout, a refused or reset connection, a throttled request) a
bounded number of times with backoff; then they fail with a `VideoDecodeError` naming the shard
and the member, which the loaders count against ``data.max_bad_fraction`` as they count a bad
video. Credentials come from the environment as each fsspec backend reads them (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``FSSPEC_S3_ENDPOINT_URL``,
``AWS_PROFILE``); nothing here logs them or writes them anywhere.
"""
from __future__ import annotations

import os
import re
import time

from umt_fast.data.decoding import VideoDecodeError

RETRIES = 3
"""Tries of a read before it counts as unreachable."""
BACKOFF_S = 0.2
"""Seconds before the second try; doubled before each further one."""

_REF = re.compile(r"^(?P<shard>.+?)#(?P<member>[^#@!]+)(?:@(?P<offset>\d+)\+(?P<size>\d+)|!(?P<reason>.*))$", re.S)


def is_url(path: str) -> bool:
    return "://" in path


def member_ref(shard: str, member: str, offset: int, size: int) -> str:
    return f"{shard}#{member}@{offset}+{size}"


def unreadable_member_ref(shard: str, member: str, reason: str) -> str:
    return f"{shard}#{member}!{reason}"


def _parse_ref(path: str) -> re.Match | None:
    m = _REF.match(path)
    return m if m is not None and m.group("shard").endswith(".tar") else None


def is_member_ref(path: str) -> bool:
    return _parse_ref(path) is not None


def needs_bytes(path: str) -> bool:
    """Whether a decoder must be handed the bytes (a shard member or a URL), not the path."""
    return is_url(path) or is_member_ref(path)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL or a local path. fsspec keeps one instance
    per protocol and options, made again in a new process (a loader worker)."""
    import fsspec.core

    return fsspec.core.url_to_fs(url)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or type(exc).__name__ in (
        "ClientError", "ClientConnectorError", "ServerDisconnectedError", "ReadTimeoutError", "EndpointConnectionError",
    )  # fmt: skip


def _with_retries(what: str, fn):
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise VideoDecodeError(what, "not found") from None
        except Exception as exc:  # noqa: BLE001 (any backend's error: retried when transient, then reported)
            if not _transient(exc) or attempt == RETRIES:
                reason = f"unreachable after {attempt} tries: {type(exc).__name__}: {exc}"[:300]
                raise VideoDecodeError(what, reason) from None
            time.sleep(delay)
            delay *= 2


def read_range(url: str, offset: int, size: int, what: str | None = None) -> bytes:
    """``size`` bytes of ``url`` from ``offset`` (one ranged request); VideoDecodeError naming
    ``what`` (default the URL) when the object is missing, unreachable or shorter."""
    what = what or url
    fs, path = filesystem(url)
    data = _with_retries(what, lambda: fs.cat_file(path, start=offset, end=offset + size))
    if len(data) != size:
        raise VideoDecodeError(what, f"truncated shard: the member needs bytes {offset}..{offset + size}, the object "
                                     f"ends at {offset + len(data)}")  # fmt: skip
    return data


def read_all(url: str) -> bytes:
    """The whole object at ``url`` (a list, a manifest, an index, a video)."""
    fs, path = filesystem(url)
    return _with_retries(url, lambda: fs.cat_file(path))


def object_size(url: str) -> int | None:
    """The size of the object at ``url``, or None when there is none (after the retries)."""
    fs, path = filesystem(url)
    try:
        return int(_with_retries(url, lambda: fs.size(path)))
    except VideoDecodeError:
        return None


_last_read: tuple[str, bytes] | None = None
"""This process's last video read: counting a clip's frames and then decoding it (fine-tuning,
stage 2) reads it once."""


def read_video_bytes(path: str) -> bytes:
    """The bytes of a video given by a shard-member reference or a URL."""
    global _last_read
    if _last_read is not None and _last_read[0] == path:
        return _last_read[1]
    data = _read_video_bytes(path)
    _last_read = (path, data)
    return data


def _read_video_bytes(path: str) -> bytes:
    m = _parse_ref(path)
    if m is not None:
        if m.group("reason") is not None:
            raise VideoDecodeError(f"{m.group('shard')}#{m.group('member')}", m.group("reason"))
        what = f"{m.group('shard')}#{m.group('member')}"
        return read_range(m.group("shard"), int(m.group("offset")), int(m.group("size")), what)
    return read_all(path)


def join(base_url: str, name: str) -> str:
    """``name`` next to ``base_url``'s object (the manifest's folder), for URLs and local paths."""
    if is_url(base_url):
        return base_url.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(base_url), name)
