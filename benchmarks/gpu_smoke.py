"""GPU smoke test: a few training epochs of a realistic-size model, recording time per epoch and peak memory.

    python benchmarks/gpu_smoke.py                          # SD3.5-Medium-sized transformer, random weights
    python benchmarks/gpu_smoke.py --model /path/to/sd3.5m  # cached weights (a local diffusers directory / hub id)
    python benchmarks/gpu_smoke.py --drop-t5 --cache-prompt-embeds --gradient-checkpointing --optimizer adamw8bit

Without ``--model`` nothing is downloaded: the transformer is ``SD3Transformer2DModel`` built from the
configuration of stabilityai/stable-diffusion-3.5-medium (24 MMDiT blocks, 24 heads of 64, dual attention in
blocks 0-12, RMS QK-norm, joint attention dim 4096, pooled dim 2048; about 2.5 B parameters) with random
weights, the VAE has SD3's configuration (16 latent channels), and the text encoders are replaced by random
embeddings of SD3's shapes (``prompt_embeds [B, 77 + 256, 4096]``: CLIP-L/G then T5 tokens, ``pooled [B, 2048]``),
one fixed draw per prompt string. The run is the real trainer (``genalign.trainer.Trainer``: rollouts, rewards,
LoRA training steps) with the ``jpeg_compressibility`` reward; its per-epoch times come from ``metrics.jsonl``
(``time/sample_s``, ``time/train_s``) and the peak memory from ``torch.cuda.max_memory_allocated``.

Writes ``benchmarks/results/gpu_smoke.json`` (``--out``). Without CUDA it exits with status 2 and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RANDOM_ID = "random:sd3.5-medium"

# diffusers SD3Transformer2DModel config of stabilityai/stable-diffusion-3.5-medium (transformer/config.json)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# AutoencoderKL config of SD3 / SD3.5 (vae/config.json)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_TOKENS, T5_TOKENS, POOLED_DIM = 77, 256, 2048
PROMPTS = ["a photo of a cat on a sofa", "a red sports car in the rain", "a bowl of fruit on a wooden table",
           "an astronaut riding a horse", "a lighthouse at sunset", "a cup of coffee next to a laptop",
           "a snowy mountain village", "a watercolor painting of a fox"]


def random_sd35m_pipeline(device, dtype, seed: int = 0):
    """StableDiffusion3Pipeline with an SD3.5-Medium-sized random transformer and SD3's VAE, no text encoders;
    modules are created directly on ``device`` (no 10 GB float32 detour through the CPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).to(dtype)
        vae = AutoencoderKL(**SD3_VAE).to(dtype)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def register_random_adapter() -> None:
    """Register the adapter that loads :data:`RANDOM_ID` (SD3Policy with random prompt embeddings)."""
    import torch

    from genalign.pipelines.sd3 import SD3Policy
    from genalign.plugins import register_pipeline

    @register_pipeline("random-sd35-medium")
    class RandomSD35Medium(SD3Policy):
        pipeline_classes = ()

        @classmethod
        def handles(cls, model_id) -> bool:
            return str(model_id) == RANDOM_ID

        @classmethod
        def from_pretrained(cls, model_id, device=None, dtype=None, guidance_scale=None, height=None, width=None,
                            drop_t5=False, **options):
            from genalign.policy import resolve_device

            device = resolve_device(device)
            pipe = random_sd35m_pipeline(device, dtype or torch.float32)
            return cls(pipe, guidance_scale=guidance_scale, device=device, height=height, width=width, **options)

        def _encode(self, prompts: List[str], negative: bool = True):
            """Random embeddings of SD3's shapes, one fixed draw per prompt string (the empty negative too)."""
            def draw(texts):
                pe, pooled = [], []
                for text in texts:
                    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
                    pe.append(torch.randn(CLIP_TOKENS + T5_TOKENS, SD35_MEDIUM_TRANSFORMER["joint_attention_dim"],
                                          generator=g))
                    pooled.append(torch.randn(POOLED_DIM, generator=g))
                return (torch.stack(pe).to(self.device, self.dtype), torch.stack(pooled).to(self.device, self.dtype))

            out = dict(zip(("prompt_embeds", "pooled_prompt_embeds"), draw(prompts)))
            if self.uses_cfg and negative:
                out.update(zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"), draw([""] * len(prompts))))
            return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="cached weights (hub id or local directory); default: random SD3.5-M")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=10, help="sampling steps per rollout")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="prompt groups per epoch")
    p.add_argument("--batch-size", type=int, default=4, help="rollout and training micro-batch")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--drop-t5", action="store_true")
    p.add_argument("--offload-text-encoders", action="store_true")
    p.add_argument("--cache-prompt-embeds", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_smoke.json"))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run, "
              f"{args.out} not written", file=sys.stderr)
        return 2
    import diffusers

    from genalign.config import load_config
    from genalign.trainer import Trainer

    if args.model is None:
        register_random_adapter()
    model = args.model or RANDOM_ID
    work = tempfile.mkdtemp(prefix="gpu_smoke_")
    prompts_file = os.path.join(work, "prompts.txt")
    with open(prompts_file, "w") as fh:
        fh.write("\n".join(PROMPTS) + "\n")
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, "no")
    overrides = {
        "model.id": model, "model.dtype": args.dtype, "model.height": args.resolution, "model.width": args.resolution,
        "model.drop_t5": args.drop_t5, "model.offload_text_encoders": args.offload_text_encoders,
        "model.cache_prompt_embeds": args.cache_prompt_embeds, "mixed_precision": mixed,
        "output_dir": os.path.join(work, "run"), "num_epochs": args.epochs, "seed": 0,
        "prompts_file": prompts_file, "eval_prompts_file": "null", "reward": "jpeg_compressibility",
        "sampling.num_steps": args.steps, "sampling.groups_per_epoch": args.groups,
        "sampling.group_size": args.group_size, "sampling.batch_size": args.batch_size,
        "train.batch_size": args.batch_size, "train.num_minibatches": 1, "train.optimizer": args.optimizer,
        "train.gradient_checkpointing": args.gradient_checkpointing, "train.ema": False,
        "lora.rank": args.lora_rank, "lora.alpha": 2 * args.lora_rank, "log_with": "[]",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = Trainer(cfg)
    load_s = time.time() - t0
    memory_after_load = torch.cuda.memory_allocated()
    trainer.train()
    torch.cuda.synchronize()
    total_s = time.time() - t0
    epochs = []
    with open(trainer.metrics_path) as fh:
        for line in fh:
            row = json.loads(line)
            if "time/sample_s" in row:
                epochs.append({"epoch": row.get("epoch"), "sample_s": row["time/sample_s"],
                               "train_s": row["time/train_s"], "epoch_s": row["time/sample_s"] + row["time/train_s"],
                               "reward_mean": row.get("reward/mean")})
    denoiser = trainer.policy.denoiser()
    result = {
        "command": "python benchmarks/gpu_smoke.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "diffusers": diffusers.__version__, "python": platform.python_version()},
        "model": model if args.model else {"id": RANDOM_ID, "transformer_config": SD35_MEDIUM_TRANSFORMER,
                                           "weights": "random (no download)"},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "denoiser_params": sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" not in n),
        "trainable_params": sum(p.numel() for p in trainer.params),
        "samples_per_epoch": cfg.samples_per_epoch,
        "load_s": load_s, "total_s": total_s,
        "epochs": epochs,
        "mean_epoch_s_after_first": (sum(e["epoch_s"] for e in epochs[1:]) / (len(epochs) - 1)) if len(epochs) > 1
        else None,
        "memory_after_load_bytes": memory_after_load,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: result[k] for k in ("epochs", "peak_allocated_bytes", "total_s")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
