"""huatuo_vision.py -- HuatuoGPT-Vision (Chen et al. 2024, arXiv 2406.19280): PubMedVision data building, two-stage
LLaVA-1.5-style SFT, zero-shot multiple-choice evaluation.

    # embedded default: build PubMedVision-style records from data/toy/captions.json with the toy reformatter,
    # stage 1, stage 2 on them, evaluate on data/toy/test_mc.json (CPU, one process, ~4 min on 2 cores)
    python huatuo_vision.py
    # the paper's native-caption baseline: the same filtered captions, unreformatted, as answers in both stages
    python huatuo_vision.py --pubmedvision-data raw
    # one stage on real data (PubMedVision + LLaVA mix), 8 GPUs; the non-medical-image filter needs a local CLIP
    torchrun --nproc-per-node=8 huatuo_vision.py --stages 1 --model /ckpt/llava-v1.5-base \\
        --train-data PubMedVision_Alignment_VQA.json,llava_558k.json --image-folder /data/images --out runs/hv1
    torchrun --nproc-per-node=8 huatuo_vision.py --stages 2 --model runs/hv1/llava_hf \\
        --train-data PubMedVision_InstructionTuning_VQA.json,llava_mix665k.json --image-folder /data/images --out runs/hv2
    torchrun --nproc-per-node=8 huatuo_vision.py --stages build --source pmc_pairs.json --reformat-model /ckpt/vlm \\
        --image-filter-model /ckpt/clip-vit-large-patch14-336 --out runs/pmv
    # evaluate a checkpoint only (no training data is read); every flag: python huatuo_vision.py --help
    torchrun --nproc-per-node=8 huatuo_vision.py --eval-only --model /ckpt/HuatuoGPT-Vision-7B \\
        --eval-data medical_multimodel_evaluation_data.json --eval-image-folder /data/eval_images

The method, as in the paper (Sec. 3, App. B-E):
  1. PubMedVision building from image-caption(+inline context) pairs: keep captions with >= N medical terms (a
     lexicon), images of at least S px that a CLIP classifier calls medical, drop near-duplicate captions (embedding
     cosine), then "unblinded" reformatting: a VLM sees the image(s) and the context inside <reference>...</reference>
     and writes a description and a Q&A pair in one of the scenario styles. Alignment-VQA = (a fixed describe-
     question, description); Instruction-VQA = (the generated question, answer). Malformed generations are counted
     and skipped. (--reformat-model tiny: data/toy_oracles.py ToyReformatter, an offline stand-in, toy images only.)
  2. Stage 1 (alignment): train the projector only (lr 1e-3, LLaVA-1.5) on captions + Alignment-VQA.
     Stage 2 (instruction tuning): train the LLM and projector (full or LoRA), lr 2e-5, on instructions +
     Instruction-VQA. Loss: token cross-entropy summed over the answer tokens and divided by the number of answer
     tokens of the whole global batch (sft_loss_sum and the training loop, copied from dpo.py).
  3. Evaluation: multiple choice, zero-shot, prompt "{question}\\nA. ...\\nB. ...\\nAnswer with the option's letter from
     the given choices directly."; the answer letter is matched in three steps (letter, then option text, then the
     closest option); accuracy per dataset and overall.
Template: `huatuo` ("<|user|>\\n...\\n<|assistant|>\\n", EOS ends answers; llava_med.TEMPLATES) for HuatuoGPT-Vision
checkpoints; the tiny model keeps its own (mistral_instruct) unless --template is given. Images are converted to RGB
before padding, as the released cli.py and LLaVA's trainer do (llava_med.load_image keeps grey images grey).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import difflib
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data building (every field above `stages` keys the built-records cache in --out)
    source: str = "data/toy/captions.json"  # image-caption records: {"id","image","caption"|"report","context"?,"modality"?,"body_part"?}
    source_image_folder: str = ""  # images of --source ("" = its folder)
    lexicon: str = "data/medical_terms.txt"  # medical terms, one per line (the paper uses UMLS SPECIALIST + GPT-4 cleanup)
    min_medical_terms: int = 3  # keep captions with at least this many distinct lexicon terms (paper: 5, with UMLS)
    min_image_side: int = -1  # drop images smaller than this (paper: 336); -1 = 336, or 32 for the toy set's 64 px images
    image_filter_model: str = ""  # local CLIP folder (CLIPModel + CLIPProcessor) for the non-medical-image filter ("" = off)
    image_filter_threshold: float = 0.5  # keep an image when the zero-shot P(medical) is at least this
    dedup_threshold: float = 0.95  # drop a caption whose cosine similarity to a kept one is at least this
    reformat_model: str = "tiny"  # the VLM that rewrites captions: a checkpoint llava_med.load reads (= --model: that one), or "tiny" = the offline TOY reformatter (ToyReformatter: reads a toy image's findings, like the toy judges of the preference methods)
    reformat_max_new_tokens: int = 128  # generation budget of the reformatter
    toy_malformed_rate: float = 0.1  # share of the toy reformatter's replies it makes malformed (seeded; exercises the malformed counter)
    model: str = "tiny"  # "tiny" or a checkpoint folder; stage 2 continues from stage 1's weights in the same run
    template: str = ""  # chat template override ("" = the checkpoint's)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    seed: int = 0  # same seed + same data = same run (also the reformatter's scenario choice)
    stages: str = "build,1,2,eval"  # comma list of: build (PubMedVision records), 1 (alignment), 2 (instruction), eval
    pubmedvision_data: Literal["built", "raw"] = "built"  # what the filtered captions add to the stages: built = Alignment-VQA (1) and Instruction-VQA (2); raw = the paper's native-caption baseline, (describe-question, caption) in both
    # training
    train_data: str = ""  # extra LLaVA-format json/jsonl files for both stages, comma-separated ("" = none: the built records only; "toy" = the toy stand-ins of LLaVA-558K / LLaVA-mix, data/toy_readers.py toy_sft_records)
    image_folder: str = ""  # images of --train-data ("" = each file's folder)
    max_length: int = 512  # tokens per sample, image tokens included (a 6-image sample needs 6 x 576 on LLaVA-1.5)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    lr1: float = 1e-3  # stage 1 learning rate (projector only; LLaVA-1.5 pretrain)
    lr2: float = -1  # stage 2 learning rate; -1 = 2e-5 (paper), or 1e-3 for --model tiny (random weights)
    lora: bool = False  # stage 2 with LoRA on the LLM instead of full fine-tuning (the projector trains in both)
    lora_r: int = 128  # LoRA rank of --lora
    lora_alpha: int = 256  # LoRA alpha of --lora
    lora_dropout: float = 0.05  # LoRA dropout of --lora (LLaVA's train.py default)
    epochs1: float = -1  # stage 1 epochs (fractional allowed); -1 = 1 (paper), or 2 for --model tiny (a random LM: the projector alone moves little)
    epochs2: float = -1  # stage 2 epochs; -1 = 1 (paper), or 72 for --model tiny (864 steps on the built records; 72 > 36 on val_mc; <= 5 min)
    batch_size: int = 16  # samples per optimizer step over all ranks (global)
    warmup_ratio: float = 0.03  # linear warmup, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay (LLaVA-1.5: 0)
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # samples per forward on one rank; accumulation = batch / (micro * ranks)
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"  # transformers attention kernel (sdpa: flash/mem-efficient on GPU)
    compile: bool = False  # torch.compile each decoder layer (GPU: faster steps after a one-off compile)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # output
    out: str = "runs/huatuo_vision"  # built data, checkpoints (out/stage1, out/stage2), metrics.jsonl, llava_hf/, results
    save_every: int = 0  # checkpoint every N steps within a stage (0 = at the end of the stage)
    resume: bool = True  # continue a stage from its newest complete checkpoint made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    # evaluation
    eval_only: bool = False  # only evaluate --model on --eval-data (= --stages eval: nothing is built or trained)
    eval_data: str = "data/toy/test_mc.json"  # HuatuoGPT eval json, or VQA-RAD / SLAKE (closed questions as [yes, no])
    eval_image_folder: str = ""  # images of --eval-data ("" = next to it)
    eval_limit: int = 0  # first N questions (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_before: bool = True  # also evaluate the starting model
    mc_scoring: Literal["ours", "huatuo"] = "ours"  # answer-letter matcher: ours, or huatuo = the released match_choice3 (paper numbers)


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
# 1. PubMedVision data building: filters -> dedup -> unblinded reformatting
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
# zero-shot classes of the non-medical-image filter; the paper's "non-medical" examples are charts and the like
MEDICAL_PROMPTS = ("a medical image", "a radiology scan", "a microscopy image of tissue", "a clinical photograph")
NON_MEDICAL_PROMPTS = ("a non-medical image", "a chart or a plot", "a diagram or a flowchart", "a photograph of everyday things")


def load_lexicon(path: str) -> list[str]:
    if not Path(path).is_file():
        raise lm.DataError(f"{path}: lexicon file not found")
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


class MedicalImageFilter:
    """The paper drops non-medical images (charts etc.) with a classifier on a CLIP image encoder, trained on 1K
    hand-labelled and 10K GPT-4V-labelled images (91 % val. accuracy; not released). This is its zero-shot stand-in
    with a CLIP model from a local folder (transformers' CLIPModel + CLIPProcessor, safetensors, no download):
    P(medical) = CLIP's softmax over all prompts (logit_scale x cosine), summed over the medical prompts.
    __call__(paths) -> [is medical]; images are opened as RGB."""

    def __init__(self, path: str, device, threshold: float = 0.5, medical=MEDICAL_PROMPTS, non_medical=NON_MEDICAL_PROMPTS,
                 batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        if not (Path(path) / "config.json").is_file():
            raise lm.ModelError(f"{path}: no config.json (--image-filter-model takes a local CLIPModel + CLIPProcessor folder)")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise lm.ModelError(f"{path}: cannot load a CLIP model and processor ({type(e).__name__}: {str(e)[:200]})") from None
        self.device, self.threshold, self.batch_size = device, threshold, batch_size
        self.prompts, self.n_medical = list(medical) + list(non_medical), len(medical)

    @torch.no_grad()
    def p_medical(self, paths: list) -> torch.Tensor:
        out = [torch.zeros(0)]
        for s in range(0, len(paths), self.batch_size):
            images = [lm.load_image(p).convert("RGB") for p in paths[s:s + self.batch_size]]
            inputs = self.processor(text=self.prompts, images=images, return_tensors="pt", padding=True).to(self.device)
            probs = self.model(**inputs).logits_per_image.float().softmax(-1)
            out.append(probs[:, :self.n_medical].sum(-1).cpu())
        return torch.cat(out)

    def __call__(self, paths: list) -> list[bool]:
        return (self.p_medical(paths) >= self.threshold).tolist()


def filter_sources(records, lexicon, min_terms: int, min_side: int, folder: Path, dedup_threshold: float, stats: dict,
                   is_medical=None):
    """The PubMedVision filters (paper Sec. 3.1) in order: medical terms in the caption (the paper counts the
    caption's terms; the inline context is not counted), image size, non-medical images (when a classifier
    `is_medical(paths) -> [bool]` is given; a record goes when any of its images is non-medical), near-duplicate
    captions. Returns [(where, record, caption)]; `stats` counts what each filter removed."""
    for reason in ["no caption or image", "too few medical terms", "image too small"] + (["non-medical image"] if is_medical else []):
        stats.setdefault(reason, 0)
    kept = []
    for where, rec in records:
        caption = rec.get("caption") or rec.get("report") or ""
        images = [lm.resolve_image(folder, p, where) for p in lm.record_images(rec, where)]
        if not caption or not images:
            stats["no caption or image"] += 1
        elif count_medical_terms(caption, lexicon) < min_terms:
            stats["too few medical terms"] += 1
        elif min(min(lm.load_image(p).size) for p in images) < min_side:
            stats["image too small"] += 1
        else:
            kept.append((where, rec, caption, images))
    if is_medical is not None:  # one batched pass over the images of every record still kept
        verdicts = iter(is_medical([p for *_, images in kept for p in images]))
        medical = [all([next(verdicts) for _ in images]) for *_, images in kept]
        stats["non-medical image"] += medical.count(False)
        kept = [k for k, ok in zip(kept, medical) if ok]
    keep = dedup([c for _, _, c, _ in kept], dedup_threshold)
    stats["near-duplicate caption"] = stats.get("near-duplicate caption", 0) + len(kept) - len(keep)
    return [kept[i][:3] for i in keep]


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


def raw_caption_records(sources, folder: Path, seed: int) -> list[dict]:
    """The paper's native-caption baseline (Sec. 4, data-quality comparison): the filtered captions as they are,
    answers to a describe-question (q' of Alignment-VQA), in the same release format as the built records."""
    rng = random.Random(seed)
    out = []
    for where, rec, caption in sources:
        images = [str(lm.resolve_image(folder, p, where)) for p in lm.record_images(rec, where)]
        q = rng.choice(MULTI_IMAGE_QUESTIONS if len(images) > 1 else ALIGNMENT_QUESTIONS)
        out.append({"id": f"Raw_caption_{len(out)}", "image": images, "modality": rec.get("modality", ""),
                    "body_part": rec.get("body_part", ""), "conversations": [
                        {"from": "human", "value": q}, {"from": "gpt", "value": caption}]})
    return out


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
        meta = {"image": images, "modality": rec.get("modality", ""), "body_part": rec.get("body_part", "")}
        alignment.append({"id": f"Alignment_VQA_{len(alignment)}", **meta, "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": parsed["Image_description"]}]})
        instruction.append({"id": f"Instruction_VQA_{len(instruction)}", **meta, "conversations": [
            {"from": "human", "value": parsed["QA-query"]}, {"from": "gpt", "value": parsed["QA-answer"]}]})
    return alignment, instruction


def build_stage(args: Args, model, tokenizer, device, rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """Filters and reformatting (every rank filters the same records; lm.generate_sharded shares the generations
    out and gathers them, so the records do not depend on the number of ranks). Cached: out/pubmedvision_*.json are
    reused when pubmedvision_build.json holds the key of every Args field above `stages` (the source and lexicon files
    by their content, cache_key) on every rank (nodes without a shared --out all rebuild)."""
    records = lm.read_records(args.source)
    lexicon = load_lexicon(args.lexicon)
    key = cache_key(args, "stages")
    meta, names = out / "pubmedvision_build.json", ("alignment", "instruction", "raw")
    have = torch.tensor(float(meta.is_file() and json.loads(meta.read_text()).get("key") == key))  # written last
    if dist.is_initialized():  # reused only when every rank has it (the build runs collectives: all take one branch)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have:
        return ({n: json.loads((out / f"pubmedvision_{n}.json").read_text()) for n in names},
                dict(json.loads(meta.read_text())["build"], cached=True))
    stats, folder = {}, Path(args.source_image_folder or Path(args.source).parent)
    is_medical = MedicalImageFilter(args.image_filter_model, device, args.image_filter_threshold) if args.image_filter_model else None
    sources = filter_sources(records, lexicon, args.min_medical_terms, args.min_image_side, folder, args.dedup_threshold,
                             stats, is_medical)
    del is_medical
    if args.reformat_model == "tiny":  # the toy reformatter: cheap, the same on every rank, nothing to share out
        from data.toy_oracles import ToyReformatter  # the toy's stand-in for the paper's GPT-4V (data/toy_oracles.py)

        generate = ToyReformatter(args.seed, args.toy_malformed_rate)
    else:
        reformatter, rtok = (model, tokenizer) if args.reformat_model == args.model else lm.load(
            args.reformat_model, dtype=args.dtype, device=device, attn_implementation=args.attn_implementation)

        def generate(jobs):  # greedy, 8 prompts per batch
            return lm.generate_sharded(reformatter.eval(), rtok, [{"turns": [("user", p)], "images": imgs} for imgs, p in jobs],
                                       8, rank, world, "reformat", max_new_tokens=args.reformat_max_new_tokens)

    stats.setdefault("malformed generation", 0)
    built = dict(zip(names[:2], build_pubmedvision(sources, folder, generate, args.seed, stats)))
    built["raw"] = raw_caption_records(sources, folder, args.seed)
    summary = {"sources": len(records), "after_filters": len(sources), "alignment_vqa": len(built["alignment"]),
               "instruction_vqa": len(built["instruction"]), "raw_captions": len(built["raw"]), "removed": stats,
               "reformatter": "toy (ToyReformatter)" if args.reformat_model == "tiny" else args.reformat_model,
               "image_filter": args.image_filter_model or "off (no --image-filter-model)"}
    if rank == 0:
        meta.unlink(missing_ok=True)
        for n in names:
            (out / f"pubmedvision_{n}.json").write_text(json.dumps(built[n], indent=1, ensure_ascii=False))
        meta.write_text(json.dumps({"key": key, "build": summary}, indent=1))
    return built, summary


def stage_records(args: Args, built: dict) -> dict:
    """{stage: [(where, record, image folder)]}: the --train-data files (or the toy stand-ins) + the built records
    (or, with --pubmedvision-data raw, the filtered captions as they are)."""
    if not args.train_data:  # only what the build made
        recs = {1: [], 2: []}
    elif args.train_data != "toy":
        extra = [(w, r, Path(args.image_folder or Path(f).parent)) for f in args.train_data.split(",")
                 for w, r in lm.read_records(f)]
        recs = {1: extra, 2: list(extra)}
    else:
        from data.toy_readers import toy_sft_records  # toy-only code lives with the toy

        align, instruct = toy_sft_records(lm.REPO / "data" / "toy" / "train.json", ALIGNMENT_QUESTIONS, mc_prompt)
        recs = {1: [(f"toy captions[{i}]", r, lm.REPO / "data" / "toy") for i, r in enumerate(align)],
                2: [(f"toy instructions[{i}]", r, lm.REPO / "data" / "toy") for i, r in enumerate(instruct)]}
    if args.pubmedvision_data == "raw":  # the native-caption baseline: the same caption pairs in both stages
        recs[1] += [(f"raw captions[{i}]", r, Path("/")) for i, r in enumerate(built["raw"])]
        recs[2] += [(f"raw captions[{i}]", r, Path("/")) for i, r in enumerate(built["raw"])]
    else:
        recs[1] += [(f"built alignment[{i}]", r, Path("/")) for i, r in enumerate(built["alignment"])]
        recs[2] += [(f"built instruction[{i}]", r, Path("/")) for i, r in enumerate(built["instruction"])]
    return recs


def rgb_image(path):
    """HuatuoGPT-Vision's cli.py (get_image_tensors) and LLaVA's train.py open every image with .convert('RGB')
    before expand2square, so a grey image is padded with the mean colour (llava_med.load_image keeps it grey "L",
    which LLaVA-Med pads with grey 114)."""
    return lm.load_image(path).convert("RGB")


class SFTData:
    """Tokenised LLaVA-format records (single or multi image). Bad records raise DataError naming file and record,
    or are counted with skip_bad."""

    def __init__(self, records, tokenizer, cfg, max_length: int, skip_bad: bool):
        self.cfg = cfg

        def tokenized(where, rec, folder):  # images: existence only (opened when a batch loads; see lm.checked_image)
            images = lm.record_images(rec, where)
            paths = [lm.checked_image(folder, p, where, allow_outside=Path(p).is_absolute()) for p in images]
            turns = lm.place_image_markers(lm.record_turns(rec, where), len(images), where)
            s = lm.tokenize_conversation(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id,
                                         max_length, where)
            return {**s, "images": paths}

        self.items, self.skipped, _ = lm.keep_good(records, tokenized, skip_bad, "training record")

    def __len__(self):
        return len(self.items)

    def batch(self, idx: list[int], pad_id: int) -> dict:
        items = [self.items[i] for i in idx]
        b = lm.collate(items, pad_id)
        pix = [lm.image_tensor(self.cfg, rgb_image(p)) for it in items for p in it["images"]]
        b["pixel_values"] = torch.stack(pix) if pix else None
        return b


# ----------------------------------------------------------------------------------------------------------
# 2. Loss, trainable parameters, the training loop (copied from dpo.py) and the SFT step
# ----------------------------------------------------------------------------------------------------------


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


def set_trainable(model, stage: int | None, lora: bool):
    """Stage 1: projector only. Stage 2: projector + LLM (full), or projector + LoRA adapters. None: nothing
    (evaluation). Trained parameters are kept in fp32 (AdamW master weights); the rest stay as loaded (bf16 on
    GPU). Call before sharding: FSDP2 fixes what needs gradients when it wraps the model."""
    for n, p in model.named_parameters():
        train = stage is not None and (n.startswith("projector.") or (
            stage == 2 and (("lora_" in n) if lora else n.startswith("language_model."))))
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


def sft_step(model, data: SFTData, idx: list[int], tokenizer, device) -> dict:
    """One micro-batch: the summed answer-token cross-entropy and its token count (the loop divides by the global
    batch's count), and the tokens processed (for tokens_per_s)."""
    batch = to_device(data.batch(idx, tokenizer.pad_token_id), device)
    loss, n_tokens = sft_loss_sum(model, batch)
    return {"loss": loss, "n": n_tokens, "tokens": batch["attention_mask"].sum().float()}


def train_stage(args: Args, stage: int, model, records, tokenizer, device, rank: int, world: int, log,
                before=None) -> dict:
    """One SFT stage through the copied training loop, checkpoints in out/stage{1,2}. Each stage shuffles its data
    with its own seed (seed + stage); before() runs when it starts afresh (the loop's)."""
    data = SFTData(records, tokenizer, model.config, args.max_length, args.skip_bad_samples)
    if rank == 0:
        print(f"stage {stage}: {len(data)} samples" + (f", skipped {data.skipped}" if data.skipped else ""))
    lr, epochs = (args.lr1, args.epochs1) if stage == 1 else (args.lr2, args.epochs2)
    summary = train(dataclasses.replace(args, seed=args.seed + stage), f"stage{stage}", model, len(data),
                    lambda idx, epoch: sft_step(model, data, idx, tokenizer, device), Path(args.out) / f"stage{stage}",
                    rank, world, log, {"": lr}, args.batch_size, args.micro_batch_size, epochs, before=before)
    return {**summary, "samples": len(data), "skipped_records": data.skipped}


# ----------------------------------------------------------------------------------------------------------
# 3. Multiple-choice evaluation
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
    # the same pattern with the character after the letter only looked at, so that a skipped letter does not use up
    # the cue of the next one ("E B" of four options -> B; finditer on the released pattern would miss it)
    for m in re.finditer(cue.removesuffix(r"(\W|$)") + r"(?=\W|$)", text):
        if m.group(2).upper() in options:  # a letter that names no option ('I think') is not an answer
            return m.group(2).upper()
    found = [(low.rindex(o.lower()) + len(o), len(o), k) for k, o in options.items() if o and o.lower() in low]
    if found:
        return max(found, key=lambda f: f[:2])[2]
    return max(options, key=lambda k: difflib.SequenceMatcher(None, low, options[k].lower()).ratio())


def read_mc(path: str, image_folder: str = "") -> list[dict]:
    """Multiple-choice rows {"question","options","answer_label","dataset_name","images"} from the HuatuoGPT eval json
    (open questions skipped), or from a VQA set lm.read_vqa reads (VQA-RAD, SLAKE English, LLaVA-Med format): its
    closed yes/no questions as [yes, no] choices (the paper reports the closed subsets; spec 3.5)."""
    path = Path(path)
    records = lm.read_records(path)
    if records and all("options" in r for _, r in records):
        folder = Path(image_folder or path.parent)
        return [{"question": r["question"], "options": list(r["options"]), "dataset_name": r.get("dataset_name", path.stem),
                 "answer_label": r.get("answer_label") or LETTERS[r["options"].index(r["answer"])],
                 "images": [str(folder / p) for p in lm.record_images(r, where)]}
                for where, r in records if r.get("question_type") != "open"]
    name = "SLAKE" if records and "img_name" in records[0][1] else "VQA-RAD" if records and "image_name" in records[0][1] else path.stem
    return [{"question": r["question"], "options": ["yes", "no"], "answer_label": "A" if r["answer"].strip().lower() == "yes" else "B",
             "dataset_name": name, "images": [r["image"]]} for r in lm.read_vqa(str(path), image_folder)
            if r["answer_type"].upper() == "CLOSED" and r["answer"].strip().lower() in ("yes", "no")]


def evaluate_mc(model, tokenizer, rows, batch_size: int, rank: int, world: int, desc="eval", scoring: str = "ours",
                chunk_batches: int = 32) -> tuple[dict, list]:
    """Greedy answers (lm.generate_sharded shares the batches out to the ranks and gathers them; images opened as RGB
    one chunk of batches at a time, so a large set is never all in memory; chunks of whole batches give the same
    batches as one call), letter matching (match_choice with `scoring`: "ours" or HuatuoGPT-Vision's "huatuo"),
    accuracy per dataset and overall (the mean over questions, as the released score_mix_llava reports them)."""
    size, preds = batch_size * world * chunk_batches, []
    for s in range(0, len(rows), size):
        jobs = [{"turns": [("user", mc_prompt(r["question"], r["options"]))], "images": [rgb_image(p) for p in r["images"]]}
                for r in rows[s:s + size]]
        preds += lm.generate_sharded(model, tokenizer, jobs, batch_size, rank, world, desc, max_new_tokens=8)
    results, per = [], {}
    for r, pred in zip(rows, preds):
        letter = match_choice(pred, r["options"], scoring)
        results.append({**r, "prediction": pred, "matched": letter, "correct": letter == r["answer_label"]})
        per.setdefault(r["dataset_name"], []).append(letter == r["answer_label"])
    scores = {name: sum(v) / len(v) for name, v in sorted(per.items())}
    scores["overall"] = sum(r["correct"] for r in results) / max(1, len(results))
    scores["n"] = len(results)
    return scores, results


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def resolve_defaults(args: Args) -> Args:
    """The -1 defaults: the paper's values for a real checkpoint, the toy's for --model tiny / the toy source."""
    tiny, toy = args.model == "tiny", Path(args.source).resolve().parent == lm.REPO / "data" / "toy"
    return dataclasses.replace(args, lr2=args.lr2 if args.lr2 > 0 else (1e-3 if tiny else 2e-5),
                               epochs1=args.epochs1 if args.epochs1 > 0 else (2.0 if tiny else 1.0),
                               epochs2=args.epochs2 if args.epochs2 > 0 else (72.0 if tiny else 1.0),
                               min_image_side=args.min_image_side if args.min_image_side >= 0 else (32 if toy else 336))


def main(argv=None):
    args = resolve_defaults(parse_args(Args, argv))
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master = Path(args.out), rank == 0
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"huatuo_vision.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    stages = ["eval"] if args.eval_only else [s.strip() for s in args.stages.split(",") if s.strip()]
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, template=args.template or None,
                               seed=args.seed, attn_implementation=args.attn_implementation)
    results, built = {}, {"alignment": [], "instruction": [], "raw": []}
    if "build" in stages:  # ---- 1. PubMedVision-style records
        built, results["build"] = build_stage(args, model, tokenizer, device, rank, world, out)
        if master:
            print("data building:", json.dumps(results["build"]))
    train_stages = [s for s in (1, 2) if str(s) in stages]
    records = stage_records(args, built) if train_stages else {}
    eval_rows = read_mc(args.eval_data, args.eval_image_folder)[:args.eval_limit or None] if "eval" in stages else []

    def evaluate(name: str):
        results[name], preds = evaluate_mc(model, tokenizer, eval_rows, args.eval_batch_size, rank, world,
                                           name.replace("_", " "), args.mc_scoring)
        log({"phase": f"eval_{name}", **results[name]})
        if master:
            print(f"{name}:", json.dumps(results[name]))
            (out / f"predictions_{name}.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))

    # ---- 2. the two stages. Each stage shards its own copy of the weights: FSDP2 fixes which parameters need
    # gradients when it wraps the model, so the stage-2 trainables cannot be switched on inside the stage-1 shards.
    for k, stage in enumerate(train_stages or [None]):
        if stage == 2 and args.lora:
            torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
            lm.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
        set_trainable(model, stage, args.lora)
        shard(model, device, args.activation_checkpointing, args.compile)
        if stage is None:  # evaluation only
            if eval_rows:
                evaluate("before")
            break
        before = (lambda: evaluate("before")) if k == 0 and eval_rows and args.eval_before else None  # not on resume
        results[f"stage{stage}"] = train_stage(args, stage, model, records[stage], tokenizer, device, rank, world, log,
                                               before)
        if eval_rows:
            evaluate(f"after_stage{stage}")
        # the stage's weights (LoRA merged), unsharded, in the loading dtype: the next stage's start and the export
        frozen_dtype = next(p for n, p in model.named_parameters() if n.startswith("vision_tower.")).dtype
        model = lm.merge_lora(model, lm.full_state_dict(model)).to(device=device, dtype=frozen_dtype)
        if stage == train_stages[-1] and master:
            lm.save_llava_hf(model, tokenizer, out / "llava_hf")
    if master:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
