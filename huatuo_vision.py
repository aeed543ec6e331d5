"""huatuo_vision.py -- HuatuoGPT-Vision (Chen et al. 2024, arXiv 2406.19280): PubMedVision data building, two-stage
LLaVA-1.5-style SFT, zero-shot multiple-choice evaluation.

    # embedded default: build PubMedVision-style records from the toy captions, stage 1, stage 2, evaluate (CPU)
    python huatuo_vision.py
    # one stage on real data (PubMedVision + LLaVA mix), 8 GPUs; then evaluate a checkpoint
    torchrun --nproc-per-node=8 huatuo_vision.py --stages 1 --model /ckpt/llava-v1.5-base \\
        --train-data PubMedVision_Alignment_VQA.json,llava_558k.json --image-folder /data/images --out runs/hv1
    torchrun --nproc-per-node=8 huatuo_vision.py --stages 2 --model runs/hv1/llava_hf \\
        --train-data PubMedVision_InstructionTuning_VQA.json,llava_mix665k.json --image-folder /data/images --out runs/hv2
    torchrun --nproc-per-node=8 huatuo_vision.py --stages eval --model /ckpt/HuatuoGPT-Vision-7B \\
        --eval-data medical_multimodel_evaluation_data.json --eval-image-folder /data/eval_images

The method, as in the paper (Sec. 3, App. B-E):
  1. PubMedVision building from image-caption(+inline context) pairs: keep captions with >= N medical terms (a
     lexicon), images of at least S px, drop near-duplicate captions (embedding cosine), then "unblinded"
     reformatting: a VLM sees the image(s) and the context inside <reference>...</reference> and writes a
     description and a Q&A pair in one of the scenario styles. Alignment-VQA = (a fixed describe-question,
     description); Instruction-VQA = (the generated question, answer). Malformed generations are counted and skipped.
  2. Stage 1 (alignment): train the projector only (lr 1e-3, LLaVA-1.5) on captions + Alignment-VQA.
     Stage 2 (instruction tuning): train the LLM and projector (full or LoRA), lr 2e-5, on instructions +
     Instruction-VQA. Loss: token cross-entropy over answer tokens (below).
  3. Evaluation: multiple choice, zero-shot, prompt "{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from
     the given choices directly."; the answer letter is matched in three steps (letter, then option text, then the
     closest option); accuracy per dataset and overall.
Template: `huatuo` ("<|user|>\\n...\\n<|assistant|>\\n", EOS ends answers; llava_med.TEMPLATES) for HuatuoGPT-Vision
checkpoints; the tiny model keeps its own (mistral_instruct) unless --template is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    stages: str = "build,1,2,eval"  # comma list of: build (PubMedVision records), 1 (alignment), 2 (instruction), eval
    # data building
    source: str = "data/toy/train.json"  # image-caption records: {"id","image","caption"|"report","context"?,"modality"?,"body_part"?}
    source_image_folder: str = ""  # images of --source ("" = its folder)
    lexicon: str = "data/medical_terms.txt"  # medical terms, one per line (the paper uses UMLS SPECIALIST + GPT-4 cleanup)
    min_medical_terms: int = 3  # keep captions with at least this many distinct lexicon terms (paper: 5, with UMLS)
    min_image_side: int = -1  # drop images smaller than this (paper: 336); -1 = 336, or 32 for the toy set's 64 px images
    dedup_threshold: float = 0.95  # drop a caption whose cosine similarity to a kept one is at least this
    reformat_model: str = "tiny"  # the VLM that rewrites captions (any checkpoint llava_med.load reads)
    reformat_max_new_tokens: int = 128  # generation budget of the reformatter
    # training
    model: str = "tiny"  # "tiny" or a checkpoint folder; stage 2 continues from stage 1's weights in the same run
    template: str = ""  # chat template override ("" = the checkpoint's)
    dtype: str = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    train_data: str = ""  # extra LLaVA-format json/jsonl files for both stages, comma-separated ("" = toy defaults)
    image_folder: str = ""  # images of --train-data ("" = each file's folder)
    max_length: int = 512  # tokens per sample, image tokens included (a 6-image sample needs 6 x 576 on LLaVA-1.5)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    lr1: float = 1e-3  # stage 1 learning rate (projector only; LLaVA-1.5 pretrain)
    lr2: float = -1  # stage 2 learning rate; -1 = 2e-5 (paper), or 1e-3 for --model tiny (random weights)
    lora: bool = False  # stage 2 with LoRA on the LLM (r 128, alpha 256) instead of full fine-tuning
    epochs1: float = 1.0  # stage 1 epochs (fractional allowed)
    epochs2: float = -1  # stage 2 epochs; -1 = 1 (paper), or 30 for --model tiny (letter answers take ~2000 steps)
    batch_size: int = 16  # samples per optimizer step over all ranks (global)
    micro_batch_size: int = 8  # samples per forward on one rank
    warmup_ratio: float = 0.03  # linear warmup, then cosine to 0
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    attn_implementation: str = "sdpa"  # transformers attention kernel: sdpa (flash/mem-efficient on GPU), flash_attention_2, eager
    compile: bool = False  # torch.compile each decoder layer (GPU: faster steps after a one-off compile)
    seed: int = 0  # same seed + same data = same run
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    # output
    out: str = "runs/huatuo_vision"  # built data, checkpoints, metrics.jsonl, llava_hf/ exports, eval results
    save_every: int = 0  # checkpoint every N steps within a stage (0 = at the end of the stage)
    resume: bool = True  # continue a stage from its newest complete checkpoint
    # evaluation
    eval_data: str = "data/toy/test_mc.json"  # HuatuoGPT eval json, or VQA-RAD / SLAKE (closed questions as [yes, no])
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    eval_limit: int = 0  # first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_before: bool = True  # also evaluate the starting model
    mc_scoring: str = "ours"  # answer-letter matcher: ours, or huatuo = the released match_choice3 (paper numbers)


# Copied from dpo.py: parse_args
def parse_args(cls, argv=None):
    """argparse generated from the Args dataclass: --field-name, with the field's comment in Args as its help, its
    default, and for a Literal type its allowed values; booleans take --flag / --no-flag."""
    comments = dict(re.findall(r"^    (\w+):[^\n]*?  # (.*)$", inspect.getsource(cls), re.M))
    p = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kw = {"default": f.default, "help": comments.get(f.name, "").replace("%", "%%") + f" (default: {f.default!r})"}
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type.startswith("Literal["):
            kw["choices"] = ast.literal_eval(f.type[len("Literal"):])
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[f.type]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return cls(**vars(p.parse_args(argv)))


# Copied from dpo.py: setup_distributed
def setup_distributed(timeout_s: int = 1800):
    """Returns (rank, world_size, device). Outside torchrun a one-process group is created, so the training
    code has one path (FSDP2 with one shard). The timeout makes a rank whose peer died exit instead of hanging."""
    if "RANK" not in os.environ:  # plain `python dpo.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # on GPU: nccl for CUDA tensors and gloo for the CPU ones (the loop's statistics, gathered answers)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------------------
# 1. PubMedVision data building: filter -> dedup -> unblinded reformatting
# ----------------------------------------------------------------------------------------------------------

ALIGNMENT_QUESTIONS = [  # predefined describe-questions q' of Alignment-VQA (paper App. C; single-image variants)
    "Please describe this picture.", "Can you describe the image for me?", "What details stand out in this image?",
    "Could you provide a detailed description of what is shown in the picture?", "What is depicted in the image?",
    "Describe the image in detail.", "What can you see in this image?", "Explain the content of this image.",
    "Give a description of this medical image.", "What does this image show?", "Summarize the visual content.",
]
MULTI_IMAGE_QUESTIONS = ["Please describe these pictures.", "What is depicted in these images?",
                         "Describe the images in detail.", "What do these images show?"]
SCENARIOS = [  # the question-answer styles of the paper's scenario prompts (App. D; paraphrased, one line each)
    "Standard Q&A: a clear question about the image and a precise answer.",
    "A doctor asks a colleague about the image; the colleague answers professionally.",
    "A senior doctor quizzes an intern about the image; the intern answers.",
    "An evaluator tests an AI assistant's understanding of the image; the assistant answers.",
    "A patient's family member asks about the image; the doctor answers in plain words.",
    "An intern asks a specialist to explain the image; the specialist teaches.",
    "A medical teacher asks a student about the image; the student answers.",
]
REFORMAT_PROMPT = (
    "You are shown medical image(s) and their context in <reference></reference>. Using the image(s) and the "
    "reference, but never mentioning the reference, reply with JSON only: {{\"Image_description\": a detailed "
    "description, \"QA-query\": a question about the image, \"QA-answer\": its answer}}. Scenario: {scenario}\n"
    "<reference>{context}</reference>")


def load_lexicon(path: str) -> list[str]:
    terms = [t.strip().lower() for t in Path(path).read_text(encoding="utf-8").splitlines()]
    return sorted({t for t in terms if t and not t.startswith("#")})


def count_medical_terms(text: str, lexicon: list[str]) -> int:
    """Distinct lexicon terms occurring in the text as whole words (case-insensitive; multi-word terms allowed)."""
    low = " " + re.sub(r"[^\w\u4e00-\u9fff-]+", " ", text.lower()) + " "
    return sum(1 for t in lexicon if f" {t} " in low)


def ngram_embeddings(texts: list[str], dim: int = 4096) -> np.ndarray:
    """Offline caption embedding for deduplication: hashed character 3-gram counts, L2-normalised. (The paper uses
    all-mpnet-base-v2; any sentence encoder slots in here. Near-duplicate captions share most 3-grams.)"""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        t = " ".join(t.lower().split())
        for j in range(max(1, len(t) - 2)):
            h = int.from_bytes(hashlib.blake2b(t[j:j + 3].encode(), digest_size=4).digest(), "little")
            out[i, h % dim] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def dedup(texts: list[str], threshold: float, block: int = 4096) -> list[int]:
    """Indices to keep: greedy in input order; a text is dropped when its cosine similarity to an already kept one is
    >= threshold (the paper: dot product of sentence embeddings above a cut)."""
    emb = ngram_embeddings(texts)
    kept: list[int] = []
    kept_emb = np.zeros((0, emb.shape[1]), dtype=np.float32)
    for start in range(0, len(texts), block):
        chunk = emb[start:start + block]
        for j, e in enumerate(chunk):
            if kept_emb.shape[0] and float((kept_emb @ e).max()) >= threshold:
                continue
            kept.append(start + j)
            kept_emb = np.vstack([kept_emb, e[None]])
    return kept


def filter_sources(records, lexicon, min_terms: int, min_side: int, folder: Path, dedup_threshold: float, stats: dict):
    """The three PubMedVision filters; `stats` counts what each removed."""
    kept = []
    for where, rec in records:
        caption = rec.get("caption") or rec.get("report") or ""
        images = lm.record_images(rec, where)
        if not caption or not images:
            stats["no caption or image"] = stats.get("no caption or image", 0) + 1
            continue
        if count_medical_terms(caption + " " + rec.get("context", ""), lexicon) < min_terms:
            stats["too few medical terms"] = stats.get("too few medical terms", 0) + 1
            continue
        sizes = [lm.load_image(lm.resolve_image(folder, p, where)).size for p in images]
        if min(min(s) for s in sizes) < min_side:
            stats["image too small"] = stats.get("image too small", 0) + 1
            continue
        kept.append((where, rec, caption))
    keep = dedup([c for _, _, c in kept], dedup_threshold)
    stats["near-duplicate caption"] = len(kept) - len(keep)
    return [kept[i] for i in keep]


def parse_reformat(text: str) -> dict | None:
    """The first {...} in the generation, as JSON with the three non-empty string fields; else None (malformed)."""
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    keys = ("Image_description", "QA-query", "QA-answer")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in keys):
        return None
    return {k: obj[k].strip() for k in keys}


def build_pubmedvision(sources, folder: Path, generate_fn, seed: int, stats: dict) -> tuple[list[dict], list[dict]]:
    """Unblinded reformatting. generate_fn(list of (image paths, prompt)) -> list of texts. Returns the
    Alignment-VQA and Instruction-VQA records in PubMedVision's release format (image list, modality, body_part)."""
    rng = random.Random(seed)
    jobs = []
    for where, rec, caption in sources:
        images = [str(lm.resolve_image(folder, p, where)) for p in lm.record_images(rec, where)]
        context = caption + (("\n" + rec["context"]) if rec.get("context") else "")
        jobs.append((rec, images, REFORMAT_PROMPT.format(scenario=rng.choice(SCENARIOS), context=context)))
    texts = generate_fn([(j[1], j[2]) for j in jobs])
    alignment, instruction = [], []
    for (rec, images, _), text in zip(jobs, texts):
        parsed = parse_reformat(text)
        if parsed is None:
            stats["malformed generation"] = stats.get("malformed generation", 0) + 1
            continue
        q = rng.choice(MULTI_IMAGE_QUESTIONS if len(images) > 1 else ALIGNMENT_QUESTIONS)
        meta = {"image": images, "modality": rec.get("modality", ""),
                "body_part": rec.get("body_part", "")}
        alignment.append({"id": f"Alignment_VQA_{len(alignment)}", **meta, "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": parsed["Image_description"]}]})
        instruction.append({"id": f"Instruction_VQA_{len(instruction)}", **meta, "conversations": [
            {"from": "human", "value": parsed["QA-query"]}, {"from": "gpt", "value": parsed["QA-answer"]}]})
    return alignment, instruction


def vlm_generate_fn(model, tokenizer, max_new_tokens: int, batch_size: int = 8):
    cfg = model.config

    def run(jobs):
        outs = []
        for s in tqdm(range(0, len(jobs), batch_size), desc="reformat", leave=False):
            prompts, pix = [], []
            for images, prompt in jobs[s:s + batch_size]:
                turns = lm.place_image_markers([("user", prompt)], len(images))
                prompts.append(lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id))
                pix += [lm.preprocess_image(lm.load_image(p), cfg.image_size, cfg.image_mean, cfg.image_std) for p in images]
            outs += lm.generate(model, tokenizer, prompts, torch.stack(pix), max_new_tokens=max_new_tokens, sync=False)
        return outs

    return run


def toy_sft_records(path: Path) -> tuple[list[dict], list[dict]]:
    """The toy stand-ins for LLaVA-558K (captions) and LLaVA-mix (conversations + multiple choice, whose letter
    format LLaVA-1.5's mix also teaches via A-OKVQA), in the LLaVA conversation format."""
    records = [r for _, r in lm.read_records(path)]
    align, instruct = [], []
    for r in records:
        align.append({"id": r["id"] + "_cap", "image": r["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + ALIGNMENT_QUESTIONS[len(align) % len(ALIGNMENT_QUESTIONS)]},
            {"from": "gpt", "value": r["report"]}]})
        instruct.append({"id": r["id"], "image": r["image"], "conversations": r["conversations"]})
        for k, mc in enumerate(r.get("mc", [])):
            instruct.append({"id": f"{r['id']}_mc{k}", "image": r["image"], "conversations": [
                {"from": "human", "value": "<image>\n" + mc_prompt(mc["question"], mc["options"])},
                {"from": "gpt", "value": mc["answer_label"]}]})
    return align, instruct


# ----------------------------------------------------------------------------------------------------------
# 2. SFT data and loss
# ----------------------------------------------------------------------------------------------------------


class SFTData:
    """Tokenised LLaVA-format records (single or multi image). Bad records raise DataError naming file and record,
    or are counted with skip_bad."""

    def __init__(self, records, tokenizer, cfg, max_length: int, skip_bad: bool):
        self.cfg, self.items, self.skipped = cfg, [], {}
        for where, rec, folder in records:
            try:
                images = lm.record_images(rec, where)
                paths = [lm.resolve_image(folder, p, where, allow_outside=Path(p).is_absolute()) for p in images]
                turns = lm.place_image_markers(lm.record_turns(rec, where), len(images), where)
                s = lm.tokenize_conversation(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id,
                                             max_length, where)
                for p in paths:
                    if not p.exists():
                        raise lm.DataError(f"{where}: image not found: {p}")
                self.items.append({**s, "images": paths})
            except lm.DataError as e:
                if not skip_bad:
                    raise
                reason = str(e)[len(where) + 2:].split(" (")[0][:60] if str(e).startswith(where) else str(e)[:60]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if not self.items:
            raise lm.DataError(f"no usable training record (skipped: {self.skipped})")

    def __len__(self):
        return len(self.items)

    def batch(self, idx: list[int], pad_id: int) -> dict:
        cfg = self.cfg
        items = [self.items[i] for i in idx]
        b = lm.collate(items, pad_id)
        pix = [lm.preprocess_image(lm.load_image(p), cfg.image_size, cfg.image_mean, cfg.image_std,
                                   pad=cfg.image_aspect_ratio == "pad") for it in items for p in it["images"]]
        b["pixel_values"] = torch.stack(pix) if pix else None
        return b


def sft_loss_sum(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over answer tokens, and their count. The step divides the sum by the number of
    answer tokens in the whole global batch (all ranks, all micro-batches), so every answer token weighs the same
    whatever the batch split (a per-micro-batch mean would over-weight short answers; LLaVA averages per micro-batch)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = targets != lm.IGNORE_INDEX
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                   logits_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets[mask[:, :-1]], reduction="sum")
    return loss, mask.sum()


# ----------------------------------------------------------------------------------------------------------
# 3. Training loop (one stage)
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: LORA_TARGETS
LORA_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# Copied from dpo.py: add_lora
def add_lora(model, r: int, alpha: int, dropout: float):
    """LoRA (peft) on every linear layer of the language model's decoder (attention + MLP), nothing in the vision
    tower, projector or lm_head (MMed-RAG / MMedPO / STLLaVA-Med: all LM linear layers)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(config, model)
    model.lora_config = config
    return model


# Copied from dpo.py: shard
def shard(model, device, activation_checkpointing: bool = False, compile: bool = False):
    """FSDP2: one unit per decoder layer, one for the vision tower, one for the projector, and the root
    (embeddings, norm, lm_head). bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU.
    compile: torch.compile each decoder layer in place before wrapping it (per-layer, as torchtune does: one
    graph reused by every layer, FSDP's hooks stay outside the compiled region)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the projector unit returns a view (a reshaped matmul); we never modify it in place, so FSDP2's warning is noise
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mp_policy": mp} if mp else {}
    if activation_checkpointing:  # transformers 5.24 renamed gradient_checkpointing_enable (kept until v6)
        lm_ = model.language_model
        if hasattr(lm_, "activation_checkpointing_enable"):
            lm_.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.language_model.model.layers:
        if compile:
            layer.compile()
        fully_shard(layer, **kw)
    fully_shard(model.vision_tower, **kw)
    fully_shard(model.projector, **kw)  # its own unit: images are projected once per step, outside the root forward
    fully_shard(model, **kw)
    with torch.no_grad():  # FSDP2 initialises on the first *root* forward; the step calls the tower before it
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    model.reshard()  # a forward without backward leaves the root gathered; training must start from the shards
    return model


# Copied from dpo.py: full_tensor
def full_tensor(t):
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# Copied from dpo.py: file_sha256
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Copied from dpo.py: save_checkpoint
def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict, rank: int):
    """out/checkpoints/step_XXXXXXX/: trainable.safetensors, optimizer.safetensors, rng_rank{r}.safetensors,
    state.json (written last). Built under a temporary name and renamed, so a crash never leaves a half checkpoint."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    weights = {n: full_tensor(params[n].detach()).cpu() for n in names}
    for n, t in weights.items():
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"refusing to checkpoint non-finite weights ({n})")
    optim = {}
    for n in names:
        for k, v in optimizer.state.get(params[n], {}).items():
            optim[f"{n}::{k}"] = full_tensor(v).cpu().reshape(-1) if v.dim() == 0 else full_tensor(v).cpu()
    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = out / "checkpoints" / f".tmp_step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng_rank{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
        save_file({n: t.contiguous() for n, t in optim.items()}, str(tmp / "optimizer.safetensors"))
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                 "files": files, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


# Copied from dpo.py: latest_checkpoint
def latest_checkpoint(out: Path):
    """The newest checkpoint whose state.json exists and whose files match the checksums it lists; a damaged one
    is reported and skipped (the one before it is used)."""
    for p in sorted((out / "checkpoints").glob("step_*"), reverse=True):
        try:
            files = json.loads((p / "state.json").read_text())["files"]
            bad = [name for name, sha in files.items() if file_sha256(p / name) != sha]
        except (OSError, ValueError, KeyError) as e:
            bad = [f"state.json ({type(e).__name__})"]
        if not bad:
            return p
        print(f"warning: checkpoint {p} is damaged ({', '.join(bad)}); trying an older one", file=sys.stderr)
    return None


# Copied from dpo.py: load_checkpoint
def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore what save_checkpoint wrote into the (sharded) model and optimizer; returns state.json."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = json.loads((path / "state.json").read_text())
    weights, optim = load_file(str(path / "trainable.safetensors")), load_file(str(path / "optimizer.safetensors"))
    params = dict(model.named_parameters())

    def place(full, like):
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
        return full.to(device=like.device, dtype=like.dtype)

    with torch.no_grad():
        for n, t in weights.items():
            p = params[n]
            (p.to_local() if isinstance(p, DTensor) else p).copy_(
                (place(t, p).to_local() if isinstance(p, DTensor) else place(t, p)))
    for key, t in optim.items():
        n, k = key.split("::")
        p = params[n]
        optimizer.state[p][k] = t.reshape(()).clone() if k == "step" else place(t, p)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # LambdaLR restores its counter, not the lr
        group["lr"] = lr
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


# Copied from dpo.py: cosine_schedule
def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Copied from dpo.py: global_batches
def global_batches(n: int, batch_size: int, epoch: int, seed: int):
    """The shuffled order of one epoch (seeded by epoch: the same on every rank), cut into global batches; the
    last partial batch is dropped so every step has the same size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


# Copied from dpo.py: my_micro_batches
def my_micro_batches(batch: list[int], micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of a global batch, in micro-batches: chunk k of size `micro` goes to rank k % world."""
    chunks = [batch[i:i + micro] for i in range(0, len(batch), micro)]
    return chunks[rank::world]


# Copied from dpo.py: to_device
def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_stage(args: Args, stage: int, model, tokenizer, data: SFTData, device, rank: int, world: int, log) -> None:
    """One SFT stage with FSDP2. Stage 1: projector only. Stage 2: LLM + projector (full) or LoRA + projector."""
    out = Path(args.out) / f"stage{stage}"
    lr = args.lr1 if stage == 1 else args.lr2
    epochs = args.epochs1 if stage == 1 else args.epochs2
    steps_per_epoch = len(data) // args.batch_size
    total = max(1, int(steps_per_epoch * epochs))
    if steps_per_epoch == 0:
        raise ValueError(f"stage {stage}: {len(data)} samples is less than one global batch ({args.batch_size})")
    if args.batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of {args.micro_batch_size} x {world} ranks")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step = 0
    resume_from = latest_checkpoint(out) if args.resume else None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, rank)["step"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}", disable=rank != 0)
    t0, seen = time.time(), 0.0
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        batch_idx = global_batches(len(data), args.batch_size, epoch, args.seed + stage)[k]
        micro = my_micro_batches(batch_idx, args.micro_batch_size, rank, world)
        # answer tokens of the whole global batch: every rank knows its micro-batches; one all-reduce sums them
        n_tokens = torch.tensor(float(sum(sum(l != lm.IGNORE_INDEX for l in data.items[i]["labels"][1:])
                                          for mb in micro for i in mb)))
        dist.all_reduce(n_tokens)
        model.train()
        loss_sum = torch.zeros(())
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)
            batch = to_device(data.batch(idx, tokenizer.pad_token_id), device)
            loss, _ = sft_loss_sum(model, batch)
            (loss * world / n_tokens.item()).backward()  # FSDP averages over ranks: x world makes it a global mean
            loss_sum += loss.detach().float().cpu()
        dist.all_reduce(loss_sum)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
        if not torch.isfinite(grad_norm) or not torch.isfinite(loss_sum):
            raise FloatingPointError(f"stage {stage}: non-finite loss or gradient at step {step + 1}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += n_tokens.item()
        row = {"phase": f"stage{stage}", "step": step, "loss": loss_sum.item() / n_tokens.item(),
               "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
               "answer_tokens_per_s": seen / (time.time() - t0)}
        log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(out, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)
    bar.close()
    save_checkpoint(out, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)


# Copied from dpo.py: merged_copy
def merged_copy(model, state: dict):
    """A plain LlavaMed holding W + (alpha/r) * B @ A for every LoRA layer (in W's dtype), built from gathered
    tensors; parameters are assigned, not initialised first (a 7B model is not built twice)."""
    cfg = model.config
    with lm._params_on_meta():
        plain = lm.LlavaMed(cfg)
    base = {}
    for n, t in state.items():
        if "lora_" in n:
            continue
        base[n.replace(".base_layer.", ".")] = t
    lcfg = getattr(model, "lora_config", None)
    if lcfg is not None:
        scale = lcfg.lora_alpha / lcfg.r
        for n, t in state.items():
            if n.endswith("lora_A.default.weight"):
                prefix = n[: -len(".lora_A.default.weight")]
                B = state[prefix + ".lora_B.default.weight"]
                W = base[prefix + ".weight"]
                base[prefix + ".weight"] = (W.float() + scale * (B.float() @ t.float())).to(W.dtype)
    plain.load_state_dict(base, strict=True, assign=True)
    return plain


# ----------------------------------------------------------------------------------------------------------
# 4. Multiple-choice evaluation
# ----------------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMN"


def mc_prompt(question: str, options: list[str]) -> str:
    """HuatuoGPT-Vision's (LLaVA's) multiple-choice template (paper App. E)."""
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


def match_choice(text: str, options: dict[str, str] | list[str], scoring: str = "ours") -> str:
    """The answer letter of a free-text reply. options: {letter: text}, or a list (letters A, B, C... in order).
    Both modes follow HuatuoGPT-Vision's match_choice3 (scorer.py) in three steps: (1) the first standalone letter
    a-n / A-N after a cue ('is ', '是', '为', '(', start, quotes, '*', '#', any non-word character; 'a '/'A '
    is taken for an article); (2) else the option whose text occurs last in the reply (case-insensitive);
    (3) else the option most similar to the reply (difflib ratio).
    scoring="ours" (default): the letter is upper-cased ("b" counts as B) and a letter that names no option is
    skipped ("I think it is C" -> C, "Option E" of four goes on to the text); in (2) the option that ends last
    wins, the longer on a tie ("abnormal" -> Abnormal, not Normal; "lung cancer" -> lung cancer, not lung); an
    empty option text never matches; (3) ties go to the first option.
    scoring="huatuo": match_choice3 exactly, quirks included (tests/fixtures/huatuo_match_choice.json holds the
    released function's outputs): the letter is returned as found, so "b" (never equal to the label "B") and
    "I"/"E"/"N" that name no option are answers; in (2) the start of the last occurrence decides, ties go to the
    first option ("abnormal" -> Normal), and an empty option text always matches (at the end of the reply);
    in (3) ties go to the last option, so an empty reply picks the last one; "选B" is no letter ('选' is a word
    character) and falls through to (2)/(3). (The released test_mmlu passes the whole record as `options`, so
    there (2) and (3) raise on the record's list fields; here they use the options, as match_choice3 intends.)"""
    if scoring not in ("ours", "huatuo"):
        raise ValueError(f"mc scoring must be ours or huatuo, not {scoring!r}")
    if not isinstance(options, dict):
        options = {LETTERS[i]: o for i, o in enumerate(options)}
    cue = r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([a-nA-N])(\W|$)"  # scorer.py's pattern, character for character
    low = text.lower()
    if scoring == "huatuo":
        m = re.search(cue, text)
        if m:
            return m.group(2)
        found = [(low.rindex(o.lower()), k) for k, o in options.items() if o.lower() in low]
        if found:
            return max(found, key=lambda f: f[0])[1]  # max keeps the first of equal starts, as the stable sort does
        ratios = [difflib.SequenceMatcher(None, o.lower(), low).ratio() for o in options.values()]
        return list(options)[len(ratios) - 1 - ratios[::-1].index(max(ratios))]  # the last best (released: >=)
    for m in re.finditer(cue, text):
        if m.group(2).upper() in options:  # a letter that names no option ('I think') is not an answer
            return m.group(2).upper()
    found = [(low.rindex(o.lower()) + len(o), len(o), k) for k, o in options.items() if o and o.lower() in low]
    if found:
        return max(found, key=lambda f: f[:2])[2]
    return max(options, key=lambda k: difflib.SequenceMatcher(None, low, options[k].lower()).ratio())


def read_mc(path: str, image_folder: str = "") -> list[dict]:
    """Multiple-choice rows {"question","options","answer_label","dataset_name","images"} from the HuatuoGPT eval json
    (open questions skipped), or VQA-RAD / SLAKE closed questions turned into [yes, no] choices."""
    path = Path(path)
    rows = []
    for where, rec in lm.read_records(path):
        if "options" in rec:
            if rec.get("question_type") == "open":
                continue
            folder = Path(image_folder or path.parent)
            images = [str(folder / p) for p in lm.record_images(rec, where)]
            label = rec.get("answer_label") or LETTERS[rec["options"].index(rec["answer"])]
            rows.append({"question": rec["question"], "options": list(rec["options"]), "answer_label": label,
                         "dataset_name": rec.get("dataset_name", path.stem), "images": images})
        elif "image_name" in rec or "img_name" in rec:  # VQA-RAD / SLAKE: closed yes/no questions only
            answer = str(rec["answer"]).strip().lower()
            if rec.get("answer_type") != "CLOSED" or answer not in ("yes", "no") or rec.get("q_lang", "en") != "en":
                continue
            if "phrase_type" in rec and "qid_linked_id" in rec and not str(rec["phrase_type"]).startswith("test"):
                continue
            slake = "img_name" in rec
            folder = Path(image_folder or path.parent / ("imgs" if slake else "images"))
            rows.append({"question": rec["question"], "options": ["yes", "no"], "answer_label": "A" if answer == "yes" else "B",
                         "dataset_name": "SLAKE" if slake else "VQA-RAD",
                         "images": [str(folder / rec["img_name" if slake else "image_name"])]})
        else:
            raise lm.DataError(f"{where}: not a multiple-choice record (needs options, or VQA-RAD/SLAKE fields)")
    return rows


def evaluate_mc(model, tokenizer, rows, batch_size: int, rank: int, world: int, desc="eval",
                scoring: str = "ours") -> tuple[dict, list]:
    """Greedy answers (interleaved shares per rank, equal batch counts for sharded forwards), letter matching
    (match_choice with `scoring`: "ours" or HuatuoGPT-Vision's "huatuo"), accuracy per dataset and overall (the
    mean over questions, as the released score_mix_llava reports them)."""
    cfg = model.config
    model.eval()
    mine = list(range(rank, len(rows), world))
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    preds = {}
    for b in tqdm(range(n_batches), desc=desc, disable=rank != 0, leave=False):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real, chunk = len(chunk), chunk or [0]
        prompts, pix = [], []
        for i in chunk:
            r = rows[i]
            turns = lm.place_image_markers([("user", mc_prompt(r["question"], r["options"]))], len(r["images"]))
            prompts.append(lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id))
            pix += [lm.preprocess_image(lm.load_image(p), cfg.image_size, cfg.image_mean, cfg.image_std,
                                        pad=cfg.image_aspect_ratio == "pad") for p in r["images"]]
        answers = lm.generate(model, tokenizer, prompts, torch.stack(pix) if pix else None, max_new_tokens=8)
        preds.update(dict(zip(chunk[:real], answers[:real])))
    model.reshard()  # forwards without backward leave the FSDP root gathered; training must see the shards
    gathered = [None] * world
    dist.all_gather_object(gathered, preds)
    merged = {i: a for part in gathered for i, a in part.items()}
    results, per = [], {}
    for i, r in enumerate(rows):
        letter = match_choice(merged[i], r["options"], scoring)
        ok = letter == r["answer_label"]
        results.append({**r, "prediction": merged[i], "matched": letter, "correct": ok})
        per.setdefault(r["dataset_name"], []).append(ok)
    scores = {name: sum(v) / len(v) for name, v in sorted(per.items())}
    scores["overall"] = sum(r["correct"] for r in results) / max(1, len(results))
    scores["n"] = len(results)
    return scores, results


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def set_trainable(model, stage: int, lora: bool):
    """Stage 1: projector only. Stage 2: projector + LLM (full), or projector + LoRA adapters. Trained parameters
    are kept in fp32 (AdamW master weights); the rest stay as loaded (bf16 on GPU). Call before sharding."""
    for n, p in model.named_parameters():
        train = n.startswith("projector.") or (stage == 2 and (("lora_" in n) if lora else n.startswith("language_model.")))
        p.requires_grad_(train)
        if train:
            p.data = p.data.float()


def main(argv=None):
    args = parse_args(Args, argv)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    master = rank == 0
    out = Path(args.out)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    tiny = args.model == "tiny"
    args.lr2 = args.lr2 if args.lr2 > 0 else (1e-3 if tiny else 2e-5)
    args.epochs2 = args.epochs2 if args.epochs2 > 0 else (30.0 if tiny else 1.0)
    toy_source = Path(args.source).resolve().parent == (lm.REPO / "data" / "toy")
    min_side = args.min_image_side if args.min_image_side >= 0 else (32 if toy_source else 336)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))

    def log(row):
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    torch.manual_seed(args.seed)
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed,
                               attn_implementation=args.attn_implementation)
    results = {}

    # ---- 1. build PubMedVision-style records (every rank builds the same, deterministic set; rank 0 writes it)
    built = {"alignment": [], "instruction": []}
    if "build" in stages:
        stats = {}
        src_folder = Path(args.source_image_folder or Path(args.source).parent)
        sources = filter_sources(lm.read_records(args.source), load_lexicon(args.lexicon), args.min_medical_terms,
                                 min_side, src_folder, args.dedup_threshold, stats)
        reformatter, rtok = (model, tokenizer) if args.reformat_model == args.model else lm.load(args.reformat_model, device=device)
        mine = sources[rank::world]
        align, instruct = build_pubmedvision(mine, src_folder, vlm_generate_fn(reformatter.eval(), rtok,
                                                                               args.reformat_max_new_tokens), args.seed + rank, stats)
        parts = [None] * world
        dist.all_gather_object(parts, (align, instruct, stats))
        built["alignment"] = [r for p in parts for r in p[0]]
        built["instruction"] = [r for p in parts for r in p[1]]
        totals = {}
        for p in parts:
            for k, v in p[2].items():
                totals[k] = totals.get(k, 0) + v
        results["build"] = {"sources": len(lm.read_records(args.source)), "after_filters": len(sources),
                            "alignment_vqa": len(built["alignment"]), "instruction_vqa": len(built["instruction"]),
                            "removed": totals}
        if master:
            for name, recs in built.items():
                (out / f"pubmedvision_{name}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False))
            print("data building:", json.dumps(results["build"]))
        if reformatter is not model:
            del reformatter

    # ---- training data: toy stand-ins (or --train-data files) + the built records
    if args.train_data:
        extra = []
        for f in args.train_data.split(","):
            folder = Path(args.image_folder or Path(f).parent)
            extra += [(w, r, folder) for w, r in lm.read_records(f)]
        stage_records = {1: extra, 2: extra}
    else:
        align, instruct = toy_sft_records(Path("data/toy/train.json"))
        toy_folder = Path("data/toy")
        stage_records = {1: [(f"toy captions[{i}]", r, toy_folder) for i, r in enumerate(align)],
                         2: [(f"toy instructions[{i}]", r, toy_folder) for i, r in enumerate(instruct)]}
    stage_records[1] += [(f"built alignment[{i}]", r, Path("/")) for i, r in enumerate(built["alignment"])]
    stage_records[2] += [(f"built instruction[{i}]", r, Path("/")) for i, r in enumerate(built["instruction"])]

    eval_rows = []
    if "eval" in stages:
        eval_rows = read_mc(args.eval_data, args.eval_image_folder)[: args.eval_limit or None]

    # ---- 2. the two stages. Each stage shards its own copy of the weights: FSDP2 fixes which parameters need
    # gradients when it initialises, so the stage-2 trainables cannot be switched on inside the stage-1 shards.
    train_stages = [s for s in (1, 2) if str(s) in stages]
    for k, stage in enumerate(train_stages or [None]):
        if stage == 2 and args.lora:
            add_lora(model, 128, 256, 0.05)
        set_trainable(model, stage or 1, args.lora)
        shard(model, device, args.activation_checkpointing, args.compile)
        if k == 0 and eval_rows and args.eval_before:
            results["before"], _ = evaluate_mc(model, tokenizer, eval_rows, args.eval_batch_size, rank, world,
                                               "eval before", args.mc_scoring)
            log({"phase": "eval_before", **results["before"]})
            if master:
                print("before:", json.dumps(results["before"]))
        if stage is None:  # evaluation only
            break
        data = SFTData(stage_records[stage], tokenizer, model.config, args.max_length, args.skip_bad_samples)
        if master:
            print(f"stage {stage}: {len(data)} samples" + (f", skipped {data.skipped}" if data.skipped else ""))
        train_stage(args, stage, model, tokenizer, data, device, rank, world, log)
        if eval_rows:
            results[f"after_stage{stage}"], preds = evaluate_mc(model, tokenizer, eval_rows, args.eval_batch_size,
                                                                rank, world, f"eval stage {stage}", args.mc_scoring)
            log({"phase": f"eval_stage{stage}", **results[f"after_stage{stage}"]})
            if master:
                print(f"after stage {stage}:", json.dumps(results[f"after_stage{stage}"]))
                (out / f"predictions_stage{stage}.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))
        # the stage's weights (LoRA merged), unsharded, in the loading dtype: the next stage's start and the export
        state = {n: full_tensor(p.detach()).cpu() for n, p in model.state_dict().items()}  # every rank gathers
        frozen_dtype = next(p for n, p in model.named_parameters() if n.startswith("vision_tower.")).dtype
        model = merged_copy(model, state).to(device=device, dtype=frozen_dtype)
        if stage == train_stages[-1] and master:
            lm.save_llava_hf(model, tokenizer, out / "llava_hf")
    if master:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except lm.DataError as e:
        print(f"huatuo_vision.py: bad data: {e}\n(--skip-bad-samples counts and skips such records)", file=sys.stderr)
        sys.exit(2)
