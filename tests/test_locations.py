"""Path fields found by type, and the URI check every stage gets from the CLI: refused where a stage needs files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamdiff.cli import main
from dreamdiff.config import TRIAL_OUTPUT, LocalPath, Location, ModelRef, PathKind, load_config
from dreamdiff.configbase import StrictModel
from dreamdiff.errors import DreamdiffError
from dreamdiff.locations import check_locations, path_fields


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


class _Section(StrictModel):
    path: LocalPath | None = None
    name: str = "s3://not-a-path"  # a string that is no path field is never checked


class _Config(StrictModel):
    store: Location
    model: ModelRef = "org/model"
    section: _Section = _Section()
    sections: list[_Section] = []


def test_path_fields_are_found_by_type_in_sections_lists_and_optionals() -> None:
    cfg = _Config(store="s3://b/x", section=_Section(path="file:///srv/p"), sections=[_Section(), _Section(path="q")])
    found = {f.key: f.kind for f in path_fields(cfg)}
    assert found == {
        "store": PathKind.LOCATION,
        "model": PathKind.MODEL_REF,
        "section.path": PathKind.LOCAL,
        "sections.1.path": PathKind.LOCAL,
    }
    check_locations("new", cfg)  # a Location takes a URI without being listed anywhere
    assert cfg.section.path == "/srv/p"
    cfg.sections[0].path = "gs://b/y"
    with pytest.raises(DreamdiffError, match=r"^sections\.0\.path: the new stage reads and writes local"):
        check_locations("new", cfg)


def test_the_demo_places_every_path_field_of_its_sections_inside_its_run_folder(tmp_path: Path) -> None:
    from dreamdiff.demo import resolve

    cfg = resolve(load_config("demo", "demo", [f"output={tmp_path}"]))
    moved = {f.key: f.value for f in path_fields(cfg) if f.value != TRIAL_OUTPUT}
    assert {"preprocess.output", "sweep.base.data", "evaluate.classifier", "generate.input"} <= set(moved)
    assert all(Path(value).is_relative_to(tmp_path) for value in moved.values()), moved
    assert cfg.sweep.base.output == TRIAL_OUTPUT and cfg.finetune.ray == cfg.ray
    check_locations("demo", cfg)  # every path is local: nothing to refuse
    with pytest.raises(DreamdiffError, match=r"^pretrain\.data: the demo stage"):  # a section's URI: refused
        check_locations("demo", load_config("demo", "demo", ["pretrain.data=s3://b/shards"]))
