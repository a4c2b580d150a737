"""sharding: bytes in and out — validated lazy checkpoint reading (and, beside it, streamed sharded writing)."""

from sharding.errors import CheckpointError
from sharding.reader import (
    DTYPES,
    MAX_HEADER_BYTES,
    CheckpointReader,
    SafetensorsHeader,
    TensorInfo,
    read_safetensors_header,
)
from sharding.writer import CheckpointWriter, WriterError

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "CheckpointError",
    "CheckpointReader",
    "SafetensorsHeader",
    "TensorInfo",
    "read_safetensors_header",
    "CheckpointWriter",
    "WriterError",
]
