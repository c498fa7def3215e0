"""Throughput of the preprocess stage (`dreamdiff.data.preprocess.run`, the code path of `dreamdiff
preprocess`) on MOABB's offline FakeDataset, for a few Ray CPU budgets.

Each budget gets a fresh local Ray (`ray.init(num_cpus=N)`, timed apart as `ray_init_s`), runs the
same config into a fresh temporary output and shuts Ray down. The signal settings are those of
configs/preprocess-demo.yaml (band-pass 5-95 Hz, 250 Hz, 512-sample windows, tiled to 128 channels,
z-scored, 256 rows per shard); only the source and the output differ. Prints one JSON line per
measurement, then one "extrapolation" line: time and disk for the paper's ~120,000-epoch pretraining
corpus and for MOABB's whole catalogue at the measured 1-CPU throughput, on 1 CPU and on 64 CPUs
assuming linear scaling.

`wall_s` is `run()` itself: planning, Ray Data start-up, the worker processes' start-up and imports,
the subject tasks and the manifest. `task_s_sum` adds the per-subject "seconds" of the manifest (read,
filter, window, normalise, write); `overhead_s` is what the tasks spread over the CPUs do not explain.
Everything (outputs, Ray's session folder, MNE/MOABB's scratch) lives in one temporary folder, removed
at exit.

    python benchmarks/preprocess.py              # 24 subjects x 64 ch x 2 runs x 240 s at 250 Hz
    python benchmarks/preprocess.py --quick      # smoke size (the test runs this)
    python benchmarks/preprocess.py --cpus 1 2 4 --subjects 48
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dreamdiff.config import PreprocessConfig, load_config, validate_config

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "preprocess-demo.yaml"
# mne.channels.make_standard_montage("biosemi64").ch_names: a 64-electrode layout of 10-20 (10-10) names
CHANNELS_64 = (
    "Fp1 AF7 AF3 F1 F3 F5 F7 FT7 FC5 FC3 FC1 C1 C3 C5 T7 TP7 CP5 CP3 CP1 P1 P3 P5 P7 P9 PO7 PO3 O1 Iz Oz POz "
    "Pz CPz Fpz Fp2 AF8 AF4 AFz Fz F2 F4 F6 F8 FT8 FC6 FC4 FC2 FCz Cz C2 C4 C6 T8 TP8 CP6 CP4 CP2 P2 P4 P6 "
    "P8 P10 PO8 PO4 O2"
).split()
PAPER_CORPUS_EPOCHS = 120_000  # DreamDiffusion's pretraining set: ~120 k epochs from 400+ MOABB subjects
# moabb.datasets.utils.dataset_list of MOABB 1.7.2 (161 entries, FakeDataset among them), counted
# offline by instantiating each class: 160 real datasets, 3,608 subjects.
CATALOGUE = {"moabb_version": "1.7.2", "datasets": 160, "subjects": 3608}
CLUSTER_CPUS = 64


def bench_config(args: argparse.Namespace, output: Path) -> PreprocessConfig:
    """The demo's preprocess config with one FakeDataset layout as the only source."""
    data = load_config("preprocess", BASE_CONFIG).model_dump(mode="json")
    layout = {
        "n_subjects": args.subjects,
        "n_sessions": 1,
        "n_runs": args.runs,
        "sfreq": args.sfreq,
        "duration": args.duration,
        "channels": CHANNELS_64[: args.channels],
    }
    data.update(
        output=str(output),
        sources=[{"kind": "moabb", "datasets": ["FakeDataset"], "subjects": "all", "fake": [layout]}],
    )
    cfg = validate_config("preprocess", data, "benchmarks/preprocess.py")
    assert isinstance(cfg, PreprocessConfig)
    return cfg


def summary(args: argparse.Namespace, cfg: PreprocessConfig) -> dict[str, Any]:
    sig = cfg.signal
    return {
        "source": "moabb FakeDataset",
        "subjects": args.subjects,
        "channels": args.channels,
        "sfreq": args.sfreq,
        "runs_per_subject": args.runs,
        "seconds_per_run": args.duration,
        "seconds_of_eeg": args.subjects * args.runs * args.duration,
        "signal": f"{sig.l_freq:g}-{sig.h_freq:g} Hz, to {sig.sfreq} Hz, {sig.window} samples, {sig.channels} "
        f"to 128, {sig.normalise}, {cfg.rows_per_shard} rows per shard",
    }


def measure(args: argparse.Namespace, cpus: int, scratch: Path) -> dict[str, Any]:
    """One fresh local Ray with `cpus` CPUs, one `run()` into a fresh output, then shut down and clean."""
    import ray

    from dreamdiff.data.preprocess import run
    from dreamdiff.ray_init import start_local_ray

    output = scratch / f"shards-{cpus}cpu"
    cfg = bench_config(args, output)
    began = time.perf_counter()
    start_local_ray(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init_s = time.perf_counter() - began
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            manifest = run(cfg)
        wall = time.perf_counter() - began
    finally:
        ray.shutdown()
        shutil.rmtree(output, ignore_errors=True)
    failed = [s for s in manifest["subjects"] if s["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} subject(s) failed, first: {failed[0]['error']}")
    totals = manifest["totals"]
    task_s = [s["seconds"] for s in manifest["subjects"]]
    epochs, size = totals["rows"], totals["bytes"]
    return {
        "name": "preprocess",
        "config": summary(args, cfg),
        "ray_cpus": cpus,
        "subjects_done": totals["subjects_done"],
        "epochs": epochs,
        "wall_s": round(wall, 2),
        "epochs_per_s": round(epochs / wall, 1),
        "MB_per_s": round(size / 1e6 / wall, 2),
        "bytes": size,
        "bytes_per_epoch": round(size / epochs),
        "ray_init_s": round(ray_init_s, 2),
        "task_s_sum": round(sum(task_s), 2),
        "task_s_per_subject": round(sum(task_s) / len(task_s), 3),
        "task_epochs_per_cpu_s": round(epochs / sum(task_s), 1),
        "overhead_s": round(wall - sum(task_s) / cpus, 2),
        "device": f"cpu ({os.cpu_count()} cores)",
    }


def extrapolate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Time and disk for the paper's corpus and MOABB's catalogue at the first row's throughput."""
    base = rows[0]
    per_subject = base["epochs"] / base["subjects_done"]
    rates = {"end_to_end": base["epochs_per_s"], "task_compute_only": base["task_epochs_per_cpu_s"]}

    def target(name: str, epochs: float) -> dict[str, Any]:
        out: dict[str, Any] = {"target": name, "epochs": round(epochs)}
        out["disk_GB"] = round(epochs * base["bytes_per_epoch"] / 1e9, 1)
        for basis, rate in rates.items():
            seconds = epochs / rate
            out[basis] = {
                "1_cpu_s": round(seconds),
                f"{CLUSTER_CPUS}_cpu_s": round(seconds / CLUSTER_CPUS, 1),
            }
        return out

    catalogue = (
        f"MOABB {CATALOGUE['moabb_version']} catalogue "
        f"({CATALOGUE['datasets']} datasets, {CATALOGUE['subjects']} subjects)"
    )
    return {
        "name": "extrapolation",
        "basis": (
            f"the {base['ray_cpus']}-CPU measurement: end_to_end = epochs / wall_s of run() "
            f"({base['epochs_per_s']} epochs/s, Ray worker start-up included); task_compute_only = "
            f"epochs / task_s_sum ({base['task_epochs_per_cpu_s']} epochs/s per CPU)"
        ),
        "bytes_per_epoch": base["bytes_per_epoch"],
        "epochs_per_subject": per_subject,
        "targets": [
            target("DreamDiffusion pretraining corpus", PAPER_CORPUS_EPOCHS),
            target(catalogue, CATALOGUE["subjects"] * per_subject),
        ],
        "measured_scaling": {f"{r['ray_cpus']}_cpu": round(r["epochs_per_s"] / base["epochs_per_s"], 2) for r in rows},
        "assumptions": [
            f"every catalogue subject yields {per_subject:g} epochs, as a measured FakeDataset subject "
            "(real subjects hold from minutes to hours of EEG)",
            f"{CLUSTER_CPUS} CPUs scale linearly from 1 CPU (one task per subject, no shared state; "
            "ignores scheduling, storage bandwidth and per-worker start-up)",
            "no download and no file parsing: FakeDataset generates its recordings in memory",
            "disk at the measured bytes per epoch: float16 zstd Parquet of tiled channels; real EEG, "
            "other channel counts (tiling repeats) and resampling change both size and time",
        ],
        "device": base["device"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU budgets; the first is the base")
    p.add_argument("--subjects", type=int, default=24)
    p.add_argument(
        "--channels",
        type=int,
        default=64,
        choices=range(1, len(CHANNELS_64) + 1),
        metavar=f"1..{len(CHANNELS_64)}",
    )
    p.add_argument("--sfreq", type=float, default=250.0, help="FakeDataset rate (the demo config resamples to 250 Hz)")
    p.add_argument("--runs", type=int, default=2, help="runs per subject (one session)")
    p.add_argument("--duration", type=float, default=240.0, help="seconds per run")
    p.add_argument("--quick", action="store_true", help="smoke size: 2 subjects x 1 run of 30 s")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.runs, args.duration = 2, 1, 30.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="ddb-"))  # short: Ray's socket paths must stay under 107 bytes
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "MNE_DATA", "_MNE_FAKE_HOME_DIR")}
    # Ray's session folder, the workers' temp files (FakeDataset makes one per layout and process)
    # and MNE's config all land in `scratch`; Ray workers inherit this environment.
    os.environ.update(TMPDIR=str(scratch), MNE_DATA=str(scratch), _MNE_FAKE_HOME_DIR=str(scratch))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tempfile.tempdir = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import moabb.datasets  # noqa: F401  (the driver's imports are paid before the first timing)
        rows: list[dict[str, Any]] = []
        for cpus in args.cpus:
            row = measure(args, cpus, scratch)
            if rows:
                row[f"scaling_vs_{rows[0]['ray_cpus']}cpu"] = round(row["epochs_per_s"] / rows[0]["epochs_per_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps(extrapolate(rows)), flush=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
