"""The endpoint on a real local Ray Serve (127.0.0.1, a free port) with a tiny generator: images, seeds, batching,
auth, limits, a bounded fuzz and load test, the client and `dreamdiff request`."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from dreamdiff.cli import main
from dreamdiff.config import ServeConfig
from dreamdiff.serve.api import GenerateResponse
from dreamdiff.serve.client import ServeClient, ServeError

MakeEEG = Callable[..., np.ndarray]
_SERVE_LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def run_load(client: ServeClient, eeg: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """benchmarks/serve_load.py's load test (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("serve_load", _SERVE_LOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_load(client, eeg, **kwargs)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def _post_json(url: str, token: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, headers=_auth(token), timeout=120)


@pytest.fixture(scope="module")
def client(url: str, token: str) -> Iterator[ServeClient]:
    yield ServeClient(url, token=token, timeout=120)


def test_a_valid_request_returns_the_requested_pngs(
    url: str, token: str, client: ServeClient, make_eeg: MakeEEG
) -> None:
    response = _post_json(url, token, {"eeg": make_eeg().tolist(), "num_images": 3, "seed": 11})
    assert response.status_code == 200, response.text
    body = response.json()
    GenerateResponse.model_validate(body)  # the answer is what the OpenAPI schema documents
    images = [_pixels(base64.b64decode(image["png_base64"])) for image in body["images"]]
    assert len(images) == 3 and all(image.shape == (8, 8, 3) for image in images)
    assert [image["index"] for image in body["images"]] == [0, 1, 2]
    assert (body["seed"], body["num_images"], body["sampler"], body["steps"], body["size"]) == (11, 3, "dpm++", 4, 8)
    assert body["model"]["id"] == client.model()["model"]["id"] and len(body["model"]["id"]) == 16
    assert body["batch_size"] >= 1 and body["time_s"]["total"] >= body["time_s"]["sampling"] > 0
    npy = client.generate(make_eeg(), num_images=2, seed=11)  # the same EEG as .npy: the same first two images
    assert [_pixels(png).tolist() for png in npy.images] == [image.tolist() for image in images[:2]]


def test_the_same_seed_gives_the_same_image(client: ServeClient, make_eeg: MakeEEG) -> None:
    first = client.generate(make_eeg(seed=3), seed=5, num_images=2)
    again = client.generate(make_eeg(seed=3), seed=5, num_images=2)
    other = client.generate(make_eeg(seed=3), seed=6, num_images=2)
    assert first.images == again.images
    assert first.images[0] != first.images[1] and other.images != first.images
    png = client.generate_png(make_eeg(seed=3), seed=5)  # Accept: image/png, one image, metadata in a header
    assert png.images[0] == first.images[0] and png.metadata["seed"] == 5
    drawn = client.generate(make_eeg(seed=3))
    assert drawn.metadata["seed"] not in (5, 6)  # a seed drawn by the server, returned for reproduction
    assert client.generate(make_eeg(seed=3), seed=drawn.metadata["seed"]).images == drawn.images


def test_concurrent_requests_are_batched_without_changing_images(
    serve_app: ServeConfig, client: ServeClient, make_eeg: MakeEEG
) -> None:
    alone = client.generate(make_eeg(seed=4), seed=100)
    assert alone.metadata["batch_size"] == 1

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.generate(make_eeg(seed=4), seed=100 + i), range(16)))
    sizes = [r.metadata["batch_size"] for r in results]
    assert max(sizes) > 1 and max(sizes) <= serve_app.batching.max_batch_size, sizes
    assert max(r.metadata["fused"] for r in results) > 1  # sampled in one generator call
    assert results[0].images == alone.images  # an image depends on its seed and index only


def test_other_channel_counts_and_lengths_are_harmonised(client: ServeClient, make_eeg: MakeEEG) -> None:
    result = client.generate(make_eeg(channels=32, samples=1000), sfreq=500, seed=1)
    assert result.metadata["eeg"]["applied"] == [
        "resampled 500 -> 250 Hz (1000 -> 500 samples)",
        "stretched 500 -> 512 samples",
        "normalised (zscore)",
        "tiled 32 -> 128 channels",
    ]
    assert _pixels(result.images[0]).shape == (8, 8, 3)


def test_health_model_and_openapi(url: str, client: ServeClient, serve_app: ServeConfig) -> None:
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}  # open without a token
    closed = requests.get(f"{url}/v1/model", timeout=30)
    assert closed.status_code == 401 and closed.json()["field"] == "Authorization"
    assert closed.headers["WWW-Authenticate"] == "Bearer"
    info = client.model()
    assert info["eeg_shape"] == [128, 512] and info["image_size"] == 8 and info["guidance"] is False
    assert info["defaults"]["steps"] == 4 and info["limits"]["max_images_per_request"] == 8
    assert info["batching"]["max_batch_size"] == 8 and info["device"] == "cpu"
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    generate = schema["paths"]["/v1/generate"]["post"]
    assert {"application/json", "application/x-npy"} <= set(generate["requestBody"]["content"])
    assert {"200", "400", "401", "406", "413", "415", "422", "503"} <= set(generate["responses"])
    assert "image/png" in generate["responses"]["200"]["content"]
    npy_query = generate["requestBody"]["content"]["application/x-npy"]["x-query-parameters"]
    assert {p["name"] for p in npy_query} >= {"num_images", "seed", "steps", "sfreq"} and not generate.get("parameters")
    body = generate["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["num_images"]["anyOf"][0]["maximum"] == serve_app.limits.max_images_per_request
    assert body["eeg"]["maxItems"] == serve_app.limits.max_channels and body["eeg"]["minItems"] == 1
    assert body["eeg"]["items"]["minItems"] == serve_app.limits.min_samples
    assert body["guidance_scale"]["anyOf"][0]["maximum"] == 1.0  # this model has no null context
    assert {"/healthz", "/v1/model"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert set(schema["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error", "field", "request_id"}


# ------------------------------------------------------------------------------------------ fuzz


def _fuzz_cases(
    url: str, token: str, serve_app: ServeConfig, make_eeg: MakeEEG
) -> list[tuple[str, dict[str, Any], str]]:
    """(what, requests.post kwargs, the field the answer must name): each one malformed in one way."""
    good = make_eeg().tolist()
    auth, json_type, npy_type = (
        _auth(token),
        {"Content-Type": "application/json"},
        {"Content-Type": "application/x-npy"},
    )
    cases: list[tuple[str, dict[str, Any], str]] = []

    def as_json(what: str, body: Any, field: str, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        cases.append((what, {"data": data, "headers": {**json_type, **auth, **(headers or {})}}, field))

    def as_npy(what: str, array: Any, field: str, query: dict[str, str] | None = None) -> None:
        data = array if isinstance(array, bytes) else _npy(np.asarray(array))
        cases.append((what, {"data": data, "params": query or {}, "headers": {**npy_type, **auth}}, field))

    bad_params = {
        "num_images": [0, -1, 9, 1000, "2", 2.5, True, [1]],
        "steps": [0, -3, 101, 10**6, "ten", 1.5, False],
        "seed": [-1, 2**63, 2**70, 1.5, "x", [3]],
        "guidance_scale": [-1.0, 21.0, 3.0, "x", [1]],
        "size": [16, 0, -8, 7, "8px"],
        "sampler": ["euler", "", 5, ["dpm++"]],
        "sfreq": [0, -250, 1e9, "fast", [250]],
    }
    for name, values in bad_params.items():
        for value in values:
            as_json(f"json {name}={value!r}", {"eeg": good, name: value}, name)
            if not isinstance(value, list | bool) and value != "2":  # a query string is text: "2" is fine there
                as_npy(f"npy {name}={value!r}", make_eeg(), name, {name: str(value)})
    for name in ("colour", "eeG", "images", "Seed"):
        as_json(f"json unknown field {name}", {"eeg": good, name: 1}, name)
        as_npy(f"npy unknown query {name}", make_eeg(), name, {name: "1"})
        as_json(f"json body with query {name}", {"eeg": good}, name)
        cases[-1][1]["params"] = {name: "1"}
    for what, body in {
        "truncated": b'{"eeg": [[1, 2',
        "trailing": b'{"eeg": [[1]]} x',
        "empty": b"",
        "not utf-8": b"\xff\xfe\x00",
        "single quotes": b"{'eeg': [[1]]}",
        "bare word": b"eeg",
        "nested garbage": b'{"eeg": [[1,,2]]}',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    }.items():
        as_json(f"bad json: {what}", body, "body")
    for what, body in {"list": [1, 2], "string": "eeg", "number": 3, "null": None, "true": True}.items():
        as_json(f"json top level {what}", body, "body")
    eeg_bodies: dict[str, Any] = {
        "missing": {"num_images": 1},
        "null": {"eeg": None},
        "string": {"eeg": "1,2,3"},
        "number": {"eeg": 5},
        "empty": {"eeg": []},
        "empty rows": {"eeg": [[]]},
        "1-D": {"eeg": [1.0] * 512},
        "3-D": {"eeg": [good[:2]]},
        "ragged": {"eeg": [[1.0] * 512, [1.0] * 511]},
        "string inside": {"eeg": [[1.0] * 511 + ["1"]]},
        "bool inside": {"eeg": [[True] * 512]},
        "null inside": {"eeg": [[1.0] * 511 + [None]]},
        "dict inside": {"eeg": [[{"v": 1}] * 512]},
        "dict": {"eeg": {"0": [1.0] * 512}},
        "too short": {"eeg": [[1.0] * 10] * 4},
        "too many channels": {"eeg": [[1.0] * 64] * 600},
        "too long": {"eeg": [[1.0] * 20_000]},
        "huge values": {"eeg": [[1e300] * 512]},
    }
    for what, body in eeg_bodies.items():
        as_json(f"eeg {what}", body, "eeg")
    for what, literal in {"NaN": b"NaN", "Infinity": b"Infinity", "-Infinity": b"-Infinity", "1e400": b"1e400"}.items():
        row = b"[" + b"1.0, " * 511 + literal + b"]"
        as_json(f"eeg with {what}", b'{"eeg": [' + b", ".join([row] * 4) + b"]}", "eeg")
    for what, array in {
        "NaN": np.full((128, 512), np.nan),
        "inf": np.full((4, 512), -np.inf),
        "complex": np.ones((4, 512), complex),
        "bool": np.ones((4, 512), bool),
        "strings": np.full((4, 512), "a"),
        "1-D": np.ones(512),
        "3-D": np.ones((1, 4, 512)),
        "0-D": np.float32(1.0),
        "empty": np.ones((0, 512)),
        "pickled objects": np.array([{"x": 1}], dtype=object),
        "structured": np.zeros(4, dtype=[("a", "f4")]),
    }.items():
        as_npy(f"npy {what}", array, "eeg")
    for what, data in {
        "garbage": b"hello",
        "empty": b"",
        "npz": b"PK\x03\x04" + bytes(64),
        "json as npy": json.dumps({"eeg": good}).encode(),
        "truncated": _npy(make_eeg())[:1000],
        "bad header": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'x'}  \n",
    }.items():
        as_npy(f"npy bytes {what}", data, "eeg")
    rng = np.random.default_rng(0)  # random shapes, each out of the limits on one axis
    for k in range(40):
        shape = (int(rng.integers(513, 700)), 64) if k % 2 else (int(rng.integers(1, 128)), int(rng.integers(1, 64)))
        as_npy(f"npy random shape {shape}", rng.standard_normal(shape).astype(np.float32), "eeg")
    for media in (
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
        "image/png",
        "",
        "application/jsonx",
    ):
        cases.append(
            (f"content type {media!r}", {"data": b"{}", "headers": {"Content-Type": media, **auth}}, "Content-Type")
        )
    big = b"0" * (serve_app.limits.max_body_bytes + 1)
    cases.append(("huge body, declared", {"data": big, "headers": {**json_type, **auth}}, "body"))
    cases.append(("huge body, streamed", {"data": iter([big[: 2**20]] * 3), "headers": {**json_type, **auth}}, "body"))
    cases.append(("huge npy", {"data": _npy(np.ones((600, 512))), "headers": {**npy_type, **auth}}, "body"))
    cases.append(
        (
            "png for 2 images",
            {"json": {"eeg": good, "num_images": 2}, "headers": {**auth, "Accept": "image/png"}},
            "Accept",
        )
    )
    for what, headers in {
        "no token": {},
        "wrong token": {"Authorization": "Bearer nope"},
        "basic auth": {"Authorization": "Basic dTpw"},
        "empty bearer": {"Authorization": "Bearer "},
        "token prefix": {"Authorization": f"Bearer {token[:-1]}"},
        "token plus": {"Authorization": f"Bearer {token}x"},
        "no scheme": {"Authorization": token},
    }.items():
        for body_kind in ("good", "garbage", "huge"):
            data = {"good": json.dumps({"eeg": good}).encode(), "garbage": b"{", "huge": big}[body_kind]
            cases.append(
                (f"{what}, {body_kind} body", {"data": data, "headers": {**json_type, **headers}}, "Authorization")
            )
        cases.append(
            (f"{what}, model info", {"method": "GET", "path": "/v1/model", "headers": headers}, "Authorization")
        )
    return cases


def _send(url: str, case: dict[str, Any]) -> requests.Response:
    method, path = case.pop("method", "POST"), case.pop("path", "/v1/generate")
    return requests.request(method, f"{url}{path}", timeout=60, **case)


def test_fuzz_gets_only_4xx_json_errors_naming_the_field(
    url: str, token: str, serve_app: ServeConfig, client: ServeClient, make_eeg: MakeEEG
) -> None:
    cases = _fuzz_cases(url, token, serve_app, make_eeg)
    assert len(cases) >= 200
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda c: _send(url, c[1]), cases))
    wrong = []
    for (what, _, field), response in zip(cases, responses, strict=True):
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not 400 <= response.status_code < 500 or body.get("field") != field or not body.get("error"):
            wrong.append(f"{what}: {response.status_code} {response.text[:160]}")
    assert not wrong, f"{len(wrong)} of {len(cases)} answers are not 4xx JSON naming the field:\n" + "\n".join(wrong)
    statuses = {r.status_code for r in responses}
    assert {400, 401, 406, 413, 415, 422} <= statuses
    assert len(client.generate(make_eeg(), num_images=2).images) == 2  # the replicas still work


def test_unknown_paths_and_methods_answer_json(url: str, token: str) -> None:
    missing = requests.get(f"{url}/v2/generate", timeout=30)
    assert missing.status_code == 404
    assert missing.json() == {"error": "Not Found", "field": None, "request_id": missing.headers["X-Request-ID"]}
    method = requests.get(f"{url}/v1/generate", headers=_auth(token), timeout=30)
    assert method.status_code == 405 and method.json()["field"] is None
    assert method.headers["Allow"] == "POST"  # RFC 9110: a 405 lists the allowed methods


def test_a_large_body_sent_whole_before_reading_gets_the_413(url: str, token: str) -> None:
    # urllib sends the whole body before it reads the answer: a server that answers early and closes with the
    # body unread resets the connection, and the client never sees the 413
    import urllib.error
    import urllib.request

    body = b"0" * (32 * 2**20)  # a smaller body fits the socket buffers, and even an early close reads it
    request = urllib.request.Request(
        f"{url}/v1/generate", data=body, method="POST", headers={**_auth(token), "Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413
    answer = json.loads(err.value.read())
    assert answer["field"] == "body" and answer["request_id"] == err.value.headers["X-Request-ID"]


def test_error_bodies_carry_a_request_id_and_no_internals(url: str, token: str, serve_app: ServeConfig) -> None:
    from ray import serve

    from dreamdiff.serve.app import Ingress

    sent = requests.post(
        f"{url}/v1/generate", json={"eeg": 1}, headers={**_auth(token), "X-Request-ID": "trace-42"}, timeout=60
    )
    assert sent.status_code == 422 and sent.json()["request_id"] == "trace-42"  # a sane client id is honoured
    assert sent.headers["X-Request-ID"] == "trace-42"
    own = requests.post(
        f"{url}/v1/generate", json={"eeg": 1}, headers={**_auth(token), "X-Request-ID": "a b\t{}"}, timeout=60
    )
    assert own.json()["request_id"] not in ("a b\t{}", None) and len(own.json()["request_id"]) == 32
    assert own.json()["request_id"] in own.headers["X-Request-ID"]  # beside the proxy's copy of the client's

    @serve.deployment
    class BrokenGenerator:
        """A generator whose calls fail: Ray's error text names the process, node and actor."""

        def info(self) -> None:
            raise RuntimeError("the generator is broken")

    app = Ingress.options(name="broken-ingress").bind(BrokenGenerator.bind(), serve_app.model_dump(mode="json"))
    serve.run(app, name="broken", route_prefix="/broken")
    try:
        answer = requests.post(
            f"{url}/broken/v1/generate", json={"eeg": [[1.0] * 64]}, headers=_auth(token), timeout=60
        )
    finally:
        serve.delete("broken")
    body = answer.json()
    assert answer.status_code == 503 and set(body) == {"error", "field", "request_id"}, body
    assert body["request_id"] == answer.headers["X-Request-ID"]
    for internal in ("pid", "127.0.0.1", "actor", "namespace", "RuntimeError", "ray::", "Ray"):
        assert internal not in body["error"], body


# ------------------------------------------------------------------------------------------ load


def test_load_200_requests_16_concurrent(client: ServeClient, make_eeg: MakeEEG) -> None:
    client.generate(make_eeg())  # warm
    stats = run_load(client, make_eeg(), requests=200, concurrency=16)
    print(json.dumps({"name": "serve_load_test", "device": "cpu (2-core build machine)", **stats}))
    assert stats["errors"] == 0, stats["first_error"]
    assert stats["p95_s"] >= stats["p50_s"] > 0 and stats["requests_per_s"] > 0
    assert stats["batch_size_max"] > 1


# ------------------------------------------------------------------------------------------ client + CLI


def test_client_and_dreamdiff_request_round_trip(
    url: str, token: str, client: ServeClient, make_eeg: MakeEEG, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = make_eeg(seed=9)
    np.save(tmp_path / "trial.npy", x)
    (tmp_path / "trial.json").write_text(json.dumps({"eeg": x.tolist()}))
    token_file = tmp_path / "token"
    token_file.write_text(token)
    expected = client.generate(x, seed=21, num_images=2).images
    for name in ("trial.npy", "trial.json"):
        out = tmp_path / f"out-{name}"
        argv = ["request", str(tmp_path / name), "--url", url, "--out", str(out), "--seed", "21"]
        assert main([*argv, "--num-images", "2", "--token-file", str(token_file)]) == 0
        assert [p.read_bytes() for p in sorted(out.glob("*.png"))] == expected
        assert json.loads((out / "trial.json").read_text())["seed"] == 21
    assert "2 image(s)" in capsys.readouterr().out

    (tmp_path / "bad").write_text("nope")
    assert main(["request", str(tmp_path / "trial.npy"), "--url", url, "--token-file", str(tmp_path / "bad")]) == 2
    assert "401" in capsys.readouterr().err
    with pytest.raises(ServeError) as err:
        client.generate(x, num_images=99)
    assert err.value.status == 422 and err.value.field == "num_images"
    began = time.perf_counter()
    assert main(["request", str(tmp_path / "trial.npy"), "--url", "http://127.0.0.1:9", "--timeout", "5"]) == 2
    assert "could not reach" in capsys.readouterr().err and time.perf_counter() - began < 10
