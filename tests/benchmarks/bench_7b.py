"""DPO at 7B scale on one GPU: a LLaVA-Med v1.5-shaped model (Mistral-7B + CLIP ViT-L/14-336 + mlp2x_gelu, random
weights: throughput does not depend on weight values), LoRA r=128 on every LM linear layer, dpo.py's step (FSDP2
with bf16 compute, activation checkpointing, fused AdamW, SDPA/flash attention, optional torch.compile per
decoder layer) against TRL 1.13's DPOTrainer loss on LlavaForConditionalGeneration + peft with the same shapes,
batch and sequences, in one process. Reports tokens/s, peak memory and MFU (model FLOPs / step time / the card's
dense bf16 peak).

    python tests/benchmarks/bench_7b.py                          # on an H100/H200; writes runs/bench/7b.json
    python tests/benchmarks/bench_7b.py --compile --pairs 4 --length 1024 --answer 256
    python tests/benchmarks/bench_7b.py --shape small --steps 2  # the same code path on CPU (no MFU)

Model FLOPs counted per step, on TRL's layout of 2N rows for both sides (the work the step must do; prefix sharing
does less of it, so our MFU with sharing on counts the prompt it did not recompute as done; recomputation by
activation checkpointing is not counted: MFU, not HFU):
  LM body (non-embedding weights N): policy forward 2N + backward input-gradients 2N per token (frozen base: no
  weight gradients) + LoRA forward/backward 6 N_lora per token + reference forward 2N per token;
  attention: causal 2 L d T^2 per sequence forward, x3 for policy forward+backward, x1 for the reference;
  lm_head: 2 d V per *supervised* token (forward) -- the log-probs need nothing else -- x2 for the policy's
  backward, x1 for the reference; ViT + projector: forward once per distinct image (frozen).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import _common as C
import torch
import transformers
from bench_scaling import SyntheticPairs
from transformers import CLIPVisionConfig

import dpo
import llava_med as lm

warnings.filterwarnings("ignore", category=FutureWarning)
PEAK_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12, "L40S": 362e12}  # dense bf16 tensor-core peaks from NVIDIA's datasheets


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def shapes(kind: str, vocab: int) -> lm.LlavaMedConfig:
    if kind == "7b":  # microsoft/llava-med-v1.5-mistral-7b: Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336
        text = transformers.MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        return lm.LlavaMedConfig(text_config=text, vision_config=vision, image_token_id=31999, max_length=4096)
    text = transformers.MistralConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, sliding_window=None)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14, hidden_act="quick_gelu")
    return lm.LlavaMedConfig(text_config=text, vision_config=vision, image_token_id=4, max_length=4096)


def model_flops(cfg: lm.LlavaMedConfig, n_lora: int, batch: dict, n_images: int) -> float:
    t, v = cfg.text_config, cfg.vision_config
    d, L, V = t.hidden_size, t.num_hidden_layers, t.vocab_size
    kv = t.num_key_value_heads * (d // t.num_attention_heads)
    body = L * (2 * d * d + 2 * d * kv + 3 * d * t.intermediate_size)  # q,o + k,v + gate,up,down
    lengths = batch["attention_mask"].sum(1).double()
    tokens = lengths.sum().item()
    supervised = (batch["labels"] != lm.IGNORE_INDEX).sum().item()
    attn = (2 * L * d * lengths ** 2).sum().item()
    lm_f = (4 * body + 6 * n_lora) * tokens + 3 * attn + 2 * d * V * supervised * 2  # policy fwd + bwd
    lm_f += 2 * body * tokens + attn + 2 * d * V * supervised  # reference forward
    dv, Lv = v.hidden_size, v.num_hidden_layers
    n_patch = (v.image_size // v.patch_size) ** 2 + 1
    vit = L and (Lv * (2 * (4 * dv * dv + 2 * dv * v.intermediate_size) * n_patch + 4 * dv * n_patch ** 2)
                 + 2 * 3 * v.patch_size ** 2 * dv * n_patch + 2 * (dv * d + d * d) * (n_patch - 1))
    return lm_f + vit * n_images


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="7b", choices=["7b", "small"])  # small: the same path on CPU
    p.add_argument("--pairs", type=int, default=4)  # pairs per step (one micro-batch on one GPU)
    p.add_argument("--length", type=int, default=1024)  # tokens per sequence, 576 image tokens included
    p.add_argument("--answer", type=int, default=256)  # answer tokens per sequence
    p.add_argument("--steps", type=int, default=6)  # timed rounds per contender
    p.add_argument("--lora-r", type=int, default=128)  # MMed-RAG / MMedPO / STLLaVA-Med
    p.add_argument("--compile", action="store_true")  # torch.compile each decoder layer (ours)
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--attn", default="sdpa")  # transformers attention implementation, both sides
    p.add_argument("--no-trl", action="store_true")  # ours only
    p.add_argument("--no-prefix-sharing", action="store_true")  # ours on TRL's 2N rows (dpo.py --no-prefix-sharing)
    a = p.parse_args()
    rank, world, device = dpo.setup_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, tok = lm.load("tiny")  # only its vocabulary size, for the small shape
    cfg = shapes(a.shape, len(tok))
    n_img_tok = cfg.num_image_tokens
    data = SyntheticPairs(a.pairs, a.length, 1, cfg, cfg.text_config.vocab_size - 1, answer=a.answer)
    idx = list(range(a.pairs))
    batch = dpo.collate_pairs(data, idx, 0, share_prefix=False)  # TRL's 2N rows: its inputs, and the FLOPs counted
    ac = not a.no_activation_checkpointing
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # random init directly on the GPU, in bf16
        model = lm.LlavaMed(cfg, a.attn)
    torch.set_default_dtype(prev)
    model.freeze_vision()
    args = dpo.Args(lora_r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, batch_size=a.pairs * world,
                    micro_batch_size=a.pairs, prefix_sharing=not a.no_prefix_sharing)
    model, ref = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                         args.lora_dropout, args.tune_projector)
    n_lora = sum(q.numel() for n, q in model.named_parameters() if "lora_" in n)
    dpo.shard(model, device, ac, a.compile)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)
    tok_stub = SimpleNamespace(pad_token_id=0)

    def ours():
        dpo.dpo_step(args, model, ref, data, idx, tok_stub, device)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    contenders = {"ours": ours}
    if not a.no_trl:
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model
        from trl import DPOTrainer

        text = cfg.text_config.to_dict()
        hf_cfg = transformers.LlavaConfig(vision_config=cfg.vision_config.to_dict(), text_config=text,
                                          image_token_index=cfg.image_token_id, projector_hidden_act="gelu",
                                          vision_feature_layer=-2, image_seq_length=n_img_tok)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            hf = transformers.LlavaForConditionalGeneration._from_config(hf_cfg, attn_implementation=a.attn)
        torch.set_default_dtype(prev)
        if ac:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        policy = get_peft_model(hf, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                                               target_modules=targets, bias="none"))
        policy.train()
        stub = SimpleNamespace(
            model=policy, ref_model=None, accelerator=Accelerator(cpu=device.type != "cuda"),
            precompute_ref_logps=False, beta=0.1, loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
            aux_loss_enabled=False, router_aux_loss_coef=0.0, _tp_size=1, _total_train_tokens=0,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            args=SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": False}, discopop_tau=0.05))
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                  "completion_mask": (batch["labels"] != lm.IGNORE_INDEX).long().to(device),
                  "pixel_values": batch["pixel_values"][batch["row_images"]].to(device, dtype)}
        topt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-5,
                                 fused=True)

        def trl():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
            loss.backward()
            topt.step()
            topt.zero_grad(set_to_none=True)

        contenders["trl"] = trl

    peak_mem = {}
    for k, fn in contenders.items():  # warm-up (compilation, allocator) and the peak memory of each side alone
        fn()
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            C.reset_peak_rss()
        fn()
        peak_mem[k] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else C.peak_rss_mb() / 1024
    times = C.interleaved(contenders, a.steps, warmup=0, sync=sync)
    flops = model_flops(cfg, n_lora, batch, a.pairs)
    tokens = batch["attention_mask"].sum().item()
    peak = peak_flops(device)
    res = {}
    for k, v in times.items():
        t = C.median(v)
        res[k] = {"step_s": t, "tokens_per_s": tokens / t, "pairs_per_s": a.pairs / t,
                  "model_tflops_per_s": flops / t / 1e12, "mfu": flops / t / peak if peak else None,
                  "peak_memory_gib_both_models_resident": peak_mem[k]}
    if rank == 0:
        C.write_result("7b" if a.shape == "7b" else "7b_shape_small", {
            "shape": a.shape, "pairs": a.pairs, "rows": 2 * a.pairs, "length": a.length, "answer": a.answer,
            "tokens_per_step": tokens, "lora_r": a.lora_r, "lora_params": n_lora, "compile": a.compile,
            "activation_checkpointing": ac, "attn": a.attn, "prefix_sharing": not a.no_prefix_sharing, "dtype": str(dtype), "model_flops_per_step": flops,
            "peak_bf16_flops": peak, "results": res, "target_mfu": 0.4,
            "speedup_vs_trl": res["trl"]["step_s"] / res["ours"]["step_s"] if "trl" in res else None})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
