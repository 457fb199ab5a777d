"""Read the records of a wandb ``.wandb`` transaction log (what an offline run stores) for tests.

The file is a 7-byte header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB's log format:
32 KiB blocks of chunks, each chunk ``crc32 (4) | length (2, little endian) | type (1) | data``, where a
record is one FULL chunk or FIRST, MIDDLE..., LAST chunks; a block tail shorter than a chunk header is
padding. Each record is a serialized ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    position, pieces = _HEADER, []
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, position)
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        if kind in (_FULL, _FIRST):
            pieces = [chunk]
        else:
            pieces.append(chunk)
        if kind in (_FULL, _LAST):
            yield b"".join(pieces)


def read_records(path: Path) -> list:
    """``[(record type, Record)]`` of a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append((record.WhichOneof("record_type"), record))
    return records


def summary_values(path: Path) -> dict:
    """The run summary as ``{key: value}``: every summary update in order, the last one winning."""
    values = {}
    for kind, record in read_records(path):
        if kind == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def history_rows(path: Path) -> list:
    """Every ``run.log`` call as a dict."""
    rows = []
    for kind, record in read_records(path):
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wait_until_complete(path: Path, timeout_s: float = 60.0) -> None:
    """Wait until the log holds its ``exit`` record: ``run.finish()`` can return while wandb's service
    process is still writing the last records (the summary among them) of an offline run."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(kind == "exit" for kind, _ in read_records(path)):
                return
        except Exception:  # a record being written right now (protobuf DecodeError, short read)
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout_s} s")
        time.sleep(0.2)
