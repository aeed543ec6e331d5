"""stllava_med.py -- STLLaVA-Med (Sun et al., EMNLP 2024, arXiv 2406.19973): self-training a medical VLM with visual
self-questioning and self-generated preferences.

    # embedded default: tiny random LLaVA with the cluster projector, toy data, CPU, 10 minutes on 2 idle cores (stage 1 ~6):
    # stage 1 (self-questioning SFT on data/toy/train.json), self-generated preferences on the toy's pref images
    # (the toy judge: the records' findings), stage 2 (DPO), evaluation on the toy test split
    python stllava_med.py
    torchrun --nproc-per-node=2 stllava_med.py          # same global batches; generation does not depend on ranks
    # real run (8 GPUs): SQ-LLaVA-7B base, LLaVA-Med 60k conversations, PMC images, a local judge VLM, VQA-RAD
    torchrun --nproc-per-node=8 stllava_med.py --model /ckpt/sqllava-7B-v1.5 \\
        --projector-weights /ckpt/sqllava-7B-v1.5/mm_projector.bin --sft-data llava_med_60k_inline_mention.json \\
        --image-folder /data/pmc --prefs-images /data/pmc_10k --judge /ckpt/judge-vlm \\
        --eval-data /data/vqa_rad/testset.json --batch-size 256 --micro-batch-size 8 --max-length 2048
    # one stage at a time (a stage-1 checkpoint is an original-LLaVA-layout folder that llava_med.load reads)
    python stllava_med.py --stages prefs,dpo,eval --model runs/stllava_med/stage1_model
    # evaluate a checkpoint only (no training data is read); every flag: python stllava_med.py --help
    python stllava_med.py --eval-only --model runs/stllava_med/stage2_model --eval-data /data/vqa_rad/testset.json

The method (spec section 4):

    stage 1  SFT on conversations rendered with v1_sq, where each later human turn becomes, with probability sq_r,
             a VUSER turn whose question is a target too:  L1 = CE(answer and VUSER-question tokens)
    prefs    per image: a greedy description, n questions sampled after an empty "VUSER:" turn, two sampled answers
             per question, a judge scores both ("s1 s2"): chosen = the higher (ties: answer 2), rejected = the other
    stage 2  L2 = -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]), log p = summed answer
             log-probs; pi = stage-1 model + new LoRA (LLM and ViT) + the projector, ref = the frozen stage-1 model
    eval     greedy answers on VQA-RAD / SLAKE / the toy split: closed accuracy, open recall (lm.score_vqa)

Stage 1 trains the LLM (LoRA r 128, alpha 256), the "cluster" prototype projector (llava_med.ClusterProjector) and a
ViT LoRA (r 32, alpha 64) with the tower running WITH gradients (the released @torch.no_grad on the tower blocks
them; spec 4.4). The judge is a local VLM (--judge PATH; the paper uses GPT-4o) or, offline, a reference-answer
scorer for images whose data carry answers, or (the tiny toy default) the toy judge, which reads the toy record's own
findings and so knows when an answer contradicts the image. Templates: stage 1 uses v1_sq; answers use vicuna v1 ("USER: ...
ASSISTANT:") with the released system prompts (llava_v1's to generate and evaluate, v1's in DPO), or stage 1's for
--model tiny, which knows only the one prompt it was trained on.

File layout: Args -> copied CLI blocks -> v1_sq template and stage-1 data -> preference generation -> DPO data and
losses -> model setup -> the training loop (copied) -> steps -> evaluation and saving -> main().
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
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (SQ-LLaVA / LLaVA layout, llava-hf)
    projector: str = "auto"  # "cluster" (256 centres), "clusterK" or "keep"; auto = keep, or a new cluster projector when stage 1 starts from a checkpoint without one (cluster8 for --model tiny: 16 image tokens)
    projector_weights: str = ""  # pretrained cluster projector (SQ-LLaVA's mm_projector.bin / .safetensors)
    template: str = "vicuna_v1"  # answer template: preference answers, DPO, evaluation (STLLaVA-Med's v1); stage 1 always uses v1_sq
    answer_system: Literal["auto", "llava_v1", "v1", "v1_sq"] = "auto"  # system prompt to generate answers and evaluate: llava_v1 (model_collectA.py / model_vqa.py --conv-mode default), v1 (the template's own), v1_sq (stage 1's); auto = v1_sq for --model tiny, else llava_v1
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    seed: int = 0  # same seed + same data = same run (stage-1 shuffles and VUSER draws, LoRA init, sampling seeds)
    # stage 1: visual self-questioning SFT
    sft_data: str = "toy"  # LLaVA conversation json/jsonl (multi-turn: later turns can become VUSER), or "toy"
    image_folder: str = ""  # images of --sft-data ("" = its folder)
    sq_r: float = 0.5  # probability that a later human turn becomes a VUSER (trained) question (sqllava_med.sh: 0.5)
    max_length: int = 512  # tokens per sample, image tokens included (spec: 2048)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    train_llm: Literal["auto", "lora", "full"] = "auto"  # lora (r 128, alpha 256: the spec) or full; auto = full for --model tiny (random weights)
    lora_r: int = 128  # LLM LoRA rank (stages 1 and 2)
    lora_alpha: int = 256  # LLM LoRA alpha
    lora_dropout: float = 0.05  # LLM LoRA dropout in stage 1 (train.py's default; sqllava_med.sh does not set it)
    vit_lora: bool = True  # ViT LoRA on every linear layer of CLIP (--vit_lora_enable), in both stages
    vit_lora_r: int = 32  # ViT LoRA rank
    vit_lora_alpha: int = 64  # ViT LoRA alpha (alpha / r = 2, as the LLM's: one merge scale)
    vit_lora_dropout: float = 0.2  # ViT LoRA dropout in stage 1 (train.py:1170, hard-coded)
    sft_lr: float = -1  # LLM learning rate; -1 = 2e-4 (spec), or 1e-3 for --model tiny
    projector_lr: float = -1  # cluster projector learning rate; -1 = 2e-5 (mm_projector_lr), or 1e-3 for --model tiny
    vit_lr: float = 5e-5  # ViT LoRA learning rate (vision_tower_lr)
    sft_epochs: float = -1  # passes over the stage-1 conversations; -1 = 3 (sqllava_med.sh), or 12 for --model tiny (936 steps: at 3 (234 steps) the tiny model answers every closed val question by its wording (50.0 %) and stage 2 has no image reading to build on; at 12 it reads some (56.9 % val closed, abnormality 88.5 %), the only stage-1 setting of README's val runs where stage 2 gains)
    batch_size: int = 16  # samples per optimizer step over all ranks (global)
    # optimisation (both stages)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine decay to 0 (both scripts)
    weight_decay: float = 0.0  # AdamW weight decay (both scripts: 0)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # how the steps run (stage 1's checkpoints are keyed on the fields above, stage 2's on all above --out)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # samples per forward on one rank; accumulation = batch / (micro * ranks)
    # preference generation
    prefs_images: str = ""  # records json/jsonl (image + optional conversations) or a folder of images; "" = the stage-1 records (their answers serve the reference judge), or for --sft-data toy the toy's pref split (data/toy/pref.json: 120 clean images never seen in stage 1, as the paper's 10k PMC images are not its SFT images)
    prefs_limit: int = -1  # first N images; -1 = all, or 120 for --model tiny
    n_questions: int = -1  # self-generated questions per image; -1 = 5 (visual_sq.py n_shot), or 20 for --model tiny (120 toy images, seed-0 12-epoch stage 1: 10 give 159 pairs, 94 closed; 20 give 319, 202 closed; see dpo_lr)
    describe_prompt: str = "auto"  # the first turn of self-questioning (greedy answer); auto = the released "Can you describe the image in detail?", or for --sft-data toy the toy's own "Describe the image." (the tiny model answers the released wording "yes")
    describe_max_new_tokens: int = -1  # -1 = 1024 (released), or 32 for --model tiny
    q_temperature: float = -1  # question sampling temperature; -1 = 1.2 (visual_sq.py), or 0.7 for --model tiny (at 1.2 the tiny model's samples are word salad: 98 strictly preferred pairs of 600 questions vs 131 at 0.7, seed-0 stage 1)
    q_top_k: int = 300  # question sampling top-k (visual_sq.py)
    q_top_p: float = 0.95  # question sampling top-p (visual_sq.py)
    q_max_new_tokens: int = -1  # -1 = 300 (released), or 24 for --model tiny
    a_temperature: float = 1.2  # answer sampling temperature (model_collectA.py; also for --model tiny: with its 12-epoch stage 1, 0.7 gives two identical answers to 1051 of 1200 questions, 68 pairs, 1.2 159 pairs, 94 of them closed)
    a_top_k: int = 100  # answer sampling top-k (model_collectA.py)
    a_top_p: float = 0.95  # answer sampling top-p (model_collectA.py)
    a_max_new_tokens: int = -1  # -1 = 1024 (released), or 16 for --model tiny
    answer_seeds: str = "40,42"  # the seeds of answer 1 and answer 2 (model_collectA.py set_seed)
    judge: str = "auto"  # a judge VLM checkpoint folder (the paper: GPT-4o), "reference" (offline: token F1 against the data's answer) or "toy" (offline: the toy record's findings, data/toy_oracles.py toy_judge_reply); auto = toy for --model tiny on the toy, else reference
    judge_temperature: float = 0.2  # judge sampling (eval_gpt4v_review.py)
    judge_max_new_tokens: int = 64  # judge reply length cap (the scores are on its first line)
    ties: Literal["auto", "answer2", "skip"] = "auto"  # equal scores: chosen is answer 2 (the released rule), or skip the pair; auto = skip with the toy judge (its ties are exact: both answers equally right or wrong, no preference to learn), else answer2
    gen_batch_size: int = 16  # prompts per generate call on one rank (batch b samples with seed + b)
    # stage 2: DPO (the fields above key the pair cache)
    dpo_data: str = ""  # STLLaVA-Med DPO json to train on ("" = the pairs of the prefs stage)
    dpo_system: Literal["auto", "llava_v1", "v1", "v1_sq"] = "auto"  # system prompt of the DPO pairs: auto = v1 (dpo_finetune.sh --version v1), v1_sq for --model tiny
    dpo_lr: float = -1  # LLM LoRA learning rate in stage 2; -1 = 5e-6 (dpo_finetune.sh), or 2e-5 for --model tiny (val sweep, seed-0 12-epoch stage 1 at 63.9 % val closed, beta 0.5, 5 epochs, torch 2.13.0+cpu AVX512: 2e-5 64.9 (10 epochs 60.4), 3e-5 62.5, 5e-5 60.4, 1e-4 55.9, 2e-4 54.2; on the earlier install, stage 1 at 56.9, 2e-4 gave 61.5 and was the default; more DPO drops the wording prior faster than it adds image reading: README, STLLaVA-Med toy results)
    dpo_vit_lr: float = 2e-5  # ViT LoRA learning rate in stage 2 (vision_tower_lr; also for --model tiny: 1e-3 wrecked its open answers, see dpo_lr)
    dpo_projector_lr: float = 2e-5  # projector learning rate in stage 2 (dpo_finetune.sh --mm_projector_lr; also for --model tiny, see dpo_vit_lr)
    dpo_freeze_projector: bool = False  # keep the projector frozen in DPO (the release trains it, see add_adapters)
    dpo_lora_dropout: float = 0.05  # LLM LoRA dropout in DPO: on, as released (no disable_dropout in base_dpo_trainer.py); 0 = TRL's disable_dropout
    dpo_vit_lora_dropout: float = 0.1  # ViT LoRA dropout in DPO (train_dpo.py:1194, hard-coded)
    beta: float = -1  # DPO temperature; -1 = 0.1 (BaseDPOTrainer default, not overridden), or 0.5 for --model tiny (see dpo_lr)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO (the release); ipo = Azar et al. 2023
    label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels (sigmoid only)
    reference_free: bool = False  # reference log-probs = 0
    prefix_sharing: bool = True  # one row per pair whose answers share image and prompt (exact; dpo.py)
    dpo_epochs: float = -1  # -1 = 1 (spec), or 5 for --model tiny (95 steps on the toy's ~320 pairs; see dpo_lr)
    dpo_batch_size: int = 16  # pairs per optimizer step over all ranks
    dpo_micro_batch_size: int = 8  # pairs per forward on one rank
    # run and output
    stages: str = "sft,prefs,dpo,eval"  # comma list: sft (stage 1), prefs (preference data), dpo (stage 2), eval
    out: str = "runs/stllava_med"  # checkpoints (out/stage1, out/dpo), metrics.jsonl, stage models, pairs, predictions
    prefs_out: str = ""  # the pairs as an STLLaVA-Med DPO json ("" = <out>/stllava_med_dpo.json)
    save_every: int = 0  # checkpoint every N steps within a stage (0 = at the end of the stage)
    resume: bool = True  # continue a stage from its newest complete checkpoint made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # evaluation
    eval_only: bool = False  # only evaluate --model on --eval-data (no training data is read, nothing is trained)
    eval_data: str = "data/toy/test_vqa.json"  # toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    eval_before: bool = True  # also evaluate the starting model (the "base" row)
    eval_limit: int = 0  # first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # answer length cap (VQA answers are short)
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


def resolve_defaults(args: Args) -> Args:
    """-1 / "auto" fields: the spec's values, or values that make the tiny random model learn in minutes on a CPU."""
    tiny = args.model == "tiny"
    pick = lambda value, spec, toy: value if value != -1 else (toy if tiny else spec)
    args.sft_lr = pick(args.sft_lr, 2e-4, 1e-3)
    args.sft_epochs = pick(args.sft_epochs, 3.0, 12.0)
    args.projector_lr = pick(args.projector_lr, 2e-5, 1e-3)
    args.prefs_limit = pick(args.prefs_limit, 0, 120)
    args.describe_max_new_tokens = pick(args.describe_max_new_tokens, 1024, 32)
    args.q_max_new_tokens = pick(args.q_max_new_tokens, 300, 24)
    args.a_max_new_tokens = pick(args.a_max_new_tokens, 1024, 16)
    args.n_questions = pick(args.n_questions, 5, 20)
    args.dpo_lr = pick(args.dpo_lr, 5e-6, 2e-5)
    args.beta = pick(args.beta, 0.1, 0.5)
    args.dpo_epochs = pick(args.dpo_epochs, 1.0, 5.0)
    args.q_temperature = pick(args.q_temperature, 1.2, 0.7)
    if args.describe_prompt == "auto":
        args.describe_prompt = "Describe the image." if args.sft_data == "toy" else "Can you describe the image in detail?"
    if args.judge == "auto":
        args.judge = "toy" if tiny and args.sft_data == "toy" else "reference"
    if not args.prefs_images and args.sft_data == "toy":
        args.prefs_images = str(TOY_TRAIN.parent / "pref.json")
    if args.ties == "auto":
        args.ties = "skip" if args.judge == "toy" else "answer2"
    if args.answer_system == "auto":
        args.answer_system = "v1_sq" if tiny else "llava_v1"
    if args.dpo_system == "auto":
        args.dpo_system = "v1_sq" if tiny else "v1"
    if args.train_llm == "auto":
        args.train_llm = "full" if tiny else "lora"
    stages = ["eval"] if args.eval_only else [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - {"sft", "prefs", "dpo", "eval"}:
        raise ValueError(f"--stages {args.stages!r}: expected a comma list of sft, prefs, dpo, eval")
    args.stages = ",".join(stages)
    if len(args.answer_seeds.split(",")) != 2:
        raise ValueError(f"--answer-seeds {args.answer_seeds!r}: expected two seeds, e.g. 40,42")
    return args


# ----------------------------------------------------------------------------------------------------------
# 1. The v1_sq template: visual self-questioning (spec 4.2; SQ-LLaVA's conv_vicuna_v1_sq and preprocess_v1_sq2)
# ----------------------------------------------------------------------------------------------------------

# The released system prompt: vicuna v1's plus a virtual-user instruction, glued without a space ("questions.Also").
SQ_SYSTEM = (lm.VICUNA_SYSTEM + "Also, the artificial intelligence assistant is a curious virtual user. The virtual user "
             "asks complex questions that are relevant to the content in the image, for example, asking about background "
             "knowledge of the objects in the image, asking to discuss about events happening in the image, etc. Again, "
             "do not ask about uncertain details.")
# conversation.py's conv_llava_v1, the --conv-mode default of model_collectA.py and model_vqa.py: v1's prompt with
# "human" where conv_vicuna_v1 (v1, used by dpo_finetune.sh --version v1) says "user"
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
SYSTEMS = {"v1": None, "llava_v1": LLAVA_V1_SYSTEM, "v1_sq": SQ_SYSTEM}  # None: the template's own (vicuna v1's)


def draw_vuser_turns(n_turns: int, sq_r: float, rng: random.Random) -> set[int]:
    """Indices of the human turns that become VUSER turns: each human turn after the first (which carries the image)
    independently with probability sq_r. The released code draws anew on every read of a sample; here the draw is
    seeded by (seed, epoch, sample), so a run is reproducible and every epoch sees a fresh draw."""
    return {i for i in range(2, n_turns, 2) if rng.random() < sq_r}


def sq_segments(turns: list[tuple[str, str]], vuser: set[int], eos: str = "</s>", add_vuser_prompt: bool = False):
    """[(text, is_target)] of the v1_sq rendering (SeparatorStyle.TWO, sep " ", sep2 "</s>"):

        "<sys> USER: <image>\\nQ1? ASSISTANT: A1.</s>VUSER: Q2?</s> ASSISTANT: A2.</s>"

    A VUSER message is the question + "</s>" (spec 4.2). Targets: every answer and its "</s>", and every VUSER question
    and its "</s>"; the role prefixes are masked. As in llava_med's templates, the space after "ASSISTANT:" /
    "VUSER:" opens the target segment (the rendered string is unchanged), so a generation prompt ends at the colon.
    add_vuser_prompt appends "VUSER:" after the last answer: the prompt that makes the model ask a question."""
    segs = []
    for i in range(0, len(turns), 2):
        q = turns[i][1]
        a = turns[i + 1][1] if i + 1 < len(turns) else None
        if i in vuser:
            segs += [("VUSER:", False), (f" {q}{eos}", True), (" ASSISTANT:", False)]
        else:
            segs.append(((SQ_SYSTEM + " " if i == 0 else "") + f"USER: {q} ASSISTANT:", False))
        if a is not None:
            segs.append((f" {a}{eos}", True))
    if add_vuser_prompt:
        segs.append(("VUSER:", False))
    return segs


def tokenize_sq(tokenizer, segments, num_image_tokens: int, image_token_id: int, max_length: int | None = None,
                where: str = "", prompt: bool = False) -> dict:
    """Segments -> {"input_ids", "labels"} like llava_med.tokenize_conversation: BOS, each segment tokenised on its own
    (targets copied into labels, the rest IGNORE_INDEX), `<image>` expanded to the image tokens. Too long: cut from the
    right, never through image tokens; no target token left: DataError (never a silent zero loss), unless `prompt`
    (a generation prompt has no targets)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [lm.IGNORE_INDEX] * len(ids)
    for k, (text, target) in enumerate(segments):
        expanded = []
        for t in lm.encode_segment(tokenizer, text, segments[k - 1][0] if k else None):
            expanded.extend([image_token_id] * num_image_tokens if t == image_token_id else [t])
        ids.extend(expanded)
        labels.extend(expanded if target else [lm.IGNORE_INDEX] * len(expanded))
    n_images = sum(text.count(lm.IMAGE_MARKER) for text, _ in segments)
    if sum(1 for t in ids if t == image_token_id) != n_images * num_image_tokens:
        raise lm.DataError(f"{where}: '<image>' did not tokenise to the image token")
    if max_length is not None and len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            raise lm.DataError(f"{where}: {len(ids)} tokens > max_length {max_length} and truncation would cut "
                               f"through image tokens (raise --max-length)")
        ids, labels = ids[:max_length], labels[:max_length]
    if not prompt and all(t == lm.IGNORE_INDEX for t in labels):
        raise lm.DataError(f"{where}: no supervised token" + (f" after truncation to {max_length}" if max_length else ""))
    return {"input_ids": ids, "labels": labels}


TOY_TRAIN = lm.REPO / "data" / "toy" / "train.json"


def sft_records(args: Args) -> tuple[list[tuple[str, dict]], Path]:
    if args.sft_data == "toy":
        from data.toy_readers import toy_sq_records  # toy-only code lives with the toy

        return toy_sq_records(TOY_TRAIN, args.seed), TOY_TRAIN.parent
    path = Path(args.sft_data)
    return lm.read_records(path), Path(args.image_folder or path.parent)


class SQData:
    """Stage-1 records: validated once (turns, images opened, a first tokenisation), tokenised per epoch with that
    epoch's VUSER draw. Bad records raise DataError naming file and record, or are counted with skip_bad."""

    def __init__(self, records, folder: Path, tokenizer, cfg, args: Args):
        self.tokenizer, self.cfg, self.args = tokenizer, cfg, args
        opened = set()

        def checked(where, rec):
            images = [lm.checked_image(folder, p, where, opened=opened) for p in lm.record_images(rec, where)]
            item = {"where": where, "turns": lm.place_image_markers(lm.record_turns(rec, where), len(images), where),
                    "images": images}
            self.tokenized(item, set())  # the no-VUSER rendering must fit (the first answer is always a target)
            return item

        self.items, self.skipped, _ = lm.keep_good(records, checked, args.skip_bad_samples, "stage-1 record")

    def __len__(self):
        return len(self.items)

    def tokenized(self, item: dict, vuser: set[int]) -> dict:
        cfg = self.cfg
        return tokenize_sq(self.tokenizer, sq_segments(item["turns"], vuser, self.tokenizer.eos_token),
                           cfg.num_image_tokens, cfg.image_token_id, self.args.max_length, item["where"])

    def sample(self, i: int, epoch: int) -> dict:
        item = self.items[i]
        rng = random.Random(f"{self.args.seed}-{epoch}-{i}")  # str seeds are hashed with sha512: stable everywhere
        return {**self.tokenized(item, draw_vuser_turns(len(item["turns"]), self.args.sq_r, rng)), "images": item["images"]}

    def batch(self, samples: list[dict], pad_id: int) -> dict:
        b = lm.collate(samples, pad_id)
        pix = [lm.image_tensor(self.cfg, p) for s in samples for p in s["images"]]
        b["pixel_values"] = torch.stack(pix) if pix else None
        return b


# ----------------------------------------------------------------------------------------------------------
# 2. Preference data: self-questioning, two answers, a judge (spec 4.6)
# ----------------------------------------------------------------------------------------------------------

# Our wording of the judge's rule: the released one (rule['preference']) is not in the repository (spec 8). The reply
# format is the released parser's: the first line holds the two scores.
JUDGE_RULE = ("We would like your feedback on two AI assistants' answers to the question about the medical image "
              "above. Rate the correctness, relevance and precision of each answer with an overall score from 1 to 10 "
              "(higher is better). Output a first line with only the two scores, for answer 1 and answer 2, separated "
              "by a space. On the following lines, explain your rating.")


def judge_content(question: str, answer1: str, answer2: str) -> str:
    """The judge message of eval_gpt4v_review.py (spec 4.6), sent with the image."""
    return (f"[Question]\n{question}\n\n[Answer 1]\n{answer1}\n\n[End of Answer 1]\n\n[Answer 2]\n{answer2}\n\n"
            f"[End of Answer 2]\n\n[System]\n{JUDGE_RULE}\n\n")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The released parser: the first line split into exactly two numbers ("8 6", "8, 6"); anything else is None."""
    first = reply.strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        return float(first[0]), float(first[1])
    except ValueError:
        return None


def normalize_question(q: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", q.lower()).split())


def reference_answers(rec: dict, where: str = "") -> dict[str, str]:
    """{normalised question: answer} from a record's conversation (and the toy's qa list)."""
    refs = {}
    if rec.get("conversations"):
        turns = lm.record_turns(rec, where)
        for i in range(0, len(turns) - 1, 2):
            refs[normalize_question(turns[i][1].replace(lm.IMAGE_MARKER, ""))] = turns[i + 1][1]
    for qa in rec.get("qa", []):
        refs[normalize_question(qa["question"])] = qa["answer"]
    return refs


def reference_judge(question: str, answer1: str, answer2: str, refs: dict[str, str]) -> str:
    """The offline judge for data that carries answers: each answer scores round(10 x token F1) against the data's
    answer to the same question (LLaVA-Med's normalisation), written as a judge reply. A question the data does not
    answer gets an empty reply, which the parser rejects (counted as "no reference answer")."""
    ref = refs.get(normalize_question(question))
    if ref is None:
        return ""
    s1, s2 = (round(10 * lm.token_recall(a, ref)[2]) for a in (answer1, answer2))
    return f"{s1} {s2}\nreference-answer scorer: token F1 against {ref!r}"


def preference_pair(question: str, answers: tuple[str, str], reply: str, ties: str, stats: dict):
    """(chosen, rejected, scores) from the judge's reply, or None (the reason counted in stats): unparsable reply ->
    skipped (released); equal scores -> answer 2 is chosen (released: `if s1 > s2` else answer 2) or skipped with
    --ties skip; identical answers -> skipped (a pair with chosen == rejected has zero DPO gradient); empty text or a
    literal '<image>' -> skipped."""
    a1, a2 = answers
    reason = None
    if not question.strip() or not a1.strip() or not a2.strip():
        reason = "empty question or answer"
    elif any(lm.IMAGE_MARKER in t for t in (question, a1, a2)):  # would tokenise to an image token with no image
        reason = "'<image>' in generated text"
    elif a1.strip() == a2.strip():
        reason = "identical answers"
    elif parse_scores(reply) is None:
        reason = "no reference answer" if reply == "" else "unparsable judge reply"
    if reason:
        stats[reason] = stats.get(reason, 0) + 1
        return None
    s1, s2 = scores = parse_scores(reply)
    if s1 == s2:
        stats["tie"] = stats.get("tie", 0) + 1
        if ties == "skip":
            return None
    return (a1, a2, scores) if s1 > s2 else (a2, a1, scores)


def dpo_record(rec_id: str, image: str, question: str, chosen: str, rejected: str, scores) -> dict:
    """The STLLaVA-Med DPO format read by train_dpo.py (LazySupervisedDataset) and by dpo.py (spec 4.6 item 5)."""
    human = {"from": "human", "value": "<image>\n" + question}
    return {"id": rec_id, "image": image, "chosen_conversations": [human, {"from": "gpt", "value": chosen}],
            "reject_conversations": [human, {"from": "gpt", "value": rejected}], "scores": list(scores)}


def image_sources(args: Args) -> tuple[list[dict], Path]:
    """[{"id", "image" (relative to the folder), "refs", "facts"}] and the image folder: records with conversations
    (their answers are the reference judge's; a toy record's findings and modality, the toy judge's facts, else
    None), or every image file of a folder (sorted, as listed)."""
    path = Path(args.prefs_images or (TOY_TRAIN if args.sft_data == "toy" else args.sft_data))
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".tga"))
        return [{"id": f, "image": f, "refs": {}, "facts": None} for f in files][: args.prefs_limit or None], path
    folder = Path(args.image_folder or path.parent) if not args.prefs_images else path.parent
    rows, seen = [], set()
    for where, rec in lm.read_records(path):
        for img in lm.record_images(rec, where)[:1]:
            if img not in seen:
                seen.add(img)
                facts = {"findings": rec["findings"], "modality": rec["modality"]} if "findings" in rec else None
                rows.append({"id": rec.get("id", where), "image": img, "refs": reference_answers(rec, where),
                             "facts": facts})
    return rows[: args.prefs_limit or None], folder


def stream_seed(args: Args, stream: str) -> int:
    """The sampling seed of one generation pass (batch b of it samples with this + b): distinct per pass and --seed."""
    return int(hashlib.sha256(f"{args.seed}-{stream}".encode()).hexdigest()[:12], 16)


def judge_replies(args: Args, items: list[tuple], rank: int, world: int, device) -> list[str]:
    """A reply per (image, question, answer 1, answer 2, reference answers, toy facts): the offline reference judge,
    the toy judge (the toy record's findings; an image without them gets no reply), or a local judge VLM (any
    checkpoint llava_med.load reads, in place of GPT-4o) given the image and judge_content, sampled at the released
    temperature 0.2 (eval_gpt4v_review.py)."""
    if args.judge == "reference":
        return [reference_judge(q, a1, a2, refs) for _, q, a1, a2, refs, _ in items]
    if args.judge == "toy":  # the toy's stand-in for GPT-4o (data/toy_oracles.py: reads the toy record's findings)
        from data.toy_oracles import toy_judge_reply

        return [toy_judge_reply(q, a1, a2, facts) if facts else "" for _, q, a1, a2, _, facts in items]
    judge, tokenizer = lm.load(args.judge, dtype=args.dtype, device=device)
    jobs = [{"turns": [("user", judge_content(q, a1, a2))], "images": [im]} for im, q, a1, a2, _, _ in items]
    return lm.generate_sharded(judge, tokenizer, jobs, args.gen_batch_size, rank, world, "judge",
                               stream_seed(args, "judge"), max_new_tokens=args.judge_max_new_tokens,
                               temperature=args.judge_temperature)


def generate_preferences(args: Args, model, tokenizer, rows: list[dict], folder: Path, rank: int, world: int):
    """Spec 4.6 steps 2-4 with the (unsharded) stage-1 model: describe each image (greedy), sample n questions after
    an empty VUSER turn (visual_sq.py, v1_sq), answer each twice with the answer template (model_collectA.py), judge
    the two answers. Every pass is batched and shared out by rank (the same pairs for any number of ranks); each
    batch has its own seeded generator (the released scripts seed each call). Returns (pairs, stats)."""
    cfg, n = model.config, args.n_questions
    images = [lm.resolve_image(folder, r["image"], r["id"]) for r in rows]
    first = lm.IMAGE_MARKER + "\n" + args.describe_prompt
    sq = lambda turns, vuser: tokenize_sq(tokenizer, sq_segments(turns, set(), tokenizer.eos_token, vuser),
                                          cfg.num_image_tokens, cfg.image_token_id, prompt=True)["input_ids"]
    described = lm.generate_sharded(model, tokenizer, [{"prompt": sq([("user", first)], False), "images": [im]}
                                                        for im in images], args.gen_batch_size, rank, world,
                                     "describe", max_new_tokens=args.describe_max_new_tokens)
    jobs = [{"prompt": sq([("user", first), ("assistant", d.replace(lm.IMAGE_MARKER, "") or ".")], True),
             "images": [im]} for d, im in zip(described, images) for _ in range(n)]
    questions = lm.generate_sharded(model, tokenizer, jobs, args.gen_batch_size, rank, world, "questions",
                                     stream_seed(args, "questions"), max_new_tokens=args.q_max_new_tokens,
                                     temperature=args.q_temperature, top_k=args.q_top_k, top_p=args.q_top_p)
    jobs = [{"turns": [("user", q.replace(lm.IMAGE_MARKER, ""))], "images": [images[k // n]],
             "system": SYSTEMS[args.answer_system]} for k, q in enumerate(questions)]
    a1, a2 = (lm.generate_sharded(model, tokenizer, jobs, args.gen_batch_size, rank, world, f"answers (seed {s})",
                                  stream_seed(args, f"answer{s}"), max_new_tokens=args.a_max_new_tokens,
                                  temperature=args.a_temperature, top_k=args.a_top_k, top_p=args.a_top_p)
              for s in args.answer_seeds.split(","))
    replies = judge_replies(args, [(images[k // n], q, a1[k], a2[k], rows[k // n]["refs"], rows[k // n]["facts"])
                                   for k, q in enumerate(questions)], rank, world, next(model.parameters()).device)
    stats, pairs = {"images": len(rows), "questions": len(questions)}, []
    for k, (q, reply) in enumerate(zip(questions, replies)):
        pair = preference_pair(q, (a1[k], a2[k]), reply, args.ties, stats)
        if pair is not None:
            pairs.append(dpo_record(f"{rows[k // n]['id']}_sq{k % n}", rows[k // n]["image"], q, *pair))
    return pairs, stats


def preference_pairs(args: Args, model, tokenizer, rank: int, world: int, from_stage1: bool):
    """(pairs, stats, image folder, the cache file if it was reused): from out/prefs_<key>.json (key: every Args field
    above dpo_data, --model by its files (cache_key), the image rows, and whether this run's stage 1 made the model)
    or generated and cached (lm.cached_json: no rank reads a file another one is still writing, issue 15 bug 7);
    the pairs stay in memory for stage 2."""
    rows, folder = image_sources(args)
    cache = Path(args.out) / f"prefs_{cache_key(args, 'dpo_data', from_stage1, rows)}.json"
    built, reused = lm.cached_json(cache, rank, lambda: dict(zip(("pairs", "stats"), generate_preferences(
        args, model, tokenizer, rows, folder, rank, world))))
    return built["pairs"], built["stats"], folder, cache if reused else None


# ----------------------------------------------------------------------------------------------------------
# 3. DPO data and losses (blocks of dpo.py)
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


# Copied from dpo.py: data_content
def data_content(data: PairData) -> str:
    """What the tokenised pairs are (a cache key's content): a digest of their token ids and image names, built pair
    by pair (one json string of 100k pairs would take gigabytes)."""
    h = hashlib.sha256()
    for it in data.items:
        h.update(json.dumps([it["chosen"]["input_ids"], it["rejected"]["input_ids"], it["images"],
                             it["rejected_images"]]).encode())
    return h.hexdigest()


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


def dpo_records(args: Args, pairs, prefs_folder, prefs_path: Path) -> tuple[list[tuple[str, dict]], Path]:
    """Stage 2's records and their image folder: --dpo-data, or this run's pairs, or those that an earlier prefs run
    wrote to prefs_path (their images are relative to the prefs images' folder)."""
    if args.dpo_data:
        return lm.read_records(args.dpo_data), Path(args.image_folder or Path(args.dpo_data).parent)
    if pairs is None:
        return lm.read_records(prefs_path), image_sources(args)[1]
    if not pairs:
        raise lm.DataError("the prefs stage produced no preference pair (see its counts above); stage 2 has no data")
    return [(f"{prefs_path}[{i}]", r) for i, r in enumerate(pairs)], prefs_folder


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


# ----------------------------------------------------------------------------------------------------------
# 4. Model setup: the cluster projector, what each stage trains, FSDP2
# ----------------------------------------------------------------------------------------------------------


def use_cluster_projector(args: Args, model, stage1: bool):
    """Put the cluster projector in (a new one, optionally with SQ-LLaVA's pretrained weights), or keep the model's.
    auto: a new one only when stage 1 runs on a checkpoint without a cluster projector (later stages and evaluation
    keep what the checkpoint has)."""
    cfg = model.config
    kind = args.projector
    if kind == "auto":
        new = stage1 and not cfg.projector_type.startswith("cluster")
        kind = ("cluster8" if args.model == "tiny" else "cluster") if new else "keep"
    if kind != "keep":
        dtype = next(model.projector.parameters()).dtype
        torch.manual_seed(args.seed)
        model.projector = lm.build_projector(kind, cfg.vision_config.hidden_size, cfg.text_config.hidden_size).to(
            device=next(model.parameters()).device, dtype=dtype)
        cfg.projector_type = kind
    if args.projector_weights:
        path = Path(args.projector_weights)
        sd = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        sd = {re.sub(r"^(model\.)?mm_projector\.", "", k): v for k, v in sd.items()}
        missing, unexpected = model.projector.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: projector weights do not match {cfg.projector_type}: missing {missing}, "
                             f"unexpected {unexpected}")
    return model


def add_adapters(args: Args, model, stage: int):
    """What each stage trains (in fp32). Stage 1 (train.py): the LLM (its LoRA, or all of it with --train-llm full),
    the whole projector and the ViT LoRA. Stage 2 (train_dpo.py): a new LoRA on the LLM and the ViT of the merged
    stage-1 model, and the projector, which the release trains: get_peft_model freezes it, initialize_vision_modules
    unfreezes it ("In case it is frozen by LoRA", llava_arch.py) and dpo_finetune.sh gives it --mm_projector_lr 2e-5.
    Returns the frozen copy of the projector that the reference uses when it trains in stage 2 (else None)."""
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank, whatever ran before
    model.requires_grad_(False)
    lora = stage == 2 or args.train_llm == "lora"
    if lora:
        lm.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout if stage == 1 else args.dpo_lora_dropout)
    if args.vit_lora:
        lm.add_lora(model, args.vit_lora_r, args.vit_lora_alpha,
                    args.vit_lora_dropout if stage == 1 else args.dpo_vit_lora_dropout, targets=lm.VIT_LORA_TARGETS)
    projector = stage == 1 or not args.dpo_freeze_projector
    ref_projector = copy.deepcopy(model.projector) if stage == 2 and projector else None
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or (projector and n.startswith("projector."))
                         or (not lora and n.startswith("language_model.")))
        p.data = p.data.float() if p.requires_grad else p.data
    return ref_projector


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
# 5. The training loop (dpo.py's, copied): global batches -> micro-batches -> step_fn -> AdamW; checkpoints, resume
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
# 6. The steps: stage 1 (self-questioning SFT) and stage 2 (DPO against the frozen stage-1 model)
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: to_device
def to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sft_step(model, tokenizer, data: SQData, idx: list[int], epoch: int, device) -> dict:
    """One stage-1 micro-batch: token cross-entropy summed over answer AND VUSER-question tokens, and their count
    (the loop divides by the count of the whole global batch; LLaVA averages per micro-batch)."""
    batch = data.batch([data.sample(i, epoch) for i in idx], tokenizer.pad_token_id)
    loss, n_tokens = sft_loss_sum(model, to_device(batch, device))
    return {"loss": loss, "n": n_tokens, "tokens": batch["attention_mask"].sum().float()}


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


# ----------------------------------------------------------------------------------------------------------
# 7. Evaluation and saving
# ----------------------------------------------------------------------------------------------------------


def evaluate_answers(args: Args, model, tokenizer, rows: list[dict], rank: int, world: int, desc: str):
    """Greedy answers with the answer template and --answer-system's prompt (model_vqa.py: llava_v1), shared out to
    the ranks by lm.generate_sharded, scored by lm.score_vqa (LLaVA-Med's normaliser; closed accuracy, open recall)."""
    jobs = [{"turns": [("user", r["question"])], "images": [r["image"]], "system": SYSTEMS[args.answer_system]}
            for r in rows]
    preds = lm.generate_sharded(model, tokenizer, jobs, args.eval_batch_size, rank, world, desc,
                                max_new_tokens=args.eval_max_new_tokens)
    results = [dict(r, prediction=p) for r, p in zip(rows, preds)]
    return lm.score_vqa(results, args.closed_scoring), results


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = resolve_defaults(parse_args(Args, argv))
    t_start = time.time()
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master = Path(args.out), rank == 0
    stages = args.stages.split(",")
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"stllava_med.py: {world} rank(s) on {device.type}; stages {stages}; args in {out / 'args.json'}")
    torch.manual_seed(args.seed)
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None, seed=args.seed)
    use_cluster_projector(args, model, "sft" in stages)
    frozen_dtype = next(model.vision_tower.parameters()).dtype
    eval_rows = lm.read_vqa(args.eval_data, args.eval_image_folder)[: args.eval_limit or None] if "eval" in stages else []
    results, pairs, prefs_folder, prefs_path = {"train": {}}, None, None, Path(args.prefs_out or out / "stllava_med_dpo.json")

    def evaluate(name: str):
        results[name], preds = evaluate_answers(args, model, tokenizer, eval_rows, rank, world, f"eval {name}")
        log({"phase": f"eval_{name}", **results[name]})
        if master:
            print(f"{name}:", json.dumps(results[name]))
            (out / f"predictions_{name}.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))

    if "sft" in stages:  # ---- stage 1: visual self-questioning SFT
        data = SQData(*sft_records(args), tokenizer, model.config, args)
        if master:
            print(f"stage 1: {len(data)} conversations, sq_r {args.sq_r}" + (f", skipped {data.skipped}" if data.skipped else ""))
        add_adapters(args, model, stage=1)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        shard(model, device, args.activation_checkpointing)
        results["train"]["stage1"] = train(
            args, "stage1", model, len(data), lambda idx, epoch: sft_step(model, tokenizer, data, idx, epoch, device),
            out / "stage1", rank, world, log, {"projector.": args.projector_lr, "vision_tower.": args.vit_lr, "": args.sft_lr},
            args.batch_size, args.micro_batch_size, args.sft_epochs,
            before=(lambda: evaluate("base")) if eval_rows and args.eval_before else None)
        if eval_rows:
            evaluate("sft")
        # the stage-1 model, unsharded: the preference generator, DPO's start and its reference
        model = lm.save_merged(model, tokenizer, out / "stage1_model", rank, "original").to(device=device, dtype=frozen_dtype)
    if "prefs" in stages:  # ---- preference data from the stage-1 model
        pairs, stats, prefs_folder, cached = preference_pairs(args, model, tokenizer, rank, world, "sft" in stages)
        results["prefs"] = {"pairs": len(pairs), **stats}
        log({"phase": "prefs", "cached": cached is not None, **results["prefs"]})
        if master:
            prefs_path.parent.mkdir(parents=True, exist_ok=True)
            prefs_path.write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
            print(f"preference pairs: {len(pairs)} -> {prefs_path}" + (f" (cached: {cached})" if cached else "")
                  + f"; {json.dumps(stats)}")
    if "dpo" in stages:  # ---- stage 2: DPO (policy = stage-1 model + new LoRA; reference = the same, adapters off)
        data = PairData(*dpo_records(args, pairs, prefs_folder, prefs_path), tokenizer, model.config, args.max_length,
                        args.skip_bad_samples, system=SYSTEMS[args.dpo_system])
        if master:
            print(f"stage 2: {len(data)} preference pairs" + (f", skipped {data.skipped}" if data.skipped else ""))
        ref_projector = add_adapters(args, model, stage=2)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        shard(model, device, args.activation_checkpointing)
        results["train"]["dpo"] = train(  # keyed on Args above --out and on the pairs (another --prefs-out, an edit)
            args, "dpo", model, len(data), lambda idx, epoch: dpo_step(args, model, ref_projector, data, idx, tokenizer, device),
            out / "dpo", rank, world, log, {"projector.": args.dpo_projector_lr, "vision_tower.": args.dpo_vit_lr, "": args.dpo_lr},
            args.dpo_batch_size, args.dpo_micro_batch_size, args.dpo_epochs, content=(cache_key(args, "out"), data_content(data)),
            # the policy before DPO is the stage-1 model (LoRA B = 0)
            before=(lambda: evaluate("sft")) if eval_rows and args.eval_before and "sft" not in stages else None)
        if eval_rows:
            evaluate("dpo")
        lm.save_merged(model, tokenizer, out / "stage2_model", rank, "original")
    elif eval_rows and "sft" not in stages:  # evaluation only
        model.requires_grad_(False)
        shard(model, device)
        evaluate("model")
    results["wall_s"] = round(time.time() - t_start, 1)
    if master:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
