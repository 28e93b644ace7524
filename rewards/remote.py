"""A reward computed by an HTTP server (e.g. a big reward model on another machine).

Protocol: ``POST <url>`` with JSON ``{"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}``;
the answer is ``{"scores": [N floats]}`` or ``{"scores": {"name": [N floats], ...}}`` (a dict reward:
``"score"``, else the first key, is the value used; every key is logged). ``genalign.rewards.serve`` is a
reference server wrapping any reward spec.

The client sends nothing but those three fields (images quantised to 8-bit PNG; metadata values that are
not JSON are sent as their ``str``) and the ``headers`` you give it (e.g. an ``Authorization`` header); it
ignores proxy environment variables unless ``use_env_proxy=True``. Timeouts, connection errors and 5xx
answers are retried ``retries`` times with exponential backoff (``backoff * 2**attempt`` seconds); 4xx
answers are not retried. A final failure raises :class:`RewardError` naming the reward and the URL.
``batch_size`` is a hint honoured by :class:`RewardSet`: one request per chunk of that many images.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional

import torch

from genalign.reward_api import RewardError

from ._common import to_uint8_images

MAX_ERROR_CHARS = 500


def encode_images(images: torch.Tensor) -> List[str]:
    """``[N, 3, H, W]`` in [0, 1] -> N base64-encoded 8-bit RGB PNGs."""
    from PIL import Image

    encoded = []
    for array in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: List[str]) -> torch.Tensor:
    """N base64 PNGs (all the same size) -> ``[N, 3, H, W]`` float in [0, 1]."""
    import numpy as np
    from PIL import Image

    arrays = []
    for item in encoded:
        with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes in one request: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _scores_from_json(name: str, url: str, answer: Any, n: int):
    """The ``scores`` of a server answer as a list or a dict of lists (validated later by the caller)."""
    scores = answer.get("scores") if isinstance(answer, Mapping) else None
    if isinstance(scores, list) or (isinstance(scores, Mapping) and scores):
        return scores if isinstance(scores, list) else {str(k): v for k, v in scores.items()}
    raise RewardError(f"remote reward {name!r} at {url}: the answer to {n} samples has no 'scores' list or dict "
                      f"(got {str(answer)[:MAX_ERROR_CHARS]!r})", name)


class RemoteReward:
    """Client of a reward server. See the module docstring for the protocol and the retry policy.

    url: ``http(s)://host:port/path``. timeout: seconds per request. retries: extra attempts after the
    first. batch_size: images per request (via :class:`RewardSet`). headers: extra HTTP headers.
    backoff: first retry delay in seconds (doubled each time). name: how errors and logs call it.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, batch_size: Optional[int] = 16,
                 headers: Optional[Mapping[str, str]] = None, backoff: float = 0.5, name: str = "remote",
                 use_env_proxy: bool = False):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote reward url must be http(s)://host[:port][/path], got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"remote reward needs timeout > 0, retries >= 0, backoff >= 0 "
                             f"(got {timeout}, {retries}, {backoff})")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.batch_size = batch_size
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        self.name = name
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # headers may hold secrets: never shown
        return (f"RemoteReward({self.url!r}, timeout={self.timeout}, retries={self.retries}, "
                f"batch_size={self.batch_size})")

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None):
        """One request for the whole batch -> a list of N scores or ``{name: list}`` (validated by the caller)."""
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        body = json.dumps({"images": encode_images(images), "prompts": list(prompts), "metadata": metadata},
                          default=str).encode("utf-8")
        return _scores_from_json(self.name, self.url, self._post(body), len(prompts))

    def _post(self, body: bytes) -> Dict[str, Any]:
        headers = {**self.headers, "Content-Type": "application/json", "Accept": "application/json"}
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code < 500:
                    raise RewardError(f"remote reward {self.name!r} at {self.url} refused the request: HTTP {exc.code}"
                                      f" {detail} (not retried)", self.name) from None
                last = f"HTTP {exc.code} {detail}"
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = (f"timed out after {self.timeout} s" if _is_timeout(reason)
                        else f"{type(reason).__name__}: {reason}")
            except json.JSONDecodeError as exc:
                raise RewardError(f"remote reward {self.name!r} at {self.url} answered with invalid JSON: {exc}",
                                  self.name) from None
        raise RewardError(f"remote reward {self.name!r} at {self.url} failed after {self.retries + 1} attempts: {last}",
                          self.name)


def _is_timeout(reason: Any) -> bool:
    return isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's ``error`` message (or the start of its body) for an HTTP error answer."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only a hint
        return str(exc.reason)
    try:
        message = json.loads(raw).get("error", raw)
    except (ValueError, AttributeError):
        message = raw
    return f"({str(message)[:MAX_ERROR_CHARS]})" if message else f"({exc.reason})"
