"""Read the history of an offline W&B run file (``run-*.wandb``) to check what a run logged.

The file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks of records with a 7-byte header:
crc32, uint16 length, type) holding ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # block trailer
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
        else:
            break
    return out


def finished_records(path: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run's records once its ``exit`` record is written: W&B's service process writes the file
    asynchronously, so right after ``wandb.finish()`` its end may still be missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        parsed = []
        for payload in records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except DecodeError:  # the last record is still being written
                break
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            return parsed
        time.sleep(0.2)


def history(path: Path) -> list[dict[str, object]]:
    """Every ``wandb.log`` row of the finished run, as ``{key: value}`` dicts."""
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
