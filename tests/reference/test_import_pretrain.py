"""`dreamdiff import-reference pretrain`: reference-format checkpoints in, a folder the stages accept out."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.reference.reference_files import (
    TINY,
    msm_state,
    pretrain_checkpoint,
    pretrain_config_values,
    save_reference,
)
from tests.shards import epoch_columns, write_subject

from dreamdiff.cli import main
from dreamdiff.config import validate_config
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.eeg_diffusion import load_encoder_weights
from dreamdiff.models.msm import MSMConfig, MSMEncoder, build_msm
from dreamdiff.reference.checkpoint import load_reference_checkpoint
from dreamdiff.reference.folder import IMPORT_FILE
from dreamdiff.reference.import_pretrain import import_pretrain
from dreamdiff.train.checkpoint import check_training_state, load_training_state
from dreamdiff.train.finetune import resolve_encoder
from dreamdiff.train.optim import build_optimizer
from dreamdiff.train.pretrain_loop import ENCODER_FILE


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return pretrain_checkpoint(tmp_path / "checkpoint.pth", image_branch=True)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_encoder(state: dict[str, torch.Tensor], eeg: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference's downstream `eeg_encoder.forward_encoder`, written out op by op: patch embedding, positions
    without the cls row, timm blocks with LayerNorm eps 1e-5 and exact GELU, the final norm; no cls token."""
    w = state["patch_embed.proj.weight"]
    b, c, t = eeg.shape
    p = w.shape[2]
    x = torch.einsum("bclp,dcp->bld", eeg.reshape(b, c, t // p, p), w) + state["patch_embed.proj.bias"]
    x = x + state["pos_embed"][0, 1:]
    n, d = x.shape[1], x.shape[2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        s = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = _layer_norm(x, s["norm1.weight"], s["norm1.bias"])
        q, k, v = (h @ s["attn.qkv.weight"].T + s["attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads).unbind(2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // heads)
        attended = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v).reshape(b, n, d)
        x = x + attended @ s["attn.proj.weight"].T + s["attn.proj.bias"]
        h = _layer_norm(x, s["norm2.weight"], s["norm2.bias"])
        h = h @ s["mlp.fc1.weight"].T + s["mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ s["mlp.fc2.weight"].T + s["mlp.fc2.bias"]
    return _layer_norm(x, state["norm.weight"], state["norm.bias"])


def test_every_tensor_is_mapped_recomputed_or_reported(checkpoint: Path, tmp_path: Path) -> None:
    record = import_pretrain(checkpoint, tmp_path / "out")
    state = msm_state(image_branch=True)
    assert set(record["tensors"]) == set(state)  # every tensor of the file has an entry
    statuses = {name: entry["status"] for name, entry in record["tensors"].items()}
    assert {n for n, s in statuses.items() if s == "recomputed"} == {"pos_embed", "decoder_pos_embed"}
    assert {n for n, s in statuses.items() if s == "unused"} == {
        "nature_img_decoder_embed.weight",
        "nature_img_mask_token",
    }
    assert record["tensors"]["blocks.1.mlp.fc2.bias"] == {"status": "mapped", "to": "encoder.blocks.1.mlp.2.bias"}
    assert record["tensors"]["mask_token"]["to"] == "decoder.mask_token"
    assert all(e["verified"] for e in record["tensors"].values() if e["status"] == "recomputed")
    assert json.loads((tmp_path / "out" / IMPORT_FILE).read_text())["counts"] == record["counts"]
    # every mapped tensor holds the file's values
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "out" / ENCODER_FILE))
    for name, entry in record["tensors"].items():
        if entry["status"] == "mapped":
            torch.testing.assert_close(ours[entry["to"]], state[name].reshape(ours[entry["to"]].shape), rtol=0, atol=0)


def test_the_architecture_is_inferred_from_shapes_and_config(checkpoint: Path, tmp_path: Path) -> None:
    record = import_pretrain(checkpoint, tmp_path / "out")
    model = MSMConfig.model_validate(record["model"])
    assert {k: getattr(model, k) for k in TINY} == TINY
    assert model.mask_ratio == 0.1 and model.profile == "reference"  # the released config's, not the paper's 0.75
    assert record["sizes_from"]["num_heads"] == "config" and record["sizes_from"]["mlp_ratio"] == "tensor shapes"
    assert record["reference_config"]["num_epoch"] == 500 and record["source"]["epoch"] == 499
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert MSMConfig.model_validate(saved["model"]) == model


def test_the_reference_profile_encoder_matches_the_reference_maths(checkpoint: Path, tmp_path: Path) -> None:
    import_pretrain(checkpoint, tmp_path / "out")
    msm, weights = resolve_encoder(
        validate_config(
            "finetune",
            {
                "data": str(tmp_path),
                "output": str(tmp_path / "ft"),
                "encoder_checkpoint": str(tmp_path / "out"),
                "tiny_sd": {"sample_size": 16, "cross_attention_dim": 32},
            },
            "test",
        )
    )
    assert msm.profile == "reference" and weights is not None
    encoder = MSMEncoder(msm).eval()
    load_encoder_weights(encoder, weights)
    eeg = torch.randn(3, TINY["num_channels"], TINY["num_samples"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(eeg)
    expected = reference_encoder(msm_state(image_branch=True), eeg, TINY["num_heads"])
    assert ours.shape == expected.shape == (3, TINY["num_samples"] // TINY["patch_size"], TINY["embed_dim"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # our default profile differs from it (the cls token and the eps), which is why the profile exists
    default = MSMEncoder(msm.model_copy(update={"profile": "dreamdiff"})).eval()
    load_encoder_weights(default, weights)
    with torch.no_grad():
        assert (default(eeg) - expected).abs().max() > 1e-3


def test_the_folder_resumes_pretraining(checkpoint: Path, tmp_path: Path) -> None:
    record = import_pretrain(checkpoint, tmp_path / "out")
    assert check_training_state(tmp_path / "out") == {"step": 0}
    model = build_msm(MSMConfig.model_validate(record["model"]))
    optimizer = build_optimizer(model, 1e-3)
    assert load_training_state(tmp_path / "out", model, optimizer) == {"step": 0}
    torch.testing.assert_close(model.encoder.cls_token, msm_state()["cls_token"].reshape(-1), rtol=0, atol=0)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05  # the reference's
    loss = model(torch.randn(2, TINY["num_channels"], TINY["num_samples"])).loss
    loss.backward()
    optimizer.step()  # fresh moments: a step runs


def test_cli_imports_once_and_skips_the_same_file_again(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["import-reference", "pretrain", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 recomputed" in printed and "2 unused" in printed and "mask_ratio 0.1" in printed
    first = (out / ENCODER_FILE).stat().st_mtime_ns
    assert main(["import-reference", "pretrain", str(checkpoint), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out and (out / ENCODER_FILE).stat().st_mtime_ns == first
    other = pretrain_checkpoint(tmp_path / "other.pth", seed=5)
    assert main(["import-reference", "pretrain", str(other), "--out", str(out)]) == 2
    assert "holds an import of another file" in capsys.readouterr().err


def test_a_booby_trapped_pickle_is_refused_before_it_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"

    class Trap:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "trap.pth"
    torch.save({"model": msm_state(), "config": Trap(), "epoch": 1}, path)
    with pytest.raises(DreamdiffError, match="not allowed, and nothing in it was run"):
        load_reference_checkpoint(path, "pretrain")
    assert main(["import-reference", "pretrain", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exec" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "defect", ["generator", "truncated", "unknown tensor", "not a dict", "missing head count", "misshapen tensor"]
)
def test_bad_checkpoints_fail_with_one_line_and_write_nothing(
    defect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.pth"
    if defect == "generator":
        save_reference(path, {"model_state_dict": {"x": torch.zeros(1)}, "state": {}}, {"Config_Generative_Model": {}})
        expected = "is a reference generator checkpoint"
    elif defect == "truncated":
        data = pretrain_checkpoint(tmp_path / "whole.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "truncated or corrupt"
    elif defect == "unknown tensor":
        state = msm_state() | {"blocks.0.ls1.gamma": torch.ones(16)}
        save_reference(path, {"model": state}, {"Config_MBM_EEG": pretrain_config_values()})
        expected = "unknown to a reference MSM"
    elif defect == "not a dict":
        torch.save([torch.zeros(1)], path)
        expected = "holds a list"
    elif defect == "missing head count":
        save_reference(path, {"model": msm_state()}, {"Config_MBM_EEG": {"mask_ratio": 0.5}})
        expected = "lacks \\['num_heads', 'decoder_num_heads'\\]"
    else:
        state = msm_state() | {"patch_embed.proj.weight": torch.zeros(16, 32)}
        save_reference(path, {"model": state}, {"Config_MBM_EEG": pretrain_config_values()})
        expected = "patch_embed.proj.weight has shape \\[16, 32\\]; expected 3 axes"
    out = tmp_path / "out"
    assert main(["import-reference", "pretrain", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dreamdiff import-reference: error: CHECKPOINT:")
    assert re.search(expected, err), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_resuming_with_other_model_settings_fails_before_any_work(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import_pretrain(checkpoint, tmp_path / "out")
    rng = np.random.default_rng(0)
    for subject in (1, 2):
        write_subject(tmp_path / "shards" / f"s{subject}", epoch_columns("d", subject, 40, rng))
    run = ["pretrain", "--config", "pretrain-demo.yaml", f"data={tmp_path / 'shards'}", f"output={tmp_path / 'run'}"]
    assert main([*run, f"resume_from={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "resume_from:" in err and "model.num_channels=8" in err and "model.profile=reference" in err
    assert not (tmp_path / "run").exists()

    # a checkpoint folder inside a run: the run's own record is read
    checkpoint = tmp_path / "earlier" / "ray" / "train" / "checkpoint_000001"
    shutil.copytree(tmp_path / "out", checkpoint)
    (checkpoint / "config.yaml").unlink()
    shutil.copy(tmp_path / "out" / "config.yaml", tmp_path / "earlier" / "config.yaml")
    assert main([*run, f"resume_from={checkpoint}"]) == 2
    assert "model.num_channels=8" in capsys.readouterr().err
