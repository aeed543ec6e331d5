"""medrega.py -- MedRegA (Wang et al., ICLR 2025, arXiv 2410.18387): region-centric, bilingual instruction tuning and
evaluation on the shared LLaVA model (the paper's backbone is InternVL; the method is the data, the box-in-text
format, the training and the evaluation).

    # embedded default: tiny random LLaVA, Text-to-Region on the toy lesion boxes, CPU, ~5 minutes on 2 cores
    python medrega.py
    # all toy tasks (adds image-level VQA and report, English and Chinese) and regional chain-of-thought for VQA
    python medrega.py --tasks t2r,r2t,grounded,vqa,report --regional-cot
    # the same on 2 CPU processes (gloo) or 8 GPUs (nccl, bf16): same global batch, same result
    torchrun --nproc-per-node=2 medrega.py
    # MedRegInstruct (HF dataset Luxuriant16/MedRegInstruct) on a real checkpoint, full LLM as in the released script
    torchrun --nproc-per-node=8 medrega.py --model /ckpt/llava-med-v1.5-mistral-7b \\
        --data /data/MedRegInstruct/train/text2region.jsonl,/data/MedRegInstruct/train/region2text.jsonl \\
        --image-folder /data/MedRegInstruct --eval-data /data/MedRegInstruct/test/text2region.jsonl \\
        --eval-image-folder /data/MedRegInstruct --lr 1e-5 --epochs 1 --batch-size 128 --micro-batch-size 4 \\
        --max-length 2048 --activation-checkpointing
    # SLAKE boxes (imgs/*/detection.json) and bilingual questions as region + VQA tasks; LoRA instead of full
    python medrega.py --data ../shared/realdata/slake --eval-data ../shared/realdata/slake --tasks t2r,r2t,vqa --lora
    # evaluate a checkpoint only (no training data is read), e.g. the export of a run: runs/medrega/llava_hf
    python medrega.py --eval-only --model runs/medrega/llava_hf --eval-data /data/MedRegInstruct/test/text2region.jsonl \\
        --eval-image-folder /data/MedRegInstruct
    # every flag: python medrega.py --help

The method, as in the paper and the released code (spec section 5):
  1. Boxes are text: `<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box>`, integers 0-999 (round(x / W * 999);
     decoded v / 999 * W, of the image as the model sees it: resized to a square without padding, as InternVL),
     several boxes per object; <ref> </ref> <box> </box> are single added tokens (new lm_head rows at the mean of the
     old rows, input rows N(0, 0.02) as released); the digits stay ordinary text.
  2. Tasks, each with its dataset's base prompt put in front of the question (first user turn =
     "<image>\\n" + base_prompt + " " + question): Region-to-Text (name the boxed object), Text-to-Region (box the
     named object), grounded report (box an organ/lesion and describe it), image-level VQA and report, in English
     and Chinese.
  3. Training: plain next-token cross-entropy on the answers (no box-regression loss), full LLM or LoRA, through the
     training loop copied from dpo.py; optionally the released position-word re-weighting (digits and
     left/right/center/upper/lower answer tokens count twice):  L = sum_t w_t * CE_t / sum_t w_t  over the global batch.
     Box-aware augmentation: the released code applies RandomResizedCrop to region samples without moving the
     boxes; here a crop always keeps every box whole and the coordinates are re-encoded for the crop.
  4. Evaluation: Text-to-Region acc@0.25/0.5/0.75 (IoU > t) and mean IoU; several boxes are matched one-to-one by
     the Hungarian algorithm (cost 1 - IoU) with precision = matched / predicted and recall = matched / ground truth
     (the released evaluator swaps the two names). Region-to-Text: token recall, accuracy = recall >= 0.75, BLEU-1;
     Chinese text is scored by characters; --scoring medrega applies the released evaluators' rules instead.
     Regional chain-of-thought (--regional-cot): detect the regions first, then answer with them in the prompt.
Template: MedRegA's InternVL "Hermes-2" = llava_med's `chatml` for --model tiny; a checkpoint keeps its own unless
--template is given.

SLAKE data: Liu et al., "SLAKE: A Semantically-Labeled Knowledge-Enhanced Dataset for Medical VQA", ISBI 2021,
CC BY 4.0 (https://www.med-vqa.com/slake/).

File layout: Args -> copied CLI blocks -> boxes and tokens -> tasks and readers -> augmentation -> data and loss ->
the copied training loop and the step -> evaluation -> main().
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
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data
    data: str = "data/toy"  # toy folder (train.json with findings boxes), SLAKE folder, or MedRegInstruct json(l)s, comma-separated
    image_folder: str = ""  # images of --data files ("" = each file's folder)
    task: str = ""  # task of MedRegInstruct files: t2r, r2t, grounded, vqa, report ("" = from the file name)
    tasks: str = ""  # tasks built from toy / SLAKE records; "" = t2r for --model tiny, else t2r,r2t,grounded,vqa,report
    eval_data: str = ""  # same kinds as --data ("" = data/toy/test.json when --data is the toy folder)
    eval_image_folder: str = ""  # images of --eval-data ("" = each file's folder, as for --data; --image-folder is not used for it)
    max_length: int = 512  # tokens per sample, image tokens included (released: 2048)
    base_prompt: Literal["auto", "full", "none"] = "auto"  # full = MedRegA's per-task base prompts, none = the question only; auto = none for tiny (~6x shorter samples on CPU)
    skip_bad_samples: bool = False  # count and skip bad records instead of stopping at the first one
    allow_images_outside_folder: bool = False  # accept absolute / '..' image paths that leave the image folder
    # model
    model: str = "tiny"  # "tiny" (random, offline) or a checkpoint folder (LLaVA-Med v1.5, llava-hf, HuatuoGPT-Vision)
    template: str = ""  # chat template ("" = chatml (MedRegA's Hermes-2) for tiny, else the checkpoint's own)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights: auto = bf16 on GPU, fp32 on CPU; trained weights are fp32
    lora: bool = False  # LoRA on the LLM (+ embeddings and lm_head, which hold the new tokens) instead of the full LLM
    lora_r: int = 128  # LoRA rank (InternVL's wrap_llm_lora default is 128 with alpha 2r)
    lora_alpha: int = 256  # LoRA alpha
    lora_dropout: float = 0.05  # LoRA dropout
    train_projector: Literal["auto", "yes", "no"] = "auto"  # auto = yes for tiny, whose projector is random; no = released --freeze_mlp
    new_token_init: Literal["release", "mean"] = "release"  # new <ref>/<box> input rows: release = N(0, initializer_range), or mean (lm_head: mean)
    # loss
    position_weight: float = 1.0  # weight of digit and left/right/center/upper/lower answer tokens (released weightloss: 2)
    # augmentation
    augment: Literal["auto", "yes", "no"] = "auto"  # box-preserving random resized crop; auto = yes (released data_augment=true), no for tiny
    crop_scale_min: float = 0.8  # smallest crop area fraction (RandomResizedCrop scale=(0.8, 1))
    # optimisation
    lr: float = -1  # peak learning rate; -1 = 1e-5 (released), or 1e-3 for --model tiny (random weights)
    epochs: float = -1  # passes over the training samples; -1 = 1 (released), or 40 for --model tiny
    batch_size: int = 16  # samples per optimizer step over all ranks (released: 128)
    warmup_ratio: float = 0.03  # linear warmup fraction, then cosine to 0 (released: 3 %)
    weight_decay: float = 0.05  # AdamW weight decay (released: 0.05)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    seed: int = 0  # same seed + same data = same run (bit-identical on CPU)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    micro_batch_size: int = 8  # samples per forward on one rank; accumulation = batch / (micro * ranks)
    activation_checkpointing: bool = False  # recompute decoder layers in backward (memory for time)
    dist_timeout_s: int = 1800  # a collective waiting longer than this (e.g. on a dead rank) fails instead of hanging
    # output
    out: str = "runs/medrega"  # sft/checkpoints, metrics.jsonl, predictions.json, results.json, llava_hf/ export
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    resume: bool = True  # continue from the newest complete checkpoint in --out made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)
    # evaluation
    eval: bool = True  # evaluate Text-to-Region, Region-to-Text and VQA at the end
    eval_only: bool = False  # only evaluate --model on --eval-data (no training data is read, nothing is trained)
    eval_before: bool = True  # also evaluate the starting model
    eval_limit: int = 0  # first N rows per task (0 = all)
    eval_batch_size: int = 16  # prompts per generate call on one rank
    eval_max_new_tokens: int = 48  # answer length cap (a box answer is ~25 tokens)
    multi_box_iou: float = 0.5  # IoU of a matched pair in multi-box scoring (released, used by --scoring medrega: 0.75 one object, 0.5 several)
    scoring: Literal["default", "medrega"] = "default"  # medrega = the released evaluators' rules (differences: score_t2r_row / _r2t / score_region_vqa)
    regional_cot: bool = False  # also answer the VQA rows with regional chain-of-thought (detect, then answer)


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
# 1. Boxes as text, and the four region tokens
# ----------------------------------------------------------------------------------------------------------

BBOX_SCALE = 999  # the evaluator's scale: coordinates are integers 0..999 (spec 5.3)
REGION_TOKENS = ["<ref>", "</ref>", "<box>", "</box>"]
QUAD = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")  # one [x1, y1, x2, y2]
REGION = re.compile(r"<ref>(.*?)</ref>\s*<box>(.*?)</box>", re.S)  # a named region (the released PATTERN_TARGET_RECAP)
BOX_SPAN = re.compile(r"<box>(.*?)</box>", re.S)


def encode_box(box, width: float, height: float) -> list[int]:
    """Pixel box [x1, y1, x2, y2] -> integers 0..999: round(x / W * 999), round(y / H * 999). Raises ValueError on a
    box that is not 4 finite numbers with x1 <= x2, y1 <= y2 inside the image (a data bug, not something to round)."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"box {box!r} is not 4 finite numbers")
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(f"box {box!r} is not a valid [x1, y1, x2, y2] inside a {width}x{height} image")
    return [round(x1 / width * BBOX_SCALE), round(y1 / height * BBOX_SCALE),
            round(x2 / width * BBOX_SCALE), round(y2 / height * BBOX_SCALE)]


def decode_box(box, width: float, height: float) -> list[float]:
    """Integers 0..999 -> pixel box (the released evaluator's process_box: v / 999 * W, no square padding)."""
    x1, y1, x2, y2 = box
    return [x1 / BBOX_SCALE * width, y1 / BBOX_SCALE * height, x2 / BBOX_SCALE * width, y2 / BBOX_SCALE * height]


def format_boxes(boxes) -> str:
    """[[x1, y1, x2, y2], [x3, ...]] with ", " separators, as in MedRegInstruct."""
    return "[" + ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in boxes) + "]"


def format_region(name: str, boxes) -> str:
    """<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box> (boxes already in 0..999)."""
    return f"<ref>{name}</ref><box>{format_boxes(boxes)}</box>"


def parse_quads(text: str) -> tuple[list[list[int]], int]:
    """Every [x1, y1, x2, y2] integer quadruple in the text -> (valid boxes, number of malformed ones). Valid:
    all in 0..999 with x1 <= x2 and y1 <= y2. Truncated lists simply yield fewer quadruples. The released evaluator
    only accepts a complete '[[..], ..]' list and scores a whole answer as [0, 0, 0, 0] when one box fails to parse;
    here each well-formed box counts on its own."""
    boxes, bad = [], 0
    for m in QUAD.finditer(text):
        b = [int(v) for v in m.groups()]
        if all(0 <= v <= BBOX_SCALE for v in b) and b[0] <= b[2] and b[1] <= b[3]:
            boxes.append(b)
        else:
            bad += 1
    return boxes, bad


def parse_regions(text: str) -> list[tuple[str, list[list[int]]]]:
    """[(name, boxes)] for every <ref>name</ref><box>[[...]]</box> in the text (malformed boxes dropped)."""
    return [(m.group(1).strip(), parse_quads(m.group(2))[0]) for m in REGION.finditer(text)]


def strip_regions(text: str) -> str:
    """Text without box lists and region tags (the Region-to-Text evaluator's cleaning)."""
    text = re.sub(r"\[\[.*?\]\]", "", text, flags=re.S)
    return re.sub(r"</?(ref|box)>", "", text).strip()


def map_boxes(text: str, fn) -> str:
    """Rewrite every box inside <box>...</box> with fn(list of 4 ints) -> list of 4 ints (augmentation)."""
    def one_span(m):
        return "<box>" + QUAD.sub(lambda q: "[" + ", ".join(str(int(v)) for v in fn([int(x) for x in q.groups()])) + "]",
                                  m.group(1)) + "</box>"
    return BOX_SPAN.sub(one_span, text)


def add_region_tokens(model, tokenizer, input_init: str = "release", seed: int = 0) -> int:
    """Add <ref> </ref> <box> </box> as single tokens and grow the LM's embeddings. New lm_head rows = the old rows' mean
    (the released internvl_chat_finetune.py sets only these); input rows: "release" = N(0, initializer_range), seeded,
    what its resize_token_embeddings (InternVL's transformers 4.37.2, _init_weights) leaves, or "mean". Normal (not
    "special") tokens, so decoding with skip_special_tokens keeps them. The new ids take spare rows where the matrix
    has them (llava-hf: 32064 rows for 32002 tokens; Qwen2), else it grows; the means are over the vocabulary's rows
    (not the spare ones), as the release's are. Call before LoRA / sharding; returns how many tokens were added."""
    new = [t for t in REGION_TOKENS if t not in tokenizer.get_vocab()]
    if not new:
        return 0  # a MedRegA checkpoint: its rows are trained
    vocab = len(tokenizer)
    tokenizer.add_tokens(new, special_tokens=False)
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(new))
    llm = model.language_model
    with torch.no_grad():
        mean_in = llm.get_input_embeddings().weight[:vocab].mean(0)
        mean_out = llm.get_output_embeddings().weight[:vocab].mean(0)
        if int(ids.max()) >= llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model.config.text_config.vocab_size = len(tokenizer)  # merged copies and the llava-hf export use it
        normal = torch.randn((len(ids), mean_in.shape[0]), generator=torch.Generator().manual_seed(seed))
        llm.get_input_embeddings().weight[ids] = (mean_in.expand(len(ids), -1) if input_init == "mean" else
                                                  (normal * llm.config.initializer_range).to(mean_in))
        llm.get_output_embeddings().weight[ids] = mean_out
    return len(new)


# ----------------------------------------------------------------------------------------------------------
# 2. Tasks: base prompts (MedRegA's meta_file.json / demo data), builders, readers
# ----------------------------------------------------------------------------------------------------------

_BOX_DEF = ("The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers ranging from 0 to "
            "999. These values correspond to the top left x, top left y, bottom right x, and bottom right y.")
_BOX_FORMAT = ("For each object, please utilize this format to represent the region with its bounding box: "
               "\"<ref>object</ref><box>[[x1, y1, x2, y2]]</box>\".")
BASE_PROMPTS = {  # (task, language) -> base prompt; English ones verbatim from the released meta_file.json
    ("r2t", "en"): "You are a helpful medical assistant. Your task is object recognition. You are required to recognize "
                   "the object in the given region. " + _BOX_DEF,
    ("t2r", "en"): "You are a helpful medical assistant. Your task is object detection. You are required to find all the "
                   "regions of the given objects. " + _BOX_DEF + " " + _BOX_FORMAT[:-1] + ". There might be multiple "
                   "boxes for one object, in which case the format is like \"<ref>object</ref><box>[[x1, y1, x2, y2], "
                   "[x3, y3, x4, y4]]</box>\".",
    ("grounded", "en"): "You are a helpful medical assistant. Your task is report phrase grounding. You are given a chest "
                        "x-ray image, and you are required to locate the region and generate a report for the given "
                        "organ. " + _BOX_DEF + " " + _BOX_FORMAT,
    ("vqa", "en"): "You are a helpful medical assistant. You are required to answer the question based on the medical image.",
    ("report", "en"): "You are a helpful medical assistant. Your task is report generation. You are given a chest x-ray "
                      "image, and you are required to generate a medical report describing the observations and "
                      "diagnosis in the image.",  # iuxray_train_rg
    # Chinese: the in-house lesion-grounding, VQA and report prompts of the bilingual model (spec 5.3)
    ("grounded", "zh"): "你是一个医疗助手，你的任务是定位并描述病种。病种区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。"
                        "这些值分别对应左上角的x，左上角的y，右下角的x和右下角的y。对于每个病种，请使用这种格式用边界框表示区域："
                        "\"<ref>病种</ref><box>[[x1, y1, x2, y2]]</box>：诊断\"。",
    ("vqa", "zh"): "你是一个医疗助手，你需要根据医学图像回答问题。",
    ("report", "zh"): "你是一个医疗助手，你的任务是生成诊断报告。",
}
VQA_SUFFIX = {"en": "Answer the question using a single word or phrase.", "zh": "请用词或短语回答问题。"}
REPORT_QUESTION = {"en": "Please write a report for this medical image.",  # toy stand-in; MIMIC rows bring their own
                   "zh": "请为这张医学影像撰写诊断报告，需包括影像诊断和影像结论两部分。影像诊断描述可见信息，影响结论列举最终的诊断结果。"}
# zh: base prompt + this = the released demo_data/data_file.jsonl id 5, its typo 影响 (for 影像) included
TASK_FILES = {"text2region": "t2r", "regt2r": "t2r", "region2text": "r2t", "regr2t": "r2t", "grounded": "grounded",
              "groundedrg": "grounded", "vqa": "vqa", "_rg": "report"}
REGION_TASKS = ("t2r", "r2t", "grounded")


def sample(sid, image, width, height, task, lang, question, answer, where, modality="") -> dict:
    """The unit of training and evaluation: one image, raw question/answer turns (no base prompt yet), the image's
    size (to de-normalise boxes), the task and language (which base prompt), the modality (regional CoT)."""
    return {"id": sid, "image": str(image), "width": width, "height": height, "task": task, "lang": lang,
            "turns": [("user", question), ("assistant", answer)], "where": where, "modality": modality}


def t2r_question(name: str, modality: str) -> str:
    return f"Please locate <ref>{name}</ref> in this {modality}."


def r2t_question(boxes, modality: str) -> str:
    return f"What is <ref>this</ref><box>{format_boxes(boxes)}</box> in this {modality}?"


def region_samples(sid, image, width, height, objects: dict, modality: str, where: str, tasks, reports=None,
                   names_zh=None) -> list[dict]:
    """Region tasks for one image. objects: name -> pixel boxes (several boxes of one name become one region).
    reports: {"en": text, "zh": text} for grounded report samples; names_zh: English name -> Chinese name."""
    out = []
    enc = {name: [encode_box(b, width, height) for b in boxes] for name, boxes in objects.items()}
    for k, (name, boxes) in enumerate(enc.items()):
        if "t2r" in tasks:
            out.append(sample(f"{sid}_t2r{k}", image, width, height, "t2r", "en", t2r_question(name, modality),
                              format_region(name, boxes), where, modality))
        if "r2t" in tasks:
            for j, b in enumerate(boxes):
                out.append(sample(f"{sid}_r2t{k}_{j}", image, width, height, "r2t", "en", r2t_question([b], modality),
                                  name, where, modality))
    if "grounded" in tasks and reports and reports.get("en") and enc:  # no English report: no grounded sample
        names = list(enc)
        q = "Please locate the region and describe the condition of " + ", ".join(f"<ref>{n}</ref>" for n in names)
        a = ", ".join(format_region(n, enc[n]) for n in names) + ": " + reports["en"]
        out.append(sample(f"{sid}_grounded_en", image, width, height, "grounded", "en", q, a, where, modality))
        if reports.get("zh") and names_zh:
            zh = [names_zh.get(n, n) for n in names]
            q = "请定位并描述这张医学影像中的" + "、".join(f"<ref>{n}</ref>" for n in zh)
            a = "，".join(format_region(z, enc[n]) for z, n in zip(zh, names)) + "：" + reports["zh"]
            out.append(sample(f"{sid}_grounded_zh", image, width, height, "grounded", "zh", q, a, where, modality))
    return out


def toy_samples(path: Path, tasks, image_folder: str = "", allow_outside: bool = False) -> list[dict]:
    """Samples from the toy records: region tasks from `findings` boxes (abnormal images), one VQA question per image
    and language (the k-th image gets its (k mod 6)-th question), and the report in both languages."""
    folder = Path(image_folder or path.parent)
    out = []
    for k, (where, rec) in enumerate(lm.read_records(path)):
        image = lm.resolve_image(folder, rec["image"], where, allow_outside)
        W, H, modality = rec["width"], rec["height"], rec.get("modality", "medical image")
        objects, names_zh = {}, {}
        for f in rec.get("findings", []):
            objects.setdefault(f["name"], []).append(f["box"])
            names_zh[f["name"]] = f.get("name_zh", f["name"])
        try:
            out += region_samples(rec["id"], image, W, H, objects, modality, where, tasks,
                                  {"en": rec.get("report"), "zh": rec.get("report_zh")}, names_zh)
        except ValueError as e:
            raise lm.DataError(f"{where}: {e}") from None
        if "vqa" in tasks and rec.get("qa"):
            qa = rec["qa"][k % len(rec["qa"])]
            out.append(sample(f"{rec['id']}_vqa_en", image, W, H, "vqa", "en", qa["question"], qa["answer"], where,
                              modality))
            if qa.get("question_zh"):
                out.append(sample(f"{rec['id']}_vqa_zh", image, W, H, "vqa", "zh", qa["question_zh"], qa["answer_zh"],
                                  where, modality))
        if "report" in tasks:
            for lang, key in (("en", "report"), ("zh", "report_zh")):
                if rec.get(key):
                    out.append(sample(f"{rec['id']}_report_{lang}", image, W, H, "report", lang, REPORT_QUESTION[lang],
                                      rec[key], where, modality))
    return out


def slake_samples(folder: Path, split: str, tasks) -> list[dict]:
    """SLAKE: region tasks from imgs/<x>/detection.json ([{label: [x, y, w, h]}, ...], pixel xywh) of the split's images,
    and its English and Chinese questions as VQA. Modality comes from the QA rows (CT / MRI / X-Ray)."""
    rows = lm.read_records(folder / f"{split}.json")
    by_image = {}
    for where, r in rows:
        by_image.setdefault(r["img_name"], []).append((where, r))
    out = []
    for img_name, qas in by_image.items():
        image = lm.resolve_image(folder / "imgs", img_name, qas[0][0])
        det_path = image.parent / "detection.json"
        with Image.open(image) as im:
            W, H = im.size
        modality = {"X-Ray": "X-ray", "CT": "CT scan", "MRI": "MRI scan"}.get(qas[0][1].get("modality"), "medical image")
        if det_path.exists() and any(t in tasks for t in REGION_TASKS):
            objects = {}
            for where, d in lm.read_records(det_path):
                for label, xywh in d.items():
                    x, y, w, h = xywh
                    objects.setdefault(label.strip(), []).append([max(0.0, x), max(0.0, y), min(W, x + w), min(H, y + h)])
            try:
                out += region_samples(f"slake_{img_name.split('/')[0]}", image, W, H, objects, modality, str(det_path),
                                      [t for t in tasks if t != "grounded"])
            except ValueError as e:
                raise lm.DataError(f"{det_path}: {e}") from None
        if "vqa" in tasks:
            for where, r in qas:
                lang = "zh" if r.get("q_lang") == "zh" else "en"
                out.append(sample(f"slake_{r.get('qid', where)}", image, W, H, "vqa", lang, r["question"],
                                  str(r["answer"]), where, modality))
    return out


def medreginstruct_samples(path: Path, image_folder: str, task: str, skipped: dict | None = None,
                           allow_outside: bool = False) -> list[dict]:
    """MedRegInstruct jsonl/json rows {"id", "image", "width", "height", "conversations"}; the raw questions carry no
    base prompt (it is per dataset in meta_file.json), so the task says which one: --task, or from the file name."""
    if not task:
        task = next((t for key, t in TASK_FILES.items() if key in path.name.lower()), "")
        if not task:
            raise lm.DataError(f"{path}: cannot tell the task from the file name; pass --task t2r|r2t|grounded|vqa|report")
    folder = Path(image_folder or path.parent)
    out = []
    for where, rec in lm.read_records(path, skipped):
        try:
            turns = lm.record_turns(rec, where)
            if not isinstance(rec.get("width"), (int, float)) or not isinstance(rec.get("height"), (int, float)):
                raise lm.DataError(f"{where}: needs numeric 'width' and 'height' (boxes are de-normalised with them)")
            image = lm.resolve_image(folder, lm.record_images(rec, where)[0], where, allow_outside)
            lang = "zh" if re.search(r"[\u4e00-\u9fff]", turns[0][1]) else "en"
            s = sample(rec.get("id", where), image, rec["width"], rec["height"], task, lang, "", "", where)
            s["turns"] = [(r, t.replace(lm.IMAGE_MARKER, "").strip() if r == "user" else t) for r, t in turns]
            out.append(s)
        except (lm.DataError, IndexError) as e:
            if skipped is None:
                err = lm.DataError(str(e) if isinstance(e, lm.DataError) else f"{where}: no image")
                err.skippable = True  # cli() then suggests --skip-bad-samples
                raise err from None
            skipped["bad record"] = skipped.get("bad record", 0) + 1
    return out


def load_samples(spec: str, image_folder: str, task: str, tasks, split: str, skipped: dict | None = None,
                 allow_outside: bool = False) -> list[dict]:
    """--data / --eval-data: a toy folder (split.json), a SLAKE folder (split.json + imgs/), or comma-separated files."""
    out = []
    for part in [p for p in spec.split(",") if p]:
        p = Path(part)
        if p.is_dir() and (p / "imgs").is_dir():
            out += slake_samples(p, {"test": "test", "train": "train"}[split], tasks)
        elif p.is_dir():
            out += toy_samples(p / f"{split}.json", tasks, image_folder, allow_outside)
        else:
            recs = lm.read_records(p)
            if recs and "findings" in recs[0][1]:
                out += toy_samples(p, tasks, image_folder, allow_outside)
            else:
                out += medreginstruct_samples(p, image_folder, task, skipped, allow_outside)
    return out


def prompt_turns(s: dict, regions_hint: str = "", base_prompt: bool = True) -> list[tuple[str, str]]:
    """The sample's turns with the task's base prompt in front of the first question (training format: "<image>\\n" +
    base_prompt + " " + question, no space in Chinese); VQA questions end with the short-answer instruction."""
    turns = list(s["turns"])
    base = BASE_PROMPTS.get((s["task"], s["lang"])) or BASE_PROMPTS[(s["task"], "en")]
    q = turns[0][1]
    sep = " " if s["lang"] == "en" else ""  # Chinese prompt parts are joined without a space (released demo data 2, 5, 10)
    if s["task"] == "vqa" and VQA_SUFFIX[s["lang"]] not in q:
        q = q + sep + VQA_SUFFIX[s["lang"]]
    turns[0] = ("user", (base + sep if base_prompt else "") + regions_hint + q)
    return lm.place_image_markers(turns, 1, s["where"])


# ----------------------------------------------------------------------------------------------------------
# 3. Box-preserving augmentation
# ----------------------------------------------------------------------------------------------------------


def crop_keeping_boxes(width: int, height: int, boxes_px, rng: random.Random, scale=(0.8, 1.0),
                       ratio=(3 / 4, 4 / 3), tries: int = 10):
    """A crop (left, top, w, h) sampled like torchvision's RandomResizedCrop (area fraction uniform in `scale`, aspect
    ratio log-uniform in `ratio`) but constrained to contain every box whole: the offset is drawn among the positions
    that keep all boxes inside. None when no such crop was found in `tries` (the caller keeps the whole image;
    torchvision's fallback, a centre crop, could cut a box). The released code crops box samples without moving
    the boxes, so its coordinates point at the wrong pixels after the crop."""
    area = width * height
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if not (0 < w <= width and 0 < h <= height):
            continue
        lo_x, hi_x, lo_y, hi_y = 0, width - w, 0, height - h
        for x1, y1, x2, y2 in boxes_px:
            lo_x, hi_x = max(lo_x, math.ceil(x2 - w)), min(hi_x, math.floor(x1))
            lo_y, hi_y = max(lo_y, math.ceil(y2 - h)), min(hi_y, math.floor(y1))
        if lo_x <= hi_x and lo_y <= hi_y:
            return rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y), w, h
    return None


def augment_sample(image: Image.Image, turns, rng: random.Random, scale_min: float = 0.8):
    """Crop the image keeping every box of the conversation whole, and rewrite the boxes for the crop (decode with the
    image's size, shift, encode with the crop's size). Returns (image, turns)."""
    W, H = image.size
    boxes = [decode_box(b, W, H) for _, t in turns for m in BOX_SPAN.finditer(t) for b in parse_quads(m.group(1))[0]]
    crop = crop_keeping_boxes(W, H, boxes, rng, (scale_min, 1.0))
    if crop is None:
        return image, turns
    left, top, w, h = crop

    def move(b):
        x1, y1, x2, y2 = decode_box(b, W, H)
        # the crop contains the box (up to the integer rounding of the 0..999 grid): clamp that sub-pixel slack
        return encode_box([min(max(x1 - left, 0), w), min(max(y1 - top, 0), h),
                           min(max(x2 - left, 0), w), min(max(y2 - top, 0), h)], w, h)

    return image.crop((left, top, left + w, top + h)), [(r, map_boxes(t, move)) for r, t in turns]


# ----------------------------------------------------------------------------------------------------------
# 4. SFT data and loss (position-word re-weighting optional)
# ----------------------------------------------------------------------------------------------------------

POSITION_WORDS = {"right", "left", "center", "upper", "lower"}  # released preprocess_mpt's keys (plus digits)


def position_token_weights(tokenizer, weight: float) -> torch.Tensor | None:
    """Per-vocabulary-id loss weight: `weight` for tokens that are a position word or digits, 1 elsewhere; None when
    weight == 1. Decided per token id (the released code matched the key words' token sequences inside the answer,
    which a BOS in the key tokenisation can break, spec 5.4)."""
    if weight == 1.0:
        return None
    table = torch.ones(len(tokenizer))
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i]).strip().lower()
        if piece in POSITION_WORDS or (piece.isdigit() and piece.isascii()):
            table[i] = weight
    return table


def model_image(image: Image.Image, size: int) -> Image.Image:
    """Plain bicubic resize to the square input, no padding (InternVL's build_transform(pad2square=False), the released
    setting): boxes are fractions of W and H, so they stay on their pixels; llava_med's square padding would letterbox
    a non-square image or crop and move every box (issue 15). lm.image_tensor then only normalises it (a square image
    of the input size is neither padded nor resized again), in training and in evaluation."""
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


class RegionSFTData:
    """Samples tokenised once to validate them (bad ones raise DataError naming the record, or are counted with
    skip_bad). A batch re-tokenises augmented samples: the crop changes the box digits."""

    def __init__(self, samples, tokenizer, cfg, max_length: int, skip_bad: bool, augment: bool, scale_min: float,
                 seed: int, base_prompt: bool = True):
        self.tokenizer, self.cfg, self.max_length, self.base_prompt = tokenizer, cfg, max_length, base_prompt
        self.augment, self.scale_min, self.seed = augment, scale_min, seed
        self.items, self.skipped, _ = lm.keep_good(((s["where"], s) for s in samples), self._checked, skip_bad,
                                                   "training sample")

    def _checked(self, where, s):  # the image: existence only (opened when its batch loads; see lm.checked_image)
        lm.checked_image(Path(s["image"]).parent, Path(s["image"]).name, where, allow_outside=True)
        self.tokenize(prompt_turns(s, base_prompt=self.base_prompt), where)
        return s

    def __len__(self):
        return len(self.items)

    def tokenize(self, turns, where):
        cfg = self.cfg
        return lm.tokenize_conversation(self.tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id,
                                        self.max_length, where)

    def batch(self, idx: list[int], epoch: int) -> dict:
        """Collated micro-batch. The crop of sample i in epoch e is seeded by (seed, e, i): the same whatever the
        number of ranks."""
        cfg, items, pix = self.cfg, [], []
        for i in idx:
            s = self.items[i]
            image, turns = lm.load_image(s["image"]), prompt_turns(s, base_prompt=self.base_prompt)
            if self.augment and s["task"] in REGION_TASKS:
                image, turns = augment_sample(image, turns, random.Random(f"{self.seed}-{epoch}-{i}"), self.scale_min)
            items.append(self.tokenize(turns, s["where"]))
            pix.append(lm.image_tensor(cfg, model_image(image, cfg.image_size)))
        b = lm.collate(items, self.tokenizer.pad_token_id)
        b["pixel_values"] = torch.stack(pix)
        return b


def weighted_sft_loss_sum(model, batch, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (weighted) token cross-entropy over answer tokens and the summed weight. The training loop divides the
    sum by the weight of the whole global batch, so with weights None (all 1) this is dpo.py's sft_loss_sum, the
    global answer-token mean (the released forward: plain CE), and with position weights the weighted mean
    sum(w * ce) / sum(w)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = targets != lm.IGNORE_INDEX
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                   logits_mask=mask).logits.float()
    tgt = targets[mask[:, :-1]]
    ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    w = torch.ones_like(ce) if weights is None else weights.to(ce.device)[tgt]
    return (ce * w).sum(), w.sum()


# ----------------------------------------------------------------------------------------------------------
# 5. Model setup, the training loop (copied from dpo.py: FSDP2, accumulation, clipping, schedule, non-finite
#    stop/skip, checkpoints and resume) and the SFT step it runs
# ----------------------------------------------------------------------------------------------------------


def set_trainable(model, lora: bool, train_projector: bool):
    """Full: the whole LLM (released: --freeze_llm False). LoRA: the adapters plus the embeddings and lm_head, whose new
    <ref>/<box> rows must learn (a frozen mean row cannot become a distinct token). Projector by flag (released:
    frozen). The ViT stays frozen. Trained parameters are fp32 (AdamW master weights). Call before sharding."""
    for n, p in model.named_parameters():
        llm = ("lora_" in n or "embed_tokens" in n or "lm_head" in n) if lora else n.startswith("language_model.")
        train = llm or (train_projector and n.startswith("projector."))
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


def region_sft_step(model, data: RegionSFTData, idx: list[int], epoch: int, weights, device) -> dict:
    """One micro-batch (crops seeded per sample and epoch): the weighted answer-token cross-entropy SUM and the weight
    total as "n" (the loop divides by the global batch's total: sum(w * ce) / sum(w)), and the tokens processed."""
    batch = to_device(data.batch(idx, epoch), device)
    loss, weight = weighted_sft_loss_sum(model, batch, weights)
    return {"loss": loss, "n": weight, "tokens": batch["attention_mask"].sum().float()}


# ----------------------------------------------------------------------------------------------------------
# 6. Evaluation
# ----------------------------------------------------------------------------------------------------------


def box_iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes, areas (x2 - x1) * (y2 - y1) (torchvision.ops.box_iou's convention, no +1).
    Two empty boxes: 0."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hungarian(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment for a rectangular cost matrix (n rows, m columns): min(n, m) pairs (row, col),
    like scipy.optimize.linear_sum_assignment. The O(n^2 m) shortest-augmenting-path Hungarian algorithm with
    potentials (Kuhn-Munkres as in e-maxx / Jonker-Volgenant), on the transposed matrix when n > m."""
    n, m = len(cost), len(cost[0]) if cost else 0
    if n == 0 or m == 0:
        return []
    if n > m:
        return sorted((r, c) for c, r in hungarian([list(col) for col in zip(*cost)]))
    INF = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)  # potentials of rows and columns (1-based; column 0 is a sentinel)
    match = [0] * (m + 1)  # match[j] = row assigned to column j (0 = free)
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [INF] * (m + 1), [False] * (m + 1)
        while True:  # grow an alternating tree from row i until it reaches a free column
            used[j0] = True
            i0, delta, j1 = match[j0], INF, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    return sorted((match[j] - 1, j - 1) for j in range(1, m + 1) if match[j])


def score_t2r_row(pred_text: str, gt_text: str, width: float, height: float, match_iou: float = 0.5,
                  scoring: str = "default") -> dict:
    """One Text-to-Region answer against its ground truth, in pixels. `iou`: for one GT box the best IoU over the
    predicted boxes (the released single-region rule: the first box, or the max when more boxes than GT were
    predicted); for several GT boxes the mean IoU over the Hungarian pairs (unmatched GT count 0). Hungarian pairs
    with IoU >= match_iou are matches: precision = matches / predicted boxes, recall = matches / GT boxes.
    scoring "medrega": the released match IoU (0.75 one object: SingleRegionMultiObjectEvaluator; 0.5 several:
    MultiRegionMultiObjectEvaluator) and pooling (pair IoUs over pairs / over GT boxes: `iou_denominator`). Not
    reproduced: its parser reads only complete '[[..], ..]' lists and keeps out-of-range or inverted boxes."""
    pred, malformed = parse_quads(strip_non_box(pred_text))
    objects = parse_regions(gt_text)
    gt = [b for _, bs in objects for b in bs] or parse_quads(gt_text)[0]
    if scoring == "medrega":
        match_iou = 0.75 if len(objects) <= 1 else 0.5
    pred_px = [decode_box(b, width, height) for b in pred]
    gt_px = [decode_box(b, width, height) for b in gt]
    ious = [[box_iou(p, g) for g in gt_px] for p in pred_px]
    pairs = hungarian([[1 - x for x in row] for row in ious]) if pred_px and gt_px else []
    pair_ious = [ious[r][c] for r, c in pairs]
    if len(gt_px) == 1:
        iou = max((row[0] for row in ious), default=0.0)
    else:
        iou = sum(pair_ious) / max(1, len(gt_px))
    matched = sum(x >= match_iou for x in pair_ious)
    precision = matched / len(pred_px) if pred_px else 0.0
    recall = matched / len(gt_px) if gt_px else 0.0
    return {"iou": iou, "n_pred": len(pred_px), "n_gt": len(gt_px), "malformed": malformed, "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "pair_iou_sum": sum(pair_ious), "iou_denominator": len(pairs) if len(objects) <= 1 else len(gt_px)}


def strip_non_box(text: str) -> str:
    """The prediction's box part: inside <box> spans when there are any, else the whole text (an answer that drops
    the tags but writes [[x1, y1, x2, y2]] still counts, as in the released regex)."""
    spans = [m.group(1) for m in BOX_SPAN.finditer(text)]
    return " ".join(spans) if spans else text


def score_t2r(rows: list[dict], match_iou: float = 0.5, scoring: str = "default") -> dict:
    """acc@t = fraction of single-box rows with IoU > t (strict, as released), mean IoU; multi-box rows: mean
    precision / recall / F1 of the Hungarian matches (correct names: precision over predictions; the released
    "precision" is this recall) and mean IoU: per row over its GT boxes, then over rows; scoring "medrega" pools
    the pair IoUs of all rows as released: sum / sum of each row's iou_denominator."""
    single = [r for r in rows if r["score"]["n_gt"] == 1]
    multi = [r for r in rows if r["score"]["n_gt"] > 1]
    out = {"n": len(rows), "n_single": len(single), "n_multi": len(multi)}
    if single:
        ious = [r["score"]["iou"] for r in single]
        for t in (0.25, 0.5, 0.75):
            out[f"acc@{t}"] = sum(x > t for x in ious) / len(ious)
        out["mean_iou"] = sum(ious) / len(ious)
    if multi:
        for k in ("precision", "recall", "f1", "iou"):
            out[f"multi_{k}"] = sum(r["score"][k] for r in multi) / len(multi)
        if scoring == "medrega":
            out["multi_iou"] = sum(r["score"]["pair_iou_sum"] for r in multi) / max(1, sum(r["score"]["iou_denominator"] for r in multi))
    out["malformed_boxes"] = sum(r["score"]["malformed"] for r in rows)
    out["no_box_answers"] = sum(r["score"]["n_pred"] == 0 for r in rows)
    return out


def answer_scores(texts: list[str], rows: list[dict], match_iou: float = 0.5, scoring: str = "default") -> dict:
    """The Text-to-Region metrics (acc@t, mean IoU, multi-box) of the answers `texts` to the evaluated `rows`."""
    fake = [{"score": score_t2r_row(t, r["answer"], r["width"], r["height"], match_iou, scoring)} for t, r in zip(texts, rows)]
    return {k: v for k, v in score_t2r(fake, match_iou, scoring).items() if k.startswith(("acc@", "mean_iou", "multi_"))}


def random_box_baseline(rows: list[dict], draws: int = 100, seed: int = 0, match_iou: float = 0.5,
                        scoring: str = "default") -> dict:
    """The same metrics for uniformly random boxes (x1 < x2 and y1 < y2 drawn from 0..999), averaged over draws."""
    rng = random.Random(seed)
    acc = {}
    for _ in range(draws):
        texts = []
        for r in rows:
            boxes = []
            for _ in range(r["score"]["n_gt"]):
                x1, x2 = sorted(rng.sample(range(BBOX_SCALE + 1), 2))
                y1, y2 = sorted(rng.sample(range(BBOX_SCALE + 1), 2))
                boxes.append([x1, y1, x2, y2])
            texts.append(format_region("x", boxes))
        for k, v in answer_scores(texts, rows, match_iou, scoring).items():
            acc[k] = acc.get(k, 0.0) + v / draws
    return acc


def prior_box_baselines(train_samples: list[dict], rows: list[dict], match_iou: float = 0.5,
                        scoring: str = "default") -> dict:
    """Answers that ignore the image, fitted on the training boxes of each object name: "mean_box" (the mean box) and
    "best_constant_box" (the training box with the most training boxes at IoU > 0.5 to it, i.e. the best single
    answer for acc@0.5). A model that beats them uses the image, not just the name."""
    by_name = {}
    for s in train_samples:
        if s["task"] == "t2r":
            for name, boxes in parse_regions(s["turns"][1][1]):
                by_name.setdefault(name, []).extend(boxes)
    answers = {"mean_box": {n: [round(sum(b[k] for b in bs) / len(bs)) for k in range(4)] for n, bs in by_name.items()},
               "best_constant_box": {n: max(bs, key=lambda c: sum(box_iou(c, b) > 0.5 for b in bs))
                                     for n, bs in by_name.items()}}
    return {kind: answer_scores(["".join(format_region(n, [box_of[n]]) for n, _ in parse_regions(r["answer"]) if n in box_of)
                                 for r in rows], rows, match_iou, scoring) for kind, box_of in answers.items()}


PUNCT = ".,;:!?\"'()[]。，、；：？！（）“”"


def text_tokens(text: str) -> list[str]:
    """Lower-cased whitespace tokens; Chinese (CJK) characters count one token each (the released Chinese evaluators
    use jieba words; characters need no segmenter and are the usual unit of Chinese BLEU)."""
    text = re.sub(r"([\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])", r" \1 ", text.lower())
    return [t.strip(PUNCT) for t in text.split() if t.strip(PUNCT)]


ZH_SPLIT = re.compile(r"[A-Za-z0-9]+|\s|\S")  # --scoring medrega's stand-in for jieba words: letter/digit runs, else characters
SYNONYMS = {"pa": "posterior anterior", "ivc": "inferior vena cava", "head": "brain", "both": "bilateral",
            "tumour": "tumor", "tumours": "tumors"}  # the released VQA cleanStr's contractions


def clean_str(text: str) -> str:
    """The released VQA cleanStr (vqa/postprocess_utils.py): split at , : . and drop the parts holding '_', lower-case,
    map SYNONYMS word by word, rejoin with ',', '-' -> ' '. Its number-word map and punctuation stripping are
    commented out upstream, so 'Yes.' becomes the token 'yes,' and '(pleural)' keeps its brackets."""
    parts = [p for p in re.split(r"[,:.]", text) if "_" not in p]
    return ",".join(" ".join(SYNONYMS.get(w, w) for w in p.lower().split(" ")) for p in parts).replace("-", " ")


def token_prf(pred: str, ref: str, tokens=text_tokens) -> tuple[float, float, float]:
    """Token-set precision, recall, F1 (the released regr2t evaluator, with characters for Chinese)."""
    p, r = set(tokens(pred)), set(tokens(ref))
    common = len(p & r)
    prec = common / len(p) if p else 0.0
    rec = common / len(r) if r else 0.0
    return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)


def score_r2t(rows: list[dict], scoring: str = "default") -> dict:
    """Region-to-Text: boxes and tags removed from the prediction; mean token recall, accuracy = recall >= 0.75, F1,
    corpus BLEU-1. scoring "medrega" = the released R2TEvaluator: lower-cased, only one-line '[[..]]' cut from the
    prediction (tags stay), whitespace tokens with their punctuation ("mandible." != "mandible"; Chinese is one token
    per word), BLEU-1 per sample (torchmetrics BLEUScore) averaged over samples."""
    if not rows:
        return {"n": 0}
    if scoring == "medrega":
        preds, refs = [re.sub(r"\[\[.*?\]\]", "", r["prediction"].lower()) for r in rows], [r["answer"].lower() for r in rows]
        bleu = sum(lm.corpus_bleu([p], [g], 1, str.split)[0] for p, g in zip(preds, refs)) / len(rows) / 100
    else:
        preds, refs = [strip_regions(r["prediction"]) for r in rows], [strip_regions(r["answer"]) for r in rows]
        bleu = lm.corpus_bleu(preds, refs, 1, text_tokens)[0] / 100  # corpus BLEU-1 with brevity penalty, 0-1
    prf = [token_prf(p, g, str.split if scoring == "medrega" else text_tokens) for p, g in zip(preds, refs)]
    return {"n": len(rows), "accuracy": sum(x[1] >= 0.75 for x in prf) / len(rows),
            "recall": sum(x[1] for x in prf) / len(rows), "f1": sum(x[2] for x in prf) / len(rows), "bleu1": bleu}


def score_region_vqa(rows: list[dict], scoring: str = "default") -> dict:
    """Image-level VQA as MedRegA scores it (lm.score_vqa is LLaVA-Med's scorer), the released evaluator's core: closed iff the answer is yes/no (or 是/否), correct when token
    recall >= 0.8; open: mean token recall and accuracy = recall >= 0.75. scoring "medrega", English rows = the
    released VQAEvaluator: clean_str, whitespace token sets, closed iff the cleaned GT is yes/no. Chinese rows =
    VQAEvaluatorChinese: no cleaning, ZH_SPLIT tokens (released: jieba words), closed iff the *prediction* is "yes" or
    "no" (so 是/否 answers count as open), correct at recall >= 0.4, a GT of "no" also matched by "not"."""
    closed, opened = [], []
    for r in rows:  # (closed: correct or not; open: recall)
        zh = scoring == "medrega" and r.get("lang") == "zh"
        tokens = text_tokens if scoring != "medrega" else ZH_SPLIT.findall if zh else (lambda t: clean_str(t).split())
        rec = token_prf(r["prediction"], r["answer"], tokens)[1]
        if scoring != "medrega":
            is_closed, ok = r["answer"].strip().lower() in ("yes", "no", "是", "否"), rec >= 0.8
        elif zh:
            gt = set(tokens(r["answer"]))
            gt |= {"not"} if gt == {"no"} else set()
            is_closed, ok = r["prediction"] in ("yes", "no"), bool(gt) and len(set(tokens(r["prediction"])) & gt) / len(gt) >= 0.4
        else:
            is_closed, ok = clean_str(r["answer"]) in ("yes", "no"), rec >= 0.8
        (closed if is_closed else opened).append(ok if is_closed else rec)
    return {"n": len(rows), "closed_accuracy": sum(closed) / len(closed) if closed else None,
            "open_recall": sum(opened) / len(opened) if opened else None,
            "open_accuracy": sum(x >= 0.75 for x in opened) / len(opened) if opened else None}


def region_answers(model, tokenizer, rows: list[dict], args: Args, rank: int, world: int, desc: str,
                   hints: dict | None = None) -> list[str]:
    """Greedy answers to the rows' first questions (with their base prompt, and a regional-CoT hint before the question
    where `hints` has one for the row index) through lm.generate_sharded, each image resized as in training
    (model_image). The jobs are built a few batches per rank at a time, so a test set of thousands of images is never
    in memory at once; the batches are those of a single call (chunks are whole batches)."""
    chunk, answers = args.eval_batch_size * world * 4, []
    for start in range(0, len(rows), chunk):
        jobs = [{"turns": prompt_turns({**r, "turns": r["turns"][:1]}, (hints or {}).get(i, ""), args.base_prompt == "full"),
                 "images": [model_image(lm.load_image(r["image"]), model.config.image_size)]}
                for i, r in enumerate(rows[start:start + chunk], start)]
        answers += lm.generate_sharded(model, tokenizer, jobs, args.eval_batch_size, rank, world, desc,
                                       max_new_tokens=args.eval_max_new_tokens)
    return answers


def regional_cot_hints(model, tokenizer, rows, candidates: dict, args: Args, rank: int, world: int) -> dict:
    """Regional chain-of-thought, stage 1: ask Text-to-Region for each candidate object of the row's image (e.g. the
    lesion names of its modality) and keep what the model finds; stage 2 (the caller) re-asks the question with
    "Regions: <ref>..</ref><box>..</box>. " before it. The paper's exact CoT prompts are not released (spec 5.4)."""
    asks, owner = [], []
    for i, r in enumerate(rows):
        for name in candidates.get(r["modality"], []):
            asks.append({**r, "task": "t2r", "lang": "en", "turns": [("user", t2r_question(name, r["modality"]))]})
            owner.append(i)
    found = {}
    for i, a in zip(owner, region_answers(model, tokenizer, asks, args, rank, world, "regional cot")):
        for name, boxes in parse_regions(a):
            if boxes:
                found.setdefault(i, []).append(format_region(name, boxes))
    return {i: "Regions: " + ", ".join(v) + ". " for i, v in found.items()}


def cot_candidates(samples: list[dict]) -> dict:
    """Regional-CoT candidates per modality: every object name the samples' Text-to-Region answers box for it."""
    cot = {}
    for s in samples:
        if s["task"] == "t2r":
            names = cot.setdefault(s["modality"], [])
            names += [n for n, _ in parse_regions(s["turns"][1][1]) if n not in names]
    return cot


def evaluate(model, tokenizer, rows_by_task: dict, args: Args, rank: int, world: int, tag: str,
             cot_candidates: dict | None = None) -> tuple[dict, dict]:
    """Scores per task (t2r, r2t, vqa, and vqa with regional CoT when asked) and the rows with their predictions."""
    scores, preds = {}, {}
    for task, rows in rows_by_task.items():
        if not rows:
            continue
        answers = region_answers(model, tokenizer, rows, args, rank, world, f"{tag} {task}")
        done = [dict(r, prediction=a, answer=r["turns"][1][1]) for r, a in zip(rows, answers)]
        if task == "t2r":
            for r in done:
                r["score"] = score_t2r_row(r["prediction"], r["answer"], r["width"], r["height"], args.multi_box_iou,
                                           args.scoring)
            scores[task] = score_t2r(done, args.multi_box_iou, args.scoring)
        elif task == "r2t":
            scores[task] = score_r2t(done, args.scoring)
        else:
            scores[task] = score_region_vqa(done, args.scoring)
        preds[task] = done
    if cot_candidates is not None and rows_by_task.get("vqa"):
        rows = rows_by_task["vqa"]
        hints = regional_cot_hints(model, tokenizer, rows, cot_candidates, args, rank, world)
        answers = region_answers(model, tokenizer, rows, args, rank, world, f"{tag} vqa+cot", hints)
        done = [dict(r, prediction=a, answer=r["turns"][1][1], regions=hints.get(i, "")) for i, (r, a) in
                enumerate(zip(rows, answers))]
        scores["vqa_regional_cot"] = {**score_region_vqa(done, args.scoring), "rows_with_regions": len(hints)}
        preds["vqa_regional_cot"] = done
    return scores, preds


def eval_rows(samples: list[dict], limit: int) -> dict:
    """Evaluation rows per task: Text-to-Region and Region-to-Text (English and Chinese), image-level VQA."""
    by = {}
    for s in samples:
        if s["task"] in ("t2r", "r2t", "vqa"):
            by.setdefault(s["task"], []).append(s)
    return {k: v[:limit or None] for k, v in by.items()}


def box_baselines(train_samples: list[dict], t2r_rows: list[dict], args: Args) -> dict:
    """Image-blind and random answers to the evaluated Text-to-Region rows (what a model must beat to localise): random
    boxes always; the mean and best constant training box of each named object when there is training data."""
    out = {"random_box_baseline": random_box_baseline(t2r_rows, 100, args.seed, args.multi_box_iou, args.scoring)}
    if train_samples:
        out.update({f"{k}_baseline": v for k, v in
                    prior_box_baselines(train_samples, t2r_rows, args.multi_box_iou, args.scoring).items()})
    return out


def export_llava_hf(model, tokenizer, out: Path, rank: int):
    """The trained weights (LoRA merged), in the frozen weights' dtype, as a llava-hf checkpoint in out/llava_hf with
    the four region tokens in its tokenizer and vocabulary. Every rank gathers the shards; rank 0 writes."""
    state = lm.full_state_dict(model)
    if rank == 0:
        frozen_dtype = next(p for n, p in model.named_parameters() if n.startswith("vision_tower.")).dtype
        lm.save_llava_hf(lm.merge_lora(model, state).to(dtype=frozen_dtype), tokenizer, out / "llava_hf")


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def resolve_defaults(args: Args) -> Args:
    """The "auto", "" and -1 defaults: the released values for a checkpoint; for the random --model tiny lr 1e-3, 40
    epochs (440 steps), Text-to-Region only, no crops, no base prompts, a trained projector. Measured on the shared
    2-core machine: 450 steps of T2R + R2T + grounded reports with crops left the random model writing one box per
    lesion name whatever the image; T2R alone without crops localises (README). Which factor matters was not separated."""
    tiny = args.model == "tiny"
    return dataclasses.replace(
        args, lr=args.lr if args.lr > 0 else (1e-3 if tiny else 1e-5),
        epochs=args.epochs if args.epochs > 0 else (40.0 if tiny else 1.0),
        tasks=args.tasks or ("t2r" if tiny else "t2r,r2t,grounded,vqa,report"),
        base_prompt={"auto": "none" if tiny else "full"}.get(args.base_prompt, args.base_prompt),
        train_projector={"auto": "yes" if tiny else "no"}.get(args.train_projector, args.train_projector),
        augment={"auto": "no" if tiny else "yes"}.get(args.augment, args.augment))


def main(argv=None):
    args = resolve_defaults(parse_args(Args, argv))
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, master = Path(args.out), rank == 0
    log = jsonl_logger(out / "metrics.jsonl", rank)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"medrega.py: {world} rank(s) on {device.type}; args in {out / 'args.json'}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model, tokenizer = lm.load(args.model, dtype=args.dtype, device=device, seed=args.seed,
                               template=args.template or ("chatml" if args.model == "tiny" else None))
    n_new = add_region_tokens(model, tokenizer, args.new_token_init, args.seed)
    eval_path = args.eval_data or (args.data if Path(args.data).is_dir() else "")
    eval_samples = load_samples(eval_path, args.eval_image_folder, args.task, tasks, "test", None,
                                args.allow_images_outside_folder) if args.eval and eval_path else []
    rows, train_samples = eval_rows(eval_samples, args.eval_limit), []
    if not args.eval_only:  # ---- training data
        skipped = {} if args.skip_bad_samples else None
        train_samples = load_samples(args.data, args.image_folder, args.task, tasks, "train", skipped,
                                     args.allow_images_outside_folder)
        data = RegionSFTData(train_samples, tokenizer, model.config, args.max_length, args.skip_bad_samples,
                             args.augment == "yes", args.crop_scale_min, args.seed, args.base_prompt == "full")
        data.skipped.update(skipped or {})
        if master:
            counts = {}
            for s in data.items:
                counts[f"{s['task']}_{s['lang']}"] = counts.get(f"{s['task']}_{s['lang']}", 0) + 1
            print(f"added {n_new} token rows for {REGION_TOKENS}; train samples {len(data)} {counts}"
                  + (f"; skipped {data.skipped}" if data.skipped else ""))
    if master:
        print("eval rows", {k: len(v) for k, v in rows.items()})
    # regional-CoT candidates from the training boxes; with --eval-only, the evaluation set's object names (not boxes)
    cot = cot_candidates(train_samples or eval_samples) if args.regional_cot else None
    if not args.eval_only:  # ---- model: LoRA or full
        if args.lora:
            torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
            lm.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
        set_trainable(model, args.lora, args.train_projector == "yes")
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (CleanRL's "CRUCIAL" seed offset)
    shard(model, device, args.activation_checkpointing)
    results, preds = {}, {}

    def evaluate_as(key: str):  # the latest evaluation's predictions feed the box baselines below
        results[key], found = evaluate(model, tokenizer, rows, args, rank, world, "eval " + key, cot)
        preds.update(found)
        log({"phase": "eval_" + key, **results[key]})
        if master:
            print(f"{key}:", json.dumps(results[key], ensure_ascii=False))

    if rows and args.eval_only:
        evaluate_as("eval")
    if not args.eval_only:  # ---- SFT, evaluation, export
        weights = position_token_weights(tokenizer, args.position_weight)
        results["summary"] = train(args, "sft", model, len(data),
                                   lambda idx, epoch: region_sft_step(model, data, idx, epoch, weights, device),
                                   out / "sft", rank, world, log, {"": args.lr}, args.batch_size,
                                   args.micro_batch_size, args.epochs,
                                   before=(lambda: evaluate_as("before")) if rows and args.eval_before else None)
        results["summary"].update(train_samples=len(data), skipped=data.skipped)
        if rows:
            evaluate_as("after")
        export_llava_hf(model, tokenizer, out, rank)
    if preds.get("t2r"):
        results.update(box_baselines(train_samples, preds["t2r"], args))
    if master:
        if preds:
            (out / "predictions.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False, default=str))
        (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print(json.dumps(results, indent=1, ensure_ascii=False))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
