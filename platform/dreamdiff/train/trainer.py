"""The Ray Train set-up both training drivers share: the training dataset and the TorchTrainer.

Each stage's driver checks its inputs and builds the loop's config; these functions turn that into a
TorchTrainer whose checkpoints live under `<output>/ray/train/checkpoint_*` (a URI's filesystem when `output`
is one), so that re-running a config into the same output folder resumes the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dreamdiff import storage
from dreamdiff.config import CheckpointSection, ScalingSection

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

    filesystem, _ = storage.resolve(files[0])
    dataset = (
        ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=filesystem)
        .select_columns(list(columns))
        .randomize_block_order(seed=seed)
    )
    dataset.context.enable_progress_bars = False  # the loop logs its own progress, per step
    return dataset.materialize() if cache else dataset


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
