"""Per-user state: the value stored in the stream's table (RocksDB + Kafka changelog).

Compact binary layout, little endian: a 40-byte header then the recurrent state
(h and c, [L, H] each) as float32 or float16. For the default model (1 layer,
hidden 128, float32) that is 40 + 1024 bytes, 1.04x the raw recurrent state.

An *erased marker* is the header alone (dtype code 0, seq 0, no h and c): what is left
of a user forgotten by a tombstone (engine.py says why it is kept for a while). It holds
the tombstone's source partition/offset and the event time it was written at, nothing
of the user's behaviour.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np

from clickvec.errors import ClickvecError

_MAGIC = 0xC5
_VERSION = 1
# magic u8, version u8, dtype u8 (1=f32, 2=f16), pad u8, model-id prefix 8s,
# seq u64, partition i32, offset i64, last event ts i64
_HEADER = struct.Struct("<BBBx8sQiqq")
HEADER_BYTES = _HEADER.size
_ERASED = 0  # dtype code of an erased marker: header only
_LAST_TS = struct.Struct("<q")
_LAST_TS_AT = HEADER_BYTES - _LAST_TS.size
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_DTYPE_CODES = {"f32": 1, "f16": 2}


class StateError(ClickvecError):
    """A stored state value cannot be read. Action: check that every worker of the
    group runs the same clickvec version; delete the changelog topic to start over."""


def model_id_prefix(model_id: str) -> bytes:
    return bytes.fromhex(model_id[:16].ljust(16, "0"))


@dataclass(slots=True)
class UserState:
    model_prefix: bytes
    seq: int  # events applied
    partition: int  # source partition of the last applied event (-1: none)
    offset: int  # source offset of the last applied event (-1: none)
    last_ts: int  # event time (epoch ms) of the last applied event (-1: none)
    h: np.ndarray  # (L, H) float32
    c: np.ndarray  # (L, H) float32

    @classmethod
    def fresh(cls, model_prefix: bytes, layers: int, hidden: int) -> UserState:
        z = np.zeros((layers, hidden), dtype=np.float32)
        return cls(model_prefix, 0, -1, -1, -1, z, z.copy())

    def pack(self, dtype: str = "f32") -> bytes:
        code = _DTYPE_CODES[dtype]
        dt = _DTYPES[code]
        return (
            _HEADER.pack(_MAGIC, _VERSION, code, self.model_prefix, self.seq, self.partition,
                         self.offset, self.last_ts)
            + self.h.astype(dt, copy=False).tobytes()
            + self.c.astype(dt, copy=False).tobytes()
        )

    @classmethod
    def unpack(cls, data: bytes, layers: int, hidden: int) -> UserState:
        if len(data) < HEADER_BYTES:
            raise StateError(f"state value of {len(data)} bytes is shorter than its header")
        magic, version, code, prefix, seq, partition, offset, last_ts = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION or code not in _DTYPES:
            raise StateError(f"unknown state format (magic={magic:#x} version={version} dtype={code})")
        dt = _DTYPES[code]
        n = layers * hidden
        if len(data) != HEADER_BYTES + 2 * n * dt.itemsize:
            raise StateError(
                f"state value has {len(data)} bytes; a model with {layers} layer(s) of {hidden} "
                f"units needs {HEADER_BYTES + 2 * n * dt.itemsize}"
            )
        arr = np.frombuffer(data, dtype=dt, count=2 * n, offset=HEADER_BYTES)  # read-only view
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return cls(prefix, seq, partition, offset, last_ts,
                   arr[:n].reshape(layers, hidden), arr[n:].reshape(layers, hidden))


def unpack_states(values: list[bytes], model_prefix: bytes, layers: int, hidden: int) -> list[UserState | None]:
    """`UserState.unpack` of many values at once, for the common case only: a float32
    state of `model_prefix`'s model. Any other value (another size, dtype or model, an
    erased marker, a bad header) gives None, for the caller's one-by-one path."""
    n = layers * hidden
    dt = _record_dtype(1, layers, hidden)
    assert dt.itemsize == HEADER_BYTES + 8 * n
    size = dt.itemsize
    out: list[UserState | None] = [None] * len(values)
    which = [k for k, v in enumerate(values) if len(v) == size]
    if not which:
        return out
    arr = np.frombuffer(b"".join([values[k] for k in which]), dt)
    ok = ((arr["magic"] == _MAGIC) & (arr["version"] == _VERSION) & (arr["code"] == 1)
          & (arr["prefix"] == int.from_bytes(model_prefix, "little")))
    hc = arr["hc"]
    # The (L, H) views of every h and c made by iterating in C, not by indexing per user.
    for k, seq, partition, offset, last_ts, good, h, c in zip(
            which, arr["seq"].tolist(), arr["partition"].tolist(), arr["offset"].tolist(), arr["last_ts"].tolist(),
            ok.tolist(), list(hc[:, 0]), list(hc[:, 1]), strict=True):
        if good:
            out[k] = UserState(model_prefix, seq, partition, offset, last_ts, h, c)
    return out


def pack_states(model_prefix: bytes, heads: list[tuple[int, int, int, int]], h: np.ndarray, c: np.ndarray,
                dtype: str = "f32") -> list[bytes]:
    """`UserState.pack` of B users at once: `heads` their (seq, partition, offset,
    last_ts), `h` and `c` (L, B, H); one conversion and one copy for all of them."""
    code = _DTYPE_CODES[dtype]
    layers, users, hidden = h.shape
    # The values as one record array (header fields, then h and c), written by one copy
    # and sliced: no header packed and joined per user.
    rec = np.empty(users, _record_dtype(code, layers, hidden))
    rec["magic"], rec["version"], rec["code"], rec["pad"] = _MAGIC, _VERSION, code, 0
    rec["prefix"] = int.from_bytes(model_prefix, "little")
    if users:
        rec["seq"], rec["partition"], rec["offset"], rec["last_ts"] = zip(*heads, strict=True)
    rec["hc"][:, 0] = h.transpose(1, 0, 2)
    rec["hc"][:, 1] = c.transpose(1, 0, 2)
    body = rec.tobytes()
    size = rec.dtype.itemsize
    return [body[k:k + size] for k in range(0, users * size, size)]


@functools.lru_cache(maxsize=16)
def _record_dtype(code: int, layers: int, hidden: int) -> np.dtype:
    """A stored state value as a numpy record (the layout of the module docstring). Cached:
    building the dtype costs more than packing a small batch's states with it."""
    return np.dtype([("magic", "u1"), ("version", "u1"), ("code", "u1"), ("pad", "u1"), ("prefix", "<u8"),
                     ("seq", "<u8"), ("partition", "<i4"), ("offset", "<i8"), ("last_ts", "<i8"),
                     ("hc", _DTYPES[code], (2, layers, hidden))])


def erased_marker(model_prefix: bytes, partition: int, offset: int, ts: int) -> bytes:
    """The value left for a forgotten user: the tombstone's source partition/offset (so
    events before it that come back after a crash are skipped as replays) and `ts`, the
    event time it expires from (state TTL)."""
    return _HEADER.pack(_MAGIC, _VERSION, _ERASED, model_prefix, 0, partition, offset, ts)


def is_erased(data: bytes) -> bool:
    return len(data) == HEADER_BYTES and data[0] == _MAGIC and data[2] == _ERASED


def marker_position(data: bytes) -> tuple[int, int]:
    """(partition, offset) of the tombstone an erased marker stands for."""
    _, _, _, _, _, partition, offset, _ = _HEADER.unpack_from(data)
    return partition, offset


def last_ts_of(data: bytes) -> int | None:
    """The event time of a stored value (state or erased marker) without unpacking it
    (-1: none yet); None when the value is not a user's (Faust keeps its own keys, such
    as the changelog offset, in the same database)."""
    if len(data) < HEADER_BYTES or data[0] != _MAGIC or data[1] != _VERSION:
        return None
    return _LAST_TS.unpack_from(data, _LAST_TS_AT)[0]
