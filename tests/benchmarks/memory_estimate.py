"""Per-rank memory of dpo.py's DPO step under FSDP2, estimated by counting, and the count checked against measured
peaks: which configurations of the headline command fit on 80 GB / 141 GB cards.

    python tests/benchmarks/memory_estimate.py            # 7B table for 8 ranks + validation; writes runs/bench/memory.json
    python tests/benchmarks/memory_estimate.py --world 8 --pairs 1 2 4 8 --validate-only

    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b   # the command the table is for

What is counted, per rank (W ranks; FSDP2 shards every parameter along dim 0, padded to a multiple of W):
  frozen weights       base LM + ViT + projector, sharded (bf16 with --dtype auto on GPU; fp32 on CPU)
  LoRA weights         fp32, sharded (lm.policy_and_reference keeps trained parameters in fp32)
  gradients            of the LoRA weights, fp32, sharded (FSDP2 reduce-scatters in fp32)
  AdamW states         exp_avg + exp_avg_sq, fp32, sharded
  gathered units       the root unit (embeddings, lm_head, final norm) stays gathered through forward and backward,
                       plus two decoder layers (the one computing and the one prefetched), in the compute dtype
  saved activations    what autograd keeps for backward, per token of the padded micro-batch, counted op by op for
                       transformers' Mistral decoder layer with peft LoRA on its 7 linear layers (frozen base):
                         RMSNorm x2: its input in fp32 (4d) + 1/rms (4)       LoRA inputs: 2 x d (q/k/v share one)
                         LoRA A outputs: 7 x r                                  SDPA: q, k, v, output, logsumexp
                           (k, v repeated to all heads when a mask is passed; GQA kernels only without one)
                         boolean 4D mask -> SDPA's float copy, per layer: T per token (prefix sharing, padding)
                         MLP: gate, silu(gate), up, product: 4 x intermediate
                       layer 0's first norm saves nothing (frozen embeddings: no gradient reaches it); once per
                       forward: rotary cos/sin, the final norm's input, fp32 logits at the scored tokens (4 V each)
                       With activation checkpointing: each layer keeps its input (d) and one layer is recomputed at
                       a time in backward.
  working memory       the largest transient: one layer of the reference forward (no graph: 3 x intermediate +
                       2 x d per token, and that layer's float mask) or one layer's backward (2 x intermediate + d,
                       the logits' gradient; with checkpointing also the recomputed layer's saved activations)
  inputs               ids, positions, the boolean mask, pixels, projected image features (policy and reference)
Not counted (GPU only): the CUDA context and NCCL buffers (~1-2 GiB), allocator fragmentation. A configuration is
called fitting when estimate x 1.1 + 2 GiB <= the card's memory.

Validation (--validate, on by default): the same count at small shapes against the measured peak of live tensor
bytes in one process on CPU -- FSDP2 with a fake 8-rank process group (torch.testing's FakeStore: collectives do
nothing, so every shard, all-gather buffer and reduce-scatter buffer of rank 0 of 8 is really allocated, at its real
size) and torch's FSDPMemTracker (a TorchDispatchMode that adds the bytes of every storage created and subtracts them
when it is freed, including FSDP2's storage resizes). Tensor bytes, not process RSS: RSS also counts the allocator's
cached pages, libraries and the Python heap, and does not fall when memory is freed. CPU computes in fp32, so the
validation covers the fp32 path; the bf16 terms differ only in bytes per element (and the fp32 RMSNorm copies).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace

import _common as C
import torch
import transformers
from transformers import CLIPVisionConfig

import dpo
import llava_med as lm

GiB = 2 ** 30


@dataclass
class Shape:
    """One micro-batch: `pairs` pairs sharing image and prompt, a prompt of `prompt` tokens (image tokens included),
    answers of `chosen` and `rejected` tokens."""
    pairs: int
    prompt: int
    chosen: int
    rejected: int
    share: bool = True

    def rows_and_length(self):  # collate_pairs' layout (right padding)
        if self.share:
            return self.pairs, self.prompt + self.chosen + self.rejected
        return 2 * self.pairs, self.prompt + max(self.chosen, self.rejected)


def llava_med_7b() -> lm.LlavaMedConfig:
    """microsoft/llava-med-v1.5-mistral-7b (spec 2.1): Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336, mlp2x_gelu;
    vocabulary 32000 + the <image> token (id 32000, outside the LM's embedding, as lm.load builds the original layout)."""
    text = transformers.MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                      rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return lm.LlavaMedConfig(text_config=text, vision_config=vision, image_token_id=32000, max_length=2048)


def small_config(d: int, layers: int, vocab: int = 512, image: int = 112) -> lm.LlavaMedConfig:
    """A small LLaVA of the same layout (Mistral with 4:1 GQA, MLP 3.5 d, CLIP ViT with 14 px patches)."""
    text = transformers.MistralConfig(vocab_size=vocab, hidden_size=d, intermediate_size=7 * d // 2, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                                      tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image, patch_size=14, hidden_act="quick_gelu")
    return lm.LlavaMedConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1, max_length=4096)


def lora_model(cfg: lm.LlavaMedConfig, r: int, device="meta"):
    """dpo.py's policy (frozen base, LoRA r / 2r on every LM linear layer, trained weights fp32), built on `device`."""
    args = dpo.Args(lora_r=r, lora_alpha=2 * r)
    with torch.device(device):
        model = lm.LlavaMed(cfg).freeze_vision()
        model, _ = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                           args.lora_dropout, args.tune_projector)
    return model


def shard_numel(shape, world: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 split into `world` chunks, padded to equal size."""
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    return math.ceil(shape[0] / world) * rest if shape else 1


def estimate(model, cfg: lm.LlavaMedConfig, shape: Shape, world: int, weight_bytes: int, compute_bytes: int,
             checkpointing: bool) -> dict:
    """Bytes per rank, by component (module docstring)."""
    t = cfg.text_config
    d, L, V, inter = t.hidden_size, t.num_hidden_layers, t.vocab_size, t.intermediate_size
    heads, kv_heads = t.num_attention_heads, t.num_key_value_heads
    hd = d // heads
    b, W = compute_bytes, world
    params = list(model.named_parameters())
    r = model.lora_config.r
    frozen = sum(shard_numel(p.shape, W) for n, p in params if not p.requires_grad) * weight_bytes
    trained = sum(shard_numel(p.shape, W) for n, p in params if p.requires_grad) * 4

    def unit_bytes(prefix):
        return sum(p.numel() for n, p in params if n.startswith(prefix)) * b
    layer = unit_bytes("language_model.model.layers.0.")
    root = sum(p.numel() for n, p in params if not n.startswith(("language_model.model.layers.", "vision_tower.",
                                                                   "projector."))) * b
    rows, T = shape.rows_and_length()
    tokens = rows * T  # activations have the padded shape
    masked = shape.share or shape.chosen != shape.rejected  # a 4D mask reaches SDPA (else is_causal, no mask)
    kv_width = d if masked else kv_heads * hd
    mask_per_token = b * T if masked else 0  # SDPA's float copy of the boolean mask, [rows, 1, T, T]
    per_layer = (2 * (4 * d + 4)  # RMSNorm x2: fp32 input (its copy in bf16) and 1/rms
                 + b * 2 * d  # LoRA inputs: the attention norm's output (q, k, v) and the MLP norm's (gate, up)
                 + b * 7 * r  # LoRA A outputs
                 + b * (d + 2 * kv_width + d) + 4 * heads  # SDPA: q, k, v (repeated when masked), output (o_proj's input), logsumexp
                 + mask_per_token
                 + b * 4 * inter)  # gate, silu(gate), up, product (down_proj's input)
    once = (2 * b * hd  # rotary cos, sin
            + 4 * d + 4)  # final norm's input (fp32) and 1/rms
    n_scored = shape.pairs * (shape.chosen + shape.rejected)
    logits = n_scored * (4 * V + 8 * 4)  # fp32 logits at scored positions (+ row/position/target/answer indices)
    # one layer's transient: the reference forward (no graph: gate, up and their product live at once, and that
    # layer's float mask) or one layer's backward (the MLP's gradients: product, silu(gate), up; the output's; and
    # the logits' gradient at the start)
    ref_work = tokens * (b * (3 * inter + 2 * d) + mask_per_token)
    bwd_work = tokens * b * (2 * inter + d) + 2 * n_scored * 4 * V
    if checkpointing:
        saved = tokens * (L * b * d + once) + logits  # each layer keeps its input
        bwd_work += tokens * (per_layer - 4 * d - 4)  # the layer recomputed in backward (its input counted above)
    else:
        saved = tokens * (L * per_layer - 4 * d - 4 + once) + logits
    work = max(ref_work, bwd_work)
    v = cfg.vision_config
    n_images = shape.pairs
    inputs = (tokens * (8 + 8) + (rows * T * T if masked else tokens * 8)  # ids, positions, bool mask (or 2D mask)
              + n_images * 3 * v.image_size ** 2 * 4  # pixels (fp32)
              + 2 * n_images * cfg.num_image_tokens * d * b)  # projected features, and their per-row copy
    out = {"frozen_weights": frozen, "lora_weights": trained, "adamw_states": 2 * trained,
           "gathered_units": root + 2 * layer, "saved_activations": saved, "working_memory": work, "inputs": inputs}
    # the activation peak (early in backward: the LoRA gradients do not exist yet), or the step's end (activations
    # freed, gradients reduced, AdamW stepping) when that is larger
    out["gradients"] = trained
    out["peak"] = max(sum(v for k, v in out.items() if k != "gradients"), frozen + 4 * trained + root)
    return out


# ---------------------------------------------------------------------------------------------------------- measure


class Pairs:
    """collate_pairs' view of a PairData: .items and .pixel(key); random ids, images at the front of the prompt."""

    def __init__(self, shape: Shape, cfg: lm.LlavaMedConfig):
        g = torch.Generator().manual_seed(0)
        words = lambda n: torch.randint(10, cfg.image_token_id, (n,), generator=g).tolist()
        self.cfg, self.items = cfg, []
        for i in range(shape.pairs):
            prompt = words(2) + [cfg.image_token_id] * cfg.num_image_tokens + words(shape.prompt - 2 - cfg.num_image_tokens)
            seqs = {s: prompt + words(n) for s, n in (("chosen", shape.chosen), ("rejected", shape.rejected))}
            self.items.append({s: {"input_ids": ids, "labels": [lm.IGNORE_INDEX] * len(prompt) + ids[len(prompt):]}
                               for s, ids in seqs.items()} | {"images": [str(i)], "rejected_images": [str(i)]})

    def pixel(self, key):
        return torch.randn(3, self.cfg.image_size, self.cfg.image_size, generator=torch.Generator().manual_seed(int(key)))


@contextlib.contextmanager
def fake_ranks(world: int):
    """A process group of `world` ranks in this one process, whose collectives do nothing (rank 0's view)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure(cfg: lm.LlavaMedConfig, shape: Shape, r: int, world: int, checkpointing: bool) -> dict:
    """Peak live tensor bytes of rank 0 of `world` over one DPO step (dpo_step, backward, AdamW), after a first step
    has created the optimizer state; FSDP2 (dpo.shard) on CPU, fp32. Call inside fake_ranks(world)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    torch.manual_seed(0)
    model = lora_model(cfg, r, "cpu")
    args = dpo.Args(lora_r=r, lora_alpha=2 * r, prefix_sharing=shape.share)
    dpo.shard(model, torch.device("cpu"), checkpointing)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as dpo.train
    data, idx, tok = Pairs(shape, cfg), list(range(shape.pairs)), SimpleNamespace(pad_token_id=0)

    class Step(torch.nn.Module):  # the tracker allows a module twice per step (policy, reference) below a root
        def forward(self):
            return dpo.dpo_step(args, model, None, data, idx, tok, torch.device("cpu"))["loss"]

    step = Step()

    def train_step():
        step().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    tracker = FSDPMemTracker(model, opt)
    with tracker:
        train_step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {str(k.value if hasattr(k, "value") else k): v for k, v in peak.items()}


VALIDATION = [  # (config, shape): activations dominate, as at 7B; the second also pads (different answer lengths)
    (dict(d=128, layers=4), Shape(pairs=2, prompt=256, chosen=48, rejected=48)),
    (dict(d=192, layers=3), Shape(pairs=3, prompt=320, chosen=24, rejected=64)),
]


def validate(cases=VALIDATION, r: int = 8, world: int = 8, checkpointing=(False, True), unshared=True) -> list[dict]:
    """Estimate against measurement for each case, with and without activation checkpointing (and prefix
    sharing off too). Returns rows with the relative error of the total."""
    rows = []
    with fake_ranks(world):
        for kw, shape in cases:
            cfg = small_config(**kw)
            model = lora_model(cfg, r)
            for share in ((True, False) if unshared else (True,)):
                s = Shape(shape.pairs, shape.prompt, shape.chosen, shape.rejected, share)
                for ac in checkpointing:
                    est = estimate(model, cfg, s, world, 4, 4, ac)
                    got = measure(cfg, s, r, world, ac)
                    rows.append({"config": kw, "shape": vars(s), "activation_checkpointing": ac,
                                 "estimated_bytes": est["peak"], "measured_bytes": got["Total"],
                                 "relative_error": est["peak"] / got["Total"] - 1, "estimate": est, "measured": got})
                    print(f"validate {kw} {vars(s)} ac={ac}: estimated {est['peak'] / 2**20:.1f} MiB, measured "
                          f"{got['Total'] / 2**20:.1f} MiB ({rows[-1]['relative_error']:+.1%})", flush=True)
    return rows


def table(world: int, pairs_list, shapes: dict, r: int = 128) -> list[dict]:
    """The 7B estimate for every micro-batch size, shape, checkpointing and sharing setting, bf16 and fp32 weights."""
    cfg = llava_med_7b()
    model = lora_model(cfg, r)
    rows = []
    for name, (prompt, answer) in shapes.items():
        for pairs in pairs_list:
            for share in (True, False):
                for ac in (False, True):
                    for dtype, wb in (("bf16", 2), ("fp32", 4)):
                        s = Shape(pairs, prompt, answer, answer, share)
                        est = estimate(model, cfg, s, world, wb, 2, ac)  # GPU: bf16 compute (FSDP2 mixed precision)
                        need = est["peak"] * 1.1 + 2 * GiB
                        rows.append({"shape": name, "prompt": prompt, "answer": answer, "pairs": pairs,
                                     "prefix_sharing": share, "activation_checkpointing": ac, "weights": dtype,
                                     "tokens_per_sequence": prompt + answer,
                                     "per_rank_gib": est["peak"] / GiB, "components_gib": {k: v / GiB for k, v in est.items()},
                                     "fits_80gb": need <= 80e9, "fits_141gb": need <= 141e9})
    return rows


def fit_summary(rows) -> list[dict]:
    """The largest micro-batch (pairs per rank) that fits, per shape, card, weights dtype, checkpointing, sharing."""
    out = []
    for key in dict.fromkeys((x["shape"], x["weights"], x["activation_checkpointing"], x["prefix_sharing"]) for x in rows):
        sel = [x for x in rows if (x["shape"], x["weights"], x["activation_checkpointing"], x["prefix_sharing"]) == key]
        out.append({"shape": key[0], "tokens_per_sequence": sel[0]["tokens_per_sequence"], "weights": key[1],
                    "activation_checkpointing": key[2], "prefix_sharing": key[3],
                    "max_pairs_80gb": max([x["pairs"] for x in sel if x["fits_80gb"]], default=0),
                    "max_pairs_141gb": max([x["pairs"] for x in sel if x["fits_141gb"]], default=0),
                    "gib_per_rank_by_pairs": {x["pairs"]: round(x["per_rank_gib"], 1) for x in sel}})
    return out


def print_table(rows):
    pairs = sorted({x["pairs"] for x in rows})
    print(f"per-rank GiB by micro-batch (pairs per rank) {pairs}; largest fitting micro-batch on 80 GB / 141 GB "
          f"(estimate x 1.1 + 2 GiB <= card)")
    print(f"{'shape':7} {'tokens':>6} {'weights':>7} {'AC':>3} {'share':>5}  " + " ".join(f"{p:>6}" for p in pairs)
          + f"  {'80GB':>4} {'141GB':>5}")
    for x in fit_summary(rows):
        print(f"{x['shape']:7} {x['tokens_per_sequence']:>6} {x['weights']:>7} {'on' if x['activation_checkpointing'] else 'off':>3} "
              f"{'on' if x['prefix_sharing'] else 'off':>5}  " + " ".join(f"{x['gib_per_rank_by_pairs'][p]:6.1f}" for p in pairs)
              + f"  {x['max_pairs_80gb']:>4} {x['max_pairs_141gb']:>5}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=8)  # ranks (GPUs)
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4, 8, 16])  # pairs per micro-batch per rank
    p.add_argument("--validate-only", action="store_true")
    p.add_argument("--no-validate", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    # LLaVA-Med's prompt: 576 image tokens + a ~40-token question; VQA answers <= 30, reports <= 150 tokens;
    # long: a prompt filling dpo.py's --max-length 2048 examples (several images or a long history)
    shapes = {"vqa": (616, 30), "report": (616, 150), "long": (1792, 256)}
    res = {}
    if not a.validate_only:
        res["table"] = table(a.world, a.pairs, shapes)
        res["fit_summary"] = fit_summary(res["table"])
        print_table(res["table"])
    if not a.no_validate:
        res["validation"] = validate()
        res["max_abs_relative_error"] = max(abs(x["relative_error"]) for x in res["validation"])
        print(f"largest validation error: {res['max_abs_relative_error']:.1%} (goal: within 15 %)")
    C.write_result("memory", {"world": a.world, "shapes": shapes, **res})


if __name__ == "__main__":
    main()
