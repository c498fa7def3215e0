"""Locations as paths or URIs: pyarrow filesystems for real, Arrow's in-memory filesystem standing in for a bucket."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pytest

from dreamdiff import storage
from dreamdiff.config import load_config, record_config
from dreamdiff.errors import DreamdiffError

_bucket = itertools.count()


@pytest.fixture
def bucket() -> str:
    """A fresh folder of Arrow's in-memory filesystem (`mock://`): hierarchical, served through pyarrow.fs."""
    return f"mock:///bucket-{next(_bucket)}"


def test_paths_and_uris_normalise_join_and_split() -> None:
    assert storage.normalise("file:///tmp/a%20b/c") == "/tmp/a b/c"
    assert storage.normalise("runs/x") == "runs/x" and not storage.is_remote("file:///x")
    assert storage.scheme("S3://b/k") == "s3" and storage.scheme("/a/b") is None and storage.is_remote("gs://b/k")
    uri = "s3://bucket/runs?region=eu-west-1&endpoint_override=127.0.0.1:9000"
    assert (
        storage.join(uri, "a", "b.json")
        == "s3://bucket/runs/a/b.json?region=eu-west-1&endpoint_override=127.0.0.1:9000"
    )
    assert storage.parent(storage.join(uri, "a")) == uri
    assert storage.join("runs", "a", "b") == str(Path("runs/a/b"))
    assert storage.absolute("runs/x") == str(Path("runs/x").resolve()) and storage.absolute(uri) == uri


def test_local_writes_are_atomic_and_listed(tmp_path: Path) -> None:
    storage.write_text(tmp_path / "a" / "b" / "x.json", "{}")
    size = storage.write_parquet(pa.table({"v": [1, 2, 3]}), tmp_path / "a" / "part.parquet")
    assert size == (tmp_path / "a" / "part.parquet").stat().st_size
    assert storage.parquet_rows([str(tmp_path / "a" / "part.parquet")]) == [3]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b", "part.parquet"]  # no temporary files left
    assert storage.find(f"file://{tmp_path}", "x.json") == [str(tmp_path / "a" / "b" / "x.json")]
    with pytest.raises(ZeroDivisionError):  # a writer that dies leaves neither the file nor its temporary
        storage.atomic_write(str(tmp_path / "c.bin"), lambda tmp: 1 / 0)
    assert not any(p.name.startswith(".c.bin") or p.name == "c.bin" for p in tmp_path.iterdir())


def test_remote_filesystem_round_trip(bucket: str) -> None:
    storage.write_text(storage.join(bucket, "a", "b", "_SUCCESS.json"), "done")
    storage.write_parquet(pa.table({"v": [1, 2]}), storage.join(bucket, "a", "b", "part-0.parquet"))
    assert storage.find(bucket, "_SUCCESS.json") == [f"{bucket}/a/b/_SUCCESS.json"]
    assert storage.read_parquet(f"{bucket}/a/b/part-0.parquet").column("v").to_pylist() == [1, 2]
    assert storage.exists(f"{bucket}/a") and not storage.is_file(f"{bucket}/a")
    storage.remove_tree(f"{bucket}/a")
    assert not storage.exists(f"{bucket}/a") and storage.find(bucket, "_SUCCESS.json") == []
    storage.remove_tree(f"{bucket}/never-written")  # missing is fine


def test_staging_copies_up_and_continues_a_remote_run(bucket: str) -> None:
    first = storage.LocalStaging(bucket, pull=("metrics.jsonl",))
    assert first.remote and first.path.is_dir()
    (first.path / "metrics.jsonl").write_text('{"step": 1}\n')
    (first.path / "plots").mkdir()
    (first.path / "plots" / "p.png").write_bytes(b"png")
    first.close()
    assert not first.path.exists() and storage.read_bytes(f"{bucket}/plots/p.png") == b"png"
    second = storage.LocalStaging(bucket, pull=("metrics.jsonl",))  # a restarted worker continues the log
    with open(second.path / "metrics.jsonl", "a") as log:
        log.write('{"step": 2}\n')
    second.close()
    assert storage.read_text(f"{bucket}/metrics.jsonl").splitlines() == ['{"step": 1}', '{"step": 2}']


def test_staging_of_a_local_run_is_the_folder_itself(tmp_path: Path) -> None:
    staging = storage.LocalStaging(f"file://{tmp_path}/run")
    assert staging.path == tmp_path / "run" and staging.path.is_dir() and not staging.remote
    staging.close()
    assert (tmp_path / "run").is_dir()


def test_record_config_writes_to_a_uri_and_refuses_a_different_config(bucket: str) -> None:
    cfg = load_config("pretrain", "pretrain-demo")
    assert record_config(cfg, bucket) == f"{bucket}/config.yaml"
    record_config(cfg, bucket)  # the same config: a resume
    with pytest.raises(DreamdiffError, match="different config.*epochs"):
        record_config(load_config("pretrain", "pretrain-demo", ["epochs=99"]), bucket)
