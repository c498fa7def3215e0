"""The Ray Train set-up both training drivers share: the training dataset and the TorchTrainer.

Each stage's driver checks its inputs and builds the loop's config; these functions turn that into a
TorchTrainer whose checkpoints live under `<output>/ray/train/checkpoint_*` (a URI's filesystem when `output`
is one), so that re-running a config into the same output folder resumes the run.

Failures come back as `DreamdiffError`s: an unreadable shard names its file (Ray Data's read errors do not), and
`fit_trainer` turns Ray Train's `TrainingFailedError` into a `StageFailedError` that says which stage failed, that
its finished checkpoints are kept and how to go on; a worker that failed on bad input (a `DreamdiffError`, an
unreadable shard) gives that error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dreamdiff import storage
from dreamdiff.config import CheckpointSection, ScalingSection
from dreamdiff.errors import DreamdiffError, StageFailedError, first_line

RAY_DIR = "ray"  # Ray Train's storage folder in the run folder
RUN_NAME = "train"  # the run's folder in it: <output>/ray/train/checkpoint_*
OBJECT_STORE_SHARE = 0.25  # cache the training data only when it takes less than this share of the object store


def fits_object_store(decoded_bytes: int) -> bool:
    """Whether data of this decoded size fits comfortably in Ray's object store (Ray must be started)."""
    import ray

    return decoded_bytes < OBJECT_STORE_SHARE * ray.available_resources().get("object_store_memory", 0)


def training_dataset(files: list[str], columns: Sequence[str], *, seed: int, cache: bool) -> Any:
    """The Ray Dataset of the training rows in the Parquet `files` (paths or URIs on one filesystem), blocks in a
    seeded random order; with `cache`, read once and kept in the object store for later epochs."""
    import ray.data

    from dreamdiff.data.reader import READ_ERRORS, locate_unreadable

    filesystem, _ = storage.resolve(files[0])
    try:
        dataset = (
            ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=filesystem)
            .select_columns(list(columns))
            .randomize_block_order(seed=seed)
        )
        dataset.context.enable_progress_bars = False  # the loop logs its own progress, per step
        return dataset.materialize() if cache else dataset
    except Exception as err:  # Ray Data's read errors, raw or wrapped, name no file: find the one that fails
        if not any(isinstance(cause, READ_ERRORS) for cause in _causes(err)):
            raise
        found = locate_unreadable(files)
        if found is None:
            raise
        raise found from err


def build_torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    output: str,
    scaling: ScalingSection,
    checkpoint: CheckpointSection,
    max_failures: int,
    datasets: dict[str, Any],
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TorchTrainer running `loop(loop_config)` on `scaling`'s workers, keeping `checkpoint.keep` checkpoints
    under `<output>/ray/train` and restarting from the last one up to `max_failures` times; `callbacks` go to its
    RunConfig."""
    import ray.train
    from ray.train.torch import TorchTrainer

    checkpoints_fs, checkpoints = storage.resolve(storage.join(output, RAY_DIR))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=checkpoints,
            storage_filesystem=checkpoints_fs if storage.is_remote(output) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception behind it: causes, contexts, Ray's wrapped causes and Ray Train's per-worker
    failures (each once)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [e for e in (item.__cause__, item.__context__, getattr(item, "cause", None)) if e is not None]
        todo += [e for e in (getattr(item, "controller_failure", None),) if isinstance(e, BaseException)]
        todo += [e for e in getattr(item, "worker_failures", {}).values() if isinstance(e, BaseException)]


def training_failure(
    err: BaseException, stage: str, output: str, max_failures: int, shards: Sequence[str] = ()
) -> DreamdiffError:
    """The one-line error for a failed `trainer.fit()`: the bad input a worker met if it was that, else which stage
    failed, why (each worker's first line), that the finished checkpoints are kept and how to go on."""
    import pyarrow as pa

    causes = list(_causes(err))
    for cause in causes:
        if isinstance(cause, DreamdiffError):
            return type(cause)(str(cause))
    if shards and any(isinstance(cause, pa.ArrowException) for cause in causes):
        from dreamdiff.data.reader import locate_unreadable

        found = locate_unreadable(shards)
        if found is not None:
            return found
    failures = getattr(err, "worker_failures", None) or {}
    why = "; ".join(f"rank {rank}: {_root_line(e)}" for rank, e in sorted(failures.items())) or _root_line(err)
    from dreamdiff.train.checkpoint import STATE_FILE

    checkpoints = storage.join(output, RAY_DIR, RUN_NAME)
    kept = len(storage.find(checkpoints, STATE_FILE))  # num_workers 0 keeps its checkpoints in memory only
    resume = (
        f"its {kept} finished checkpoint(s) are kept in {checkpoints}: re-run the same command to resume from the last"
        if kept
        else "it finished no checkpoint that was kept: a re-run starts from the beginning"
    )
    return StageFailedError(
        f"{stage} training failed ({why}); {resume}, or raise max_failures (now {max_failures}) so that Ray Train "
        "restarts failed workers from the last checkpoint by itself"
    )


def _root_line(err: BaseException) -> str:
    """The first line of the innermost exception behind `err` (Ray wraps a worker's error in its own)."""
    inner = err
    for cause in _causes(err):
        inner = cause
    return first_line(inner)


def fit_trainer(trainer: Any, stage: str, output: str, max_failures: int, shards: Sequence[str] = ()) -> Any:
    """`trainer.fit()`, its failure turned into a `DreamdiffError` (see `training_failure`); returns its Result.

    Ray Train raises `TrainingFailedError` (e.g. `WorkerGroupError`) once `max_failures` restarts are used up; with
    `num_workers: 0` the loop runs in this process and its own exception comes up instead: both are turned."""
    try:
        return trainer.fit()
    except DreamdiffError:
        raise
    except Exception as err:
        raise training_failure(err, stage, output, max_failures, shards) from err
