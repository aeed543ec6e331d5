"""mmedpo.py -- MMedPO: clinical-aware multimodal preference optimisation (Zhu et al., ICML 2025, arXiv 2412.06141).

    # embedded default: tiny random LLaVA warm-started on data/toy, both preference sets built, scored, DPO and
    # MMedPO trained, base / DPO / MMedPO evaluated on the toy test split (VQA + reports); CPU, a few minutes
    python mmedpo.py
    torchrun --nproc-per-node=2 mmedpo.py
    # Table 1 setup: one model per dataset, trained on that dataset's pairs, scored on its test split (the release
    # has one *_dpo_weighted.json per dataset, Table 5's train counts; spec B6, B8). IU-Xray from the released text
    # pairs as they are, LLaVA-Med v1.5 7B on 8 GPUs, vicuna_v1 as the release trains (--version v1)
    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b --template vicuna_v1 \\
        --data iuxray_dpo_weighted.json --image-folder /data/iu_xray/images --arms mmedpo --lr 1e-7 --epochs 3 \\
        --batch-size 4 --micro-batch-size 1 --max-length 1024 --report-data /data/iu_xray/test.json
    # VQA-RAD (SLAKE alike): --data vqa-rad_dpo_weighted.json --image-folder /data/vqa_rad/images
    #   --eval-data /data/vqa_rad/testset.json. The released files hold D_t only; Table 1 trains on D_t + D_v, which
    # this builds from the ground-truth training records with real judges and a lesion-map file:
    torchrun --nproc-per-node=8 mmedpo.py --model /ckpt/llava-med-v1.5-mistral-7b --template vicuna_v1 \\
        --data /data/iu_xray/train.json --image-folder /data/iu_xray/images --judge /ckpt/Llama3-Med42-70B \\
        --scorers /ckpt/Llama3-Med42-7B,/ckpt/Llama3-Med42-70B,/ckpt/BioMistral-7B --localiser file \\
        --heatmaps medklip_maps.json --arms mmedpo --lr 1e-7 --epochs 3 --batch-size 4 --micro-batch-size 1 \\
        --max-length 1024 --report-data /data/iu_xray/test.json

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

File layout: Args -> data prep (samples, text / visual dispreference, scores, weights) -> loss -> model setup ->
training loop -> evaluation -> main().
"""

from __future__ import annotations

import argparse
import copy
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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
    data: str = "data/toy"  # toy-format folder or ground-truth LLaVA json (pairs are built), or a preference json
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    rejected_image_folder: str = ""  # rejected_image paths are relative to this ("" = --image-folder)
    eval_data: str = ""  # VQA set (toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json); "" = toy test
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    report_data: str = ""  # report set, LLaVA json whose last gpt turn is the report ("" = toy test.json)
    max_length: int = 512  # tokens per sequence, image tokens included
    max_samples: int = -1  # build pairs from N (image, question) samples, a seeded draw (0 = all; -1 = 320 on toy)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths (released rejected_image paths)
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf)
    template: str = ""  # chat template override ("" = the checkpoint's)
    dtype: str = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are always fp32
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 128  # LoRA rank (MMedPO train_dpo_visual-text.sh: 128)
    lora_alpha: int = 256  # LoRA alpha (256)
    lora_dropout: float = 0.0  # off, as in the release (dpo_trainer_weighted.py disable_dropout=True, TRL's default)
    tune_projector: bool = False  # also train the mm projector (mm_projector_lr 2e-5 in the script; ambiguous)
    # text dispreference D_t (paper 3.1)
    text_pairs: bool = True  # build D_t
    n_samples: int = 4  # candidates sampled from the target model per question (paper: not stated)
    sample_temperature: float = 1.0  # sampling temperature of the candidates (paper: not stated)
    sample_max_new_tokens: int = 48  # length cap of a candidate (and of a judge-written answer)
    judge: str = "tiny"  # hallucination judge: "tiny" (random, offline), a checkpoint folder, or "rule" (offline fallback)
    halluc_threshold: float = 0.5  # a candidate the judge rates below this is "no significant hallucination"
    # clinical relevance scores (paper 3.2)
    scorers: str = "tiny:1,tiny:2,tiny:3"  # comma list of judges: "tiny:SEED", a checkpoint folder, or "rule"
    max_rounds: int = 5  # debate rounds before falling back to the mean (paper App. B: 5)
    agree_tol: float = 0.05  # two scores agree when they differ by at most this (scores are on a 0.1 grid)
    # visual dispreference D_v (paper 3.1)
    visual_pairs: bool = True  # build D_v
    localiser: str = "boxes"  # "boxes" (ground-truth findings boxes), "attention" (policy's image-token attention), "file"
    heatmaps: str = ""  # --localiser file: json {image: {"heatmap": png (relative to the json), "confidence": s}}
    region_std: float = -1.0  # soft maps: region = h > mean + region_std * std (released code: mean - std)
    noise: str = "diffusion"  # "diffusion" (paper), "replace" (released code: N(0, 10) pixels), "global" (ablation)
    noise_step: int = 500  # diffusion step k of the paper's blend (POVID schedule, 1000 steps)
    curate_batch_size: int = 32  # prompts per generate / judge call on one rank
    # weights and loss
    weight_mode: str = "paper"  # "paper" (standardise, mean 1, var 0.1, clip [0.75, 1.25]), "raw" (code), "none"
    weight_scope: str = "subset"  # normalise per subset (D_t, D_v) or "global"
    beta: float = 0.1  # DPO temperature (the released trainer's default)
    arms: str = "dpo,mmedpo"  # what to train: "dpo" (same pairs, weights 1) and/or "mmedpo" (weighted)
    # optimisation
    lr: float = 1e-5  # peak learning rate (toy default; the paper uses 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # learning rate of the projector when --tune-projector
    batch_size: int = 16  # pairs per optimizer step over all ranks (global)
    micro_batch_size: int = 8  # pairs per forward on one rank; accumulation = batch / (micro * ranks)
    epochs: int = 1  # passes over the preference pairs (paper: 3)
    max_steps: int = -1  # stop after this many optimizer steps (-1 = epochs decide)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    sft_warmup_steps: int = -1  # SFT steps on the ground truth first; -1 = 1000 for --model tiny (random), else 0
    sft_lr: float = 1e-3  # learning rate of that warm-up
    seed: int = 0  # same seed + same data = same run
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    # output
    out: str = "runs/mmedpo"  # prefs/, <arm>/checkpoints, <arm>/adapter, metrics.jsonl, results.json
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    resume: bool = True  # reuse built pairs and continue each arm from its newest complete checkpoint
    export_merged: bool = False  # also write each arm's merged model as a llava-hf checkpoint
    # evaluation
    eval: bool = True  # evaluate base (before training) and every trained arm
    eval_limit: int = 0  # first N questions / reports (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # VQA answer cap
    report_max_new_tokens: int = 64  # report cap
    closed_scoring: str = "strict"  # "strict": first yes/no word; "llava_med": GT substring (issue #12 bug)


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def shard_map(fn, items: list, batch_size: int, rank: int, world: int, desc: str) -> list:
    """fn(list of items, batch number) -> list of results, over fixed batches dealt round-robin to the ranks, then
    gathered on every rank. The batches (and the seeds derived from their numbers) do not depend on the number of
    ranks, so the built pairs are the same for 1 or 8 processes. Runs on the unsharded model: no collectives inside."""
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    mine = {}
    for b in tqdm(range(rank, len(batches), world), desc=desc, disable=rank != 0, leave=False):
        for i, r in zip(batches[b], fn([items[i] for i in batches[b]], b), strict=True):
            mine[i] = r
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    merged = {i: r for part in gathered for i, r in part.items()}
    return [merged[i] for i in range(len(items))]


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


def pixel_of(cfg: lm.LlavaMedConfig, image) -> torch.Tensor:
    """A path or a PIL image -> the model's input tensor (LLaVA-1.5 pad-to-square preprocessing)."""
    im = lm.load_image(image) if not isinstance(image, Image.Image) else image
    return lm.preprocess_image(im, cfg.image_size, cfg.image_mean, cfg.image_std, pad=cfg.image_aspect_ratio == "pad")


def prompt_ids(tokenizer, cfg: lm.LlavaMedConfig, question: str, n_images: int = 1) -> list[int]:
    turns = lm.place_image_markers([("user", question)], n_images)
    return lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)


# ----------------------------------------------------------------------------------------------------------
# Data prep 2: text dispreference D_t -- sample the target model, a judge picks or writes the hallucination
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


def sample_candidates(model, tokenizer, samples: list[dict], n: int, temperature: float, max_new_tokens: int,
                      seed: int) -> list[list[str]]:
    """n sampled answers of the target model per sample (one generate call; the seed is the caller's)."""
    cfg = model.config
    prompts = [prompt_ids(tokenizer, cfg, s["question"]) for s in samples for _ in range(n)]
    pix = torch.stack([pixel_of(cfg, s["path"]) for s in samples for _ in range(n)])
    out = lm.generate(model, tokenizer, prompts, pix, max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed, sync=False)
    return [out[i * n:(i + 1) * n] for i in range(len(samples))]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contradicts_yes_no(a: str, b: str) -> bool:
    wa, wb = _words(a)[:1], _words(b)[:1]
    return bool(wa and wb) and {wa[0], wb[0]} == {"yes", "no"}


def rule_hallucination(gt: str, cand: str) -> float:
    """Offline fallback judge: 1 for a yes/no flip, else 1 - token F1 with the ground truth (0 = same words)."""
    if _contradicts_yes_no(gt, cand):
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
    over fixed labels, never parsed from free text."""

    def __init__(self, spec: str, device, dtype="auto", max_new_tokens: int = 48):
        self.name, self.device, self.max_new_tokens = spec, device, max_new_tokens
        if spec.startswith("tiny"):
            seed = int(spec.split(":")[1]) if ":" in spec else 0
            self.model, self.tok = lm.load("tiny", dtype=dtype, device=device, seed=1000 + seed)
            self.llava = True
        elif json.loads((Path(spec) / "config.json").read_text()).get("model_type", "").startswith("llava"):
            self.model, self.tok = lm.load(spec, dtype=dtype, device=device)
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
            tail = full[len(head):] if full[:len(head)] == head else lm.encode_segment(self.tok, lab, first=False)
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
        read as 1. The prompt runs once; the label continuations then run on copies of its KV cache."""
        tails = self._label_tails(prompts[0], labels)  # the answer format does not depend on the prompt's text
        rows = list(dict.fromkeys(tuple(t) for t in tails if not any(len(u) > len(t) and u[:len(t)] == t
                                                                     for u in tails)))  # "1" runs inside "10"
        row_of = [next(r for r, u in enumerate(rows) if list(u[:len(t)]) == t) for t in tails]
        R, L = len(rows), max(map(len, rows))
        tail_ids = torch.tensor([list(r) + [self.tok.pad_token_id] * (L - len(r)) for r in rows], device=self.device)
        out = torch.empty(len(prompts), len(labels))
        step = max(1, 64 // R)
        for i in range(0, len(prompts), step):
            batch = lm.collate([{"input_ids": self._prompt(p)} for p in prompts[i:i + step]], self.tok.pad_token_id,
                               padding_side="left")
            ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            first = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
            first.past_key_values.batch_repeat_interleave(R)  # row b*R + r: prompt b, continuation r
            B = ids.shape[0]
            attn = torch.cat([attn.repeat_interleave(R, 0), attn.new_ones(B * R, L)], -1)
            pos = pos[:, -1:].repeat_interleave(R, 0) + 1 + torch.arange(L, device=self.device)
            nxt = self.model(input_ids=tail_ids.repeat(B, 1), attention_mask=attn, position_ids=pos,
                             past_key_values=first.past_key_values, use_cache=True)
            lp = torch.cat([first.logits.float().repeat_interleave(R, 0), nxt.logits.float()], 1).log_softmax(-1)
            lp = lp.view(B, R, L + 1, -1).cpu()  # lp[b, r, j] predicts token j of continuation r
            ends = lp[..., ~self._continues(tails[0][-1], lp.shape[-1])].logsumexp(-1)
            for k, t in enumerate(tails):
                out[i:i + B, k] = sum(lp[:, row_of[k], j, tok] for j, tok in enumerate(t)) + ends[:, row_of[k], len(t)]
        return out

    def hallucination(self, gts, cands):
        prompts = [JUDGE_HALLUCINATION.format(gt=g, cand=c) for g, c in zip(gts, cands)]
        lp = self.label_logprobs(prompts, ["yes", "Yes", "no", "No"])  # chat models mostly answer "Yes, ..."
        return lp.softmax(-1)[:, :2].sum(-1).tolist()  # P(yes, it contradicts)

    def write_wrong(self, gts, seed):
        prompts = [self._prompt(JUDGE_WRITE.format(gt=g)) for g in gts]
        if not self.llava:
            return ["" for _ in gts]  # free generation with an arbitrary causal LM: use the rule fallback instead
        return lm.generate(self.model, self.tok, prompts, None, max_new_tokens=self.max_new_tokens, temperature=0.7,
                           seed=seed, sync=False)

    def score(self, texts, prevs):
        prompts = [JUDGE_SCORE.format(text=t) + (JUDGE_SCORE_PREV.format(prev=round(10 * p)) if p is not None else "")
                   for t, p in zip(texts, prevs)]
        return [int(k) / 10 for k in self.label_logprobs(prompts, SCORE_LABELS).argmax(-1)]


def make_judge(spec: str, device, max_new_tokens: int = 48):
    return RuleJudge() if spec == "rule" else ModelJudge(spec, device, max_new_tokens=max_new_tokens)


def choose_rejected(judge, gts: list[str], candidates: list[list[str]], threshold: float, pools: list[list[str]],
                    seed: int) -> list[tuple[str, str]]:
    """(rejected answer, source) per sample. Candidates that say the ground truth (after normalisation) or nothing
    are never picked; of the rest the judge's most hallucinated one is taken if it reaches `threshold` (paper 3.1:
    "the response with the most hallucination"). Otherwise the judge writes a wrong answer ("judge_written"), and if
    that is empty or the ground truth, corrupt_ground_truth ("rule_corruption"). One judge call per batch."""
    real = [[c for c in dict.fromkeys(cs) if c.strip() and normalize_answer(c) != normalize_answer(g)]
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
        if w.strip() and normalize_answer(w) != normalize_answer(gts[i]):
            out[i] = (w.strip(), "judge_written")
        else:
            out[i] = (corrupt_ground_truth(gts[i], pools[i], random.Random(seed * 7919 + i)), "rule_corruption")
    return out


# ----------------------------------------------------------------------------------------------------------
# Data prep 3: clinical relevance scores -- multi-judge debate (paper 3.2, App. B)
# ----------------------------------------------------------------------------------------------------------


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
        embeds = model.embed(ids.to(dev), pixel_of(cfg, im).unsqueeze(0).to(dev))
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


def _seed_of(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------------------
# Data prep 5: build both sets, score them, write the release format
# ----------------------------------------------------------------------------------------------------------


def build_preferences(args: Args, model, tokenizer, samples: list[dict], image_folder: Path, prefs_dir: Path,
                      device, rank: int, world: int) -> tuple[list[dict], dict]:
    """D_t and D_v records (release format + bookkeeping) and statistics. Every rank builds its share with the
    unsharded model; rank 0 writes the json."""
    model.eval()
    stats = {"samples": len(samples)}
    records = []
    pools = {}  # question -> ground-truth answers seen for it: material for the rule corruption
    for s in samples:
        pools.setdefault(s["question"], set()).add(s["answer"])
    pools = {q: sorted(v) for q, v in pools.items()}

    if args.text_pairs:
        judge = make_judge(args.judge, device, args.sample_max_new_tokens)

        def text_fn(batch, b):
            cands = sample_candidates(model, tokenizer, batch, args.n_samples, args.sample_temperature,
                                      args.sample_max_new_tokens, seed=_seed_of(args.seed, "sample", b))
            return choose_rejected(judge, [s["answer"] for s in batch], cands, args.halluc_threshold,
                                   [pools[s["question"]] for s in batch], seed=_seed_of(args.seed, "judge", b))

        picked = shard_map(text_fn, samples, args.curate_batch_size, rank, world, "text dispreference")
        del judge
        scorers = [make_judge(s.strip(), device) for s in args.scorers.split(",") if s.strip()]
        distinct = sorted({t for t, _ in picked})  # the judges see the text only: score each distinct answer once
        verdicts = shard_map(lambda batch, b: debate_scores(batch, scorers, args.max_rounds, args.agree_tol),
                             distinct, args.curate_batch_size, rank, world, "clinical relevance")
        del scorers
        by_text = dict(zip(distinct, verdicts))
        for s, (rej, source) in zip(samples, picked):
            v = by_text[rej]
            human = {"from": "human", "value": "<image>\n" + s["question"]}
            records.append({"id": s["id"] + "_text", "image": s["image"], "subset": "text",
                            "conversations": [human, {"from": "gpt", "value": s["answer"]}],
                            "rejected_conversations": [human, {"from": "gpt", "value": rej}],
                            "weighted_score": round(v["score"], 4), "rejected_source": source,
                            "judge": args.judge, "debate_rounds": v["rounds"], "debate_agreed": v["agreed"]})
        stats["text_pairs"] = len(picked)
        stats["text_rejected_source"] = dict(Counter(src for _, src in picked))
        stats["debate_agreed"] = sum(v["agreed"] for v in verdicts)
        stats["debate_distinct_texts"] = len(distinct)
        stats["debate_mean_rounds"] = sum(v["rounds"] for v in verdicts) / max(len(verdicts), 1)

    if args.visual_pairs:
        images = list(dict.fromkeys(s["image"] for s in samples))
        first = {}
        for s in samples:
            first.setdefault(s["image"], s)
        index = json.loads(Path(args.heatmaps).read_text()) if args.localiser == "file" else {}
        noised_dir = prefs_dir / "noised"
        noised_dir.mkdir(parents=True, exist_ok=True)

        def visual_fn(batch, b):
            out = []
            for rel in batch:
                s = first[rel]
                im = lm.load_image(s["path"])
                w, h = im.size
                if args.localiser == "boxes":
                    found = box_heatmap(s["record"], w, h)
                elif args.localiser == "attention":
                    found = attention_heatmap(model, tokenizer, s["path"], s["question"], args.region_std)
                elif args.localiser == "file":
                    found = file_heatmap(index, Path(args.heatmaps).parent, rel, w, h)
                else:
                    raise ValueError(f"unknown --localiser {args.localiser!r} (boxes, attention, file)")
                if found is None:
                    out.append(None)
                    continue
                heat, conf = found
                region = heat > 0.5 if args.localiser == "boxes" else binarise(heat, args.region_std)
                rng = np.random.default_rng(_seed_of(args.seed, "noise", rel))
                noised = local_noise(np.asarray(im), region, args.noise, args.noise_step, rng)
                name = re.sub(r"[^\w.-]", "_", rel.rsplit(".", 1)[0]) + f"_{args.localiser}_{args.noise}.png"
                Image.fromarray(noised).save(noised_dir / name)
                out.append({"rejected_image": "noised/" + name, "confidence": round(conf, 4),
                            "region_fraction": float(region.mean())})
            return out

        found = dict(zip(images, shard_map(visual_fn, images, args.curate_batch_size, rank, world, "visual dispreference")))
        n_visual = 0
        for s in samples:
            v = found[s["image"]]
            if v is None:
                continue
            human = {"from": "human", "value": "<image>\n" + s["question"]}
            gpt = {"from": "gpt", "value": s["answer"]}  # the same ground-truth text on both sides; only the image differs
            records.append({"id": s["id"] + "_visual", "image": s["image"], "subset": "visual",
                            "conversations": [human, gpt], "rejected_conversations": [human, gpt],
                            "rejected_image": v["rejected_image"], "weighted_score": v["confidence"],
                            "localiser": args.localiser, "noise": args.noise, "region_fraction": v["region_fraction"]})
            n_visual += 1
        stats["visual_pairs"] = n_visual
        stats["images_without_region"] = sum(v is None for v in found.values())
    return records, stats


# ----------------------------------------------------------------------------------------------------------
# Data prep 6: weights
# ----------------------------------------------------------------------------------------------------------


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


class PairData:
    """Tokenised preference pairs with their subset and raw score. Images are resolved to absolute paths here
    ("image" under image_folder, "rejected_image" under rejected_folder), so collate_pairs needs no folders."""

    def __init__(self, records, image_folder: Path, rejected_folder: Path, tokenizer, cfg, max_length: int,
                 skip_bad: bool, allow_outside: bool = False, need_scores: bool = True):
        self.cfg, self.items, self.skipped, self._opened = cfg, [], {}, set()
        for where, rec in records:
            try:
                self.items.append(self._tokenize(where, rec, image_folder, rejected_folder, tokenizer, max_length,
                                                 allow_outside, need_scores))
            except lm.DataError as e:
                if not skip_bad:
                    raise
                reason = (str(e)[len(where) + 2:] if str(e).startswith(where) else str(e)).split(" (")[0][:70]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if not self.items:
            raise lm.DataError(f"no usable preference pair (skipped: {self.skipped})")

    def _tokenize(self, where, rec, folder, rej_folder, tokenizer, max_length, allow_outside, need_scores):
        images = lm.record_images(rec, where)
        chosen = lm.record_turns(rec, where, "conversations")
        rejected = lm.record_turns(rec, where, "rejected_conversations")
        if chosen[:-1] != rejected[:-1]:
            raise lm.DataError(f"{where}: chosen and rejected prompts differ; DPO compares answers to one prompt")
        paths = [lm.resolve_image(folder, p, where, allow_outside) for p in images]
        rej_paths = paths
        if rec.get("rejected_image"):
            rej_paths = [lm.resolve_image(rej_folder, p, where, allow_outside or Path(p).is_absolute())
                         for p in lm.record_images({"image": rec["rejected_image"]}, where)]
        for p in paths + rej_paths:
            if p not in self._opened:
                try:
                    lm.load_image(p)
                except lm.DataError as e:
                    raise lm.DataError(f"{where}: {e}") from None
                self._opened.add(p)
        score = rec.get("weighted_score")
        if need_scores and not isinstance(score, (int, float)):
            raise lm.DataError(f"{where}: no numeric 'weighted_score' (needed by --weight-mode paper/raw)")
        cfg = self.cfg
        tok = lambda turns, n: lm.tokenize_conversation(tokenizer, lm.place_image_markers(turns, n, where), cfg.template,
                                                        cfg.num_image_tokens, cfg.image_token_id, max_length, where)
        return {"id": rec.get("id", where), "chosen": tok(chosen, len(paths)), "rejected": tok(rejected, len(rej_paths)),
                "images": [str(p) for p in paths], "rejected_images": [str(p) for p in rej_paths],
                "subset": rec.get("subset") or ("visual" if rec.get("rejected_image") else "text"),
                "score": float(score) if isinstance(score, (int, float)) else 1.0}

    def __len__(self):
        return len(self.items)

    def pixel(self, key: str) -> torch.Tensor:
        return pixel_of(self.cfg, key)


class SFTItems:
    """Ground-truth samples as single-turn conversations, for the tiny model's supervised warm start (the interface
    sft_warmup reads: items[i]["chosen"], items[i]["images"], pixel())."""

    def __init__(self, samples, tokenizer, cfg, max_length):
        self.cfg, self.items = cfg, []
        for s in samples:
            turns = lm.place_image_markers([("user", s["question"]), ("assistant", s["answer"])], 1, s["where"])
            ids = lm.tokenize_conversation(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id,
                                           max_length, s["where"])
            self.items.append({"chosen": ids, "images": [s["path"]]})

    def __len__(self):
        return len(self.items)

    def pixel(self, key: str) -> torch.Tensor:
        return pixel_of(self.cfg, key)


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
    rejected log-probs are taken on the rejected image x* for visual pairs. The step averages the weighted losses
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


# ----------------------------------------------------------------------------------------------------------
# Model setup: policy (LoRA or full), reference, FSDP2 sharding
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


# Copied from dpo.py: adapters_off
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


# Copied from dpo.py: build_models
def build_models(args: Args, model, device):
    """Policy (trainable parameters in fp32) and the reference: adapters off (LoRA, ref_model None) or a frozen
    copy (full fine-tuning). LoRA goes on every linear layer of the LM's decoder (lm.LORA_TARGETS)."""
    import copy

    model.requires_grad_(False)
    ref_model = None
    if args.full_finetune:
        ref_model = copy.deepcopy(model).eval()
        model.language_model.requires_grad_(True)
    else:
        lm.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
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
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: full_tensor
def full_tensor(t):
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


# Copied from dpo.py: file_sha256
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# Copied from dpo.py: save_adapter_or_model
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
# Training loop
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


# Copied from dpo.py: image_features_for
def image_features_for(model, ref_model, pixel_values, device):
    """Encode each distinct image once; the projected features serve the policy and, when the tower and projector
    are frozen, the reference too. A trained projector has a frozen copy for the reference (ref_model, or its
    .projector); a ViT with LoRA (STLLaVA-Med) runs a second tower pass with the adapters off. Returns (policy
    features, reference features)."""
    if pixel_values is None:
        return None, None
    vis = model.vision_features(pixel_values.to(device))
    policy = model.projector(vis)
    vit_lora = any(p.requires_grad for p in model.vision_tower.parameters())
    if ref_model is None and not vit_lora:
        return policy, policy.detach()
    with torch.no_grad(), lm.adapters_off(model):
        ref_vis = model.vision_features(pixel_values.to(device)) if vit_lora else vis
        ref_proj = model.projector if ref_model is None else getattr(ref_model, "projector", ref_model)
        return policy, ref_proj(ref_vis)


# Copied from dpo.py: reference_logps
def reference_logps(model, ref_model, batch, ref_feats):
    with torch.no_grad():
        if ref_model is not None and hasattr(ref_model, "language_model"):  # full fine-tuning: frozen copy
            return sequence_logps(ref_model, batch, ref_feats)
        with lm.adapters_off(model):
            return sequence_logps(model, batch, ref_feats)


# Copied from dpo.py: to_device
def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# Copied from dpo.py: sft_warmup
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


def mmedpo_step(args, model, ref_model, data: PairData, weights: torch.Tensor, idx, tokenizer, device, world):
    """Forward + backward of one micro-batch: sum(w * losses) * world / batch_size, so after FSDP's average over
    ranks and the sum over micro-batches the gradient is that of the global batch mean (dpo.py's scaling)."""
    batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id), device)
    feats, ref_feats = image_features_for(model, ref_model, batch["pixel_values"], device)
    logps, _ = sequence_logps(model, batch, feats)
    ref, _ = reference_logps(model, ref_model, batch, ref_feats)
    B = len(idx)
    w = weights[idx].to(device)
    losses, rc, rr = weighted_dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], w, args.beta)
    (losses.sum() * world / args.batch_size).backward()
    visual = torch.tensor([data.items[i]["subset"] == "visual" for i in idx], device=device)
    return {"loss": losses.detach().sum(), "rewards_chosen": rc.sum(), "rewards_rejected": rr.sum(),
            "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(), "pairs": torch.tensor(float(B)),
            "weight": w.sum(), "margin_visual": ((rc - rr) * visual).sum(), "pairs_visual": visual.float().sum()}


def train_arm(args: Args, name: str, model, ref_model, data: PairData, weights: torch.Tensor, tokenizer, device,
              rank: int, world: int, out: Path, log) -> int:
    """One DPO run over `data` with per-pair `weights` (FSDP2 model already sharded); checkpoints in out/<name>/."""
    master = rank == 0
    if args.batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of micro-batch x ranks "
                         f"({args.micro_batch_size} x {world})")
    steps_per_epoch = len(data) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} pairs is less than one global batch ({args.batch_size})")
    total = steps_per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")],
               "lr": args.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")],
               "lr": args.projector_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step = 0
    resume_from = latest_checkpoint(out / name) if args.resume else None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, rank)["step"]
        if master:
            print(f"{name}: resumed from {resume_from} (step {step})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=step, desc=name, disable=not master)
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        model.train()
        micro = my_micro_batches(global_batches(len(data), args.batch_size, epoch, args.seed)[k],
                                 args.micro_batch_size, rank, world)
        sums = {}
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)  # reduce gradients once per step
            for key, v in mmedpo_step(args, model, ref_model, data, weights, idx, tokenizer, device, world).items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
        totals = torch.stack([sums[key] for key in sorted(sums)])
        dist.all_reduce(totals)
        sums = dict(zip(sorted(sums), totals.tolist()))
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
        if not torch.isfinite(grad_norm) or not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"{name}: non-finite loss or gradient at step {step + 1}: loss={sums['loss']}, "
                                     f"grad norm={float(grad_norm)}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n = sums["pairs"]
        row = {"phase": name, "step": step, "epoch": epoch, "loss": sums["loss"] / n, "mean_weight": sums["weight"] / n,
               "rewards_chosen": sums["rewards_chosen"] / n, "rewards_rejected": sums["rewards_rejected"] / n,
               "margin": sums["margin"] / n, "accuracy": sums["accuracy"] / n, "grad_norm": float(grad_norm),
               "margin_visual": sums["margin_visual"] / max(sums["pairs_visual"], 1), "lr": scheduler.get_last_lr()[0]}
        log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(out / name, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)
    bar.close()
    save_checkpoint(out / name, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)
    return step


# ----------------------------------------------------------------------------------------------------------
# Evaluation: VQA (LLaVA-Med scoring, copied from dpo.py) and report generation (BLEU / ROUGE-L / METEOR,
# copied from mmed_rag.py)
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: CONTRACTIONS
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


# Copied from dpo.py: normalize_answer
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


# Copied from dpo.py: token_recall
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


# Copied from dpo.py: yes_no
def yes_no(prediction: str) -> str | None:
    """The first word of the normalised answer that is 'yes' or 'no' ("Answer:no" counts; 'normal', 'note' or
    'know' never count as 'no'), else None."""
    for w in re.findall(r"\w+", normalize_answer(prediction)):
        if w in ("yes", "no"):
            return w
    return None


# Copied from dpo.py: score_vqa
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


# Copied from dpo.py: read_vqa
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


# Copied from dpo.py: evaluate_vqa
def evaluate_vqa(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                 closed_scoring: str = "strict", desc: str = "eval") -> tuple[dict, list[dict]]:
    """Greedy answers for every row (lm.generate_sharded shares them out to the ranks and gathers them), scored."""
    jobs = [{"turns": [("user", r["question"])], "images": [r["image"]]} for r in rows]
    preds = lm.generate_sharded(model, tokenizer, jobs, batch_size, rank, world, desc, max_new_tokens=max_new_tokens)
    results = [dict(r, prediction=p) for r, p in zip(rows, preds)]
    return lm.score_vqa(results, closed_scoring), results


# Copied from mmed_rag.py: report_tokens
def report_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, as pycocoevalcap's PTB tokenizer does before scoring."""
    return re.findall(r"\w+", text.lower())


# Copied from mmed_rag.py: corpus_bleu
def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n] in % over the corpus (Papineni et al. 2002): clipped n-gram counts summed over
    all sentences, geometric mean of the first n precisions, brevity penalty exp(1 - r/c) when the summed
    hypothesis length c is below the summed reference length r. No smoothing, as pycocoevalcap: a corpus with
    no matching n-gram scores 0 for that order and above. Equals sacrebleu's BLEU(tokenize="none",
    smooth_method="none", max_ngram_order=n) on report_tokens-joined text (tested)."""
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = report_tokens(hyp), report_tokens(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0:
        return [0.0] * max_n
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if correct[n] == 0 or total[n] == 0:
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(correct[n] / total[n])
        scores.append(100 * bp * math.exp(log_sum / (n + 1)))
    return scores


# Copied from mmed_rag.py: lcs_length
def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


# Copied from mmed_rag.py: rouge_l
def rouge_l(hypothesis: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004) in %: P = LCS/|hyp|, R = LCS/|ref|, F = (1+β²)PR / (R + β²P). β = 1 is
    rouge-score's fmeasure (tested); pycocoevalcap's Rouge uses β = 1.2 (--rouge-beta 1.2), which weighs recall more."""
    h, r = report_tokens(hypothesis), report_tokens(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 100 * (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)


# Copied from mmed_rag.py: meteor
def meteor(hypothesis: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR (Banerjee & Lavie 2005) in %, exact-match stage only (no stemmer or WordNet synonyms: those need
    data we do not ship, so scores run a little below pycocoevalcap's METEOR 1.5 on paraphrases).
    Fmean = PR / (αP + (1-α)R) (α = 0.9 gives the paper's 10PR/(R+9P)); penalty = γ (chunks/matches)^β;
    score = Fmean (1 - penalty). The alignment maps each hypothesis word to an unused identical reference word,
    preferring the one that extends the current chunk, so a copied phrase is one chunk."""
    h, r = report_tokens(hypothesis), report_tokens(reference)
    positions: dict[str, list[int]] = {}
    for j, w in enumerate(r):
        positions.setdefault(w, []).append(j)
    used, align = set(), []
    for w in h:
        free = [j for j in positions.get(w, []) if j not in used]
        if not free:
            align.append(None)
            continue
        prev = align[-1] if align else None  # reference position of the previous hypothesis word, if matched
        j = prev + 1 if prev is not None and prev + 1 in free else free[0]
        used.add(j)
        align.append(j)
    matches = len(used)
    if matches == 0:
        return 0.0
    chunks, last = 0, None  # a chunk: a run of matched hypothesis words whose reference positions are consecutive
    for j in align:
        if j is not None and (last is None or j != last + 1):
            chunks += 1
        last = j
    p, rec = matches / len(h), matches / len(r)
    fmean = p * rec / (alpha * p + (1 - alpha) * rec)
    return 100 * fmean * (1 - gamma * (chunks / matches) ** beta)


# Copied from mmed_rag.py: report_scores
def report_scores(hypotheses: list[str], references: list[str], rouge_beta: float = 1.0) -> dict:
    """The report columns of MMed-RAG Table 2 / MMedPO Table 1: BLEU-1..4, their average ("BLEU" in MMedPO), and
    sentence ROUGE-L (β = rouge_beta) and exact-match METEOR averaged over reports. All in %."""
    b = corpus_bleu(hypotheses, references)
    n = max(len(hypotheses), 1)
    return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "bleu": sum(b) / 4,
            "rouge_l": sum(rouge_l(h, r, rouge_beta) for h, r in zip(hypotheses, references)) / n,
            "meteor_exact": sum(meteor_exact(h, r) for h, r in zip(hypotheses, references)) / n, "n": len(hypotheses)}


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
                     "question": turns[-2][1].replace(lm.IMAGE_MARKER, "").strip(), "answer": turns[-1][1]})
    return rows


def evaluate_reports(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                     desc: str = "reports") -> tuple[dict, list[dict]]:
    """Greedy reports (ranks take interleaved shares, padded to equal batch counts: the model is sharded), gathered
    and scored with BLEU-1..4 (and their mean), ROUGE-L and METEOR."""
    cfg = model.config
    model.eval()
    mine = list(range(rank, len(rows), world))
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    preds = {}
    for b in tqdm(range(n_batches), desc=desc, disable=rank != 0, leave=False):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        chunk = chunk or [0]
        prompts = [prompt_ids(tokenizer, cfg, rows[i]["question"]) for i in chunk]
        pix = torch.stack([pixel_of(cfg, rows[i]["image"]) for i in chunk])
        answers = lm.generate(model, tokenizer, prompts, pix, max_new_tokens=max_new_tokens)
        preds.update({i: a for i, a in zip(chunk[:real], answers[:real])})
    model.reshard()  # forwards without backward leave the FSDP root gathered
    gathered = [None] * world
    dist.all_gather_object(gathered, preds)
    merged = {i: a for part in gathered for i, a in part.items()}
    results = [dict(rows[i], prediction=merged[i]) for i in range(len(rows))]
    return report_scores([r["prediction"] for r in results], [r["answer"] for r in results]), results


def evaluate_all(args, model, tokenizer, vqa_rows, report_rows, rank, world, device, label) -> dict:
    res = {}
    if vqa_rows:
        res["vqa"], _ = evaluate_vqa(model, tokenizer, vqa_rows, args.eval_batch_size, args.eval_max_new_tokens, rank,
                                     world, device, args.closed_scoring, f"vqa {label}")
    if report_rows:
        res["report"], preds = evaluate_reports(model, tokenizer, report_rows, args.eval_batch_size,
                                                args.report_max_new_tokens, rank, world, f"reports {label}")
        res["report_examples"] = [{"reference": p["answer"], "prediction": p["prediction"]} for p in preds[:3]]
    return res


def results_table(results: dict) -> str:
    """Markdown table: one row per model (base, dpo, mmedpo)."""
    head = "| model | closed acc. | open recall | BLEU (1-4 avg) | ROUGE-L | METEOR |\n|---|---|---|---|---|---|"
    rows = []
    for name, r in results.items():
        v, rep = r.get("vqa", {}), r.get("report", {})
        cell = lambda x: "-" if x is None else f"{100 * x:.1f}"
        rcell = lambda x: "-" if x is None else f"{x:.1f}"
        rows.append(f"| {name} | {cell(v.get('closed_accuracy'))} | {cell(v.get('open_recall'))} | "
                    f"{rcell(rep.get('bleu'))} | {rcell(rep.get('rouge_l'))} | {rcell(rep.get('meteor'))} |")
    return "\n".join([head] + rows)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(Args, argv)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master = Path(args.out), rank == 0
    t_start = time.time()
    timings = {}  # phase -> seconds (rank 0's clock)

    def timed(phase, t0):
        timings[phase] = round(time.time() - t0, 1)

    def log(row: dict):
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"mmedpo.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    torch.manual_seed(args.seed)
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed)

    # ---- data: ground truth (pairs are built) or a preference file (read as it is)
    data_path = Path(args.data)
    gt_file = data_path / "train.json" if data_path.is_dir() else data_path
    image_folder = Path(args.image_folder or (data_path if data_path.is_dir() else data_path.parent))
    raw = lm.read_records(gt_file)
    is_prefs = bool(raw) and "rejected_conversations" in raw[0][1]
    all_samples = [] if is_prefs else gt_samples(raw, image_folder, args.allow_images_outside_folder)
    samples = all_samples  # the ones pairs are built from; the warm start sees all
    n_keep = args.max_samples if args.max_samples >= 0 else (320 if data_path.is_dir() else 0)
    if n_keep and len(samples) > n_keep:  # a seeded draw keeps the mix of question kinds and reports
        keep = sorted(random.Random(args.seed).sample(range(len(samples)), n_keep))
        samples = [samples[i] for i in keep]
    default_test = data_path / "test.json" if data_path.is_dir() else None
    vqa_path = args.eval_data or (str(data_path / "test_vqa.json") if data_path.is_dir() else "")
    report_path = args.report_data or (str(default_test) if default_test and default_test.exists() else "")
    vqa_rows = read_vqa(vqa_path, args.eval_image_folder) if args.eval and vqa_path else []
    report_rows = read_reports(report_path) if args.eval and report_path else []
    if args.eval_limit:
        vqa_rows, report_rows = vqa_rows[:args.eval_limit], report_rows[:args.eval_limit]

    # ---- warm start (the tiny model is random: it must answer before its samples and DPO mean anything)
    warm = args.sft_warmup_steps if args.sft_warmup_steps >= 0 else (1000 if args.model == "tiny" else 0)
    t0 = time.time()
    if warm:
        if not samples:
            raise ValueError("--sft-warmup-steps needs ground-truth records (--data is a preference file)")
        sft_warmup(args, model, SFTItems(all_samples, tokenizer, model.config, args.max_length), tokenizer, device, warm,
                   lambda r: log(r) if r["step"] % 250 == 0 or r["step"] == warm - 1 else None)
        if master:
            lm.save_llava_hf(model, tokenizer, out / "base_llava_hf")
        timed("sft_warmup", t0)

    # ---- preference pairs: built once (cached under a key of everything they depend on), or read
    if is_prefs:
        pref_records, rej_folder = raw, Path(args.rejected_image_folder or image_folder)
        stats = {"read": str(gt_file)}
    else:
        prefs_dir = out / "prefs"
        key_fields = {k: v for k, v in dataclasses.asdict(args).items() if k in (
            "data", "max_samples", "model", "seed", "sft_warmup_steps", "sft_lr", "text_pairs", "n_samples",
            "sample_temperature", "sample_max_new_tokens", "judge", "halluc_threshold", "scorers", "max_rounds",
            "agree_tol", "visual_pairs", "localiser", "heatmaps", "region_std", "noise", "noise_step",
            "curate_batch_size", "micro_batch_size")}
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
        prefs_file, stats_file = prefs_dir / "mmedpo_dpo_weighted.json", prefs_dir / "curation.json"
        cached = args.resume and stats_file.exists() and json.loads(stats_file.read_text()).get("key") == key
        if not cached:
            t0 = time.time()
            built, stats = build_preferences(args, model, tokenizer, samples, image_folder, prefs_dir, device, rank, world)
            stats.update(key=key, seconds=round(time.time() - t0, 1))
            timed("build_pairs", t0)
            if master:
                prefs_dir.mkdir(parents=True, exist_ok=True)
                prefs_file.write_text(json.dumps(built, indent=1, ensure_ascii=False))
                stats_file.write_text(json.dumps(stats, indent=1))
                print("preference pairs:", json.dumps(stats))
            dist.barrier()
        stats = json.loads(stats_file.read_text())
        pref_records, rej_folder = lm.read_records(prefs_file), prefs_dir
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    need_scores = any(a == "mmedpo" for a in arms) and args.weight_mode != "none"
    data = PairData(pref_records, image_folder, rej_folder, tokenizer, model.config, args.max_length,
                    args.skip_bad_samples, args.allow_images_outside_folder, need_scores)
    scores, subsets = [it["score"] for it in data.items], [it["subset"] for it in data.items]
    weights = {"dpo": torch.ones(len(data)),
               "mmedpo": torch.tensor(normalize_scores(scores, subsets, args.weight_mode, args.weight_scope))}
    if master:
        for sub in sorted(set(subsets)):
            w = weights["mmedpo"][[i for i, s in enumerate(subsets) if s == sub]]
            print(f"{sub} pairs: {len(w)}, weights ({args.weight_mode}) mean {w.mean():.3f} min {w.min():.3f} "
                  f"max {w.max():.3f}")
        if data.skipped:
            print(f"warning: skipped {sum(data.skipped.values())} bad pairs: {data.skipped}", file=sys.stderr)

    # ---- train each arm from the same starting weights; base = the first arm before training (LoRA B = 0)
    results = {}
    for a in arms:
        if a not in weights:
            raise ValueError(f"unknown arm {a!r} in --arms (dpo, mmedpo)")
    base_model = model
    for n, a in enumerate(arms):
        policy = copy.deepcopy(base_model) if n < len(arms) - 1 else base_model
        torch.manual_seed(args.seed)  # the same LoRA initialisation for every arm, whatever ran before
        policy, ref_model = build_models(args, policy, device)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        shard(policy, device, args.activation_checkpointing)
        if ref_model is not None and hasattr(ref_model, "language_model"):
            shard(ref_model, device)
        if n == 0 and args.eval and (vqa_rows or report_rows) and latest_checkpoint(out / a) is None:
            t0 = time.time()
            results["base"] = evaluate_all(args, policy, tokenizer, vqa_rows, report_rows, rank, world, device, "base")
            log({"phase": "eval", "model": "base", **results["base"]})
            timed("eval_base", t0)
        (out / a).mkdir(parents=True, exist_ok=True)
        link = out / a / "base_llava_hf"
        if master and warm and not (link.exists() or link.is_symlink()):  # the adapter's base: the warm start
            link.symlink_to("../base_llava_hf")
        t0 = time.time()
        steps = train_arm(args, a, policy, ref_model, data, weights[a], tokenizer, device, rank, world, out, log)
        save_adapter_or_model(args, policy, tokenizer, out / a, rank)
        timed(f"train_{a}", t0)
        if args.eval and (vqa_rows or report_rows):
            t0 = time.time()
            results[a] = evaluate_all(args, policy, tokenizer, vqa_rows, report_rows, rank, world, device, a)
            log({"phase": "eval", "model": a, "steps": steps, **results[a]})
            timed(f"eval_{a}", t0)
        del policy, ref_model
    summary = {"pairs": stats, "train_pairs": len(data), "skipped": data.skipped, "world_size": world,
               "seconds": round(time.time() - t_start, 1), "phase_seconds": timings}
    if master:
        (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))
        if results:
            print(results_table(results))
        print(json.dumps(summary))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except lm.DataError as e:  # bad data: say which file and record, without a traceback through torch
        print(f"mmedpo.py: bad data: {e}\n(--skip-bad-samples counts and skips such records)", file=sys.stderr)
        sys.exit(2)
