"""dpo.py -- Direct Preference Optimization for LLaVA-style medical VLMs (the reference preference recipe).

    # embedded default: tiny random LLaVA, toy preference pairs derived from data/toy, CPU, a few minutes
    python dpo.py
    # the same on 2 CPU processes (gloo) or 8 GPUs (nccl, bf16): same global batch, same result
    torchrun --nproc-per-node=2 dpo.py
    torchrun --nproc-per-node=8 dpo.py --model /ckpt/llava-med-v1.5-mistral-7b --data prefs.json \\
        --image-folder /data/images --eval-data /data/vqa_rad/testset.json --eval-image-folder /data/vqa_rad/images \\
        --lr 1e-7 --epochs 3 --batch-size 4 --micro-batch-size 1 --max-length 1024 --activation-checkpointing
    # several machines: the same command with torchrun's rendezvous (see README)

The algorithm (Rafailov et al. 2023, eq. 7), for a pair (x_w, y_w) preferred over (x_l, y_l):

    L = -log sigma( beta * [ (log pi(y_w|x_w) - log ref(y_w|x_w)) - (log pi(y_l|x_l) - log ref(y_l|x_l)) ] )

with log pi(y|x) the SUM of the answer tokens' log-probs (prompt and image tokens excluded), the policy pi a LoRA on
the language model (or the full model), and the reference the same weights with the adapters switched off (or a
frozen copy). x_l may carry a different image (MMed-RAG's noise image, MMedPO's lesion-noised image).

Preference records (json list or jsonl), image paths relative to --image-folder:
    {"id", "image", "conversations": [human, gpt=chosen], "rejected_conversations": [human, gpt=rejected],
     "rejected_image"?: str, "rejected_noised"?: bool}                    # MMed-RAG / MMedPO release format
    {"id", "image", "chosen_conversations": [...], "reject_conversations": [...]}   # STLLaVA-Med format
Tensor layout of one micro-batch: rows [chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}] (TRL's order), right
padded; every distinct image is encoded once per step and its features reused by the rows (and the reference).

File layout: Args -> data prep -> loss -> model setup -> training loop -> evaluation -> main().
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data
    data: str = "data/toy"  # preference json/jsonl, or a toy-format folder (pairs are derived from its train.json)
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    eval_data: str = ""  # VQA set: toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json ("" = toy test when --data is toy)
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it: images/ (VQA-RAD), imgs/ (SLAKE), or its folder)
    max_length: int = 512  # tokens per sequence, image tokens included; truncation never cuts image tokens
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths that leave --image-folder
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf, HuatuoGPT-Vision)
    template: str = ""  # chat template override ("" = the checkpoint's: mistral_instruct, vicuna_v1, huatuo, chatml)
    dtype: str = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are always fp32
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 128  # LoRA rank (MMed-RAG / MMedPO / STLLaVA-Med: 128)
    lora_alpha: int = 256  # LoRA alpha (256)
    lora_dropout: float = 0.05  # LoRA dropout (0.05)
    tune_projector: bool = False  # also train the mm projector (MMed-RAG's code is ambiguous; spec A8: a flag)
    # loss
    beta: float = 0.1  # DPO temperature (TRL default; no method script overrides it)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo" (Azar et al. 2023, length-normalised)
    label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels (sigmoid only)
    reference_free: bool = False  # reference log-probs = 0
    precompute_ref: bool = False  # compute reference log-probs once before training, cached on disk
    # optimisation
    lr: float = 1e-5  # peak learning rate (toy default; MMed-RAG/MMedPO use 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # learning rate of the projector when --tune-projector (mm_projector_lr)
    batch_size: int = 16  # pairs per optimizer step over all ranks (global; does not depend on the number of ranks)
    micro_batch_size: int = 8  # pairs per forward on one rank; accumulation = batch / (micro * ranks)
    epochs: int = 1  # passes over the preference pairs
    max_steps: int = -1  # stop after this many optimizer steps (-1 = epochs decide)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient (any rank): "stop" the run, or "skip" the update (counted)
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    attn_implementation: str = "sdpa"  # transformers attention kernel: sdpa (flash/mem-efficient on GPU), flash_attention_2, eager
    compile: bool = False  # torch.compile each decoder layer (GPU: faster steps after a one-off compile)
    sft_warmup_steps: int = -1  # SFT steps on chosen answers before DPO; -1 = 1000 for --model tiny (random), else 0
    sft_lr: float = 1e-3  # learning rate of that warm-up (full model, projector included)
    seed: int = 0  # same seed + same data = same run (bit-identical on CPU; on GPU see README)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # output
    out: str = "runs/dpo"  # checkpoints, metrics.jsonl, adapter/, eval json
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    resume: bool = True  # continue from the newest complete checkpoint in --out
    export_merged: bool = False  # also write the merged model as a llava-hf checkpoint (vLLM / transformers)
    # evaluation
    eval: bool = True  # evaluate at the end (VQA generation + held-out pair rewards)
    eval_before: bool = True  # also evaluate the starting model, for the before/after table
    eval_limit: int = 0  # evaluate on the first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # answer length cap (VQA answers are short)
    closed_scoring: str = "strict"  # strict (ours); llava_med|llava_med_batch add run_eval(_batch).py's numbers


def parse_args(cls, argv=None):
    """argparse generated from the Args dataclass: --field-name value; booleans take --flag / --no-flag."""
    p = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n\n")[0])
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(name, type=typ, default=f.default)
    return cls(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------
# Distributed setup: the same file runs as one process or under torchrun (gloo on CPU, nccl on GPU)
# ----------------------------------------------------------------------------------------------------------


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------------------
# Data prep: preference pairs -> token ids, labels and images
# ----------------------------------------------------------------------------------------------------------

WRONG_ANSWERS = {  # toy data: a wrong answer of the same kind for each gold answer (rejected side of a pair)
    "yes": "no", "no": "yes",
}


def toy_preference_pairs(records: list[tuple[str, dict]], seed: int) -> list[dict]:
    """Derive DPO pairs from the toy set: for every question, chosen = the gold answer, rejected = a wrong answer of
    the same kind (yes<->no, another location / modality / finding of the same split)."""
    rng = random.Random(seed)
    pool = {}  # question template -> all gold answers seen for it
    for _, rec in records:
        for qa in rec["qa"]:
            pool.setdefault(_question_kind(qa["question"]), set()).add(qa["answer"])
    pairs = []
    for where, rec in records:
        for k, qa in enumerate(rec["qa"]):
            gold = qa["answer"]
            wrong = WRONG_ANSWERS.get(gold) or rng.choice(sorted(pool[_question_kind(qa["question"])] - {gold} or {"none"}))
            human = {"from": "human", "value": "<image>\n" + qa["question"]}
            pairs.append({"id": f"{rec['id']}_q{k}", "image": rec["image"], "answer_type": qa["answer_type"],
                          "conversations": [human, {"from": "gpt", "value": gold}],
                          "rejected_conversations": [human, {"from": "gpt", "value": wrong}]})
    return pairs


def _question_kind(q: str) -> str:
    return " ".join(w for w in q.lower().split() if w.isalpha() and w not in ("a", "an", "the"))[:24]


def load_preferences(args: Args, split: str = "train", skipped: dict | None = None):
    """[(where, record)] and the image folder. A toy-format folder gives derived pairs for `split`. Unreadable
    jsonl lines are counted in `skipped` (when given) instead of raising."""
    path = Path(args.data)
    if path.is_dir():
        recs = lm.read_records(path / f"{split}.json")
        pairs = toy_preference_pairs(recs, seed=0)
        return [(f"{path / f'{split}.json'} pair {p['id']}", p) for p in pairs], Path(args.image_folder or path)
    return lm.read_records(path, skipped), Path(args.image_folder or path.parent)


def pair_turns(rec: dict, where: str):
    """(chosen turns, rejected turns) from either preference format."""
    if "chosen_conversations" in rec:  # STLLaVA-Med
        return lm.record_turns(rec, where, "chosen_conversations"), lm.record_turns(rec, where, "reject_conversations")
    return lm.record_turns(rec, where, "conversations"), lm.record_turns(rec, where, "rejected_conversations")


class PairData:
    """Tokenises every pair once (small data; for millions of pairs make this lazy). Bad records raise DataError,
    or, with skip_bad, are counted per reason and reported."""

    def __init__(self, records, image_folder: Path, tokenizer, cfg: lm.LlavaMedConfig, max_length: int, skip_bad: bool,
                 allow_outside: bool = False, skipped: dict | None = None):
        self.image_folder, self.cfg, self.items = image_folder, cfg, []
        self.skipped, self.examples = dict(skipped or {}), []  # reason -> count; the first messages, for the log
        self.allow_outside, self._opened = allow_outside, set()
        for where, rec in records:
            try:
                self.items.append(self._tokenize(where, rec, tokenizer, max_length))
            except lm.DataError as e:
                if not skip_bad:
                    raise
                msg = str(e)[len(where) + 2:] if str(e).startswith(where) else str(e)
                reason = re.sub(r"\S*/\S*|\S+\.(png|jpe?g|gif|bmp|tiff?)\b", "<path>", msg).split(" (")[0][:70]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                if len(self.examples) < 5:
                    self.examples.append(str(e))
        if not self.items:
            raise lm.DataError(f"no usable preference pair (skipped: {self.skipped})")

    def _tokenize(self, where, rec, tokenizer, max_length):
        images = lm.record_images(rec, where)
        chosen_turns, rejected_turns = pair_turns(rec, where)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise lm.DataError(f"{where}: chosen and rejected prompts differ; DPO compares answers to one prompt")
        rejected_images = lm.record_images({"image": rec["rejected_image"]}, where) if rec.get("rejected_image") else images
        if rec.get("rejected_noised"):
            rejected_images = ["noise:" + p for p in images]  # MMed-RAG cross-modality pairs: a noise image
        cfg = self.cfg
        tok = lambda turns, n: lm.tokenize_conversation(tokenizer, lm.place_image_markers(turns, n, where), cfg.template,
                                                        cfg.num_image_tokens, cfg.image_token_id, max_length, where)
        c, r = tok(chosen_turns, len(images)), tok(rejected_turns, len(rejected_images))
        for p in images + rejected_images:
            if p.startswith("noise:"):
                continue
            path = lm.resolve_image(self.image_folder, p, where, self.allow_outside)
            if not path.exists():
                raise lm.DataError(f"{where}: image not found: {path}")
            if path not in self._opened:  # fail now (or count the skip) rather than mid-training
                try:
                    lm.load_image(path)
                except lm.DataError as e:
                    raise lm.DataError(f"{where}: {e}") from None
                self._opened.add(path)
        return {"id": rec.get("id", where), "chosen": c, "rejected": r, "images": images,
                "rejected_images": rejected_images, "answer_type": rec.get("answer_type")}

    def __len__(self):
        return len(self.items)

    def pixel(self, key: str) -> torch.Tensor:
        cfg = self.cfg
        if key.startswith("noise:"):  # a fixed Gaussian-noise image per source image (deterministic)
            g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
            return torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
        return lm.preprocess_image(lm.load_image(lm.resolve_image(self.image_folder, key, key, self.allow_outside)), cfg.image_size, cfg.image_mean, cfg.image_std,
                                   pad=cfg.image_aspect_ratio == "pad")


def collate_pairs(data: PairData, idx: list[int], pad_id: int) -> dict:
    """Rows [chosen...; rejected...]; `pixel_values` holds each distinct image once and `row_images[i]` lists the
    indices of row i's images in it, so the vision tower runs once per image, not once per row."""
    items = [data.items[i] for i in idx]
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    row_keys = [it["images"] for it in items] + [it["rejected_images"] for it in items]
    distinct = list(dict.fromkeys(k for keys in row_keys for k in keys))
    batch = lm.collate(seqs, pad_id)
    batch["pixel_values"] = torch.stack([data.pixel(k) for k in distinct]) if distinct else None
    pos = {k: i for i, k in enumerate(distinct)}
    batch["row_images"] = torch.tensor([pos[k] for keys in row_keys for k in keys], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_len=None, rejected_len=None):
    """Per-pair losses and implicit rewards from summed sequence log-probs (all [B]).

    sigmoid (DPO, eq. 7):  -(1-e) log s(b*D) - e log s(-b*D),  D = (pc - rc) - (pr - rr),  e = label smoothing
                           (cDPO, Mitchell 2023; e = 0 is plain DPO = TRL 1.13 "sigmoid")
    ipo (Azar 2023 eq. 17): (D_len - 1/(2b))^2 with each log-ratio divided by its completion length (TRL "ipo")
    rewards: b * (pc - rc), b * (pr - rr), detached (TRL's rewards/chosen, rewards/rejected)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        d = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        d = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model, batch: dict, image_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the supervised tokens of each row, and their counts. Logits are formed only at the
    positions that predict a supervised token (the shift by one of every causal LM), in fp32."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = targets != lm.IGNORE_INDEX
    feats = image_features[batch["row_images"]] if image_features is not None else None
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], image_features=feats,
                   logits_mask=mask).logits.float()  # [n_supervised, V]
    token_logps = torch.gather(logits, -1, targets[mask[:, :-1]].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    rows = mask.nonzero()[:, 0]
    B = labels.shape[0]
    sums = torch.zeros(B, device=logits.device, dtype=torch.float32).index_add(0, rows, token_logps)
    counts = torch.zeros(B, device=logits.device, dtype=torch.float32).index_add(0, rows, torch.ones_like(token_logps))
    return sums, counts


# ----------------------------------------------------------------------------------------------------------
# Model setup: policy (LoRA or full), reference, FSDP2 sharding
# ----------------------------------------------------------------------------------------------------------


LORA_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def add_lora(model, r: int, alpha: int, dropout: float):
    """LoRA (peft) on every linear layer of the language model's decoder (attention + MLP), nothing in the vision
    tower, projector or lm_head (MMed-RAG / MMedPO / STLLaVA-Med: all LM linear layers)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(config, model)
    model.lora_config = config
    return model


class adapters_off:
    """Context: LoRA layers skip their adapters, so the model is the reference (what peft's disable_adapter does,
    without toggling requires_grad, which FSDP2 has already recorded)."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def __enter__(self):
        for m in self.layers:
            m._disable_adapters = True

    def __exit__(self, *exc):
        for m in self.layers:
            m._disable_adapters = False


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
    if activation_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def build_models(args: Args, model, device):
    """Policy (trainable parameters in fp32) and the reference: adapters off (LoRA) or a frozen copy (full)."""
    import copy

    model.requires_grad_(False)
    ref_model = None
    if args.full_finetune:
        ref_model = copy.deepcopy(model).eval()
        model.language_model.requires_grad_(True)
    else:
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    if args.tune_projector:
        model.projector.requires_grad_(True)
        if ref_model is None:  # adapters-off would otherwise use the *trained* projector as the reference's
            ref_model = copy.deepcopy(model.projector).requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, ref_model


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: trainable weights + optimizer + schedule + RNG + data position; atomic (write, then rename)
# ----------------------------------------------------------------------------------------------------------


def full_tensor(t):
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def global_batches(n: int, batch_size: int, epoch: int, seed: int):
    """The shuffled order of one epoch (seeded by epoch: the same on every rank), cut into global batches; the
    last partial batch is dropped so every step has the same size."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def my_micro_batches(batch: list[int], micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of a global batch, in micro-batches: chunk k of size `micro` goes to rank k % world."""
    chunks = [batch[i:i + micro] for i in range(0, len(batch), micro)]
    return chunks[rank::world]


def image_features_for(model, ref_model, pixel_values, device):
    """Encode each distinct image once; the projected features serve the policy and, when the projector is
    frozen, the reference too. Returns (policy features, reference features)."""
    if pixel_values is None:
        return None, None
    vis = model.vision_features(pixel_values.to(device))
    policy = model.projector(vis)
    if ref_model is None:
        return policy, policy.detach()
    ref_proj = ref_model.projector if hasattr(ref_model, "projector") else ref_model
    with torch.no_grad():
        return policy, ref_proj(vis)


def reference_logps(model, ref_model, batch, ref_feats):
    with torch.no_grad():
        if ref_model is not None and hasattr(ref_model, "language_model"):  # full fine-tuning: frozen copy
            return sequence_logps(ref_model, batch, ref_feats)
        with adapters_off(model):
            return sequence_logps(model, batch, ref_feats)


def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def precompute_reference(args, model, ref_model, data, tokenizer, device, rank, world, out: Path) -> torch.Tensor:
    """Reference log-probs [N, 2] for every pair, computed once (each rank a share, then gathered) and cached on
    disk under a key of model, data, template and length (TRL's precompute_ref_log_probs, here for images too)."""
    key = hashlib.sha256(json.dumps([args.model, args.data, args.max_length, model.config.template, args.seed,
                                     args.sft_warmup_steps, [it["id"] for it in data.items]]).encode()).hexdigest()[:16]
    cache = out / f"ref_logps_{key}.safetensors"
    if cache.exists():
        return load_file(str(cache))["ref"]
    table = torch.zeros(len(data), 2)
    idx = list(range(len(data)))
    mine = idx[rank::world]
    steps = math.ceil(len(idx) / world / args.micro_batch_size)
    for s in range(steps):  # every rank runs the same number of forwards (FSDP collectives)
        chunk = mine[s * args.micro_batch_size:(s + 1) * args.micro_batch_size] or mine[:1]
        batch = to_device(collate_pairs(data, chunk, tokenizer.pad_token_id), device)
        with torch.no_grad():
            _, ref_feats = image_features_for(model, ref_model, batch["pixel_values"], device)
            logps, _ = reference_logps(model, ref_model, batch, ref_feats)
        B = len(chunk)
        table[chunk, 0], table[chunk, 1] = logps[:B].cpu(), logps[B:].cpu()
    model.reshard()
    dist.all_reduce(table)  # each pair was filled by exactly one rank (duplicates from padding excluded below)
    counts = torch.zeros(len(data))
    counts[mine] = 1
    dist.all_reduce(counts)
    table = table / counts.clamp(min=1).unsqueeze(-1)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({"ref": table.contiguous()}, str(cache))
    return table


def dpo_step(args, model, ref_model, data, idx, tokenizer, device, world, ref_table=None):
    """Forward + backward of one micro-batch. The loss is scaled so the gradient, after FSDP's average over ranks
    and the sum over micro-batches, is the mean over the global batch: sum(losses) * world / batch_size."""
    batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id), device)
    feats, ref_feats = image_features_for(model, ref_model, batch["pixel_values"], device)
    logps, counts = sequence_logps(model, batch, feats)
    B = len(idx)
    if args.reference_free:
        ref = torch.zeros_like(logps)
    elif ref_table is not None:
        ref = torch.cat([ref_table[idx, 0], ref_table[idx, 1]]).to(device)
    else:
        ref, _ = reference_logps(model, ref_model, batch, ref_feats)
    losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], args.beta, args.loss_type, args.label_smoothing,
                              counts[:B], counts[B:])
    (losses.sum() * world / args.batch_size).backward()
    return {"loss": losses.detach().sum(), "rewards_chosen": rc.sum(), "rewards_rejected": rr.sum(),
            "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(), "pairs": torch.tensor(float(B)),
            "tokens": batch["attention_mask"].sum().float()}


def sft_warmup(args, model, data: PairData, tokenizer, device, steps: int, log):
    """Supervised warm start on the chosen answers (the tiny model is random: DPO needs a policy that already
    answers). Full model + projector, identical on every rank (same seed, same data, no communication)."""
    model.train()
    trainable = [p for n, p in model.named_parameters() if not n.startswith("vision_tower.")]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.sft_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, steps, 0.05)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(steps):
        idx = torch.randint(len(data), (args.micro_batch_size * 2,), generator=g).tolist()
        batch = to_device(lm.collate([data.items[i]["chosen"] for i in idx], tokenizer.pad_token_id), device)
        pix = torch.stack([data.pixel(k) for i in idx for k in data.items[i]["images"]]).to(device)
        loss = model(batch["input_ids"], pix, batch["attention_mask"], batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log({"phase": "sft_warmup", "step": step, "loss": round(loss.item(), 4)})
    model.requires_grad_(False)
    model.eval()


# ----------------------------------------------------------------------------------------------------------
# Evaluation: generation on a VQA set, scored the LLaVA-Med way (spec 2.4); reward accuracy on held-out pairs
# ----------------------------------------------------------------------------------------------------------

CONTRACTIONS = {  # word -> contraction, LLaVA-Med v1.0.0 glossary.py's VQA-eval table (exact key set checked by tests)
    # Not listed: the released entries "Im", "Ive", "Id've", "I'dve" (never matched: the lookup runs on lower-cased
    # words), and "let's", "she's" (mapped to themselves).
    form[:i] + form[i + 1:]: form  # each form is looked up by every spelling that leaves out one of its apostrophes
    for form in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
        "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
        "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
        "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
        "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
        "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
        "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
        "you'll you're you've").split()
    for i, c in enumerate(form) if c == "'"
} | {"somebody'd": "somebodyd"}  # quirk kept: the released table maps this entry backwards


def normalize_answer(text: str) -> str:
    """The one answer normaliser of every method: LLaVA-Med's released normalize_word (v1.0.0
    llava/eval/eval_metrics/glossary.py), rule for rule, quirks included; tests/test_scorers.py checks it against
    that function's outputs (tests/fixtures/llava_med_eval_cases.json).
    "Left-sided (pleural) effusion!" -> "left sided pleural effusion"; "three" -> "3"; "1,000" -> "1000"."""
    # 1. Each of these marks becomes a space ("t1/t2" -> "t1 t2"), but is deleted everywhere instead when it
    #    touches a space anywhere in the text ("x - ray" -> "x ray"; so "left-sided, x - ray" -> "leftsided x ray"),
    #    or when the text holds a digit-comma-digit anywhere ("1,000 x-ray" -> "1000 xray"). Both tests look at the
    #    original text, not at the text as marks are replaced. Not in the list: ':', "'", '%', '#', '*', '&'.
    glued = re.search(r"\d,\d", text) is not None
    s = text
    for mark in ';/[]"{}()=+\\_-><@`,?!':
        s = s.replace(mark, "" if glued or mark + " " in text or " " + mark in text else " ")
    # 2. Periods not followed by a digit are deleted ("2." -> "2", "e.g." -> "eg"; "3.5", ".5" stay). The released
    #    pattern "(?!<=\d)(\.)(?!\d)" meant a look-behind but is a look-ahead that always holds, and it passes
    #    re.UNICODE (= 32) as the count: only the first 32 such periods go.
    s = re.sub(r"\.(?!\d)", "", s, count=32)
    # 3. Lower-case, split on whitespace; number words zero..ten and "none" become digits ("none" -> "0"); then the
    #    articles a/an/the are dropped (after the number words, so "one" stays as "1"); then contractions.
    #    (The released final comma removal is left out: step 1 has already replaced every comma.)
    numbers = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                       "0 0 1 2 3 4 5 6 7 8 9 10".split()))
    words = [numbers.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def token_recall(prediction: str, reference: str, compat: bool = False) -> tuple[float, float, float]:
    """(precision, recall, f1) over normalised whitespace tokens.
    Default: a reference token is matched at most as often as it occurs (clipped counts, as SQuAD's token F1), so
    "effusion effusion" recalls 1/2 of "pleural effusion".
    compat=True: LLaVA-Med's calculate_f1score (eval_metrics/evaluate_metrics.py) as run_eval.py calls it, quirks
    included: (1) the answers are normalised twice (evaluate() normalises them, calculate_f1score again; only an
    answer with more than 32 periods notices); (2) true positives are counted on the prediction side, so a repeated
    matching word counts every time ("effusion effusion" recalls 2/3 of "pleural effusion"); (3) all zero when
    either side is empty or nothing matches."""
    from collections import Counter
    if compat:
        cand = Counter(normalize_answer(normalize_answer(prediction)).split())
        ref = Counter(normalize_answer(normalize_answer(reference)).split())
        tp = sum(c for w, c in cand.items() if w in ref)
        if not cand or not ref or tp == 0:
            return 0.0, 0.0, 0.0
        p = tp / sum(cand.values())
        r = tp / (tp + sum(c for w, c in ref.items() if w not in cand))
        return p, r, 2 * p * r / (p + r)
    cand, ref = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(reference).split())
    tp = sum((cand & ref).values())
    p = tp / sum(cand.values()) if cand else 0.0
    r = tp / sum(ref.values()) if ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def yes_no(prediction: str) -> str | None:
    """The first word of the normalised answer that is 'yes' or 'no' ("Answer:no" counts; 'normal', 'note' or
    'know' never count as 'no'), else None."""
    for w in re.findall(r"\w+", normalize_answer(prediction)):
        if w in ("yes", "no"):
            return w
    return None


def score_vqa(rows: list[dict], closed_scoring: str = "strict") -> dict:
    """rows: {"answer", "prediction", "answer_type"}. Our scorer (always): closed questions (GT yes/no, or
    answer_type CLOSED) by accuracy -- for a yes/no GT the answer's first yes/no word must be the GT -- and F1
    with 'yes' as the positive class (an answer that is neither counts as wrong, and as not 'yes'); open questions
    by mean token recall (clipped counts) and exact match after normalisation.
    closed_scoring="llava_med" / "llava_med_batch" also returns the released LLaVA-Med v1.0.0 numbers under
    "compat_*" keys, quirks included, to compare with published tables: which rows count follows answer_type exactly
    ("CLOSED" / "OPEN"; other rows are skipped, as there); open = calculate_f1score's recall (token_recall
    compat=True); closed = the GT as a substring of the normalised answer ('no' is in 'normal' and 'cannot', 'yes'
    in 'eyes': LLaVA-Med issue #12), where run_eval.py ("llava_med") also needs the letters 'yes' or 'no'
    somewhere in the answer (so a closed non-yes/no question such as 'left' never scores) and run_eval_batch.py
    ("llava_med_batch") does not."""
    if closed_scoring not in ("strict", "llava_med", "llava_med_batch"):
        raise ValueError(f"closed_scoring must be strict, llava_med or llava_med_batch, not {closed_scoring!r}")
    closed, opened, compat_closed, compat_open, tp, fp, fn = [], [], [], [], 0, 0, 0
    for r in rows:
        gt, answer = normalize_answer(r["answer"]), normalize_answer(r["prediction"])
        is_closed = gt in ("yes", "no") or str(r.get("answer_type", "")).upper() == "CLOSED"
        if is_closed:
            pred = yes_no(r["prediction"]) if gt in ("yes", "no") else answer
            closed.append(float(pred == gt))
            tp += pred == "yes" and gt == "yes"
            fp += pred == "yes" and gt != "yes"
            fn += pred != "yes" and gt == "yes"
        else:
            opened.append((token_recall(r["prediction"], r["answer"])[1], float(answer == gt)))
        if closed_scoring != "strict" and r.get("answer_type") == "CLOSED":
            needs_yes_no = closed_scoring == "llava_med"
            compat_closed.append(float(gt in answer and (not needs_yes_no or "yes" in answer or "no" in answer)))
        elif closed_scoring != "strict" and r.get("answer_type") == "OPEN":
            compat_open.append(token_recall(r["prediction"], r["answer"], compat=True)[1])
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    out = {"closed_accuracy": sum(closed) / len(closed) if closed else None, "closed_f1": f1 if closed else None,
           "open_recall": sum(o[0] for o in opened) / len(opened) if opened else None,
           "open_exact": sum(o[1] for o in opened) / len(opened) if opened else None,
           "n_closed": len(closed), "n_open": len(opened)}
    if closed_scoring != "strict":
        out.update(compat=closed_scoring, compat_n_closed=len(compat_closed), compat_n_open=len(compat_open),
                   compat_closed_accuracy=sum(compat_closed) / len(compat_closed) if compat_closed else None,
                   compat_open_recall=sum(compat_open) / len(compat_open) if compat_open else None)
    return out


def read_vqa(path: str, image_folder: str = "") -> list[dict]:
    """One reader for the VQA test sets users have; returns [{"id","image","question","answer","answer_type"}]
    with absolute image paths. Formats: LLaVA-Med test.json / toy test_vqa.json ("conversations" + answer_type),
    VQA-RAD (MEVF testset.json, or the OSF public json: its test_freeform/test_para rows), SLAKE (English rows)."""
    path = Path(path)
    rows = []
    for where, rec in lm.read_records(path):
        if "conversations" in rec or "conversatons" in rec:
            turns = lm.record_turns(rec, where)
            folder = Path(image_folder or path.parent)
            rows.append({"id": rec.get("id", where), "image": str(folder / rec["image"]),
                         "question": turns[0][1].replace(lm.IMAGE_MARKER, "").strip(), "answer": turns[1][1],
                         "answer_type": rec.get("answer_type", "")})
        elif "image_name" in rec:  # VQA-RAD
            if "phrase_type" in rec and "qid_linked_id" in rec and not str(rec["phrase_type"]).startswith("test"):
                continue  # the OSF public json holds train and test; keep the official test rows
            folder = Path(image_folder or path.parent / "images")
            rows.append({"id": rec.get("qid", where), "image": str(folder / rec["image_name"]),
                         "question": rec["question"], "answer": str(rec["answer"]), "answer_type": rec["answer_type"]})
        elif "img_name" in rec:  # SLAKE
            if rec.get("q_lang", "en") != "en":
                continue
            folder = Path(image_folder or path.parent / "imgs")
            rows.append({"id": rec.get("qid", where), "image": str(folder / rec["img_name"]),
                         "question": rec["question"], "answer": str(rec["answer"]), "answer_type": rec["answer_type"]})
        else:
            raise lm.DataError(f"{where}: unknown VQA record (expected conversations, image_name or img_name)")
    return rows


def evaluate_vqa(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                 device, closed_scoring: str = "strict", desc: str = "eval") -> tuple[dict, list[dict]]:
    """Greedy answers for every row (ranks take interleaved shares, padded to equal batch counts so sharded
    forwards stay in step), gathered on every rank and scored."""
    cfg = model.config
    model.eval()
    mine = list(range(rank, len(rows), world))
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    preds = {}
    for b in tqdm(range(n_batches), desc=desc, disable=rank != 0, leave=False):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        chunk = chunk or [0]
        prompts, pix = [], []
        for i in chunk:
            turns = lm.place_image_markers([("user", rows[i]["question"])], 1)
            prompts.append(lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id))
            pix.append(lm.preprocess_image(lm.load_image(rows[i]["image"]), cfg.image_size, cfg.image_mean, cfg.image_std,
                                           pad=cfg.image_aspect_ratio == "pad"))
        answers = lm.generate(model, tokenizer, prompts, torch.stack(pix), max_new_tokens=max_new_tokens)
        preds.update({i: a for i, a in zip(chunk[:real], answers[:real])})
    model.reshard()  # forwards without backward leave the FSDP root gathered; training must see the shards
    gathered = [None] * world
    dist.all_gather_object(gathered, preds)
    merged = {i: a for part in gathered for i, a in part.items()}
    results = [dict(rows[i], prediction=merged[i]) for i in range(len(rows))]
    return score_vqa(results, closed_scoring), results


def evaluate_pairs(args, model, ref_model, data: PairData, tokenizer, device, rank, world) -> dict:
    """Implicit-reward accuracy and margin of the policy against the reference on held-out pairs."""
    model.eval()
    idx = list(range(len(data)))
    mine = idx[rank::world]
    steps = math.ceil(len(idx) / world / args.micro_batch_size)
    sums = torch.zeros(3)
    for s in range(steps):
        chunk = mine[s * args.micro_batch_size:(s + 1) * args.micro_batch_size]
        real = len(chunk)
        chunk = chunk or [0]
        batch = to_device(collate_pairs(data, chunk, tokenizer.pad_token_id), device)
        with torch.no_grad():
            feats, ref_feats = image_features_for(model, ref_model, batch["pixel_values"], device)
            logps, _ = sequence_logps(model, batch, feats)
            ref, _ = reference_logps(model, ref_model, batch, ref_feats)
        B = len(chunk)
        rc, rr = args.beta * (logps[:B] - ref[:B]), args.beta * (logps[B:] - ref[B:])
        sums += torch.tensor([float((rc > rr)[:real].sum()), float((rc - rr)[:real].sum()), float(real)])
    model.reshard()
    dist.all_reduce(sums)
    return {"pair_accuracy": float(sums[0] / sums[2]), "pair_margin": float(sums[1] / sums[2]), "pairs": int(sums[2])}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(Args, argv)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out = Path(args.out)
    master = rank == 0
    metrics_file = out / "metrics.jsonl"

    def log(row: dict):
        if master:
            out.mkdir(parents=True, exist_ok=True)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"dpo.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    torch.manual_seed(args.seed)  # same initial weights on every rank

    # ---- model and data
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed,
                               attn_implementation=args.attn_implementation)
    unreadable = {} if args.skip_bad_samples else None
    train_data = PairData(*load_preferences(args, "train", unreadable), tokenizer, model.config, args.max_length,
                          args.skip_bad_samples, args.allow_images_outside_folder, unreadable)
    heldout, eval_rows = None, []
    if args.eval and Path(args.data).is_dir() and (Path(args.data) / "test.json").exists():
        heldout = PairData(*load_preferences(args, "test"), tokenizer, model.config, args.max_length, args.skip_bad_samples)
        heldout.items = heldout.items[:256]
    eval_path = args.eval_data or (str(Path(args.data) / "test_vqa.json") if Path(args.data).is_dir() else "")
    if args.eval and eval_path:
        eval_rows = read_vqa(eval_path, args.eval_image_folder)
    if args.eval_limit:
        eval_rows = eval_rows[:args.eval_limit]
    if master:
        print(f"pairs: {len(train_data)} train" + (f", {len(heldout)} held out" if heldout else "") +
              f"; eval questions: {len(eval_rows)}")
        if train_data.skipped:
            print(f"warning: skipped {sum(train_data.skipped.values())} bad records: {train_data.skipped}; e.g.\n  "
                  + "\n  ".join(train_data.examples), file=sys.stderr)

    # ---- warm start (toy only by default), then the policy and the reference
    warm = args.sft_warmup_steps if args.sft_warmup_steps >= 0 else (1000 if args.model == "tiny" else 0)
    resume_from = latest_checkpoint(out) if args.resume else None
    if warm:
        sft_warmup(args, model, train_data, tokenizer, device, warm, log if resume_from is None else (lambda r: None))
        if master:  # the adapter's base model: the warm-started weights, as a llava-hf checkpoint
            lm.save_llava_hf(model, tokenizer, out / "base_llava_hf")
    model, ref_model = build_models(args, model, device)
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (CleanRL's "CRUCIAL" seed offset)

    shard(model, device, args.activation_checkpointing, args.compile)
    if ref_model is not None and hasattr(ref_model, "language_model"):
        shard(ref_model, device)
    results = {}
    if args.eval_before and eval_rows and resume_from is None:  # LoRA B starts at 0: the policy is the base model
        results["before"], _ = evaluate_vqa(model, tokenizer, eval_rows, args.eval_batch_size, args.eval_max_new_tokens,
                                            rank, world, device, args.closed_scoring, "eval before")
        log({"phase": "eval_before", **results["before"]})
        if master:
            print("before DPO:", json.dumps(results["before"]))

    ref_table = None
    if args.precompute_ref and not args.reference_free:
        ref_table = precompute_reference(args, model, ref_model, train_data, tokenizer, device, rank, world, out)

    # ---- optimizer and schedule
    if args.batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of micro-batch x ranks "
                         f"({args.micro_batch_size} x {world})")
    accum = args.batch_size // (args.micro_batch_size * world)  # micro-batches per rank per optimizer step
    if master:
        print(f"global batch {args.batch_size} pairs = {args.micro_batch_size} per forward x {world} ranks x {accum} "
              f"accumulation steps")
    steps_per_epoch = len(train_data) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_data)} pairs is less than one global batch ({args.batch_size})")
    total = steps_per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")],
               "lr": args.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")],
               "lr": args.projector_lr}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel for all parameters (CUDA, and CPU since torch 2.4); transformers' default optim too
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=True)
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step, nonfinite = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, rank)
        step, nonfinite = state["step"], state.get("nonfinite_skipped", 0)
        if master:
            print(f"resumed from {resume_from} (step {step})")

    # ---- the loop
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=step, desc="dpo", disable=not master)
    t0, tokens = time.time(), 0.0
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        batch_idx = global_batches(len(train_data), args.batch_size, epoch, args.seed)[k]
        model.train()
        micro = my_micro_batches(batch_idx, args.micro_batch_size, rank, world)
        sums = {}
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)  # reduce gradients once per step
            stats = dpo_step(args, model, ref_model, train_data, idx, tokenizer, device, world, ref_table)
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
        totals = torch.stack([sums[key] for key in sorted(sums)])
        dist.all_reduce(totals)
        sums = dict(zip(sorted(sums), totals.tolist()))
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
        if not torch.isfinite(grad_norm) or not math.isfinite(sums["loss"]):  # same verdict on every rank (reduced)
            if args.on_nonfinite != "skip":
                raise FloatingPointError(f"non-finite loss or gradient at step {step + 1}: loss={sums['loss']}, "
                                         f"grad norm={float(grad_norm)} (--on-nonfinite skip drops such updates)")
            nonfinite += 1  # drop this update; data position and schedule move on
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            log({"phase": "dpo", "step": step, "skipped_nonfinite": nonfinite, "loss": sums["loss"]})
            if master:
                print(f"warning: step {step}: non-finite loss/gradient, update skipped ({nonfinite} so far)", file=sys.stderr)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sums["tokens"]
        n = sums["pairs"]
        row = {"phase": "dpo", "step": step, "epoch": epoch, "loss": sums["loss"] / n,
               "rewards_chosen": sums["rewards_chosen"] / n, "rewards_rejected": sums["rewards_rejected"] / n,
               "margin": sums["margin"] / n, "accuracy": sums["accuracy"] / n, "grad_norm": float(grad_norm),
               "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (time.time() - t0)}
        log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        run_state = {"epoch": epoch, "args": dataclasses.asdict(args), "nonfinite_skipped": nonfinite}
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(out, step, model, optimizer, scheduler, run_state, rank)
    bar.close()
    run_state = {"epoch": step // steps_per_epoch, "args": dataclasses.asdict(args), "nonfinite_skipped": nonfinite}
    save_checkpoint(out, step, model, optimizer, scheduler, run_state, rank)
    save_adapter_or_model(args, model, tokenizer, out, rank)

    # ---- evaluation after training
    if heldout is not None:
        results["heldout_pairs"] = evaluate_pairs(args, model, ref_model, heldout, tokenizer, device, rank, world)
        log({"phase": "heldout_pairs", **results["heldout_pairs"]})
    if eval_rows:
        results["after"], preds = evaluate_vqa(model, tokenizer, eval_rows, args.eval_batch_size, args.eval_max_new_tokens,
                                               rank, world, device, args.closed_scoring, "eval after")
        log({"phase": "eval_after", **results["after"]})
        if master:
            (out / "predictions.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))
    results["summary"] = {"steps": step, "nonfinite_skipped": nonfinite, "skipped_records_train": train_data.skipped,
                          "skipped_records_heldout": heldout.skipped if heldout is not None else {}}
    if master:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


def save_adapter_or_model(args: Args, model, tokenizer, out: Path, rank: int):
    """LoRA: a PEFT adapter (adapter_config.json + adapter_model.safetensors) whose module names are those of the
    llava-hf export of the base model, so `PeftModel.from_pretrained(LlavaForConditionalGeneration...)` loads it.
    --export-merged: the merged model as a llava-hf checkpoint. Both gather full tensors on every rank."""
    state = {n: full_tensor(p.detach()).cpu() for n, p in model.state_dict().items()}
    if rank != 0:
        return
    if not args.full_finetune:
        adapter = {}
        for n, t in state.items():
            if "lora_A" in n or "lora_B" in n:
                base = n.replace(".default", "")
                hf = lm._rename(base.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight"),
                                lm.TO_LLAVA_HF)
                suffix = ".lora_A.weight" if "lora_A" in n else ".lora_B.weight"
                adapter["base_model.model." + hf[:-len(".weight")] + suffix] = t.contiguous()
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        save_file(adapter, str(out / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = model.lora_config.to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        warm_base = out / "base_llava_hf"
        cfg.update(base_model_name_or_path=str(warm_base) if warm_base.exists() else args.model, peft_type="LORA",
                   task_type=None,
                   target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        if args.tune_projector:  # the trained projector ships beside the adapter (LLaVA's non_lora_trainables)
            cfg["modules_to_save"] = None
            save_file({lm._rename(n, lm.TO_LLAVA_HF): t for n, t in state.items() if n.startswith("projector.")},
                      str(out / "adapter" / "projector.safetensors"))
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=1, default=str))
    if args.export_merged or args.full_finetune:
        merged = merged_copy(model, state)
        lm.save_llava_hf(merged, tokenizer, out / "llava_hf")


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


if __name__ == "__main__":
    try:
        main()
    except lm.DataError as e:  # bad data: say which file and record, without a traceback through torch
        print(f"dpo.py: bad data: {e}\n(--skip-bad-samples counts and skips such records)", file=sys.stderr)
        sys.exit(2)
    except (dist.DistError, RuntimeError) as e:  # a dead or stalled peer surfaces as a failed collective
        if not dist.is_initialized() or not any(s in str(e) for s in ("Connection", "gloo", "NCCL", "Timeout", "timed out")):
            raise
        print(f"dpo.py rank {os.environ.get('RANK')}: a distributed collective failed -- another rank died or stalled "
              f"past --dist-timeout-s ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        sys.exit(1)
