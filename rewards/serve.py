"""Reference reward server (stdlib ``http.server``) for :class:`genalign.rewards.remote.RemoteReward`.

    python -m genalign.rewards.serve --reward path/to/my_reward.py:score --port 8000 --host 127.0.0.1
    python -m genalign.rewards.serve --reward pickscore --options '{"normalize": true}'

``--reward`` is any reward spec (a registered name or ``file.py:function``; loading a script runs it).
``POST /`` (any path) takes ``{"images": [base64 PNG], "prompts": [...], "metadata": [...]}`` and answers
``{"scores": [...]}`` or, for a dict reward, ``{"scores": {name: [...]}}``; a malformed request gets 400,
a failing reward 500, both with ``{"error": message}``. ``GET /`` answers ``{"reward": name}``.
It listens on 127.0.0.1 unless told otherwise, has no authentication and is not meant to face a network
you do not trust: put it behind your own proxy for that.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Sequence, Union

from genalign.reward_api import RewardError, RewardFn, load_reward, score_reward

from .remote import decode_images

MAX_REQUEST_BYTES = 512 * 1024 * 1024


class RewardRequestHandler(BaseHTTPRequestHandler):
    """Scores ``POST`` bodies with ``self.server.reward`` (set by :func:`make_server`)."""

    server_version = "genalign-reward/1"

    def _answer(self, status: int, payload: Dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out) meanwhile
            self.log_message("client closed the connection before the answer (status %d)", status)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, {"reward": self.server.reward_name})

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_REQUEST_BYTES:
                raise ValueError(f"Content-Length must be 1..{MAX_REQUEST_BYTES}, got {length}")
            payload = json.loads(self.rfile.read(length))
            prompts = payload["prompts"]
            metadata = payload.get("metadata") or [{} for _ in prompts]
            images = decode_images(payload["images"])
            if not (len(images) == len(prompts) == len(metadata)):
                raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        except Exception as exc:  # noqa: BLE001 - any malformed request is the client's error
            self._answer(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
            return
        try:
            scores = score_reward(self.server.reward_name, self.server.reward, images, prompts, metadata)
        except RewardError as exc:
            self._answer(500, {"error": str(exc)})
            return
        lists = {k: v.tolist() for k, v in scores.items()}
        self._answer(200, {"scores": lists.get("", lists)})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        if self.server.verbose:
            super().log_message(format, *args)


def make_server(reward: Union[str, RewardFn], host: str = "127.0.0.1", port: int = 0,
                options: Optional[Dict[str, Any]] = None, verbose: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server scoring requests with ``reward`` (``port=0``: an ephemeral port, see
    ``server.server_address``). Run it with ``serve_forever()``; stop it with ``shutdown()``."""
    server = ThreadingHTTPServer((host, port), RewardRequestHandler)
    server.daemon_threads = True
    server.reward = load_reward(reward, **(options or {}))
    server.reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)
    server.verbose = verbose
    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genalign.rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a registered reward name or path/to/file.py:function")
    parser.add_argument("--options", default="{}", help="JSON object of keyword options for the reward")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    server = make_server(args.reward, args.host, args.port, options, verbose=not args.quiet)
    host, port = server.server_address[:2]
    print(f"serving reward {server.reward_name!r} on http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
