"""The headline 8-GPU 7B command, checked without a GPU (issue 18):

    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b ...

- A LLaVA-Med v1.5-shaped model (Mistral-7B with GQA, CLIP ViT-L/14-336, mlp2x_gelu, LoRA r=128 on every LM linear
  layer), built from the checkpoint's own config.json fields by llava_med's loader code on the meta device (no
  memory, no arithmetic), runs dpo.py's step -- collate_pairs -> lm.image_features -> sequence_logps ->
  reference_logps (adapters off) -> dpo_loss -> backward -- end to end, prefix-shared and not, in seconds.
- tests/benchmarks/memory_estimate.py's per-rank memory formula agrees with the measured peak of live tensors at a
  small shape (the script validates a second shape too).
"""

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import dpo
import llava_med as lm
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

# microsoft/llava-med-v1.5-mistral-7b config.json (the fields the loader reads; spec 2.1)
LLAVA_MED_V15 = {
    "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rope_theta": 1e6, "sliding_window": None, "max_position_embeddings": 32768, "vocab_size": 32000,
    "tie_word_embeddings": False, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def llava_med_v15_config() -> lm.LlavaMedConfig:
    """Our config for the v1.5 checkpoint, from its config.json by the loader's own code. The tokenizer is Mistral's
    32000 tokens plus the `<image>` token lm.load adds (id 32000, outside the LM's 32000-row embedding, which
    LlavaMed.embed masks out: the original layout)."""
    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 32000, chat_template=None)
    cfg, layout = lm._config_from_checkpoint(Path("/ckpt/llava-med-v1.5-mistral-7b"), LLAVA_MED_V15, tok)
    assert layout == "original" and cfg.template == "mistral_instruct" and cfg.image_token_id == 32000
    return cfg


class MetaCompute(TorchFunctionMode):
    """Weights and activations on the meta device, while token ids and masks built by collate_pairs stay real CPU
    tensors: LlavaMed.embed counts the image tokens (int(...)) and transformers' mask builder asks whether any row is
    padded (attention_mask.all()) -- both read values, which meta tensors do not have. So a CPU tensor meeting a meta
    tensor in one op moves to meta there; until that happens an explicit .to(<meta device>) of a CPU tensor keeps it on
    CPU (with the dtype asked for), as does an integer or boolean tensor made on the meta device (torch.arange of
    positions: transformers reads them to find packed sequences); ops among CPU tensors run as usual. Weights and
    activations (floating point) are meta throughout; autograd's backward sees meta tensors only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].device.type == "cpu":
            out = func(*args, **kwargs)
            return args[0].to(out.dtype) if out.is_meta else out
        if "device" in kwargs and torch.device(kwargs["device"]).type == "meta":  # a factory (arange, zeros, ...)
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and not out.is_floating_point():  # positions, masks: keep values
                return func(*args, **{**kwargs, "device": "cpu"})
            return out
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))
                   if isinstance(t, torch.Tensor)]  # (an op's tensors sit at most one list deep)
        if any(t.is_meta for t in tensors) and any(not t.is_meta and t.dim() > 0 for t in tensors):
            args, kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: t.to("meta") if t.device.type == "cpu" and t.dim() > 0 else t, (args, kwargs))
        return func(*args, **kwargs)


class Pairs:
    """The two things collate_pairs reads from a PairData: .items and .pixel(key) (zero 336 px images). Token ids
    follow LLaVA-Med v1.5's mistral_instruct layout: <s> [INST] <576 image tokens> question [/INST] answer </s>.
    Pair 0: a VQA answer, pair 1: a report, pair 2: a different rejected image (MMedPO's noised image), which takes
    two rows even with prefix sharing on."""

    def __init__(self, cfg):
        self.cfg, g = cfg, torch.Generator().manual_seed(0)
        words = lambda n: torch.randint(3, 32000, (n,), generator=g).tolist()
        self.items = []
        for i, (q, a_w, a_l) in enumerate([(40, 6, 11), (35, 120, 90), (45, 20, 25)]):
            prompt = [1, 733, 16289, 28793] + [cfg.image_token_id] * cfg.num_image_tokens + words(q) + [733, 28748, 16289, 28793]
            seqs = {s: {"input_ids": prompt + words(n) + [2], "labels": [lm.IGNORE_INDEX] * len(prompt) + words(n) + [2]}
                    for s, n in (("chosen", a_w), ("rejected", a_l))}
            for s in seqs.values():  # labels = the answer tokens themselves
                s["labels"][len(prompt):] = s["input_ids"][len(prompt):]
            self.items.append({**seqs, "images": [f"img{i}"],
                               "rejected_images": [f"noise:img{i}"] if i == 2 else [f"img{i}"]})

    def pixel(self, key):
        return torch.zeros(3, self.cfg.image_size, self.cfg.image_size)


@pytest.fixture(scope="module")
def meta_7b():
    cfg = llava_med_v15_config()
    args = dpo.Args(lora_r=128, lora_alpha=256, batch_size=3, micro_batch_size=3)  # dpo.py's (and MMedPO's) LoRA
    with torch.device("meta"):
        model = lm.LlavaMed(cfg).freeze_vision()
        model, ref = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                             args.lora_dropout, args.tune_projector)
    return cfg, args, model, ref


def test_7b_shapes_and_parameter_counts(meta_7b):
    cfg, _, model, ref = meta_7b
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size, t.sliding_window) == (4096, 32, 32, 8, 14336, 32000, None)
    v = cfg.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, cfg.num_image_tokens) == (1024, 24, 336, 14, 576)
    layer = model.language_model.model.layers[0].self_attn
    assert layer.k_proj.base_layer.weight.shape == (1024, 4096)  # GQA: 8 KV heads x 128
    count = lambda pred: sum(p.numel() for n, p in model.named_parameters() if pred(n))
    # Mistral-7B 7.24 B, CLIP ViT-L/14-336 0.30 B, projector 1024x4096 + 4096x4096 (+ biases) = 21 M
    assert count(lambda n: n.startswith("language_model.") and "lora_" not in n) == 7_241_732_096
    assert count(lambda n: n.startswith("vision_tower.")) == 303_507_456
    assert count(lambda n: n.startswith("projector.")) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # LoRA r=128 on q, k, v, o, gate, up, down of 32 layers: r x (in + out) each
    per_layer = 128 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert count(lambda n: "lora_" in n) == 32 * per_layer == 335_544_320
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad) and ref is None


@pytest.mark.parametrize("share", [True, False], ids=["prefix_shared", "two_rows"])
def test_7b_dpo_step_on_meta(meta_7b, share, monkeypatch):
    """dpo.py's step at the 7B shape on meta tensors, forward and backward: the shapes of every stage and the LoRA
    gradients; the reference is the same model with adapters off, under no_grad."""
    cfg, args, model, ref = meta_7b
    args = dataclasses.replace(args, prefix_sharing=share)
    data = Pairs(cfg)
    idx = [0, 1, 2]
    batch = dpo.collate_pairs(data, idx, 0, share)
    rows, T = batch["input_ids"].shape
    assert rows == (4 if share else 6)  # pair 2 (another rejected image) keeps two rows
    n_scored = sum(x != lm.IGNORE_INDEX for i in idx for side in ("chosen", "rejected") for x in data.items[i][side]["labels"])
    assert len(batch["score"][0]) == n_scored
    seen = {"vit": [], "decoder": [], "lm_head": [], "grad_enabled": [], "adapters_off": []}
    q_proj = model.language_model.model.layers[0].self_attn.q_proj

    def record(key, shape_of):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen[key].append(shape_of(inputs, output))
            if key == "lm_head":
                seen["grad_enabled"].append(torch.is_grad_enabled())
                seen["adapters_off"].append(q_proj.disable_adapters)
        return hook

    hooks = [model.vision_tower.register_forward_hook(record("vit", lambda i, o: (tuple(i[0].shape), tuple(o.shape)))),
             model.language_model.model.layers[-1].register_forward_hook(
                 record("decoder", lambda i, o: tuple((o[0] if isinstance(o, tuple) else o).shape))),
             model.language_model.lm_head.register_forward_hook(record("lm_head", lambda i, o: tuple(o.shape)))]
    logps, sequence_logps = [], dpo.sequence_logps
    monkeypatch.setattr(dpo, "sequence_logps", lambda *a: logps.append(sequence_logps(*a)) or logps[-1])
    model.train()
    try:
        with MetaCompute():
            out = dpo.dpo_step(args, model, ref, data, idx, SimpleNamespace(pad_token_id=0), torch.device("cpu"))
            out["loss"].backward()
    finally:
        for h in hooks:
            h.remove()
    d, V = 4096, 32000
    assert seen["vit"] == [((4, 3, 336, 336), (4, 576, 1024))]  # 4 distinct images (3 + pair 2's noised), once
    assert seen["decoder"] == [(rows, T, d)] * 2  # policy, then reference
    assert seen["lm_head"] == [(n_scored, V)] * 2 and seen["grad_enabled"] == [True, False]
    assert seen["adapters_off"] == [False, True]  # the reference: the same weights with LoRA switched off
    assert out["loss"].is_meta and out["loss"].shape == () and out["n"].item() == 3
    assert out["margin"].shape == () and out["accuracy"].shape == ()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 32 * 7 * 2 and all(p.grad is not None and p.grad.is_meta and p.grad.shape == p.shape for _, p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    for _, p in lora:
        p.grad = None
    # the log-prob sums and counts of the policy and the reference: one per answer (3 chosen, then 3 rejected)
    assert [(tuple(s.shape), tuple(c.shape), s.dtype) for s, c in logps] == [((6,), (6,), torch.float32)] * 2


def test_memory_estimate_matches_measured_peak():
    """tests/benchmarks/memory_estimate.py's count against the measured peak of live tensor bytes of rank 0 of 8
    (FSDP2 over a fake 8-rank group, FSDPMemTracker) at the smallest validation shape, with and without activation
    checkpointing: within 15 %. (The script also checks a second shape and prefix sharing off.)"""
    import torch.distributed as dist
    import memory_estimate as M

    assert not dist.is_initialized(), "a process group leaked from an earlier test"
    rows = M.validate(M.VALIDATION[:1], unshared=False)
    assert len(rows) == 2
    for row in rows:
        assert abs(row["relative_error"]) < 0.15, row
        est, got = row["estimate"], row["measured"]
        # the sharded states are exact: 1/8 of every parameter (padded), AdamW's two fp32 moments
        assert got["Sharded Param"] == est["frozen_weights"] + est["lora_weights"]
        assert abs(got["OptState"] / est["adamw_states"] - 1) < 0.02  # (+ AdamW's step counters)
    assert rows[1]["measured_bytes"] < 0.6 * rows[0]["measured_bytes"]  # checkpointing pays at this shape
