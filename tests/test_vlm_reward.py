"""The VLM-as-judge reward against a local OpenAI-compatible stub server on 127.0.0.1 (no network)."""

import base64
import io
import json
import math
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from genalign.rewards import RewardError, RewardSet

from .test_remote_reward import running


def stub_server(reply):
    """A chat-completions stub: ``reply(brightness of the image, request body) -> response body``."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            from PIL import Image

            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, dict(self.headers), body))
            url = body["messages"][0]["content"][1]["image_url"]["url"]
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            brightness = sum(image.convert("L").getdata()) / (255 * image.width * image.height)
            out = json.dumps(reply(brightness, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    return server, seen


def yes_no_reply(brightness, body):
    p_yes = min(max(brightness, 0.01), 0.99)
    top = [{"token": " Yes", "logprob": math.log(p_yes * 0.9)}, {"token": "yes", "logprob": math.log(p_yes * 0.1)},
           {"token": "No", "logprob": math.log(1 - p_yes)}, {"token": "Maybe", "logprob": -5.0}]
    return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}]}


def test_yes_no_probability_from_top_logprobs_and_request_format(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret")
    server, seen = stub_server(yes_no_reply)
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.5, 0.8)])
    with running(server) as url:
        base = url.rsplit("/", 1)[0] + "/v1"
        rs = RewardSet("vlm_judge", {"vlm_judge": {"base_url": base, "model": "stub-vl", "api_key_env": "MY_KEY",
                                                   "question": "Is this {prompt} ({style})? yes or no"}})
        total, _ = rs(images, ["a cat", "a dog", "a car"], [{"style": s} for s in ("photo", "sketch", "oil")])
    torch.testing.assert_close(total, torch.tensor([0.2, 0.5, 0.8]), atol=4 / 255, rtol=0)
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-secret"
    assert body["model"] == "stub-vl" and body["max_tokens"] == 1 and body["logprobs"] is True
    texts = sorted(b["messages"][0]["content"][0]["text"] for _, _, b in seen)
    assert texts == ["Is this a car (oil)? yes or no", "Is this a cat (photo)? yes or no",
                     "Is this a dog (sketch)? yes or no"]
    assert "sk-secret" not in repr(rs.components[0][1])


def test_score_mode_parses_the_first_number():
    server, _ = stub_server(lambda b, body: {"choices": [{"message": {"content": f"Score: {round(10 * b)} / 10"}}]})
    with running(server) as url:
        rs = RewardSet("vlm_judge", {"vlm_judge": {"base_url": url.rsplit("/", 1)[0], "model": "m", "mode": "score"}})
        total, _ = rs(torch.stack([torch.full((3, 4, 4), v) for v in (0.3, 0.7)]), ["a", "b"])
    assert total.tolist() == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize("mode, reply, match", [
    ("yes_no", {"choices": [{"message": {"content": "Yes"}}]}, "sample 0: the reply has no top log-probs"),
    ("yes_no", {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "Hmm", "logprob": -0.1}]}]}}]},
     "sample 0: neither yes nor no"),
    ("score", {"choices": [{"message": {"content": "I cannot rate this."}}]}, "sample 0: no number in the reply"),
])
def test_unusable_replies_name_the_reward_and_sample(mode, reply, match):
    server, _ = stub_server(lambda b, body: reply)
    with running(server) as url:
        rs = RewardSet("vlm_judge", {"vlm_judge": {"base_url": url.rsplit("/", 1)[0], "model": "m", "mode": mode}})
        with pytest.raises(RewardError, match=match) as info:
            rs(torch.rand(1, 3, 4, 4), ["a"])
    assert "vlm_judge" in str(info.value)
