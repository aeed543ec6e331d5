"""DPO step throughput: dpo.py's step against TRL's DPOTrainer loss on the same tiny LLaVA weights, the same
LoRA, the same pairs (toy data), batch and padded lengths, in one process; and the DPO/SFT cost ratio.

    python tests/benchmarks/bench_dpo.py                 # both contenders, interleaved; writes runs/bench/dpo.json
    python tests/benchmarks/bench_dpo.py --pairs 8 --repeats 20
    python tests/benchmarks/bench_dpo.py --length 512 --images 4   # synthetic pairs: longer, several images

What each side runs per optimizer step on N pairs (2N rows, one image each, chosen/rejected share the image):
  ours: dpo.dpo_step -- N images through the ViT once, projected features reused by the 2N policy rows and the 2N
        reference rows (adapters off, no graph); logits formed only at supervised positions.
  TRL:  DPOTrainer._compute_loss (trl 1.13) on LlavaForConditionalGeneration + peft LoRA -- the policy forward
        encodes the 2N rows' images, the reference forward (adapters disabled) encodes them again (4N ViT passes),
        full-vocabulary logits at every position.
Both then do loss.backward() and a fused AdamW step on the LoRA weights (dpo.py's and transformers' default). The losses are checked equal first.
DPO/SFT: our DPO step with precomputed reference log-probs against an SFT step (mean answer-token NLL) on the same
2N sequences, same code path for the forward; the floor is 1.0.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import warnings

import _common as C
import torch

import dpo
import llava_med as lm


warnings.filterwarnings("ignore", category=FutureWarning)


def build(pairs: int, lora_r: int, length: int = 0, images: int = 1, seed: int = 0):
    """Toy pairs (length 0), or synthetic pairs of `length` tokens with `images` images each (bench_scaling's)."""
    torch.manual_seed(seed)
    model, tok = lm.load("tiny")
    args = dpo.Args(data=str(C.ROOT / "data" / "toy"), lora_r=lora_r, lora_alpha=2 * lora_r, batch_size=pairs,
                    micro_batch_size=pairs)
    if length:
        from bench_scaling import SyntheticPairs
        data = SyntheticPairs(pairs, length, images, model.config, len(tok))
    else:
        data = dpo.PairData(*dpo.load_preferences(args, "train"), tok, model.config, args.max_length, False)
    return model, tok, data, args


def ours_side(model, tok, data, args, idx):
    model = copy.deepcopy(model)
    model, ref = dpo.build_models(args, model, torch.device("cpu"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as dpo.py

    def step(ref_table=None):
        out = dpo.dpo_step(args, model, ref, data, idx, tok, torch.device("cpu"), 1, ref_table)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"] / len(idx)

    def sft_step():
        batch = dpo.to_device(dpo.collate_pairs(data, idx, tok.pad_token_id), "cpu")
        feats, _ = dpo.image_features_for(model, None, batch["pixel_values"], "cpu")
        sums, counts = dpo.sequence_logps(model, batch, feats)
        loss = -sums.sum() / counts.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    with torch.no_grad():
        batch = dpo.collate_pairs(data, idx, tok.pad_token_id)
        _, rf = dpo.image_features_for(model, ref, batch["pixel_values"], "cpu")
        ref_logps, _ = dpo.reference_logps(model, ref, batch, rf)
    table = torch.zeros(max(idx) + 1, 2)
    table[idx, 0], table[idx, 1] = ref_logps[:len(idx)], ref_logps[len(idx):]
    return model, step, sft_step, table


def trl_side(model, tok, data, args, idx):
    """LlavaForConditionalGeneration loaded from our weights (llava-hf layout), peft LoRA on the same modules,
    TRL 1.13's _compute_loss with a stub trainer (as tests/test_dpo.py; spec B.7)."""
    import transformers
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory() as d:
        lm.save_llava_hf(model, tok, d)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32,
                                                                       attn_implementation="sdpa")
    targets = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    policy = get_peft_model(hf, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                           target_modules=targets, bias="none"))
    policy.train()
    stub = SimpleNamespace(
        model=policy, ref_model=None, accelerator=Accelerator(cpu=True), precompute_ref_logps=False,
        beta=args.beta, loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
        aux_loss_enabled=False, router_aux_loss_coef=0.0, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05))
    batch = dpo.collate_pairs(data, idx, tok.pad_token_id)
    ids = batch["input_ids"].clone()
    ids[ids == model.config.image_token_id] = hf.config.image_token_id
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != lm.IGNORE_INDEX).long(),
              "pixel_values": batch["pixel_values"][batch["row_images"]]}  # TRL's collator: one image per row
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5,
                            fused=True)  # transformers' default optim: adamw_torch_fused

    def step():
        loss = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return policy, step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=8)  # pairs per step (one micro-batch)
    p.add_argument("--repeats", type=int, default=12)  # timed rounds (each contender once per round)
    p.add_argument("--lora-r", type=int, default=128)  # dpo.py's default (MMed-RAG / MMedPO / STLLaVA-Med)
    p.add_argument("--length", type=int, default=0)  # 0: the toy pairs; else synthetic pairs of this many tokens
    p.add_argument("--images", type=int, default=1)  # images per synthetic sample
    p.add_argument("--only", default="", help="ours | trl: run one side for a few steps and print its peak RSS")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model, tok, data, args = build(a.pairs, a.lora_r, a.length, a.images)
    args.lora_dropout = 0.0  # deterministic losses, so the two sides can be checked equal before timing
    idx = list(range(a.pairs))
    if a.only:
        step = ours_side(model, tok, data, args, idx)[1] if a.only == "ours" else trl_side(model, tok, data, args, idx)[1]
        del model
        step()  # the first step allocates optimizer state; the peak of training is what follows
        C.reset_peak_rss()
        for _ in range(3):
            step()
        print(json.dumps({"peak_rss_mb": C.peak_rss_mb()}))
        return

    _, ours, sft, table = ours_side(model, tok, data, args, idx)
    _, trl = trl_side(model, tok, data, args, idx)
    # Same weights, same batch: the same loss; after one AdamW step from the same state, the same loss again.
    l_ours, l_trl = [ours().item(), ours().item()], [trl().item(), trl().item()]
    # (step 2 to 1e-3: the summed log-probs of long random answers are ~-100, and the two stacks sum in different
    # orders in fp32; on the toy pairs the two agree to 3e-6)
    assert max(abs(x - y) for x, y in zip(l_ours, l_trl)) < 1e-3, (l_ours, l_trl)

    t = C.interleaved({"ours": ours, "trl": trl}, a.repeats)
    pps = {k: a.pairs / C.median(v) for k, v in t.items()}
    r = C.interleaved({"dpo_precomputed_ref": lambda: ours(table), "sft_2n": sft}, a.repeats)
    batch = dpo.collate_pairs(data, idx, tok.pad_token_id)
    rss = {side: C.rss_of([__file__, "--only", side, "--pairs", str(a.pairs), "--lora-r", str(a.lora_r),
                           "--length", str(a.length), "--images", str(a.images)]) for side in ("ours", "trl")}
    C.write_result("dpo" if not a.length else f"dpo_len{a.length}_img{a.images}", {
        "data": "toy" if not a.length else f"synthetic, {a.length} tokens, {a.images} image(s) per sample",
        "pairs_per_step": a.pairs, "rows": 2 * a.pairs, "padded_length": batch["input_ids"].shape[1],
        "lora_r": a.lora_r, "loss_steps_1_2": {"ours": l_ours, "trl": l_trl},
        "pairs_per_s": pps, "speedup_vs_trl": pps["ours"] / pps["trl"], "target_speedup": 1.5,
        "step_s_median": {k: C.median(v) for k, v in {**t, **r}.items()},
        "dpo_over_sft": C.median(r["dpo_precomputed_ref"]) / C.median(r["sft_2n"]), "target_dpo_over_sft": 1.1,
        "peak_rss_mb_during_steps": rss})


if __name__ == "__main__":
    main()
