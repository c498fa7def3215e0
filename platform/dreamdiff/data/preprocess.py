"""The preprocess stage: raw EEG sources -> Parquet shards + manifest.json, on Ray Data.

One Ray Data task per (dataset, subject). Each task streams its subject's recordings through
the signal functions and writes its own shards, ``<output>/<epochs|paired>/<dataset>/
subject-<id>/part-<k>.parquet``, then a ``_SUCCESS.json`` marker. The marker is what makes the
stage idempotent: a re-run skips subjects that have one, and a subject killed half-way (no
marker) is cleared and written again, so a killed-and-resumed run holds exactly the rows of an
uninterrupted one. (Ray Data's own ``write_parquet`` commits per dataset, not per subject, so
it cannot give that.) Memory per task is bounded by one recording plus one shard of rows.
``output`` is a local path or a URI (dreamdiff.storage): on a cluster, an object store every node shares.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dreamdiff import storage
from dreamdiff.config import (
    ImageNetEEGSource,
    MOABBSource,
    PreprocessConfig,
    SignalSection,
    SynthSource,
    record_config,
)
from dreamdiff.data import imagenet_eeg, moabb_source, signal, synthetic, synthetic_images
from dreamdiff.data.schema import DONE, epoch_schema, paired_schema, to_table
from dreamdiff.errors import DreamdiffError

log = logging.getLogger(__name__)

IMAGENET_EEG_SFREQ = 1000.0  # the release was recorded at 1 kHz


@dataclass(frozen=True)
class SubjectTask:
    source: int  # index into cfg.sources
    dataset: str
    subject: int
    kind: str  # "epochs" | "paired"

    def folder(self, output: str | Path) -> str:
        return storage.join(output, self.kind, self.dataset, f"subject-{self.subject:04d}")


# -------------------------------------------------------------------------------- planning


def plan(cfg: PreprocessConfig) -> list[SubjectTask]:
    """Every (dataset, subject) the config names; bad sources fail here, before any work."""
    tasks: list[SubjectTask] = []
    for index, source in enumerate(cfg.sources):
        if isinstance(source, MOABBSource):
            for name, dataset in moabb_source.datasets(source).items():
                for subject in moabb_source.subjects(dataset, source.subjects, name):
                    tasks.append(SubjectTask(index, name, subject, "epochs"))
        elif isinstance(source, SynthSource):
            if source.synth.num_samples != cfg.signal.window:
                raise DreamdiffError(
                    f"sources[{index}].synth.num_samples ({source.synth.num_samples}) must equal "
                    f"signal.window ({cfg.signal.window}): synthetic trials are generated at that length"
                )
            name = "SynthEEG-Image" if source.labeled else "SynthEEG"
            kind = "paired" if source.labeled else "epochs"
            tasks += [SubjectTask(index, name, s, kind) for s in range(source.synth.num_subjects)]
        else:
            if not Path(source.image_dir).is_dir():
                raise DreamdiffError(f"sources[{index}].image_dir: no such folder {source.image_dir}")
            if source.profile == "reference" and cfg.signal.window != imagenet_eeg.REFERENCE_WINDOW:
                raise DreamdiffError(
                    f"sources[{index}].profile: reference stretches ImageNet-EEG trials to "
                    f"{imagenet_eeg.REFERENCE_WINDOW} samples, so signal.window must be "
                    f"{imagenet_eeg.REFERENCE_WINDOW} (got {cfg.signal.window})"
                )
            release = imagenet_eeg.load_release(source.eeg_file)
            _imagenet_splits(source, release)
            for subject in imagenet_eeg.subjects(release, source.subjects):
                tasks.append(SubjectTask(index, "ImageNet-EEG", subject, "paired"))
    return tasks


# ------------------------------------------------------------------------- one subject's rows


def _epoch_columns(
    task: SubjectTask,
    eeg: np.ndarray,
    mask: np.ndarray,
    session: str,
    run: str,
    start: np.ndarray,
    sfreq: float,
    n_orig: int,
) -> dict[str, Any]:
    n = len(eeg)
    return {
        "epoch_id": [f"{task.dataset}/{task.subject}/{session}/{run}/{s}" for s in start],
        "eeg": eeg,
        "channel_mask": np.broadcast_to(mask.astype(np.uint8), (n, mask.size)),
        "dataset": [task.dataset] * n,
        "subject": np.full(n, task.subject, dtype=np.int32),
        "session": [session] * n,
        "run": [run] * n,
        "start": np.asarray(start, dtype=np.int64),
        "sfreq": np.full(n, sfreq, dtype=np.float32),
        "n_channels_orig": np.full(n, n_orig, dtype=np.int16),
    }


def _filter_and_normalise(eeg: np.ndarray, sfreq: float, sig: SignalSection) -> tuple[np.ndarray, float]:
    filtered, h_used = signal.bandpass(eeg, sfreq, sig.l_freq, sig.h_freq)
    return signal.normalise(filtered, mode=sig.normalise, scale=sig.scale, clip=sig.clip), h_used


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _moabb_rows(task: SubjectTask, source: MOABBSource, sig: SignalSection, info: dict) -> Iterator[dict]:
    name = moabb_source.FAKE if task.dataset.startswith(f"{moabb_source.FAKE}-") else task.dataset
    dataset = moabb_source.datasets(source.model_copy(update={"datasets": [name]}))[task.dataset]
    for session, run, raw in moabb_source.recordings(dataset, task.subject):
        out = signal.epochs_from_raw(
            raw,
            l_freq=sig.l_freq,
            h_freq=sig.h_freq,
            sfreq=sig.sfreq,
            size=sig.window,
            stride=sig.stride,
            channels=sig.channels,
            montage=sig.montage,
            normalise_mode=sig.normalise,
            scale=sig.scale,
            clip=sig.clip,
        )
        info.update(sfreq=out["sfreq"], h_freq_used=out["h_freq_used"], n_channels_orig=out["n_channels_orig"])
        if len(out["eeg"]):
            yield _epoch_columns(
                task,
                out["eeg"],
                out["channel_mask"],
                session,
                run,
                out["start"],
                out["sfreq"],
                out["n_channels_orig"],
            )


def _synth_rows(task: SubjectTask, source: SynthSource, sig: SignalSection, info: dict) -> Iterator[dict]:
    cfg = source.synth
    full_mask = np.ones(cfg.num_channels, dtype=bool)
    info.update(sfreq=cfg.sfreq, n_channels_orig=cfg.num_channels)
    if not source.labeled:
        done, chunk = 0, 256
        while done < source.unlabeled_epochs_per_subject:
            n = min(chunk, source.unlabeled_epochs_per_subject - done)
            eeg, info["h_freq_used"] = _filter_and_normalise(
                synthetic.generate_unlabeled(cfg, task.subject, n, offset=done), cfg.sfreq, sig
            )
            start = np.arange(done, done + n) * cfg.num_samples
            yield _epoch_columns(task, eeg, full_mask, "0", "0", start, cfg.sfreq, cfg.num_channels)
            done += n
        return
    trials = synthetic.generate_subject(cfg, task.subject)
    eeg, info["h_freq_used"] = _filter_and_normalise(trials["eeg"], cfg.sfreq, sig)
    names = [f"{a['shape']}-{a['colour']}-{a['texture']}" for a in synthetic_images.class_attributes(cfg)]
    start = trials["trial"] * cfg.num_samples
    cols = _epoch_columns(task, eeg, full_mask, "0", "0", start, cfg.sfreq, cfg.num_channels)
    images = {i: _png(synthetic_images.render_image(cfg, int(i))) for i in np.unique(trials["image_index"])}
    cols.update(
        image=[images[i] for i in trials["image_index"]],
        image_id=[f"synth-{i:05d}" for i in trials["image_index"]],
        label=trials["label"].astype(np.int32),
        class_name=[names[c] for c in trials["label"]],
        split=[synthetic.image_split(cfg, int(i)) for i in trials["image_index"]],
        block=trials["block"].astype(np.int32),
    )
    yield cols


def _imagenet_splits(source: ImageNetEEGSource, release: dict[str, Any]) -> np.ndarray:
    selected = imagenet_eeg.subjects(release, source.subjects)
    return imagenet_eeg.load_splits(source.splits_file, source.split_index, release, selected, source.split_indexing)


def _imagenet_dreamdiff_eeg(chunk: list[dict], sig: SignalSection, info: dict) -> np.ndarray:
    crops = []
    for t in chunk:  # trials differ in length: filter each whole, then keep 20..460 as the paper
        filtered, info["h_freq_used"] = signal.bandpass(t["eeg"], IMAGENET_EEG_SFREQ, sig.l_freq, sig.h_freq)
        stop = min(460, filtered.shape[-1])
        crops.append(signal.crop_and_interpolate(filtered, start=20, stop=stop, size=sig.window))
    return signal.normalise(np.stack(crops), mode=sig.normalise, scale=sig.scale, clip=sig.clip)


def _imagenet_reference_eeg(chunk: list[dict]) -> np.ndarray:
    """The reference code's windows: `signal` (band-pass, resampling, normalisation) does not apply."""
    return np.stack([imagenet_eeg.reference_window(t["eeg"]) for t in chunk])


def _imagenet_rows(task: SubjectTask, source: ImageNetEEGSource, sig: SignalSection, info: dict) -> Iterator[dict]:
    release = imagenet_eeg.load_release(source.eeg_file)
    splits = _imagenet_splits(source, release)
    info.update(sfreq=IMAGENET_EEG_SFREQ, skipped_images=[])
    trials = []
    for item in imagenet_eeg.subject_trials(release, splits, source.image_dir, task.subject):
        if isinstance(item, tuple):
            info["skipped_images"].append({"path": item[0], "reason": item[1]})
        else:
            trials.append(item)
    reference = source.profile == "reference"
    if reference:  # the reference code reads only trials of 450..600 samples; the count says how many it left out
        kept = [t for t in trials if imagenet_eeg.reference_keeps(t["eeg"])]
        info.update(profile="reference", trials_dropped_by_length=len(trials) - len(kept))
        trials = kept
    for first in range(0, len(trials), 256):
        chunk = trials[first : first + 256]
        eeg = _imagenet_reference_eeg(chunk) if reference else _imagenet_dreamdiff_eeg(chunk, sig, info)
        info["n_channels_orig"] = eeg.shape[1]
        mask = np.ones(eeg.shape[1], dtype=bool)
        start = np.array([t["index"] for t in chunk])
        cols = _epoch_columns(task, eeg, mask, "0", "0", start, IMAGENET_EEG_SFREQ, eeg.shape[1])
        cols.update({k: [t[k] for t in chunk] for k in ("image", "image_id", "class_name", "split")})
        cols.update(
            label=np.array([t["label"] for t in chunk], dtype=np.int32),
            block=np.array([t["block"] for t in chunk], dtype=np.int32),
        )
        yield cols


ROWS = {MOABBSource: _moabb_rows, SynthSource: _synth_rows, ImageNetEEGSource: _imagenet_rows}


# ------------------------------------------------------------------------------ shard writing


class ShardWriter:
    """Buffers column chunks and writes `part-<k>.parquet` files of `rows_per_shard` rows, atomically."""

    def __init__(self, folder: str, schema: pa.Schema, rows_per_shard: int) -> None:
        self.folder, self.schema, self.rows_per_shard = folder, schema, rows_per_shard
        self.pending: list[pa.Table] = []
        self.files: list[str] = []
        self.rows = self.bytes = 0

    def add(self, columns: dict[str, Any]) -> None:
        self.pending.append(to_table(columns, self.schema))
        while sum(t.num_rows for t in self.pending) >= self.rows_per_shard:
            table = pa.concat_tables(self.pending)
            self._write(table.slice(0, self.rows_per_shard))
            rest = table.slice(self.rows_per_shard)
            self.pending = [rest] if rest.num_rows else []

    def close(self) -> None:
        if self.pending:
            self._write(pa.concat_tables(self.pending))
            self.pending = []

    def _write(self, table: pa.Table) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self.bytes += storage.write_parquet(table, storage.join(self.folder, name), compression="zstd")
        self.files.append(name)
        self.rows += table.num_rows


def process_subject(cfg: PreprocessConfig, task: SubjectTask) -> dict[str, Any]:
    """Write one subject's shards and its done-marker; failures are returned, not raised."""
    folder = task.folder(cfg.output)
    began = time.perf_counter()
    storage.remove_tree(folder)  # a half-written subject from a killed run
    storage.makedirs(folder)
    source = cfg.sources[task.source]
    schema_of = paired_schema if task.kind == "paired" else epoch_schema
    writer = ShardWriter(folder, schema_of(128, cfg.signal.window), cfg.rows_per_shard)
    info: dict[str, Any] = {}
    try:
        for columns in ROWS[type(source)](task, source, cfg.signal, info):
            writer.add(columns)
        writer.close()
    except Exception as err:  # one bad subject must not sink the corpus; the manifest says why
        storage.remove_tree(folder)
        return {**asdict(task), "status": "failed", "error": f"{type(err).__name__}: {err}"}
    summary = {
        **asdict(task),
        "status": "done",
        "rows": writer.rows,
        "files": writer.files,
        "bytes": writer.bytes,
        "seconds": round(time.perf_counter() - began, 3),
        **info,
    }
    storage.write_text(storage.join(folder, DONE), json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------ the stage


def _versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. shipped to a cluster as a py_module
            return "not installed"

    return {n: version(n) for n in ("dreamdiff", "numpy", "scipy", "mne", "moabb", "pyarrow", "ray", "torch")}


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Plan, skip finished subjects, process the rest on Ray Data, write manifest.json."""
    import ray

    from dreamdiff.ray_init import init_ray

    began = time.perf_counter()
    output = storage.absolute(cfg.output)  # tasks may run on other nodes, in other working folders
    tasks = plan(cfg)
    record_config(cfg, output)
    markers = set(storage.find(output, DONE))  # one listing, not a request per subject
    todo = [t for t in tasks if storage.join(t.folder(output), DONE) not in markers]
    log.info(
        "preprocess: %d subject(s), %d already done, %d to process",
        len(tasks),
        len(tasks) - len(todo),
        len(todo),
    )
    results: list[dict[str, Any]] = []
    if todo:
        init_ray(cfg.ray)
        items = [asdict(t) for t in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        task_cfg = cfg.model_copy(update={"output": output})
        ds = ds.map(lambda row: process_subject(task_cfg, SubjectTask(**row)), num_cpus=1)
        results = ds.take_all()
    manifest = write_manifest(cfg, tasks, results, time.perf_counter() - began)
    totals = manifest["totals"]
    print(
        f"preprocess: {totals['rows']} epochs from {totals['subjects_done']} subject(s) "
        f"({totals['bytes'] / 1e6:.1f} MB) in {manifest['wall_seconds']:.1f} s; "
        f"{totals['subjects_failed']} failed; manifest: {storage.join(output, 'manifest.json')}"
    )
    failed = [s for s in manifest["subjects"] if s["status"] == "failed"]
    if failed:  # finished subjects are kept; a re-run retries only these
        first = failed[0]
        raise DreamdiffError(
            f"{len(failed)} subject(s) failed, e.g. {first['dataset']} subject {first['subject']}: {first['error']} "
            f"(all listed in {storage.join(output, 'manifest.json')}; re-run to retry them)"
        )
    return manifest


def write_manifest(
    cfg: PreprocessConfig, tasks: list[SubjectTask], results: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    """What was read, rows per subject, what failed and why; rebuilt from the markers each run."""
    output = storage.absolute(cfg.output)
    failed = {(r["dataset"], r["subject"]): r for r in results if r["status"] == "failed"}
    markers = set(storage.find(output, DONE))
    wanted = [m for m in (storage.join(t.folder(output), DONE) for t in tasks) if m in markers]
    with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer many small reads best in parallel
        summaries = dict(zip(wanted, pool.map(lambda m: json.loads(storage.read_text(m)), wanted), strict=True))
    subjects = []
    for task in tasks:
        marker = storage.join(task.folder(output), DONE)
        if marker in summaries:
            subjects.append(summaries[marker])
        elif (task.dataset, task.subject) in failed:
            subjects.append(failed[(task.dataset, task.subject)])
    done = [s for s in subjects if s["status"] == "done"]
    clipped = sorted({s["h_freq_used"] for s in done if s.get("h_freq_used", cfg.signal.h_freq) < cfg.signal.h_freq})
    manifest = {
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "versions": _versions(),
        "signal": {
            "band_pass_hz": [cfg.signal.l_freq, cfg.signal.h_freq],
            "upper_edge_clipped_to_hz": clipped,
            "note": "the upper edge is clipped below Nyquist at low rates (h_freq_used per subject)",
        },
        "subjects": subjects,
        "skipped_images": [img for s in done for img in s.get("skipped_images", [])],
        "totals": {
            "subjects_done": len(done),
            "subjects_failed": len(subjects) - len(done),
            "rows": sum(s["rows"] for s in done),
            "bytes": sum(s["bytes"] for s in done),
        },
        "wall_seconds": round(wall, 3),
    }
    storage.write_text(storage.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest
