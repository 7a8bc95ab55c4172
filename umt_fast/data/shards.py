"""A shard set (``python -m umt_fast.prepare shard``) read as the list it was made from.

`read_shard_manifest` turns ``manifest.json`` (a local path or an fsspec URL) into one
`VideoRecord` per clip, in the source list's order, each naming its tar member by offset and size
(`umt_fast.data.storage`): a clip is one ranged read, and a training run over the shards draws
the same clips in the same order, for the same (seed, step), as over the list. Every shard's size
and index are read here, once: a missing shard, a missing or stale index (its checksum is not the
manifest's) and a member past the end of a truncated shard make that clip's record unreadable,
with the reason; the loaders then count it as a bad video under ``data.max_bad_fraction``. A
manifest none of whose shards is there is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from umt_fast.data.annotations import VideoRecord
from umt_fast.data.decoding import VideoDecodeError
from umt_fast.data.storage import join, member_ref, object_size, read_all, unreadable_member_ref

log = logging.getLogger(__name__)


def is_shard_manifest(data: object) -> bool:
    return isinstance(data, dict) and data.get("layout") == "webdataset" and isinstance(data.get("shards"), list)


def _shard_members(manifest_url: str, entry: dict) -> tuple[str, int | None, dict | None, str | None]:
    """(shard URL, its size, its index {member: [offset, size]}, why it cannot be read)."""
    tar = join(manifest_url, entry["name"])
    size = object_size(tar)
    if size is None:
        return tar, None, None, "missing shard"
    index_url = tar[: -len(".tar")] + ".idx.json"
    try:
        raw = read_all(index_url)
    except VideoDecodeError as exc:
        return tar, size, None, f"shard index {entry['name'][:-4]}.idx.json: {exc.reason}"
    if "index_sha256" in entry and hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
        return tar, size, None, "stale shard index (its checksum is not the manifest's)"
    try:
        return tar, size, json.loads(raw), None
    except ValueError:
        return tar, size, None, "shard index is not JSON"


def read_shard_manifest(manifest_url: str, manifest: dict, workers: int = 16) -> list[VideoRecord]:
    """The clips of a shard set, in source-list order (see the module docstring)."""
    shards = manifest["shards"]
    if not shards:
        raise ValueError(f"{manifest_url}: the shard manifest lists no shards")
    with ThreadPoolExecutor(max(1, min(workers, len(shards)))) as pool:
        found = list(pool.map(lambda e: _shard_members(manifest_url, e), shards))
    if all(size is None for _, size, _, _ in found):
        raise FileNotFoundError(f"{manifest_url}: none of its {len(shards)} shards is there (the first would be "
                                f"{found[0][0]}); copy the shards next to the manifest")  # fmt: skip
    records, bad_shards = [], []
    for entry, (tar, size, members, reason) in zip(shards, found):
        skipped = {m["index"] for m in entry.get("missing", [])}
        indices = [i for i in range(entry["first_index"], entry["last_index"] + 1) if i not in skipped]
        labels = entry.get("labels") or [None] * len(indices)
        captions = entry.get("captions") or [()] * len(indices)
        media = entry.get("media") or ["video"] * len(indices)
        by_key = {name.split(".", 1)[0]: name for name in (members or {}) if not name.endswith(".json")}
        if reason:
            bad_shards.append(f"{entry['name']}: {reason}")
        for index, label, caps, kind in zip(indices, labels, captions, media):
            key = f"{index:09d}"
            if reason:
                path = unreadable_member_ref(tar, key, reason)
            elif key not in by_key:
                path = unreadable_member_ref(tar, key, "member not in the shard index")
            else:
                offset, nbytes = members[by_key[key]]
                path = member_ref(tar, by_key[key], offset, nbytes)
                if offset + nbytes > size:
                    path = unreadable_member_ref(tar, by_key[key], f"truncated shard: the member needs bytes "
                                                 f"{offset}..{offset + nbytes}, the shard has {size}")  # fmt: skip
            records.append(VideoRecord(path=path, label=label, captions=tuple(caps), media=kind, line=index + 1))
    if bad_shards:
        log.warning("%s: %d of %d shards cannot be read; their clips count as unreadable videos: %s", manifest_url,
                    len(bad_shards), len(shards), "; ".join(bad_shards[:3]))  # fmt: skip
    if not records:
        raise ValueError(f"{manifest_url}: the shard manifest holds no clips")
    return records
