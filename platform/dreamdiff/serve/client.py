"""Python client of the endpoint: send one EEG, get the PNGs and the metadata back.

    client = ServeClient("http://127.0.0.1:8000", token=read_token())
    result = client.generate(load_eeg("trial.npy"), num_images=2, seed=7)
    result.save("out/", "trial")

EEG travels as the bytes of a .npy file (Content-Type application/x-npy, parameters in the query string): a
fraction of the size of the same numbers as JSON text. Errors of the server become `ServeError` with its
status and the field it named.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

from dreamdiff.errors import DreamdiffError

TOKEN_ENV = "DREAMDIFF_SERVE_TOKEN"


class ServeError(DreamdiffError):
    """The server refused or failed a request (`status`, and the `field` it named, if any)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        where = f" (field {field})" if field else ""
        super().__init__(f"server answered {status}: {message}{where}")
        self.status = status
        self.field = field


@dataclass
class GenerateResult:
    images: list[bytes]  # PNG files
    metadata: dict[str, Any]

    def save(self, folder: str | Path, stem: str) -> list[Path]:
        """Write <stem>_seed<seed>_<j>.png for every image and <stem>.json with the metadata."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        seed = self.metadata.get("seed")
        paths = []
        for j, png in enumerate(self.images):
            path = out / f"{stem}_seed{seed}_{j}.png"
            path.write_bytes(png)
            paths.append(path)
        (out / f"{stem}.json").write_text(json.dumps(self.metadata, indent=1))
        return paths


def read_token(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> str | None:
    """A bearer token from a file, else from the environment; None when neither holds one."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise DreamdiffError(f"token file {str(path)!r} is not a readable file")
        return path.read_text().strip() or None
    return os.environ.get(env, "").strip() or None


def load_eeg(path: str | Path) -> np.ndarray:
    """An EEG file: .npy ([channels, samples], no pickles) or .json (a nested list, or an object with "eeg")."""
    path = Path(path)
    if not path.is_file():
        raise DreamdiffError(f"EEG file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise DreamdiffError(f"EEG file {str(path)!r} is not a plain .npy array: {err}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DreamdiffError(f"EEG file {str(path)!r} is not valid JSON: {err}") from None
        data = data.get("eeg") if isinstance(data, dict) else data
        try:
            return np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            raise DreamdiffError(f"EEG file {str(path)!r}: expected [channels][samples] numbers") from None
    raise DreamdiffError(f"EEG file {str(path)!r}: expected a .npy or .json file")


class ServeClient:
    """Requests to one endpoint (the URL of its route prefix); one HTTP session, safe to share across threads
    for concurrent requests (requests.Session's connection pool)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, pool: int = 16) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=pool, pool_maxsize=pool)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _check(self, response: requests.Response) -> requests.Response:
        if response.ok:
            return response
        try:
            body = response.json()
            message, field = body.get("error", response.text), body.get("field")
        except ValueError:
            message, field = response.text[:200], None
        raise ServeError(response.status_code, message, field)

    def health(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/healthz", timeout=self.timeout)).json()

    def model(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/v1/model", timeout=self.timeout)).json()

    def _post(self, eeg: np.ndarray, params: dict[str, Any], accept: str) -> requests.Response:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(eeg), allow_pickle=False)
        query = {k: v for k, v in params.items() if v is not None}
        headers = {"Content-Type": "application/x-npy", "Accept": accept}
        response = self.session.post(
            f"{self.url}/v1/generate", params=query, data=buffer.getvalue(), headers=headers, timeout=self.timeout
        )
        return self._check(response)

    def generate(self, eeg: np.ndarray, **params: Any) -> GenerateResult:
        """EEG [channels, samples] -> PNGs; params: num_images, seed, steps, sampler, guidance_scale, size, sfreq."""
        body = self._post(eeg, params, "application/json").json()
        images = [base64.b64decode(image["png_base64"]) for image in body.pop("images")]
        return GenerateResult(images, body)

    def generate_png(self, eeg: np.ndarray, **params: Any) -> GenerateResult:
        """One image as image/png (metadata from the X-Dreamdiff-Metadata header)."""
        response = self._post(eeg, {**params, "num_images": 1}, "image/png")
        return GenerateResult([response.content], json.loads(response.headers["X-Dreamdiff-Metadata"]))
