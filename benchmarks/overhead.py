"""Overhead of genalign over plain diffusers / plain PyTorch, and the activation memory gradient checkpointing saves.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--device cpu|cuda] [--repeats 9]

Writes ``benchmarks/results/overhead.json``:

* ``rollout_overhead_ratio``: :func:`genalign.rollout.rollout` (SD3Policy, SDE step with log-probs, CFG on)
  over ``StableDiffusion3Pipeline.__call__`` (Euler ODE, CFG on, ``output_type="latent"``, prompt
  embeddings passed), same transformer, steps, batch and initial latents. Target <= 1.05.
* ``train_step_overhead_ratio``: one genalign training step (the policy-gradient objective's backwards: recompute the k stored
  transitions with ``Policy.predict`` (CFG), PPO-clip loss, per-step backward, ratio diagnostics) over a bare
  loop of transformer forward (the same 2B CFG batch) + ``square().mean()`` + backward on the same k
  inputs. Target <= 1.10.
* ``checkpointing_activation_memory_saving``: ``1 - peak(ckpt) / peak(no ckpt)`` of one forward + backward
  of the transformer at the training batch (see ``_common.peak_memory`` for the method). Target >= 0.40.

Timings are interleaved (A B, B A, ...) with several repeats; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402


def build(device, latent_size=32, guidance=4.5):
    from genalign.pipelines.sd3 import SD3Policy

    pipe = C.tiny_sd3_pipeline(latent_size)
    pipe.set_progress_bar_config(disable=True)
    px = latent_size * C.VAE_FACTOR
    policy = SD3Policy(pipe, guidance_scale=guidance, device=device, height=px, width=px)
    return pipe, policy


def rollout_fns(pipe, policy, batch, steps, noise_level=0.7, seed=0):
    """(genalign rollout, plain pipeline call) closures on the same inputs."""
    from genalign.rollout import rollout

    device = policy.device
    emb = C.random_embeds(batch, device, seed)
    cond = policy.cond_from_embeds(**emb)
    prompts = ["p"] * batch
    latents = policy.initial_latents(batch, torch.Generator(device).manual_seed(seed))
    gen = torch.Generator(device)
    px = policy.height

    def genalign():
        gen.manual_seed(seed)
        return rollout(policy, cond, prompts, steps, noise_level, "sde", generator=gen, latents=latents)

    def plain():
        with torch.no_grad():
            return pipe(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                        negative_prompt_embeds=emb["negative_prompt_embeds"],
                        negative_pooled_prompt_embeds=emb["negative_pooled_prompt_embeds"],
                        num_inference_steps=steps, guidance_scale=policy.guidance_scale, height=px, width=px,
                        latents=latents.clone(), output_type="latent", return_dict=False)[0]

    return genalign, plain


def trainer_stub(policy, batch, steps, k, lora_rank=0):
    """The policy-gradient objective on a :class:`genalign.objectives.TrainContext` (no Trainer: no reward, prompts
    or run directory) with the one optimizer step; the denoiser trains in full (or LoRA with rank > 0)."""
    from accelerate import Accelerator

    from genalign.config import load_config
    from genalign.objectives import PolicyGradient, TrainContext
    from genalign.optim import OptimizerStep

    cfg = load_config(None, [f"sampling.num_steps={steps}", f"train.batch_size={batch}", "train.kl_beta=0",
                             f"lora.enabled={'true' if lora_rank else 'false'}", f"lora.rank={max(lora_rank, 1)}",
                             f"lora.alpha={max(lora_rank, 1)}", "train.clip_range=1e-2",
                             f"sampling.group_size={batch}", f"sampling.batch_size={batch}"])
    denoiser = policy.denoiser()
    if lora_rank:
        from genalign.lora import add_lora

        for m in (policy.pipe.vae, denoiser):
            m.requires_grad_(False)
        add_lora(denoiser, lora_rank, float(lora_rank), policy.lora_target_modules)
    else:
        denoiser.requires_grad_(True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    acc = Accelerator(cpu=policy.device.type != "cuda")
    optim = OptimizerStep(acc, denoiser, torch.optim.AdamW(params), params, distributed=False)
    return PolicyGradient(TrainContext(cfg, policy, acc, optim))


def train_fns(tr, batch, steps, k, seed=0):
    """(genalign policy-gradient backwards of one optimizer step, bare forward+backward) closures on the same trajectory and k steps."""
    from genalign.rollout import rollout

    policy, device = tr.ctx.policy, tr.ctx.device
    cond = policy.cond_from_embeds(**C.random_embeds(batch, device, seed))
    traj = rollout(policy, cond, ["p"] * batch, steps, 0.7, "sde", generator=torch.Generator(device).manual_seed(seed))
    step_idx = torch.arange(k).expand(batch, k)
    ids = torch.arange(batch)
    adv = torch.linspace(-1, 1, batch, device=device)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    model = policy.denoiser()
    params = tr.ctx.optim.params
    # the bare loop's inputs, prepared once: the same CFG batch [negative; positive] Policy.predict builds
    emb = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]])
    pooled = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]])
    xs = [torch.cat([traj.latents[:, j]] * 2) for j in range(k)]
    ts = [torch.cat([traj.timesteps[:, j]] * 2) for j in range(k)]

    units = tr.units_for(traj, adv, valid, step_idx)

    def genalign():
        model.train()
        for p in params:
            p.grad = None
        fns = tr.backwards(units, ids)
        return [fn(i == len(fns) - 1) for i, fn in enumerate(fns)]

    def bare():
        model.train()
        for p in params:
            p.grad = None
        for j in range(k):
            out = model(hidden_states=xs[j], timestep=ts[j], encoder_hidden_states=emb, pooled_projections=pooled,
                        return_dict=False)[0]
            out.float().square().mean().backward()

    return genalign, bare, traj


def checkpointing_memory(device, batch, latent_size=32):
    """Peak extra memory (and autograd-saved bytes) of one transformer forward + backward on the 2B CFG batch,
    without and with gradient checkpointing. Gradients are allocated beforehand (not counted)."""
    pipe = C.tiny_sd3_pipeline(latent_size).to(device)
    model = pipe.transformer.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    n = 2 * batch
    x = torch.randn(n, C.MODEL["in_channels"], latent_size, latent_size, generator=g).to(device)
    t = torch.full((n,), 500.0, device=device)
    emb = torch.randn(n, C.TEXT_LEN, C.MODEL["joint_attention_dim"], generator=g).to(device)
    pooled = torch.randn(n, C.MODEL["pooled_projection_dim"], generator=g).to(device)

    def forward():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled,
                     return_dict=False)[0].float().square().mean()

    def step():
        forward().backward()

    out = {}
    for name, ckpt in (("no_checkpointing", False), ("checkpointing", True)):
        if ckpt:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        step()  # allocate .grad (kept, zeroed in place) and warm up
        model.zero_grad(set_to_none=False)
        peaks = []
        for _ in range(2):
            peaks.append(C.peak_memory(step, device))
            model.zero_grad(set_to_none=False)
        saved = C.saved_tensor_bytes(forward)
        out[name] = {"peak_bytes": min(peaks), "saved_for_backward_bytes": saved}
    model.disable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    out["saving_peak"] = 1 - out["checkpointing"]["peak_bytes"] / out["no_checkpointing"]["peak_bytes"]
    out["saving_saved_tensors"] = 1 - (out["checkpointing"]["saved_for_backward_bytes"]
                                       / out["no_checkpointing"]["saved_for_backward_bytes"])
    out["settings"] = {"batch": batch, "cfg_batch": n, "latent_size": latent_size, "transformer_params": params,
                       "param_bytes": params * 4}
    return out


def summarize(times, clock):
    """Medians and paired ratios (first name over second) on both clocks; ``ratio`` on the headline clock."""
    out = {"clock": clock, "seconds": times}
    for c, t in times.items():
        a, b = list(t)
        out[f"median_{c}_s"] = {n: C.median(v) for n, v in t.items()}
        out[f"ratio_{c}"] = C.paired_ratio(t[a], t[b])
    out["ratio"] = out[f"ratio_{clock}"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4, help="group size / rollout and train batch (CFG doubles it)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps T")
    ap.add_argument("--train-steps", type=int, default=4, help="trained steps k of one training step")
    ap.add_argument("--latent-size", type=int, default=32)
    ap.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    ap.add_argument("--skip", nargs="*", default=[], choices=["rollout", "train", "memory"])
    ap.add_argument("--out", default="overhead.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    C.setup_threads(device.type)
    torch.manual_seed(0)
    clock = C.headline_clock(device)
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/overhead.py --device " + device.type,
              "machine": C.machine(device),
              "settings": {"model": dict(C.MODEL, sample_size=args.latent_size, text_tokens=C.TEXT_LEN),
                           "batch": args.batch, "cfg": True, "guidance_scale": 4.5, "sampling_steps": args.steps,
                           "trained_steps": args.train_steps, "latent_size": args.latent_size,
                           "repeats": args.repeats, "lora_rank": args.lora_rank,
                           "timing": "interleaved rounds (A B, B A, ...) after 1 warm-up; ratio = median of per-round ratios "
                                     f"on the {clock} clock (cpu: process CPU time, single thread; wall also "
                                     "recorded)"}}

    if "rollout" not in args.skip:
        pipe, policy = build(device, args.latent_size)
        ga, plain = rollout_fns(pipe, policy, args.batch, args.steps)
        result["rollout"] = summarize(C.interleaved({"genalign_rollout": ga, "diffusers_pipeline": plain}, device,
                                                    args.repeats, clock="both"), clock)
        result["rollout_overhead_ratio"] = result["rollout"]["ratio"]
        print("rollout:", {k: v for k, v in result["rollout"].items() if k != "seconds"}, flush=True)

    if "train" not in args.skip:
        pipe, policy = build(device, args.latent_size)
        tr = trainer_stub(policy, args.batch, args.steps, args.train_steps, args.lora_rank)
        ga, bare, _ = train_fns(tr, args.batch, args.steps, args.train_steps)
        result["train_step"] = summarize(C.interleaved({"genalign_accumulate": ga, "bare_forward_backward": bare},
                                                       device, args.repeats, clock="both"), clock)
        result["train_step_overhead_ratio"] = result["train_step"]["ratio"]
        print("train step:", {k: v for k, v in result["train_step"].items() if k != "seconds"}, flush=True)

    if "memory" not in args.skip:
        mem = checkpointing_memory(device, args.batch, args.latent_size)
        mem["method"] = ("peak extra bytes of one forward+backward (grads pre-allocated): "
                         + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                            "running sum of the torch profiler's CPU allocation records (profile_memory=True)")
                         + "; also the bytes autograd saves for backward (saved_tensors_hooks)")
        result["checkpointing_memory"] = mem
        result["checkpointing_activation_memory_saving"] = mem["saving_peak"]
        print(f"checkpointing: peak {mem['no_checkpointing']['peak_bytes'] / 2**20:.1f} -> "
              f"{mem['checkpointing']['peak_bytes'] / 2**20:.1f} MiB, saving {mem['saving_peak']:.3f} "
              f"(saved tensors {mem['saving_saved_tensors']:.3f})", flush=True)

    result["targets"] = {"rollout_overhead_ratio": "<= 1.05", "train_step_overhead_ratio": "<= 1.10",
                         "checkpointing_activation_memory_saving": ">= 0.40"}
    print("wrote", C.write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
