"""The HTTP API's requests and answers, checked and harmonised without Ray or FastAPI (pure numpy + pydantic).

A request carries one EEG, ``[channels][samples]``: as JSON (``{"eeg": [[...], ...], "num_images": 2, ...}``) or
as the bytes of a ``.npy`` file (Content-Type ``application/x-npy``, parameters in the query string). Every
problem becomes a :class:`RequestError` with an HTTP status and the field it concerns. An accepted EEG is brought
to the model's shape with the functions preprocessing uses (``dreamdiff.data.signal``): resampled to the model's
rate when the request states its own, windowed to the model's length when longer or stretched to it when shorter
(the ImageNet-EEG rule), normalised as the shards were, and channels tiled to the model's count.
"""

from __future__ import annotations

import copy
import io
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamdiff.config import ServeConfig
from dreamdiff.data.signal import (
    MAX_RESAMPLE_TERM,
    SignalError,
    crop_and_interpolate,
    normalise,
    resample,
    resample_factors,
    resampled_length,
    tile_channels,
    window,
)
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.sampling import Sampler

API_VERSION = "v1"
NPY_TYPES = ("application/x-npy", "application/octet-stream")
MAX_SEED = 2**63 - 1
#: Bounds of a request's stated sampling rate (Hz): EEG is not recorded outside them, and each bound keeps the
#: resampled length of an accepted EEG a small multiple of its own (see `_to_model_rate`).
MIN_SFREQ = 1.0
MAX_SFREQ = 100_000.0


class RequestError(DreamdiffError):
    """A request the server refuses: HTTP `status`, the `field` at fault (None: the request as a whole)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        """The answer's JSON (ErrorResponse) but its request id, which the ingress adds."""
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
        default=None,
        ge=MIN_SFREQ,
        le=MAX_SFREQ,
        description="sampling rate of the EEG (Hz): resampled to the model's (needs the server's eeg.sfreq)",
    )


class GenerateRequest(GenerateParams):
    """POST /v1/generate as JSON."""

    eeg: list[list[float]] = Field(description="one EEG as [channels][samples] (finite numbers)")


class ErrorResponse(BaseModel):
    """Every error answer: what is wrong, the request field at fault (null: the request as a whole), and the id
    the server logged the request under (also the X-Request-ID header). Never internal detail: that is logged."""

    error: str
    field: str | None = None
    request_id: str | None = Field(default=None, description="quote it when reporting a problem")


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
    for name in ("num_images", "seed", "steps", "size"):  # JSON Schema counts 3.0 as an integer: so do we
        value = data.get(name)
        if type(value) is float and value.is_integer():
            data[name] = int(value)
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
    """EEG [C, T] as received -> (float32 [model channels, model samples], channel mask, what was done).

    Every cheap property (dtype, shape, sizes, values, the rate and the length resampling would give) is checked
    before any work whose cost grows with them, so a small request cannot make the server allocate or compute
    much before it is refused.
    """
    lim = cfg.limits
    if not isinstance(eeg, np.ndarray) or eeg.dtype.kind not in "fiu":
        kind = eeg.dtype if isinstance(eeg, np.ndarray) else type(eeg).__name__
        raise RequestError(422, f"eeg must hold real numbers (float or int dtype), got {kind}", "eeg")
    if eeg.ndim != 2:
        raise RequestError(422, f"eeg must be 2-D [channels][samples], got shape {list(eeg.shape)}", "eeg")
    n_ch, n_t = eeg.shape
    if not 1 <= n_ch <= lim.max_channels:
        raise RequestError(422, f"eeg must have 1..{lim.max_channels} channels, got {n_ch}", "eeg")
    if not lim.min_samples <= n_t <= lim.max_samples:
        raise RequestError(422, f"eeg must have {lim.min_samples}..{lim.max_samples} samples, got {n_t}", "eeg")
    plan = _rate_plan(n_t, sfreq, cfg, model) if sfreq is not None else None
    eeg = eeg.astype(np.float64, copy=False)
    if not np.isfinite(eeg).all():
        raise RequestError(422, "eeg holds NaN or infinite values", "eeg")
    peak = float(np.abs(eeg).max())
    if peak > lim.max_abs_value:
        raise RequestError(422, f"eeg values must lie within +-{lim.max_abs_value:g}, got {peak:g}", "eeg")
    report: dict[str, Any] = {"channels": n_ch, "samples": n_t, "sfreq": sfreq, "applied": []}
    try:
        length = n_t
        if plan is not None:
            eeg, length = _to_model_rate(eeg, plan, report)
        eeg = _to_model_length(eeg, model.samples, length, report)
        eeg = normalise(eeg[None], cfg.eeg.normalise, scale=cfg.eeg.scale, clip=cfg.eeg.clip)[0]
        report["applied"].append(f"normalised ({cfg.eeg.normalise})")
        mask = np.ones(n_ch, dtype=bool)
        if n_ch != model.channels:
            eeg, mask = tile_channels(eeg, model.channels)
            verb = "tiled" if n_ch < model.channels else "kept the first"
            report["applied"].append(f"{verb} {n_ch} -> {model.channels} channels")
    except SignalError as err:
        raise RequestError(422, f"eeg cannot be fitted to the model: {err}", "eeg") from None
    if not np.isfinite(eeg).all():  # 'fixed' normalisation with a large scale can overflow float32
        raise RequestError(422, "eeg values overflow the model's input once normalised (eeg.scale)", "eeg")
    return np.ascontiguousarray(eeg, dtype=np.float32), np.asarray(mask, dtype=bool), report


@dataclass(frozen=True)
class _RatePlan:
    """How a request's EEG reaches the model's rate, decided from its length alone."""

    sfreq: float
    target: float
    length: int  # samples the whole EEG would have at the model's rate
    keep: int  # input samples to resample: those that reach the model's first window (all when shorter)


def _rate_plan(n_t: int, sfreq: float, cfg: ServeConfig, model: ModelShape) -> _RatePlan | None:
    """Check a stated rate against the model's and plan the resampling arithmetically (no signal touched)."""
    target = cfg.eeg.sfreq
    if target is None:
        raise RequestError(
            422,
            "this server does not know the model's sampling rate (serve config eeg.sfreq is null): send EEG at the "
            "model's rate and leave sfreq out",
            "sfreq",
        )
    low, high = sfreq_bounds(cfg)
    if not (math.isfinite(sfreq) and low <= sfreq <= high):
        raise RequestError(422, f"sfreq must lie within {low:g}..{high:g} Hz for this model, got {sfreq!r}", "sfreq")
    if sfreq == target:
        return None
    try:
        up, down = resample_factors(sfreq, target)
        length = resampled_length(n_t, sfreq, target)
    except SignalError as err:
        raise RequestError(422, f"sfreq {sfreq:g} Hz cannot be resampled to the model's: {err}", "sfreq") from None
    if length < cfg.limits.min_samples:
        raise RequestError(
            422,
            f"eeg has {n_t} samples at {sfreq:g} Hz, {length} at the model's {target:g} Hz; at least "
            f"{cfg.limits.min_samples} needed",
            "eeg",
        )
    # output k of the polyphase filter reads input up to (k * down + filter half-length + padding) / up: the
    # first model.samples outputs depend on this many input samples, so the rest is never resampled
    half = 10 * max(up, down)
    keep = min(n_t, -(-(model.samples * down + 2 * half + 2 * down) // up) + 2)
    return _RatePlan(sfreq, target, length, keep)


def sfreq_bounds(cfg: ServeConfig) -> tuple[float, float]:
    """The stated rates (Hz) the server accepts: MIN_SFREQ..MAX_SFREQ, and within MAX_RESAMPLE_TERM-fold of the
    model's rate (the most `resample` changes a rate)."""
    target = cfg.eeg.sfreq
    if target is None:
        return MIN_SFREQ, MAX_SFREQ
    return max(MIN_SFREQ, target / MAX_RESAMPLE_TERM), min(MAX_SFREQ, target * MAX_RESAMPLE_TERM)


def _to_model_rate(eeg: np.ndarray, plan: _RatePlan, report: dict[str, Any]) -> tuple[np.ndarray, int]:
    """(EEG at the model's rate, its full length there): only the part the model reads is resampled."""
    n_t = eeg.shape[1]
    out = resample(eeg[:, : plan.keep], plan.sfreq, plan.target)
    if plan.keep < n_t:
        out = out[:, : min(out.shape[1], plan.length)]
    report["applied"].append(f"resampled {plan.sfreq:g} -> {plan.target:g} Hz ({n_t} -> {plan.length} samples)")
    return out, plan.length


def _to_model_length(eeg: np.ndarray, samples: int, length: int, report: dict[str, Any]) -> np.ndarray:
    """The first `samples` of EEG `length` samples long (held: eeg.shape[1], perhaps fewer), or it stretched."""
    n_t = eeg.shape[1]
    if length == samples:
        return eeg
    if length > samples:
        report["applied"].append(f"took the first {samples} of {length} samples")
        return window(eeg, samples, samples)[0][0]
    report["applied"].append(f"stretched {n_t} -> {samples} samples")
    return crop_and_interpolate(eeg, 0, n_t, samples)


# ------------------------------------------------------------------------------------------- schema


def _bound(prop: dict[str, Any], **keys: Any) -> None:
    """Set JSON-schema keywords on the non-null branch of an optional property (anyOf [{...}, {null}])."""
    branch = next(b for b in prop["anyOf"] if b.get("type") != "null")
    branch.update({k: v for k, v in keys.items() if v is not None})


def request_schema(cfg: ServeConfig, model: ModelShape | None = None) -> dict[str, Any]:
    """The JSON schema of POST /v1/generate's JSON body as this server enforces it: the static bounds of
    GenerateRequest plus the limits of `cfg` and, when known, what the loaded `model` allows.

    What JSON Schema cannot state is said in descriptions: rows of equal length, the body's byte limit, and that
    the EEG, resampled to the model's rate, must still hold limits.min_samples samples.
    """
    lim = cfg.limits
    schema = copy.deepcopy(GenerateRequest.model_json_schema())
    props = schema["properties"]
    _bound(props["num_images"], maximum=lim.max_images_per_request)
    _bound(props["steps"], maximum=lim.max_steps)
    _bound(props["guidance_scale"], maximum=lim.max_guidance_scale)
    if model is not None and not model.guidance:
        _bound(props["guidance_scale"], minimum=1.0, maximum=1.0)
    if model is not None:
        _bound(props["size"], minimum=model.image_size, maximum=model.image_size)
    if cfg.eeg.sfreq is None:
        props["sfreq"] = {"type": "null", "default": None, "description": "this server takes EEG at its rate only"}
    else:
        low, high = sfreq_bounds(cfg)
        _bound(props["sfreq"], minimum=low, maximum=high)
        props["sfreq"]["description"] += (
            f" ({cfg.eeg.sfreq:g} Hz); the EEG must hold at least {lim.min_samples} samples at that rate"
        )
    props["eeg"].update(
        minItems=1,
        maxItems=lim.max_channels,
        items={
            "type": "array",
            "minItems": lim.min_samples,
            "maxItems": lim.max_samples,
            "items": {"type": "number", "minimum": -lim.max_abs_value, "maximum": lim.max_abs_value},
        },
        description=f"one EEG as [channels][samples]: 1..{lim.max_channels} rows of equal length "
        f"{lim.min_samples}..{lim.max_samples}, finite numbers within +-{lim.max_abs_value:g}; the whole body at "
        f"most {lim.max_body_bytes} bytes",
    )
    return schema


def query_parameters(cfg: ServeConfig, model: ModelShape | None = None) -> list[dict[str, Any]]:
    """The sampling parameters as query-string parameters (OpenAPI parameter objects), for a .npy body only."""
    props = request_schema(cfg, model)["properties"]
    return [
        {"name": name, "in": "query", "required": False, "schema": props[name], "description": "with a .npy body"}
        for name in GenerateParams.model_fields
    ]
