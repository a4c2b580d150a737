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

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "CheckpointError",
    "CheckpointReader",
    "SafetensorsHeader",
    "TensorInfo",
    "read_safetensors_header",
    # writer exports are added here by the writer's owner
]
