"""dpo.py -- Direct Preference Optimization for LLaVA-style medical VLMs (the reference preference recipe).

    # embedded default: tiny random LLaVA, toy preference pairs, CPU, ~4 min on 2 idle cores (mostly the warm start)
    python dpo.py
    # the same on 2 CPU processes (gloo) or 8 GPUs (nccl, bf16): same global batch, same result
    torchrun --nproc-per-node=2 dpo.py
    torchrun --nproc-per-node=8 dpo.py --model /ckpt/llava-med-v1.5-mistral-7b --data prefs.json \\
        --image-folder /data/images --eval-data /data/vqa_rad/testset.json --eval-image-folder /data/vqa_rad/images \\
        --lr 1e-7 --epochs 3 --batch-size 4 --micro-batch-size 1 --max-length 1024 --activation-checkpointing
    # evaluate a checkpoint only (no training data is read)
    python dpo.py --eval-only --model /ckpt/llava-med-v1.5-mistral-7b --eval-data /data/vqa_rad/testset.json
    # several machines: the same command with torchrun's rendezvous (see README); every flag: python dpo.py --help

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

File layout: Args -> data prep -> loss -> model setup -> training loop -> DPO step -> evaluation -> main().
The blocks every recipe shares (argument parsing, the training loop, checkpoints, VQA scoring) are copied from
here into each method file, marked "# Copied from dpo.py: <name>" and kept identical by tests/test_copies.py.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data
    data: str = "data/toy"  # preference json/jsonl, or a toy-format folder (pairs are derived from its train.json)
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    max_length: int = 512  # tokens per sequence, image tokens included; truncation never cuts image tokens
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths that leave --image-folder
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf, HuatuoGPT-Vision)
    template: str = ""  # chat template override ("" = the checkpoint's: mistral_instruct, vicuna_v1, huatuo, chatml)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    sft_warmup_steps: int = -1  # SFT steps before DPO (a toy folder: on its train split); -1 = 1000 for --model tiny (random), else 0; 400 steps leave the tiny model answering every closed val question by its wording (50.0 %), 1000 read the image in part (66.3 %: the failure DPO is to fix)
    sft_lr: float = 1e-3  # learning rate of that warm-up (full model, projector included)
    warm_start_seed: int = 0  # seed of the tiny model's random init and its warm start, which stand in for the SFT checkpoint a real run starts from: one fixed model, as LLaVA-Med v1.5 is; --seed varies the preference stage only (-1 = --seed)
    seed: int = 0  # same seed + same data = same run (bit-identical on CPU; on GPU see README)
    # policy and loss (fields above this line key the caches: reference log-probs)
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 16  # LoRA rank (toy default: r 128 is full rank on the 128-wide tiny model, 62.2 vs 71.2 val closed at beta 2; MMed-RAG / MMedPO / STLLaVA-Med: 128)
    lora_alpha: int = 32  # LoRA alpha (toy default, alpha / r = 2 as the papers' 256 / 128; papers: 256)
    lora_dropout: float = 0.0  # LoRA dropout during DPO: 0, as TRL's DPOTrainer (disable_dropout=True) and MMedPO's trainer
    tune_projector: bool = False  # also train the mm projector (MMed-RAG's code is ambiguous; spec A8: a flag)
    beta: float = 2.0  # DPO temperature (toy default: at 0.1 the tiny policy drifts far from the warm start and its greedy answers degrade, val closed -4.5; 2.0 keeps it near, +4.9; TRL default and every method script: 0.1)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO; ipo = Azar et al. 2023, length-normalised
    label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels (sigmoid only)
    reference_free: bool = False  # reference log-probs = 0 (also for the held-out reward accuracy)
    precompute_ref: bool = False  # compute reference log-probs once before training, cached on disk
    # optimisation
    lr: float = 1e-3  # peak learning rate (toy default, val sweep 1e-4..3e-3; MMed-RAG/MMedPO use 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # learning rate of the projector when --tune-projector (mm_projector_lr)
    batch_size: int = 16  # pairs per optimizer step over all ranks (global; does not depend on the number of ranks)
    epochs: int = 2  # passes over the preference pairs (toy: 2 x 56 steps of prefs_train.json; MMed-RAG / MMedPO: 3)
    max_steps: int = -1  # stop after this many optimizer steps (-1 = epochs decide)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # pairs per forward on one rank; accumulation = batch / (micro * ranks)
    prefix_sharing: bool = True  # one row per pair whose answers share images and prompt (exact; Wang & Hegde 2024)
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"  # transformers attention kernel (sdpa: flash/mem-efficient on GPU)
    compile: bool = False  # torch.compile each decoder layer (GPU: faster steps after a one-off compile)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # output
    out: str = "runs/dpo"  # checkpoints, metrics.jsonl, adapter/, eval json
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    resume: bool = True  # continue from the newest complete checkpoint in --out made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    export_merged: bool = False  # also write the merged model as a llava-hf checkpoint (vLLM / transformers)
    # evaluation
    eval: bool = True  # evaluate at the end (VQA generation + held-out pair rewards)
    eval_only: bool = False  # only evaluate --model on --eval-data (no training data is read, nothing is trained)
    eval_before: bool = True  # also evaluate the starting model, for the before/after table
    eval_data: str = ""  # VQA set: toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json ("" = toy test when --data is toy)
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it: images/ (VQA-RAD), imgs/ (SLAKE), or its folder)
    eval_limit: int = 0  # evaluate on the first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # answer length cap (VQA answers are short)
    closed_scoring: Literal["strict", "llava_med", "llava_med_batch"] = "strict"  # strict (ours); llava_med|llava_med_batch add run_eval(_batch).py's numbers (lm.score_vqa)


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


def cache_key(args, before: str, *content) -> str:
    """The key of a cache built from the run's inputs (reference log-probs, preference pairs, indexes): every Args
    field declared before the field `before` (Args lists what changes such content first), a path by its content
    (lm.fingerprint: a moved data set keeps the key, a file edited in place changes it), and `content` (e.g. the
    tokenised data), so a field added to those groups is part of the key without being listed anywhere. Under
    torch.distributed a collective: every rank calls it and gets rank 0's key."""
    names = [f.name for f in dataclasses.fields(args)]
    fields = {n: lm.fingerprint(getattr(args, n), args.out) for n in names[:names.index(before)]}
    key = [hashlib.sha256(json.dumps([fields, content], sort_keys=True, default=str).encode()).hexdigest()[:16]]
    if dist.is_initialized():  # rank 0's: each node's copy of the data may have its own file times
        dist.broadcast_object_list(key, src=0)
    return key[0]


def cli(main):
    """Run main() as a script. A bad data file or record, or a model folder that cannot be read: one line naming the
    file, exit 2. A dead or stalled peer rank (a failed collective): one line, exit 1. Never a traceback through torch."""
    script, code = Path(sys.argv[0]).name, 0
    try:
        main()
    except lm.DataError as e:
        kind = "bad model" if isinstance(e, lm.ModelError) else "bad data"
        hint = getattr(e, "skippable", False) and "--skip-bad-samples" not in sys.argv
        print(f"{script}: {kind}: {e}" + ("\n(--skip-bad-samples counts and skips such records)" if hint else ""),
              file=sys.stderr)
        code = 2
    except (dist.DistError, RuntimeError) as e:
        if not dist.is_initialized() or not any(s in str(e) for s in ("Connection", "gloo", "NCCL", "Timeout", "timed out")):
            raise
        print(f"{script} rank {os.environ.get('RANK')}: a distributed collective failed -- another rank died or stalled "
              f"past --dist-timeout-s ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ:  # a torchrun rank skips the interpreter's teardown, where gloo's threads can still abort
        os._exit(code)  # a finished run (SIGABRT, pytorch/pytorch#179291); everything is written by now
    if code:
        sys.exit(code)


def setup_distributed(timeout_s: int = 1800):
    """Returns (rank, world_size, device). Outside torchrun a one-process group is created, so the training
    code has one path (FSDP2 with one shard). The timeout makes a rank whose peer died exit instead of hanging."""
    # plain `python dpo.py`: an in-process store (a free port picked here could be taken before it is bound)
    single = "RANK" not in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # on GPU: nccl for CUDA tensors and gloo for the CPU ones (the loop's statistics, gathered answers)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None,
                            **(dict(store=dist.HashStore(), rank=0, world_size=1) if single else {}))
    return dist.get_rank(), dist.get_world_size(), device


def jsonl_logger(path: Path, rank: int):
    """log(row): append one json line to `path` on rank 0 (metrics.jsonl); other ranks write nothing."""
    def log(row: dict):
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return log


# ----------------------------------------------------------------------------------------------------------
# Data prep: preference pairs -> token ids, labels and images
# ----------------------------------------------------------------------------------------------------------

def load_preferences(args: Args, split: str = "train", skipped: dict | None = None):
    """[(where, record)] and the image folder. A toy-format folder (data/toy): split "train" / "val" reads its
    prefs_{split}.json (MMed-RAG / MMedPO release format, written by data/make_toy.py: pairs on images that are not
    in the warm-start split, see data/toy/README.md), or, without that file, pairs derived from {split}.json;
    split "sft" gives the pairs derived from train.json, whose chosen answers are the warm start's SFT data.
    Unreadable jsonl lines are counted in `skipped` (when given) instead of raising."""
    path = Path(args.data)
    if path.is_dir():
        folder = Path(args.image_folder or path)
        prefs = path / f"prefs_{split}.json"
        if split != "sft" and prefs.exists():
            return lm.read_records(prefs, skipped), folder
        from data.toy_readers import toy_pair_records  # toy-only code lives with the toy

        return toy_pair_records(path / ("train.json" if split == "sft" else f"{split}.json")), folder
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
                 allow_outside: bool = False, skipped: dict | None = None, system: str | None = None):
        self.image_folder, self.cfg, self.system = image_folder, cfg, system  # system prompt (None: the template's)
        self.allow_outside, self._opened = allow_outside, set()
        self.items, self.skipped, self.examples = lm.keep_good(  # skipped: reason -> count; examples: for the log
            records, lambda where, rec: self._tokenize(where, rec, tokenizer, max_length), skip_bad, "preference pair",
            skipped)

    def _tokenize(self, where, rec, tokenizer, max_length):
        images = lm.record_images(rec, where)
        chosen_turns, rejected_turns = pair_turns(rec, where)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise lm.DataError(f"{where}: chosen and rejected prompts differ; DPO compares answers to one prompt")
        rejected_images = lm.record_images({"image": rec["rejected_image"]}, where) if rec.get("rejected_image") else images
        if rec.get("rejected_noised") and not rec.get("rejected_image"):  # MMed-RAG's released cross-modality pairs
            rejected_images = ["noise:" + p for p in images]
        cfg = self.cfg
        tok = lambda turns, n: lm.tokenize_conversation(tokenizer, lm.place_image_markers(turns, n, where), cfg.template,
                                                        cfg.num_image_tokens, cfg.image_token_id, max_length, where,
                                                        self.system)
        c, r = tok(chosen_turns, len(images)), tok(rejected_turns, len(rejected_images))
        for p in images + rejected_images:
            if not p.startswith("noise:"):
                lm.checked_image(self.image_folder, p, where, self.allow_outside, self._opened)
        return {"id": rec.get("id", where), "chosen": c, "rejected": r, "images": images,
                "rejected_images": rejected_images, "answer_type": rec.get("answer_type")}

    def __len__(self):
        return len(self.items)

    def pixel(self, key: str) -> torch.Tensor:
        cfg = self.cfg
        path = lm.resolve_image(self.image_folder, key.removeprefix("noise:"), key, self.allow_outside)
        image = lm.load_image(path)
        if key.startswith("noise:"):  # MMed-RAG's generate_gaussian_noise: N(0, 1) of the image's shape, clipped to
            # [0, 1], 8-bit; one fixed draw per source image (the release draws anew), seeded by the image's path
            # inside the image folder, so that a checkout elsewhere draws the same noise
            name = os.path.relpath(path, Path(self.image_folder).resolve())
            rng = np.random.default_rng(int(hashlib.sha256(f"noise:{name}".encode()).hexdigest()[:8], 16))
            image = Image.fromarray((np.clip(rng.normal(0, 1, (image.height, image.width, 3)), 0, 1) * 255).astype(np.uint8))
        return lm.image_tensor(cfg, image)


def data_content(data: PairData) -> str:
    """What the tokenised pairs are (a cache key's content): a digest of their token ids and image names, built pair
    by pair (one json string of 100k pairs would take gigabytes)."""
    h = hashlib.sha256()
    for it in data.items:
        h.update(json.dumps([it["chosen"]["input_ids"], it["rejected"]["input_ids"], it["images"],
                             it["rejected_images"]]).encode())
    return h.hexdigest()


def collate_pairs(data: PairData, idx: list[int], pad_id: int, share_prefix: bool = True) -> dict:
    """One micro-batch of pairs as model inputs. Every distinct image is in `pixel_values` once and `row_images`
    lists, row by row, which of them each row's image tokens show (the vision tower runs once per image).

    A pair whose chosen and rejected answers follow the same images and prompt is ONE row (prefix sharing, Wang &
    Hegde 2024, arXiv 2410.20305): the shared prefix, then the chosen answer, then the rejected answer, whose
    position ids restart where the prompt ends, under an attention mask in which the rejected answer sees the prompt
    but not the chosen answer, as the paper's figure draws it (p prompt, c chosen, r rejected; 1 = may attend):
                 p p p c c r r
              p  1 . . . . . .
              p  1 1 . . . . .
              p  1 1 1 . . . .
              c  1 1 1 1 . . .
              c  1 1 1 1 1 . .
              r  1 1 1 . . 1 .
              r  1 1 1 . . 1 1
    so the prompt (576 image tokens and the question, for LLaVA-Med) runs through the model once instead of twice.
    Other pairs (a rejected image, as MMed-RAG's noise image or MMedPO's noised lesion; or share_prefix=False)
    take two causal rows, TRL's layout. "score" lists every scored token as (row, position, target, answer): the
    logit at (row, position) predicts `target`, a token of answer `answer` (0..B-1 chosen, B..2B-1 rejected)."""
    items = [data.items[i] for i in idx]
    B = len(items)
    rows, keys, score = [], [], ([], [], [], [])  # a row: (token ids, position ids, segment: 0 shared, 1 c, 2 r)

    def add_scores(row, seq, to_pos, answer):
        ids, labels = seq["input_ids"], seq["labels"]
        for t in range(len(ids) - 1):
            if labels[t + 1] != lm.IGNORE_INDEX:  # the logit at t predicts token t + 1 (the causal shift)
                for column, v in zip(score, (row, to_pos(t), ids[t + 1], answer)):
                    column.append(v)

    unshared = []
    for j, it in enumerate(items):
        c, r = it["chosen"]["input_ids"], it["rejected"]["input_ids"]
        s = 0
        if share_prefix and it["images"] == it["rejected_images"]:
            while s < min(len(c), len(r)) - 1 and c[s] == r[s]:
                s += 1  # the longest common prefix, leaving each answer at least one token of its own
        if s == 0:
            unshared.append(j)
            continue
        rows.append((c + r[s:], list(range(len(c))) + list(range(s, len(r))), [0] * s + [1] * (len(c) - s) + [2] * (len(r) - s)))
        keys.append(it["images"])
        add_scores(len(rows) - 1, it["chosen"], lambda t: t, j)
        add_scores(len(rows) - 1, it["rejected"], lambda t, s=s, n=len(c): t if t < s else n + t - s, B + j)
    for side, images, offset in (("chosen", "images", 0), ("rejected", "rejected_images", B)):
        for j in unshared:
            ids = items[j][side]["input_ids"]
            rows.append((ids, list(range(len(ids))), [0] * len(ids)))
            keys.append(items[j][images])
            add_scores(len(rows) - 1, items[j][side], lambda t: t, offset + j)
    T = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    position_ids = torch.zeros(len(rows), T, dtype=torch.long)
    segment = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, pos, seg) in enumerate(rows):  # right padding
        input_ids[i, :len(ids)], real[i, :len(ids)] = torch.tensor(ids), True
        position_ids[i, :len(ids)], segment[i, :len(ids)] = torch.tensor(pos), torch.tensor(seg)
    extra = {}
    if len(unshared) == B:  # nothing shared: a padding mask, the model's own causal attention, TRL's rows and labels
        attention_mask, position_ids = real.long(), None
        extra["labels"] = lm.collate([items[j][side] for side in ("chosen", "rejected") for j in range(B)], pad_id)["labels"]
    else:  # causal, except rejected tokens never see chosen ones; a padding position sees itself (no empty row)
        hide = (segment[:, :, None] == 2) & (segment[:, None, :] == 1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attention_mask = ((causal & ~hide & real[:, None, :]) | torch.eye(T, dtype=torch.bool))[:, None]
    distinct = list(dict.fromkeys(k for ks in keys for k in ks))
    where = {k: i for i, k in enumerate(distinct)}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": torch.stack([data.pixel(k) for k in distinct]) if distinct else None,
            "row_images": torch.tensor([where[k] for ks in keys for k in ks], dtype=torch.long),
            "score": tuple(torch.tensor(column, dtype=torch.long) for column in score), "n_answers": 2 * B,
            "n_tokens": torch.tensor(float(real.sum())), **extra}


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
    """Summed log-probs of the supervised tokens of each answer [2B] (chosen answers, then rejected ones), and
    their counts, from collate_pairs' "score" list. Logits are formed only where a scored token is predicted, in
    fp32 (prompt and image tokens are never scored)."""
    rows, positions, targets, answers = (t.to(batch["input_ids"].device) for t in batch["score"])
    feats = image_features[batch["row_images"]] if image_features is not None else None
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   image_features=feats, logits_mask=(rows, positions)).logits.float()  # [n_scored, V]
    token_logps = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    n = batch["n_answers"]
    sums = torch.zeros(n, device=logits.device, dtype=torch.float32).index_add(0, answers, token_logps)
    counts = torch.zeros(n, device=logits.device, dtype=torch.float32).index_add(0, answers, torch.ones_like(token_logps))
    return sums, counts


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over the supervised (answer) tokens, and their count. The training loop divides
    the sum by the count of the whole global batch (all ranks, all micro-batches), so every answer token weighs the
    same whatever the split (a per-micro-batch mean, as LLaVA's trainer takes, over-weights short answers)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = targets != lm.IGNORE_INDEX
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                   logits_mask=mask).logits.float()
    return F.cross_entropy(logits, targets[mask[:, :-1]], reduction="sum"), mask.sum().float()


# ----------------------------------------------------------------------------------------------------------
# Model setup: FSDP2 sharding (the policy and its reference: lm.policy_and_reference)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Training loop (every recipe's, copied): global batches -> micro-batches per rank -> step_fn -> AdamW; checkpoints
# (trainable weights + optimizer + schedule + RNG; atomic: written, then renamed) and resume
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


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict, rank: int):
    """out/checkpoints/step_XXXXXXX/: trainable.safetensors, optimizer.safetensors, rng_rank{r}.safetensors,
    state.json (written last). Built under a temporary name and renamed, so a crash never leaves a half checkpoint.
    The trained weights and their optimizer state come whole from torch's state-dict API, gathered to rank 0's CPU
    (as torchtune saves an FSDP2 model); frozen weights are not saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))  # other ranks get {}
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise FloatingPointError(f"refusing to checkpoint non-finite weights (step {step})")
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
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file({f"{n}::{k}": v for n, s in optim["state"].items() for k, v in s.items()},
                  str(tmp / "optimizer.safetensors"))
        files = {f.name: lm.file_sha256(f) for f in sorted(tmp.iterdir())}
        state = {"step": step, "scheduler": scheduler.state_dict(), "param_groups": optim["param_groups"],
                 "world_size": dist.get_world_size(), "files": files, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(out: Path):
    """The newest checkpoint whose state.json exists and whose files match the checksums it lists; a damaged one
    is reported and skipped (the one before it is used)."""
    for p in sorted((out / "checkpoints").glob("step_*"), reverse=True):
        try:
            files = json.loads((p / "state.json").read_text())["files"]
            bad = [name for name, sha in files.items() if lm.file_sha256(p / name) != sha]
        except (OSError, ValueError, KeyError) as e:
            bad = [f"state.json ({type(e).__name__})"]
        if not bad:
            return p
        print(f"warning: checkpoint {p} is damaged ({', '.join(bad)}); trying an older one", file=sys.stderr)
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore what save_checkpoint wrote into the (sharded) model, optimizer, schedule and RNG; returns state.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / "state.json").read_text())
    optim = {"state": {}, "param_groups": state["param_groups"]}
    for key, t in load_file(str(path / "optimizer.safetensors")).items():
        n, k = key.split("::")
        optim["state"].setdefault(n, {})[k] = t
    set_state_dict(model, optimizer, model_state_dict=load_file(str(path / "trainable.safetensors")),
                   optim_state_dict=optim, options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def train(args, name: str, model, n_items: int, step_fn, out: Path, rank: int, world: int, log,
          lr_groups: dict, batch_size: int, micro_batch_size: int, epochs: float = 1, max_steps: int = -1,
          content=(), before=None) -> dict:
    """The training loop of every recipe, on a model already sharded with shard(). Each optimizer step takes a global
    batch of `batch_size` item indices (a seeded shuffle, the same on every rank), deals it out in micro-batches
    (accumulation = batch / (micro x ranks)) and calls step_fn(indices, epoch) for each: it runs the forward and
    returns summed statistics with their graph in "loss" (a SUM over the units the loss averages: pairs, tokens)
    and "n" (how many units). The loop runs backward, reduces gradients once per step, scales them by ranks / n of
    the whole global batch (FSDP2 averages over ranks), so the update follows the global mean whatever the split,
    clips, and steps AdamW (one group per name prefix in lr_groups; "" = the rest) on a warmup + cosine schedule.
    A non-finite loss or gradient (same verdict on every rank) stops the run, or with --on-nonfinite skip drops the
    update (counted). Logs the per-unit means of every statistic to metrics.jsonl, shows a tqdm bar on rank 0,
    checkpoints to out/checkpoints every --save-every steps and at the end, and resumes from the newest complete
    checkpoint made with the same key: the Args fields above --on-nonfinite (data, model, method and optimisation
    values), this phase's own values and `content` (what the caller's data is made of). A checkpoint made with another
    key (another --lr or --seed in the same --out) is moved aside to out/checkpoints.<its key>, kept, not continued
    (unless --resume-any).
    before(), when given, runs once when the phase starts from step 0 (not on resume): the "before" evaluation.
    Returns {"steps", "nonfinite_skipped"}."""
    master = rank == 0
    if batch_size % (micro_batch_size * world):
        raise ValueError(f"{name}: batch size {batch_size} must be a multiple of micro-batch x ranks "
                         f"({micro_batch_size} x {world})")
    steps_per_epoch = n_items // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: {n_items} items is less than one global batch ({batch_size})")
    total = max_steps if max_steps >= 0 else max(1, int(steps_per_epoch * epochs))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": [p for n, p in params.items() if n.startswith(prefix) and (prefix or not any(
        n.startswith(q) for q in lr_groups if q))], "lr": lr} for prefix, lr in lr_groups.items()]
    # fused: one kernel for all parameters (CUDA, and CPU since torch 2.4); transformers' default optim too
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), fused=True)
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step, nonfinite = 0, 0
    run_key = cache_key(args, "on_nonfinite", name, n_items, lr_groups, batch_size, epochs, max_steps, content)
    resume_from = latest_checkpoint(out) if args.resume else None
    made_with = json.loads((resume_from / "state.json").read_text()).get("key") if resume_from else None
    other = made_with != run_key and not args.resume_any  # --resume-any: the user vouches for a moved data / model
    if (out / "checkpoints").exists() and (other if resume_from else not args.resume):
        resume_from, aside = None, out / f"checkpoints.{made_with or 'old'}"
        dist.barrier()  # every rank has read the checkpoints: now they can move
        if master:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(out / "checkpoints", aside)
            why = "were made with other arguments" if args.resume else "are not resumed (--no-resume)"
            print(f"{name}: the checkpoints in {out} {why}: moved to {aside}", file=sys.stderr)
        dist.barrier()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, rank)
        step, nonfinite = state["step"], state.get("nonfinite_skipped", 0)
        if master:
            print(f"{name}: resumed from {resume_from} (step {step})")
    elif before is not None:
        before()
    trainable = list(params.values())
    bar = tqdm(total=total, initial=step, desc=name, disable=not master)
    t0, tokens = time.time(), 0.0
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        model.train()
        micro = my_micro_batches(global_batches(n_items, batch_size, epoch, args.seed)[k], micro_batch_size, rank, world)
        sums = {}
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)  # reduce gradients once per step
            stats = step_fn(idx, epoch)
            stats["loss"].backward()
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
        keys = sorted(sums)
        totals = torch.stack([sums[key] for key in keys])
        dist.all_reduce(totals)
        sums = dict(zip(keys, totals.tolist()))
        n = sums.pop("n")
        for p in trainable:  # gradient of the global-batch mean: the sum over all ranks' units / n
            if p.grad is not None:
                p.grad.mul_(world / n)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        step += 1
        row = {"phase": name, "step": step, "epoch": epoch, **{key: v / n for key, v in sums.items()},
               "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        if not torch.isfinite(grad_norm) or not math.isfinite(sums["loss"]):  # same verdict on every rank (reduced)
            if args.on_nonfinite != "skip":
                raise FloatingPointError(f"{name}: non-finite loss or gradient at step {step}: loss={sums['loss']}, "
                                         f"grad norm={float(grad_norm)} (--on-nonfinite skip drops such updates)")
            nonfinite += 1  # drop this update; data position and schedule move on
            row["skipped_nonfinite"] = nonfinite
            if master:
                print(f"warning: {name} step {step}: non-finite loss/gradient, update skipped ({nonfinite} so far)",
                      file=sys.stderr)
        else:
            optimizer.step()
        with warnings.catch_warnings():  # a skipped first update makes torch warn about the order; it is intended
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sums.get("tokens", 0.0)
        if tokens:
            row["tokens_per_s"] = tokens / (time.time() - t0)
        log(row)
        bar.update(1)
        bar.set_postfix({key: f"{row[key]:.4f}" for key in ("loss", "accuracy", "margin") if key in row})
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(out, step, model, optimizer, scheduler, {"nonfinite_skipped": nonfinite, "key": run_key},
                            rank)
    bar.close()
    save_checkpoint(out, step, model, optimizer, scheduler, {"nonfinite_skipped": nonfinite, "key": run_key}, rank)
    return {"steps": step, "nonfinite_skipped": nonfinite}


# ----------------------------------------------------------------------------------------------------------
# DPO step, the reference, the warm start
# ----------------------------------------------------------------------------------------------------------


def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def reference_logps(model, ref_model, batch, ref_feats):
    with torch.no_grad():
        if ref_model is not None and hasattr(ref_model, "language_model"):  # full fine-tuning: frozen copy
            return sequence_logps(ref_model, batch, ref_feats)
        with lm.adapters_off(model):
            return sequence_logps(model, batch, ref_feats)


@torch.no_grad()
def pair_logps(args, model, ref_model, data, tokenizer, device, rank, world, policy: bool = True) -> torch.Tensor:
    """Summed log-probs [N, 4] of every pair: policy chosen, policy rejected (0 when policy=False), reference chosen,
    reference rejected (0 with --reference-free). Each rank takes every world-th pair, in equal numbers of forwards
    (FSDP2's collectives stay in step); the table is summed over the ranks."""
    model.eval()
    table, mine = torch.zeros(len(data), 4), list(range(rank, len(data), world))
    for s in range(math.ceil(math.ceil(len(data) / world) / args.micro_batch_size)):
        chunk = mine[s * args.micro_batch_size:(s + 1) * args.micro_batch_size]
        real, chunk, B = len(chunk), chunk or [0], max(1, len(chunk))
        batch = to_device(collate_pairs(data, chunk, tokenizer.pad_token_id, args.prefix_sharing), device)
        feats, ref_feats = lm.image_features(model, ref_model, batch["pixel_values"], device)
        pol = sequence_logps(model, batch, feats)[0] if policy else torch.zeros(2 * B, device=device)
        ref = torch.zeros_like(pol) if args.reference_free else reference_logps(model, ref_model, batch, ref_feats)[0]
        table[chunk[:real]] = torch.stack([pol[:B], pol[B:], ref[:B], ref[B:]], 1)[:real].float().cpu()
    model.reshard()  # forwards without backward leave the FSDP2 root gathered
    dist.all_reduce(table)
    return table


def precompute_reference(args, model, ref_model, data, tokenizer, device, rank, world, out: Path) -> torch.Tensor:
    """Reference log-probs [N, 2] of every pair, computed once before training and cached on disk under a key of
    the data/model Args and the tokenised pairs (TRL's precompute_ref_log_probs, which TRL refuses for images)."""
    key = cache_key(args, "full_finetune", data_content(data))
    cache = out / f"ref_logps_{key}.safetensors"
    have = torch.tensor(float(cache.exists()))
    if dist.is_initialized():  # reused only when every rank has it: pair_logps runs collectives, all take one branch
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have:
        return load_file(str(cache))["ref"]
    table = pair_logps(args, model, ref_model, data, tokenizer, device, rank, world, policy=False)[:, 2:].contiguous()
    if rank == 0:  # written under a temporary name, then renamed: never a half cache
        out.mkdir(parents=True, exist_ok=True)
        save_file({"ref": table}, str(cache.with_suffix(".tmp")))
        os.replace(cache.with_suffix(".tmp"), cache)
    return table


def dpo_step(args, model, ref_model, data, idx, tokenizer, device, ref_table=None) -> dict:
    """One micro-batch of pairs: the summed DPO loss (the loop averages it over the global batch) and statistics."""
    batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id, args.prefix_sharing), device)
    feats, ref_feats = lm.image_features(model, ref_model, batch["pixel_values"], device)
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
    return {"loss": losses.sum(), "n": torch.tensor(float(B)), "rewards_chosen": rc.sum(), "rewards_rejected": rr.sum(),
            "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(),
            "tokens": batch["n_tokens"]}


def warm_start(args, model, tokenizer, items: list[dict], pixel, device, rank: int, world: int, out: Path, log):
    """Supervised warm start before preference training, for the random tiny model (DPO needs a policy that already
    answers): the full model with the projector (ViT frozen) on `items` ({"input_ids", "labels", "images"}),
    --sft-warmup-steps steps of the training loop above, saved as a llava-hf checkpoint in out/base_llava_hf and
    loaded back from there, as a real run starts DPO from its SFT checkpoint (it is also the adapter's base). It is
    reused while its inputs (model by its content, dtype, steps, lr, seed, the loop's warmup / weight decay /
    clipping, the tokenised items, whose images are named inside the image folder) are the same: fewer than
    cache_key's fields, since the data path stands for more than these items (a toy folder's other splits)."""
    base, key = out / "base_llava_hf", [hashlib.sha256(json.dumps(  # what the warm start depends on
        [lm.fingerprint(args.model, args.out), args.dtype, args.sft_warmup_steps, args.sft_lr, args.seed,
         args.warmup_ratio, args.weight_decay, args.grad_clip, items]).encode()).hexdigest()[:16]]
    if dist.is_initialized():  # rank 0's, as in cache_key: each node's copy of the model may have its own file times
        dist.broadcast_object_list(key, src=0)
    key = key[0]
    if not (base / f"warm_start_{key}").exists():
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("vision_tower."))
            p.data = p.data.float() if p.requires_grad else p.data
        shard(model, device)

        def step(idx, epoch):  # indices wrap around, so a set smaller than one batch still trains
            idx = [i % len(items) for i in idx]
            batch = lm.collate([items[i] for i in idx], tokenizer.pad_token_id)
            keys = [k for i in idx for k in items[i]["images"]]
            batch["pixel_values"] = torch.stack([pixel(k) for k in keys]) if keys else None
            loss, n_tokens = sft_loss_sum(model, to_device(batch, device))
            return {"loss": loss, "n": n_tokens}

        micro = max(1, 16 // world)  # a global batch of 16 samples (or the nearest multiple of the ranks)
        train(args, "sft_warmup", model, max(len(items), micro * world), step, out / f"sft_warmup_{key}", rank, world,
              log, {"": args.sft_lr}, batch_size=micro * world, micro_batch_size=micro, max_steps=args.sft_warmup_steps)
        lm.save_merged(model, tokenizer, base, rank)
        if rank == 0:
            (base / f"warm_start_{key}").write_text(json.dumps({"model": args.model, "steps": args.sft_warmup_steps}))
        dist.barrier()
    return lm.load(str(base), dtype=args.dtype, device=device, template=args.template or None,
                   attn_implementation=args.attn_implementation)[0]


# ----------------------------------------------------------------------------------------------------------
# Evaluation: generation on a VQA set, scored the LLaVA-Med way (spec 2.4); reward accuracy on held-out pairs
# ----------------------------------------------------------------------------------------------------------

def evaluate_vqa(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                 closed_scoring: str = "strict", desc: str = "eval") -> tuple[dict, list[dict]]:
    """Greedy answers for every row (lm.generate_sharded shares them out to the ranks and gathers them), scored."""
    jobs = [{"turns": [("user", r["question"])], "images": [r["image"]]} for r in rows]
    preds = lm.generate_sharded(model, tokenizer, jobs, batch_size, rank, world, desc, max_new_tokens=max_new_tokens)
    results = [dict(r, prediction=p) for r, p in zip(rows, preds)]
    return lm.score_vqa(results, closed_scoring), results


def evaluate_pairs(args, model, ref_model, data: PairData, tokenizer, device, rank, world) -> dict:
    """Implicit-reward accuracy and margin of the policy on held-out pairs, against the reference it was trained
    with (adapters off or the frozen copy; zero log-probs after --reference-free training)."""
    t = pair_logps(args, model, ref_model, data, tokenizer, device, rank, world)
    margin = args.beta * ((t[:, 0] - t[:, 2]) - (t[:, 1] - t[:, 3]))
    return {"pair_accuracy": float((margin > 0).float().mean()), "pair_margin": float(margin.mean()), "pairs": len(data)}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(Args, argv)
    if args.attn_implementation == "flash_attention_2":  # its kernel takes no [T, T] mask: two rows per pair
        args = dataclasses.replace(args, prefix_sharing=False)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master, data_dir = Path(args.out), rank == 0, Path(args.data)
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"dpo.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    warm_seed = args.seed if args.warm_start_seed < 0 else args.warm_start_seed
    torch.manual_seed(warm_seed)  # same initial weights on every rank
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None,
                               seed=warm_seed, attn_implementation=args.attn_implementation)
    eval_path = args.eval_data or (str(data_dir / "test_vqa.json") if data_dir.is_dir() else "")
    eval_rows = lm.read_vqa(eval_path, args.eval_image_folder)[:args.eval_limit or None] if args.eval and eval_path else []
    results, base = {}, args.model
    if not args.eval_only:  # ---- data, and the warm start (toy only by default)
        unreadable = {} if args.skip_bad_samples else None
        data = PairData(*load_preferences(args, "train", unreadable), tokenizer, model.config, args.max_length,
                        args.skip_bad_samples, args.allow_images_outside_folder, unreadable)
        heldout = None  # toy: held-out pairs from the val split (never test: defaults are chosen on val)
        if args.eval and data_dir.is_dir() and any((data_dir / f).exists() for f in ("prefs_val.json", "val.json")):
            heldout = PairData(*load_preferences(args, "val"), tokenizer, model.config, args.max_length, args.skip_bad_samples)
            heldout.items = heldout.items[:256]
        if master:
            print(f"pairs: {len(data)} train" + (f", {len(heldout)} held out" if heldout else "") +
                  f"; eval questions: {len(eval_rows)}")
            if data.skipped:
                print(f"warning: skipped {sum(data.skipped.values())} bad records: {data.skipped}; e.g.\n  "
                      + "\n  ".join(data.examples), file=sys.stderr)
        warm = args.sft_warmup_steps if args.sft_warmup_steps >= 0 else (1000 if args.model == "tiny" else 0)
        if warm:  # SFT on the chosen answers: a toy folder's train split (prefs_train.json's images are not in it)
            sft = PairData(*load_preferences(args, "sft"), tokenizer, model.config, args.max_length,
                           args.skip_bad_samples) if data_dir.is_dir() else data
            items = [{**it["chosen"], "images": it["images"]} for it in sft.items]
            model = warm_start(dataclasses.replace(args, sft_warmup_steps=warm, seed=warm_seed), model, tokenizer, items,
                               sft.pixel, device, rank, world, out, log)
            base = str(out / "base_llava_hf")
        torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank, whatever ran before
        model, ref_model = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                                   args.lora_dropout, args.tune_projector)
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (CleanRL's "CRUCIAL" seed offset)
    shard(model, device, args.activation_checkpointing, args.compile)
    if not args.eval_only and ref_model is not None and hasattr(ref_model, "language_model"):
        shard(ref_model, device)

    def evaluate(key: str):
        results[key], preds = evaluate_vqa(model, tokenizer, eval_rows, args.eval_batch_size, args.eval_max_new_tokens,
                                           rank, world, args.closed_scoring, "eval " + key)
        log({"phase": "eval_" + key, **results[key]})
        if master and key != "before":
            (out / "predictions.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))

    if eval_rows and args.eval_only:
        evaluate("eval")
    if not args.eval_only:  # ---- DPO
        ref_table = None
        if args.precompute_ref and not args.reference_free:
            ref_table = precompute_reference(args, model, ref_model, data, tokenizer, device, rank, world, out)
        step = lambda idx, epoch: dpo_step(args, model, ref_model, data, idx, tokenizer, device, ref_table)  # noqa: E731
        before = (lambda: evaluate("before")) if eval_rows and args.eval_before else None  # LoRA B = 0: the base model
        results["summary"] = train(args, "dpo", model, len(data), step, out / "dpo", rank, world, log,
                                   {"projector.": args.projector_lr, "": args.lr}, args.batch_size,
                                   args.micro_batch_size, args.epochs, args.max_steps, data_content(data), before)
        lm.save_trained(model, tokenizer, out, rank, base, args.full_finetune, args.export_merged, args.tune_projector)
        results["summary"]["skipped_records_train"] = data.skipped
        if heldout is not None:
            results["heldout_pairs"] = evaluate_pairs(args, model, ref_model, heldout, tokenizer, device, rank, world)
            log({"phase": "heldout_pairs", **results["heldout_pairs"]})
        if eval_rows:
            evaluate("after")
    if master:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
