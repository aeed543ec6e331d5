"""mmedpo.py -- MMedPO: clinical-aware multimodal preference optimisation (Zhu et al., ICML 2025, arXiv 2412.06141).

    # embedded default: tiny random LLaVA warm-started on data/toy's train split; D_t = the toy's prefs_train.json
    # (clinically serious errors next to wording-only re-phrasings) scored by the toy judge, D_v built on its pref
    # images; DPO (weights 1) and MMedPO (weighted) trained on the same pairs; base / DPO / MMedPO evaluated on the
    # toy test split (VQA, reports and their toy hallucination rate); CPU
    python mmedpo.py
    torchrun --nproc-per-node=2 mmedpo.py
    # Table 1 setup: one model per dataset, trained on that dataset's pairs, scored on its test split (the release
    # has one *_dpo_weighted.json per dataset, Table 5's train counts; spec B6, B8). IU-Xray from the released text
    # pairs as they are, LLaVA-Med v1.5 7B on 8 GPUs, vicuna_v1 as the release trains (--version v1)
    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b --template vicuna_v1 \\
        --data iuxray_dpo_weighted.json --image-folder /data/iu_xray/images --arms mmedpo --lr 1e-7 --epochs 3 \\
        --beta 0.1 --lora-r 128 --lora-alpha 256 --batch-size 4 --micro-batch-size 1 --max-length 1024 \\
        --report-data /data/iu_xray/test.json
    # VQA-RAD (SLAKE alike): --data vqa-rad_dpo_weighted.json --image-folder /data/vqa_rad/images
    #   --eval-data /data/vqa_rad/testset.json. The released files hold D_t only; Table 1 trains on D_t + D_v, which
    # this builds from the ground-truth training records with real judges and a lesion-map file:
    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b --template vicuna_v1 \\
        --data /data/iu_xray/train.json --image-folder /data/iu_xray/images --judge /ckpt/Llama3-Med42-70B \\
        --scorers /ckpt/Llama3-Med42-7B,/ckpt/Llama3-Med42-70B,/ckpt/BioMistral-7B --localiser file \\
        --heatmaps medklip_maps.json --arms mmedpo --lr 1e-7 --epochs 3 --beta 0.1 --lora-r 128 --lora-alpha 256 \\
        --batch-size 4 --micro-batch-size 1 --max-length 1024 --report-data /data/iu_xray/test.json
    # the released D_t as it is (its weighted_score) and D_v built from the training records: --text-data
    #   iuxray_dpo_weighted.json with --data /data/iu_xray/train.json (spec B9's offline route)
    # evaluate a checkpoint only (VQA and reports; no training data is read): every flag: python mmedpo.py --help
    python mmedpo.py --eval-only --model /ckpt/llava-med-v1.5-mistral-7b --report-data /data/iu_xray/test.json \\
        --report-image-folder /data/iu_xray/images

The algorithm (paper Sec. 3, spec part B):
  1. D_t, text dispreference: sample the target model n times on (image, question); a judge picks the most
     hallucinated candidate, or writes a plausible wrong answer when none conflicts with the ground truth.
     chosen = (x, y_gt), rejected = (x, y_l), same image.
  2. D_v, visual dispreference: a localiser gives a lesion heatmap h; noise is added inside it only,
     x* = sqrt(xi_k) (x*h) + sqrt(1 - xi_k) (eps*h) + x*(1-h). chosen = (x, y_gt), rejected = (x*, y_gt).
  3. Clinical relevance s: several judges score each D_t rejected answer (text only) over up to 5 rounds until they
     agree, else the mean of the proposed scores; a D_v pair takes the localiser's confidence.
  4. s' = clip(1 + sqrt(0.1) * standardise(s), 0.75, 1.25) per subset (--weight-mode paper; released code: raw s)
  5. Weighted DPO (paper eq. 3):  L = -E[ s' log sigma(beta [log pi(y_w|x)/ref(y_w|x) - log pi(y_l|x*)/ref(y_l|x*)]) ]

Preference records (the released *_dpo_weighted.json, read as they are; --out/prefs/mmedpo_dpo_weighted.json has the
same format plus bookkeeping fields):
    {"id", "image", "conversations": [human, gpt=y_w], "rejected_conversations": [human, gpt=y_l],
     "weighted_score": s, "rejected_image"?: noised image (visual pairs), "subset"?: "text" | "visual"}

Decisions for what the paper leaves open (spec part D, "not found"):
  - noise step k and the xi schedule: POVID's schedule (betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5,
    xi = 1 - beta), k = 500 (--noise-step), xi_bar_k = prod_{i <= k} xi_i; applied to pixels scaled to [-1, 1].
  - the score scale and the prompts (paper Fig. 8/9 are images): 0-10 read from the judge's probabilities of the labels
    "0".."10" as it writes them after the prompt, each ended by a non-alphanumeric token, divided by 10 (the released
    scores are multiples of 0.1); prompts below (JUDGE_*).
    Two scores "agree" when they are equal on that grid (--agree-tol 0.05).
  - normalisation: per subset (D_t, D_v separately: the scores come from different tools), mu / sigma of the
    subset's scores, then target mean 1 and variance 0.1, clip [0.75, 1.25]; --weight-scope global as the option.
    A subset whose scores are all equal gets weight 1.
  - candidates per question: 4 (--n-samples), temperature 1.0 (--sample-temperature).

File layout, as dpo.py's: Args -> data prep (samples, judges, text / visual dispreference, weights, pairs) -> loss ->
model setup -> training loop -> MMedPO step -> evaluation (VQA, reports) -> main(). The blocks marked
"# Copied from dpo.py: <name>" are dpo.py's, byte for byte (tests/test_copies.py); the rest is MMedPO.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data and model (fields down to --curate-batch-size change the built pairs and key their cache in --out/prefs)
    data: str = "data/toy"  # toy-format folder or ground-truth LLaVA json (pairs are built), or a preference json
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    max_samples: int = -1  # build pairs from N (image, question) samples, a seeded draw (0 = all; -1 = 320 on toy)
    max_length: int = 512  # tokens per sequence, image tokens included
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths (released rejected_image paths)
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf)
    template: str = ""  # chat template override ("" = the checkpoint's: mistral_instruct, vicuna_v1, ...)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"  # transformers attention kernel
    sft_warmup_steps: int = -1  # SFT steps on the ground truth first; -1 = 1000 for --model tiny (random), else 0
    sft_lr: float = 1e-3  # learning rate of that warm-up (full model, projector included)
    warm_start_seed: int = 0  # seed of the tiny model's random init and its warm start, which stand in for the SFT checkpoint a real run starts from: one fixed model (as dpo.py); --seed varies pairs and training only (-1 = --seed)
    seed: int = 0  # same seed + same data = same run
    # text dispreference D_t (paper 3.1)
    text_pairs: bool = True  # build D_t
    n_samples: int = 4  # candidates sampled from the target model per question (paper: not stated)
    sample_temperature: float = 1.0  # sampling temperature of the candidates (paper: not stated)
    sample_max_new_tokens: int = 48  # length cap of a candidate (and of a judge-written answer)
    text_data: str = "auto"  # D_t: "build" (sampled and judged, paper 3.1), or a preference json read as D_t (the release format), scored by --scorers where it has no weighted_score; auto = a toy folder's prefs_train.json (pairs on its pref images; D_v is then built on pref.json), else build
    judge: str = "auto"  # hallucination judge: a checkpoint folder, "toy" (reads the toy's findings), "tiny" (random, offline), "rule" (offline fallback); auto = toy on a toy folder, else tiny
    halluc_threshold: float = 0.5  # a candidate the judge rates below this is "no significant hallucination"
    # clinical relevance scores (paper 3.2)
    scorers: str = "auto"  # comma list of judges: checkpoint folders, "tiny:SEED", "rule", or "toy" alone; auto = toy on a toy folder, else tiny:1,tiny:2,tiny:3
    max_rounds: int = 5  # debate rounds before falling back to the mean (paper App. B: 5)
    agree_tol: float = 0.05  # two scores agree when they differ by at most this (scores are on a 0.1 grid)
    # visual dispreference D_v (paper 3.1)
    visual_pairs: bool = True  # build D_v
    localiser: Literal["boxes", "attention", "file"] = "boxes"  # ground-truth findings boxes, the policy's image-token attention, or --heatmaps
    heatmaps: str = ""  # --localiser file: json {image: {"heatmap": png (relative to the json), "confidence": s}}
    region_std: float = -1.0  # soft maps: region = h > mean + region_std * std (released code: mean - std)
    noise: Literal["diffusion", "replace", "global"] = "diffusion"  # paper; released code (N(0, 10) pixels); ablation (whole image)
    noise_step: int = 500  # diffusion step k of the paper's blend (POVID schedule, 1000 steps)
    curate_batch_size: int = 32  # samples per generate call when building pairs (x --n-samples candidates)
    # reading pairs (fields from here on leave the built pairs as they are)
    rejected_image_folder: str = ""  # a preference file's rejected_image paths are relative to this ("" = --image-folder)
    skip_bad_samples: bool = False  # count and skip bad pairs instead of stopping at the first one
    # policy, weights and loss
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 16  # LoRA rank (toy default, as dpo.py's val sweep: r 128 is full rank on the 128-wide tiny model; MMedPO train_dpo_visual-text.sh: 128)
    lora_alpha: int = 32  # LoRA alpha (toy default, alpha / r = 2 as the release's 256 / 128)
    lora_dropout: float = 0.0  # off, as in the release (dpo_trainer_weighted.py disable_dropout=True, TRL's default)
    tune_projector: bool = False  # also train the mm projector (mm_projector_lr 2e-5 in the script; ambiguous)
    weight_mode: Literal["paper", "raw", "none"] = "paper"  # standardise, mean 1, var 0.1, clip [0.75, 1.25]; the released code's raw score (toy val closed acc. minus the uniform arm's: paper -1.4..+3.8, raw -5.2..+1.4, see README); weights 1
    weight_scope: Literal["subset", "global"] = "subset"  # normalise per subset (D_t, D_v) or over all pairs
    beta: float = 0.5  # DPO temperature (toy default from the val sweep: MMedPO - DPO closed acc. +3.8 at 0.5, -0.3 at 2 (1 epoch); the released trainer: 0.1)
    arms: str = "dpo,mmedpo"  # what to train: "dpo" (same pairs, weights 1) and/or "mmedpo" (weighted)
    # optimisation
    lr: float = 1e-3  # peak learning rate (toy default, dpo.py's val sweep; 1e-5 moved no greedy answer; the paper: 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # learning rate of the projector when --tune-projector
    batch_size: int = 16  # pairs per optimizer step over all ranks (global; does not depend on the number of ranks)
    epochs: int = 1  # passes over the preference pairs (toy: 66 steps; at beta 0.5 3 epochs drift both arms below the warm start on val, 63.2 / 63.9 vs 66.3; paper: 3)
    max_steps: int = -1  # stop after this many optimizer steps (-1 = epochs decide)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # pairs per forward on one rank; accumulation = batch / (micro * ranks)
    prefix_sharing: bool = True  # one row per text pair: its two answers share image and prompt (exact; Wang & Hegde 2024)
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    compile: bool = False  # torch.compile each decoder layer (GPU: faster steps after a one-off compile)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # output
    out: str = "runs/mmedpo"  # prefs/, base_llava_hf/, <arm>/checkpoints, <arm>/adapter, metrics.jsonl, results.json
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    resume: bool = True  # reuse built pairs and continue each arm from its newest complete checkpoint made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    export_merged: bool = False  # also write each arm's merged model as a llava-hf checkpoint
    # evaluation
    eval: bool = True  # evaluate base (before training) and every trained arm
    eval_only: bool = False  # only evaluate --model on the VQA and report sets (no training data is read)
    eval_data: str = ""  # VQA set (toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json); "" = toy test
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    report_data: str = ""  # report set, LLaVA json whose last gpt turn is the report ("" = toy test.json)
    report_image_folder: str = ""  # images of --report-data ("" = --image-folder when given, else next to it)
    eval_limit: int = 0  # first N questions / reports (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # VQA answer cap
    report_max_new_tokens: int = 64  # report cap
    closed_scoring: Literal["strict", "llava_med", "llava_med_batch"] = "strict"  # strict (ours); llava_med|llava_med_batch add run_eval(_batch).py's numbers (lm.score_vqa)


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


# Copied from dpo.py: cache_key
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


# Copied from dpo.py: cli
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


# Copied from dpo.py: setup_distributed
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


# Copied from dpo.py: jsonl_logger
def jsonl_logger(path: Path, rank: int):
    """log(row): append one json line to `path` on rank 0 (metrics.jsonl); other ranks write nothing."""
    def log(row: dict):
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return log


# ----------------------------------------------------------------------------------------------------------
# Data prep 1: ground-truth samples (image, question, answer) from LLaVA conversation records
# ----------------------------------------------------------------------------------------------------------


def gt_samples(records: list[tuple[str, dict]], folder: Path, allow_outside: bool = False) -> list[dict]:
    """One sample per (human, gpt) turn pair of each single-image record: {"id", "image" (relative), "path"
    (resolved), "question", "answer", "where", "record"}. The toy records' turns are their QA items followed by
    "Describe the image." -> report."""
    samples = []
    for where, rec in records:
        images = lm.record_images(rec, where)
        if len(images) != 1:
            raise lm.DataError(f"{where}: MMedPO pairs need exactly one image per record, got {len(images)}")
        path = lm.resolve_image(folder, images[0], where, allow_outside)
        turns = lm.record_turns(rec, where)
        for k in range(0, len(turns) - 1, 2):
            q = turns[k][1].replace(lm.IMAGE_MARKER + "\n", "").replace(lm.IMAGE_MARKER, "").strip()
            samples.append({"id": f"{rec.get('id', where)}_t{k // 2}", "image": images[0], "path": str(path),
                            "question": q, "answer": turns[k + 1][1].strip(), "where": where, "record": rec})
    return samples


def prompt_ids(tokenizer, cfg: lm.LlavaMedConfig, question: str, n_images: int = 1) -> list[int]:
    turns = lm.place_image_markers([("user", question)], n_images)
    return lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)


def _seed_of(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------------------
# Data prep 2: judges -- the offline rule judge, and a language model read through its label probabilities
# ----------------------------------------------------------------------------------------------------------

# Paper Fig. 8 / 9 show the GPT-4o / Med-LLM prompts only as images (spec B2, B4): these are ours.
JUDGE_HALLUCINATION = ("You check a medical AI's answer against the ground truth.\nGround truth: {gt}\n"
                       "Candidate answer: {cand}\nDoes the candidate contradict the ground truth (a hallucination)? "
                       "Answer yes or no.")
JUDGE_WRITE = ("Ground truth answer about a medical image: {gt}\nWrite a plausible but wrong answer that misreads the "
               "image: a wrong finding, a wrong location or a wrong diagnosis. Reply with the answer only.")
JUDGE_SCORE = ("Rate how clinically relevant the errors in this answer about a medical image would be, from 0 "
               "(harmless) to 10 (dangerous for the patient).\nAnswer: {text}")
JUDGE_SCORE_PREV = "\nAnother reviewer gave {prev}/10. Repeat that score if you agree, otherwise give yours."
SCORE_LABELS = [str(i) for i in range(11)]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rule_hallucination(gt: str, cand: str) -> float:
    """Offline fallback judge: 1 for a yes/no flip, else 1 - token F1 with the ground truth (0 = same words)."""
    first = {w[0] for w in (_words(gt)[:1], _words(cand)[:1]) if w}
    if first == {"yes", "no"}:
        return 1.0
    g, c = Counter(_words(gt)), Counter(_words(cand))
    common = sum((g & c).values())
    if not common:
        return 1.0
    p, r = common / sum(c.values()), common / sum(g.values())
    return 1.0 - 2 * p * r / (p + r)


SWAPS = [("left", "right"), ("upper", "lower"), ("no abnormality", "a mass"), ("normal", "abnormal"),
         ("clear", "opacified"), ("benign", "malignant"), ("present", "absent"), ("yes", "no")]


def corrupt_ground_truth(gt: str, pool: list[str], rng: random.Random) -> str:
    """Rule-based hallucination (the named offline fallback of the judge's "write a wrong answer"): swap the first
    applicable clinical opposite (left/right, upper/lower, normal/abnormal, ..., yes/no last); with none, another answer
    to the same kind of question from `pool`; else a generic wrong finding."""
    for a, b in SWAPS:
        pat = re.compile(rf"\b({re.escape(a)}|{re.escape(b)})\b", re.IGNORECASE)
        if pat.search(gt):
            def flip(m, a=a, b=b):
                w = b if m.group(0).lower() == a else a
                return w.capitalize() if m.group(0)[0].isupper() else w
            return pat.sub(flip, gt)
    others = sorted({p for p in pool if p.strip().lower() != gt.strip().lower()})
    if others:
        return rng.choice(others)
    return "There is a large mass with surrounding effusion."


class RuleJudge:
    """The offline, rule-based judge (named as such in the built records): hallucination by rule_hallucination,
    wrong answers by corrupt_ground_truth, clinical relevance by counting terms of data/medical_terms.txt."""
    name = "rule"

    def __init__(self):
        terms = (lm.REPO / "data" / "medical_terms.txt").read_text().splitlines()
        self.terms = [t.strip() for t in terms if t.strip() and not t.startswith("#")]

    def hallucination(self, gts, cands):
        return [rule_hallucination(g, c) for g, c in zip(gts, cands)]

    def write_wrong(self, gts, seed):
        return ["" for _ in gts]  # the caller falls back to corrupt_ground_truth

    def score(self, texts, prevs):
        out = []
        for t in texts:
            low = " " + " ".join(_words(t)) + " "
            n = sum(low.count(f" {term} ") for term in self.terms)
            out.append(min(10, 2 * n) / 10)
        return out


class ModelJudge:
    """A language model as judge, text only (the paper's judges see no image). "tiny:SEED" is the tiny random LLaVA
    (offline; its verdicts are noise, which the toy run shows honestly), a folder a LLaVA checkpoint (llava_med.load)
    or any causal LM (transformers, safetensors, no remote code). Decisions are read from next-token probabilities
    over fixed labels, never parsed from free text. Every rank holds the whole judge; the prompts are shared out."""

    def __init__(self, spec: str, device, rank: int = 0, world: int = 1, max_new_tokens: int = 48, batch_size: int = 32):
        self.name, self.device, self.max_new_tokens = spec, device, max_new_tokens
        self.rank, self.world, self.batch_size = rank, world, batch_size
        if spec.startswith("tiny"):
            seed = int(spec.split(":")[1]) if ":" in spec else 0
            self.model, self.tok = lm.load("tiny", device=device, seed=1000 + seed)
            self.llava = True
        elif not (Path(spec) / "config.json").exists():
            raise lm.ModelError(f"{spec}: judge folder without config.json (--judge / --scorers: tiny:SEED, rule or a checkpoint)")
        elif json.loads((Path(spec) / "config.json").read_text()).get("model_type", "").startswith("llava"):
            self.model, self.tok = lm.load(spec, device=device)
            self.llava = True
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(spec)
            dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, use_safetensors=True).to(device)
            self.llava = False
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
        self.model.eval()
        # the KV-cache argument of its forward: LlavaMed's past_key_values (it passes the decoder's own name on);
        # a transformers LM's `cache` from 5.24 (where past_key_values warns, and goes in 5.40), past_key_values before
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _prompt(self, text: str) -> list[int]:
        if self.llava:
            cfg = self.model.config
            return lm.tokenize_prompt(self.tok, [("user", text)], cfg.template, cfg.num_image_tokens, cfg.image_token_id)
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        return self.tok.encode(text + "\n", add_special_tokens=True)

    def _label_tails(self, text: str, labels: list[str]) -> list[list[int]]:
        """The tokens this judge emits for each label right after its prompt, as its own answer format writes them:
        a LLaVA judge through its training template (mistral_instruct trains ' 10 </s>', so the space after [/INST]
        comes first), a chat model through its chat template, any other LM as prompt + label. Each is cut after the
        last token the label needs; what follows (the stop) is scored as 'a token that ends the label'."""
        head, tails = self._prompt(text), []
        for lab in labels:
            if self.llava:
                cfg = self.model.config
                full = lm.tokenize_conversation(self.tok, [("user", text), ("assistant", lab)], cfg.template,
                                                cfg.num_image_tokens, cfg.image_token_id)["input_ids"]
            elif getattr(self.tok, "chat_template", None):
                full = self.tok.apply_chat_template([{"role": "user", "content": text}, {"role": "assistant",
                                                     "content": lab}], tokenize=True, return_dict=False)
            else:
                full = self.tok.encode(text + "\n" + lab, add_special_tokens=True)
            tail = full[len(head):] if full[:len(head)] == head else lm.encode_segment(self.tok, lab, text)
            cut = next((j for j in range(1, len(tail) + 1) if self.tok.decode(tail[:j]).strip() == lab), len(tail))
            if not cut:
                raise ValueError(f"judge {self.name}: label {lab!r} gives no tokens")
            tails.append(tail[:cut])
        return tails

    def _continues(self, anchor: int, size: int) -> torch.Tensor:
        """[size] bool: the tokens that would extend a label into a longer word or number ('0' after '1' is "10"):
        their text, written after a label token, starts with a letter or digit. Any other token (space, punctuation,
        newline, EOS, a stop) ends the label. Computed once per judge."""
        if getattr(self, "_cont", None) is None or len(self._cont) != size:
            base = self.tok.decode([anchor])
            texts = self.tok.batch_decode([[anchor, v] for v in range(min(len(self.tok), size))])
            self._cont = torch.zeros(size, dtype=torch.bool)
            self._cont[:len(texts)] = torch.tensor([t[len(base):][:1].isalnum() for t in texts])
        return self._cont

    @torch.no_grad()
    def label_logprobs(self, prompts: list[str], labels: list[str]) -> torch.Tensor:
        """[len(prompts), len(labels)]: log p(label | prompt) = log p(its tokens as the judge writes them after the
        prompt, _label_tails) + log p(a token that ends it, _continues). Without the end term, with digits as single
        tokens (Llama, Mistral), log p("10") = log p("1") + log p("0" | "1") <= log p("1") and a judge meaning 10 is
        read as 1. The prompt runs once; the label continuations then run on copies of its KV cache. The prompts go
        in fixed batches, batch b on rank b % world (the same numbers for any number of ranks), summed over ranks."""
        tails = self._label_tails(prompts[0], labels)  # the answer format does not depend on the prompt's text
        rows = list(dict.fromkeys(tuple(t) for t in tails if not any(len(u) > len(t) and u[:len(t)] == t
                                                                     for u in tails)))  # "1" runs inside "10"
        row_of = [next(r for r, u in enumerate(rows) if list(u[:len(t)]) == t) for t in tails]
        R, L = len(rows), max(map(len, rows))
        tail_ids = torch.tensor([list(r) + [self.tok.pad_token_id] * (L - len(r)) for r in rows], device=self.device)
        out = torch.zeros(len(prompts), len(labels), device=self.device)
        step = max(1, 64 // R)
        for i in range(self.rank * step, len(prompts), self.world * step):
            batch = lm.collate([{"input_ids": self._prompt(p)} for p in prompts[i:i + step]], self.tok.pad_token_id,
                               padding_side="left")
            ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            cache = {self.cache_arg: transformers.DynamicCache()}  # ours, filled in place by the decoder
            first = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                               **cache)
            cache[self.cache_arg].batch_repeat_interleave(R)  # row b*R + r: prompt b, continuation r
            B = ids.shape[0]
            attn = torch.cat([attn.repeat_interleave(R, 0), attn.new_ones(B * R, L)], -1)
            pos = pos[:, -1:].repeat_interleave(R, 0) + 1 + torch.arange(L, device=self.device)
            nxt = self.model(input_ids=tail_ids.repeat(B, 1), attention_mask=attn, position_ids=pos, use_cache=True,
                             **cache)
            lp = torch.cat([first.logits.float().repeat_interleave(R, 0), nxt.logits.float()], 1).log_softmax(-1)
            lp = lp.view(B, R, L + 1, -1)  # lp[b, r, j] predicts token j of continuation r
            ends = lp[..., ~self._continues(tails[0][-1], lp.shape[-1]).to(lp.device)].logsumexp(-1)
            for k, t in enumerate(tails):
                out[i:i + B, k] = sum(lp[:, row_of[k], j, tok] for j, tok in enumerate(t)) + ends[:, row_of[k], len(t)]
        if self.world > 1:
            dist.all_reduce(out)  # each row was computed on one rank (zeros elsewhere)
        return out.cpu()

    def hallucination(self, gts, cands):
        prompts = [JUDGE_HALLUCINATION.format(gt=g, cand=c) for g, c in zip(gts, cands)]
        lp = self.label_logprobs(prompts, ["yes", "Yes", "no", "No"])  # chat models mostly answer "Yes, ..."
        return lp.softmax(-1)[:, :2].sum(-1).tolist()  # P(yes, it contradicts)

    def write_wrong(self, gts, seed):
        if not self.llava:
            return ["" for _ in gts]  # free generation with an arbitrary causal LM: use the rule fallback instead
        jobs = [{"turns": [("user", JUDGE_WRITE.format(gt=g))], "images": []} for g in gts]
        return lm.generate_sharded(self.model, self.tok, jobs, self.batch_size, self.rank, self.world, "judge writes",
                                   seed=seed, max_new_tokens=self.max_new_tokens, temperature=0.7)

    def score(self, texts, prevs):
        prompts = [JUDGE_SCORE.format(text=t) + (JUDGE_SCORE_PREV.format(prev=round(10 * p)) if p is not None else "")
                   for t, p in zip(texts, prevs)]
        return [int(k) / 10 for k in self.label_logprobs(prompts, SCORE_LABELS).argmax(-1)]


def make_judge(spec: str, device, rank: int, world: int, args: Args):
    if spec == "toy":  # the toy's stand-in for the paper's judges (data/toy_oracles.py; reads the toy's findings)
        from data.toy_oracles import ToyJudge

        return ToyJudge()
    return RuleJudge() if spec == "rule" else ModelJudge(spec, device, rank, world, args.sample_max_new_tokens,
                                                         args.curate_batch_size)


# ----------------------------------------------------------------------------------------------------------
# Data prep 3: text dispreference D_t -- the judge picks (or writes) the hallucinated answer; clinical relevance
# scores by a multi-judge debate (paper 3.1, 3.2, App. B)
# ----------------------------------------------------------------------------------------------------------


def choose_rejected(judge, gts: list[str], candidates: list[list[str]], threshold: float, pools: list[list[str]],
                    seed: int) -> list[tuple[str, str]]:
    """(rejected answer, source) per sample. Candidates that say the ground truth (after normalisation) or nothing
    are never picked; of the rest the judge's most hallucinated one is taken if it reaches `threshold` (paper 3.1:
    "the response with the most hallucination"). Otherwise the judge writes a wrong answer ("judge_written"), and if
    that is empty or the ground truth, corrupt_ground_truth ("rule_corruption")."""
    norm = lm.normalize_answer
    real = [[c for c in dict.fromkeys(cs) if c.strip() and norm(c) != norm(g)]
            for g, cs in zip(gts, candidates, strict=True)]
    flat = [(i, c) for i, cs in enumerate(real) for c in cs]
    degrees = judge.hallucination([gts[i] for i, _ in flat], [c for _, c in flat]) if flat else []
    out = [None] * len(gts)
    best = {}
    for (i, c), d in zip(flat, degrees):
        if d >= threshold and (i not in best or d > best[i][1]):
            best[i] = (c, d)
    for i, (c, _) in best.items():
        out[i] = (c, "sampled")
    need = [i for i in range(len(gts)) if out[i] is None]
    written = judge.write_wrong([gts[i] for i in need], seed) if need else []
    for i, w in zip(need, written):
        if w.strip() and norm(w) != norm(gts[i]):
            out[i] = (w.strip(), "judge_written")
        else:
            out[i] = (corrupt_ground_truth(gts[i], pools[i], random.Random(seed * 7919 + i)), "rule_corruption")
    return out


def debate_scores(texts: list[str], judges: list, max_rounds: int = 5, tol: float = 0.05) -> list[dict]:
    """For each text: judge G_1 proposes s_1 (history S = [s_1]); each next judge sees the current score and
    agrees (|s - current| <= tol) or proposes a new one, appended to S. Consensus = every judge in a row has
    agreed with the current score: that score is taken. After `max_rounds` passes over the judges without
    consensus, the mean of S. Batched over texts: each judge is called once per turn on the undecided texts.
    Returns [{"score", "rounds", "agreed", "history"}]."""
    n = len(texts)
    current, streak = [None] * n, [0] * n
    history, done = [[] for _ in range(n)], [None] * n
    for rnd in range(1, max_rounds + 1):
        for judge in judges:
            live = [i for i in range(n) if done[i] is None]
            if not live:
                return done
            scores = judge.score([texts[i] for i in live], [current[i] for i in live])
            for i, s in zip(live, scores, strict=True):
                if current[i] is not None and abs(s - current[i]) <= tol:
                    streak[i] += 1
                else:
                    current[i], streak[i] = float(s), 1
                    history[i].append(float(s))
                if streak[i] == len(judges):
                    done[i] = {"score": current[i], "rounds": rnd, "agreed": True, "history": history[i]}
    for i in range(n):
        if done[i] is None:
            done[i] = {"score": sum(history[i]) / len(history[i]), "rounds": max_rounds, "agreed": False,
                       "history": history[i]}
    return done


def text_dispreference(args: Args, model, tokenizer, samples: list[dict], device, rank: int, world: int):
    """D_t records and statistics: n sampled candidates per sample (lm.generate_sharded: fixed batches and seeds,
    the same for any number of ranks), the judge's choice, then the scorers' debate over each distinct rejected text."""
    pools = {}  # question -> ground-truth answers seen for it: material for the rule corruption
    for s in samples:
        pools.setdefault(s["question"], set()).add(s["answer"])
    jobs = [{"turns": [("user", s["question"])], "images": [s["path"]]} for s in samples for _ in range(args.n_samples)]
    flat = lm.generate_sharded(model, tokenizer, jobs, args.curate_batch_size * args.n_samples, rank, world,
                               "candidates", seed=_seed_of(args.seed, "sample"),
                               max_new_tokens=args.sample_max_new_tokens, temperature=args.sample_temperature)
    cands = [flat[i * args.n_samples:(i + 1) * args.n_samples] for i in range(len(samples))]
    judge = make_judge(args.judge, device, rank, world, args)
    picked = choose_rejected(judge, [s["answer"] for s in samples], cands, args.halluc_threshold,
                             [sorted(pools[s["question"]]) for s in samples], seed=_seed_of(args.seed, "judge"))
    del judge
    if args.scorers == "toy":  # the toy scorer reads the pair (ground truth, rejected, findings), not the text alone
        from data.toy_oracles import ToyJudge

        verdicts = [ToyJudge.relevance(s["answer"], rej, s["record"].get("findings", [])) for s, (rej, _) in
                    zip(samples, picked)]
        distinct = [rej for rej, _ in picked]
    else:
        scorers = [make_judge(s.strip(), device, rank, world, args) for s in args.scorers.split(",") if s.strip()]
        distinct = sorted({t for t, _ in picked})  # the judges see the text only: score each distinct answer once
        by_text = dict(zip(distinct, debate_scores(distinct, scorers, args.max_rounds, args.agree_tol)))
        verdicts = [by_text[rej] for rej, _ in picked]
    records = []
    for s, (rej, source), v in zip(samples, picked, verdicts):
        human = {"from": "human", "value": "<image>\n" + s["question"]}
        records.append({"id": s["id"] + "_text", "image": s["image"], "subset": "text",
                        "conversations": [human, {"from": "gpt", "value": s["answer"]}],
                        "rejected_conversations": [human, {"from": "gpt", "value": rej}],
                        "weighted_score": round(v["score"], 4), "rejected_source": source,
                        "judge": args.judge, "debate_rounds": v["rounds"], "debate_agreed": v["agreed"],
                        **({"judge_kind": v["toy_kind"]} if "toy_kind" in v else {})})
    return records, {"text_pairs": len(picked), "text_rejected_source": dict(Counter(src for _, src in picked)),
                     **text_score_stats(verdicts, len(set(distinct)))}


def text_score_stats(verdicts: list[dict], distinct: int) -> dict:
    """Curation statistics of the D_t scores: debate agreement and rounds, the score histogram, the toy kinds."""
    out = {"debate_agreed": sum(v["agreed"] for v in verdicts), "debate_distinct_texts": distinct,
           "debate_mean_rounds": sum(v["rounds"] for v in verdicts) / max(len(verdicts), 1),
           "text_scores": dict(sorted(Counter(round(v["score"], 2) for v in verdicts).items()))}
    if any("toy_kind" in v for v in verdicts):
        out["toy_kinds"] = dict(Counter(v.get("toy_kind") for v in verdicts))
    return out


def read_text_pairs(args: Args, path: Path, device, rank: int, world: int):
    """D_t read from a preference file (the release format) instead of built: each pair's weighted_score where it
    has one (the released files), else the clinical relevance by --scorers: the debate over the rejected texts, or
    the toy scorer on (chosen, rejected, the pair's toy_findings). Records as text_dispreference's."""
    raw = lm.read_records(path)
    texts, need = [], []
    for where, rec in raw:
        chosen, rejected = pair_turns(rec, where)
        texts.append((chosen[-1][1], rejected[-1][1]))
        if not isinstance(rec.get("weighted_score"), (int, float)):
            need.append(len(texts) - 1)
    verdicts = {}
    if need and args.scorers == "toy":
        from data.toy_oracles import ToyJudge

        for i in need:
            where, rec = raw[i]
            findings = rec.get("toy_findings", rec.get("findings"))
            if not isinstance(findings, list):
                raise lm.DataError(f"{where}: --scorers toy needs the pair's toy_findings (or findings) list")
            verdicts[i] = ToyJudge.relevance(*texts[i], findings)
    elif need:
        scorers = [make_judge(s.strip(), device, rank, world, args) for s in args.scorers.split(",") if s.strip()]
        distinct = sorted({texts[i][1] for i in need})
        by_text = dict(zip(distinct, debate_scores(distinct, scorers, args.max_rounds, args.agree_tol)))
        verdicts = {i: by_text[texts[i][1]] for i in need}
    records = []
    for i, (where, rec) in enumerate(raw):
        keep = {k: v for k, v in rec.items() if not k.startswith("toy_")}  # the toy's documentation is not trained on
        v = verdicts.get(i)
        score = rec["weighted_score"] if v is None else round(v["score"], 4)
        records.append({**keep, "id": str(rec.get("id", where)), "subset": "text", "weighted_score": score,
                        "rejected_source": "read", **({"scorers": args.scorers, "debate_rounds": v["rounds"],
                                                       "debate_agreed": v["agreed"]} if v else {}),
                        **({"judge_kind": v["toy_kind"]} if v and "toy_kind" in v else {})})
    return records, {"text_pairs": len(records), "text_read": str(path), "text_scored": len(need),
                     **text_score_stats(list(verdicts.values()), len({texts[i][1] for i in need}))}


# ----------------------------------------------------------------------------------------------------------
# Data prep 4: visual dispreference D_v -- lesion localiser, then noise inside the region (paper 3.1)
# ----------------------------------------------------------------------------------------------------------


def box_heatmap(rec: dict, width: int, height: int):
    """Ground-truth localiser: h = 1 inside the union of the record's findings boxes [x1, y1, x2, y2] (pixel
    edges), confidence 1 (ground truth). None when the record has no box (a normal image has no lesion region)."""
    boxes = [f["box"] for f in rec.get("findings", []) if isinstance(f, dict) and f.get("box")]
    if not boxes:
        return None
    h = np.zeros((height, width), dtype=np.float32)
    for x1, y1, x2, y2 in boxes:
        h[max(0, int(y1)):min(height, int(y2)), max(0, int(x1)):min(width, int(x2))] = 1.0
    return h, 1.0


@torch.no_grad()
def attention_heatmap(model, tokenizer, path: str, question: str, region_std: float = -1.0, last_layers: int = 2):
    """The policy's own localiser: attention from the last prompt token to the image tokens, averaged over the heads
    of the last `last_layers` decoder layers, laid on the patch grid and upsampled to the (padded-square) image, then
    cropped back to the image. Confidence = the share of that attention inside the region the noise goes into
    (binarise(heat, region_std), the caller's --region-std). The released s_v is MedKLIP's P(disease) (spec B3),
    which this localiser has no classifier for; attention share is ours."""
    cfg = model.config
    im = lm.load_image(path)
    ids = torch.tensor([prompt_ids(tokenizer, cfg, question)])
    dev = next(model.parameters()).device
    lmm = model.language_model.model
    old = lmm.config._attn_implementation
    lmm.config._attn_implementation = "eager"  # sdpa returns no attention weights
    try:
        embeds = model.embed(ids.to(dev), lm.image_tensor(cfg, im).unsqueeze(0).to(dev))
        att = lmm(inputs_embeds=embeds, output_attentions=True).attentions
    finally:
        lmm.config._attn_implementation = old
    a = torch.stack([x[0, :, -1].float() for x in att[-last_layers:]]).mean((0, 1))  # [T]
    img = a[(ids[0] == cfg.image_token_id).to(dev)]
    if cfg.vision_feature_select_strategy == "full":
        img = img[1:]
    side = int(round(math.sqrt(img.numel())))
    w, h = im.size
    sq = max(w, h)
    grid = img.reshape(1, 1, side, side)
    heat = F.interpolate(grid, size=(sq, sq), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    top, left = (sq - h) // 2, (sq - w) // 2
    heat = heat[top:top + h, left:left + w]
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    region = binarise(heat, region_std)
    conf = float(heat[region].sum() / max(float(heat.sum()), 1e-12))
    return heat.astype(np.float32), conf


def file_heatmap(index: dict, index_dir: Path, image_rel: str, width: int, height: int):
    """External maps (MedKLIP or any grounding tool): index[image] = {"heatmap": grey PNG relative to the index
    file, "confidence": s}; the map is resized to the image. None when the image has no entry."""
    entry = index.get(image_rel)
    if entry is None:
        return None
    heat = lm.load_image(index_dir / entry["heatmap"]).convert("L").resize((width, height), Image.BILINEAR)
    return np.asarray(heat, dtype=np.float32) / 255.0, float(entry.get("confidence", 1.0))


def binarise(heat: np.ndarray, region_std: float) -> np.ndarray:
    """Region of a soft map: h > mean + region_std * std (the released curation code uses mean - std)."""
    return heat > heat.mean() + region_std * heat.std()


def povid_xi_bar(k: int, steps: int = 1000) -> float:
    """xi_bar_k = prod_{i<=k} (1 - beta_i) with POVID's sigmoid schedule (the paper states neither k nor xi; spec B3)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[k - 1]) if k > 0 else 1.0


def local_noise(image: np.ndarray, region: np.ndarray, mode: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] image, bool [H, W] region -> noised uint8 image.
    diffusion (paper): x* = sqrt(xi_k) (x h) + sqrt(1 - xi_k) (eps h) + x (1 - h), eps ~ N(0, I), on pixels in [-1, 1];
    global (ablation): the same with h = 1 everywhere;
    replace (released inference_attention-map_score.py): region pixels := clip(N(0, 10), 0, 255) (near-black speckle).
    Pixels outside the region are returned unchanged (copied, not recomputed)."""
    if mode == "global":
        region = np.ones(image.shape[:2], dtype=bool)
    out = image.copy()
    if mode == "replace":
        out[region] = np.clip(rng.normal(0.0, 10.0, size=out[region].shape), 0, 255).astype(np.uint8)
        return out
    if mode not in ("diffusion", "global"):
        raise ValueError(f"unknown --noise {mode!r} (diffusion, replace, global)")
    a = povid_xi_bar(k)
    x = image.astype(np.float64) / 127.5 - 1.0
    h = region[..., None].astype(np.float64)
    eps = rng.standard_normal(image.shape)
    noised = math.sqrt(a) * (x * h) + math.sqrt(1 - a) * (eps * h) + x * (1 - h)
    noised = np.clip(np.round((noised + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out[region] = noised[region]
    return out


def visual_dispreference(args: Args, model, tokenizer, samples: list[dict], prefs_dir: Path, rank: int):
    """D_v records and statistics: per distinct image, its lesion map (--localiser), the region, the noised copy
    (seeded by the image) written to prefs_dir/noised by rank 0. Every rank computes every map (one forward per
    image at most, with --localiser attention): the same records on every rank without communication."""
    first = {}
    for s in samples:
        first.setdefault(s["image"], s)
    index = json.loads(Path(args.heatmaps).read_text()) if args.localiser == "file" else {}
    (prefs_dir / "noised").mkdir(parents=True, exist_ok=True)
    found = {}
    for rel, s in first.items():
        im = lm.load_image(s["path"])
        if args.localiser == "boxes":
            got = box_heatmap(s["record"], *im.size)
        elif args.localiser == "attention":
            got = attention_heatmap(model, tokenizer, s["path"], s["question"], args.region_std)
        else:
            got = file_heatmap(index, Path(args.heatmaps).parent, rel, *im.size)
        if got is None:
            found[rel] = None
            continue
        heat, conf = got
        region = heat > 0.5 if args.localiser == "boxes" else binarise(heat, args.region_std)
        noised = local_noise(np.asarray(im.convert("RGB")), region, args.noise, args.noise_step,
                             np.random.default_rng(_seed_of(args.seed, "noise", rel)))
        name = (re.sub(r"[^\w.-]", "_", rel.rsplit(".", 1)[0]) + f"_{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
                f"_{args.localiser}_{args.noise}.png")  # the hash of the path: a/b.png and a_b.png get two files
        if rank == 0:  # a grey image stays grey (L): the rejected side is preprocessed (padded) as the chosen one
            Image.fromarray(noised).convert(im.mode).save(prefs_dir / "noised" / name)
        found[rel] = {"rejected_image": "noised/" + name, "confidence": round(conf, 4), "region": float(region.mean())}
    records = []
    for s in samples:
        v = found[s["image"]]
        if v is None:
            continue
        human = {"from": "human", "value": "<image>\n" + s["question"]}
        gpt = {"from": "gpt", "value": s["answer"]}  # the same ground-truth text on both sides; only the image differs
        records.append({"id": s["id"] + "_visual", "image": s["image"], "subset": "visual",
                        "conversations": [human, gpt], "rejected_conversations": [human, gpt],
                        "rejected_image": v["rejected_image"], "weighted_score": v["confidence"],
                        "localiser": args.localiser, "noise": args.noise, "region_fraction": v["region"]})
    return records, {"visual_pairs": len(records), "images_without_region": sum(v is None for v in found.values())}


# ----------------------------------------------------------------------------------------------------------
# Data prep 5: the training pairs (built and cached, or read), their weights
# ----------------------------------------------------------------------------------------------------------


def preference_records(args: Args, model, tokenizer, raw, samples, out: Path, device, rank: int, world: int):
    """D_t + D_v built from ground-truth `samples` with the (warm-started) model, written in the release format to
    out/prefs/mmedpo_dpo_weighted.json (+ curation.json, statistics) and reused while their key holds: every Args
    field above --rejected-image-folder and a digest of the ground-truth records. Returns (records, stats)."""
    prefs = out / "prefs"
    text_file = args.text_data != "build" and Path(args.text_data)
    digest = hashlib.sha256(json.dumps([r for _, r in raw], sort_keys=True).encode()).hexdigest()  # --text-data: by cache_key
    # + what trains the warm start that samples D_t and draws the attention maps (fields below this group)
    key = cache_key(args, "rejected_image_folder", digest, args.warmup_ratio, args.weight_decay, args.grad_clip)
    stats_file = prefs / "curation.json"
    cached = args.resume and stats_file.exists() and json.loads(stats_file.read_text()).get("key") == key
    dist.barrier()  # every rank has decided before rank 0 may rewrite the cache
    if not cached:
        model.eval()
        t0, built, stats = time.time(), [], {"samples": len(samples)}
        if args.text_pairs:
            records, more = (read_text_pairs(args, text_file, device, rank, world) if text_file else
                             text_dispreference(args, model, tokenizer, samples, device, rank, world))
            built, stats = built + records, {**stats, **more}
        if args.visual_pairs:
            records, more = visual_dispreference(args, model, tokenizer, samples, prefs, rank)
            built, stats = built + records, {**stats, **more}
        stats.update(key=key, seconds=round(time.time() - t0, 1))
        if rank == 0:
            prefs.mkdir(parents=True, exist_ok=True)
            (prefs / "mmedpo_dpo_weighted.json").write_text(json.dumps(built, indent=1, ensure_ascii=False))
            stats_file.write_text(json.dumps(stats, indent=1))
            print("preference pairs:", json.dumps(stats))
        dist.barrier()
    return lm.read_records(prefs / "mmedpo_dpo_weighted.json"), json.loads(stats_file.read_text())


def training_data(args: Args, model, tokenizer, arms: list[str], device, rank: int, world: int, out: Path, log):
    """The pairs to train on and the model to train: a preference file read as it is, or ground-truth records from
    whose samples (a seeded draw of --max-samples, keeping the mix of question kinds) D_t and D_v are built, after
    the warm start on all of them (the tiny model is random: it must answer before its samples and DPO mean
    anything). Returns (ScoredPairs, curation statistics, the model, the base its adapters apply to)."""
    path = Path(args.data)
    gt_file = path / "train.json" if path.is_dir() else path
    image_folder = Path(args.image_folder or gt_file.parent)
    raw = lm.read_records(gt_file)
    is_prefs = bool(raw) and "rejected_conversations" in raw[0][1]
    all_samples = [] if is_prefs else gt_samples(raw, image_folder, args.allow_images_outside_folder)
    n_keep = args.max_samples if args.max_samples >= 0 else (320 if path.is_dir() else 0)
    pair_raw, samples = raw, all_samples  # the ground truth the pairs are built on; a toy folder whose D_t is read
    if path.is_dir() and args.text_data != "build" and (path / "pref.json").exists():  # from prefs_train.json: its
        pair_raw = lm.read_records(path / "pref.json")  # pref images (never in the warm start) carry D_v too
        samples = gt_samples(pair_raw, image_folder, args.allow_images_outside_folder)
    if n_keep and len(samples) > n_keep:
        samples = [samples[i] for i in sorted(random.Random(args.seed).sample(range(len(samples)), n_keep))]
    warm = args.sft_warmup_steps if args.sft_warmup_steps >= 0 else (1000 if args.model == "tiny" else 0)
    base = args.model
    if warm and is_prefs:
        raise lm.DataError(f"{gt_file}: a preference file; the warm start (--sft-warmup-steps, 1000 by default for "
                           f"--model tiny) needs ground-truth records: pass --sft-warmup-steps 0")
    if warm:
        cfg, items = model.config, []
        for s in all_samples:  # single-turn conversations (question, ground truth)
            turns = lm.place_image_markers([("user", s["question"]), ("assistant", s["answer"])], 1, s["where"])
            items.append({**lm.tokenize_conversation(tokenizer, turns, cfg.template, cfg.num_image_tokens,
                                                     cfg.image_token_id, args.max_length, s["where"]), "images": [s["image"]]})
        warm_seed = args.seed if args.warm_start_seed < 0 else args.warm_start_seed  # one fixed SFT model
        # items name their image inside the image folder, so warm_start's key (it hashes them) does not depend on
        # where the checkout lies
        outside = args.allow_images_outside_folder
        pixel = lambda key: lm.image_tensor(cfg, lm.resolve_image(image_folder, key, key, outside))  # noqa: E731
        model = warm_start(dataclasses.replace(args, sft_warmup_steps=warm, seed=warm_seed), model, tokenizer, items,
                           pixel, device, rank, world, out, log)
        base = str(out / "base_llava_hf")
    if is_prefs:
        records, stats = raw, {"read": str(gt_file)}
        rejected_folder = Path(args.rejected_image_folder or image_folder)
    else:
        records, stats = preference_records(args, model, tokenizer, pair_raw, samples, out, device, rank, world)
        rejected_folder = out / "prefs"
    data = ScoredPairs(records, image_folder, rejected_folder, tokenizer, model.config, args.max_length,
                       args.skip_bad_samples, args.allow_images_outside_folder, "mmedpo" in arms and args.weight_mode != "none")
    if data.skipped and rank == 0:
        print(f"warning: skipped {sum(data.skipped.values())} bad pairs: {data.skipped}; e.g.\n  " + "\n  ".join(data.examples),
              file=sys.stderr)
    return data, stats, model, base


def normalize_scores(scores: list[float], subsets: list[str], mode: str = "paper", scope: str = "subset",
                     mean: float = 1.0, var: float = 0.1, lo: float = 0.75, hi: float = 1.25) -> list[float]:
    """Clinical-relevance scores -> DPO weights.
    paper: per subset (or globally), z = (s - mu) / sigma with the subset's own mean and (population) std, then
           w = clip(mean + sqrt(var) z, lo, hi): target mean 1, variance 0.1, clip [0.75, 1.25] (paper App. B; the
           literal (s - 1)/sqrt(0.1) would put every s in [0, 1] at the clip floor, spec B5). sigma = 0: w = mean.
    raw:   w = s (the released dpo_trainer_weighted.py: pairs scored 0 are dropped).
    none:  w = 1 (plain DPO)."""
    if mode == "none":
        return [1.0] * len(scores)
    if mode == "raw":
        return [float(s) for s in scores]
    if mode != "paper":
        raise ValueError(f"unknown weight mode {mode!r} (paper, raw, none)")
    s = torch.tensor(scores, dtype=torch.float64)
    groups = subsets if scope == "subset" else ["all"] * len(scores)
    out = torch.empty_like(s)
    for g in set(groups):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        v = s[idx]
        sd = v.std(unbiased=False) if v.max() > v.min() else 0.0  # equal scores: the float std is ~1e-17, not 0
        z = (v - v.mean()) / sd if sd > 0 else torch.zeros_like(v)
        out[idx] = (mean + math.sqrt(var) * z).clamp(lo, hi)
    return out.tolist()


def arm_weights(args: Args, data, master: bool) -> dict:
    """Per-pair weights of each arm: dpo 1, mmedpo the normalised scores (printed per subset)."""
    subsets = [it["subset"] for it in data.items]
    w = torch.tensor(normalize_scores([it["score"] for it in data.items], subsets, args.weight_mode, args.weight_scope))
    for sub in sorted(set(subsets)) if master else []:
        ws = w[[i for i, s in enumerate(subsets) if s == sub]]
        print(f"{sub} pairs: {len(ws)}, weights ({args.weight_mode}) mean {ws.mean():.3f} min {ws.min():.3f} max {ws.max():.3f}")
    return {"dpo": torch.ones(len(data)), "mmedpo": w}


# Copied from dpo.py: pair_turns
def pair_turns(rec: dict, where: str):
    """(chosen turns, rejected turns) from either preference format."""
    if "chosen_conversations" in rec:  # STLLaVA-Med
        return lm.record_turns(rec, where, "chosen_conversations"), lm.record_turns(rec, where, "reject_conversations")
    return lm.record_turns(rec, where, "conversations"), lm.record_turns(rec, where, "rejected_conversations")


# Copied from dpo.py: PairData
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


class ScoredPairs(PairData):
    """dpo.py's PairData (tokenised pairs; every image opened once; bad records raised, or counted with skip_bad)
    with each pair's subset ("text" | "visual") and raw score `weighted_score` kept in its item. Image paths are
    resolved here against their folders ("image" under image_folder, "rejected_image" under rejected_folder; the
    release's absolute rejected paths are accepted), so PairData reads checked absolute paths."""

    def __init__(self, records, image_folder: Path, rejected_folder: Path, tokenizer, cfg, max_length: int,
                 skip_bad: bool, allow_outside: bool = False, need_scores: bool = True):
        self.folders = (Path(image_folder), Path(rejected_folder))
        self.outside, self.need_scores = allow_outside, need_scores
        super().__init__(records, Path(image_folder), tokenizer, cfg, max_length, skip_bad, allow_outside=True)

    def _tokenize(self, where, rec, tokenizer, max_length):
        score = rec.get("weighted_score")
        if self.need_scores and not isinstance(score, (int, float)):
            raise lm.DataError(f"{where}: no numeric 'weighted_score' (needed by --weight-mode paper/raw)")
        resolve = lambda folder, paths, outside: [str(lm.resolve_image(folder, p, where, outside)) for p in paths]
        item = {**rec, "image": resolve(self.folders[0], lm.record_images(rec, where), self.outside)}
        if rec.get("rejected_image"):
            rejected = lm.record_images({"image": rec["rejected_image"]}, where)
            item["rejected_image"] = resolve(self.folders[1], rejected, self.outside or all(map(os.path.isabs, rejected)))
        return {**super()._tokenize(where, item, tokenizer, max_length),
                "subset": rec.get("subset") or ("visual" if rec.get("rejected_image") or rec.get("rejected_noised")
                                                else "text"),  # a noised rejected image (MMed-RAG's format) is a D_v pair
                "score": float(score) if isinstance(score, (int, float)) else 1.0}


# Copied from dpo.py: collate_pairs
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
# Loss: per-pair sigmoid DPO times the normalised clinical-relevance weight (paper eq. 3)
# ----------------------------------------------------------------------------------------------------------


def weighted_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, weights, beta: float = 0.1):
    """Per-pair losses w * -log sigmoid(beta [(pc - rc) - (pr - rr)]) and the implicit rewards (all [B]). The
    rejected log-probs are taken on the rejected image x* for visual pairs. The loop averages the weighted losses
    over the global batch (sum / B, the released code's losses.mean()), not over the sum of the weights: a batch of
    low-relevance pairs moves the policy less, which is the point."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)) * weights
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# Copied from dpo.py: sequence_logps
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


# Copied from dpo.py: sft_loss_sum
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
# Model setup: policy (LoRA or full), reference, FSDP2 sharding
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Training loop (every recipe's, copied): global batches -> micro-batches per rank -> step_fn -> AdamW; checkpoints
# (trainable weights + optimizer + schedule + RNG; atomic: written, then renamed) and resume
# ----------------------------------------------------------------------------------------------------------


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


# Copied from dpo.py: save_checkpoint
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


# Copied from dpo.py: latest_checkpoint
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


# Copied from dpo.py: load_checkpoint
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


# Copied from dpo.py: train
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
# MMedPO step, the reference, the warm start
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: to_device
def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# Copied from dpo.py: reference_logps
def reference_logps(model, ref_model, batch, ref_feats):
    with torch.no_grad():
        if ref_model is not None and hasattr(ref_model, "language_model"):  # full fine-tuning: frozen copy
            return sequence_logps(ref_model, batch, ref_feats)
        with lm.adapters_off(model):
            return sequence_logps(model, batch, ref_feats)


def mmedpo_step(args, model, ref_model, data: ScoredPairs, weights: torch.Tensor, idx, tokenizer, device) -> dict:
    """One micro-batch of pairs: the summed weighted DPO loss (the loop averages it over the global batch's pairs)
    and statistics, logged per pair: mean_weight, rewards, margin, accuracy, and the visual pairs' share ("visual")
    and summed margin ("margin_visual"; / visual = their mean margin)."""
    batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id, args.prefix_sharing), device)
    feats, ref_feats = lm.image_features(model, ref_model, batch["pixel_values"], device)
    logps, _ = sequence_logps(model, batch, feats)
    ref, _ = reference_logps(model, ref_model, batch, ref_feats)
    B, w = len(idx), weights[idx].to(device)
    losses, rc, rr = weighted_dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], w, args.beta)
    visual = torch.tensor([data.items[i]["subset"] == "visual" for i in idx], device=device).float()
    return {"loss": losses.sum(), "n": torch.tensor(float(B)), "mean_weight": w.sum(), "rewards_chosen": rc.sum(),
            "rewards_rejected": rr.sum(), "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(),
            "visual": visual.sum(), "margin_visual": ((rc - rr) * visual).sum(), "tokens": batch["n_tokens"]}


# Copied from dpo.py: warm_start
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
# Evaluation: VQA (LLaVA-Med scoring, lm.score_vqa) and report generation (BLEU-1..4, ROUGE-L, METEOR:
# lm.report_scores)
# ----------------------------------------------------------------------------------------------------------

# Copied from dpo.py: evaluate_vqa
def evaluate_vqa(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                 closed_scoring: str = "strict", desc: str = "eval") -> tuple[dict, list[dict]]:
    """Greedy answers for every row (lm.generate_sharded shares them out to the ranks and gathers them), scored."""
    jobs = [{"turns": [("user", r["question"])], "images": [r["image"]]} for r in rows]
    preds = lm.generate_sharded(model, tokenizer, jobs, batch_size, rank, world, desc, max_new_tokens=max_new_tokens)
    results = [dict(r, prediction=p) for r, p in zip(rows, preds)]
    return lm.score_vqa(results, closed_scoring), results


def read_reports(path: str, image_folder: str = "") -> list[dict]:
    """Report-generation rows from LLaVA conversation records: the last (human, gpt) turn pair is (instruction,
    reference report), e.g. the toy test.json ("Describe the image." -> report) or an IU-Xray / MIMIC test json."""
    path = Path(path)
    rows = []
    for where, rec in lm.read_records(path):
        turns = lm.record_turns(rec, where)
        if len(turns) < 2 or turns[-1][0] != "assistant":
            raise lm.DataError(f"{where}: a report record ends with the gpt turn holding the report")
        images = lm.record_images(rec, where)
        if len(images) != 1:
            raise lm.DataError(f"{where}: report records need exactly one image")
        rows.append({"id": rec.get("id", where), "image": str(Path(image_folder or path.parent) / images[0]),
                     "question": turns[-2][1].replace(lm.IMAGE_MARKER, "").strip(), "answer": turns[-1][1],
                     **({"findings": rec["findings"]} if isinstance(rec.get("findings"), list) else {})})
    return rows


def evaluate_all(args: Args, model, tokenizer, vqa_rows, report_rows, rank: int, world: int, label: str) -> dict:
    """VQA scores (evaluate_vqa) and greedy reports (lm.generate_sharded) scored by lm.report_scores: BLEU-1..4 and
    their mean (MMedPO Table 1's "BLEU"), ROUGE-L, METEOR, with three example reports."""
    res = {}
    if vqa_rows:
        res["vqa"], _ = evaluate_vqa(model, tokenizer, vqa_rows, args.eval_batch_size, args.eval_max_new_tokens, rank,
                                     world, args.closed_scoring, f"vqa {label}")
    if report_rows:
        jobs = [{"turns": [("user", r["question"])], "images": [r["image"]]} for r in report_rows]
        preds = lm.generate_sharded(model, tokenizer, jobs, args.eval_batch_size, rank, world, f"reports {label}",
                                    max_new_tokens=args.report_max_new_tokens)
        res["report"] = lm.report_scores(preds, [r["answer"] for r in report_rows])
        if all("findings" in r for r in report_rows):  # the toy's clinical metric (README (b)): lower is better
            from data.toy_oracles import toy_hallucinated, toy_missed

            res["report"]["toy_hallucination_rate"] = sum(toy_hallucinated(p, r["findings"]) for p, r in
                                                         zip(preds, report_rows)) / len(report_rows)
            res["report"]["toy_miss_rate"] = sum(toy_missed(p, r["findings"]) for p, r in zip(preds, report_rows)) / max(
                1, sum(bool(r["findings"]) for r in report_rows))
        res["report_examples"] = [{"reference": r["answer"], "prediction": p} for r, p in zip(report_rows, preds[:3])]
    return res


def results_table(results: dict) -> str:
    """Markdown table: one row per model (base, dpo, mmedpo)."""
    head = ("| model | closed acc. | open recall | BLEU (1-4 avg) | ROUGE-L | METEOR (exact) | toy halluc. rate |\n"
            "|---|---|---|---|---|---|---|")
    rows = []
    for name, r in results.items():
        v, rep = r.get("vqa", {}), r.get("report", {})
        cell = lambda x: "-" if x is None else f"{100 * x:.1f}"
        rcell = lambda x: "-" if x is None else f"{x:.1f}"
        rows.append(f"| {name} | {cell(v.get('closed_accuracy'))} | {cell(v.get('open_recall'))} | "
                    f"{rcell(rep.get('bleu'))} | {rcell(rep.get('rouge_l'))} | {rcell(rep.get('meteor_exact'))} | "
                    f"{cell(rep.get('toy_hallucination_rate'))} |")
    return "\n".join([head] + rows)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def resolve_auto(args: Args) -> Args:
    """The "auto" defaults: on a toy folder with preference pairs (data/toy) the toy's judge and scorer and its D_t
    file; anywhere else the tiny random judges (offline; pass model folders for a real run) and built D_t."""
    toy = Path(args.data).is_dir() and (Path(args.data) / "prefs_train.json").exists()
    return dataclasses.replace(
        args, judge=("toy" if toy else "tiny") if args.judge == "auto" else args.judge,
        scorers=("toy" if toy else "tiny:1,tiny:2,tiny:3") if args.scorers == "auto" else args.scorers,
        text_data=(str(Path(args.data) / "prefs_train.json") if toy else "build") if args.text_data == "auto"
        else args.text_data)


def main(argv=None):
    args = resolve_auto(parse_args(Args, argv))
    if args.attn_implementation == "flash_attention_2":  # its kernel takes no [T, T] mask: two rows per pair
        args = dataclasses.replace(args, prefix_sharing=False)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"dpo", "mmedpo"}:
        raise ValueError(f"--arms {args.arms!r}: a comma list of dpo, mmedpo")
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master, data_dir, t0 = Path(args.out), rank == 0, Path(args.data), time.time()
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"mmedpo.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    warm_seed = args.seed if args.warm_start_seed < 0 else args.warm_start_seed
    torch.manual_seed(warm_seed)  # same initial weights on every rank
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None,
                               seed=warm_seed, attn_implementation=args.attn_implementation)
    vqa_path = args.eval_data or (str(data_dir / "test_vqa.json") if data_dir.is_dir() else "")
    report_path = args.report_data or (str(data_dir / "test.json") if (data_dir / "test.json").exists() else "")
    vqa_rows = lm.read_vqa(vqa_path, args.eval_image_folder)[:args.eval_limit or None] if args.eval and vqa_path else []
    report_rows = (read_reports(report_path, args.report_image_folder or args.image_folder)[:args.eval_limit or None]
                   if args.eval and report_path else [])
    results, summary = {}, {"world_size": world}
    if args.eval_only:  # ---- evaluate --model as it is
        shard(model, device, args.activation_checkpointing, args.compile)
        results["model"] = evaluate_all(args, model, tokenizer, vqa_rows, report_rows, rank, world, "model")
        log({"phase": "eval", "model": "model", **results["model"]})
    else:  # ---- pairs (after the warm start), then each arm from the same start and LoRA initialisation
        data, summary["pairs"], model, base = training_data(args, model, tokenizer, arms, device, rank, world, out, log)
        summary.update(train_pairs=len(data), skipped=data.skipped)
        weights = arm_weights(args, data, master)
        for n, arm in enumerate(arms):
            policy = copy.deepcopy(model) if n < len(arms) - 1 else model
            torch.manual_seed(args.seed)  # the same LoRA initialisation for every arm, whatever ran before
            policy, ref_model = lm.policy_and_reference(policy, args.full_finetune, args.lora_r, args.lora_alpha,
                                                        args.lora_dropout, args.tune_projector)
            torch.manual_seed(args.seed + rank)  # dropout differs per rank (CleanRL's "CRUCIAL" seed offset)
            shard(policy, device, args.activation_checkpointing, args.compile)
            if ref_model is not None and hasattr(ref_model, "language_model"):
                shard(ref_model, device)
            def before(policy=policy):  # LoRA B = 0: the base model, evaluated once (by the first arm)
                results["base"] = evaluate_all(args, policy, tokenizer, vqa_rows, report_rows, rank, world, "base")
                log({"phase": "eval", "model": "base", **results["base"]})

            step = lambda idx, epoch, w=weights[arm]: mmedpo_step(args, policy, ref_model, data, w, idx, tokenizer, device)
            content = [(it["chosen"]["input_ids"], it["rejected"]["input_ids"], it["subset"], it["score"])
                       for it in data.items]  # what the pairs are (keys the arm's checkpoints)
            summary[arm] = train(args, arm, policy, len(data), step, out / arm, rank, world, log,
                                 {"projector.": args.projector_lr, "": args.lr}, args.batch_size, args.micro_batch_size,
                                 args.epochs, args.max_steps, content,
                                 before if n == 0 and (vqa_rows or report_rows) else None)
            lm.save_trained(policy, tokenizer, out / arm, rank, base, args.full_finetune, args.export_merged,
                              args.tune_projector)
            if vqa_rows or report_rows:
                results[arm] = evaluate_all(args, policy, tokenizer, vqa_rows, report_rows, rank, world, arm)
                log({"phase": "eval", "model": arm, **results[arm]})
            del policy, ref_model
    summary["seconds"] = round(time.time() - t0, 1)
    if master:
        (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
        if results:
            print(results_table(results))
        print(json.dumps(summary))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
