import copy

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from genalign.pipelines.llm import CausalLMPolicy, GRPOStepConfig, grpo_step  # noqa: E402

WORDS = "the a cat dog sat ran on mat fast slow big small red blue one two three".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def policy():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CausalLMPolicy(GPT2LMHeadModel(cfg), tok, device="cpu")


PROMPTS = ["the cat sat on the mat", "a dog ran"]  # different lengths -> left padding


def test_generate_shapes_masks_and_seed(policy):
    b1 = policy.generate(PROMPTS, max_new_tokens=6, num_return_sequences=3, seed=1)
    b2 = policy.generate(PROMPTS, max_new_tokens=6, num_return_sequences=3, seed=1)
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    B, T = b1["response_mask"].shape
    assert B == 6 and T <= 6 and b1["input_ids"].shape == b1["attention_mask"].shape
    assert b1["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    resp = b1["input_ids"][:, -T:]
    for row, m in zip(resp, b1["response_mask"]):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix
        assert (row[n:] == policy.tokenizer.pad_token_id).all()
        if n < T:
            assert row[n - 1] == policy.tokenizer.eos_token_id
    assert len(policy.decode(b1)) == 6


def test_token_logprobs_padding_invariant_and_match_manual(policy):
    batch = policy.generate(PROMPTS, max_new_tokens=5, seed=3)
    logp, ent = policy.token_logprobs(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    T = batch["response_mask"].shape[1]
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep].unsqueeze(0)  # no padding at all
        n = int(batch["response_mask"][b].sum())
        logits = policy.model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        L = ids.shape[1]
        manual = torch.stack([lp[L - n - 1 + t, ids[0, L - n + t]] for t in range(n)])
        torch.testing.assert_close(logp[b, :n], manual, atol=1e-5, rtol=1e-5)
        assert (logp[b, n:] == 0).all() and (ent[b, :n] > 0).all()
    assert logp.shape == ent.shape == (2, T)


def _fresh(policy):
    return CausalLMPolicy(copy.deepcopy(policy.model), policy.tokenizer, device="cpu")


def test_grpo_step_updates_parameters(policy):
    pol = _fresh(policy)
    batch = policy.generate(PROMPTS, max_new_tokens=6, num_return_sequences=4, seed=0)
    rewards = batch["response_mask"].sum(1).float()  # prefer longer answers
    rewards[0] += 1.0  # make sure no group is constant
    rewards[4] += 1.0
    before = [p.detach().clone() for p in pol.model.parameters()]
    opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-2)
    stats = grpo_step(pol, opt, batch, rewards, batch["group_ids"], {"eps_high": 0.28})
    assert abs(stats["ratio_mean"] - 1.0) < 1e-5 and stats["clip_frac"] == 0.0  # on-policy first step
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    changed = [not torch.equal(a, b) for a, b in zip(before, pol.model.parameters())]
    assert sum(changed) > len(changed) // 2


def test_grpo_step_accumulation_and_hapo(policy):
    batch = policy.generate(PROMPTS, max_new_tokens=6, num_return_sequences=4, seed=5)
    rewards = torch.arange(8.0) % 3
    batch = dict(batch, ref_logp=torch.zeros_like(batch["response_mask"], dtype=torch.float32) - 3.0)
    base = dict(kl_kind="k3", kl_coef=0.05, max_grad_norm=1e9)
    results = []
    for mb in (None, 3):
        pol = _fresh(policy)
        opt = torch.optim.SGD(pol.model.parameters(), lr=0.1)
        s = grpo_step(pol, opt, batch, rewards, batch["group_ids"], GRPOStepConfig(micro_batch_size=mb, **base))
        results.append((s, [p.detach() for p in pol.model.parameters()]))
    (s_full, p_full), (s_acc, p_acc) = results
    assert abs(s_full["loss"] - s_acc["loss"]) < 1e-5
    for a, b in zip(p_full, p_acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    pol = _fresh(policy)
    opt = torch.optim.SGD(pol.model.parameters(), lr=0.1)
    s = grpo_step(pol, opt, batch, rewards, batch["group_ids"], dict(surrogate="hapo", advantage="hapo", eps_high=0.28))
    assert torch.isfinite(torch.tensor(s["loss"]))
    with pytest.raises(ValueError, match="unknown grpo_step config"):
        grpo_step(pol, opt, batch, rewards, batch["group_ids"], {"lr": 1.0})
