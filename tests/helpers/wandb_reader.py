"""A small reader of W&B's offline run files (``offline-run-*/run-<id>.wandb``), no network.

The file is a LevelDB-style log of ``wandb.proto`` ``Record`` messages:

- a 7-byte file header: ident ``:W&B`` (4 bytes), magic 0xBEE1 (uint16 LE), version 0 (uint8);
- then 32 KiB blocks; each record chunk has a 7-byte header: checksum (uint32 LE, CRC-32 of
  the type byte followed by the data), length (uint16 LE), type (1 FULL, 2 FIRST, 3 MIDDLE,
  4 LAST); a record too long for the rest of a block is split into FIRST, MIDDLE..., LAST;
  a block tail shorter than a header is zero padding. The first block's space counts the
  file header.

A torn tail (a process killed while writing) ends the read at the last whole record. The
records are parsed with the protobuf classes wandb ships (``wandb.proto.wandb_internal_pb2``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptLog(ValueError):
    pass


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = HEADER.size
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero-filled tail
            return
        start = pos + CHUNK.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            return  # torn or corrupt tail: stop at the last whole record
        yield kind, payload
        pos = start + length


def records(path: str | Path) -> Iterator[Any]:
    """The ``Record`` messages of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise CorruptLog(f"{path}: not a W&B log (header {ident!r} {magic:#x} {version})")
    buf: bytes | None = None
    for kind, payload in _chunks(data):
        if kind == FULL:
            buf = None
            yield pb.Record.FromString(payload)
        elif kind == FIRST:
            buf = payload
        elif kind == MIDDLE and buf is not None:
            buf += payload
        elif kind == LAST and buf is not None:
            rec, buf = buf + payload, None
            yield pb.Record.FromString(rec)


def _put(out: dict[str, Any], items: Any) -> dict[str, Any]:
    """Set each item's value in ``out``; a ``nested_key`` [a, b] becomes ``out[a][b]``."""
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """What one or several ``.wandb`` files of a run hold (several: a resumed job)."""

    run_ids: set[str] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def add(self, path: str | Path) -> OfflineRun:
        for rec in records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                self.run_ids.add(rec.run.run_id)
                self.tags = list(rec.run.tags)
                self._config(rec.run.config.update)
            elif kind == "history":
                self.history.append(_put({}, rec.history.item))
            elif kind == "config":
                self._config(rec.config.update)
            elif kind == "summary":
                _put(self.summary, rec.summary.update)
            elif kind == "metric":
                m = rec.metric
                name = m.name or m.glob_name
                self.metrics[name] = {"step_metric": m.step_metric, "glob": bool(m.glob_name)}
            elif kind == "artifact":
                a = rec.artifact
                files = [e.path for e in a.manifest.contents]
                self.artifacts.append({"name": a.name, "type": a.type, "files": files})
        return self

    def _config(self, items: Any) -> None:
        _put(self.config, items)


def read_runs(paths: list[str | Path]) -> OfflineRun:
    """One :class:`OfflineRun` from the ``.wandb`` files ``paths`` (in the given order)."""
    run = OfflineRun()
    for p in paths:
        run.add(p)
    return run


def wandb_files(root: str | Path) -> list[Path]:
    """Every ``offline-run-*/run-*.wandb`` under ``root``, in order of start time (dir name)."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
