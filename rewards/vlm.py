"""A vision-language model as the judge, over an OpenAI-compatible chat-completions API (vLLM, SGLang, TGI,
llama.cpp server, hosted APIs).

For every image one ``POST <base_url>/chat/completions`` is sent with the question (``question``, formatted with
``{prompt}`` and any metadata field of the sample) and the image as a PNG data URL, temperature 0. Two ways to read
the answer (``mode``):

* ``yes_no`` (default): ``max_tokens: 1`` with ``logprobs`` / ``top_logprobs``; the score is
  ``P(yes) / (P(yes) + P(no))`` from the first generated token's top log-probs (tokens compared after stripping
  spaces and lower-casing; several spellings of yes / no add up). A reply without log-probs, or whose top tokens
  hold neither yes nor no, is an error naming the sample.
* ``score``: the first number in the reply text divided by ``max_score`` (e.g. "Rate 0-10" -> [0, 1]); a reply
  without a number is an error naming the sample.

The API key is read from the environment variable ``api_key_env`` (``OPENAI_API_KEY`` by default; none is sent
when it is unset) and never printed. Transport, retries and timeouts are those of
:class:`genalign.rewards.remote.RemoteReward`; ``concurrency`` requests run at once.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

from genalign.reward_api import RewardError

from .remote import RemoteReward, encode_images

DEFAULT_QUESTION = "Does this image show {prompt}? Answer yes or no."
YES, NO = ("yes",), ("no",)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class VLMJudgeReward(RemoteReward):
    """VLM-as-judge reward (see the module docstring).

    base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``. model: the served model name. question: the text
    sent with each image. mode: ``yes_no`` or ``score`` (with ``max_score``). concurrency: requests in flight.
    """

    def __init__(self, base_url: str, model: str, question: str = DEFAULT_QUESTION, mode: str = "yes_no",
                 max_score: float = 10.0, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, batch_size: Optional[int] = 16, backoff: float = 0.5,
                 name: str = "vlm_judge", use_env_proxy: bool = False):
        if mode not in ("yes_no", "score"):
            raise ValueError(f"vlm_judge option mode must be 'yes_no' or 'score', got {mode!r}")
        if max_score <= 0 or concurrency < 1:
            raise ValueError(f"vlm_judge needs max_score > 0 and concurrency >= 1, got {max_score}, {concurrency}")
        key = os.environ.get(api_key_env) if api_key_env else None
        super().__init__(base_url.rstrip("/") + "/chat/completions", timeout=timeout, retries=retries,
                         batch_size=batch_size, headers={"Authorization": f"Bearer {key}"} if key else None,
                         backoff=backoff, name=name, use_env_proxy=use_env_proxy)
        self.model, self.question, self.mode = model, question, mode
        self.max_score, self.concurrency = float(max_score), int(concurrency)

    def __repr__(self) -> str:  # the key lives in the headers: never shown
        return f"VLMJudgeReward({self.url!r}, model={self.model!r}, mode={self.mode!r})"

    def request(self, image_b64: str, prompt: str, metadata: dict) -> dict:
        """The chat-completions body for one image."""
        try:
            text = self.question.format(prompt=prompt, **{k: v for k, v in metadata.items() if k != "prompt"})
        except (KeyError, IndexError) as exc:
            raise RewardError(f"vlm_judge question {self.question!r} names {exc} which the sample's prompt and "
                              f"metadata do not have", self.name) from None
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}}]}]}
        if self.mode == "yes_no":
            body.update(max_tokens=1, logprobs=True, top_logprobs=10)
        else:
            body.update(max_tokens=32)
        return body

    def parse(self, answer: dict, index: int) -> float:
        """One reply -> a score (see the module docstring); ``RewardError`` naming sample ``index`` otherwise."""
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RewardError(f"vlm_judge at {self.url}: sample {index}: the reply has no choices", self.name,
                              [index]) from None
        if self.mode == "score":
            text = str((choice.get("message") or {}).get("content") or "")
            found = NUMBER.search(text)
            if found is None:
                raise RewardError(f"vlm_judge at {self.url}: sample {index}: no number in the reply {text[:200]!r}",
                                  self.name, [index])
            return float(found.group()) / self.max_score
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RewardError(f"vlm_judge at {self.url}: sample {index}: the reply has no top log-probs (does the "
                              f"server support logprobs / top_logprobs?)", self.name, [index]) from None
        probs: Dict[str, float] = {"yes": 0.0, "no": 0.0}
        for entry in top:
            token = str(entry.get("token", "")).strip().lower()
            for label, words in (("yes", YES), ("no", NO)):
                if token in words:
                    probs[label] += math.exp(float(entry["logprob"]))
        if probs["yes"] + probs["no"] == 0:
            raise RewardError(f"vlm_judge at {self.url}: sample {index}: neither yes nor no among the top tokens "
                              f"{[e.get('token') for e in top][:10]}", self.name, [index])
        return probs["yes"] / (probs["yes"] + probs["no"])

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None):
        import json

        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        bodies = [self.request(img, p, m) for img, p, m in zip(encode_images(images), prompts, metadata)]

        def one(i: int) -> float:
            return self.parse(self._post(json.dumps(bodies[i]).encode("utf-8")), i)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return torch.tensor(list(pool.map(one, range(len(bodies)))), dtype=torch.float32)


__all__ = ["VLMJudgeReward", "DEFAULT_QUESTION"]
