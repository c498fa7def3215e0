"""Batch generation on Ray Data: every EEG's images once, batching-independent seeds, resume after a kill.

Shards are written here straight through the schema module (two paired subjects, one EEG-only), with a done-marker
per subject as preprocess writes them; the generator is the session's tiny untrained checkpoint (tests/conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from tests.shards import epoch_columns, write_subject

from dreamdiff.cli import main
from dreamdiff.config import GenerateConfig
from dreamdiff.generation import eeg_seed, png_name
from dreamdiff.models.generator import Generator
from dreamdiff.serve.batch import run

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[2]
PAIRED_ROWS, EPOCH_ROWS = 20, 10  # per paired subject (2 of them; 5 test rows each), EEG-only subject
SPLITS = ["train"] * 12 + ["val"] * 3 + ["test"] * 5


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    eeg: dict[str, np.ndarray] = {}
    for subject in (1, 2):
        columns = epoch_columns("Synth EEG/Image", subject, PAIRED_ROWS, rng)  # a name that needs sanitising
        columns.update(
            image=[_png(i) for i in range(PAIRED_ROWS)],
            image_id=[f"img-{i}" for i in range(PAIRED_ROWS)],
            label=np.arange(PAIRED_ROWS, dtype=np.int32) % 4,
            class_name=[f"class-{i % 4}" for i in range(PAIRED_ROWS)],
            split=SPLITS,
            block=np.zeros(PAIRED_ROWS, dtype=np.int32),
        )
        write_subject(root / "shards" / "paired" / f"subject-{subject}", columns, paired=True)
        eeg.update(zip(columns["epoch_id"], columns["eeg"], strict=True))
    columns = epoch_columns("Rest", 3, EPOCH_ROWS, rng)
    write_subject(root / "shards" / "epochs" / "subject-3", columns, paired=False)
    eeg.update(zip(columns["epoch_id"], columns["eeg"], strict=True))

    return {"root": root, "shards": root / "shards", "generator": tiny_checkpoint, "eeg": eeg}


def _config(world: dict[str, Any], output: str, **kw: Any) -> dict[str, Any]:
    base = {
        "input": str(world["shards"]),
        "output": str(world["root"] / output),
        "checkpoint": str(world["generator"]),
        "num_images": 2,
        "steps": 4,
        "splits": ["test"],
        "batch_size": 3,
        "max_actors": 2,
    }
    return {**base, **kw}


def _check_output(output: Path, expected_ids: set[str], num_images: int) -> dict[str, list[str]]:
    """Every expected EEG indexed once with num_images existing PNGs; no other PNG, no .tmp; index files agree."""
    index = pq.read_table(output / "index.parquet").to_pylist()
    assert json.loads((output / "index.json").read_text()) == index
    ids = [row["epoch_id"] for row in index]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids
    listed = [p for row in index for p in row["images"]]
    assert all(len(row["images"]) == num_images for row in index) and len(listed) == len(set(listed))
    on_disk = {p.relative_to(output).as_posix() for p in (output / "images").rglob("*") if p.is_file()}
    assert on_disk == set(listed)
    assert not list(output.rglob("*.tmp"))
    assert all(" " not in p and "/" not in Path(p).name for p in listed)
    return {row["epoch_id"]: row["images"] for row in index}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_every_eeg_gets_its_images_once_whatever_the_batching(ray_local: None, world: dict[str, Any]) -> None:
    test_ids = {e for e in world["eeg"] if e.startswith("Synth") and int(e.rsplit("/", 1)[1]) // 512 >= 15}
    first = run(GenerateConfig(**_config(world, "a")))
    assert (first["selected"], first["generated"], first["images"]) == (10, 10, 20)
    images = _check_output(world["root"] / "a", test_ids, 2)
    index = pq.read_table(world["root"] / "a" / "index.parquet").to_pylist()
    assert {r["split"] for r in index} == {"test"} and {r["sampler"] for r in index} == {"dpm++"}
    assert len({r["model"] for r in index}) == 1 and len(list((world["root"] / "a" / "index").glob("*"))) == 4

    # the images are the generator's, from seed eeg_seed(seed, epoch_id)
    eid = sorted(images)[0]
    direct = Generator.load(world["generator"]).generate(
        world["eeg"][eid][None].astype(np.float32), 2, steps=4, seed=[eeg_seed(0, eid)]
    )
    assert [r["seed"] for r in index if r["epoch_id"] == eid] == [eeg_seed(0, eid)]
    for j, path in enumerate(images[eid]):
        assert np.array_equal(_pixels(world["root"] / "a" / path), direct[0, j])

    # other batching, a seeded subset: the same file names and pixels for the same EEG ids
    other = run(GenerateConfig(**_config(world, "b", batch_size=4, max_eeg=6, min_actors=1, max_actors=1)))
    assert other["generated"] == 6
    chosen = set(_ids(world["root"] / "b"))
    assert len(chosen) == 6 and chosen < test_ids
    subset = _check_output(world["root"] / "b", chosen, 2)
    for eid, paths in subset.items():
        assert paths == images[eid]
        for path in paths:
            assert np.array_equal(_pixels(world["root"] / "b" / path), _pixels(world["root"] / "a" / path))

    # a re-run finds everything done; other sampling settings into the same folder are refused
    again = run(GenerateConfig(**_config(world, "a", batch_size=5)))
    assert (again["skipped"], again["generated"]) == (10, 0)
    assert _check_output(world["root"] / "a", test_ids, 2) == images


def _ids(output: Path) -> list[str]:
    return pq.read_table(output / "index.parquet").column("epoch_id").to_pylist()


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(ray_local: None, world: dict[str, Any], tmp_path: Path) -> None:
    import ray

    output = world["root"] / "killed"
    cfg = _config(world, "killed", splits=None, batch_size=1, max_actors=1)
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the job joins this test's Ray
    job_log = tmp_path / "job.log"
    with job_log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "batch_generate.py"), "--config", str(tmp_path / "gen.yaml")],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    parts = output / "index"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("*.parquet"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all, actors mid-batch
    proc.wait(timeout=60)
    _wait_until_quiet(output)  # Ray kills the dead driver's actors
    done_at_kill = len(list(parts.glob("*.parquet")))
    total = 2 * PAIRED_ROWS + EPOCH_ROWS
    assert 2 <= done_at_kill < total, f"the run should have been killed part-way: {job_log.read_text()[-2000:]}"
    assert not (output / "index.parquet").exists()

    # what else a kill can leave: a half-written file, and a finished part whose image went missing
    broken = sorted(parts.glob("*.parquet"))[0]
    lost = pq.read_table(broken).column("images").to_pylist()[0][0]
    (output / lost).unlink()
    (output / lost).with_name(f".{Path(lost).name}.0123456789ab.tmp").write_bytes(b"\x89PNG")  # atomic_write's name

    resumed = run(GenerateConfig(**cfg))
    assert resumed["skipped"] == done_at_kill - 1 and resumed["generated"] == total - done_at_kill + 1
    images = _check_output(output, set(world["eeg"]), 2)
    assert (output / lost).is_file() and len(list(parts.glob("*.parquet"))) == total
    assert {row["split"] for row in pq.read_table(output / "index.parquet").to_pylist()} == {None}  # EEG-only read
    assert all(_pixels(output / p).shape == (8, 8, 3) for paths in images.values() for p in paths)


def _wait_until_quiet(folder: Path, quiet_s: float = 1.5, limit_s: float = 30) -> None:
    """Until no file under `folder` has changed for `quiet_s`."""
    end, last, since = time.time() + limit_s, None, time.time()
    while time.time() < end:
        state = sorted(p.as_posix() for p in folder.rglob("*"))  # names only: a .tmp may vanish under a stat
        if state != last:
            last, since = state, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["num_images=0"], "num_images: Input should be greater than or equal to 1"),
        (["sampler=euler"], "sampler: Input should be 'dpm++', 'ddim' or 'plms'"),
        (["min_actors=3", "max_actors=2"], "max_actors: must be >= min_actors (3)"),
        (["batchsize=4"], "batchsize: unknown key"),
        (["checkpoint={root}/nothing"], "checkpoint: {root}/nothing must be a generator folder"),
        (["input={root}/nothing"], "input: no such shard folder"),
        (["input={generator}"], "input: {generator} holds no finished shards"),
        (["splits=[holdout]"], "splits: no rows of ['holdout']"),
        (["input={root}/shards/epochs"], "splits: {root}/shards/epochs holds no paired shards"),
        (["guidance_scale=3"], "guidance_scale: 3.0 needs a generator fine-tuned with condition dropout"),
    ],
)
def test_bad_fields_are_named_before_any_work(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(_config(world, "never")))
    folders = {"root": str(world["root"]), "generator": str(world["generator"])}
    assert main(["generate", "--config", str(path), *(o.format(**folders) for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert expected.format(**folders) in err and len(err.strip().splitlines()) == 1
    assert not (world["root"] / "never").exists()


def test_other_settings_into_a_used_output_are_refused(world: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    output = world["root"] / "used"
    output.mkdir()
    settings = {"model": "0123", "checkpoint": "x", "num_images": 2, "seed": 0, "sampler": "dpm++", "steps": 4}
    (output / "generation.json").write_text(json.dumps({**settings, "guidance_scale": 1.0}))
    path = output.parent / "used.yaml"
    path.write_text(yaml.safe_dump(_config(world, "used")))
    assert main(["generate", "--config", str(path), "steps=5"]) == 2
    err = capsys.readouterr().err
    assert "output: " in err and "changed: model, checkpoint, steps" in err
    assert sorted(p.name for p in output.iterdir()) == ["generation.json"]


FOREIGN = {  # what a person may keep in an output folder: none of it is ours to remove or rewrite
    "notes.txt": b"which runs these images came from",
    "scratch.tmp": b"someone's temporary file",
    ".notes.txt.0123456789ab.tmp": b"an editor's backup, named like ours but not of a file we write",
    "images/mine.png": _png(1),
    "images/Synth_EEG_Image/subject-1/holiday.png": _png(2),
    "images/Synth_EEG_Image/subject-1/draft.png.tmp": b"half a png of someone else's",
    "index/readme.md": b"parts are ours, this is not",
}


@pytest.mark.slow
def test_foreign_files_in_a_used_output_are_left_byte_identical(ray_local: None, world: dict[str, Any]) -> None:
    output = world["root"] / "shared"
    cfg = _config(world, "shared", max_eeg=1, batch_size=1, min_actors=1, max_actors=1)
    run(GenerateConfig(**cfg))
    for name, data in FOREIGN.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    # what a killed run of ours leaves, which the next run does remove: temporary files, an image no part lists
    folder = output / "images" / "Synth_EEG_Image" / "subject-2"
    ours = [
        output / ".index.json.0123456789ab.tmp",
        folder / f".{png_name('not/selected', 0)}.0123456789ab.tmp",
        folder / png_name("not/selected", 0),
    ]
    for path in ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(3))

    again = run(GenerateConfig(**{**cfg, "max_eeg": 2}))  # one more EEG: actors write beside the foreign files
    assert again["generated"] >= 1 and again["skipped"] + again["generated"] == 2  # the subsets may not overlap
    assert again["removed_partial_files"] == 3
    assert {name: (output / name).read_bytes() for name in FOREIGN} == FOREIGN
    assert not any(path.exists() for path in ours)
    index = pq.read_table(output / "index.parquet").to_pylist()
    assert len(index) == 1 + again["generated"] and all((output / p).is_file() for row in index for p in row["images"])


def test_an_output_with_foreign_files_and_no_marker_is_refused(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without generation.json the folder is someone else's: a run would write config.yaml, index.json... over
    theirs, so it refuses, naming `output`, and changes nothing."""
    output = tmp_path / "theirs"
    for name, data in {**FOREIGN, "config.yaml": b"their config"}.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({**_config(world, "x"), "output": str(output)}))
    assert main(["generate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dreamdiff generate: error: output: {output} holds files that `dreamdiff generate` did not")
    assert len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
