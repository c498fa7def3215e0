"""`dreamdiff import-reference generator`: a reference generation checkpoint on a base SD -> a generator folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file
from tests.reference.reference_files import (
    ENCODER,
    generation_checkpoint,
    generation_state,
    ldm_unet_state,
    pretrain_checkpoint,
    save_reference,
)

from dreamdiff.cli import main
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion import build_tiny_sd
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.generator import Generator, read_generator_meta
from dreamdiff.reference.folder import IMPORT_FILE
from dreamdiff.reference.import_generator import import_generator

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def reference(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generation_checkpoint(tmp_path_factory.mktemp("reference") / "checkpoint.pth", tiny_sd)


@pytest.fixture(scope="module")
def imported(reference: Path, tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "generator"
    import_generator(reference, str(tiny_sd), out)
    return out


def test_every_tensor_is_mapped_verified_recomputed_or_reported(imported: Path, tiny_sd: Path) -> None:
    record = json.loads((imported / IMPORT_FILE).read_text())
    state = generation_state(tiny_sd)
    assert set(record["tensors"]) == set(state)
    status = {name: entry["status"] for name, entry in record["tensors"].items()}
    trained = [n for n in state if ".transformer_blocks." in n and (".attn2." in n or ".norm2." in n)]
    assert trained and all(record["tensors"][n]["to"].startswith("unet.") for n in trained)
    unet = [n for n in state if n.startswith("model.diffusion_model.") and "time_embed_condtion" not in n]
    assert {status[n] for n in unet if n not in trained} == {"verified"}  # the base model's, checked
    assert (
        record["tensors"]["model.diffusion_model.time_embed_condtion.2.weight"]["to"] == "time_conditioner.proj.weight"
    )
    assert record["tensors"]["cond_stage_model.dim_mapper.bias"]["to"] == "conditioner.proj.bias"
    assert record["tensors"]["cond_stage_model.mapping.maxpool.weight"]["to"] == "clip_head.pool.weight"
    assert status["cond_stage_model.mae.pos_embed"] == status["betas"] == status["alphas_cumprod"] == "recomputed"
    assert {n for n, s in status.items() if s == "unused"} == {
        "cond_stage_model.mae.mask_token",
        "first_stage_model.encoder.conv_in.weight",
        "image_embedder.transformer.vision_model.post_layernorm.weight",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "posterior_variance",
    }


def test_the_generator_folder_holds_the_reference_weights_and_samples(imported: Path, tiny_sd: Path) -> None:
    meta = read_generator_meta(imported)
    spec = meta["spec"]
    assert spec.profile == spec.msm.profile == "reference" and spec.conditioner.time_cond
    assert (spec.msm.embed_dim, spec.msm.depth, spec.msm.mlp_ratio, spec.conditioner.mid_tokens) == (16, 1, 1.0, 8)
    generator = Generator.load(imported)
    state = generation_state(tiny_sd)
    theirs = convert_ldm_unet_checkpoint(
        {k: v for k, v in state.items() if "time_embed_condtion" not in k}, dict(generator.components.unet.config)
    )
    ours = generator.model.state_dict()
    for name in generator.model.unet_trainable:  # the reference's trained cross-attention, not the base model's
        torch.testing.assert_close(ours[f"unet.{name}"], theirs[name], rtol=0, atol=0)
    torch.testing.assert_close(
        ours["time_conditioner.token_mixer.0.weight"], state["model.diffusion_model.time_embed_condtion.0.weight"]
    )
    torch.testing.assert_close(ours["encoder.cls_token"], state["cond_stage_model.mae.cls_token"].reshape(-1))
    eeg = np.random.default_rng(0).standard_normal((2, ENCODER["num_channels"], ENCODER["num_samples"]))
    images = generator.generate(eeg.astype(np.float32), num_images=2, steps=3, sampler="plms", seed=0)
    assert images.shape == (2, 2, 8, 8, 3) and images.dtype == np.uint8


def test_a_base_model_other_than_the_one_trained_on_is_refused(reference: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)  # same sizes as tiny_sd, other weights
    other = build_tiny_sd(
        TinyDiffusionConfig(
            sample_size=8, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]
        ),
        tmp_path / "other-sd",
    )
    with pytest.raises(DreamdiffError, match="differs from the base model's .* outside the cross-attention"):
        import_generator(reference, str(other), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_imports_once_and_prints_what_was_unused(
    reference: Path, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["import-reference", "generator", str(reference), "--base-model", str(tiny_sd), "--out", str(tmp_path / "g")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "unused: the frozen VAE" in printed and "verified" in printed and "profile reference" in printed
    assert main(args) == 0 and "skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "defect",
    ["pretrain checkpoint", "unknown tensor", "global pool", "no conditioner", "missing UNet tensor", "wrong token"],
)
def test_bad_checkpoints_fail_with_one_line_and_write_nothing(
    defect: str, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.pth"
    values = {"num_heads": ENCODER["num_heads"]}
    if defect == "pretrain checkpoint":
        pretrain_checkpoint(path)
        expected = "is a reference pretrain checkpoint .*`dreamdiff import-reference pretrain`"
    elif defect == "unknown tensor":
        state = generation_state(tiny_sd) | {"model_ema.decay": torch.tensor(0.999)}
        save_reference(path, {"model_state_dict": state}, {"Config_Generative_Model": values})
        expected = "unknown to a reference generation checkpoint .*model_ema.decay"
    elif defect == "global pool":
        generation_checkpoint(path, tiny_sd, global_pool=True)
        expected = "global_pool True"
    elif defect == "no conditioner":
        state = {k: v for k, v in generation_state(tiny_sd).items() if "dim_mapper" not in k}
        save_reference(path, {"model_state_dict": state}, {"Config_Generative_Model": values})
        expected = "no 'cond_stage_model.dim_mapper.weight'"
    elif defect == "missing UNet tensor":
        state = generation_state(tiny_sd)
        del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
        save_reference(path, {"model_state_dict": state}, {"Config_Generative_Model": values})
        expected = "its UNet does not fit the base model's .*in_layers|conv1"
    else:
        state = generation_state(tiny_sd) | {"cond_stage_model.mae.cls_token": torch.zeros(1, 1, 5)}
        save_reference(path, {"model_state_dict": state}, {"Config_Generative_Model": values})
        expected = "cls_token has shape \\[1, 1, 5\\]"
    out = tmp_path / "out"
    assert main(["import-reference", "generator", str(path), "--base-model", str(tiny_sd), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dreamdiff import-reference: error: CHECKPOINT:"), err
    assert re.search(expected, err), err
    assert not out.exists()


def test_a_single_file_base_model_is_converted_into_the_generator_folder(
    reference: Path, imported: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    """SD's single-file layout (the CompVis UNet's tensors in one file) with the component configs of a diffusers
    folder: converted by diffusers into <out>/base-model, the same model as the folder it came from."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    single = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_unet_state(unet).items()}, str(single))
    out = tmp_path / "generator"
    record = import_generator(reference, str(single), out, base_config=str(tiny_sd))
    assert record["base_model"] == {"given": str(single), "used": str(out.resolve() / "base-model")}
    assert read_generator_meta(out)["spec"].base_model == str(out.resolve() / "base-model")
    eeg = np.random.default_rng(0).standard_normal((1, ENCODER["num_channels"], ENCODER["num_samples"]))
    from_file, from_folder = (
        Generator.load(folder).generate(eeg.astype(np.float32), num_images=1, steps=2, seed=0)
        for folder in (out, imported)
    )
    np.testing.assert_array_equal(from_file, from_folder)
    with pytest.raises(DreamdiffError, match="--base-model: cannot convert"):
        import_generator(reference, str(single), tmp_path / "g2", base_config=str(tmp_path / "no-configs"))
    assert not (tmp_path / "g2").exists()


def test_an_out_folder_with_a_corrupt_record_is_refused(reference: Path, tiny_sd: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / IMPORT_FILE).write_text("{not json")
    with pytest.raises(DreamdiffError, match="--out: .* is not an import record"):
        import_generator(reference, str(tiny_sd), out)
    assert (out / IMPORT_FILE).read_text() == "{not json"  # left as it was
