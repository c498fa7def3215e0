"""The finetune stage: Stable Diffusion conditioned on the EEG encoder, plus CLIP alignment, on Ray Train.

The driver (`run`) checks every input before any work (data, encoder checkpoint, base model, CLIP, sizes),
builds the offline stand-ins the config asks for (a tiny SD in <output>/tiny-sd, a seeded random CLIP in
<output>/clip-random.safetensors), has Ray Data compute the frozen models' outputs once (train/precompute.py,
into <output>/precomputed/) and fits a TorchTrainer whose workers run `finetune_loop.train_loop`: they
report to Ray Train only with a checkpoint (every `checkpoint.every_steps` and at the end). Re-running the same
config into the same output folder resumes from the last checkpoint. At the end rank 0 writes the generator
checkpoint (only the trained tensors + the base model id) into <output>/generator/ and a preview grid (held-out
stimuli beside images generated from their EEG) into <output>/plots/preview.png.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open

from dreamdiff.config import FinetuneConfig, PreviewSection, TinySDPretrainSection, record_config
from dreamdiff.data.reader import read_schema, read_table, shard_files
from dreamdiff.data.schema import PAIRED_COLUMNS
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.clip import _check_request, load_clip_image_encoder, save_random_clip
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import build_tiny_sd
from dreamdiff.models.eeg_diffusion import ENCODER_PREFIX, GeneratorSpec
from dreamdiff.models.generator import WEIGHTS_FILE, check_generator_weights, read_generator_meta
from dreamdiff.models.msm import MSMConfig, MSMEncoder
from dreamdiff.train import tiny_sd_pretrain
from dreamdiff.train.finetune_loop import GENERATOR_DIR, steps_per_epoch, train_loop
from dreamdiff.train.precompute import FrozenModels, decode_images, precompute
from dreamdiff.train.pretrain import ENCODER_FILE
from dreamdiff.train.trainer import build_torch_trainer, fit_trainer, fits_object_store, training_dataset

log = logging.getLogger(__name__)

PRECOMPUTED_DIR = "precomputed"
TINY_SD_DIR = "tiny-sd"
RANDOM_CLIP_FILE = "clip-random.safetensors"
TRAIN_COLUMNS = ("eeg", "channel_mask", "latents", "clip_embedding")
_SIZE_FIELDS = ("num_channels", "num_samples", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


# ------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class BaseShape:
    """What the driver must know of the base model before loading it: read from its config files alone."""

    cross_attention_dim: int
    image_size: int
    latent_shape: tuple[int, int, int]


def paired_files(data: str | Path) -> list[str]:
    """The finished shard files under `data` that hold pairs; epoch-only shards beside them are ignored."""
    files = [f for f in shard_files(data) if set(PAIRED_COLUMNS) <= set(read_schema(f).names)]  # names a bad file
    if not files:
        raise DreamdiffError(f"data: {data} holds no paired shards (EEG + image); preprocess a paired source into it")
    return files


def split_counts(files: list[str]) -> dict[str, int]:
    """Rows per split over `files` (reads the split column only)."""
    counts: dict[str, int] = {}
    for file in files:
        for item in pc.value_counts(read_table(file, columns=["split"]).column("split")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def resolve_init(cfg: FinetuneConfig) -> GeneratorSpec | None:
    """The spec of the generator that `init_from` names, checked against the config: the run must build the same
    encoder, conditioner, trainable set and profile, or the generator's tensors would not fit (or would mean
    something else)."""
    if cfg.init_from is None:
        return None
    try:
        spec = read_generator_meta(cfg.init_from)["spec"]
        check_generator_weights(cfg.init_from)
    except DreamdiffError as err:
        raise DreamdiffError(f"init_from: {err}") from None
    shape = base_shape(cfg)
    if shape.image_size != spec.image_size:
        raise DreamdiffError(
            f"init_from: {cfg.init_from} draws {spec.image_size} px images but the base model draws "
            f"{shape.image_size} px; give the base model it was trained on ({spec.base_model})"
        )
    if cfg.base_model is not None:
        _check_init_unet(cfg, spec)
    built = generator_spec(cfg, spec.msm, spec.base_model, spec.image_size)
    changed = [f"profile={spec.profile}"] if built.profile != spec.profile else []
    changed += [f"trainable={spec.trainable}"] if built.trainable != spec.trainable else []
    theirs, ours = spec.conditioner.model_dump(), built.conditioner.model_dump()
    changed += [f"conditioner.{k}={v}" for k, v in theirs.items() if v != ours[k]]
    if cfg.encoder is not None:
        theirs, ours = spec.msm.architecture(), cfg.encoder.architecture()
        changed += [f"encoder.{k}={v}" for k, v in theirs.items() if v != ours[k] and k != "profile"]
    if changed:
        raise DreamdiffError(f"init_from: {cfg.init_from} was trained with other settings; set {' '.join(changed)}")
    return spec


def _check_init_unet(cfg: FinetuneConfig, spec: GeneratorSpec) -> None:
    """The UNet tensors of the `init_from` generator must fit the run's base model (shapes from its config, no
    weights); a base model other than the one it was trained on is logged."""
    base = str(cfg.base_model)
    config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"))
    if spec.conditioner.time_cond:
        config["class_embed_type"] = "identity"
    with torch.device("meta"):
        expected = {
            f"unet.{k}": tuple(v.shape) for k, v in UNet2DConditionModel.from_config(config).state_dict().items()
        }
    with safe_open(str(Path(cfg.init_from) / WEIGHTS_FILE), "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("unet.")}
    wrong = sorted(k for k, shape in found.items() if expected.get(k) != shape)
    if wrong:
        raise DreamdiffError(
            f"init_from: its UNet tensors do not fit base_model {base!r} (e.g. {wrong[:2]}); give the base model it "
            f"was trained on ({spec.base_model})"
        )
    local = Path(base).expanduser()
    if (str(local.resolve()) if local.is_dir() else base) != spec.base_model:
        log.warning("init_from: %s was trained on %s; continuing on %s", cfg.init_from, spec.base_model, base)


def resolve_encoder(cfg: FinetuneConfig) -> tuple[MSMConfig, str | None]:
    """The encoder's sizes and its weights file (None = from scratch), checked against each other without
    loading the weights (safetensors headers only)."""
    if cfg.encoder_checkpoint is None:
        assert cfg.encoder is not None  # FinetuneConfig's validator
        return cfg.encoder, None
    given = Path(cfg.encoder_checkpoint)
    weights = given / ENCODER_FILE if given.is_dir() else given
    if not weights.is_file():
        raise DreamdiffError(
            f"encoder_checkpoint: {cfg.encoder_checkpoint} holds no {ENCODER_FILE}; expected a finished pretrain run "
            "folder (or its msm.safetensors), or null to train the encoder from scratch"
        )
    record = weights.parent / "config.yaml"  # a pretrain run's record: its `model` section has the sizes
    saved = yaml.safe_load(record.read_text()) if record.is_file() else None
    recorded = MSMConfig.model_validate(saved["model"]) if isinstance(saved, dict) and "model" in saved else None
    msm = recorded or cfg.encoder
    if msm is None:
        raise DreamdiffError(f"encoder: {weights} has no config.yaml beside it; give the encoder sizes in `encoder`")
    if recorded and cfg.encoder and _sizes(recorded) != _sizes(cfg.encoder):
        raise DreamdiffError(
            f"encoder: sizes {_sizes(cfg.encoder)} differ from those of the pretrain run {_sizes(recorded)} "
            f"({record}); leave `encoder` out or match them"
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MSMEncoder(msm).state_dict().items()}
    with safe_open(str(weights), "pt") as f:
        found = {
            k.removeprefix(ENCODER_PREFIX): tuple(f.get_slice(k).get_shape())
            for k in f.keys()
            if k.startswith(ENCODER_PREFIX)
        }
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise DreamdiffError(f"encoder_checkpoint: {weights} does not fit encoder sizes {_sizes(msm)} (e.g. {wrong})")
    return msm, str(weights.resolve())


def _sizes(msm: MSMConfig) -> dict[str, Any]:
    return {k: getattr(msm, k) for k in _SIZE_FIELDS}


def base_shape(cfg: FinetuneConfig) -> BaseShape:
    """Cross-attention width, image size and latent shape of the base model, from its configs (no weights)."""
    if cfg.tiny_sd is not None:
        t = cfg.tiny_sd
        side = t.sample_size // t.vae_factor
        return BaseShape(t.cross_attention_dim, t.sample_size, (t.in_channels, side, side))
    base = str(cfg.base_model)
    local = Path(base).expanduser()
    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet")
        has_vae = (local / "vae").is_dir() if local.is_dir() else True
        vae = AutoencoderKL.load_config(base, subfolder="vae") if has_vae else None
    except OSError as err:
        raise DreamdiffError(
            f"base_model: cannot read {base!r} ({str(err).splitlines()[0]}); expected a Stable Diffusion folder "
            "(unet/, scheduler/, vae/) or a Hugging Face id whose weights are reachable"
        ) from None
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1
    side = unet["sample_size"]
    return BaseShape(unet["cross_attention_dim"], side * factor, (unet["in_channels"], side, side))


def _clip_dim(cfg: FinetuneConfig) -> int:
    """Check the CLIP model name and weights tag (no weights loaded); its embedding width."""
    _check_request(cfg.clip_model, cfg.clip_pretrained)
    return int(open_clip.get_model_config(cfg.clip_model)["embed_dim"])


def read_preview(files: list[str], section: PreviewSection, image_size: int) -> dict[str, Any]:
    """Up to `section.eegs` rows of the preview split, distinct classes first: EEG, mask, stimulus, class name."""
    candidates = []  # (label, file, row) of every row of the split, in file order
    for file in files:
        index = read_table(file, columns=["split", "label"]).to_pydict()
        pairs = zip(index["split"], index["label"], strict=True)
        candidates += [(label, file, i) for i, (split, label) in enumerate(pairs) if split == section.split]
    first_of_class: dict[int, tuple[int, str, int]] = {}
    for candidate in candidates:
        first_of_class.setdefault(candidate[0], candidate)
    firsts = list(first_of_class.values())
    picked = (firsts + [c for c in candidates if c not in firsts])[: section.eegs]
    columns: dict[str, list] = {"eeg": [], "channel_mask": [], "image": [], "class_name": []}
    for file in dict.fromkeys(f for _, f, _ in picked):
        table = read_table(file, columns=list(columns)).take([i for _, f, i in picked if f == file])
        for name in ("eeg", "channel_mask"):
            columns[name] += list(table.column(name).combine_chunks().to_numpy_ndarray())
        for name in ("image", "class_name"):
            columns[name] += table.column(name).to_pylist()
    return {
        "eeg": np.stack(columns["eeg"]),
        "channel_mask": np.stack(columns["channel_mask"]),
        "image": decode_images(columns["image"], image_size),
        "class_name": columns["class_name"],
    }


def _check_inputs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Everything that can be wrong with the input, found before any work; returns what the run needs."""
    files = paired_files(cfg.data)
    counts = split_counts(files)
    rows = sum(counts.get(s, 0) for s in cfg.train_splits)
    world = max(1, cfg.scaling.num_workers)
    if cfg.batch_size % world:
        raise DreamdiffError(f"batch_size: {cfg.batch_size} must divide evenly into {world} worker(s)")
    if steps_per_epoch(cfg, rows, world) == 0:
        raise DreamdiffError(
            f"batch_size: {cfg.batch_size} is larger than the {rows} rows of split(s) {cfg.train_splits} in {cfg.data} "
            f"(splits found: {counts})"
        )
    if cfg.preview.eegs and not counts.get(cfg.preview.split):
        raise DreamdiffError(
            f"preview.split: no rows of split {cfg.preview.split!r} in {cfg.data} (found {sorted(counts)}); "
            "choose another or set preview.eegs=0"
        )
    init = resolve_init(cfg)
    msm, weights = (init.msm, None) if init is not None else resolve_encoder(cfg)
    eeg_shape = tuple(read_schema(files[0]).field("eeg").type.shape)
    if eeg_shape != (msm.num_channels, msm.num_samples):
        raise DreamdiffError(
            f"encoder: takes EEG [{msm.num_channels}, {msm.num_samples}] but the shards in {cfg.data} hold "
            f"{list(eeg_shape)}"
        )
    shape = base_shape(cfg)
    if cfg.conditioner.context_dim != shape.cross_attention_dim:
        raise DreamdiffError(
            f"conditioner.context_dim: {cfg.conditioner.context_dim} must equal the base model's UNet "
            f"cross_attention_dim ({shape.cross_attention_dim})"
        )
    clip_dim = _clip_dim(cfg)
    if cfg.conditioner.clip_dim != clip_dim:
        raise DreamdiffError(
            f"conditioner.clip_dim: {cfg.conditioner.clip_dim} must equal the embedding width of CLIP "
            f"{cfg.clip_model!r} ({clip_dim})"
        )
    return {"files": files, "rows": rows, "msm": msm, "weights": weights, "shape": shape, "clip_dim": clip_dim}


def _base_model(cfg: FinetuneConfig, output: Path) -> str:
    """The base model's id or absolute folder; with `tiny_sd`, the tiny SD built (once) into <output>/tiny-sd."""
    if cfg.tiny_sd is None:
        local = Path(str(cfg.base_model)).expanduser()
        return str(local.resolve()) if local.is_dir() else str(cfg.base_model)
    folder = output / TINY_SD_DIR
    if not folder.is_dir():
        staging = output / f".{TINY_SD_DIR}.tmp"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            build_tiny_sd(cfg.tiny_sd, staging)
        os.replace(staging, folder)  # whole or absent: a killed build is redone
    return str(folder)


def _clip_weights(cfg: FinetuneConfig, output: Path) -> str | None:
    """The CLIP weights tag or file; None in the config means a seeded random tower saved into the run folder."""
    if cfg.clip_pretrained is not None:
        local = Path(cfg.clip_pretrained)
        return str(local.resolve()) if local.is_file() else cfg.clip_pretrained
    path = output / RANDOM_CLIP_FILE
    if not path.is_file():
        staging = output / f".staging-{RANDOM_CLIP_FILE}"  # open_clip needs the .safetensors suffix
        os.replace(save_random_clip(cfg.clip_model, staging, seed=cfg.seed), path)
    return str(path)


def _pretrain_tiny_sd(
    cfg: FinetuneConfig, folder: Path, files: list[str], clip_weights: str | None, preview: dict[str, Any] | None
) -> None:
    """Teach the tiny SD in `folder` to draw (train/tiny_sd_pretrain.py) in one Ray task with a training worker's
    CPUs, unless it was done for these settings; draws the preview's held-out stimuli from their CLIP embeddings."""
    import ray

    assert cfg.tiny_sd is not None and cfg.tiny_sd_pretrain is not None  # FinetuneConfig's validator
    if tiny_sd_pretrain.pretrained_marker(folder, cfg.tiny_sd_pretrain):
        print(f"finetune: the tiny SD in {folder} was pretrained earlier", flush=True)
        return
    print(f"finetune: teaching the tiny SD to draw ({cfg.tiny_sd_pretrain.steps} steps) before fine-tuning", flush=True)
    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker)(_pretrain_task)
    done = ray.get(task.remote(folder, cfg.tiny_sd_pretrain, files, cfg.seed, preview, cfg.clip_model, clip_weights))
    print(
        f"finetune: tiny SD pretrained on {done['rows']} rows in {done['seconds']:.0f} s, loss {done['loss']:.4f}; "
        f"what it draws from held-out CLIP embeddings: {done.get('preview', 'no preview')}",
        flush=True,
    )


def _pretrain_task(
    folder: Path,
    section: TinySDPretrainSection,
    files: list[str],
    seed: int,
    preview: dict[str, Any] | None,
    clip_model: str,
    clip_weights: str | None,
) -> dict[str, Any]:
    if preview is not None:
        clip = load_clip_image_encoder(clip_model, clip_weights)
        images = torch.tensor(preview["image"]).permute(0, 3, 1, 2)  # a copy: Ray's objects are read-only
        preview = {**preview, "clip_embedding": clip(images)}
    return tiny_sd_pretrain.pretrain(folder, section, files, seed, preview)


def clip_mean(files: list[str]) -> np.ndarray:
    """The mean CLIP image embedding over the precomputed training rows (the centre of the CLIP targets)."""
    column = pq.read_table(files, columns=["clip_embedding"]).column("clip_embedding").combine_chunks()
    return column.to_numpy_ndarray().astype(np.float64).mean(0).astype(np.float32)


def generator_spec(cfg: FinetuneConfig, msm: MSMConfig, base_model: str, image_size: int) -> GeneratorSpec:
    """The spec the workers build. `cfg.profile` is the one switch: it sets the encoder's profile, whatever the
    pretrain run recorded (the weights fit either), and "reference" turns the time conditioning on."""
    time_cond = cfg.conditioner.time_cond or cfg.profile == "reference"
    return GeneratorSpec(
        base_model=base_model,
        msm=MSMConfig.model_validate({**msm.model_dump(), "profile": cfg.profile}),
        conditioner=ConditionerConfig.model_validate({**cfg.conditioner.model_dump(), "time_cond": time_cond}),
        trainable=cfg.trainable,
        image_size=image_size,
        profile=cfg.profile,
    )


def _decoded_bytes(files: list[str]) -> int:
    """The uncompressed size of the row groups in `files` (Parquet footers only)."""
    meta = [pq.ParquetFile(f).metadata for f in files]
    return sum(m.row_group(i).total_byte_size for m in meta for i in range(m.num_row_groups))


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or resume); returns the last reported metrics. The generator lands in <output>/generator/."""
    from dreamdiff.ray_init import init_ray

    output = Path(cfg.output).resolve()
    checked = _check_inputs(cfg)
    record_config(cfg, output)
    base_model = _base_model(cfg, output)
    clip_weights = _clip_weights(cfg, output)
    shape: BaseShape = checked["shape"]
    spec = generator_spec(cfg, checked["msm"], base_model, shape.image_size)
    init_from = str(Path(cfg.init_from).resolve()) if cfg.init_from else None
    init_ray(cfg.ray)
    models = FrozenModels(
        base_model, cfg.clip_model, clip_weights, shape.image_size, shape.latent_shape, checked["clip_dim"]
    )
    pre = precompute(checked["files"], output / PRECOMPUTED_DIR, models, cfg.train_splits, cfg.precompute)
    preview = read_preview(checked["files"], cfg.preview, shape.image_size) if cfg.preview.eegs else None
    if cfg.tiny_sd_pretrain is not None:
        _pretrain_tiny_sd(cfg, Path(base_model), pre.files, clip_weights, preview)
    cache = fits_object_store(_decoded_bytes(pre.files))
    dataset = training_dataset(pre.files, TRAIN_COLUMNS, seed=cfg.seed, cache=cache)
    provenance = {
        "encoder_init": init_from or checked["weights"] or "scratch",
        "clip_model": cfg.clip_model,
        "clip_pretrained": clip_weights,
        "clip_weight": cfg.clip_weight,
        "train_splits": cfg.train_splits,
        "train_rows": pre.rows,
    }
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "output": str(output),
        "rows": pre.rows,
        "encoder_weights": checked["weights"],
        "init_from": init_from,
        "preview": preview,
        "provenance": provenance,
        "clip_mean": clip_mean(pre.files).tolist() if cfg.conditioner.clip_center else None,
    }
    world = max(1, cfg.scaling.num_workers)
    log.info(
        "finetune: %d training rows (%s), %d worker(s), %d steps/epoch, encoder %s, base model %s",
        pre.rows,
        "precomputed earlier" if pre.skipped else "precomputed now",
        world,
        steps_per_epoch(cfg, pre.rows, world),
        provenance["encoder_init"],
        base_model,
    )
    trainer = build_torch_trainer(
        train_loop,
        loop_config,
        output=str(output),
        scaling=cfg.scaling,
        checkpoint=cfg.checkpoint,
        max_failures=cfg.max_failures,
        datasets={"train": dataset},
    )
    metrics = dict(fit_trainer(trainer, "finetune", str(output), cfg.max_failures, shards=pre.files).metrics or {})
    print(
        f"finetune: step {metrics.get('step')}  loss {metrics.get('loss', float('nan')):.4f} "
        f"(sd {metrics.get('sd_loss', float('nan')):.4f}, clip {metrics.get('clip_loss', float('nan')):.4f}); "
        f"generator: {output / GENERATOR_DIR}"
    )
    return metrics
