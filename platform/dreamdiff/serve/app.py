"""The Ray Serve application: a FastAPI ingress that checks requests, and a batching, autoscaled generator.

    serve run dreamdiff.serve.app:build_app config=configs/serve-demo.yaml [batching.max_batch_size=8 ...]
    serve run configs/serve-app.yaml
    dreamdiff serve --config configs/serve-demo.yaml

The ingress (CPU) authenticates, reads the body under its size limit, parses and harmonises the EEG
(dreamdiff.serve.api) and encodes the PNGs; only valid work reaches the generator deployment (GPU: `num_gpus`),
whose `@serve.batch` method gathers requests and samples them with `GenerationEngine` (model loaded once per
replica). Every error answer is JSON ``{"error": ..., "field": ..., "request_id": ...}`` (ErrorResponse), with the
request id also in the X-Request-ID header; internal detail goes only to the server log under that id. A bad request
never reaches the model. /openapi.json states the limits of the running config.

No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at run time, and
Serve's class-based view hides string annotations from it.
"""

import asyncio
import base64
import copy
import hmac
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from dreamdiff.config import (
    ServeAuthSection,
    ServeConfig,
    apply_overrides,
    read_yaml,
    resolve_config_path,
    validate_config,
)
from dreamdiff.errors import DreamdiffError
from dreamdiff.locations import path_fields
from dreamdiff.serve.api import (
    API_VERSION,
    NPY_TYPES,
    ErrorResponse,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    GenerationItem,
    ModelInfo,
    ModelShape,
    RequestError,
    parse_json,
    parse_npy,
    query_parameters,
    request_schema,
    resolve,
)
from dreamdiff.serve.ingress_http import RequestIdMiddleware, error_response, read_body, request_id

logger = logging.getLogger("ray.serve")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "the body is not valid JSON, or a header is malformed",
        401: "missing or wrong bearer token (when auth is enabled)",
        406: "Accept: image/png with num_images other than 1",
        413: "the body exceeds limits.max_body_bytes",
        415: "Content-Type is neither application/json nor application/x-npy",
        422: "a field is invalid or beyond the server's limits (the answer names it)",
        503: "the generator deployment failed or is unavailable (the detail is in the server log)",
        500: "an unexpected server error (the detail is in the server log under the request id)",
    }.items()
}
api = FastAPI(
    title="dreamdiff",
    version=API_VERSION,
    description="EEG -> images with a DreamDiffusion generator (Bai et al., ECCV 2024). POST one EEG "
    "([channels][samples]) to /v1/generate as JSON, or as the bytes of a .npy file with parameters in the query.",
    openapi_url=None,  # served by Ingress.openapi: the schema with the running config's limits
    docs_url=None,
    redoc_url=None,
)
bearer = HTTPBearer(auto_error=False, description="required when the server enables auth (auth.enabled)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


api.add_middleware(RequestIdMiddleware)


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> Response:
    return await error_response(request, err.status, err.body())


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> Response:
    # keeps the exception's headers: Allow on 405 (RFC 9110 15.5.6)
    return await error_response(request, err.status_code, {"error": str(err.detail), "field": None}, err.headers)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> Response:
    logger.error("request %s: internal error", request_id(request), exc_info=err)
    return await error_response(request, 500, {"error": "internal error", "field": None})


def read_token(auth: ServeAuthSection) -> str | None:
    """The bearer token (None when auth is off): `token_file` if set, else the environment variable."""
    if not auth.enabled:
        return None
    if auth.token_file:
        path = Path(auth.token_file)
        if not path.is_file():
            raise DreamdiffError(f"auth.token_file {auth.token_file!r} is not a readable file")
        token = path.read_text().strip()
        source = f"auth.token_file {auth.token_file!r}"
    else:
        token = os.environ.get(auth.token_env, "").strip()
        source = f"environment variable {auth.token_env} (auth.token_env)"
    if not token:
        raise DreamdiffError(f"auth.enabled is true but {source} holds no token")
    return token


def wants_png(accept: str) -> bool:
    """True when the Accept header prefers image/png to JSON (a tie, or */*, answers JSON)."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *options = (p.strip() for p in part.split(";"))
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = q
    return quality.get("image/png", 0.0) > quality.get("application/json", 0.0)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def media_type(content_type: str) -> str:
    """The request's media type, refused with 415 unless JSON or .npy."""
    media = content_type.split(";")[0].strip().lower()
    if media not in ("application/json", *NPY_TYPES):
        raise RequestError(
            415, f"Content-Type must be application/json or application/x-npy, got {media or 'none'!r}", "Content-Type"
        )
    return media


def _parse(body: bytes, media: str, query: dict[str, str]) -> tuple[Any, GenerateParams]:
    if media != "application/json":
        return parse_npy(body, query)
    if query:
        name = next(iter(query))
        raise RequestError(422, f"with a JSON body, give {name!r} in the body, not the query string", name)
    return parse_json(body)


def openapi_schema(base: dict[str, Any], cfg: ServeConfig, model: ModelShape | None) -> dict[str, Any]:
    """FastAPI's schema of the routes with POST /v1/generate's body and query parameters as `cfg` (and the loaded
    `model`, when known) enforce them. The query parameters belong to the .npy body only, which OpenAPI cannot
    tie to a media type: they are listed as the x-query-parameters of application/x-npy, not as parameters."""
    schema = copy.deepcopy(base)
    operation = schema["paths"][f"/{API_VERSION}/generate"]["post"]
    content = operation["requestBody"]["content"]
    content["application/json"]["schema"] = request_schema(cfg, model)
    content["application/x-npy"]["x-query-parameters"] = query_parameters(cfg, model)
    limit = cfg.limits.max_body_bytes
    operation["requestBody"]["description"] = f"at most {limit} bytes (limits.max_body_bytes); larger bodies get 413"
    return schema


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON or PNG out; the heavy parsing and the PNG encoding run in threads."""

    def __init__(self, generator: DeploymentHandle, cfg: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(cfg)
        self.generator = generator
        self.token = read_token(self.cfg.auth)
        self._model: ModelInfo | None = None

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        if credentials is None:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "Authorization")
        if not hmac.compare_digest(credentials.credentials.encode(), self.token.encode()):
            raise RequestError(401, "wrong bearer token", "Authorization")

    async def _model_info(self, rid: str) -> ModelInfo:
        if self._model is None:
            try:
                self._model = ModelInfo.model_validate(await self.generator.info.remote())
            except Exception as err:
                logger.warning("request %s: generator info failed: %r", rid, err)
                raise RequestError(503, "the generator is unavailable; try again later") from None
        return self._model

    @api.get("/healthz", summary="liveness of the ingress (no auth)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get(f"/{API_VERSION}/model", response_model=ModelInfo, responses=ERRORS, summary="what is loaded")
    async def model(self, request: Request, credentials: Credentials) -> ModelInfo:
        self._authorize(credentials)
        return await self._model_info(request_id(request))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        """The OpenAPI schema with this server's limits (and the loaded model's, once it answered)."""
        try:
            shape: ModelShape | None = (await self._model_info(request_id(request))).shape()
        except RequestError:
            shape = None
        return JSONResponse(openapi_schema(request.app.openapi(), self.cfg, shape))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{api.title} - Swagger UI")

    @api.post(
        f"/{API_VERSION}/generate",
        response_model=GenerateResponse,
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or one PNG (Accept)"}},
        summary="one EEG -> num_images images",
        description="The body is JSON (GenerateRequest), or the bytes of a .npy file (Content-Type "
        "application/x-npy) of a [channels, samples] real-valued array with the sampling parameters in the query "
        "string (listed under the media type's x-query-parameters; a JSON body takes them in the body only).",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": GenerateRequest.model_json_schema()},
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
    )
    async def generate(self, request: Request, credentials: Credentials) -> Response:
        tick = time.perf_counter()
        request.state.discard_bytes = self.cfg.limits.discard_bytes
        self._authorize(credentials)
        media = media_type(request.headers.get("content-type", ""))  # before the body is read
        body = await read_body(request, self.cfg.limits.max_body_bytes)
        model = await self._model_info(request_id(request))
        shape = model.shape()
        png = wants_png(request.headers.get("accept", ""))
        item = await asyncio.to_thread(self._prepare, body, media, dict(request.query_params), shape)
        if png and item.num_images != 1:
            raise RequestError(406, "Accept: image/png answers one image: ask for num_images=1 or JSON", "Accept")
        try:
            answer = await self.generator.generate.remote(item)
        except Exception as err:
            logger.warning("request %s: the generator failed: %r", request_id(request), err)
            raise RequestError(503, "the generator failed or is unavailable; try again later") from None
        if "error" in answer:
            raise RequestError(422, answer["error"], answer["field"])
        images = await asyncio.to_thread(lambda: [png_bytes(im) for im in answer["images"]])
        meta = self._metadata(item, answer, model, time.perf_counter() - tick)
        if png:
            return Response(images[0], media_type="image/png", headers={"X-Dreamdiff-Metadata": json.dumps(meta)})
        out = [{"index": j, "png_base64": base64.b64encode(b).decode()} for j, b in enumerate(images)]
        return JSONResponse({"images": out, **meta})

    def _prepare(self, body: bytes, media: str, query: dict[str, str], shape: ModelShape) -> GenerationItem:
        eeg, params = _parse(body, media, query)
        return resolve(eeg, params, self.cfg, shape)

    @staticmethod
    def _metadata(item: GenerationItem, answer: dict[str, Any], model: ModelInfo, total: float) -> dict[str, Any]:
        return {
            "seed": item.seed,
            "num_images": item.num_images,
            "steps": item.steps,
            "sampler": item.sampler,
            "guidance_scale": item.guidance_scale,
            "size": model.image_size,
            "model": model.model.model_dump(),
            "batch_size": answer["batch_size"],
            "fused": answer["fused"],
            "eeg": item.eeg_report,
            "time_s": {"total": round(total, 4), "sampling": answer["sampling_s"]},
        }


@serve.deployment
class GeneratorDeployment:
    """One Generator per replica; `generate` gathers requests with `@serve.batch` (size and wait from config)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        # imported here, not at the top: only this deployment needs diffusers, so ingress replicas start without it
        from dreamdiff.serve.engine import GenerationEngine

        self.engine = GenerationEngine.load(ServeConfig.model_validate(cfg))
        self.generate.set_max_batch_size(self.engine.cfg.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.engine.cfg.batching.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return self.engine.info.model_dump(mode="json")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from the config in __init__
    async def generate(self, items: list[GenerationItem]) -> list[dict[str, Any]]:
        # in a thread: the replica's event loop keeps queueing the next batch while this one samples
        return await asyncio.to_thread(self.engine.run_batch, items)

    def check_health(self) -> None:
        self.engine.check_health()


# How often a stopping replica looks for requests still in flight (Serve's default: 2 s). It sleeps this long
# before each look, so every delete or shutdown took at least that; the requests are drained the same either way.
DRAIN_POLL_S = 0.2


def build_application(cfg: ServeConfig) -> serve.Application:
    """The bound Serve application of a validated config."""
    data = cfg.model_dump(mode="json")
    batching, scaling = cfg.batching, cfg.autoscaling
    generator = GeneratorDeployment.options(
        name="generator",
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=batching.max_ongoing_requests or 2 * batching.max_batch_size,
        autoscaling_config=scaling.model_dump(exclude_none=True),
    ).bind(data)
    return Ingress.options(
        name="ingress",
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
    ).bind(generator, data)


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """`{"config": <serve yaml>, "dotted.key": value, ...}` or the ServeConfig fields themselves -> the config.

    String values are parsed as YAML, as on the dreamdiff command line (`serve run ... batching.max_batch_size=8`);
    mappings merge into the sections they name. Relative local paths become absolute (replicas run elsewhere).
    """
    args = dict(args)
    data: dict[str, Any] = {}
    source = "serve application args"
    if "config" in args:
        path = resolve_config_path(str(args.pop("config")))
        data, source = read_yaml(path), f"{path} (serve application args)"
    for key, value in args.items():
        if isinstance(value, str):
            apply_overrides(data, [f"{key}={value}"])
        else:
            _merge(data, key.split("."), value)
    return absolute_paths(cast(ServeConfig, validate_config("serve", data, source, list(args))))


def absolute_paths(cfg: ServeConfig) -> ServeConfig:
    """The config with its relative paths that exist here made absolute (replicas do not share our cwd)."""
    cfg = cfg.model_copy(deep=True)
    for found in path_fields(cfg):
        path = Path(found.value)
        if not path.is_absolute() and path.exists():
            found.set(str(path.resolve()))
    return cfg


def _merge(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    last = keys[-1]
    if isinstance(value, dict) and isinstance(data.get(last), dict):
        for sub, item in value.items():
            _merge(data[last], [sub], item)
    else:
        data[last] = value


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: dreamdiff.serve.app:build_app`); see `config_from_args`."""
    return build_application(config_from_args(args))
