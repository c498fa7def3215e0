"""What every Ray Train worker loop shares: restoring a run, the metrics window, the metrics log, checkpoint
reports and the failure-injection test hook.

Ray is imported inside the functions that use it, so the step functions and tests can import the rest of the
training code without it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from dreamdiff import storage
from dreamdiff.config import dump_config
from dreamdiff.train.checkpoint import load_training_state, save_training_state

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FAILED_ONCE = ".injected_failure"


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    resume_from: str | None = None,
    metrics_folder: Path | None = None,
) -> dict[str, Any]:
    """Load the training state a run continues from and return its position ({"step": 0} for a fresh start).

    A run that Ray Train restarted (after a failure, or re-run into the same folder) gets its own latest
    checkpoint back; otherwise `resume_from`, a checkpoint folder of another run, when given. Rank 0 passes
    `metrics_folder`, the folder of the run's metrics log: the rows an earlier attempt logged after that position
    are dropped (`drop_metrics_after`), so that every step is logged once, by the attempt that got the furthest.
    """
    import ray.train

    position = {"step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            position = load_training_state(folder, model, optimizer)
    elif resume_from:
        position = load_training_state(resume_from, model, optimizer)
    if ray.train.get_context().get_world_rank() == 0 and position["step"]:
        log.info("resumed at step %d", position["step"])
    if metrics_folder is not None:
        drop_metrics_after(metrics_folder, position["step"])
    return position


class StepWindow:
    """The optimizer steps since the last metrics line: their mean statistics and the throughput over them."""

    def __init__(self, step: int, batch_size: int) -> None:
        self.batch_size = batch_size
        self.restart(step)

    def restart(self, step: int) -> None:
        """Open a new window at `step`; time until then counts in no window."""
        self.stats: list[Mapping[str, float]] = []
        self.start, self.start_step = time.perf_counter(), step

    def add(self, stats: Mapping[str, float]) -> None:
        self.stats.append(stats)

    def summary(self, step: int, keys: Iterable[str], input_wait_s: float) -> dict[str, float]:
        """Means of `keys` over the window, the last learning rate, samples per second (global batch) and the
        fraction of the time spent waiting for input."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            **{key: float(np.mean([s[key] for s in self.stats])) for key in keys},
            "lr": self.stats[-1]["lr"],
            "samples_per_s": (step - self.start_step) * self.batch_size / elapsed,
            "data_wait_fraction": input_wait_s / elapsed,
        }


def append_metrics(folder: Path, metrics: Mapping[str, float]) -> None:
    """Append one JSON line to the run's metrics log (rank 0 only: one writer)."""
    with open(folder / METRICS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def drop_metrics_after(folder: Path, step: int) -> int:
    """Drop the rows of the run's metrics log with a step above `step`: what an earlier attempt logged after the
    checkpoint this one restarts from, which this attempt logs again. Rewritten atomically (a kill leaves the old
    file or the new one), and only when there is something to drop. Returns the number of rows dropped."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _logged_step(line) <= step]  # a line a kill cut short goes too
    if len(keep) == len(lines):
        return 0
    storage.atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))
    log.info("metrics: dropped %d rows logged after step %d by an earlier attempt", len(lines) - len(keep), step)
    return len(lines) - len(keep)


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for one that is not a whole JSON row (it is dropped)."""
    try:
        return float(json.loads(line)["step"]) if line.endswith("\n") else float("inf")
    except (ValueError, KeyError, TypeError):
        return float("inf")


def inject_failure(at_step: int | None, step: int, rank: int, output: str | Path) -> None:
    """The `inject_failure_at_step` test hook: rank 0 raises once at that step, leaving a marker in the run
    folder so that the restarted run goes past it."""
    if at_step != step or rank != 0:
        return
    marker = storage.join(output, FAILED_ONCE)
    if storage.exists(marker):
        return
    storage.write_text(marker, "")
    raise RuntimeError(f"injected failure at step {step} (config inject_failure_at_step)")


def report_checkpoint(
    metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, cfg: BaseModel
) -> None:
    """Every worker reports (Ray Train needs the same number of calls from each); rank 0 attaches the checkpoint:
    the training state beside the stage config that built it."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(folder, model, optimizer, {"step": int(metrics["step"])})
        (Path(folder) / "config.yaml").write_text(dump_config(cfg))  # weights beside the config that built them
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
