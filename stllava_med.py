"""stllava_med.py -- STLLaVA-Med (Sun et al., EMNLP 2024, arXiv 2406.19973): self-training a medical VLM with visual
self-questioning and self-generated preferences.

    # embedded default: tiny random LLaVA with the cluster projector, toy data, CPU, a few minutes:
    # stage 1 (self-questioning SFT), preference generation (reference-answer judge), stage 2 (DPO), evaluation
    python stllava_med.py
    torchrun --nproc-per-node=2 stllava_med.py          # same global batches on 2 processes
    # real run (8 GPUs): SQ-LLaVA-7B base, LLaVA-Med 60k conversations, PMC images, a local judge VLM, VQA-RAD
    torchrun --nproc-per-node=8 stllava_med.py --model /ckpt/sqllava-7B-v1.5 \\
        --projector-weights /ckpt/sqllava-7B-v1.5/mm_projector.bin --sft-data llava_med_60k_inline_mention.json \\
        --image-folder /data/pmc --prefs-images /data/pmc_10k --judge /ckpt/judge-vlm \\
        --eval-data /data/vqa_rad/testset.json --batch-size 256 --micro-batch-size 8 --max-length 2048
    # one stage at a time (a stage-1 checkpoint is an original-LLaVA-layout folder that llava_med.load reads)
    python stllava_med.py --stages prefs,dpo,eval --model runs/stllava_med/stage1_model

The method (spec section 4):
  1. Visual self-questioning SFT (`v1_sq` template): LLaVA conversations in which every later human turn becomes,
     with probability sq_r (0.5), a VUSER turn whose QUESTION is a training target; the answers are targets as usual.
     Trained: LLM (LoRA r 128, alpha 256), the "cluster" prototype projector (llava_med.ClusterProjector), and
     ViT LoRA (r 32, alpha 64) with the vision tower running WITH gradients (the released code's @torch.no_grad on
     the tower silently blocks them; spec 4.4).
  2. Preference data: for each image the stage-1 model describes it, then asks n questions as the virtual user
     (sampled, T 1.2, top-k 300, top-p 0.95); it answers each question twice (seeds 40 and 42; T 1.2, top-k 100,
     top-p 0.95); a judge scores both answers ("s1 s2" on its first line); chosen = the higher score, ties go to
     answer 2 (the released rule), unparsable replies are skipped. The judge is a local VLM (--judge PATH; the
     paper uses GPT-4o) or, offline, a reference-answer scorer for images whose data carry answers.
  3. DPO (Rafailov et al. 2023) on those pairs: loss -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) -
     log ref(r))]) with summed answer log-probs, beta 0.1; policy = stage-1 model + new LoRA, reference = the frozen
     stage-1 model (the adapters switched off).
  4. Evaluation: greedy answers on VQA-RAD / SLAKE / the toy split, scored the LLaVA-Med way (closed accuracy, open
     recall).
Templates: stage 1 uses v1_sq; answers (preference answers, DPO, evaluation) use vicuna v1 ("USER: ... ASSISTANT:"),
with v1's system prompt as released, or stage 1's (--answer-system v1_sq, the default for the tiny model, which
learns only the one prompt it is trained on).

File layout: Args -> v1_sq template and data -> preference generation and judges -> losses -> model setup ->
training loops (SFT, DPO) -> evaluation -> main().
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
    stages: str = "sft,prefs,dpo,eval"  # comma list: sft (stage 1), prefs (preference data), dpo (stage 2), eval
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (SQ-LLaVA / LLaVA layout, llava-hf)
    projector: str = "auto"  # "cluster" (256 centres), "clusterK", "keep"; auto = keep a cluster checkpoint's own, else
    #                          a new cluster projector (cluster8 for --model tiny: 16 image tokens)
    projector_weights: str = ""  # pretrained cluster projector (SQ-LLaVA's mm_projector.bin / .safetensors)
    template: str = "vicuna_v1"  # answer template for preference answers, DPO and evaluation (STLLaVA-Med's v1)
    answer_system: str = "auto"  # its system prompt: "v1" (vicuna v1's, as released) or "v1_sq" (stage 1's); auto =
    #                              v1_sq for --model tiny (a model trained from scratch knows only stage 1's prompt)
    dtype: str = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    # stage 1: visual self-questioning SFT
    sft_data: str = "toy"  # LLaVA conversation json/jsonl (multi-turn: later turns can become VUSER), or "toy"
    image_folder: str = ""  # images of --sft-data ("" = its folder)
    sq_r: float = 0.5  # probability that a later human turn becomes a VUSER (trained) question (sqllava_med.sh: 0.5)
    max_length: int = 512  # tokens per sample, image tokens included (spec: 2048)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    train_llm: str = "auto"  # "lora" (r 128, alpha 256: the spec), "full"; auto = full for --model tiny (random weights)
    lora_r: int = 128  # LLM LoRA rank (stages 1 and 2)
    lora_alpha: int = 256  # LLM LoRA alpha
    lora_dropout: float = 0.05  # LLM LoRA dropout
    vit_lora: bool = True  # ViT LoRA on every linear layer of CLIP (--vit_lora_enable), in both stages
    vit_lora_r: int = 32  # ViT LoRA rank
    vit_lora_alpha: int = 64  # ViT LoRA alpha (alpha / r = 2, as the LLM's)
    vit_lora_dropout: float = 0.2  # ViT LoRA dropout
    sft_lr: float = -1  # LLM learning rate; -1 = 2e-4 (spec), or 1e-3 for --model tiny
    projector_lr: float = -1  # cluster projector learning rate; -1 = 2e-5 (mm_projector_lr), or 1e-3 for --model tiny
    vit_lr: float = 5e-5  # ViT LoRA learning rate (vision_tower_lr)
    sft_epochs: float = 3  # passes over the stage-1 conversations (sqllava_med.sh: 3)
    batch_size: int = 16  # samples per optimizer step over all ranks (global)
    micro_batch_size: int = 8  # samples per forward on one rank
    warmup_ratio: float = 0.03  # linear warmup, then cosine to 0
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    # preference generation
    prefs_images: str = ""  # records json/jsonl (image + optional conversations) or a folder of images; "" = the
    #                          stage-1 records (their answers serve the reference judge)
    prefs_limit: int = -1  # first N images; -1 = all, or 120 for --model tiny
    n_questions: int = 5  # self-generated questions per image (n_shot)
    describe_prompt: str = "Can you describe the image in detail?"  # the first turn of self-questioning (greedy answer)
    describe_max_new_tokens: int = -1  # -1 = 1024 (released), or 32 for --model tiny
    q_temperature: float = 1.2  # question sampling (visual_sq.py)
    q_top_k: int = 300
    q_top_p: float = 0.95
    q_max_new_tokens: int = -1  # -1 = 300 (released), or 24 for --model tiny
    a_temperature: float = 1.2  # answer sampling (model_collectA.py)
    a_top_k: int = 100
    a_top_p: float = 0.95
    a_max_new_tokens: int = -1  # -1 = 1024 (released), or 16 for --model tiny
    answer_seeds: str = "40,42"  # the seeds of answer 1 and answer 2
    judge: str = "reference"  # "reference" (offline: token F1 against the data's answer) or a judge VLM checkpoint folder
    judge_temperature: float = 0.2  # judge sampling (eval_gpt4v_review.py)
    judge_max_new_tokens: int = 64
    ties: str = "answer2"  # equal scores: "answer2" = chosen is answer 2 (the released rule), or "skip"
    gen_batch_size: int = 16  # prompts per generate call on one rank
    prefs_out: str = ""  # where the DPO json goes ("" = <out>/stllava_med_dpo.json)
    # stage 2: DPO
    dpo_data: str = ""  # STLLaVA-Med DPO json ("" = the file written by the prefs stage)
    dpo_lr: float = -1  # -1 = 5e-6 (dpo_finetune.sh), or 1e-5 for --model tiny
    dpo_vit_lr: float = 2e-5  # ViT LoRA learning rate in stage 2
    beta: float = 0.1  # DPO temperature (BaseDPOTrainer default, not overridden)
    dpo_epochs: float = -1  # -1 = 1 (spec), or 3 for --model tiny
    dpo_batch_size: int = 16  # pairs per optimizer step over all ranks
    dpo_micro_batch_size: int = 8  # pairs per forward on one rank
    seed: int = 0  # same seed + same data = same run
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    # output
    out: str = "runs/stllava_med"  # checkpoints, metrics.jsonl, stage models, DPO json, predictions, results.json
    save_every: int = 0  # checkpoint every N steps within a stage (0 = at the end of the stage)
    resume: bool = True  # continue a stage from its newest complete checkpoint
    # evaluation
    eval_data: str = "data/toy/test_vqa.json"  # toy test_vqa.json, VQA-RAD testset.json, SLAKE test.json
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    eval_before: bool = True  # also evaluate the starting model (the "base" row)
    eval_limit: int = 0  # first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 16  # answer length cap (VQA answers are short)
    closed_scoring: str = "strict"  # "strict": first yes/no word; "llava_med": GT substring of the answer


# Copied from dpo.py: parse_args
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


def resolve_defaults(args: Args) -> Args:
    """-1 / "auto" fields: the spec's values, or values that make the tiny random model learn in minutes on a CPU."""
    tiny = args.model == "tiny"
    pick = lambda value, spec, toy: value if value != -1 else (toy if tiny else spec)
    args.sft_lr = pick(args.sft_lr, 2e-4, 1e-3)
    args.projector_lr = pick(args.projector_lr, 2e-5, 1e-3)
    args.prefs_limit = pick(args.prefs_limit, 0, 120)
    args.describe_max_new_tokens = pick(args.describe_max_new_tokens, 1024, 32)
    args.q_max_new_tokens = pick(args.q_max_new_tokens, 300, 24)
    args.a_max_new_tokens = pick(args.a_max_new_tokens, 1024, 16)
    args.dpo_lr = pick(args.dpo_lr, 5e-6, 1e-5)
    args.dpo_epochs = pick(args.dpo_epochs, 1.0, 3.0)
    if args.answer_system == "auto":
        args.answer_system = "v1_sq" if tiny else "v1"
    if args.answer_system not in ("v1", "v1_sq"):
        raise ValueError(f"--answer-system {args.answer_system!r}: expected v1, v1_sq or auto")
    if args.train_llm == "auto":
        args.train_llm = "full" if tiny else "lora"
    if args.train_llm not in ("lora", "full"):
        raise ValueError(f"--train-llm {args.train_llm!r}: expected lora, full or auto")
    if args.ties not in ("answer2", "skip"):
        raise ValueError(f"--ties {args.ties!r}: expected answer2 or skip")
    return args


# ----------------------------------------------------------------------------------------------------------
# 1. The v1_sq template: visual self-questioning (spec 4.2; SQ-LLaVA's conv_vicuna_v1_sq and preprocess_v1_sq2)
# ----------------------------------------------------------------------------------------------------------

# The released system prompt: vicuna v1's plus a virtual-user instruction, glued without a space ("questions.Also").
SQ_SYSTEM = (lm.VICUNA_SYSTEM + "Also, the artificial intelligence assistant is a curious virtual user. The virtual user "
             "asks complex questions that are relevant to the content in the image, for example, asking about background "
             "knowledge of the objects in the image, asking to discuss about events happening in the image, etc. Again, "
             "do not ask about uncertain details.")


def answer_system(args: Args) -> str | None:
    """System prompt of the answer template (None = the template's own: vicuna v1's)."""
    return SQ_SYSTEM if args.answer_system == "v1_sq" else None


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


def render_sq(turns, vuser: set[int], eos: str = "</s>", add_vuser_prompt: bool = False) -> str:
    return "".join(text for text, _ in sq_segments(turns, vuser, eos, add_vuser_prompt))


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
        for t in lm.encode_segment(tokenizer, text, first=(k == 0)):
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


def toy_sq_records(path: Path, seed: int, rounds_per_conversation: int = 2) -> list[tuple[str, dict]]:
    """The toy stand-in for LLaVA-Med's 60k conversations: per image, its QA rounds and a describe round in a seeded
    random order, cut into conversations of `rounds_per_conversation` rounds. (The toy conversations hold every round
    in one fixed order: the tiny model then learns that the first question is a yes/no one, and answers later ones
    from the earlier answers and the report instead of from the image.)"""
    out = []
    for k, (where, rec) in enumerate(lm.read_records(path)):
        rounds = [(qa["question"], qa["answer"]) for qa in rec["qa"]] + [("Describe the image.", rec["report"])]
        random.Random(f"{seed}-{k}").shuffle(rounds)
        for c in range(0, len(rounds), rounds_per_conversation):
            conv = [t for q, a in rounds[c:c + rounds_per_conversation]
                    for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
            conv[0] = {"from": "human", "value": lm.IMAGE_MARKER + "\n" + conv[0]["value"]}
            out.append((f"{where} rounds {c}-{c + len(conv) // 2 - 1}", {**rec, "conversations": conv}))
    return out


def sft_records(args: Args) -> tuple[list[tuple[str, dict]], Path]:
    if args.sft_data == "toy":
        return toy_sq_records(TOY_TRAIN, args.seed), TOY_TRAIN.parent
    path = Path(args.sft_data)
    return lm.read_records(path), Path(args.image_folder or path.parent)


class SQData:
    """Stage-1 records: validated once (turns, images opened, a first tokenisation), tokenised per epoch with that
    epoch's VUSER draw. Bad records raise DataError naming file and record, or are counted with skip_bad."""

    def __init__(self, records, folder: Path, tokenizer, cfg, args: Args):
        self.tokenizer, self.cfg, self.args = tokenizer, cfg, args
        self.items, self.skipped, opened = [], {}, set()
        for where, rec in records:
            try:
                images = [lm.resolve_image(folder, p, where) for p in lm.record_images(rec, where)]
                turns = lm.place_image_markers(lm.record_turns(rec, where), len(images), where)
                for p in images:
                    if p not in opened:
                        try:
                            lm.load_image(p)
                        except lm.DataError as e:
                            raise lm.DataError(f"{where}: {e}") from None
                        opened.add(p)
                item = {"where": where, "turns": turns, "images": images}
                self.tokenized(item, set())  # the no-VUSER rendering must fit (the first answer is always a target)
                self.items.append(item)
            except lm.DataError as e:
                if not args.skip_bad_samples:
                    raise
                reason = str(e)[len(where) + 2:].split(" (")[0][:60] if str(e).startswith(where) else str(e)[:60]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if not self.items:
            raise lm.DataError(f"no usable stage-1 record (skipped: {self.skipped})")

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
        cfg = self.cfg
        b = lm.collate(samples, pad_id)
        pix = [lm.preprocess_image(lm.load_image(p), cfg.image_size, cfg.image_mean, cfg.image_std,
                                   pad=cfg.image_aspect_ratio == "pad") for s in samples for p in s["images"]]
        b["pixel_values"] = torch.stack(pix) if pix else None
        return b


# Copied from huatuo_vision.py: sft_loss_sum
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
    s1, s2 = (round(10 * token_recall(a, ref)[2]) for a in (answer1, answer2))
    return f"{s1} {s2}\nreference-answer scorer: token F1 against {ref!r}"


def preference_pair(question: str, answers: tuple[str, str], reply: str, ties: str, stats: dict):
    """(chosen, rejected, scores) from the judge's reply, or None (the reason counted in stats): unparsable reply ->
    skipped (released); equal scores -> answer 2 is chosen (released: `if s1 > s2` else answer 2) or skipped with
    --ties skip; identical answers -> skipped (a pair with chosen == rejected has zero DPO gradient); empty text or a
    literal '<image>' -> skipped."""
    a1, a2 = answers
    if not question.strip() or not a1.strip() or not a2.strip():
        stats["empty question or answer"] = stats.get("empty question or answer", 0) + 1
        return None
    if any(lm.IMAGE_MARKER in t for t in (question, a1, a2)):  # would tokenise to an image token with no image
        stats["'<image>' in generated text"] = stats.get("'<image>' in generated text", 0) + 1
        return None
    if a1.strip() == a2.strip():
        stats["identical answers"] = stats.get("identical answers", 0) + 1
        return None
    scores = parse_scores(reply)
    if scores is None:
        key = "no reference answer" if reply == "" else "unparsable judge reply"
        stats[key] = stats.get(key, 0) + 1
        return None
    s1, s2 = scores
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
    """[{"id", "image" (relative to the folder), "refs"}] and the image folder: records with conversations (their
    answers are the reference judge's), or every image file of a folder (sorted, as listed)."""
    path = Path(args.prefs_images or (TOY_TRAIN if args.sft_data == "toy" else args.sft_data))
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".tga"))
        rows = [{"id": f, "image": f, "refs": {}} for f in files]
        folder = path
    else:
        folder = Path(args.image_folder or path.parent) if not args.prefs_images else path.parent
        rows, seen = [], set()
        for where, rec in lm.read_records(path):
            for img in lm.record_images(rec, where)[:1]:
                if img not in seen:
                    seen.add(img)
                    rows.append({"id": rec.get("id", where), "image": img, "refs": reference_answers(rec, where)})
    return rows[: args.prefs_limit or None], folder


def sampled(model, tokenizer, prompts, pix, max_new_tokens, temperature, top_k, top_p, seed):
    return lm.generate(model, tokenizer, prompts, pix, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, sync=False)


def generate_preferences(args: Args, model, tokenizer, rank: int, world: int, stats: dict, judge=None) -> list[dict]:
    """Steps 2-4 of spec 4.6 with the (unsharded) stage-1 model; each rank takes every world-th image, the pairs are
    gathered in image order. Batched generation: one seeded generator per batch (rows draw different samples; the
    released code seeds each question's generate call instead)."""
    cfg = model.config
    rows, folder = image_sources(args)
    mine = list(enumerate(rows))[rank::world]  # (index in rows, row)
    seeds = [int(s) for s in args.answer_seeds.split(",")]
    pixel = lambda r: lm.preprocess_image(lm.load_image(lm.resolve_image(folder, r["image"], r["id"])), cfg.image_size,
                                          cfg.image_mean, cfg.image_std, pad=cfg.image_aspect_ratio == "pad")
    ids = lambda segs: tokenize_sq(tokenizer, segs, cfg.num_image_tokens, cfg.image_token_id, prompt=True)["input_ids"]
    first = lm.IMAGE_MARKER + "\n" + args.describe_prompt
    model.eval()
    pairs = []
    bs = max(1, args.gen_batch_size // args.n_questions)  # images per batch: n_questions rows each
    for b in tqdm(range(0, len(mine), bs), desc="preferences", disable=rank != 0, leave=False):
        chunk = mine[b:b + bs]
        pix = torch.stack([pixel(r) for _, r in chunk])
        # self-questioning: greedy description, then the VUSER prompt sampled n times (visual_sq.py)
        describe = [ids(sq_segments([("user", first)], set(), tokenizer.eos_token)) for _ in chunk]
        descriptions = lm.generate(model, tokenizer, describe, pix, max_new_tokens=args.describe_max_new_tokens, sync=False)
        q_prompts = [ids(sq_segments([("user", first), ("assistant", d or ".")], set(), tokenizer.eos_token, True))
                     for d in descriptions for _ in range(args.n_questions)]
        q_pix = pix.repeat_interleave(args.n_questions, dim=0)
        questions = sampled(model, tokenizer, q_prompts, q_pix, args.q_max_new_tokens, args.q_temperature,
                            args.q_top_k, args.q_top_p, seed=args.seed * 100003 + rank * 1009 + b)
        # two answers per question with the answer template (model_collectA.py: llava_v1, seeds 40 and 42)
        a_prompts = [lm.tokenize_prompt(tokenizer, [("user", lm.IMAGE_MARKER + "\n" + q)], cfg.template,
                                        cfg.num_image_tokens, cfg.image_token_id, system=answer_system(args))
                     for q in questions]
        answers = [sampled(model, tokenizer, a_prompts, q_pix, args.a_max_new_tokens, args.a_temperature, args.a_top_k,
                           args.a_top_p, seed=s + 1000 * (b + 1) * (rank + 1)) for s in seeds]
        for k, q in enumerate(questions):
            row_index, r = chunk[k // args.n_questions]
            a1, a2 = answers[0][k], answers[1][k]
            if judge is None:
                reply = reference_judge(q, a1, a2, r["refs"])
            else:
                reply = judge(pixel(r), q, a1, a2)
            pair = preference_pair(q, (a1, a2), reply, args.ties, stats)
            if pair is not None:
                pairs.append((row_index, k % args.n_questions,
                              dpo_record(f"{r['id']}_sq{k % args.n_questions}", r["image"], q, *pair)))
    stats["images"] = len(mine)
    stats["questions"] = len(mine) * args.n_questions
    gathered = [None] * world
    dist.all_gather_object(gathered, (pairs, stats))
    merged = sorted((p for part, _ in gathered for p in part), key=lambda t: (t[0], t[1]))
    totals = {}
    for _, s in gathered:
        for key, v in s.items():
            totals[key] = totals.get(key, 0) + v
    stats.clear()
    stats.update(totals)
    return [p for _, _, p in merged], folder


def model_judge(judge_model, tokenizer, args: Args):
    """A local judge VLM (any checkpoint llava_med.load reads) in place of GPT-4o: image + judge_content, sampled at
    the released temperature 0.2, seeded."""
    cfg = judge_model.config
    calls = [0]

    def judge(pixel_values, question, answer1, answer2) -> str:
        turns = lm.place_image_markers([("user", judge_content(question, answer1, answer2))], 1)
        prompt = lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)
        calls[0] += 1
        return lm.generate(judge_model, tokenizer, [prompt], pixel_values[None], max_new_tokens=args.judge_max_new_tokens,
                           temperature=args.judge_temperature, seed=args.seed + calls[0], sync=False)[0]

    return judge


# ----------------------------------------------------------------------------------------------------------
# 3. DPO data and loss (blocks of dpo.py)
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


# Copied from dpo.py: collate_pairs
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


class AnswerPairData(PairData):
    """dpo.py's PairData (validation, images opened once, skips counted) with the pairs tokenised under the answer
    template's system prompt when it is not the template's own."""

    def __init__(self, records, image_folder: Path, tokenizer, cfg, max_length: int, skip_bad: bool, system=None):
        self.system = system
        super().__init__(records, image_folder, tokenizer, cfg, max_length, skip_bad)

    def _tokenize(self, where, rec, tokenizer, max_length):
        item = super()._tokenize(where, rec, tokenizer, max_length)
        if self.system is not None:
            cfg = self.cfg
            for key, turns, n in zip(("chosen", "rejected"), pair_turns(rec, where),
                                     (len(item["images"]), len(item["rejected_images"]))):
                item[key] = lm.tokenize_conversation(tokenizer, lm.place_image_markers(turns, n, where), cfg.template,
                                                     cfg.num_image_tokens, cfg.image_token_id, max_length, where,
                                                     system=self.system)
        return item


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
# 4. Model setup: cluster projector, LoRA on the LLM and on the ViT, FSDP2
# ----------------------------------------------------------------------------------------------------------


# Copied from dpo.py: LORA_TARGETS
LORA_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# every linear layer of CLIP's encoder (find_all_linear_names on the tower: q/k/v/out_proj, fc1, fc2)
VIT_LORA_TARGETS = r".*vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


# Copied from dpo.py: add_lora
def add_lora(model, r: int, alpha: int, dropout: float):
    """LoRA (peft) on every linear layer of the language model's decoder (attention + MLP), nothing in the vision
    tower, projector or lm_head (MMed-RAG / MMedPO / STLLaVA-Med: all LM linear layers)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(config, model)
    model.lora_config = config
    return model


def add_vit_lora(model, r: int, alpha: int, dropout: float):
    """LoRA on the vision tower (spec 4.4). merged_copy merges every LoRA layer with the one scale alpha / r of
    model.lora_config, so the ViT adapter must share it with the LLM's (32/64 and 128/256 both give 2)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=VIT_LORA_TARGETS, bias="none")
    llm = getattr(model, "lora_config", None)
    if llm is not None and llm.lora_alpha / llm.r != alpha / r:
        raise ValueError(f"ViT LoRA scale {alpha}/{r} differs from the LLM's {llm.lora_alpha}/{llm.r}")
    with warnings.catch_warnings():  # peft warns that a second injection adds adapters: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model)
    model.lora_config = llm or config
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


def use_cluster_projector(args: Args, model):
    """Put the cluster projector in (a new one, optionally with SQ-LLaVA's pretrained weights), or keep the model's."""
    cfg = model.config
    kind = args.projector
    if kind == "auto":
        kind = "keep" if cfg.projector_type.startswith("cluster") else ("cluster8" if args.model == "tiny" else "cluster")
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


def set_trainable_stage1(model, args: Args):
    """Stage 1 trains the LLM (full or its LoRA), the whole projector, and the ViT LoRA; trained weights in fp32."""
    for n, p in model.named_parameters():
        if n.startswith("projector."):
            train = True
        elif n.startswith("vision_tower."):
            train = "lora_" in n
        else:
            train = ("lora_" in n) if args.train_llm == "lora" else True
        p.requires_grad_(train)
        if train:
            p.data = p.data.float()


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


# Copied from dpo.py: full_tensor
def full_tensor(t):
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


def save_llava_original(model, tokenizer, out_dir) -> Path:
    """The model in the original LLaVA layout (config model_type llava_<lm>, mm_projector_type, keys
    model.mm_projector.*, model.vision_tower.vision_tower.vision_model.*, model.*, lm_head.*), which
    llava_med.load reads back. llava-hf has no cluster projector, so this is how a stage-1 model is kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("position_ids", "inv_freq")):
            continue
        if k.startswith("vision_tower."):
            name = "model.vision_tower.vision_tower.vision_model." + k[len("vision_tower."):].removeprefix("vision_model.")
        elif k.startswith("projector."):
            name = "model.mm_projector." + k[len("projector."):]
        elif k.startswith("language_model.model."):
            name = "model." + k[len("language_model.model."):]
        else:
            name = k[len("language_model."):]
        sd[name] = v.detach().to("cpu").contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    text = cfg.text_config.to_dict()
    for key in ("_attn_implementation", "_attn_implementation_autoset", "architectures", "model_type"):
        text.pop(key, None)
    base = cfg.text_config.model_type
    raw = {**text, "model_type": f"llava_{base}", "architectures": [f"Llava{base.capitalize()}ForCausalLM"],
           "mm_projector_type": cfg.projector_type, "mm_vision_tower": "vision_tower",
           "mm_hidden_size": cfg.vision_config.hidden_size, "mm_vision_select_layer": cfg.vision_feature_layer,
           "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
           "image_aspect_ratio": cfg.image_aspect_ratio, "tokenizer_model_max_length": cfg.max_length,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    (out / "config.json").write_text(json.dumps(raw, indent=1, default=str))
    cfg.vision_config.save_pretrained(out / "vision_tower")
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. Checkpoints and batching (blocks of dpo.py)
# ----------------------------------------------------------------------------------------------------------


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


def make_optimizer(model, groups: dict[str, float], device):
    """AdamW with one parameter group per part (name prefix -> lr), as LLaVA's trainer does for mm_projector_lr and
    vision_tower_lr; prefix "" catches the rest."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for prefix, lr in groups.items():
        if prefix:
            names = [n for n in params if n.startswith(prefix)]
        else:
            names = [n for n in params if not any(n.startswith(q) for q in groups if q)]
        if names:
            out.append({"params": [params[n] for n in names], "lr": lr})
    return torch.optim.AdamW(out, weight_decay=0.0, betas=(0.9, 0.999), fused=device.type == "cuda")


def run_steps(args: Args, name: str, model, n_items: int, batch_size: int, micro: int, epochs: float, optimizer,
              step_fn, rank: int, world: int, log) -> None:
    """The loop both stages share: global batches of a seeded shuffle, this rank's micro-batches, gradient sync on
    the last one, clipping, a non-finite check (same verdict on every rank), resumable checkpoints in out/<name>.
    step_fn(idx list per micro-batch, epoch) runs forward + backward of all micro-batches and returns summed stats."""
    out = Path(args.out) / name
    steps_per_epoch = n_items // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: {n_items} samples is less than one global batch ({batch_size})")
    if batch_size % (micro * world):
        raise ValueError(f"{name}: batch size {batch_size} must be a multiple of {micro} x {world} ranks")
    total = max(1, int(steps_per_epoch * epochs))
    scheduler = cosine_schedule(optimizer, total, args.warmup_ratio)
    step = 0
    resume_from = latest_checkpoint(out) if args.resume else None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, rank)["step"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=step, desc=name, disable=rank != 0)
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        batch_idx = global_batches(n_items, batch_size, epoch, args.seed + len(name))[k]
        model.train()
        stats = step_fn(my_micro_batches(batch_idx, micro, rank, world), epoch)
        keys = sorted(stats)
        totals = torch.stack([stats[key].detach().float().cpu() for key in keys])
        dist.all_reduce(totals)
        stats = dict(zip(keys, totals.tolist()))
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf")))
        if not torch.isfinite(grad_norm) or not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"{name}: non-finite loss or gradient at step {step + 1}: {stats}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n = stats.pop("n")
        row = {"phase": name, "step": step, "epoch": epoch, **{key: v / n for key, v in stats.items()},
               "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if args.save_every and step % args.save_every == 0 and step < total:
            save_checkpoint(out, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)
    bar.close()
    save_checkpoint(out, step, model, optimizer, scheduler, {"args": dataclasses.asdict(args)}, rank)


# ----------------------------------------------------------------------------------------------------------
# 6. Stage 1: self-questioning SFT
# ----------------------------------------------------------------------------------------------------------


def train_sft(args: Args, model, tokenizer, data: SQData, device, rank: int, world: int, log) -> None:
    """Token cross-entropy over answer AND VUSER-question tokens, summed and divided by the number of target tokens
    in the whole global batch (every target token weighs the same however the batch is split; LLaVA averages per
    micro-batch)."""
    optimizer = make_optimizer(model, {"projector.": args.projector_lr, "vision_tower.": args.vit_lr, "": args.sft_lr},
                               device)

    def step_fn(micro: list[list[int]], epoch: int) -> dict:
        samples = [[data.sample(i, epoch) for i in idx] for idx in micro]
        n_tokens = torch.tensor(float(sum(sum(t != lm.IGNORE_INDEX for t in s["labels"][1:]) for mb in samples for s in mb)))
        dist.all_reduce(n_tokens)  # target tokens of the global batch
        loss_sum = torch.zeros(())
        for m, mb in enumerate(samples):
            model.set_requires_gradient_sync(m == len(samples) - 1)  # reduce gradients once per step
            loss, _ = sft_loss_sum(model, to_device(data.batch(mb, tokenizer.pad_token_id), device))
            (loss * world / n_tokens.item()).backward()  # FSDP averages over ranks: x world makes it the global mean
            loss_sum += loss.detach().float().cpu()
        return {"loss": loss_sum, "n": n_tokens / world}  # summed over ranks: n_tokens once

    run_steps(args, "stage1", model, len(data), args.batch_size, args.micro_batch_size, args.sft_epochs, optimizer,
              step_fn, rank, world, log)


# ----------------------------------------------------------------------------------------------------------
# 7. Stage 2: DPO against the frozen stage-1 model
# ----------------------------------------------------------------------------------------------------------


def policy_and_reference_features(model, pixel_values, vit_adapted: bool):
    """Projected image features for the policy and for the reference. Each distinct image is encoded once for the
    policy; with ViT LoRA the reference needs its own tower pass with the adapters off (the stage-1 ViT), without it
    the frozen tower and projector give the reference the same features."""
    if pixel_values is None:
        return None, None
    if vit_adapted:
        with torch.no_grad(), adapters_off(model):
            ref = model.encode_images(pixel_values)
    policy = model.encode_images(pixel_values)
    return policy, (ref if vit_adapted else policy.detach())


def train_dpo(args: Args, model, tokenizer, data: PairData, device, rank: int, world: int, log) -> None:
    optimizer = make_optimizer(model, {"vision_tower.": args.dpo_vit_lr, "": args.dpo_lr}, device)
    vit_adapted = any(p.requires_grad for n, p in model.named_parameters() if n.startswith("vision_tower."))

    def step_fn(micro: list[list[int]], epoch: int) -> dict:
        sums = {}
        for m, idx in enumerate(micro):
            model.set_requires_gradient_sync(m == len(micro) - 1)
            batch = to_device(collate_pairs(data, idx, tokenizer.pad_token_id), device)
            feats, ref_feats = policy_and_reference_features(model, batch["pixel_values"], vit_adapted)
            logps, _ = sequence_logps(model, batch, feats)
            with torch.no_grad(), adapters_off(model):  # the reference: the frozen stage-1 weights
                ref, _ = sequence_logps(model, batch, ref_feats)
            B = len(idx)
            losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], args.beta)
            (losses.sum() * world / args.dpo_batch_size).backward()  # the mean over the global batch after FSDP's average
            for key, v in {"loss": losses.detach().sum(), "rewards_chosen": rc.sum(), "rewards_rejected": rr.sum(),
                           "margin": (rc - rr).sum(), "accuracy": (rc > rr).float().sum(), "n": torch.tensor(float(B))}.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
        return sums

    run_steps(args, "stage2_dpo", model, len(data), args.dpo_batch_size, args.dpo_micro_batch_size, args.dpo_epochs,
              optimizer, step_fn, rank, world, log)


# ----------------------------------------------------------------------------------------------------------
# 8. Evaluation (blocks of dpo.py: LLaVA-Med's normalisation, closed accuracy, open recall; greedy decoding)
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


def evaluate_vqa(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, rank: int, world: int,
                 device, closed_scoring: str = "strict", desc: str = "eval", system=None) -> tuple[dict, list[dict]]:
    """dpo.py's evaluate_vqa with the answer template's system prompt: greedy answers for every row (ranks take
    interleaved shares, padded to equal batch counts so sharded forwards stay in step), gathered and scored."""
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
            prompts.append(lm.tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id,
                                              system=system))
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


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = resolve_defaults(parse_args(Args, argv))
    t_start = time.time()
    rank, world, device = setup_distributed(args.dist_timeout_s)
    master = rank == 0
    out = Path(args.out)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"sft", "prefs", "dpo", "eval"}
    if unknown:
        raise ValueError(f"--stages: unknown {sorted(unknown)} (sft, prefs, dpo, eval)")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"stllava_med.py: {world} rank(s) on {device.type}; stages {stages}; args in {out / 'args.json'}")

    def log(row: dict):
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    torch.manual_seed(args.seed)
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, seed=args.seed)
    model.config.template = args.template
    use_cluster_projector(args, model)
    frozen_dtype = next(model.vision_tower.parameters()).dtype
    eval_rows = read_vqa(args.eval_data, args.eval_image_folder)[: args.eval_limit or None] if "eval" in stages else []
    results = {}

    def evaluate(name: str):
        results[name], preds = evaluate_vqa(model, tokenizer, eval_rows, args.eval_batch_size, args.eval_max_new_tokens,
                                            rank, world, device, args.closed_scoring, f"eval {name}", answer_system(args))
        log({"phase": f"eval_{name}", **results[name]})
        if master:
            print(f"{name}:", json.dumps(results[name]))
            (out / f"predictions_{name}.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))

    # ---- stage 1: visual self-questioning SFT
    if "sft" in stages:
        data = SQData(*sft_records(args), tokenizer, model.config, args)
        if master:
            print(f"stage 1: {len(data)} conversations, sq_r {args.sq_r}" + (f", skipped {data.skipped}" if data.skipped else ""))
        if args.train_llm == "lora":
            add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
        if args.vit_lora:
            add_vit_lora(model, args.vit_lora_r, args.vit_lora_alpha, args.vit_lora_dropout)
        set_trainable_stage1(model, args)
        shard(model, device, args.activation_checkpointing)
        if eval_rows and args.eval_before:
            evaluate("base")
        train_sft(args, model, tokenizer, data, device, rank, world, log)
        if eval_rows:
            evaluate("sft")
        # the stage-1 model, LoRA merged, unsharded: the preference generator, DPO's start and its reference
        state = {n: full_tensor(p.detach()).cpu() for n, p in model.state_dict().items()}  # every rank gathers
        model = merged_copy(model, state).to(device=device, dtype=frozen_dtype)
        if master:
            save_llava_original(model, tokenizer, out / "stage1_model")
            print(f"stage-1 model: {out / 'stage1_model'}")

    # ---- preference data from the stage-1 model
    prefs_path = Path(args.prefs_out or out / "stllava_med_dpo.json")
    dpo_folder = None
    if "prefs" in stages:
        judge = None
        if args.judge != "reference":
            judge_model, judge_tok = lm.load(args.judge, dtype=args.dtype, device=device)
            judge = model_judge(judge_model.eval(), judge_tok, args)
        stats = {}
        pairs, folder = generate_preferences(args, model.eval(), tokenizer, rank, world, stats, judge)
        results["prefs"] = {"pairs": len(pairs), **stats}
        log({"phase": "prefs", **results["prefs"]})
        if master:
            prefs_path.parent.mkdir(parents=True, exist_ok=True)
            prefs_path.write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
            print(f"preference pairs: {len(pairs)} -> {prefs_path}; {json.dumps(stats)}")
        if not pairs and "dpo" in stages and not args.dpo_data:
            raise lm.DataError(f"the prefs stage produced no preference pair ({json.dumps(stats)}); stage 2 has no data")
        if not args.dpo_data:
            dpo_folder = folder  # the generated pairs name images relative to the prefs images' folder

    # ---- stage 2: DPO (policy = stage-1 model + new LoRA; reference = the same with adapters off)
    if "dpo" in stages:
        dpo_path = Path(args.dpo_data or prefs_path)
        records = lm.read_records(dpo_path)
        folder = dpo_folder or Path(args.image_folder or dpo_path.parent)
        model.requires_grad_(False)
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
        if args.vit_lora:
            add_vit_lora(model, args.vit_lora_r, args.vit_lora_alpha, args.vit_lora_dropout)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if p.requires_grad:
                p.data = p.data.float()
        data = AnswerPairData(records, folder, tokenizer, model.config, args.max_length, args.skip_bad_samples,
                              answer_system(args))
        if master:
            print(f"stage 2: {len(data)} preference pairs" + (f", skipped {data.skipped}" if data.skipped else ""))
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        shard(model, device, args.activation_checkpointing)
        if eval_rows and args.eval_before and "sft" not in stages:
            evaluate("sft")  # the policy before DPO is the stage-1 model (LoRA B = 0)
        train_dpo(args, model, tokenizer, data, device, rank, world, log)
        if eval_rows:
            evaluate("dpo")
        state = {n: full_tensor(p.detach()).cpu() for n, p in model.state_dict().items()}
        if master:
            save_llava_original(merged_copy(model, state), tokenizer, out / "stage2_model")
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
    try:
        main()
    except lm.DataError as e:  # bad data: say which file and record, without a traceback through torch
        print(f"stllava_med.py: bad data: {e}\n(--skip-bad-samples counts and skips such records)", file=sys.stderr)
        sys.exit(2)
