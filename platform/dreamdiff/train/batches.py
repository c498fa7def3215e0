"""Epochs of micro-batches from a Ray Train dataset shard, resumable at any optimizer step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


class ResumableBatches:
    """Yields (epoch, index in epoch, `group` micro-batches) for every optimizer step from `start_step` on.

    Each epoch is shuffled with a seed of its own, so a run resumed in the middle of an epoch consumes (without
    training on) the micro-batches that were trained before the restart and continues in the same order.
    `wait_s` adds up the seconds spent waiting for input: large means the step is input-bound.
    """

    def __init__(self, shard: Any, *, micro: int, per_epoch: int, epochs: int, seed: int, rank: int, group: int = 1):
        self.shard, self.micro, self.per_epoch, self.epochs = shard, micro, per_epoch, epochs
        self.seed, self.rank, self.group = seed, rank, group
        self.wait_s = 0.0

    def from_step(self, start_step: int) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
        for epoch in range(start_step // self.per_epoch, self.epochs):
            done_in_epoch = start_step - epoch * self.per_epoch  # > 0 when resuming in the middle of an epoch
            batches = iter(
                self.shard.iter_torch_batches(
                    batch_size=self.micro,
                    drop_last=True,
                    local_shuffle_buffer_size=4 * self.micro,
                    local_shuffle_seed=self.seed + 7919 * epoch + self.rank,
                )
            )
            for index in range(self.per_epoch):
                waited = time.perf_counter()
                group = [next(batches) for _ in range(self.group)]
                self.wait_s += time.perf_counter() - waited
                if index >= done_in_epoch:
                    yield epoch, index, group

    def take_wait(self) -> float:
        """The input wait since the last call, and reset it."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait
