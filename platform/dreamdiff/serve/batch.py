"""Batch generation over Parquet shards on Ray Data: `dreamdiff generate`.

The driver checks everything first (checkpoint, guidance, shards, EEG shape, splits, the output's earlier settings),
picks the EEGs (split filter, a seeded `max_eeg` subset) and drops those already done. Ray Data reads the rest
(`read_parquet` of the finished shards, EEG columns only) into `map_batches` with an actor pool of
:class:`GenerateActor` (each loads the `Generator` once, on a GPU when `num_gpus` > 0), which writes the PNGs and
then its batch's index part. Output folder:

    generation.json                 model id + sampling settings; a re-run with other ones is refused
    config.yaml                     the latest run's config
    images/<dataset>/subject-<id>/<epoch id, sanitised>-<sha1[:8]>_s<j>.png
    index/part-<sha1 of its ids>.parquet   one per finished batch, written last: its EEGs are done
    index.parquet, index.json       every index part merged, rewritten at the end of each run

Resume: every file is written under a temporary name (`storage.atomic_write`: `.<name>.<12 hex>.tmp` beside it) and
renamed, so a killed run leaves whole files or temporary ones (removed on the next start). An EEG is done when an
index part lists it and all its PNGs exist (a part whose files are gone is dropped and its EEGs redone); a re-run
generates the others under the same names, so nothing is duplicated. PNGs no part lists (a batch killed before its
part) are removed after a complete run.

Only our own files are ever removed or overwritten. `generation.json` marks a folder as a generate output: a run
takes an output folder that is new, empty or marked, and refuses any other (error naming `output`), since it would
write `config.yaml`, `index.json`, ... over whatever is there. In a marked folder the clean-up removes only files
named as this stage names them (`storage.ATOMIC_TEMP`, `OWN_PNG`, in the folders it writes), so notes, other
images and other temporary files put there are left as they are.

Each actor samples through :func:`dreamdiff.generation.generate`, the path the evaluate stage uses: EEG e samples from
``eeg_seed(seed, epoch_id)``, image j as the Generator documents, so an image depends on the EEG id, the seed and
the sampling settings only: not on batching, actors or resumes.
The output folder must be one every actor's node can write (a shared filesystem on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dreamdiff.config import GenerateConfig, dump_config
from dreamdiff.data.schema import EPOCH_COLUMNS
from dreamdiff.errors import DreamdiffError, unreadable_file
from dreamdiff.generation import Sampling, generate, generator_source
from dreamdiff.models.eeg_diffusion import GeneratorSpec
from dreamdiff.models.generator import (
    SPEC_FILE,
    WEIGHTS_FILE,
    Generator,
    check_generator_weights,
    inference_dtype,
    model_id,
    read_generator_meta,
)
from dreamdiff.models.sampling import Compile, torch_compile_mode
from dreamdiff.storage import ATOMIC_TEMP, atomic_write

log = logging.getLogger(__name__)

SETTINGS_FILE = "generation.json"
IMAGES_DIR = "images"
PARTS_DIR = "index"
INDEX_FILES = ("index.parquet", "index.json")
CONFIG_FILE = "config.yaml"
OWN_PNG = re.compile(r"^[A-Za-z0-9._-]*-[0-9a-f]{8}_s[0-9]+\.png$")  # generation.png_name
OWN_PART = re.compile(r"^part-[0-9a-f]{16}\.parquet$")  # GenerateActor's index parts
OWN_TOP = {SETTINGS_FILE, CONFIG_FILE, *INDEX_FILES}  # what a run writes in the output folder itself
READ_COLUMNS = tuple(c for c in EPOCH_COLUMNS if c not in ("sfreq", "n_channels_orig"))  # what the index keeps
PAIRED_EXTRA = ("image_id", "split")  # read when every shard is paired
INDEX_SCHEMA = pa.schema(
    [
        pa.field("epoch_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("subject", pa.int32(), nullable=False),
        pa.field("session", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("start", pa.int64(), nullable=False),
        pa.field("image_id", pa.string()),  # null for EEG-only shards
        pa.field("split", pa.string()),
        pa.field("images", pa.list_(pa.string()), nullable=False),  # relative to the output folder
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance_scale", pa.float64(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Job:
    """What every actor needs: where the model and the output are, and the sampling settings."""

    checkpoint: str
    output: str
    model: str  # model id (see model_id)
    sampling: Sampling
    use_gpu: bool
    precision: Literal["fp32", "bf16"]
    compile: Compile


def image_folder(dataset: str, subject: int) -> str:
    """Where the images of a subject's EEGs go, relative to the output folder (one folder per dataset and subject)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._")[:60] or "dataset"
    return f"{IMAGES_DIR}/{safe}/subject-{int(subject)}"


class GenerateActor:
    """Ray Data actor: a batch of EEG rows -> PNGs and one index part on disk; returns the ids it finished."""

    def __init__(self, job: Job) -> None:
        self.job = job
        device = torch.device("cuda" if job.use_gpu else "cpu")
        self.generator = Generator.load(job.checkpoint, device, dtype=inference_dtype(device, job.precision))
        if job.compile:
            self.generator.compile(torch_compile_mode(job.compile))
        self.source = generator_source(self.generator, job.sampling)
        self.output = Path(job.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job, sampling, began = self.job, self.job.sampling, time.perf_counter()
        made = generate(self.source, batch["eeg"], batch["channel_mask"], batch["epoch_id"], sampling)
        ids, paths = made.batch.epoch_ids, []
        for k in range(len(ids)):
            folder = image_folder(batch["dataset"][k], batch["subject"][k])
            (self.output / folder).mkdir(parents=True, exist_ok=True)
            names = [f"{folder}/{name}" for name in made.names[k]]
            for name, pixels in zip(names, made.images[k], strict=True):
                atomic_write(self.output / name, lambda p, x=pixels: Image.fromarray(x).save(p, format="PNG"))
            paths.append(names)
        n = len(ids)
        columns = {name: batch[name] for name in READ_COLUMNS if name not in ("eeg", "channel_mask")}
        for name in PAIRED_EXTRA:
            columns[name] = batch[name] if name in batch else [None] * n
        columns.update(
            epoch_id=ids,
            images=paths,
            seed=made.batch.seeds,
            sampler=[sampling.sampler] * n,
            steps=[sampling.steps] * n,
            guidance_scale=[sampling.guidance_scale] * n,
            model=[job.model] * n,
        )
        table = pa.Table.from_pydict({f.name: pa.array(columns[f.name], f.type) for f in INDEX_SCHEMA}, INDEX_SCHEMA)
        key = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        part = self.output / PARTS_DIR / f"part-{key}.parquet"
        atomic_write(part, lambda p: pq.write_table(table, p))  # last: marks these EEGs done
        return {"epoch_id": np.asarray(ids), "seconds": np.full(n, (time.perf_counter() - began) / n)}


# ------------------------------------------------------------------------------------ checks before any work


def _check_checkpoint(cfg: GenerateConfig) -> GeneratorSpec:
    folder = Path(cfg.checkpoint)
    if not (folder / SPEC_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise DreamdiffError(
            f"checkpoint: {cfg.checkpoint} must be a generator folder holding {SPEC_FILE} and {WEIGHTS_FILE} "
            "(finetune writes one into <its output>/generator)"
        )
    spec: GeneratorSpec = read_generator_meta(folder)["spec"]  # a corrupt generator.json fails naming it
    check_generator_weights(folder)  # and a truncated generator.safetensors, here rather than in every actor
    if cfg.guidance_scale != 1.0 and spec.conditioner.cond_drop_prob == 0:
        raise DreamdiffError(
            f"guidance_scale: {cfg.guidance_scale} needs a generator fine-tuned with condition dropout; this one was "
            "not (conditioner.cond_drop_prob = 0): use guidance_scale=1.0"
        )
    return spec


def _input_files(cfg: GenerateConfig, spec: GeneratorSpec) -> tuple[list[str], bool]:
    """The finished shard files to read, and whether all are paired (then image_id and split go in the index)."""
    from dreamdiff.data.reader import read_schema, shard_files  # imports Ray

    try:
        files = shard_files(cfg.input)
    except DreamdiffError as err:
        raise DreamdiffError(f"input: {str(err).removeprefix('data: ')}") from None
    schemas = {f: read_schema(f) for f in files}  # an unreadable shard fails naming it
    if cfg.splits is not None:
        files = [f for f in files if "split" in schemas[f].names]
        if not files:
            raise DreamdiffError(
                f"splits: {cfg.input} holds no paired shards (rows with a split); use splits: null for EEG-only shards"
            )
    want = (spec.msm.num_channels, spec.msm.num_samples)
    for f in files:
        shape = tuple(schemas[f].field("eeg").type.shape)
        if shape != want:
            raise DreamdiffError(
                f"input: {f} holds EEG {list(shape)}; checkpoint {cfg.checkpoint} expects {list(want)}"
            )
    return files, all("split" in schemas[f].names for f in files)


def select_eegs(cfg: GenerateConfig, files: list[str]) -> list[str]:
    """The epoch ids to generate for, sorted: rows of `splits`, then a seeded subset of `max_eeg` of them."""
    from dreamdiff.data.reader import read_table  # imports Ray

    ids, splits = [], []
    for f in files:
        table = read_table(f, columns=["epoch_id", "split"] if cfg.splits else ["epoch_id"])
        ids += table.column("epoch_id").to_pylist()
        if cfg.splits:
            splits += table.column("split").to_pylist()
    if cfg.splits:
        ids = [i for i, s in zip(ids, splits, strict=True) if s in cfg.splits]
        if not ids:
            raise DreamdiffError(f"splits: no rows of {cfg.splits} in {cfg.input} (it holds {sorted(set(splits))})")
    ids = sorted(ids)
    repeated = [a for a, b in zip(ids, ids[1:], strict=False) if a == b]
    if repeated:
        raise DreamdiffError(f"input: epoch_id {repeated[0]!r} names more than one row of {cfg.input}")
    if cfg.max_eeg is not None and cfg.max_eeg < len(ids):
        pick = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1])).choice(len(ids), cfg.max_eeg, False)
        ids = [ids[i] for i in np.sort(pick)]
    return ids


def _claim_output(cfg: GenerateConfig, settings: dict[str, Any]) -> Path:
    """Create the output folder, or check that it is ours (see the module docstring) and that its images were made
    with the same model and settings."""
    output = Path(cfg.output)
    record = output / SETTINGS_FILE
    if output.exists() and not output.is_dir():
        raise DreamdiffError(f"output: {output} is a file; give a folder (new, empty, or an earlier generate output)")
    if not record.is_file():
        foreign = sorted(p.name for p in output.iterdir() if not _own_temp(output, p)) if output.is_dir() else []
        if foreign:
            raise DreamdiffError(
                f"output: {output} holds files that `dreamdiff generate` did not write (e.g. {', '.join(foreign[:3])}) "
                f"and no {SETTINGS_FILE}; give a new or empty folder, or one an earlier generate run wrote"
            )
    else:
        try:
            old = json.loads(record.read_text())
            if not isinstance(old, dict):
                raise TypeError(f"a JSON object, got {type(old).__name__}")
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
            raise unreadable_file(
                record, "generate's settings record", err, "use another output folder, or remove this one"
            ) from err
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise DreamdiffError(
                f"output: {output} holds images made with other settings (changed: {', '.join(changed)}); "
                "use another output folder or remove this one"
            )
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda p: p.write_text(json.dumps(settings, indent=1)))  # first: marks the folder ours
    (output / PARTS_DIR).mkdir(exist_ok=True)
    (output / IMAGES_DIR).mkdir(exist_ok=True)
    atomic_write(output / CONFIG_FILE, lambda p: p.write_text(dump_config(cfg)))
    return output


# --------------------------------------------------------------------------------------------- the index


def _read_parts(output: Path) -> pa.Table:
    """Every valid index part; a part whose PNGs are not all there is deleted (its EEGs will be redone)."""
    tables = []
    for part in sorted((output / PARTS_DIR).glob("part-*.parquet")):
        table = pq.read_table(part, schema=INDEX_SCHEMA)
        paths = [p for row in table.column("images").to_pylist() for p in row]
        if all((output / p).is_file() for p in paths):
            tables.append(table)
        else:
            log.warning("generate: %s lists missing images; its EEGs are generated again", part.name)
            part.unlink()
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _write_index(output: Path, parts: pa.Table) -> pa.Table:
    """Merge the parts into index.parquet and index.json, one row per EEG. Two parts can list one EEG when an actor
    of a killed run finished its batch after the re-run read the index; both rows name the same files."""
    first = {eid: i for i, eid in reversed(list(enumerate(parts.column("epoch_id").to_pylist())))}
    index = parts.take(sorted(first.values())).sort_by("epoch_id")
    atomic_write(output / INDEX_FILES[0], lambda p: pq.write_table(index, p))
    atomic_write(output / INDEX_FILES[1], lambda p: p.write_text(json.dumps(index.to_pylist(), indent=1)))
    return index


def _own_temp(output: Path, path: Path) -> bool:
    """Whether `path` (below `output`) is a temporary file of ours: atomic_write's name for a file this stage
    writes in that folder."""
    match = ATOMIC_TEMP.match(path.name)
    if match is None or not path.is_file():
        return False
    name, where = match.group("name"), path.parent.relative_to(output).parts
    if len(where) == 3 and where[0] == IMAGES_DIR and where[2].startswith("subject-"):
        return OWN_PNG.match(name) is not None
    if where == (PARTS_DIR,):
        return OWN_PART.match(name) is not None
    return where == () and name in OWN_TOP


def _image_folders(output: Path) -> list[Path]:
    """The folders our images go to: images/<dataset>/subject-<id> (image_folder)."""
    return sorted(p for p in (output / IMAGES_DIR).glob("*/subject-*") if p.is_dir())


def _remove_own_temp(output: Path) -> int:
    """Remove the temporary files a killed run left, ours only (see `_own_temp`), in the folders we write."""
    folders = [output, output / PARTS_DIR, *_image_folders(output)]
    found = [p for folder in folders if folder.is_dir() for p in folder.iterdir() if _own_temp(output, p)]
    for path in found:
        path.unlink()
    return len(found)


def _remove_unlisted_pngs(output: Path, listed: set[str]) -> int:
    """Remove the PNGs that we named (OWN_PNG, in an image folder of ours) but no index part lists: the images of a
    batch killed before its part was written. Any other file stays."""
    found = [
        p
        for folder in _image_folders(output)
        for p in folder.iterdir()
        if OWN_PNG.match(p.name) and p.is_file() and p.relative_to(output).as_posix() not in listed
    ]
    for path in found:
        path.unlink()
    return len(found)


# ------------------------------------------------------------------------------------------------ the stage


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate `num_images` PNGs for every selected EEG not yet done; merge the index; return a summary."""
    began = time.perf_counter()
    spec = _check_checkpoint(cfg)
    files, paired = _input_files(cfg, spec)
    selected = select_eegs(cfg, files)
    settings = {
        "model": model_id(cfg.checkpoint),
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        **cfg.model_dump(include={"num_images", "seed", "sampler", "steps", "guidance_scale"}),
    }
    output = _claim_output(cfg, settings)
    removed_tmp = _remove_own_temp(output)  # what a killed run was writing
    done = set(_read_parts(output).column("epoch_id").to_pylist())
    todo = [e for e in selected if e not in done]
    log.info("generate: %d EEGs selected, %d already done", len(selected), len(selected) - len(todo))
    busy = _generate(cfg, settings["model"], files, paired, todo) if todo else 0.0
    index = _write_index(output, _read_parts(output))
    missing = set(selected) - set(index.column("epoch_id").to_pylist())
    if missing:
        raise DreamdiffError(f"generate: {len(missing)} selected EEGs have no images, e.g. {min(missing)!r}")
    indexed = {p for row in index.column("images").to_pylist() for p in row}
    removed_png = _remove_unlisted_pngs(output, indexed)
    removed_tmp += _remove_own_temp(output)
    seconds = time.perf_counter() - began
    summary = {
        "selected": len(selected),
        "skipped": len(selected) - len(todo),
        "generated": len(todo),
        "images": len(todo) * cfg.num_images,
        "indexed_eegs": index.num_rows,
        "removed_partial_files": removed_tmp + removed_png,
        "seconds": round(seconds, 1),
        "images_per_s": round(len(todo) * cfg.num_images / seconds, 2),
        "actor_seconds": round(busy, 1),  # sampling + writing, summed over actors (startup excluded)
        "images_per_actor_s": round(len(todo) * cfg.num_images / busy, 2) if busy else None,
    }
    print(
        f"generate: {summary['generated']} EEGs x {cfg.num_images} images in {summary['seconds']} s "
        f"({summary['images_per_s']} images/s; {summary['images_per_actor_s']} per busy actor-second), "
        f"{summary['skipped']} already done; index of {summary['indexed_eegs']} EEGs in {output / INDEX_FILES[0]}"
    )
    return summary


def _generate(cfg: GenerateConfig, model: str, files: list[str], paired: bool, todo: list[str]) -> float:
    """Run the actor pool over the `todo` EEGs; returns the seconds actors spent on batches."""
    import ray.data
    from ray.data.expressions import col

    from dreamdiff.ray_init import init_ray

    init_ray(cfg.ray)
    job = Job(
        checkpoint=str(Path(cfg.checkpoint).resolve()),
        output=str(Path(cfg.output).resolve()),
        model=model,
        sampling=Sampling(**cfg.model_dump(include={"num_images", "seed", "sampler", "steps", "guidance_scale"})),
        use_gpu=cfg.num_gpus > 0,
        precision=cfg.precision,
        compile=cfg.compile,
    )
    dataset = (
        ray.data.read_parquet(files)
        .select_columns([*READ_COLUMNS, *(PAIRED_EXTRA if paired else ())])
        .filter(expr=col("epoch_id").is_in(todo))
        .map_batches(
            GenerateActor,
            fn_constructor_kwargs={"job": job},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
            num_gpus=cfg.num_gpus,
            num_cpus=cfg.cpus_per_actor,
        )
    )
    busy = 0.0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        busy += float(batch["seconds"].sum())
    return busy
