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


# ---------------------------------------------------------------------------------------------------
# GSPO default aggregation, zero-variance groups, DAPO dynamic sampling

from genalign.pipelines import llm  # noqa: E402


def test_aggregation_defaults_to_the_ratio_level(policy, monkeypatch):
    assert GRPOStepConfig().loss_aggregation == "token_mean"
    assert GRPOStepConfig(ratio_level="sequence").loss_aggregation == "seq_mean_token_mean"
    assert GRPOStepConfig(ratio_level="sequence_token").loss_aggregation == "seq_mean_token_mean"
    assert GRPOStepConfig(ratio_level="sequence", aggregation="token_mean").loss_aggregation == "token_mean"
    seen = []
    real = llm.losses.policy_loss
    monkeypatch.setattr(llm.losses, "policy_loss", lambda *a, **k: seen.append(k["aggregation"]) or real(*a, **k))
    batch = policy.generate(PROMPTS, max_new_tokens=4, num_return_sequences=2, seed=0)
    pol = _fresh(policy)
    grpo_step(pol, torch.optim.SGD(pol.model.parameters(), lr=0.0), batch, torch.arange(4.0), batch["group_ids"],
              {"ratio_level": "sequence"})
    assert seen == ["seq_mean_token_mean"]


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant"])
def test_filter_zero_std_groups_equals_dropping_those_groups(policy, aggregation):
    prompts = PROMPTS + ["one two three"]
    batch = policy.generate(prompts, max_new_tokens=5, num_return_sequences=3, seed=2)
    rewards = torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0, 1.0, 3.0, 0.0, 1.0])  # group 1 is flat
    keep = torch.tensor([0, 1, 2, 6, 7, 8])
    base = dict(aggregation=aggregation, max_grad_norm=1e9, eps_high=0.28)
    params = {}
    for name, b, r, filt in (("filtered", batch, rewards, True), ("dropped", _rows(batch, keep), rewards[keep], False),
                             ("unfiltered", batch, rewards, False)):
        pol = _fresh(policy)
        stats = grpo_step(pol, torch.optim.SGD(pol.model.parameters(), lr=0.5), b, r, b["group_ids"],
                          dict(base, filter_zero_std_groups=filt))
        params[name] = [p.detach() for p in pol.model.parameters()]
        if name == "filtered":
            assert abs(stats["zero_std_frac"] - 1 / 3) < 1e-6
    for a, b in zip(params["filtered"], params["dropped"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the flat group's tokens dilute the update when they stay in the denominators
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(params["filtered"], params["unfiltered"]))


def test_grpo_prepare_counts_and_constant_normalizer():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]).bool()
    rewards, gids = torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1])
    prep = llm.grpo_prepare(rewards, gids, mask, {"constant_normalizer": 16})
    assert prep.mask[:2].sum() == 0 and prep.mask[2:].all()
    assert prep.counts["num_tokens"] == 6 and prep.counts["num_seqs"] == 2 and prep.counts["normalizer"] == 16
    assert prep.zero_std.tolist() == [True, True, False, False]
    raw = llm.grpo_prepare(rewards, gids, mask, {"filter_zero_std_groups": False})
    assert raw.counts["num_tokens"] == 9 and raw.counts["num_seqs"] == 4 and raw.counts["normalizer"] == 3
    torch.testing.assert_close(raw.advantages, prep.advantages)


def test_grpo_prepare_positive_advantage_weight():
    mask = torch.ones(4, 2, dtype=torch.bool)
    rewards, gids = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0])
    prep = llm.grpo_prepare(rewards, gids, mask, {"advantage": "dr_grpo", "positive_advantage_weight": 0.1})
    torch.testing.assert_close(prep.advantages, torch.tensor([0.75 * 0.1, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="positive_advantage_weight"):
        llm.grpo_prepare(rewards, gids, mask, {"positive_advantage_weight": 2.0})


def _fake_round(r, n, k=2):
    """A generate-layout batch of round r: n groups of k rows, prompt width 2 + r, response width 3 + 2 r."""
    P, T, B = 2 + r, 3 + 2 * r, n * k
    ids = 1000 * (r + 1) + torch.arange(B * (P + T)).view(B, P + T)
    attn = torch.ones(B, P + T, dtype=torch.long)
    attn[::2, 0] = 0  # some left padding
    resp = torch.arange(T).expand(B, T) < (1 + torch.arange(B) % T).unsqueeze(1)
    attn[:, P:] = resp.long()
    ids = ids.masked_fill(attn == 0, 0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "group_ids": 7 + torch.arange(n).repeat_interleave(k), "old_logp": torch.randn(B, T) * resp,
            "tag": [f"r{r}b{i}" for i in range(B)]}


def test_dynamic_sample_refills_with_the_first_groups_with_variance():
    rewards_by_round = {0: [1.0, 1.0, 0.0, 1.0, 2.0, 2.0], 1: [0.0, 0.0, 1.0, 0.0, 0.0, 3.0], 2: [0.0, 1.0] * 3}
    rounds = {}

    def generate(r, n):
        rounds[r] = _fake_round(r, n)
        return rounds[r]

    out = llm.dynamic_sample(generate, lambda b: torch.tensor(rewards_by_round[int(b["tag"][0][1])]),
                             num_groups=3, group_size=2, max_rounds=4)
    # round 0 keeps group 1, round 1 groups 1 and 2; round 2 is never drawn
    assert sorted(rounds) == [0, 1]
    assert out.batch["tag"] == ["r0b2", "r0b3", "r1b2", "r1b3", "r1b4", "r1b5"]
    assert out.group_ids.tolist() == [0, 0, 1, 1, 2, 2] and torch.equal(out.batch["group_ids"], out.group_ids)
    torch.testing.assert_close(out.rewards, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 3.0]))
    assert out.stats == {"rounds": 2.0, "groups_sampled": 6.0, "groups_with_variance": 3.0, "groups_kept": 3.0,
                         "complete": 1.0}
    b = out.batch
    T = b["response_mask"].shape[1]
    assert b["input_ids"].shape == b["attention_mask"].shape and b["old_logp"].shape == b["response_mask"].shape
    assert T == int(b["response_mask"].sum(1).max())  # all-padding columns dropped
    for i, tag in enumerate(b["tag"]):
        r, row = int(tag[1]), int(tag[3:])
        src = rounds[r]
        n = int(src["response_mask"][row].sum())
        Ts = src["response_mask"].shape[1]
        assert b["response_mask"][i, :n].all() and not b["response_mask"][i, n:].any()
        assert torch.equal(b["input_ids"][i, -T:][:n], src["input_ids"][row, -Ts:][:n])
        torch.testing.assert_close(b["old_logp"][i, :n], src["old_logp"][row, :n])
        prompt, src_prompt = b["input_ids"][i, :-T], src["input_ids"][row, :-Ts]
        m, src_m = b["attention_mask"][i, :-T].bool(), src["attention_mask"][row, :-Ts].bool()
        assert torch.equal(prompt[m], src_prompt[src_m]) and m[-int(src_m.sum()):].all()


def test_dynamic_sample_reports_a_shortfall():
    flat = lambda b: torch.tensor([1.0, 1.0, 0.0, 2.0])  # one group with variance per round  # noqa: E731
    with pytest.raises(llm.DynamicSamplingError, match="found 2 of 3 groups with reward variance in 2 rounds") as err:
        llm.dynamic_sample(lambda r, n: _fake_round(r, n), flat, num_groups=3, group_size=2, max_rounds=2,
                           groups_per_round=2)
    assert err.value.partial.stats["complete"] == 0.0 and err.value.partial.group_ids.tolist() == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match="found 2 of 3"):
        out = llm.dynamic_sample(lambda r, n: _fake_round(r, n), flat, 3, 2, max_rounds=2, groups_per_round=2,
                                 allow_partial=True)
    assert out.batch["input_ids"].shape[0] == 4 and out.stats["groups_kept"] == 2.0
    with pytest.raises(ValueError, match="group_size"):
        llm.dynamic_sample(lambda r, n: _fake_round(r, n, k=3), flat, 3, 2, groups_per_round=2)


def test_dynamic_sample_with_generate_feeds_grpo_step(policy):
    prompts = PROMPTS + ["one two three", "big red dog"]

    def generate(r, n):
        start = (2 * r) % 4
        return policy.generate(prompts[start:start + n], max_new_tokens=4 + r, num_return_sequences=3, seed=r)

    # reward: response length, except that the first prompt of each round is scored flat
    def reward(batch):
        rew = batch["response_mask"].sum(1).float() + torch.arange(len(batch["group_ids"])) % 2
        return torch.where(batch["group_ids"] == 0, torch.zeros_like(rew), rew)

    out = llm.dynamic_sample(generate, reward, num_groups=2, group_size=3, max_rounds=3)
    assert out.stats["rounds"] == 2.0 and out.batch["input_ids"].shape[0] == 6
    pol = _fresh(policy)
    stats = grpo_step(pol, torch.optim.SGD(pol.model.parameters(), lr=0.1), out.batch, out.rewards, out.group_ids)
    assert stats["zero_std_frac"] == 0.0 and abs(stats["ratio_mean"] - 1) < 1e-5
    # the merged (re-padded) batch gives every row the log-probs it had in its own round
    lp, _ = policy.token_logprobs(out.batch["input_ids"], out.batch["attention_mask"], out.batch["response_mask"])
    first = generate(0, 2)
    lp0, _ = policy.token_logprobs(first["input_ids"], first["attention_mask"], first["response_mask"])
    n = int(first["response_mask"][3].sum())
    torch.testing.assert_close(lp[0, :n], lp0[3, :n], atol=1e-5, rtol=1e-5)
