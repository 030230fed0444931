"""How a run's units are packed into batches and kept: shared by the perplexity evaluator, the retrieval
probe and every study that decodes through the cache (``analysis.runtime.decode``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import UserError


@dataclass
class Batching:
    """How a run's units are packed and kept: rows per batch, the resume directory, progress, shards.

    ``progress(n)`` is called with each finished batch's unit count (total: units / world);
    ``partial`` keeps every finished unit so a killed run resumes; a ``torchrun`` process
    of rank ``rank`` among ``world`` takes units rank, rank + world, ...
    """

    batch_size: int = 32
    partial: Path | None = None
    progress: Callable[[int], None] | None = None
    rank: int = 0
    world: int = 1


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
