"""Errors raised by `sharding` for checkpoints that fail validation, and the one base class of blockprune's errors.

`BlockpruneError` lives here because `sharding` is the lowest layer: every package may import it, and the CLI turns
any of its subclasses into one line on stderr (exit code 2) without knowing which layer raised it.
"""

from __future__ import annotations

from pathlib import Path


class BlockpruneError(Exception):
    """Base of every error blockprune raises for bad input (recipe, checkpoint, calibration data, output).

    Its message is one line naming the file, key or tensor at fault and what is allowed; anything else that escapes
    is a bug, and the CLI shows its traceback."""


class CheckpointError(BlockpruneError, ValueError):
    """A checkpoint (file, header, index or config) that fails validation.

    ``str(err)`` is one line: ``"<file>: tensor '<name>': <problem>"``; the file and tensor parts are present when
    known. The parts are kept as attributes (``problem``, ``file``, ``tensor``) for programs.
    """

    def __init__(self, problem: str, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.problem = problem
        self.file = Path(file) if file is not None else None
        self.tensor = tensor
        parts = [] if file is None else [str(file)]
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        parts.append(problem)
        message = ": ".join(parts)
        super().__init__(message.replace("\r", " ").replace("\n", " "))  # one line, whatever the parts hold

    def __reduce__(self):  # keep the parts when pickled across processes
        return (type(self), (self.problem, self.file, self.tensor))
