"""The HTTP reward client against the reference server (and a scripted server) on 127.0.0.1, ephemeral ports."""

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from genalign.rewards import RewardError, RewardSet, load_reward
from genalign.rewards.remote import RemoteReward, decode_images, encode_images
from genalign.rewards.serve import make_server

TOY = Path(__file__).parent / "data" / "toy_rewards.py"
PROMPTS = ["a", "b", "c", "d", "e"]


def images(n=5, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@contextmanager
def running(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/score"
    finally:
        server.shutdown()
        server.server_close()


def brightness_recording(images, prompts, metadata):
    brightness_recording.batches.append((len(prompts), list(metadata)))
    return images.mean(dim=(1, 2, 3))


def test_png_round_trip_is_8bit_exact():
    x = (images() * 255).round() / 255
    assert torch.equal(decode_images(encode_images(x)), x)


def test_scores_batching_and_metadata_through_reward_set():
    brightness_recording.batches = []
    with running(make_server(brightness_recording)) as url:
        rs = RewardSet({"remote": 2.0}, {"remote": {"url": url, "batch_size": 2}})
        meta = [{"i": i, "tensor": torch.zeros(1)} for i in range(5)]  # non-JSON values travel as str
        total, parts = rs(images(), PROMPTS, meta)
    expected = ((images() * 255).round() / 255).mean(dim=(1, 2, 3))
    assert torch.allclose(parts["remote"], expected, atol=1e-6) and torch.allclose(total, 2 * expected, atol=1e-6)
    assert [n for n, _ in brightness_recording.batches] == [2, 2, 1]
    assert brightness_recording.batches[0][1] == [{"i": i, "tensor": "tensor([0.])"} for i in (0, 1)]


def test_dict_reward_served_from_a_script_spec():
    with running(make_server(f"{TOY}:named_parts")) as url:
        total, parts = RewardSet("remote", {"remote": {"url": url}})(images(), PROMPTS)
    assert set(parts) == {"remote", "remote.score", "remote.contrast"} and torch.equal(total, parts["remote.score"])


def test_timeout_is_retried_then_reported():
    def slow(images, prompts, metadata):
        time.sleep(1.0)
        return torch.zeros(len(prompts))

    with running(make_server(slow)) as url:
        client = RemoteReward(url, timeout=0.2, retries=1, backoff=0.0)
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"'remote' at http://127\.0\.0\.1:\d+/score failed after 2 attempts: "
                                              r"timed out after 0\.2 s"):
            RewardSet(client)(images(2), PROMPTS[:2])
        assert time.monotonic() - start < 0.9


def test_reward_failure_is_500_retried_then_reported():
    calls = []

    def broken(images, prompts, metadata):
        calls.append(1)
        raise RuntimeError("GPU fell over")

    with running(make_server(broken)) as url:
        with pytest.raises(RewardError, match=rf"'remote' at {url} failed after 3 attempts: HTTP 500 "
                                              r"\(reward 'broken' raised RuntimeError: GPU fell over\)") as info:
            load_reward("remote", url=url, retries=2, backoff=0.01)(images(2), PROMPTS[:2])
    assert len(calls) == 3 and info.value.reward == "remote"


class Scripted(BaseHTTPRequestHandler):
    """Answers the statuses in ``server.statuses`` in turn (then 200), recording each request."""

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((dict(self.headers), json.loads(body)))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        n = len(self.server.requests[-1][1]["prompts"])
        answer = {"scores": [0.5] * n} if status == 200 else {"error": "nope"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def scripted(statuses):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.statuses, server.requests = list(statuses), []
    return server


def test_transient_5xx_recovers_4xx_is_not_retried_and_only_payload_is_sent(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    server = scripted([503, 502])
    with running(server) as url:
        client = RemoteReward(url, retries=3, backoff=0.0, headers={"Authorization": "Bearer abc"})
        assert client(images(2), PROMPTS[:2], [{"k": 1}, {}]) == [0.5, 0.5]
    assert len(server.requests) == 3
    headers, payload = server.requests[-1]
    assert set(payload) == {"images", "prompts", "metadata"} and payload["metadata"] == [{"k": 1}, {}]
    assert headers["Authorization"] == "Bearer abc" and "secret-token-value" not in json.dumps(server.requests)
    assert "abc" not in repr(client)

    server = scripted([422])
    with running(server) as url:
        with pytest.raises(RewardError, match=r"refused the request: HTTP 422 \(nope\) \(not retried\)"):
            RemoteReward(url, retries=3, backoff=0.0)(images(2), PROMPTS[:2])
    assert len(server.requests) == 1


def test_bad_request_and_unreachable_server():
    with running(make_server(brightness_recording)) as url:
        with pytest.raises(RewardError, match=r"HTTP 400 \(bad request: .*2 images, 2 prompts and 1 metadata"):
            RemoteReward(url, retries=2)(images(2), PROMPTS[:2], [{}])
    with pytest.raises(RewardError, match=r"failed after 2 attempts: ConnectionRefusedError"):
        RemoteReward(url, retries=1, backoff=0.0)(images(1), PROMPTS[:1])  # the server is gone
    with pytest.raises(ValueError, match="http"):
        RemoteReward("file:///etc/passwd")
