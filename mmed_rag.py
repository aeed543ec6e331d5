"""mmed_rag.py -- MMed-RAG: domain-aware retrieval, adaptive context, and RAG preference tuning (RAG-PT) for a
LLaVA-style medical VLM (Xia et al., ICLR 2025, arXiv 2410.13085; spec part A).

    # embedded default: toy data, tiny random LLaVA. Trains the router + 3 retrievers (retrieve.py), warm-starts the
    # tiny model (dpo.py's fixed warm start, then plain + RAG prompts), builds the RAG-PT pairs, runs two-stage DPO,
    # evaluates base / +RAG / +RAG-PT (README: CPU time)
    OMP_NUM_THREADS=1 python mmed_rag.py
    torchrun --nproc-per-node=2 mmed_rag.py                      # same run on 2 CPU processes (gloo)
    # real data: retrievers built first with retrieve.py on image-report pairs, then LLaVA-Med v1.5 on 8 GPUs
    torchrun --nproc-per-node=8 retrieve.py --data pairs_train.json --test-data pairs_test.json --encoder /ckpt/clip \\
        --out runs/retrieve
    torchrun --nproc-per-node=8 mmed_rag.py --model /ckpt/llava-med-v1.5-mistral-7b --retriever runs/retrieve \\
        --pt-data vqa_train.json --test-data vqa_test.json --image-folder /data/images --lr 1e-7 --epochs 3 \\
        --batch-size 4 --micro-batch-size 1 --max-length 1024 --val-data vqa_val.json
    # evaluate a checkpoint only (no training data is read): without and with retrieval, and the rates
    python mmed_rag.py --eval-only --model runs/mmed_rag/llava_hf --retriever runs/mmed_rag/retriever --gamma 0.01
    # one image with retrieval (MMed-RAG issue #45): prints the routed domain, the retrieved reports, the prompt and
    # the answer (no --question: a report); a trained run's model is OUT/llava_hf (--export-merged)
    python mmed_rag.py --image x.png --question "Is there a pleural effusion?" --retriever runs/mmed_rag/retriever \\
        --model runs/mmed_rag/llava_hf
    python mmed_rag.py --help                                    # every flag

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
  - noisy image: the released pure noise (dpo.py's PairData draws it for "noise:<image>" keys, the same pixels in
    generation and in DPO); --cm-image unrelated (an image of another domain) or both.
  - DPO temperature: beta 0.1 (TRL default, what the released code runs).
  - two stages (released train_dpo_2stages.py) by default; --stages merged trains on D_cm + D_oa in one stage.
  - pathology wording: "a pathology image" / "professional pathologist" (inferred, like the spec).
  - generation: greedy, at most 1024 new tokens (RULE's eval scripts); a truncated rejected answer makes no pair.
  - BLEU: the average of BLEU-1..4 (MMedPO, same group), BLEU-1..4 also written; METEOR: exact matches only
    (lm.meteor_exact, below pycocoevalcap's METEOR 1.5); ROUGE-L beta 1 (rouge-score), --rouge-beta 1.2 pycocoevalcap's.
  - report "correct" (the authors' judge is not released): ROUGE-L against the reference >= --report-correct-rouge.
  - copy-reference rate: the share of all test questions answered right on the noise image with the real image's
    reports (the paper's, spec A7; also among those right with the real image); over-reliance: of those right
    without retrieval, the share wrong with it (RULE). RAG-PT / validation / test images in the knowledge base: exit 2.

Caches, each keyed with cache_key on the Args above a field (Args lists what changes them first) and on the
retriever's and --model's files: OUT/retriever/ (fields above `model`), OUT/warm_start/ (above `gamma_tune`),
OUT/gamma_<key>.json (above `pt_data`), OUT/rag_pt_<key>.json (above `stages`). A folder made from other inputs, and
a stage's checkpoint folder made from another pair set, is moved aside to <name>.<its key>, never resumed.

Files written to --out: retriever/ (retrieve.py output), base_llava_hf/ (warm start 0, dpo.py's), warm_start/ (the
warm-started model/ and its phases), retrieved_test.jsonl (test items + reference_reports + retrieve_k, as the
released retrieval scripts write), rag_pt.json (the preference set, released format), stage1/ stage2/ (checkpoints),
adapter/ (PEFT), metrics.jsonl, predictions.json, results.json with the comparison table.

File layout: Args -> copied CLI blocks -> data (items, splits) -> prompts -> RAG-PT pair building -> DPO and the
training loop (copied from dpo.py) -> warm start, RAG-PT stages -> generation and evaluation -> main().
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

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
    # data and retrieval (every field above `model` keys the retriever trained here, OUT/retriever)
    data: str = "data/toy"  # toy folder: kb.json knowledge base, train.json warm start, ragpt.json RAG-PT, val.json, test.json
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    val_fraction: float = 1.0  # toy: share of each domain's val.json images (first in file order) for the gamma sweep
    pt_fraction: float = 1.0  # toy: share of each domain's ragpt.json images (first in file order) for RAG-PT
    seed: int = 0  # same seed + same data = same run; the seed of the DPO stages (LoRA init, pair order, dropout), and with --warm-start-seed -1 of all before them
    retriever: str = ""  # a retrieve.py --out folder ("" = train one into OUT/retriever from the toy split)
    retriever_epochs: int = 30  # retrieve.py --epochs when training it here
    k_max: int = 3  # candidates before the adaptive cut (not found in the paper; spec A5: 5 or 10; 3 keeps toy prompts short)
    rule: Literal["paper", "code", "fixed"] = "paper"  # adaptive k: paper (log-ratio gap > gamma), code (top-1 ratio < threshold), fixed
    code_threshold: float = 1.5  # released rule's threshold
    # model and warm start (every field above `gamma_tune` also keys the warm start, OUT/warm_start)
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf)
    template: str = ""  # chat template override ("" = the checkpoint's)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    max_length: int = 512  # tokens per sequence, image tokens included
    tasks: str = "vqa,report"  # which tasks build pairs and get evaluated (closed yes/no VQA, report generation)
    oracle_domain: bool = False  # use each record's "domain" instead of the router (oracle routing; the paper routes)
    gamma: float = -1.0  # paper rule threshold (-1 = tuned as --gamma-tune says; the warm start's prompts use retrieve.py's)
    sft_base_steps: int = -1  # warm start 0, the stand-in for the SFT checkpoint (LLaVA-Med v1.5) a real run starts from: dpo.py's warm start, SFT on the toy train split's questions and reports; -1 = 1000 for tiny (the tiny model then reads the image in part and RAG-PT has something to re-weight: val RAG-PT - RAG +4.5 / +4.2 / +2.4 at seeds 0 1 2; without it 200-600 steps of warm start 1 read neither image nor references, README), else 0
    warm_start_seed: int = 0  # seed of all that comes before RAG-PT's DPO -- the tiny model's init, its warm starts, the retriever trained here, gamma and the RAG-PT pairs built from them: one fixed starting system, as LLaVA-Med v1.5 and the released retriever are, and as dpo.py's warm start (-1, or --sft-base-steps 0: --seed); --seed varies the DPO stages (LoRA init, pair order, dropout)
    sft_warmup_steps: int = -1  # warm start 1: SFT on plain A6 prompts (after warm start 0: learn this file's prompts); -1 = 100 for tiny (one val setting, with 200 below; the v2 toy's earlier 200 + 80 without warm start 0 gave a constant "no"), else 0
    sft_rag_steps: int = -1  # warm start 2: SFT on plain + RAG prompts (learn the A6 format, trust the references); -1 = 200 for tiny, else 0
    sft_lr: float = 1e-3  # learning rate of the warm starts
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine (every phase: the warm starts and the DPO stages)
    weight_decay: float = 0.0  # AdamW weight decay (every phase)
    grad_clip: float = 1.0  # max global gradient norm (0 = off; every phase)
    warm_balance_prior: bool = True  # toy: warm start on the closed questions whose wording does not give the answer away (data/toy_readers.py prior_balanced)
    warm_reference: Literal["own", "retrieved"] = "own"  # warm start 2's references: own = the image's own train report first, then the retrieved ones (see warm_start_rag); retrieved = only retrieved
    # generation from the model before RAG-PT (fields above `pt_data` key the tuned gamma, above `stages` the pairs)
    gamma_tune: Literal["accuracy", "f1"] = "accuracy"  # accuracy: by validation VQA accuracy (spec A5); f1: retrieve.py's pick
    val_data: str = ""  # closed VQA validation set for that sweep ("" = the toy validation split)
    vqa_max_new_tokens: int = -1  # generation cap: -1 = 1024 as RULE's eval scripts (model_vqa_iuxray.py: max_new_tokens=1024), 16 for tiny;
    report_max_new_tokens: int = -1  # -1 = 1024, 96 for tiny (toy reports are under 60 tokens; a barely trained tiny model can run on to the cap: 3 min per evaluation). An answer reaching the cap is counted as truncated and never made a rejected answer
    pt_data: str = ""  # RAG-PT source (LLaVA VQA json or records with report); "" = the toy RAG-PT split
    pt_k: int = 1  # reports in RAG-PT prompts (every released pair has exactly 1); 0 = adaptive as at inference
    cm_image: Literal["noise", "unrelated", "both"] = "noise"  # D_cm rejected image: noise (released: pure Gaussian noise), an unrelated image, or both
    report_correct_rouge: float = 40.0  # a generated report counts as correct at ROUGE-L >= this (judge not released)
    rag_pt_data: str = ""  # train on this preference json (e.g. a released MMed-RAG file) instead of building one
    # RAG-PT training: DPO (released: beta 0.1, lr 1e-7, 3 epochs, batch 4 on LLaVA-Med 7B; fields above `on_nonfinite` key the stage checkpoints)
    stages: Literal["two", "merged"] = "two"  # two: D_cm, then D_oa from the stage-1 adapter (released); merged: all in one stage
    full_finetune: bool = False  # train the whole language model instead of LoRA (reference = frozen copy)
    lora_r: int = 16  # LoRA rank (toy default, dpo.py's val sweep: r 128 is full rank on the 128-wide tiny model; released: 128)
    lora_alpha: int = 32  # LoRA alpha (toy default, alpha / r = 2 as released; released: 256)
    lora_dropout: float = 0.05  # LoRA dropout (0.05)
    tune_projector: bool = False  # also train the projector (ambiguous in the release; spec A8: a flag)
    beta: float = 2.0  # DPO temperature (toy default, dpo.py's val sweep: 0.1 lets the tiny policy drift; paper's alpha not found, the release runs TRL's 0.1)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO; ipo = Azar et al. 2023, length-normalised
    label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels (sigmoid only)
    reference_free: bool = False  # reference log-probs = 0
    prefix_sharing: bool = True  # one row per pair whose answers share image and prompt (exact; dpo.py); off with flash_attention_2 (its kernel takes no [T, T] mask)
    lr: float = 2e-4  # peak learning rate (toy default, val sweep on the fixed starting system, RAG-PT - RAG, mean of seeds 0 1 2: 1e-4 +0.8, 2e-4 +1.7, 3e-4 +1.6, 5e-4 +0.9, 7e-4 -0.3, 2e-4 for 8 epochs +1.5; README; dpo.py's 1e-3 drove the policy into report text on closed questions; v1 toy's 1e-5 moved no answer; released: 1e-7 on LLaVA-Med 7B)
    projector_lr: float = 2e-5  # projector learning rate with --tune-projector
    batch_size: int = 16  # pairs per optimizer step over all ranks (a smaller subset: the largest batch it fills)
    epochs: int = 4  # passes over each stage's pairs (toy default: ~100 pairs a stage = 6 steps an epoch; released: 3)
    max_steps: int = -1  # per stage (-1 = epochs decide)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # pairs per forward on one rank; also the warm start's global batch is 16 answers
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"  # transformers attention kernel (sdpa: flash/mem-efficient on GPU)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    skip_bad_samples: bool = False  # count and skip bad pairs (and knowledge-base images among the others) instead of stopping
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths
    # output
    out: str = "runs/mmed_rag"  # everything this run writes
    save_every: int = 0  # checkpoint every N optimizer steps of a phase (0 = only at its end)
    resume: bool = True  # continue each phase from its newest complete checkpoint made with the same arguments (others are moved aside; caches are reused while their key holds)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    export_merged: bool = False  # also write the merged model as a llava-hf checkpoint (OUT/llava_hf)
    # evaluation
    eval_only: bool = False  # only evaluate --model with --retriever on the test set (no training data is read)
    test_data: str = ""  # evaluation set, same formats as --pt-data; "" = toy test.json
    eval_limit: int = 0  # evaluate on the first N test items per task (0 = all)
    eval_batch_size: int = 32  # prompts per generate call on one rank
    rouge_beta: float = 1.0  # ROUGE-L F-measure beta: 1 = rouge-score's fmeasure, 1.2 = pycocoevalcap's
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
# Data: items (one question or one report per image), the toy splits; caches keyed on what made them
# ----------------------------------------------------------------------------------------------------------


def read_items(path, tasks=("vqa", "report")) -> list[dict]:
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
                                      "question": qa["question"], "answer": qa["answer"], "own_report": rec.get("report"),
                                      "kind": qa.get("kind"), "prior_answer": qa.get("prior_answer")})
        elif "conversations" in rec and "vqa" in tasks:
            turns = lm.record_turns(rec, where)
            answer = lm.normalize_answer(turns[1][1])
            if answer not in ("yes", "no"):
                skipped += 1
                continue
            items.append({"id": rec.get("id", where), "task": "vqa", "image": image, "domain": domain,
                          "question": turns[0][1].replace(lm.IMAGE_MARKER, "").strip(), "answer": answer})
        if rec.get("report") and "report" in tasks:
            items.append({"id": f"{rec.get('id', where)}_report", "task": "report", "image": image, "domain": domain,
                          "question": "", "answer": rec["report"].strip(), "own_report": rec["report"].strip()})
    if skipped:
        print(f"{path}: {skipped} non-yes/no questions skipped (MMed-RAG evaluates closed VQA)", file=sys.stderr)
    return items


def read_splits(args: Args, tasks) -> dict:
    """{"folder", "warm", "pt", "val", "test"}: the image folder and the warm-start, RAG-PT, validation and test
    items, each with its resolved "path" (test items name it as their image). The toy folder's files are split by
    data/toy_readers.py toy_splits; other data come as --pt-data / --val-data / --test-data, with the knowledge base
    in --retriever. --eval-only reads the test items only."""
    data = Path(args.data)
    own = args.pt_data or (args.rag_pt_data and args.test_data)  # the user's own data (not a toy run's extra file)
    toy = data.is_dir() and (data / "train.json").exists() and not own
    if not toy and (not args.test_data or not args.retriever or not (args.pt_data or args.rag_pt_data or args.eval_only)):
        raise ValueError("outside the toy folder pass --retriever (a retrieve.py --out), --pt-data (or --rag-pt-data) "
                         "and --test-data")
    # image paths are relative to --image-folder, else to the toy folder, else to the folder of the file naming them
    folder_of = lambda f: Path(args.image_folder or (data if toy and not f else Path(f).parent))  # noqa: E731
    s = {"folder": folder_of("" if toy else args.rag_pt_data or args.pt_data), "warm": [], "pt": [], "val": []}
    if toy and not args.eval_only:
        from data.toy_readers import prior_balanced, toy_splits  # toy-only code lives with the toy

        ids = toy_splits(data, args.val_fraction, args.pt_fraction)
        owner = lambda it: it["id"].rsplit("_", 1)[0]  # noqa: E731  (record id of an item)
        s["warm"] = read_items(data / "train.json", tasks)
        s["warm"] = prior_balanced(s["warm"]) if args.warm_balance_prior else s["warm"]
        s["pt"] = [it for it in read_items(data / "ragpt.json", tasks) if owner(it) in ids["pt"]]
        s["val"] = [it for it in read_items(data / "val.json", ("vqa",)) if owner(it) in ids["val"]]
    elif not args.eval_only:
        s["pt"] = read_items(args.pt_data, tasks) if args.pt_data else []
    if args.val_data and not args.eval_only:
        s["val"] = read_items(args.val_data, ("vqa",))
    for what, f in (("warm", ""), ("pt", args.pt_data), ("val", args.val_data)):
        for it in s[what]:
            it["path"] = str(lm.resolve_image(folder_of(f), it["image"], it["id"], args.allow_images_outside_folder))
    s["test"] = read_items(args.test_data or data / "test.json", tasks)
    for it in s["test"]:
        it["path"] = str(lm.resolve_image(folder_of(args.test_data), it["image"], it["id"], args.allow_images_outside_folder))
        it["image"] = it["path"]
    if args.eval_limit:
        s["test"] = [it for t in tasks for it in [x for x in s["test"] if x["task"] == t][:args.eval_limit]]
    return s


def keyed_folder(folder: Path, key: str, rank: int) -> Path:
    """`folder` (a cache, or a phase's checkpoints) bound to `key`, the cache key of what it is made from. One made
    from other inputs (another key in its cache_key file, or none) is moved aside to <folder>.<that key>, kept but
    never reused, so a changed input rebuilds or retrains instead of resuming work done on other inputs."""
    stamp = folder / "cache_key"
    if rank == 0 and not (stamp.exists() and stamp.read_text() == key):
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.{stamp.read_text() if stamp.exists() else 'unkeyed'}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            print(f"{folder} was made from other inputs: moved to {aside}", file=sys.stderr)
        folder.mkdir(parents=True)
        stamp.write_text(key)  # written once: the folder's files do not change on reuse
    dist.barrier()
    return folder


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
        return lm.yes_no(prediction) == item["answer"]
    return lm.rouge_l(prediction, item["answer"]) >= report_threshold




# ----------------------------------------------------------------------------------------------------------
# RAG-PT preference set (spec A7): three subsets from the model's own greedy answers
# ----------------------------------------------------------------------------------------------------------


def unrelated_image(item: dict, items: list[dict], seed: int) -> str:
    """An image of another domain (another patient and modality), chosen deterministically per item."""
    others = sorted({it["image"] for it in items if it["domain"] != item["domain"]}) or \
        sorted({it["image"] for it in items if it["image"] != item["image"]})
    h = int(hashlib.sha256(f"{seed}:{item['id']}".encode()).hexdigest()[:8], 16)
    return others[h % len(others)]


def rag_pt_pairs(items: list[dict], generate_fn, cm_image: str = "noise", report_threshold: float = 40.0,
                 seed: int = 0) -> tuple[list[dict], dict]:
    """Build D_cm, D_oa1, D_oa2 (spec A7) from greedy answers. items carry "reports" (retrieved with the real
    image). generate_fn(jobs) -> answers, job = {"task", "image" (a key of pixel_loader: "noise:<image>" is the
    release's noise image of that image), "prompt"} (it may set job["truncated"]); the model behind it is the one
    before tuning. Returns (pairs in the released json format,
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
            it["_" + v] = "noise:" + it["image"] if v == "noise" else unrelated_image(it, items, seed)
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
                # the released format: rejected_noised marks the noise pair (PairData draws the same noise image)
                found.append(("cm", n * per + 2 + m, {"rejected_noised": 1} if v == "noise" else
                              {"rejected_image": it["_" + v]}, v))
        if not ok_plain and ok_rag:
            found.append(("oa1", n * per, {}, None))  # learn to use retrieval: reject the no-retrieval answer
        if ok_plain and not ok_rag:
            found.append(("oa2", n * per + 1, {}, None))  # retrieval misled: reject the answer it produced
        for subset, j, extra, variant in found:
            rejected = answers[j]
            if not rejected.strip() or jobs[j].get("truncated"):
                sizes["skipped_empty" if not rejected.strip() else "skipped_truncated"] += 1
                continue
            human = {"from": "human", "value": lm.IMAGE_MARKER + "\n" + it["_rag"]}
            pairs.append({"id": f"{it['id']}_{subset}" + (f"_{variant}" if variant and len(variants) > 1 else ""),
                          "image": it["image"], "domain": it["domain"], "task": it["task"], "subset": subset,
                          "conversations": [human, {"from": "gpt", "value": it["answer"]}],
                          "rejected_conversations": [human, {"from": "gpt", "value": rejected}], **extra})
            sizes[subset] += 1
    return pairs, sizes




def pixel_loader(cfg, image_folder: Path):
    """Image key -> pixels by dpo.py's PairData.pixel (a path, or "noise:<path>": the release's noise image of that
    image, one fixed draw per image), so generation sees exactly the pixels DPO trains on."""
    holder = SimpleNamespace(cfg=cfg, image_folder=image_folder, allow_outside=True)  # paths were checked on reading
    return lambda key: PairData.pixel(holder, key)


# ----------------------------------------------------------------------------------------------------------
# DPO and the training loop, copied from dpo.py (pairs -> tensors, loss, LoRA policy + adapters-off reference,
# FSDP2, the loop with its checkpoints, the DPO step, saving)
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


# Copied from dpo.py: dpo_step
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
# The warm start (tiny random model only) and the RAG-PT stages, each phase one call of the loop above
# ----------------------------------------------------------------------------------------------------------


def warm_start_rag(args: Args, model, tokenizer, warm_items: list[dict], pixel, device, rank: int, world: int, folder: Path,
                   log):
    """The tiny model is random: before RAG-PT means anything it must answer, with and without reports. After warm
    start 0 (dpo.py's: the model reads the image in part), the full model with the projector (ViT frozen) trains in
    two phases, each with a fresh optimizer: --sft-warmup-steps on plain prompts of the warm-start items (toy:
    train.json, prior-balanced: this file's prompts), then --sft-rag-steps on plain + RAG prompts (learn the A6
    format). Without warm start 0, 200-600 plain steps here left the random model reading neither the image nor the
    references (README: MMed-RAG on the toy). With --warm-reference own the first reference is the image's own train
    report (25 % of them name a lesion the image lacks or the wrong side, README (b)): the warm start learns that the top
    reference is usually right, as a model tuned with RAG on its own retriever's data does -- the trust RAG-PT is
    there to temper when the references are near misses (the KB twins at RAG-PT and test time).
    Each answer weighs the same, its mean token loss (a one-token yes/no as much as a 35-token report), over global
    batches of 16. Saved as a llava-hf checkpoint in `folder`/model (the adapter's base) and loaded back from there,
    as a real run starts RAG-PT from its SFT checkpoint; reused while the folder's key holds."""
    base = folder / "model"
    if not (base / "config.json").exists():
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("vision_tower."))
            p.data = p.data.float() if p.requires_grad else p.data
        shard(model, device)
        cfg, micro = model.config, max(1, 16 // world)  # 16 answers per step (or the nearest multiple of the ranks)
        plain = [(it, plain_prompt(it["task"], it["domain"], it["question"])) for it in warm_items]
        with_rag = [(it, rag_prompt(it["task"], it["domain"], it["reports"], it["question"])) for it in warm_items]
        phases = (("warm_plain", plain, args.sft_warmup_steps), ("warm_rag", plain + with_rag, args.sft_rag_steps))
        for name, examples, steps in phases:
            seqs = [lm.tokenize_conversation(tokenizer, lm.place_image_markers([("user", q), ("assistant", it["answer"])], 1),
                                             cfg.template, cfg.num_image_tokens, cfg.image_token_id, args.max_length,
                                             f"warm-start example {it['id']}") for it, q in examples]

            def step(idx, epoch, seqs=seqs, examples=examples):
                idx = [i % len(seqs) for i in idx]  # indices wrap around, so a set smaller than one batch still trains
                batch = to_device(lm.collate([seqs[i] for i in idx], tokenizer.pad_token_id), device)
                labels = batch["labels"]
                mask = torch.zeros_like(labels, dtype=torch.bool)
                mask[:, :-1] = labels[:, 1:] != lm.IGNORE_INDEX  # the logit at t predicts token t + 1
                logits = model(batch["input_ids"], torch.stack([pixel(examples[i][0]["image"]) for i in idx]).to(device),
                               batch["attention_mask"], logits_mask=mask).logits.float()
                tok = F.cross_entropy(logits, labels[:, 1:][mask[:, :-1]], reduction="none")
                sums = torch.zeros(len(idx), device=device).index_add(0, mask.nonzero()[:, 0], tok)
                return {"loss": (sums / mask.sum(1).clamp(min=1)).sum(), "n": torch.tensor(float(len(idx)))}

            if steps:
                train(args, name, model, max(len(seqs), micro * world), step, folder / name, rank, world, log,
                      {"": args.sft_lr}, micro * world, micro, max_steps=steps)
        lm.save_merged(model, tokenizer, base, rank)
        dist.barrier()
    return lm.load(str(base), dtype=args.dtype, device=device, template=args.template or None,
                   attn_implementation=args.attn_implementation)[0]


def rag_pt_stages(args: Args, model, ref_model, pairs: list[dict], key: str, folder: Path, tokenizer, device,
                  rank: int, world: int, log) -> dict:
    """DPO per stage (released train_dpo_2stages.py: stage 1 on D_cm, then stage 2 on D_oa from the stage-1 adapter,
    a fresh optimizer and schedule, the reference still the base; or one merged stage), checkpoints in OUT/<stage>
    bound to the pair set's key and the Args (the loop's: another --seed or DPO value trains afresh). A subset
    smaller than the global batch trains with the largest batch it fills (printed); one smaller than a micro-batch
    per rank is reported and skipped, never a silent zero loss."""
    plan = [("stage1", ("cm",)), ("stage2", ("oa1", "oa2", "oa"))] if args.stages == "two" else \
        [("merged", ("cm", "oa1", "oa2", "oa"))]
    out, unit, done = Path(args.out), args.micro_batch_size * world, {}
    for name, subsets in plan:
        recs = [(f"{args.rag_pt_data or out / 'rag_pt.json'} pair {p.get('id', n)}", p) for n, p in enumerate(pairs)
                if p["subset"] in subsets]
        data = PairData(recs, folder, tokenizer, model.config, args.max_length, args.skip_bad_samples, True) if recs else []
        bs = min(args.batch_size, len(data) // unit * unit)
        if rank == 0:
            print(f"{name}: {len(data)} pairs, " + (f"global batch {bs} = {args.micro_batch_size} x {world} ranks x "
                  f"{bs // unit} accumulation" if bs else f"fewer than a micro-batch on every rank ({unit}): stage skipped"))
        if bs == 0:
            log({"phase": name, "skipped": True, "pairs": len(data)})
            done[name] = {"steps": 0, "pairs": len(data)}
            continue
        step = lambda idx, epoch, data=data: dpo_step(args, model, ref_model, data, idx, tokenizer, device)  # noqa: E731
        done[name] = {"pairs": len(data), "skipped_records": data.skipped, **train(
            args, name, model, len(data), step, out / name, rank, world, log,
            {"projector.": args.projector_lr, "": args.lr}, bs, args.micro_batch_size, args.epochs, args.max_steps, key)}
    return done


# ----------------------------------------------------------------------------------------------------------
# Generation and evaluation: VQA (acc, F1, AUROC), reports (lm.report_scores), copy-reference and over-reliance rates
# ----------------------------------------------------------------------------------------------------------


def answer_jobs(args: Args, model, tokenizer, jobs: list[dict], pixel, rank: int, world: int, desc: str) -> list[str]:
    """Greedy answers to jobs {"task", "image" (a pixel_loader key), "prompt"} by lm.generate_sharded (the same
    batches for any number of ranks), one task at a time (its own token cap: VQA stops after a few tokens), pixels
    made chunk by chunk (a whole RAG-PT set would not fit in memory). Sets job["truncated"]: lm.generate does not
    say why it stopped, so an answer whose re-encoded length reaches the cap counts as cut (re-encoding can differ
    from the generated ids by a token or so)."""
    cap = {"vqa": args.vqa_max_new_tokens, "report": args.report_max_new_tokens}
    answers, chunk = [None] * len(jobs), args.eval_batch_size * world * 8  # a multiple of the batch: same batches
    for task in dict.fromkeys(j["task"] for j in jobs):
        idx = [i for i, j in enumerate(jobs) if j["task"] == task]
        for c in range(0, len(idx), chunk):
            part = idx[c:c + chunk]
            todo = [{"turns": [("user", jobs[i]["prompt"])], "images": [pixel(jobs[i]["image"])]} for i in part]
            got = lm.generate_sharded(model, tokenizer, todo, args.eval_batch_size, rank, world, f"{desc} ({task})",
                                      max_new_tokens=cap[task])
            for i, a in zip(part, got):
                answers[i] = a
                jobs[i]["truncated"] = len(tokenizer.encode(a, add_special_tokens=False)) >= cap[task]
    return answers


@torch.no_grad()
def yes_scores(model, tokenizer, jobs: list[dict], pixel, rank: int, world: int, batch_size: int) -> list[float]:
    """logit("yes") - logit("no") at the first answer position: the score behind AUROC (a ranking needs more than
    hard yes/no labels; from hard labels AUROC would equal balanced accuracy). Batches are dealt out to the ranks as
    lm.generate_sharded deals them (a rank with fewer repeats one: FSDP2's collectives stay in step)."""
    cfg, device = model.config, next(model.parameters()).device
    first = []  # the first answer token of "yes" and of "no", as the template tokenises an answer
    for word in ("yes", "no"):
        t = lm.tokenize_conversation(tokenizer, [("user", "q"), ("assistant", word)], cfg.template, 1, -1)
        first.append(next(i for i, label in zip(t["input_ids"], t["labels"]) if label != lm.IGNORE_INDEX))
    batches = [list(range(i, min(i + batch_size, len(jobs)))) for i in range(0, len(jobs), batch_size)]
    scores = {}
    for r in range(-(-len(batches) // world)):
        b = r * world + rank
        idx = batches[min(b, len(batches) - 1)]
        prompts = [{"input_ids": lm.tokenize_prompt(tokenizer, lm.place_image_markers([("user", jobs[i]["prompt"])], 1),
                                                    cfg.template, cfg.num_image_tokens, cfg.image_token_id)} for i in idx]
        batch = lm.collate(prompts, tokenizer.pad_token_id, padding_side="left")
        attn = batch["attention_mask"].to(device)
        pixels = torch.stack([pixel(jobs[i]["image"]) for i in idx]).to(device)
        logits = model(batch["input_ids"].to(device), pixels, attention_mask=attn,
                       position_ids=(attn.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1).logits[:, -1].float()
        if b < len(batches):
            scores.update(zip(idx, (logits[:, first[0]] - logits[:, first[1]]).tolist()))
    if hasattr(model, "reshard"):
        model.reshard()  # no-grad forwards leave the FSDP2 root gathered
    parts = [None] * world
    dist.all_gather_object(parts, scores)
    merged = {i: v for part in parts for i, v in part.items()}
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
    pred = [lm.yes_no(p) for p in predictions]
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
    vqa, rep = [it for it in items if it["task"] == "vqa"], [it for it in items if it["task"] == "report"]
    jobs = []
    for it in vqa + rep:
        jobs.append({"task": it["task"], "image": it["image"], "prompt": plain_prompt(it["task"], it["domain"], it["question"])})
        jobs.append({"task": it["task"], "image": it["image"], "prompt": rag_prompt(it["task"], it["domain"], it["reports"], it["question"])})
    for it in vqa:
        jobs.append({"task": "vqa", "image": "noise:" + it["image"], "prompt": rag_prompt("vqa", it["domain"], it["reports"], it["question"])})
    answers = answer_jobs(args, model, tokenizer, jobs, pixel, rank, world, desc)
    n2, n4 = 2 * len(vqa), 2 * len(vqa) + 2 * len(rep)
    plain_v, rag_v, noise_v = answers[0:n2:2], answers[1:n2:2], answers[n4:]
    plain_r, rag_r = answers[n2:n4:2], answers[n2 + 1:n4:2]
    res = {"plain": {}, "rag": {}, "truncated": dict(Counter(j["task"] for j in jobs if j["truncated"]))}
    if vqa:
        sc = yes_scores(model, tokenizer, jobs[:n2], pixel, rank, world, args.eval_batch_size)
        res["plain"]["vqa"] = vqa_metrics(vqa, plain_v, sc[0::2])
        res["rag"]["vqa"] = vqa_metrics(vqa, rag_v, sc[1::2])
        res.update(rates(vqa, plain_v, rag_v, noise_v))
        res["mean_k_vqa"] = float(np.mean([len(it["reports"]) for it in vqa]))
    if rep:
        refs = [it["answer"] for it in rep]
        res["plain"]["report"] = lm.report_scores(plain_r, refs, args.rouge_beta)
        res["rag"]["report"] = lm.report_scores(rag_r, refs, args.rouge_beta)
        res["mean_k_report"] = float(np.mean([len(it["reports"]) for it in rep]))
    res["predictions"] = [{"id": it["id"], "answer": it["answer"], "plain": p, "rag": r, **({"noise": z} if z is not None else {})}
                          for it, p, r, z in zip(vqa + rep, plain_v + plain_r, rag_v + rag_r, noise_v + [None] * len(rep))]
    return res


def format_table(before: dict, after: dict | None = None) -> str:
    """The comparison table (markdown): the model without and with retrieval, and after RAG-PT when `after` is given."""
    head = ("| model | VQA acc | VQA F1 | VQA AUROC | BLEU (avg 1-4) | ROUGE-L | METEOR (exact) | copy-reference | "
            "copy-ref. of correct | over-reliance |\n|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [head]
    rows = [("base (no retrieval)", before["plain"], {}), ("+ RAG", before["rag"], before)]
    for name, m, r in rows + ([("+ RAG-PT (with RAG)", after["rag"], after)] if after else []):
        v, rp = m.get("vqa", {}), m.get("report", {})
        cells = [v.get("acc"), v.get("f1"), v.get("auroc"), rp.get("bleu"), rp.get("rouge_l"), rp.get("meteor_exact")]
        cells += [r.get(k) for k in ("copy_reference_rate", "copy_reference_rate_of_correct", "over_reliance_rate")]
        lines.append(f"| {name} | " + " | ".join(f(c) for c in cells) + " |")
    return "\n".join(lines)


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
        raise lm.ModelError(f"--image needs --retriever, a retrieve.py output folder ({args.retriever!r} is not one)")
    rag = retrieve.DomainRAG.load(args.retriever)
    gamma = rag.config["gamma"] if args.gamma < 0 else args.gamma
    rag.config["code_threshold"] = args.code_threshold
    got = rag.retrieve([args.image], k_max=args.k_max, rule=args.rule, gamma=gamma)[0]
    task = "vqa" if args.question else "report"
    prompt = rag_prompt(task, got["domain"], got["reports"], args.question)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed,
                               attn_implementation=args.attn_implementation)
    cap = args.vqa_max_new_tokens if task == "vqa" else args.report_max_new_tokens
    answer = lm.ask(model.eval(), tokenizer, [lm.load_image(args.image)], prompt, max_new_tokens=cap)
    print(f"domain: {got['domain']} (router)\nretrieved reports (rule {args.rule}, gamma {gamma}: {got['k']} of "
          f"{len(got['candidates'])} kept):")
    for i, (r, sc) in enumerate(zip(got["candidates"], got["scores"]), 1):
        print(f"  {'kept' if i <= got['k'] else 'cut '} {sc:.4f}  {r}")
    print(f"prompt:\n{lm.IMAGE_MARKER}\n{prompt}\nanswer:\n{answer}")
    return {"domain": got["domain"], "reports": got["reports"], "prompt": prompt, "answer": answer}



# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def retrieval_system(args: Args, out: Path, rank: int, world: int, device, log):
    """The retrieve.DomainRAG of --retriever, or of OUT/retriever, trained here on the toy's kb.json
    by retrieve.build_all (its phases resume from their checkpoints) and reused while its key holds (every Args
    field above `model`)."""
    rdir = Path(args.retriever or out / "retriever")
    if not args.retriever and not args.eval_only:
        keyed_folder(rdir, cache_key(args, "model"), rank)
        if not (rdir / "results.json").exists():  # written last: the retriever is complete
            data = Path(args.data)
            from data.toy_readers import toy_splits

            ids = toy_splits(data, args.val_fraction, args.pt_fraction)
            rargs = retrieve.Args(data=str(data), out=str(rdir), epochs=args.retriever_epochs, k_max=args.k_max,
                                  rule=args.rule, code_threshold=args.code_threshold, seed=args.seed, resume=args.resume,
                                  save_every=args.save_every, on_nonfinite=args.on_nonfinite,
                                  dist_timeout_s=args.dist_timeout_s)
            read = lambda name: retrieve.read_pairs(data / name, args.image_folder)  # noqa: E731  (as read_splits)
            res = retrieve.build_all(rargs, read("kb.json"), [p for p in read("val.json") if p["id"] in ids["val"]],
                                     read("test.json"), rank, world, device, log)
            if rank == 0:
                (rdir / "results.json").write_text(json.dumps(res, indent=1))
            dist.barrier()
    if not (rdir / "rag_config.json").exists():
        raise lm.ModelError(f"{rdir}: no retrieve.py output (rag_config.json); --retriever names one")
    return retrieve.DomainRAG.load(rdir)


def retrieval_for_rag_pt_and_test(args: Args, rag, s: dict, gamma: float, gen, rank: int, misrouted: dict):
    """Spec A5: gamma by the validation VQA accuracy of the model before RAG-PT (cached in OUT/gamma_<key>.json:
    every Args field above `pt_data`, the retriever, the model), unless --gamma, --gamma-tune f1 or --eval-only fix
    it; then the RAG-PT items (the top --pt-k) and the test items get their reports. Writes retrieved_test.jsonl as
    the released retrieval scripts do. Returns results["retrieval"]."""
    attach = lambda items, gamma, **kw: rag.attach(items, args.k_max, args.rule, gamma, args.code_threshold,  # noqa: E731
                                                   oracle=args.oracle_domain, **kw)
    sweep, tune = None, args.gamma < 0 and args.gamma_tune == "accuracy" and not args.eval_only
    if tune and s["val"] and "vqa" in args.tasks.split(","):
        misrouted["val"] = attach(s["val"], gamma, fixed_k=args.k_max)
        (gamma, sweep), reused = lm.cached_json(Path(args.out) / f"gamma_{cache_key(args, 'pt_data')}.json", rank,
                                             lambda: tune_gamma(rag.config.get("gammas", [gamma]), s["val"],
                                                                lambda jobs: gen(jobs, "gamma sweep")))
        if rank == 0:
            retrieve.print_sweep(sweep, f"gamma by VQA accuracy on {len(s['val'])} validation questions"
                                 + (" (cached):" if reused else ":"))
    elif tune and rank == 0:
        print("warning: no validation questions (--val-data): gamma is retrieve.py's F1 pick", file=sys.stderr)
    misrouted["pt"], misrouted["test"] = attach(s["pt"], gamma, fixed_k=args.pt_k), attach(s["test"], gamma)
    routing = "oracle" if args.oracle_domain else "router"
    if rank == 0:
        print(f"retrieval: rule {args.rule}, gamma {gamma}, k_max {args.k_max}, routing {routing} (misrouted images: "
              f"{misrouted}); RAG-PT prompts: {'top-' + str(args.pt_k) if args.pt_k else 'adaptive'}")
        with open(Path(args.out) / "retrieved_test.jsonl", "w") as f:  # + reference_reports, retrieve_k (released)
            for it in s["test"]:
                f.write(json.dumps({**{k: v for k, v in it.items() if k not in ("reports", "scores")},
                                    "reference_reports": it["reports"], "retrieve_k": len(it["reports"])},
                                   ensure_ascii=False) + "\n")
    return {"gamma": gamma, "gamma_sweep": sweep, "rule": args.rule, "k_max": args.k_max, "routing": routing,
            "misrouted": misrouted}


def rag_pt_set(args: Args, s: dict, gen, gamma: float, rank: int, log) -> tuple[list[dict], str, dict]:
    """(pairs, the key their stages' checkpoints are bound to, sizes per task): --rag-pt-data (released files mark
    cross-modality pairs with rejected_noised / rejected_image only; key: its sha256), or rag_pt_pairs from the model
    before tuning, cached in OUT/rag_pt_<key>.json (every Args field above `stages`, the retriever, the model, the
    gamma) and written to OUT/rag_pt.json in the released format."""
    out, tasks, subsets = Path(args.out), args.tasks.split(","), ("cm", "oa1", "oa2", "oa")
    if args.rag_pt_data:
        pairs, reused = [p for _, p in lm.read_records(args.rag_pt_data)], False
        key = lm.file_sha256(Path(args.rag_pt_data))[:16]
        for p in pairs:
            p.setdefault("subset", "cm" if p.get("rejected_noised") or p.get("rejected_image") else "oa")
            p.setdefault("task", "vqa" if "Question:" in p["conversations"][0]["value"] else "report")
        sizes = {x: sum(p["subset"] == x for p in pairs) for x in subsets}
        sizes.update(candidates=0, skipped_empty=0, skipped_truncated=0)
    else:
        key = cache_key(args, "stages", gamma)
        (pairs, sizes), reused = lm.cached_json(out / f"rag_pt_{key}.json", rank, lambda: rag_pt_pairs(
            s["pt"], lambda jobs: gen(jobs, "RAG-PT"), args.cm_image, args.report_correct_rouge, args.seed))
        if rank == 0:
            (out / "rag_pt.json").write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
    per_task = {t: {x: sum(p["subset"] == x and p["task"] == t for p in pairs) for x in subsets} for t in tasks}
    if rank == 0:
        print(f"RAG-PT set from {sizes['candidates']} items" + (" (cached)" if reused else "") + f": cross-modality "
              f"{sizes['cm']}, overall (a) retrieval helps {sizes['oa1']}, overall (b) retrieval hurts {sizes['oa2']}; "
              f"skipped: {sizes['skipped_empty']} empty, {sizes['skipped_truncated']} cut by the token cap; per task "
              f"{json.dumps(per_task)}")
    log({"phase": "rag_pt", "reused": reused, **sizes})
    return pairs, key, {**per_task, "total": sizes}


def main(argv=None):
    args = parse_args(Args, argv)
    tiny = args.model == "tiny"  # -1: the warm starts of the random tiny model (1000, 100 + 200 steps), none for a checkpoint
    args = dataclasses.replace(args, vqa_max_new_tokens=args.vqa_max_new_tokens if args.vqa_max_new_tokens >= 0 else 16 if tiny else 1024,
                               report_max_new_tokens=args.report_max_new_tokens if args.report_max_new_tokens >= 0 else 96 if tiny else 1024)
    if args.image:
        return answer_one(args)
    args = dataclasses.replace(args, prefix_sharing=args.prefix_sharing and args.attn_implementation != "flash_attention_2",
                               sft_base_steps=args.sft_base_steps if args.sft_base_steps >= 0 else 1000 * tiny,
                               sft_warmup_steps=args.sft_warmup_steps if args.sft_warmup_steps >= 0 else 100 * tiny,
                               sft_rag_steps=args.sft_rag_steps if args.sft_rag_steps >= 0 else 200 * tiny)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master, t0 = Path(args.out), rank == 0, time.time()
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"mmed_rag.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    warm_seed = args.seed if args.warm_start_seed < 0 or not args.sft_base_steps else args.warm_start_seed
    pre = dataclasses.replace(args, seed=warm_seed)  # the Args of what comes before the DPO stages (see warm_start_seed)
    torch.manual_seed(warm_seed)
    s = read_splits(args, tuple(t for t in args.tasks.split(",") if t))  # ---- knowledge base / RAG-PT / val / test
    rag = retrieval_system(pre, out, rank, world, device, log)  # ---- 1. router + a retriever and index per domain
    for what, name in (("pt", "RAG-PT"), ("val", "validation"), ("test", "test")):
        s[what] = rag.drop_kb_images(s[what], name, args.skip_bad_samples)
    gamma = rag.config["gamma"] if args.gamma < 0 else args.gamma  # retrieve.py's (F1) pick: the warm start's prompts
    misrouted = {"warm": rag.attach(s["warm"], args.k_max, args.rule, gamma, args.code_threshold, oracle=args.oracle_domain,
                                    exclude_own={it["path"] for it in s["warm"]})}  # an image never retrieves its own entry
    if args.warm_reference == "own":  # the warm start's retrieval finds the image's own report (see warm_start_rag)
        for it in s["warm"]:
            it["reports"] = [it["own_report"]] + it["reports"][:len(it["reports"]) - 1]
    # ---- 2. the Med-LVLM (warm-started when it is the tiny random model): policy LoRA, reference = adapters off
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=warm_seed,
                               attn_implementation=args.attn_implementation)
    pixel = pixel_loader(model.config, s["folder"])
    base, ref_model = args.model, None
    if not args.eval_only and args.sft_base_steps:  # warm start 0: dpo.py's, on the same data (one fixed SFT model)
        from data.toy_readers import toy_pair_records

        sft = PairData(toy_pair_records(Path(args.data) / "train.json"), s["folder"], tokenizer, model.config,
                       args.max_length, args.skip_bad_samples)
        model = warm_start(dataclasses.replace(pre, sft_warmup_steps=args.sft_base_steps), model,
                           tokenizer, [{**it["chosen"], "images": it["images"]} for it in sft.items], sft.pixel, device,
                           rank, world, out, log)
    if not args.eval_only and (args.sft_warmup_steps or args.sft_rag_steps):
        if not s["warm"]:
            raise ValueError("a warm start needs the toy's train.json (pass 0 steps for a trained model)")
        folder = keyed_folder(out / "warm_start", cache_key(pre, "gamma_tune"), rank)
        model = warm_start_rag(pre, model, tokenizer, s["warm"], pixel, device, rank, world, folder, log)
        base = str(folder / "model")
    if not args.eval_only:
        torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank, whatever ran before
        model, ref_model = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                                   args.lora_dropout, args.tune_projector)
    torch.manual_seed(args.seed + rank)  # dropout differs per rank
    shard(model.requires_grad_(False) if args.eval_only else model, device, args.activation_checkpointing)
    if ref_model is not None and hasattr(ref_model, "language_model"):
        shard(ref_model, device)
    gen = lambda jobs, desc: answer_jobs(args, model, tokenizer, jobs, pixel, rank, world, desc)  # noqa: E731
    # ---- 3. gamma by validation accuracy, retrieval for RAG-PT and test; 4. evaluation before RAG-PT (LoRA B = 0)
    results = {"retrieval": retrieval_for_rag_pt_and_test(pre, rag, s, gamma, gen, rank, misrouted)}
    first = "eval" if args.eval_only else "before"
    results[first] = evaluate(args, model, tokenizer, s["test"], pixel, rank, world, "eval " + first)
    log({"phase": "eval_" + first, **{k: v for k, v in results[first].items() if k != "predictions"}})
    if not args.eval_only:  # ---- 5. RAG-PT pairs from the model before tuning; 6. DPO; 7. evaluation after RAG-PT
        pairs, key, results["rag_pt_sizes"] = rag_pt_set(pre, s, gen, results["retrieval"]["gamma"], rank, log)
        results["dpo"] = rag_pt_stages(args, model, ref_model, pairs, key, s["folder"], tokenizer, device, rank, world, log)
        lm.save_trained(model, tokenizer, out, rank, base, args.full_finetune, args.export_merged, args.tune_projector)
        results["after"] = evaluate(args, model, tokenizer, s["test"], pixel, rank, world, "eval after")
        log({"phase": "eval_after", **{k: v for k, v in results["after"].items() if k != "predictions"}})
    results["table"] = format_table(results[first], results.get("after"))
    results["seconds"] = time.time() - t0
    if master:
        preds = {k: results[k].pop("predictions") for k in ("eval", "before", "after") if k in results}
        (out / "predictions.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(results["table"])
        print(f"done in {results['seconds']:.0f} s; results in {out / 'results.json'}")
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
