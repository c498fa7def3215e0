"""The HTTP API's requests and answers, checked and harmonised without Ray or FastAPI (pure numpy + pydantic).

A request carries one EEG, ``[channels][samples]``: as JSON (``{"eeg": [[...], ...], "num_images": 2, ...}``) or
as the bytes of a ``.npy`` file (Content-Type ``application/x-npy``, parameters in the query string). Every
problem becomes a :class:`RequestError` with an HTTP status and the field it concerns. An accepted EEG is brought
to the model's shape with the functions preprocessing uses (``dreamdiff.data.signal``): resampled to the model's
rate when the request states its own, windowed to the model's length when longer or stretched to it when shorter
(the ImageNet-EEG rule), normalised as the shards were, and channels tiled to the model's count.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamdiff.config import ServeConfig
from dreamdiff.data.signal import SignalError, crop_and_interpolate, normalise, resample, tile_channels, window
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.sampling import Sampler

API_VERSION = "v1"
NPY_TYPES = ("application/x-npy", "application/octet-stream")
MAX_SEED = 2**63 - 1
MAX_SFREQ = 100_000.0


class RequestError(DreamdiffError):
    """A request the server refuses: HTTP `status`, the `field` at fault (None: the request as a whole)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


# ------------------------------------------------------------------------------------------- wire models


class GenerateParams(BaseModel):
    """Sampling parameters of one request; those left out take the server's defaults (GET /v1/model)."""

    model_config = ConfigDict(extra="forbid")

    num_images: int | None = Field(default=None, ge=1, description="images for this EEG")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="image j derives from (seed, j); null draws one (returned)"
    )
    steps: int | None = Field(default=None, ge=1, description="sampler steps")
    sampler: Sampler | None = None
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        description="1.0 = no classifier-free guidance; other values need a model with a null "
        "context (GET /v1/model: guidance)",
    )
    size: int | None = Field(default=None, ge=1, description="image side in pixels; must be the model's")
    sfreq: float | None = Field(
        default=None, gt=0, le=MAX_SFREQ, description="sampling rate of the EEG (Hz): resampled to the model's"
    )


class GenerateRequest(GenerateParams):
    """POST /v1/generate as JSON."""

    eeg: list[list[float]] = Field(description="one EEG as [channels][samples] (finite numbers)")


class ErrorResponse(BaseModel):
    """Every error answer: what is wrong, and the request field at fault (null: the request as a whole)."""

    error: str
    field: str | None = None


class ImageOut(BaseModel):
    index: int = Field(description="j: the image's noise derives from (seed, j)")
    png_base64: str


class ModelRef(BaseModel):
    id: str = Field(description="sha256 of the checkpoint's spec and weights (16 hex digits)")
    checkpoint: str
    base_model: str


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    seed: int
    num_images: int
    steps: int
    sampler: str
    guidance_scale: float
    size: int
    model: ModelRef
    batch_size: int = Field(description="requests the generator replica served in the same batch")
    fused: int = Field(description="EEGs sampled together with this one (same settings, one UNet call per step)")
    eeg: dict[str, Any] = Field(description="the EEG as received and what was done to fit the model")
    time_s: dict[str, float] = Field(description="total (in the ingress) and sampling (the batch's call)")


class ModelInfo(BaseModel):
    """What GET /v1/model reports."""

    model: ModelRef
    spec: dict[str, Any]
    info: dict[str, Any] = Field(description="the checkpoint's record (training step, encoder init, ...)")
    image_size: int
    eeg_shape: list[int] = Field(description="[channels, samples] the model reads")
    guidance: bool = Field(description="whether guidance_scale other than 1.0 is possible")
    device: str
    defaults: dict[str, Any]
    limits: dict[str, Any]
    eeg: dict[str, Any] = Field(description="how request EEG is harmonised")
    batching: dict[str, Any]

    def shape(self) -> ModelShape:
        return ModelShape(self.eeg_shape[0], self.eeg_shape[1], self.image_size, self.guidance)


# ------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ModelShape:
    """What validation needs to know of the loaded model."""

    channels: int
    samples: int
    image_size: int
    guidance: bool


@dataclass
class GenerationItem:
    """One accepted request, ready for the generator (the unit `@serve.batch` gathers)."""

    eeg: np.ndarray  # float32 [channels, samples] of the model
    channel_mask: np.ndarray  # bool [channels]: True on real (first-copy) rows
    seed: int
    num_images: int
    steps: int
    sampler: Sampler
    guidance_scale: float
    eeg_report: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        """Items with equal keys are sampled in one call."""
        return (self.num_images, self.steps, self.sampler, self.guidance_scale)


def _field_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _params(data: dict[str, Any], strict: bool) -> GenerateParams:
    try:
        return GenerateParams.model_validate(data, strict=strict)
    except ValidationError as err:
        first = err.errors()[0]
        name = _field_of(first["loc"])
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(["eeg", *GenerateParams.model_fields])
            raise RequestError(422, f"unknown field {name!r}; allowed: {allowed}", name) from None
        raise RequestError(422, f"{name}: {first['msg']} (got {first.get('input')!r})", name) from None


def _json_eeg(value: Any) -> np.ndarray:
    """A [channels][samples] nested list of numbers -> float64 array (no strings, booleans or ragged rows)."""
    form = "eeg must be a [channels][samples] nested list of numbers"
    if not isinstance(value, list) or not value:
        raise RequestError(422, f"{form}, got {type(value).__name__}{' (empty)' if value == [] else ''}", "eeg")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise RequestError(422, f"{form}: eeg[{i}] is a {type(row).__name__}, not a list", "eeg")
        if len(row) != len(value[0]):
            raise RequestError(422, f"{form}: eeg[{i}] has {len(row)} samples, eeg[0] has {len(value[0])}", "eeg")
        for j, x in enumerate(row):
            if type(x) not in (int, float):  # bool is an int subclass: excluded by the exact type test
                raise RequestError(422, f"{form}: eeg[{i}][{j}] is a {type(x).__name__}", "eeg")
    try:
        return np.asarray(value, dtype=np.float64)
    except OverflowError:
        raise RequestError(422, "eeg holds a number too large for a float", "eeg") from None


def parse_json(body: bytes) -> tuple[np.ndarray, GenerateParams]:
    """A JSON request body -> (EEG as given, parameters). Bad JSON is a 400, bad content a 422."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RequestError(400, f"the body is not valid JSON ({err})", "body") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"the body must be a JSON object with 'eeg', got {type(data).__name__}", "body")
    if "eeg" not in data:
        raise RequestError(422, "eeg is missing: give one EEG as [channels][samples]", "eeg")
    eeg = _json_eeg(data.pop("eeg"))
    return eeg, _params(data, strict=True)


def parse_npy(body: bytes, query: dict[str, str]) -> tuple[np.ndarray, GenerateParams]:
    """The bytes of a .npy file (no pickles) + query-string parameters -> (EEG as given, parameters)."""
    try:
        eeg = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except (ValueError, EOFError, OSError, TypeError) as err:
        raise RequestError(422, f"eeg is not a readable .npy file ({err})", "eeg") from None
    if eeg.dtype.kind not in "fiu":
        raise RequestError(422, f"eeg must hold real numbers (float or int dtype), got dtype {eeg.dtype}", "eeg")
    return eeg.astype(np.float64, copy=False), _params(dict(query), strict=False)


# ------------------------------------------------------------------------------------------- checks


def resolve(eeg: np.ndarray, params: GenerateParams, cfg: ServeConfig, model: ModelShape) -> GenerationItem:
    """Check a parsed request against the limits and the model, fill defaults, and harmonise the EEG."""
    lim, dft = cfg.limits, cfg.defaults
    num_images = params.num_images or dft.num_images
    if num_images > lim.max_images_per_request:
        raise RequestError(422, f"num_images must be <= {lim.max_images_per_request}, got {num_images}", "num_images")
    steps = params.steps or dft.steps
    if steps > lim.max_steps:
        raise RequestError(422, f"steps must be <= {lim.max_steps}, got {steps}", "steps")
    guidance = dft.guidance_scale if params.guidance_scale is None else params.guidance_scale
    if not math.isfinite(guidance) or guidance > lim.max_guidance_scale:
        raise RequestError(422, f"guidance_scale must be <= {lim.max_guidance_scale}, got {guidance}", "guidance_scale")
    if guidance != 1.0 and not model.guidance:
        raise RequestError(
            422, "this model was fine-tuned without condition dropout: guidance_scale must be 1.0", "guidance_scale"
        )
    if params.size is not None and params.size != model.image_size:
        raise RequestError(422, f"this model generates {model.image_size} px images: size must be that", "size")
    data, mask, report = harmonise(eeg, params.sfreq, cfg, model)
    return GenerationItem(
        eeg=data,
        channel_mask=mask,
        seed=secrets.randbits(63) if params.seed is None else params.seed,
        num_images=num_images,
        steps=steps,
        sampler=params.sampler or dft.sampler,
        guidance_scale=float(guidance),
        eeg_report=report,
    )


def harmonise(
    eeg: np.ndarray, sfreq: float | None, cfg: ServeConfig, model: ModelShape
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """EEG [C, T] as received -> (float32 [model channels, model samples], channel mask, what was done)."""
    lim = cfg.limits
    if eeg.ndim != 2:
        raise RequestError(422, f"eeg must be 2-D [channels][samples], got shape {list(eeg.shape)}", "eeg")
    n_ch, n_t = eeg.shape
    if not 1 <= n_ch <= lim.max_channels:
        raise RequestError(422, f"eeg must have 1..{lim.max_channels} channels, got {n_ch}", "eeg")
    if not lim.min_samples <= n_t <= lim.max_samples:
        raise RequestError(422, f"eeg must have {lim.min_samples}..{lim.max_samples} samples, got {n_t}", "eeg")
    if not np.isfinite(eeg).all():
        raise RequestError(422, "eeg holds NaN or infinite values", "eeg")
    peak = float(np.abs(eeg).max())
    if peak > lim.max_abs_value:
        raise RequestError(422, f"eeg values must lie within +-{lim.max_abs_value:g}, got {peak:g}", "eeg")
    report: dict[str, Any] = {"channels": n_ch, "samples": n_t, "sfreq": sfreq, "applied": []}
    try:
        if sfreq is not None:
            eeg = _to_model_rate(eeg, sfreq, cfg, report)
        eeg = _to_model_length(eeg, model.samples, lim.min_samples, report)
        eeg = normalise(eeg[None], cfg.eeg.normalise, scale=cfg.eeg.scale, clip=cfg.eeg.clip)[0]
        report["applied"].append(f"normalised ({cfg.eeg.normalise})")
        mask = np.ones(n_ch, dtype=bool)
        if n_ch != model.channels:
            eeg, mask = tile_channels(eeg, model.channels)
            verb = "tiled" if n_ch < model.channels else "kept the first"
            report["applied"].append(f"{verb} {n_ch} -> {model.channels} channels")
    except SignalError as err:
        raise RequestError(422, f"eeg cannot be fitted to the model: {err}", "eeg") from None
    return np.ascontiguousarray(eeg, dtype=np.float32), np.asarray(mask, dtype=bool), report


def _to_model_rate(eeg: np.ndarray, sfreq: float, cfg: ServeConfig, report: dict[str, Any]) -> np.ndarray:
    target = cfg.eeg.sfreq
    if target is None:
        raise RequestError(
            422,
            "this server does not know the model's sampling rate (serve config eeg.sfreq is null): send EEG at the "
            "model's rate and leave sfreq out",
            "sfreq",
        )
    if sfreq == target:
        return eeg
    out = resample(eeg, sfreq, target)
    report["applied"].append(f"resampled {sfreq:g} -> {target:g} Hz ({eeg.shape[1]} -> {out.shape[1]} samples)")
    return out


def _to_model_length(eeg: np.ndarray, samples: int, min_samples: int, report: dict[str, Any]) -> np.ndarray:
    n_t = eeg.shape[1]
    if n_t == samples:
        return eeg
    if n_t > samples:
        report["applied"].append(f"took the first {samples} of {n_t} samples")
        return window(eeg, samples, samples)[0][0]
    if n_t < min_samples:
        raise RequestError(422, f"eeg has {n_t} samples at the model's rate; at least {min_samples} needed", "eeg")
    report["applied"].append(f"stretched {n_t} -> {samples} samples")
    return crop_and_interpolate(eeg, 0, n_t, samples)
