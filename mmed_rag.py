"""mmed_rag.py -- MMed-RAG: domain-aware retrieval, adaptive context, and RAG preference tuning (RAG-PT) for a
LLaVA-style medical VLM (Xia et al., ICLR 2025, arXiv 2410.13085; spec part A).

    # embedded default: toy data, tiny random LLaVA. Trains the router + 3 retrievers (retrieve.py), warm-starts the
    # tiny model, builds the RAG-PT pairs, runs two-stage DPO, evaluates base / +RAG / +RAG-PT. 13 min of CPU time
    # measured on a busy 2-core machine (OMP_NUM_THREADS=1 is faster than 2 threads there; README).
    python mmed_rag.py
    torchrun --nproc-per-node=2 mmed_rag.py                      # same run on 2 CPU processes (gloo)
    # real data: retrievers built first with retrieve.py on image-report pairs, then LLaVA-Med v1.5 on 8 GPUs
    torchrun --nproc-per-node=8 retrieve.py --data pairs_train.json --test-data pairs_test.json --encoder /ckpt/clip \\
        --out runs/retrieve
    torchrun --nproc-per-node=8 mmed_rag.py --model /ckpt/llava-med-v1.5-mistral-7b --retriever runs/retrieve \\
        --pt-data vqa_train.json --test-data vqa_test.json --image-folder /data/images --lr 1e-7 --epochs 3 \\
        --batch-size 4 --micro-batch-size 1 --max-length 1024 --val-data vqa_val.json
    # one image with retrieval (MMed-RAG issue #45): prints the routed domain, the retrieved reports, the prompt and
    # the answer (no --question: a report); a trained run's model is OUT/llava_hf (--export-merged)
    python mmed_rag.py --image x.png --question "Is there a pleural effusion?" --retriever runs/mmed_rag/retriever \\
        --model runs/mmed_rag/llava_hf

The algorithm (spec A1, A7, A8):

    inference   d = router(x_v) (--oracle-domain: the record's); candidates = R_d top-k_max; adaptive k; prompt A6
    RAG-PT      with the model M before tuning and greedy decoding, for each training (x_v, x_t, y) with reports x_r:
      D_cm      M(x_v*, x_t, x_r) correct although x_v* is noise / an unrelated image  ("copied the homework"):
                chosen (x_v, x_t, x_r) -> y,   rejected (x_v*, x_t, x_r) -> M(x_v*, x_t, x_r)
      D_oa1     M(x_v, x_t) wrong and M(x_v, x_t, x_r) right  (retrieval helps):
                chosen (x_v, x_t, x_r) -> y,   rejected (x_v, x_t, x_r) -> M(x_v, x_t)
      D_oa2     M(x_v, x_t) right and M(x_v, x_t, x_r) wrong  (retrieval hurts, RULE's KBPT):
                chosen (x_v, x_t, x_r) -> y,   rejected (x_v, x_t, x_r) -> M(x_v, x_t, x_r)
    DPO         L = -log s(beta [(log pi(y_w|x_w) - log ref(y_w|x_w)) - (log pi(y_l|x_l) - log ref(y_l|x_l))]),
                summed answer log-probs, reference = LoRA off; stage 1 on D_cm, stage 2 on D_oa1 + D_oa2 from the
                stage-1 adapter (reference still the base, as released), or all merged in one stage (--stages merged)

Decisions on what the spec lists as not found (part D), each also commented where it is used:
  - gamma and k: k_max 3 for toy prompts (--k-max; 5-10 for real data); gamma: retrieve.py's grid scored by the
    validation VQA accuracy of the model before RAG-PT (spec A5; --gamma-tune f1: retrieve.py's pick by F1 of the
    kept reports, also the toy warm start's); RAG-PT prompts: the top-1 report (--pt-k 1), as in every released pair.
  - domain router: linear probe on frozen image features (retrieve.py), not a fine-tuned BiomedCLIP.
  - noisy image: the released pure noise (noise_png), one fixed file per image under OUT/noise/; --cm-image
    unrelated (an image of another domain) or both.
  - DPO temperature: beta 0.1 (TRL default, what the released code runs).
  - two stages (released train_dpo_2stages.py) by default; --stages merged trains on D_cm + D_oa in one stage.
  - pathology wording: "a pathology image" / "professional pathologist" (inferred, like the spec).
  - generation: greedy, at most 1024 new tokens (RULE's eval scripts); a truncated rejected answer makes no pair.
  - BLEU: the average of BLEU-1..4 (MMedPO, same group), BLEU-1..4 also written; METEOR: exact matches only
    (meteor_exact, below pycocoevalcap's METEOR 1.5); ROUGE-L beta 1 (rouge-score), --rouge-beta 1.2 pycocoevalcap's.
  - report "correct" (the authors' judge is not released): ROUGE-L against the reference >= --report-correct-rouge.
  - copy-reference rate: the share of all test questions answered right on the noise image with the real image's
    reports (the paper's, spec A7; also among those right with the real image); over-reliance: of those right
    without retrieval, the share wrong with it (RULE). RAG-PT / validation / test images in the knowledge base: exit 2.

Files written to --out: retriever/ (retrieve.py output), noise/, retrieved_test.jsonl (test items + reference_reports
+ retrieve_k, as the released retrieval scripts write), rag_pt.json (the preference set, released format),
stage1/ stage2/ (checkpoints), adapter/ (PEFT), metrics.jsonl, results.json with the comparison table.

File layout: Args -> data (items, splits) -> prompts -> RAG-PT pair building -> DPO (copied from dpo.py) ->
evaluation (VQA, reports, rates) -> main().
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm
import retrieve


@dataclass
class Args:
    # data
    data: str = "data/toy"  # toy folder: train.json is split into knowledge base / RAG-PT / validation, test.json tests
    pt_data: str = ""  # RAG-PT source (LLaVA VQA json or records with report); "" = the toy RAG-PT split
    test_data: str = ""  # evaluation set, same formats; "" = toy test.json
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    val_fraction: float = 0.15  # toy: share of each domain's training images for validation (gamma sweep)
    pt_fraction: float = 0.3  # toy: share of the rest kept out of the knowledge base for RAG-PT (RULE: disjoint)
    tasks: str = "vqa,report"  # which tasks build pairs and get evaluated (closed yes/no VQA, report generation)
    max_length: int = 512  # tokens per sequence, image tokens included
    skip_bad_samples: bool = False  # count and skip bad pairs instead of stopping at the first one
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths
    # retrieval
    retriever: str = ""  # a retrieve.py --out folder ("" = train one into OUT/retriever from the toy split)
    retriever_epochs: int = 30  # retrieve.py --epochs when training it here
    oracle_domain: bool = False  # use each record's "domain" instead of the router (oracle routing; the paper routes)
    k_max: int = 3  # candidates before the adaptive cut (not found in the paper; spec A5: 5 or 10; 3 keeps toy prompts short)
    rule: str = "paper"  # adaptive k: "paper" (log-ratio gap > gamma), "code" (top-1 ratio < threshold), "fixed"
    gamma: float = -1.0  # paper rule threshold (-1 = tuned as --gamma-tune says)
    gamma_tune: str = "accuracy"  # "accuracy": by validation VQA accuracy (spec A5); "f1": retrieve.py's pick
    val_data: str = ""  # closed VQA validation set for that sweep ("" = the toy validation split)
    code_threshold: float = 1.5  # released rule's threshold
    pt_k: int = 1  # reports in RAG-PT prompts (every released pair has exactly 1); 0 = adaptive as at inference
    # RAG-PT
    cm_image: str = "noise"  # D_cm rejected image: "noise" (released: pure Gaussian noise), "unrelated" or "both"
    report_correct_rouge: float = 40.0  # a generated report counts as correct at ROUGE-L >= this (judge not released)
    rouge_beta: float = 1.0  # ROUGE-L F-measure beta: 1 = rouge-score's fmeasure, 1.2 = pycocoevalcap's
    rag_pt_data: str = ""  # train on this preference json (e.g. a released MMed-RAG file) instead of building one
    stages: str = "two"  # "two": D_cm, then D_oa from the stage-1 adapter (released); "merged": all in one stage
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf)
    template: str = ""  # chat template override ("" = the checkpoint's)
    dtype: str = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 128  # LoRA rank (released: 128)
    lora_alpha: int = 256  # LoRA alpha (256)
    lora_dropout: float = 0.05  # LoRA dropout (0.05)
    tune_projector: bool = False  # also train the projector (ambiguous in the release; spec A8: a flag)
    sft_warmup_steps: int = -1  # warm start 1: SFT on plain prompts (learn to read images); -1 = 600 for tiny, else 0
    sft_rag_steps: int = -1  # warm start 2: SFT on plain + RAG prompts (learn the A6 format); -1 = 200 for tiny, else 0
    sft_lr: float = 1e-3  # learning rate of that warm start
    # DPO (released: beta 0.1, lr 1e-7, 3 epochs, batch 4 on LLaVA-Med 7B)
    beta: float = 0.1  # DPO temperature (paper's alpha not found; the release runs TRL's 0.1)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    label_smoothing: float = 0.0  # cDPO (sigmoid only)
    reference_free: bool = False  # reference log-probs = 0
    lr: float = 1e-5  # peak learning rate (toy default; 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # projector learning rate with --tune-projector
    batch_size: int = 16  # pairs per optimizer step over all ranks
    micro_batch_size: int = 8  # pairs per forward on one rank
    epochs: int = 2  # passes over each stage's pairs (released: 3)
    max_steps: int = -1  # per stage (-1 = epochs decide)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    seed: int = 0  # same seed + same data = same run
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    # output / evaluation
    out: str = "runs/mmed_rag"  # everything this run writes
    resume: bool = True  # continue each DPO stage from its newest complete checkpoint
    export_merged: bool = False  # also write the merged model as a llava-hf checkpoint
    eval_limit: int = 0  # evaluate on the first N test items per task (0 = all)
    eval_batch_size: int = 32  # prompts per generate call on one rank
    vqa_max_new_tokens: int = 1024  # generation cap, as RULE's eval scripts (model_vqa_iuxray.py: max_new_tokens=1024);
    report_max_new_tokens: int = 1024  # an answer reaching the cap is counted as truncated and never made a rejected answer
    image: str = ""  # answer this one image with retrieval and exit, training nothing (MMed-RAG issue #45)
    question: str = ""  # --image's closed question ("" = write a report)


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
# Data: items (one question or one report per image), the toy splits
# ----------------------------------------------------------------------------------------------------------


def read_items(path, image_folder: str = "", tasks=("vqa", "report")) -> list[dict]:
    """Items {"id", "task", "image" (as written in the record; the caller resolves it against its image folder),
    "domain" (None = ask the router), "question", "answer"}.
    Toy records give their CLOSED questions and their report; LLaVA VQA records (one question, answer yes/no) give
    a VQA item (other answers are not MMed-RAG's closed VQA and are counted as skipped); {"image", "report"} records
    give a report item."""
    items, skipped = [], 0
    for where, rec in lm.read_records(path):
        image, domain = lm.record_images(rec, where)[0], rec.get("domain")
        if "qa" in rec:  # toy record
            if "vqa" in tasks:
                for k, qa in enumerate(rec["qa"]):
                    if qa["answer"] in ("yes", "no"):
                        items.append({"id": f"{rec['id']}_q{k}", "task": "vqa", "image": image, "domain": domain,
                                      "question": qa["question"], "answer": qa["answer"]})
        elif "conversations" in rec and "vqa" in tasks:
            turns = lm.record_turns(rec, where)
            answer = normalize_answer(turns[1][1])
            if answer not in ("yes", "no"):
                skipped += 1
                continue
            items.append({"id": rec.get("id", where), "task": "vqa", "image": image, "domain": domain,
                          "question": turns[0][1].replace(lm.IMAGE_MARKER, "").strip(), "answer": answer})
        if rec.get("report") and "report" in tasks:
            items.append({"id": f"{rec.get('id', where)}_report", "task": "report", "image": image, "domain": domain,
                          "question": "", "answer": rec["report"].strip()})
    if skipped:
        print(f"{path}: {skipped} non-yes/no questions skipped (MMed-RAG evaluates closed VQA)", file=sys.stderr)
    return items


def toy_splits(folder: Path, val_fraction: float, pt_fraction: float):
    """Per domain, in file order: the last val_fraction of train.json is validation, then the last pt_fraction of
    the rest is the RAG-PT source; the first part is the retrievers' training set and knowledge base (kept disjoint
    from RAG-PT, as RULE requires, so retrieval on RAG-PT images can fail as it does at test time).
    Returns (kb record ids, pt record ids, val record ids)."""
    rest, val = retrieve.split_validation([rec for _, rec in lm.read_records(folder / "train.json")], val_fraction)
    kb, pt = retrieve.split_validation(rest, pt_fraction)  # the last part of each domain's list, in file order
    return {r["id"] for r in kb}, {r["id"] for r in pt}, {r["id"] for r in val}


# ----------------------------------------------------------------------------------------------------------
# Prompts (spec A6, exact strings of the released data / RULE eval code; pathology wording inferred)
# ----------------------------------------------------------------------------------------------------------

VQA_IMAGE = {"radiology": "a chest X-ray image", "ophthalmology": "a fundus image", "pathology": "a pathology image"}
REPORT_ROLE = {"radiology": ("radiologist", "an X-ray image"), "ophthalmology": ("ophthalmologist", "a fundus image"),
               "pathology": ("pathologist", "a pathology image")}
NOTE = ("It should be noted that the diagnostic information in the reference reports cannot be directly used as the "
        "basis for diagnosis, but should only be used for reference and comparison.")


def reference_list(reports: list[str]) -> str:
    """ "1. r1 2. r2 " -- each report followed by a space, as in the released data."""
    return "".join(f"{i}. {r} " for i, r in enumerate(reports, 1))


def rag_prompt(task: str, domain: str, reports: list[str], question: str = "") -> str:
    """The user turn after `<image>\\n` (LLaVA moves the image first). VQA names the image per domain (RULE:
    "a chest X-ray image" for radiology; released ophthalmology data: "a fundus image")."""
    k = len(reports)
    if task == "vqa":
        return (f"You are provided with {VQA_IMAGE.get(domain, 'a medical image')}, a image-related question and {k} "
                f"reference report(s): {reference_list(reports)}\nPlease answer the question based on the image and "
                f"report and choose from the following two options: [yes, no]. {NOTE} Question: {question}")
    role, image = REPORT_ROLE.get(domain, ("physician", "a medical image"))
    return (f"You are a professional {role}. You are provided with {image} and {k} reference report(s): "
            f"{reference_list(reports)}\nPlease generate a report based on the image. {NOTE} Please only include the "
            f"content of the report in your response.")


def plain_prompt(task: str, domain: str, question: str = "") -> str:
    """No retrieval. VQA: RULE's eval prompt. Report: the RAG prompt without the reference part (inferred)."""
    if task == "vqa":
        return f"{question} Please answer the question based on the image and choose from the following two options: [yes, no]."
    role, image = REPORT_ROLE.get(domain, ("physician", "a medical image"))
    return (f"You are a professional {role}. You are provided with {image}. Please generate a report based on the "
            f"image. Please only include the content of the report in your response.")


def is_correct(item: dict, prediction: str, report_threshold: float) -> bool:
    """VQA: the first yes/no word equals the answer. Report: ROUGE-L >= threshold (the authors' judge of report
    pairs is not released, spec A7; ROUGE-L is the report metric we have)."""
    if item["task"] == "vqa":
        return yes_no(prediction) == item["answer"]
    return rouge_l(prediction, item["answer"]) >= report_threshold


# ----------------------------------------------------------------------------------------------------------
# RAG-PT preference set (spec A7): three subsets from the model's own greedy answers
# ----------------------------------------------------------------------------------------------------------


def unrelated_image(item: dict, items: list[dict], seed: int) -> str:
    """An image of another domain (another patient and modality), chosen deterministically per item."""
    others = sorted({it["image"] for it in items if it["domain"] != item["domain"]}) or \
        sorted({it["image"] for it in items if it["image"] != item["image"]})
    h = int(hashlib.sha256(f"{seed}:{item['id']}".encode()).hexdigest()[:8], 16)
    return others[h % len(others)]


def release_noise(width: int, height: int, rng) -> Image.Image:
    """MMed-RAG's x_v* (train_dpo_2stages.py: generate_gaussian_noise(image, 0, 1)): pure noise of the image's shape,
    N(0, 1) clipped to [0, 1] as 8-bit RGB (half the pixels black), then preprocessed like any image."""
    noise = rng.normal(0.0, 1.0, (height, width, 3)).astype(np.float32)
    return Image.fromarray((np.clip(noise, 0.0, 1.0) * 255).astype(np.uint8))


def noise_png(folder: Path, image_path: str, cfg, seed: int) -> str:
    """release_noise for image_path, padded, resized and cropped as lm.preprocess_image does and written once as
    folder/<hash>.png (size x size, lossless): loading it like any image gives the pixels the release feeds the
    model (tested against CLIPImageProcessor), and PairData needs no special case. One fixed image per source
    (seeded) where the release draws a new one at each access, so runs repeat. Any rank may call it."""
    key = f"{seed}:{Path(image_path).resolve()}:{cfg.image_size}:{cfg.image_aspect_ratio}:{cfg.image_mean}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = Path(folder).resolve() / f"{digest[:20]}.png"
    if not path.exists():
        im = release_noise(*lm.load_image(image_path).size, np.random.default_rng(int(digest[:8], 16)))
        if cfg.image_aspect_ratio == "pad":
            im = lm.expand2square(im, tuple(int(x * 255) for x in cfg.image_mean))
        s, (w, h) = cfg.image_size, im.size  # short side to s (bicubic), centre crop: lm.preprocess_image's numbers
        w, h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        im = im.resize((w, h), resample=Image.BICUBIC).crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        im.save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic: ranks writing the same file at once leave one whole copy
    return str(path)


def training_pair(pair: dict) -> dict:
    """The record PairData trains on: the noise image is the file in rejected_image, so rejected_noised (which
    would make PairData draw dpo.py's own noise) is dropped when rejected_image is there."""
    return {k: v for k, v in pair.items() if k != "rejected_noised" or not pair.get("rejected_image")}


def rag_pt_pairs(items: list[dict], generate_fn, cm_image: str = "noise", report_threshold: float = 40.0,
                 seed: int = 0) -> tuple[list[dict], dict]:
    """Build D_cm, D_oa1, D_oa2 (spec A7) from greedy answers. items carry "reports" (retrieved with the real
    image) and "noise" (noise_png). generate_fn(jobs) -> answers, job = {"task", "image", "prompt"} (it may set
    job["truncated"]); the model behind it is the one before tuning. Returns (pairs in the released json format,
    subset sizes). Chosen and rejected share the RAG prompt in every subset (as in every released pair); an empty
    rejected answer, or one cut by the token cap (it would look complete), makes no pair and is counted."""
    variants = {"noise": ["noise"], "unrelated": ["unrelated"], "both": ["noise", "unrelated"]}[cm_image]
    jobs = []
    for it in items:
        rag = rag_prompt(it["task"], it["domain"], it["reports"], it["question"])
        it["_rag"] = rag
        jobs.append({"task": it["task"], "image": it["image"], "prompt": plain_prompt(it["task"], it["domain"], it["question"])})
        jobs.append({"task": it["task"], "image": it["image"], "prompt": rag})
        for v in variants:
            it["_" + v] = it["noise"] if v == "noise" else unrelated_image(it, items, seed)
            jobs.append({"task": it["task"], "image": it["_" + v], "prompt": rag})
    answers = generate_fn(jobs)
    per = 2 + len(variants)
    pairs = []
    sizes = {"cm": 0, "oa1": 0, "oa2": 0, "skipped_empty": 0, "skipped_truncated": 0, "candidates": len(items)}
    for n, it in enumerate(items):
        plain, with_rag, *starred = answers[n * per:(n + 1) * per]
        ok_plain, ok_rag = is_correct(it, plain, report_threshold), is_correct(it, with_rag, report_threshold)
        found = []  # (subset, index of the rejected answer's job, extra fields, variant)
        for m, (v, ans) in enumerate(zip(variants, starred)):
            if is_correct(it, ans, report_threshold):  # the image did not matter: copied from the reports
                found.append(("cm", n * per + 2 + m, {"rejected_noised": 1} if v == "noise" else {}, v))
        if not ok_plain and ok_rag:
            found.append(("oa1", n * per, {}, None))  # learn to use retrieval: reject the no-retrieval answer
        if ok_plain and not ok_rag:
            found.append(("oa2", n * per + 1, {}, None))  # retrieval misled: reject the answer it produced
        for subset, j, extra, variant in found:
            rejected = answers[j]
            if not rejected.strip() or jobs[j].get("truncated"):
                sizes["skipped_empty" if not rejected.strip() else "skipped_truncated"] += 1
                continue
            if variant:  # released files mark the noise pair with rejected_noised only; the file is named too
                extra["rejected_image"] = it["_" + variant]
            human = {"from": "human", "value": lm.IMAGE_MARKER + "\n" + it["_rag"]}
            pairs.append({"id": f"{it['id']}_{subset}" + (f"_{variant}" if variant and len(variants) > 1 else ""),
                          "image": it["image"], "domain": it["domain"], "task": it["task"], "subset": subset,
                          "conversations": [human, {"from": "gpt", "value": it["answer"]}],
                          "rejected_conversations": [human, {"from": "gpt", "value": rejected}], **extra})
            sizes[subset] += 1
    return pairs, sizes


# ----------------------------------------------------------------------------------------------------------
# Generation and scoring helpers (sharded model: every rank calls with the same number of batches)
# ----------------------------------------------------------------------------------------------------------


def pixel_loader(cfg, image_folder: Path, allow_outside: bool = True):
    """Image key -> pixel tensor, with dpo.py's PairData.pixel, so generation sees exactly what DPO trains on."""
    holder = SimpleNamespace(cfg=cfg, image_folder=image_folder, allow_outside=allow_outside)
    return lambda key: PairData.pixel(holder, key)


def generate_jobs(model, tokenizer, jobs: list[dict], pixel, rank: int, world: int, batch_size: int,
                  max_new_tokens: dict, desc: str = "generate") -> list[str]:
    """Greedy answers for every job; ranks take interleaved shares (padded to equal batch counts), the answers are
    gathered on every rank. Jobs of one task are batched together (VQA stops after a few tokens). Sets
    job["truncated"]: lm.generate does not say why it stopped, so an answer whose re-encoded length reaches the cap
    counts as cut (re-encoding can differ from the generated ids by a token or so)."""
    cfg = model.config
    model.eval()
    answers = {}
    for task in dict.fromkeys(j["task"] for j in jobs):
        idx = [i for i, j in enumerate(jobs) if j["task"] == task]
        mine = idx[rank::world]
        n_batches = math.ceil(math.ceil(len(idx) / world) / batch_size)
        for b in tqdm(range(n_batches), desc=f"{desc} ({task})", disable=rank != 0, leave=False):
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            real = len(chunk)
            chunk = chunk or idx[:1]
            prompts = [lm.tokenize_prompt(tokenizer, lm.place_image_markers([("user", jobs[i]["prompt"])], 1),
                                          cfg.template, cfg.num_image_tokens, cfg.image_token_id) for i in chunk]
            pix = torch.stack([pixel(jobs[i]["image"]) for i in chunk])
            out = lm.generate(model, tokenizer, prompts, pix, max_new_tokens=max_new_tokens[task])
            answers.update({i: a for i, a in zip(chunk[:real], out[:real])})
    if hasattr(model, "reshard"):
        model.reshard()  # no-grad forwards leave the FSDP2 root gathered
    gathered = [None] * world
    dist.all_gather_object(gathered, answers)
    merged = {i: a for part in gathered for i, a in part.items()}
    for i, j in enumerate(jobs):
        j["truncated"] = len(tokenizer.encode(merged[i], add_special_tokens=False)) >= max_new_tokens[j["task"]]
    return [merged[i] for i in range(len(jobs))]


def yes_token_ids(tokenizer, template: str) -> tuple[int, int]:
    """First answer token of "yes" and of "no" as the template tokenises an answer."""
    ids = []
    for word in ("yes", "no"):
        t = lm.tokenize_conversation(tokenizer, [("user", "q"), ("assistant", word)], template, 1, -1)
        ids.append(next(i for i, l in zip(t["input_ids"], t["labels"]) if l != lm.IGNORE_INDEX))
    return ids[0], ids[1]


@torch.no_grad()
def yes_scores(model, tokenizer, jobs: list[dict], pixel, rank: int, world: int, batch_size: int) -> list[float]:
    """logit("yes") - logit("no") at the first answer position: the score behind AUROC (a ranking needs more than
    hard yes/no labels; from hard labels AUROC would equal balanced accuracy)."""
    cfg = model.config
    yes_id, no_id = yes_token_ids(tokenizer, cfg.template)
    mine = list(range(rank, len(jobs), world))
    n_batches = math.ceil(math.ceil(len(jobs) / world) / batch_size)
    scores = {}
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        chunk = chunk or [0]
        prompts = [{"input_ids": lm.tokenize_prompt(tokenizer, lm.place_image_markers([("user", jobs[i]["prompt"])], 1),
                                                    cfg.template, cfg.num_image_tokens, cfg.image_token_id)} for i in chunk]
        batch = lm.collate(prompts, tokenizer.pad_token_id, padding_side="left")
        device = next(model.parameters()).device
        attn = batch["attention_mask"].to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(batch["input_ids"].to(device), torch.stack([pixel(jobs[i]["image"]) for i in chunk]).to(device),
                       attention_mask=attn, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
        s = (logits[:, yes_id] - logits[:, no_id]).tolist()
        scores.update({i: v for i, v in zip(chunk[:real], s[:real])})
    if hasattr(model, "reshard"):
        model.reshard()
    gathered = [None] * world
    dist.all_gather_object(gathered, scores)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(jobs))]


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting 1/2
    (Mann-Whitney U from average ranks)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, the average over each group of ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def vqa_metrics(items: list[dict], predictions: list[str], scores: list[float] | None) -> dict:
    """Accuracy, F1 ('yes' positive; an answer that is neither yes nor no is wrong and not 'yes') and AUROC, in %."""
    pred = [yes_no(p) for p in predictions]
    gold = [it["answer"] for it in items]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
    out = {"acc": 100 * sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold)),
           "f1": 100 * 2 * tp / max(1, 2 * tp + fp + fn), "n": len(gold)}
    if scores is not None:
        a = auroc(scores, [g == "yes" for g in gold])
        out["auroc"] = None if a is None else 100 * a
    return out


# ----------------------------------------------------------------------------------------------------------
# DPO, copied from dpo.py (pairs -> tensors, loss, LoRA policy + adapters-off reference, FSDP2, checkpoints)
# ----------------------------------------------------------------------------------------------------------


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
        self.image_folder, self.cfg, self.items, self.system = image_folder, cfg, [], system  # system prompt (None: the template's)
        self.skipped, self.examples = dict(skipped or {}), []  # reason -> count; the first messages, for the log
        self.allow_outside, self._opened = allow_outside, set()
        for where, rec in records:
            try:
                self.items.append(self._tokenize(where, rec, tokenizer, max_length))
            except lm.DataError as e:
                if not skip_bad:
                    e.skippable = True  # cli() then suggests --skip-bad-samples
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
        if rec.get("rejected_noised") and not rec.get("rejected_image"):  # MMed-RAG's released cross-modality pairs
            rejected_images = ["noise:" + p for p in images]
        cfg = self.cfg
        tok = lambda turns, n: lm.tokenize_conversation(tokenizer, lm.place_image_markers(turns, n, where), cfg.template,
                                                        cfg.num_image_tokens, cfg.image_token_id, max_length, where,
                                                        self.system)
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
        image = lm.load_image(lm.resolve_image(self.image_folder, key.removeprefix("noise:"), key, self.allow_outside))
        if key.startswith("noise:"):  # MMed-RAG's generate_gaussian_noise: N(0, 1) of the image's shape, clipped to
            rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))  # [0, 1], 8-bit
            image = Image.fromarray((np.clip(rng.normal(0, 1, (image.height, image.width, 3)), 0, 1) * 255).astype(np.uint8))
        return lm.image_tensor(cfg, image)  # (one fixed noise image per source, seeded; the release draws anew)


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


# Copied from dpo.py: dpo_loss
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


# Copied from dpo.py: dpo_step
def dpo_step(args, model, ref_model, data, idx, tokenizer, device, ref_table=None) -> dict:
    """One micro-batch of pairs: the summed DPO loss (the loop averages it over the global batch) and statistics."""
    batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id, args.prefix_sharing), device)
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
    return {"loss": losses.sum(), "n": torch.tensor(float(B)), "rewards_chosen": rc.sum(), "rewards_rejected": rr.sum(),
            "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(),
            "tokens": batch["n_tokens"]}


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
# Answer normalisation, copied from dpo.py (LLaVA-Med's normalize_word; first yes/no word)
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


# Copied from dpo.py: yes_no
def yes_no(prediction: str) -> str | None:
    """The first word of the normalised answer that is 'yes' or 'no' ("Answer:no" counts; 'normal', 'note' or
    'know' never count as 'no'), else None."""
    for w in re.findall(r"\w+", normalize_answer(prediction)):
        if w in ("yes", "no"):
            return w
    return None


# ----------------------------------------------------------------------------------------------------------
# Report-generation metrics, written by hand (no pycocoevalcap / Java here). MMed-RAG releases no metric code
# (spec A, issue #24); MMedPO reports BLEU as the average of BLEU-1..4 with ROUGE-L and METEOR. Verified in
# tests/test_mmed_rag.py against sacrebleu (BLEU), rouge-score (ROUGE-L) and NLTK's METEOR (exact stage, a fixture).
# ----------------------------------------------------------------------------------------------------------

def report_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, as pycocoevalcap's PTB tokenizer does before scoring."""
    return re.findall(r"\w+", text.lower())


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


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypothesis: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004) in %: P = LCS/|hyp|, R = LCS/|ref|, F = (1+β²)PR / (R + β²P). β = 1 is
    rouge-score's fmeasure (tested); pycocoevalcap's Rouge uses β = 1.2 (--rouge-beta 1.2), which weighs recall more."""
    h, r = report_tokens(hypothesis), report_tokens(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 100 * (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)


def meteor_exact(hypothesis: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR's exact-match stage only (Banerjee & Lavie 2005 parameters) in %: no stem, synonym or paraphrase
    stage, so NOT pycocoevalcap's METEOR 1.5 that papers report, and below it when word forms differ ("nodules" /
    "nodule": 48.1 where NLTK with its stemmer gives 75.5). Fmean = PR / (αP + (1-α)R); penalty = γ (chunks /
    matches)^β; score = Fmean (1 - penalty). Each hypothesis word takes an unused identical reference word, the one
    extending the current chunk if any: NLTK's exact stage, but for repeated reference words, where NLTK takes the
    last free one and this gives fewer chunks (tests/fixtures/meteor_nltk.json)."""
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


def report_scores(hypotheses: list[str], references: list[str], rouge_beta: float = 1.0) -> dict:
    """The report columns of MMed-RAG Table 2 / MMedPO Table 1: BLEU-1..4, their average ("BLEU" in MMedPO), and
    sentence ROUGE-L (β = rouge_beta) and exact-match METEOR averaged over reports. All in %."""
    b = corpus_bleu(hypotheses, references)
    n = max(len(hypotheses), 1)
    return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "bleu": sum(b) / 4,
            "rouge_l": sum(rouge_l(h, r, rouge_beta) for h, r in zip(hypotheses, references)) / n,
            "meteor_exact": sum(meteor_exact(h, r) for h, r in zip(hypotheses, references)) / n, "n": len(hypotheses)}


# ----------------------------------------------------------------------------------------------------------
# Warm start (tiny random model only): SFT on plain and RAG prompts of the knowledge-base images
# ----------------------------------------------------------------------------------------------------------


def sft_warmup(args: Args, model, tokenizer, examples: list[dict], pixel, device, steps: int, log):
    """The tiny model is random: before RAG-PT means anything it must answer, with and without reports. Full model
    + projector, the same on every rank (same seed, same data, no communication), like dpo.py's warm start.
    examples: {"image", "prompt", "answer"}."""
    cfg = model.config
    seqs = [lm.tokenize_conversation(tokenizer, lm.place_image_markers([("user", e["prompt"]), ("assistant", e["answer"])], 1),
                                     cfg.template, cfg.num_image_tokens, cfg.image_token_id, args.max_length,
                                     f"warm-start example {e['image']}") for e in examples]
    model.train()
    trainable = [p for n, p in model.named_parameters() if not n.startswith("vision_tower.")]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.sft_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, steps, 0.05)
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(steps), desc="warm start", disable=dist.get_rank() != 0, leave=False)
    for step in bar:
        idx = torch.randint(len(seqs), (args.micro_batch_size * 2,), generator=g).tolist()
        batch = to_device(lm.collate([seqs[i] for i in idx], tokenizer.pad_token_id), device)
        pix = torch.stack([pixel(examples[i]["image"]) for i in idx]).to(device)
        logits = model(batch["input_ids"], pix, batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=lm.IGNORE_INDEX, reduction="none")
        n = (labels != lm.IGNORE_INDEX).sum(1)
        # mean per example, then over examples: a one-token yes/no answer weighs as much as a 35-token report
        loss = (tok.sum(1) / n.clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log({"phase": "sft_warmup", "step": step, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.requires_grad_(False)
    model.eval()


# ----------------------------------------------------------------------------------------------------------
# RAG-PT training: one DPO stage (the loop of dpo.py), run once per stage
# ----------------------------------------------------------------------------------------------------------


def dpo_stage(args: Args, name: str, model, ref_model, data, tokenizer, device, rank: int, world: int, log) -> dict:
    """DPO on one subset with a fresh optimizer and schedule (released two-stage script: a new run that loads the
    stage-1 LoRA). A subset smaller than the global batch trains with the largest batch it fills (printed); an
    empty one is reported and skipped, never a silent zero loss. Resumes from OUT/<name>/checkpoints."""
    out = Path(args.out) / name
    unit = args.micro_batch_size * world
    bs = min(args.batch_size, len(data) // unit * unit) if data is not None else 0
    if bs == 0:
        if rank == 0:
            print(f"warning: {name}: {0 if data is None else len(data)} pairs, fewer than one micro-batch per rank "
                  f"({unit}); stage skipped", file=sys.stderr)
        log({"phase": name, "skipped": True, "pairs": 0 if data is None else len(data)})
        return {"steps": 0, "pairs": 0 if data is None else len(data)}
    if bs % unit:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of micro-batch x ranks ({unit})")
    sargs = dataclasses.replace(args, batch_size=bs)  # dpo_step scales the loss by the global batch
    steps_per_epoch = len(data) // bs
    total = steps_per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    if rank == 0:
        print(f"{name}: {len(data)} pairs, global batch {bs} = {args.micro_batch_size} x {world} ranks x "
              f"{bs // unit} accumulation, {total} steps")
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")],
               "lr": args.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("projector.")],
               "lr": args.projector_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step = 0
    resume_from = latest_checkpoint(out) if args.resume else None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, rank)["step"]
        if rank == 0:
            print(f"{name}: resumed from {resume_from} (step {step})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=step, desc=name, disable=rank != 0, leave=False)
    last = {}
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        model.train()
        micro = my_micro_batches(global_batches(len(data), bs, epoch, args.seed)[k], args.micro_batch_size, rank, world)
        sums = {}
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)
            for key, v in dpo_step(sargs, model, ref_model, data, idx, tokenizer, device, world).items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
        totals = torch.stack([sums[key] for key in sorted(sums)])
        dist.all_reduce(totals)
        sums = dict(zip(sorted(sums), totals.tolist()))
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
        if not torch.isfinite(grad_norm) or not math.isfinite(sums["loss"]):
            raise FloatingPointError(f"{name}: non-finite loss or gradient at step {step + 1}")
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        step += 1
        n = sums["pairs"]
        last = {"phase": name, "step": step, "loss": sums["loss"] / n, "margin": sums["margin"] / n,
                "accuracy": sums["accuracy"] / n, "rewards_chosen": sums["rewards_chosen"] / n,
                "rewards_rejected": sums["rewards_rejected"] / n, "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0]}
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", margin=f"{last['margin']:.3f}")
    bar.close()
    if resume_from is None or step > int(resume_from.name.split("_")[-1]):
        save_checkpoint(out, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args), "stage": name}, rank)
    return {"steps": step, "pairs": len(data), "last": last}


# ----------------------------------------------------------------------------------------------------------
# Evaluation: VQA (acc, F1, AUROC), reports (BLEU, ROUGE-L, METEOR), copy-reference and over-reliance rates
# ----------------------------------------------------------------------------------------------------------


def rates(items: list[dict], plain: list[str], rag: list[str], noise: list[str]) -> dict:
    """Closed-VQA rates in % (None without a denominator) from the answers without retrieval, with it, and with it
    on the noise image. copy_reference_rate (the paper's, spec A7: 55 -> 28 %): of all questions, the share answered
    right on the noise image, i.e. from the reports alone; copy_reference_rate_of_correct: the same share among the
    questions answered right with the real image (this file's earlier figure). over_reliance_rate (RULE; 43 -> 8 %):
    of the questions answered right without retrieval, the share answered wrongly with it."""
    ok = lambda answers: [is_correct(it, a, 0) for it, a in zip(items, answers, strict=True)]  # noqa: E731
    ok_plain, ok_rag, ok_noise = ok(plain), ok(rag), ok(noise)

    def share(hit, among):  # % of the questions in `among` that are in `hit`
        return 100 * sum(h and a for h, a in zip(hit, among)) / sum(among) if any(among) else None

    return {"copy_reference_rate": share(ok_noise, [True] * len(items)),
            "copy_reference_rate_of_correct": share(ok_noise, ok_rag),
            "over_reliance_rate": share([not x for x in ok_rag], ok_plain)}


def evaluate(args: Args, model, tokenizer, items: list[dict], pixel, rank: int, world: int, desc: str) -> dict:
    """Without and with retrieval on the test items (each carries its retrieved "reports"); VQA also with the noise
    image under RAG (copy-reference rate). Returns {"plain": {...}, "rag": {...}, rates, truncated, predictions}."""
    vqa = [it for it in items if it["task"] == "vqa"]
    rep = [it for it in items if it["task"] == "report"]
    jobs = []
    for it in vqa + rep:
        jobs.append({"task": it["task"], "image": it["image"], "prompt": plain_prompt(it["task"], it["domain"], it["question"])})
        jobs.append({"task": it["task"], "image": it["image"], "prompt": rag_prompt(it["task"], it["domain"], it["reports"], it["question"])})
    for it in vqa:
        jobs.append({"task": "vqa", "image": it["noise"], "prompt": rag_prompt("vqa", it["domain"], it["reports"], it["question"])})
    tokens = {"vqa": args.vqa_max_new_tokens, "report": args.report_max_new_tokens}
    answers = generate_jobs(model, tokenizer, jobs, pixel, rank, world, args.eval_batch_size, tokens, desc)
    n2 = 2 * len(vqa)
    plain_v, rag_v, noise_v = answers[0:n2:2], answers[1:n2:2], answers[n2 + 2 * len(rep):]
    plain_r, rag_r = answers[n2:n2 + 2 * len(rep):2], answers[n2 + 1:n2 + 2 * len(rep):2]
    res = {"plain": {}, "rag": {}, "truncated": dict(Counter(j["task"] for j in jobs if j["truncated"]))}
    if vqa:
        sc = yes_scores(model, tokenizer, jobs[:n2], pixel, rank, world, args.eval_batch_size)
        res["plain"]["vqa"] = vqa_metrics(vqa, plain_v, sc[0::2])
        res["rag"]["vqa"] = vqa_metrics(vqa, rag_v, sc[1::2])
        res.update(rates(vqa, plain_v, rag_v, noise_v))
        res["mean_k_vqa"] = float(np.mean([len(it["reports"]) for it in vqa]))
    if rep:
        refs = [it["answer"] for it in rep]
        res["plain"]["report"] = report_scores(plain_r, refs, args.rouge_beta)
        res["rag"]["report"] = report_scores(rag_r, refs, args.rouge_beta)
        res["mean_k_report"] = float(np.mean([len(it["reports"]) for it in rep]))
    res["predictions"] = [{"id": it["id"], "answer": it["answer"], "plain": p, "rag": r, **({"noise": z} if z is not None else {})}
                          for it, p, r, z in zip(vqa + rep, plain_v + plain_r, rag_v + rag_r, noise_v + [None] * len(rep))]
    return res


def format_table(before: dict, after: dict) -> str:
    head = ("| model | VQA acc | VQA F1 | VQA AUROC | BLEU (avg 1-4) | ROUGE-L | METEOR (exact) | copy-reference | "
            "copy-ref. of correct | over-reliance |\n|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [head]
    for name, m, r in [("base (no retrieval)", before["plain"], {}), ("+ RAG", before["rag"], before),
                       ("+ RAG-PT (with RAG)", after["rag"], after)]:
        v, rp = m.get("vqa", {}), m.get("report", {})
        cells = [v.get("acc"), v.get("f1"), v.get("auroc"), rp.get("bleu"), rp.get("rouge_l"), rp.get("meteor_exact")]
        cells += [r.get(k) for k in ("copy_reference_rate", "copy_reference_rate_of_correct", "over_reliance_rate")]
        lines.append(f"| {name} | " + " | ".join(f(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def tune_gamma(gammas: list[float], items: list[dict], generate_fn) -> tuple[float, list[dict]]:
    """Spec A5: gamma by validation VQA accuracy. items carry their top-k_max "reports" and "scores"; each question
    is answered once per prefix k = 1..k_max (not once per gamma), then each gamma scores the accuracy of the
    answers at the k its rule keeps (retrieve.sweep_gamma; ties go to the smaller mean k)."""
    jobs = [{"task": "vqa", "image": it["image"], "prompt": rag_prompt("vqa", it["domain"], it["reports"][:k], it["question"])}
            for it in items for k in range(1, len(it["reports"]) + 1)]
    answers = iter(generate_fn(jobs))
    ok = [[is_correct(it, next(answers), 0) for _ in it["reports"]] for it in items]
    accuracy = lambda g, ks: 100 * float(np.mean([o[k - 1] for o, k in zip(ok, ks)]))  # noqa: E731
    k_max = max(len(it["reports"]) for it in items)
    return retrieve.sweep_gamma(gammas, [np.asarray(it["scores"]) for it in items], None, k_max, accuracy)


def answer_one(args: Args) -> dict:
    """--image: route, retrieve, cut, prompt (spec A6) and answer one image, with no process group and no training.
    Gamma: --gamma, else the retriever's (retrieve.py's F1 pick; a full run prints the one it tunes by accuracy and
    keeps it in results.json["retrieval"]["gamma"])."""
    if not (Path(args.retriever) / "rag_config.json").exists():
        raise FileNotFoundError(f"--image needs --retriever, a retrieve.py output folder ({args.retriever!r} is not one)")
    rag = retrieve.DomainRAG.load(args.retriever)
    gamma = rag.config["gamma"] if args.gamma < 0 else args.gamma
    rag.config["code_threshold"] = args.code_threshold
    got = rag.retrieve([args.image], k_max=args.k_max, rule=args.rule, gamma=gamma)[0]
    task = "vqa" if args.question else "report"
    prompt = rag_prompt(task, got["domain"], got["reports"], args.question)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed)
    cap = args.vqa_max_new_tokens if task == "vqa" else args.report_max_new_tokens
    answer = lm.ask(model.eval(), tokenizer, [lm.load_image(args.image)], prompt, max_new_tokens=cap)
    print(f"domain: {got['domain']} (router)\nretrieved reports (rule {args.rule}, gamma {gamma}: {got['k']} of "
          f"{len(got['candidates'])} kept):")
    for i, (r, sc) in enumerate(zip(got["candidates"], got["scores"]), 1):
        print(f"  {'kept' if i <= got['k'] else 'cut '} {sc:.4f}  {r}")
    print(f"prompt:\n{lm.IMAGE_MARKER}\n{prompt}\nanswer:\n{answer}")
    return {"domain": got["domain"], "reports": got["reports"], "prompt": prompt, "answer": answer}


def main(argv=None):
    args = parse_args(Args, argv)
    if args.image:
        return answer_one(args)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out = Path(args.out)
    master = rank == 0
    t0 = time.time()
    tasks = tuple(t for t in args.tasks.split(",") if t)

    def log(row: dict):
        if master:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"mmed_rag.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    torch.manual_seed(args.seed)

    # ---- data: knowledge base / RAG-PT / validation / test
    data = Path(args.data)
    toy = data.is_dir() and (data / "train.json").exists()
    folder = Path(args.image_folder or (data if toy else data.parent))
    if toy:
        kb_ids, pt_ids, val_ids = toy_splits(data, args.val_fraction, args.pt_fraction)
        all_train = read_items(data / "train.json", str(folder), tasks)
        owner = lambda it: it["id"].rsplit("_", 1)[0]  # noqa: E731  (record id of an item)
        kb_items = [it for it in all_train if owner(it) in kb_ids]
        pt_items = [it for it in all_train if owner(it) in pt_ids]
        test_items = read_items(args.test_data or data / "test.json", str(folder), tasks)
        val_items = [it for it in read_items(data / "train.json", str(folder), ("vqa",)) if owner(it) in val_ids]
    else:
        if not args.retriever or not args.pt_data or not args.test_data:
            raise ValueError("outside the toy folder pass --retriever (a retrieve.py --out), --pt-data and --test-data")
        kb_items = []
        pt_items = read_items(args.pt_data, str(folder), tasks)
        test_items = read_items(args.test_data, args.image_folder or str(Path(args.test_data).parent), tasks)
        val_items = read_items(args.val_data, str(folder), ("vqa",)) if args.val_data else []
    for it in kb_items + pt_items + val_items:
        it["path"] = str(lm.resolve_image(folder, it["image"], it["id"], args.allow_images_outside_folder))
    test_folder = folder if toy or args.image_folder else Path(args.test_data).parent
    for it in test_items:
        it["path"] = str(lm.resolve_image(test_folder, it["image"], it["id"], args.allow_images_outside_folder))
        it["image"] = it["path"]
    if args.eval_limit:
        test_items = [it for t in tasks for it in [x for x in test_items if x["task"] == t][:args.eval_limit]]

    # ---- 1. retrieval system: router + one retriever and index per domain (retrieve.py)
    rdir = Path(args.retriever or out / "retriever")
    if not (rdir / "rag_config.json").exists():
        if not toy:
            raise FileNotFoundError(f"{rdir}: no retrieve.py output (rag_config.json)")
        rargs = retrieve.Args(data=str(data), out=str(rdir), epochs=args.retriever_epochs, k_max=args.k_max,
                              rule=args.rule, code_threshold=args.code_threshold, seed=args.seed)
        pairs = retrieve.read_pairs(data / "train.json")
        kb_pairs = [p for p in pairs if p["id"] in kb_ids]
        val_pairs = [p for p in pairs if p["id"] in val_ids]
        test_pairs = retrieve.read_pairs(data / "test.json")
        res = retrieve.build_all(rargs, kb_pairs, val_pairs, test_pairs, rank, world, device, log)
        if master:
            (rdir / "results.json").write_text(json.dumps(res, indent=1))
    rag = retrieve.DomainRAG.load(rdir)
    pt_items, val_items, test_items = [rag.drop_kb_images(x, what, args.skip_bad_samples) for x, what in
                                       ((pt_items, "RAG-PT"), (val_items, "validation"), (test_items, "test"))]
    gamma = rag.config["gamma"] if args.gamma < 0 else args.gamma  # retrieve.py's (F1): the warm start's prompts
    own = {it["path"] for it in kb_items}  # a KB image must not retrieve its own entry
    attach = lambda items, gamma, **kw: rag.attach(items, args.k_max, args.rule, gamma, args.code_threshold,  # noqa: E731
                                                   oracle=args.oracle_domain, **kw)
    misrouted = {"kb": attach(kb_items, gamma, exclude_own=own) if kb_items else 0}

    # ---- 2. the Med-LVLM (warm-started when it is the tiny random model)
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed)
    pixel = pixel_loader(model.config, folder, True)
    tiny = args.model == "tiny"
    warm = args.sft_warmup_steps if args.sft_warmup_steps >= 0 else (600 if tiny else 0)
    warm_rag = args.sft_rag_steps if args.sft_rag_steps >= 0 else (200 if tiny else 0)
    if warm or warm_rag:
        if not kb_items:
            raise ValueError("a warm start needs the toy knowledge-base split (pass 0 steps for a trained model)")
        plain = [{"image": it["image"], "answer": it["answer"],
                  "prompt": plain_prompt(it["task"], it["domain"], it["question"])} for it in kb_items]
        with_rag = [{"image": it["image"], "answer": it["answer"],
                     "prompt": rag_prompt(it["task"], it["domain"], it["reports"], it["question"])} for it in kb_items]
        # short prompts first: through ~250-token RAG prompts the random model does not learn to read the images
        # in a CPU budget (300 mixed steps left it at chance); then both prompt kinds, so it knows the A6 format
        if warm:
            sft_warmup(args, model, tokenizer, plain, pixel, device, warm, log)
        if warm_rag:
            sft_warmup(args, model, tokenizer, plain + with_rag, pixel, device, warm_rag, log)
        if master:
            lm.save_llava_hf(model, tokenizer, out / "base_llava_hf")  # the adapter's base model
    model, ref_model = build_models(args, model, device)
    torch.manual_seed(args.seed + rank)
    shard(model, device, args.activation_checkpointing)
    if ref_model is not None and hasattr(ref_model, "language_model"):
        shard(ref_model, device)

    # ---- 3. gamma by validation accuracy (spec A5), retrieval for RAG-PT and test, noise images (the base model)
    tokens = {"vqa": args.vqa_max_new_tokens, "report": args.report_max_new_tokens}
    gen = lambda jobs, desc="RAG-PT": generate_jobs(model, tokenizer, jobs, pixel, rank, world,  # noqa: E731
                                                    args.eval_batch_size, tokens, desc)
    sweep = None
    if args.gamma_tune not in ("accuracy", "f1"):
        raise ValueError(f"--gamma-tune {args.gamma_tune!r}: accuracy or f1")
    if args.gamma < 0 and args.gamma_tune == "accuracy" and val_items and "vqa" in tasks:
        misrouted["val"] = attach(val_items, gamma, fixed_k=args.k_max)
        gamma, sweep = tune_gamma(rag.config.get("gammas", [gamma]), val_items, lambda j: gen(j, "gamma sweep"))
        if master:
            retrieve.print_sweep(sweep, f"gamma by VQA accuracy on {len(val_items)} validation questions:")
    elif args.gamma < 0 and args.gamma_tune == "accuracy" and master:
        print("warning: no validation questions (--val-data): gamma is retrieve.py's F1 pick", file=sys.stderr)
    misrouted["pt"] = attach(pt_items, gamma, fixed_k=args.pt_k)
    misrouted["test"] = attach(test_items, gamma)
    for it in pt_items + test_items:
        it["noise"] = noise_png(out / "noise", it["path"], model.config, args.seed)
    if master:
        print(f"retrieval: rule {args.rule}, gamma {gamma}, k_max {args.k_max}, routing "
              f"{'oracle' if args.oracle_domain else 'router'} (misrouted images: {misrouted}); RAG-PT prompts: "
              f"{'top-' + str(args.pt_k) if args.pt_k else 'adaptive'}")
        with open(out / "retrieved_test.jsonl", "w") as f:  # as the released retrieve_clip_*.py: + reference_reports, retrieve_k
            for it in test_items:
                f.write(json.dumps({**{k: v for k, v in it.items() if k not in ("reports", "scores", "noise")},
                                    "reference_reports": it["reports"], "retrieve_k": len(it["reports"])},
                                   ensure_ascii=False) + "\n")

    # ---- 4. evaluation before RAG-PT: base without and with retrieval (LoRA B = 0: the policy is the base)
    results = {"retrieval": {"gamma": gamma, "gamma_sweep": sweep, "rule": args.rule, "k_max": args.k_max,
                             "routing": "oracle" if args.oracle_domain else "router", "misrouted": misrouted}}
    results["before"] = evaluate(args, model, tokenizer, test_items, pixel, rank, world, "eval before")
    log({"phase": "eval_before", **{k: v for k, v in results["before"].items() if k != "predictions"}})

    # ---- 5. RAG-PT preference set from the model before tuning (greedy)
    if args.rag_pt_data:  # released files mark cross-modality pairs with rejected_noised / rejected_image only
        pairs = [p for _, p in lm.read_records(args.rag_pt_data)]
        for p in pairs:
            p.setdefault("subset", "cm" if p.get("rejected_noised") or p.get("rejected_image") else "oa")
            p.setdefault("task", "vqa" if "Question:" in p["conversations"][0]["value"] else "report")
            if p.get("rejected_noised") and not p.get("rejected_image"):  # the release draws it while training
                src = lm.resolve_image(folder, lm.record_images(p, p.get("id", ""))[0], p.get("id", ""), True)
                p["rejected_image"] = noise_png(out / "noise", src, model.config, args.seed)
        sizes = {s: sum(p["subset"] == s for p in pairs) for s in ("cm", "oa1", "oa2", "oa")}
        sizes.update(candidates=0, skipped_empty=0, skipped_truncated=0)
    else:
        pairs, sizes = rag_pt_pairs(pt_items, gen, args.cm_image, args.report_correct_rouge, args.seed)
    results["rag_pt_sizes"] = {t: {s: sum(p["subset"] == s and p["task"] == t for p in pairs) for s in ("cm", "oa1", "oa2", "oa")}
                               for t in tasks}
    results["rag_pt_sizes"]["total"] = sizes
    if master:
        if not args.rag_pt_data:
            (out / "rag_pt.json").write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
        print(f"RAG-PT set from {sizes['candidates']} items: cross-modality {sizes['cm']}, overall (a) retrieval "
              f"helps {sizes['oa1']}, overall (b) retrieval hurts {sizes['oa2']}; skipped: {sizes['skipped_empty']} "
              f"empty, {sizes['skipped_truncated']} cut by the token cap; per task "
              f"{json.dumps({t: results['rag_pt_sizes'][t] for t in tasks})}; written to {out / 'rag_pt.json'}")
    log({"phase": "rag_pt", **sizes})

    # ---- 6. DPO: two stages (D_cm, then D_oa from the stage-1 adapter) or merged
    def pair_data(subsets):
        src = args.rag_pt_data or out / "rag_pt.json"
        recs = [(f"{src} pair {p.get('id', n)}", training_pair(p)) for n, p in enumerate(pairs) if p["subset"] in subsets]
        if not recs:
            return None
        return PairData(recs, folder, tokenizer, model.config, args.max_length, args.skip_bad_samples, True)

    plan = [("stage1", ("cm",)), ("stage2", ("oa1", "oa2", "oa"))] if args.stages == "two" else \
        [("merged", ("cm", "oa1", "oa2", "oa"))]
    results["dpo"] = {}
    for name, subsets in plan:
        results["dpo"][name] = dpo_stage(args, name, model, ref_model, pair_data(subsets), tokenizer, device, rank,
                                         world, log)
    save_adapter_or_model(args, model, tokenizer, out, rank)

    # ---- 7. evaluation after RAG-PT
    results["after"] = evaluate(args, model, tokenizer, test_items, pixel, rank, world, "eval after")
    log({"phase": "eval_after", **{k: v for k, v in results["after"].items() if k != "predictions"}})
    results["table"] = format_table(results["before"], results["after"])
    results["seconds"] = time.time() - t0
    if master:
        preds = {"before": results["before"].pop("predictions"), "after": results["after"].pop("predictions")}
        (out / "predictions.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(results["table"])
        print(f"done in {results['seconds']:.0f} s; results in {out / 'results.json'}")
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    except lm.DataError as e:  # bad data: say which file and record, without a traceback through torch
        print(f"mmed_rag.py: bad data: {e}\n(--skip-bad-samples counts and skips such records)", file=sys.stderr)
        sys.exit(2)
