"""The URI check every stage gets from the CLI: refused where a stage needs files, named by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamdiff.cli import main
from dreamdiff.config import load_config
from dreamdiff.errors import DreamdiffError
from dreamdiff.locations import check_locations


def test_config_check_refuses_uris_where_a_stage_needs_files_and_names_the_field() -> None:
    cfg = load_config("pretrain", "pretrain-demo", ["data=s3://b/shards", "output=gs://b/run"])
    check_locations("pretrain", cfg)  # pretrain reads and writes through pyarrow.fs
    with pytest.raises(DreamdiffError, match=r"^resume_from: the pretrain stage .* got the URI s3://b/run"):
        check_locations("pretrain", load_config("pretrain", "pretrain-demo", ["resume_from=s3://b/run"]))
    sweep = load_config("sweep", "sweep-demo", ["base.data=s3://b/shards"])
    with pytest.raises(DreamdiffError, match=r"^base\.data: the sweep stage"):
        check_locations("sweep", sweep)
    with pytest.raises(DreamdiffError, match=r"^output: unknown URI scheme 'ftp'"):
        check_locations("preprocess", load_config("preprocess", "preprocess-demo", ["output=ftp://h/x"]))
    evaluate = load_config("evaluate", "evaluate-demo", ["data=file:///srv/shards"])
    check_locations("evaluate", evaluate)  # a file:// URI is a local path to every stage
    assert evaluate.data == "/srv/shards"


def test_cli_refuses_a_uri_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code = main(["finetune", "--config", "finetune-demo", "data=s3://bucket/shards", f"output={out}"])
    assert code == 2 and not out.exists()
    assert "error: data: the finetune stage reads and writes local" in capsys.readouterr().err
