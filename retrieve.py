"""retrieve.py -- MMed-RAG's domain-aware retriever: domain router, one CLIP-style retriever per domain, faiss index,
adaptive k. Usable on its own; mmed_rag.py imports it.

    # embedded default: tiny random CLIP towers trained on the toy set (3 domains), about a minute of CPU time
    python retrieve.py
    # 2 CPU processes (gloo) or 8 GPUs (nccl): the contrastive batch is gathered over ranks (same result)
    torchrun --nproc-per-node=2 retrieve.py
    # real data: image-report pairs with a domain, a CLIP checkpoint (or any HF image + text encoder pair)
    torchrun --nproc-per-node=8 retrieve.py --data train_pairs.json --test-data test_pairs.json \\
        --image-folder /data/images --encoder /ckpt/clip-vit-base-patch16 --batch-size 512 --lr 1e-4 --epochs 360
    python retrieve.py --encoder /ckpt/resnet-50+/ckpt/Bio_ClinicalBERT ...   # the paper's towers (spec A3)
    python retrieve.py --help                                                   # every flag

The method (MMed-RAG, Xia et al. 2024, sec. 3.1-3.2; spec A1-A5):

    1. domain d = D(x_v)       a linear probe on frozen image features (the paper fine-tunes BiomedCLIP; spec A2)
    2. retriever R_d           image + text towers, symmetric InfoNCE (RULE eq. 2, open_clip ClipLoss):
                               S = s * norm(V_img) norm(V_txt)^T,  L = (CE(S, I) + CE(S^T, I)) / 2,
                               s = exp(logit_scale) learnable, initialised at 1/0.07
    3. index                   the knowledge base = the training reports of domain d, embedded by R_d's text
                               tower; faiss inner product on L2-normalised vectors (= cosine)
    4. adaptive k              the top-k_max list is cut where the similarity drops sharply (paper rule), or
                               where it falls below top-1 / threshold (released code rule)

The probe and each retriever train with the training loop every recipe carries (copied from dpo.py: FSDP2,
checkpoints in OUT/router and OUT/retriever_<domain>, resume, non-finite stop/skip, a dead rank's exit).

Pairs (json list or jsonl): {"image": str, "report": str, "domain": str} -- or a toy-format folder (train.json
/ test.json records carry image, report, domain). Writes to --out: router.safetensors, <domain>/retriever/
(config + safetensors + tokenizer), <domain>/index.faiss + reports.json, rag_config.json (gamma, rule, k_max),
metrics.jsonl and results.json (per-domain router accuracy, Recall@1/5/10 before and after fine-tuning, gamma sweep).

File layout: Args -> data -> the two towers -> loss (with a gradient-correct all-gather) -> training loop ->
index + search -> adaptive k -> domain router -> evaluation -> main().
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
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import llava_med as lm


@dataclass
class Args:
    # data
    data: str = "data/toy"  # image-report pairs (json/jsonl with image, report, domain) or a toy-format folder
    test_data: str = ""  # pairs for Recall@k and router accuracy ("" = test.json of a toy folder)
    image_folder: str = ""  # image paths are relative to this ("" = the data file's folder)
    val_fraction: float = 0.15  # last fraction of each domain's training pairs held out to tune gamma (not in the KB)
    seed: int = 0  # same seed + same data = same retrievers
    # towers
    encoder: str = "tiny"  # "tiny" (random CLIP, offline), a CLIPModel folder, or "IMAGE_DIR+TEXT_DIR" (two HF encoders)
    embed_dim: int = 256  # shared embedding size of the projections for an IMAGE+TEXT pair ("tiny"/CLIP: its own)
    max_text_length: int = 77  # text tokens (CLIP's context; long reports are cut, as in the released script)
    # retriever training (paper / RULE App. C: AdamW lr 1e-3, wd 1e-2, batch 32, 360 epochs; code: lr 1e-4, wd 0.2)
    epochs: int = 60  # passes over each domain's pairs (toy default; the paper trains 360)
    batch_size: int = 32  # pairs per contrastive step over all ranks, one micro-batch of batch/ranks per rank (InfoNCE takes no accumulation)
    lr: float = 1e-3  # AdamW peak learning rate (paper 1e-3)
    weight_decay: float = 1e-2  # AdamW weight decay (paper 1e-2)
    warmup_ratio: float = 0.1  # linear warmup fraction, then cosine decay to 0
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    # how the steps run (the fields above key each phase's checkpoints: another value trains afresh; these do not)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient (any rank): stop the run, or skip the update (counted)
    # domain router
    probe_steps: int = 300  # full-batch AdamW steps of the linear probe
    probe_lr: float = 1e-2  # its learning rate
    # index and adaptive k
    index: Literal["flat", "ivf", "hnsw"] = "flat"  # flat (exact inner product), ivf (IVF-Flat, large bases) or hnsw
    ivf_nlist: int = 0  # IVF cells (0 = about sqrt(N))
    ivf_nprobe: int = 8  # IVF cells visited per query
    hnsw_m: int = 32  # HNSW graph degree
    k_max: int = 10  # top-k_max candidates before adaptive truncation (spec A5: e.g. 5 or 10; not found in the paper)
    rule: Literal["paper", "code", "fixed"] = "paper"  # paper (consecutive log-ratio > gamma), code (top-1 ratio < threshold) or fixed (k_max)
    gammas: str = "0.002,0.005,0.01,0.02,0.05,0.1,0.2"  # the gamma sweep on the validation split ((cos+1)/2 ratios are small)
    code_threshold: float = 1.5  # released retrieve_topk_per_image threshold (its commented default)
    # run
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails instead of hanging
    out: str = "runs/retrieve"  # retrievers, indexes, router, checkpoints, metrics
    save_every: int = 0  # checkpoint every N optimizer steps of a phase (0 = only at its end)
    resume: bool = True  # continue each phase (router, each retriever) from its newest complete checkpoint in --out made with the same arguments (others are moved aside)
    resume_any: bool = False  # with --resume, continue the newest checkpoint even if other arguments made it (e.g. data copied without its file times; you vouch it is the same)


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
# Data: image-report pairs with a domain
# ----------------------------------------------------------------------------------------------------------


def read_pairs(path, image_folder: str = "") -> list[dict]:
    """[{"id", "image" (absolute), "report", "domain"}]. Accepts toy records, plain pairs, or LLaVA conversation
    records whose last gpt turn is the report (Harvard-FairVLMed: "gpt4_summary" is the report, spec A3)."""
    path = Path(path)
    folder = Path(image_folder or path.parent)
    pairs = []
    for where, rec in lm.read_records(path):
        report = rec.get("report") or rec.get("gpt4_summary")
        if report is None and "conversations" in rec:
            report = lm.record_turns(rec, where)[-1][1]
        if not report or not rec.get("image") or not rec.get("domain"):
            raise lm.DataError(f"{where}: a retrieval pair needs image, report and domain")
        image = lm.checked_image(folder, lm.record_images(rec, where)[0], where, True)  # now, not when it is embedded
        pairs.append({"id": rec.get("id", where), "image": str(image), "report": report.strip(),
                      "domain": rec["domain"], "finding": finding_key(rec)})
    return pairs


def load_splits(args: Args) -> tuple[list[dict], list[dict], list[dict]]:
    """(knowledge base / retriever training pairs, validation pairs, test pairs). Validation = the last
    `val_fraction` of each domain's training pairs (kept out of the knowledge base, so gamma is tuned honestly)."""
    path = Path(args.data)
    train = read_pairs(path / "train.json" if path.is_dir() else path, args.image_folder)
    test_path = args.test_data or (str(path / "test.json") if path.is_dir() else "")
    test = read_pairs(test_path, args.image_folder) if test_path else []
    kb, val = split_validation(train, args.val_fraction)
    return kb, val, test


def split_validation(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    kb, val = [], []
    for d in domains_of(pairs):
        mine = [p for p in pairs if p["domain"] == d]
        n_val = int(round(len(mine) * fraction))
        kb += mine[:len(mine) - n_val]
        val += mine[len(mine) - n_val:]
    return kb, val


def domains_of(pairs: list[dict]) -> list[str]:
    """The label set comes from the data (radiology / pathology / ophthalmology in MMed-RAG), in first-seen order."""
    return list(dict.fromkeys(p["domain"] for p in pairs))


# ----------------------------------------------------------------------------------------------------------
# The two towers: a transformers CLIPModel (default), or any HF image encoder + HF text encoder with projections
# ----------------------------------------------------------------------------------------------------------


def tiny_clip_config(tokenizer):
    """A small random CLIP (64 px images, 16 px patches; 2-layer text transformer over the offline tokenizer)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)  # logit_scale_init_value log(1/0.07)


class Retriever(nn.Module):
    """Image tower and text tower mapping into one L2-normalised space, and the learnable logit scale.

    kind "clip": a transformers CLIPModel (vision_model + visual_projection, text_model + text_projection). The text
    embedding is read at the last attended token (the EOS we append), which is CLIP's pooling for its own tokenizer
    and stays right for any other one (transformers' legacy argmax pooling fires for eos id 2, e.g. our tokenizer).
    kind "pair": AutoModel image encoder (pooler output, else mean of the last hidden state) + AutoModel text encoder
    (first token, BERT's [CLS]) + one linear projection each (the paper's ResNet-50 + Bio_ClinicalBERT, spec A3).
    Only forward() runs the towers, so FSDP2's hooks (which wrap forward) gather the parameters."""

    def __init__(self, kind: str, image_model: nn.Module, text_model: nn.Module, embed_dim: int,
                 image_dim: int = 0, text_dim: int = 0):
        super().__init__()
        self.kind = kind
        if kind == "clip":
            self.clip = image_model
            # FSDP2 shards no 0-dim parameter: the scale is kept as a 1-element vector (CLIP stores a scalar)
            self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))
        else:
            self.image_model, self.text_model = image_model, text_model
            self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
            self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # open_clip's init: temperature 0.07

    def scale_param(self) -> nn.Parameter:
        return self.clip.logit_scale if self.kind == "clip" else self.logit_scale

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        """(normalised image embeddings, normalised text embeddings, logit scale); either input may be None. The
        scale is returned from inside forward, where FSDP2 has gathered it."""
        img = txt = None
        if pixel_values is not None:
            img = F.normalize(self._image(pixel_values), dim=-1)
        if input_ids is not None:
            txt = F.normalize(self._text(input_ids, attention_mask), dim=-1)
        return img, txt, self.scale_param() * 1.0

    def _image(self, pixel_values):
        if self.kind == "clip":
            pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
            return self.clip.visual_projection(pooled)
        out = self.image_model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(1)
        return self.image_proj(pooled.flatten(1))

    def _text(self, input_ids, attention_mask):
        if self.kind == "clip":
            h = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            last = attention_mask.sum(-1) - 1  # right padding: the appended EOS
            return self.clip.text_projection(h[torch.arange(h.shape[0], device=h.device), last])
        h = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(h[:, 0])


class Towers:
    """A Retriever with its tokenizer and image preprocessing (size, mean, std), loadable and savable."""

    def __init__(self, model: Retriever, tokenizer, image_size: int, mean, std, spec: dict):
        self.model, self.tokenizer, self.image_size, self.mean, self.std, self.spec = (
            model, tokenizer, image_size, tuple(mean), tuple(std), spec)

    def pixels(self, paths: list[str]) -> torch.Tensor:
        return torch.stack([lm.preprocess_image(lm.load_image(p), self.image_size, self.mean, self.std) for p in paths])

    def tokens(self, texts: list[str], max_length: int) -> dict:
        """Right-padded ids ending in EOS (cut to max_length, EOS kept), and the attention mask."""
        tok = self.tokenizer
        rows = []
        for t in texts:
            ids = tok(t, add_special_tokens=True, truncation=True, max_length=max_length).input_ids
            if self.model.kind == "clip" and ids[-1] != tok.eos_token_id:  # CLIP pools at the EOS
                ids = ids[:max_length - 1] + [tok.eos_token_id]
            rows.append(ids)
        n = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    def save(self, folder: Path, state: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        state = state if state is not None else self.model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        self.tokenizer.save_pretrained(folder / "tokenizer")
        cfg = self.model.clip.config if self.model.kind == "clip" else None
        if cfg is not None:
            cfg.save_pretrained(folder / "clip")
        else:
            self.model.image_model.config.save_pretrained(folder / "image")
            self.model.text_model.config.save_pretrained(folder / "text")
        (folder / "towers.json").write_text(json.dumps({**self.spec, "image_size": self.image_size,
                                                         "mean": self.mean, "std": self.std}, indent=1))


def build_towers(encoder: str, embed_dim: int = 256, seed: int = 0) -> Towers:
    """ "tiny": random CLIP from tiny_clip_config (offline tokenizer in data/tokenizer); a folder with a CLIPModel
    (model_type "clip"); or "IMAGE_DIR+TEXT_DIR", two HF encoders. Weights from safetensors only; no remote code."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel

    torch.manual_seed(seed)
    for folder in encoder.split("+") if encoder != "tiny" else []:
        if not (Path(folder) / "config.json").exists():
            raise lm.ModelError(f"{folder}: no config.json (--encoder takes tiny, a CLIPModel folder or IMAGE_DIR+TEXT_DIR)")
    if encoder == "tiny":
        tok = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
        model = Retriever("clip", CLIPModel(tiny_clip_config(tok)), None, 0)
        return Towers(model, tok, 64, lm.CLIP_MEAN, lm.CLIP_STD, {"kind": "clip", "encoder": "tiny"})
    if "+" in encoder:
        img_dir, txt_dir = encoder.split("+", 1)
        image = AutoModel.from_pretrained(img_dir, use_safetensors=True)
        text = AutoModel.from_pretrained(txt_dir, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(txt_dir)
        size, mean, std = _image_processing(Path(img_dir), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        model = Retriever("pair", image, text, embed_dim, _width(image.config), _width(text.config))
        return Towers(model, tok, size, mean, std, {"kind": "pair", "encoder": encoder, "embed_dim": embed_dim})
    cfg = AutoConfig.from_pretrained(encoder)
    if cfg.model_type != "clip":
        raise ValueError(f"{encoder}: model_type {cfg.model_type!r}; pass a CLIPModel folder or IMAGE_DIR+TEXT_DIR")
    clip = CLIPModel.from_pretrained(encoder, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(encoder)
    size, mean, std = _image_processing(Path(encoder), cfg.vision_config.image_size, lm.CLIP_MEAN, lm.CLIP_STD)
    return Towers(Retriever("clip", clip, None, 0), tok, size, mean, std, {"kind": "clip", "encoder": encoder})


def _width(cfg) -> int:
    """The width of what Retriever._image / _text pool: the encoder's hidden size (a CLIP tower's projection_dim is
    the width of a projection AutoModel does not load)."""
    if isinstance(getattr(cfg, "hidden_size", None), int):
        return cfg.hidden_size
    sizes = getattr(cfg, "hidden_sizes", None)  # ResNet / ConvNeXt: the last stage's channels
    if sizes:
        return sizes[-1]
    raise ValueError(f"cannot tell the output width of {cfg.model_type}")


def _image_processing(folder: Path, size: int, mean, std):
    """Size / mean / std from preprocessor_config.json when the checkpoint has one."""
    p = folder / "preprocessor_config.json"
    if p.exists():
        c = json.loads(p.read_text())
        s = c.get("crop_size") or c.get("size") or size
        size = s if isinstance(s, int) else s.get("height") or s.get("shortest_edge") or size
        mean, std = c.get("image_mean", mean), c.get("image_std", std)
    return int(size), mean, std


def load_towers(folder: Path) -> Towers:
    """A retriever written by Towers.save (config + safetensors + tokenizer; no download)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPConfig, CLIPModel

    folder = Path(folder)
    spec = json.loads((folder / "towers.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    if spec["kind"] == "clip":
        model = Retriever("clip", CLIPModel(CLIPConfig.from_pretrained(folder / "clip")), None, 0)
    else:
        image = AutoModel.from_config(AutoConfig.from_pretrained(folder / "image"))
        text = AutoModel.from_config(AutoConfig.from_pretrained(folder / "text"))
        model = Retriever("pair", image, text, spec["embed_dim"], _width(image.config), _width(text.config))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    rest = {k: spec[k] for k in spec if k not in ("image_size", "mean", "std")}
    return Towers(model.eval(), tok, spec["image_size"], spec["mean"], spec["std"], rest)


# ----------------------------------------------------------------------------------------------------------
# Loss: symmetric InfoNCE over the global batch (embeddings gathered from every rank, gradients routed back)
# ----------------------------------------------------------------------------------------------------------


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own rows: every rank's loss
    uses every rank's embeddings, so the gradient of a row is the sum over ranks of d(loss_r)/d(row). Written
    with all_reduce (every backend has it; gloo has no autograd-aware reduce_scatter on all versions)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """This rank's rows' SUM of the symmetric InfoNCE of the global batch (RULE eq. 2 = open_clip ClipLoss), of which
    the training loop takes the mean over all N rows of the step:
        L = 1/N sum_i [ -log softmax_j(s <v_i, t_j>)_i - log softmax_j(s <t_i, v_j>)_i ] / 2,  s = exp(logit_scale)
    clamped at 100 (CLIP). Under torch.distributed each rank scores its own rows against all N gathered columns
    (GatherWithGrad sends each column's gradient back to the rank that embedded it), so the ranks' sums add up to
    N * L and the loop's scaling (FSDP2's average over ranks, times ranks / N) makes the update exactly the
    gradient of L, for the towers and for the logit scale alike. Equal-sized shards are required."""
    n_local = img.shape[0]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        all_img, all_txt = GatherWithGrad.apply(img), GatherWithGrad.apply(txt)
        offset = dist.get_rank() * n_local
    else:
        all_img, all_txt, offset = img, txt, 0
    s = logit_scale.reshape(()).clamp(max=math.log(100)).exp()
    target = torch.arange(offset, offset + n_local, device=img.device)
    loss_i = F.cross_entropy(s * img @ all_txt.T, target, reduction="sum")  # image -> all texts
    loss_t = F.cross_entropy(s * txt @ all_img.T, target, reduction="sum")  # text -> all images
    return (loss_i + loss_t) / 2


# ----------------------------------------------------------------------------------------------------------
# Training loop (copied from dpo.py, as in every recipe) and the contrastive step: one retriever per domain
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



def train_retriever(args: Args, towers: Towers, pairs: list[dict], device, rank: int, world: int, log,
                    name: str = "retriever") -> Towers:
    """Contrastive fine-tuning of both towers (spec A3: no locking) by the training loop above, checkpoints in
    OUT/<name>. FSDP2 shards the whole Retriever as one unit (any HF tower pair; retrievers are small). A step is ONE
    micro-batch per rank, never accumulated: InfoNCE scores every image of the step against every text of it in one
    softmax, so cutting a step into micro-batches would take negatives away and change the loss, not only the
    memory it needs. A larger batch comes from more ranks (the gather); retrieve.py has no --micro-batch-size and
    the loop gets micro = batch / ranks. Returns unsharded towers in eval mode."""
    from torch.distributed.fsdp import fully_shard

    bs = min(args.batch_size, len(pairs) - len(pairs) % world)
    if bs % world or bs < 2 * world:
        raise ValueError(f"{name}: batch {bs} must be a multiple of {world} ranks with at least 2 pairs per rank")
    model = fully_shard(towers.model.to(device).train())

    def step(idx, epoch):
        pix = towers.pixels([pairs[i]["image"] for i in idx]).to(device)
        tok = {k: v.to(device) for k, v in towers.tokens([pairs[i]["report"] for i in idx], args.max_text_length).items()}
        img, txt, logit_scale = model(pix, **tok)
        return {"loss": clip_loss(img, txt, logit_scale), "n": torch.tensor(float(len(idx))),  # the loop logs the
                "temperature": torch.tensor(len(idx) / logit_scale.detach().exp().item())}  # per-pair mean: 1 / s

    train(args, name, model, len(pairs), step, Path(args.out) / name, rank, world, log, {"": args.lr}, bs, bs // world,
          args.epochs)
    return load_towers_from_state(towers, lm.full_state_dict(model))


def load_towers_from_state(towers: Towers, state: dict) -> Towers:
    """Unsharded towers of the same architecture holding `state` (used after FSDP2 training)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        towers.save(Path(tmp), state)
        return load_towers(Path(tmp))


# ----------------------------------------------------------------------------------------------------------
# Index: faiss inner product on normalised embeddings (= cosine); saved with its report list; batched search
# ----------------------------------------------------------------------------------------------------------


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("retrieval needs faiss: pip install faiss-cpu (or faiss-gpu on a CUDA machine)") from e
    return faiss


@torch.no_grad()
def embed_texts(towers: Towers, texts: list[str], max_length: int = 77, batch_size: int = 256, device="cpu") -> np.ndarray:
    model = towers.model.to(device).eval()
    out = []
    for i in range(0, len(texts), batch_size):
        tok = {k: v.to(device) for k, v in towers.tokens(texts[i:i + batch_size], max_length).items()}
        out.append(model(None, **tok)[1].float().cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 1), np.float32)


@torch.no_grad()
def embed_images(towers: Towers, paths: list[str], batch_size: int = 128, device="cpu") -> np.ndarray:
    model = towers.model.to(device).eval()
    out = [model(towers.pixels(paths[i:i + batch_size]).to(device))[0].float().cpu()
           for i in range(0, len(paths), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


class ReportIndex:
    """A faiss index over the report embeddings of one domain's knowledge base, and the reports themselves.
    Vectors are L2-normalised, so inner product = cosine similarity. Search returns cosines, best first."""

    def __init__(self, index, reports: list[str], kind: str, sources: list[str] | None = None):
        if index.ntotal != len(reports):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(reports)} reports")
        self.index, self.reports, self.kind = index, reports, kind
        self.sources = sources or [""] * len(reports)  # the image each report belongs to (to exclude a KB image's own)

    @classmethod
    def build(cls, embeddings: np.ndarray, reports: list[str], kind: str = "flat", nlist: int = 0, nprobe: int = 8,
              hnsw_m: int = 32, use_gpu: bool = True, sources: list[str] | None = None) -> "ReportIndex":
        faiss = import_faiss()
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        faiss.normalize_L2(x)
        d = x.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":  # coarse k-means cells; exact within the visited cells
            nlist = nlist or max(1, int(math.sqrt(len(x))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(nprobe, nlist)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"unknown index kind {kind!r} (flat, ivf, hnsw)")
        index.add(x)
        return cls(_on_gpu(faiss, index, kind, use_gpu), list(reports), kind, sources)

    def search(self, queries: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [n, k], report ids [n, k]) for L2-normalised queries, in batches (bounded memory)."""
        faiss = import_faiss()
        k = min(k, len(self.reports))
        scores, ids = [], []
        for i in range(0, len(queries), batch_size):
            q = np.ascontiguousarray(queries[i:i + batch_size], dtype=np.float32)
            faiss.normalize_L2(q)
            s, j = self.index.search(q, k)
            scores.append(s), ids.append(j)
        return np.concatenate(scores), np.concatenate(ids)

    def save(self, folder: Path):
        faiss = import_faiss()
        folder.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if hasattr(faiss, "index_gpu_to_cpu") and \
            type(self.index).__name__.startswith("Gpu") else self.index
        faiss.write_index(index, str(folder / "index.faiss"))
        (folder / "reports.json").write_text(json.dumps({"kind": self.kind, "reports": self.reports,
                                                         "sources": self.sources}, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path, use_gpu: bool = True) -> "ReportIndex":
        faiss = import_faiss()
        meta = json.loads((Path(folder) / "reports.json").read_text())
        index = faiss.read_index(str(Path(folder) / "index.faiss"))
        return cls(_on_gpu(faiss, index, meta["kind"], use_gpu), meta["reports"], meta["kind"], meta.get("sources"))


_GPU_RESOURCES = {}  # device -> faiss.StandardGpuResources: one per device (each reserves scratch memory), kept alive


def _on_gpu(faiss, index, kind: str, use_gpu: bool):
    """The index on this process's GPU (torch's current device: LOCAL_RANK under torchrun, so 8 ranks do not all
    fill GPU 0) with faiss-gpu; as it is on CPU, with faiss-cpu, or for HNSW (no GPU version)."""
    if not (use_gpu and kind != "hnsw" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return index
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[device], device, index)


# ----------------------------------------------------------------------------------------------------------
# Adaptive k (spec A5): the paper's gap rule, and the released code's top-1 ratio rule
# ----------------------------------------------------------------------------------------------------------


def positive_similarity(cos: np.ndarray) -> np.ndarray:
    """(cos + 1) / 2 in [0, 1]: the log-ratio needs positive scores (spec A5 advice); floored at 1e-6."""
    return np.maximum((np.asarray(cos, dtype=np.float64) + 1) / 2, 1e-6)


def adaptive_k_paper(scores, gamma: float, k_max: int) -> int:
    """Paper rule (gap statistic, Tibshirani 2001): with S_1 >= S_2 >= ... the similarities, u_i = log(S_i / S_{i+1});
    keep the top i for the first i with u_i > gamma, else all k_max."""
    s = np.asarray(scores, dtype=np.float64)[:k_max]
    for i in range(len(s) - 1):
        if math.log(s[i] / s[i + 1]) > gamma:
            return i + 1
    return len(s)


def adaptive_k_code(scores, threshold: float, k_max: int) -> int:
    """Released rule (retrieve_topk_per_image): keep the candidates whose ratio top-1 / S_j is below threshold,
    at most k_max. The release applies it to logit_scale * cos, which is not positive for negative cosines (the
    ratio then flips sign and passes); here it is applied to positive similarities like the paper rule. The
    scores are sorted, so the kept set is a prefix."""
    s = np.asarray(scores, dtype=np.float64)[:k_max]
    return int(max(1, np.sum(s[0] / s < threshold)))


def choose_k(scores, rule: str, k_max: int, gamma: float = 0.1, threshold: float = 1.5) -> int:
    """How many of the (sorted, positive) scores to keep."""
    if rule == "paper":
        return adaptive_k_paper(scores, gamma, k_max)
    if rule == "code":
        return adaptive_k_code(scores, threshold, k_max)
    if rule == "fixed":
        return min(k_max, len(scores))
    raise ValueError(f"unknown adaptive-k rule {rule!r} (paper, code, fixed)")


def relevance_key(report: str) -> str:
    """A report's text with numbers masked: two reports that agree on it count as the same finding (on real data an
    exact-duplicate match, such as the many identical normal chest reports)."""
    return re.sub(r"\d+(\.\d+)?", "#", " ".join(report.lower().split()))


def finding_key(rec: dict):
    """A record's structured findings as (name, location) pairs, none for a normal image, when it carries them (the
    toy's records); else None. The toy's reports word one finding in several ways, so their text rarely agrees."""
    if not isinstance(rec.get("findings"), list):
        return None
    return sorted([f.get("name", ""), f.get("location", "")] for f in rec["findings"])


def same_finding(query: dict, entry: dict) -> bool:
    """Whether a knowledge-base entry reports the query's finding (the relevance behind the gamma sweep's F1): by
    their structured findings when both carry them, else by relevance_key of the reports."""
    if query.get("finding") is not None and entry.get("finding") is not None:
        return query["finding"] == entry["finding"]
    return relevance_key(query["report"]) == relevance_key(entry["report"])


def sweep_gamma(gammas: list[float], score_rows: list[np.ndarray], relevant: list[np.ndarray], k_max: int,
                score_fn=None) -> tuple[float, list[dict]]:
    """Evaluate every gamma on the validation queries and return (best gamma, table). score_rows[q]: the sorted
    positive similarities of query q's top-k_max; relevant[q]: bool, whether each candidate is relevant (None:
    only score_fn). Default criterion: F1 of the kept set (precision of the kept reports, recall against the
    relevant candidates in the top k_max), a retrieval-only proxy; `score_fn(gamma, ks) -> float` replaces it
    (mmed_rag.py passes validation VQA accuracy, spec A5)."""
    table = []
    for g in gammas:
        ks = [adaptive_k_paper(s, g, k_max) for s in score_rows]
        row = {"gamma": g, "mean_k": float(np.mean(ks))}
        if relevant is not None:
            prec = float(np.mean([rel[:k].mean() for rel, k in zip(relevant, ks)]))
            rec = float(np.mean([rel[:k].sum() / max(1, rel.sum()) for rel, k in zip(relevant, ks)]))
            row.update(precision=prec, recall=rec, f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        if score_fn is not None:
            row["score"] = float(score_fn(g, ks))
        table.append(row)
    key = "score" if score_fn is not None else "f1"
    best = max(table, key=lambda r: (r[key], -r["mean_k"]))  # ties: the smaller context
    return best["gamma"], table


def print_sweep(table: list[dict], title: str):
    cols = list(table[0])
    print(title)
    print("  " + " | ".join(f"{c:>9}" for c in cols))
    for row in table:
        print("  " + " | ".join(f"{row[c]:9.3f}" for c in cols))


# ----------------------------------------------------------------------------------------------------------
# Domain router (spec A2, inferred recipe): a linear probe on frozen image features
# ----------------------------------------------------------------------------------------------------------


class DomainRouter(nn.Module):
    """Frozen image tower (the untrained retriever towers by default; BiomedCLIP in the paper) + a linear head."""

    def __init__(self, towers: Towers, domains: list[str]):
        super().__init__()
        self.towers, self.domains = towers, list(domains)
        self.head = None  # nn.Linear(feature width, number of domains), made by fit() or load()

    def features(self, paths: list[str], device="cpu") -> torch.Tensor:
        return torch.from_numpy(embed_images(self.towers, paths, device=device))

    def fit(self, args: Args, paths: list[str], labels: list[str], device, rank: int, world: int, log):
        """Cross-entropy on the frozen features, full batch (every image in every step, dealt out to the ranks),
        --probe-steps steps of the training loop at --probe-lr without weight decay or clipping (checkpoints in
        OUT/router). The head is a few thousand weights; its FSDP2 unit is what the loop expects."""
        from torch.distributed.fsdp import fully_shard

        x = self.features(paths, device).to(device)
        y = torch.tensor([self.domains.index(d) for d in labels], device=device)
        torch.manual_seed(args.seed)
        head = fully_shard(nn.Linear(x.shape[1], len(self.domains)).to(device))
        n = len(x) - len(x) % world  # the whole set, in equal shares (the last len % ranks images sit out)
        step = lambda idx, epoch: {"loss": F.cross_entropy(head(x[idx]), y[idx], reduction="sum"),  # noqa: E731
                                   "n": torch.tensor(float(len(idx)))}
        train(dataclasses.replace(args, weight_decay=0.0, grad_clip=0.0), "router", head, n, step,
              Path(args.out) / "router", rank, world, log, {"": args.probe_lr}, n, n // world, max_steps=args.probe_steps)
        self.head = nn.Linear(x.shape[1], len(self.domains))
        self.head.load_state_dict(lm.full_state_dict(head))

    @torch.no_grad()
    def predict(self, paths: list[str]) -> list[str]:
        if not paths:
            return []
        return [self.domains[i] for i in self.head(self.features(paths)).argmax(-1).tolist()]

    def save(self, folder: Path):
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / "router.safetensors"))
        self.towers.save(folder / "router_towers")
        (folder / "router.json").write_text(json.dumps({"domains": self.domains}))

    @classmethod
    def load(cls, folder: Path) -> "DomainRouter":
        router = cls(load_towers(folder / "router_towers"), json.loads((folder / "router.json").read_text())["domains"])
        w = load_file(str(folder / "router.safetensors"))
        router.head = nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
        router.head.load_state_dict(w)
        return router


def per_domain_accuracy(pred: list[str], gold: list[str]) -> dict:
    out = {}
    for d in dict.fromkeys(gold):
        idx = [i for i, g in enumerate(gold) if g == d]
        out[d] = sum(pred[i] == d for i in idx) / len(idx)
    out["all"] = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation: image -> text Recall@k on held-out pairs
# ----------------------------------------------------------------------------------------------------------


def recall_at_k(towers: Towers, pairs: list[dict], ks=(1, 5, 10), max_length: int = 77, device="cpu") -> dict:
    """Image -> text Recall@k in %, each test image against all test reports of its domain: a hit when one of
    the top k reports is the image's own report text (identical report texts are the same answer, so duplicates
    never count as misses)."""
    img = embed_images(towers, [p["image"] for p in pairs], device=device)
    txt = embed_texts(towers, [p["report"] for p in pairs], max_length, device=device)
    sim = img @ txt.T
    order = np.argsort(-sim, axis=1, kind="stable")
    same = np.array([[a["report"] == b["report"] for b in pairs] for a in pairs])
    out = {}
    for k in ks:
        out[f"R@{k}"] = 100 * float(np.mean([same[i, order[i, :k]].any() for i in range(len(pairs))]))
    return out


# ----------------------------------------------------------------------------------------------------------
# The whole system as mmed_rag.py uses it: route, retrieve, cut
# ----------------------------------------------------------------------------------------------------------


class DomainRAG:
    """Router + per-domain towers and indexes + the adaptive-k setting, loaded from a retrieve.py --out folder."""

    def __init__(self, router: DomainRouter, towers: dict, indexes: dict, config: dict):
        self.router, self.towers, self.indexes, self.config = router, towers, indexes, config

    @classmethod
    def load(cls, folder) -> "DomainRAG":
        folder = Path(folder)
        config = json.loads((folder / "rag_config.json").read_text())
        router = DomainRouter.load(folder)
        towers = {d: load_towers(folder / d / "retriever") for d in router.domains}
        indexes = {d: ReportIndex.load(folder / d) for d in router.domains}
        return cls(router, towers, indexes, config)

    def attach(self, items: list[dict], k_max: int, rule: str, gamma: float, threshold: float, fixed_k: int = 0,
               exclude_own: set | None = None, oracle: bool = False) -> int:
        """mmed_rag.py's items {"id", "path", "domain" (None: unknown)}: route each image (with oracle: take the
        record's domain), retrieve, cut by the rule (or keep fixed_k, which may exceed k_max). Sets each item's
        "domain" (the routed one, which the prompt names), "reports" and "scores" (of all candidates). Returns how
        many images the router sent elsewhere than their record's domain."""
        paths = sorted({it["path"] for it in items})
        known = {it["path"]: it["domain"] for it in items}
        if oracle and not all(known.values()):
            raise lm.DataError(f"--oracle-domain: {next(it['id'] for it in items if not it['domain'])} has no domain")
        exclude = [p if p in exclude_own else "" for p in paths] if exclude_own else None
        self.config["code_threshold"] = threshold
        got = self.retrieve(paths, k_max=max(k_max, fixed_k), rule="fixed" if fixed_k else rule, gamma=gamma,
                            domains=[known[p] for p in paths] if oracle else None, exclude=exclude)
        by_path = dict(zip(paths, got))
        for it in items:
            g = by_path[it["path"]]
            it["domain"], it["scores"] = g["domain"], g["scores"]
            it["reports"] = g["reports"][:fixed_k] if fixed_k else g["reports"]
        return sum(known[p] is not None and known[p] != g["domain"] for p, g in zip(paths, got))

    def kb_images(self) -> set[str]:
        """The image of every knowledge-base report, all domains."""
        return {s for index in self.indexes.values() for s in index.sources if s}

    def drop_kb_images(self, items: list[dict], what: str, skip: bool) -> list[dict]:
        """RULE keeps the retriever's data disjoint from the preference and test data (an image in the knowledge
        base retrieves its own report). Items whose image path is in a knowledge base stop the run (exit 2) or, with
        skip (--skip-bad-samples), are counted and skipped. Compared by resolved path: a copy elsewhere passes."""
        kb = self.kb_images()
        bad = [it for it in items if it["path"] in kb]
        if bad and not skip:
            raise lm.DataError(f"{bad[0]['id']}: image {bad[0]['path']} is in the retriever's knowledge base, as are "
                               f"the images of {len(bad)} {what} items (RULE keeps them disjoint; --skip-bad-samples "
                               f"skips them)")
        if bad:
            print(f"{what}: {len(bad)} items skipped, their images are in the knowledge base", file=sys.stderr)
        return [it for it in items if it["path"] not in kb]

    def retrieve(self, paths: list[str], k_max: int | None = None, rule: str | None = None, gamma: float | None = None,
                 domains: list[str] | None = None, exclude: list[str] | None = None) -> list[dict]:
        """For each image: {"domain", "reports" (kept, best first), "scores" (positive similarities of the top
        k_max, and "k"}. `domains` skips the router (known domain); `exclude[i]`: an image path whose own
        knowledge-base entry is never returned for image i (a KB image must not find its own report; other reports
        with the same text stay)."""
        c = self.config
        k_max, rule = k_max or c["k_max"], rule or c["rule"]
        gamma = c["gamma"] if gamma is None else gamma
        domains = domains or self.router.predict(paths)
        out = [None] * len(paths)
        for d in dict.fromkeys(domains):
            idx = [i for i, x in enumerate(domains) if x == d]
            q = embed_images(self.towers[d], [paths[i] for i in idx])
            own = Counter(self.indexes[d].sources)  # an excluded image's entries (several reports of one image)
            extra = max((own[exclude[i]] for i in idx if exclude[i]), default=0) if exclude else 0
            cos, ids = self.indexes[d].search(q, k_max + extra)
            for row, i in enumerate(idx):
                index = self.indexes[d]
                rows = [j for j in ids[row] if j >= 0]
                reports = [index.reports[j] for j in rows]
                scores = list(positive_similarity(cos[row][:len(reports)]))
                sources = [index.sources[j] for j in rows]
                if exclude:
                    keep = [n for n, j in enumerate(rows) if not exclude[i] or index.sources[j] != exclude[i]][:k_max]
                    reports, scores, sources = ([x[n] for n in keep] for x in (reports, scores, sources))
                k = choose_k(scores, rule, k_max, gamma, c.get("code_threshold", 1.5))
                out[i] = {"domain": d, "reports": reports[:k], "scores": scores, "k": k, "candidates": reports,
                          "sources": sources}
        return out


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def build_all(args: Args, kb: list[dict], val: list[dict], test: list[dict], rank: int, world: int, device,
              log=lambda row: None) -> dict:
    """Train the router and one retriever per domain, index each domain's knowledge base, tune gamma on `val`;
    everything is written to args.out (rank 0). Returns the results dict."""
    out = Path(args.out)
    master = rank == 0
    domains = domains_of(kb)
    results = {"domains": domains, "kb_size": {}, "recall_before": {}, "recall_after": {}}
    # ---- 1. domain router on frozen features of the untrained towers
    router = DomainRouter(build_towers(args.encoder, args.embed_dim, args.seed), domains)
    router.fit(args, [p["image"] for p in kb], [p["domain"] for p in kb], device, rank, world, log)
    eval_pairs = test or val
    results["router_accuracy"] = per_domain_accuracy(router.predict([p["image"] for p in eval_pairs]),
                                                     [p["domain"] for p in eval_pairs])
    if master:
        out.mkdir(parents=True, exist_ok=True)
        router.save(out)
        print("domain router accuracy:", json.dumps({k: round(v, 3) for k, v in results["router_accuracy"].items()}))
    # ---- 2. + 3. one retriever per domain; its knowledge base in a faiss index
    for d in domains:
        mine = [p for p in kb if p["domain"] == d]
        towers = build_towers(args.encoder, args.embed_dim, args.seed)
        held = [p for p in eval_pairs if p["domain"] == d]
        if held:
            results["recall_before"][d] = recall_at_k(towers, held, max_length=args.max_text_length, device=device)
        towers = train_retriever(args, towers, mine, device, rank, world, log, f"retriever_{d}")
        if held:
            results["recall_after"][d] = recall_at_k(towers, held, max_length=args.max_text_length, device=device)
        reports = [p["report"] for p in mine]
        index = ReportIndex.build(embed_texts(towers, reports, args.max_text_length, device=device), reports, args.index,
                                  args.ivf_nlist, args.ivf_nprobe, args.hnsw_m, sources=[p["image"] for p in mine])
        results["kb_size"][d] = len(reports)
        if master:
            towers.save(out / d / "retriever")
            index.save(out / d)
            print(f"{d}: {len(mine)} pairs; Recall@1/5/10 untrained {_fmt(results['recall_before'].get(d))} -> "
                  f"fine-tuned {_fmt(results['recall_after'].get(d))}")
        log({"phase": "recall", "domain": d, "before": results["recall_before"].get(d),
             "after": results["recall_after"].get(d)})
    # ---- 4. gamma on the validation split (paper rule), by F1 of the kept set (mmed_rag.py re-tunes it by VQA
    # accuracy over the same grid, which rag_config.json keeps)
    gammas = [float(g) for g in args.gammas.split(",")]
    gamma = gammas[0]
    config = {"k_max": args.k_max, "rule": args.rule, "gamma": gamma, "code_threshold": args.code_threshold,
              "gammas": gammas}
    if master:
        (out / "rag_config.json").write_text(json.dumps(config))
    dist.barrier()
    if val:
        rag = DomainRAG.load(out)
        got = rag.retrieve([p["image"] for p in val], k_max=args.k_max, rule="fixed", domains=[p["domain"] for p in val])
        rows = [np.asarray(g["scores"]) for g in got]
        entries = {p["image"]: p for p in kb}  # a candidate's KB entry by its image (an entry not found: by text)
        rel = [np.array([same_finding(p, entries.get(src, {"report": r, "finding": None}))
                         for r, src in zip(g["candidates"], g["sources"])]) for g, p in zip(got, val)]
        gamma, table = sweep_gamma(gammas, rows, rel, args.k_max)
        results["gamma_sweep"], results["gamma"] = table, gamma
        if master:
            print_sweep(table, f"gamma sweep on {len(val)} validation images (paper rule, k_max {args.k_max}):")
            print(f"chosen gamma {gamma}")
            (out / "rag_config.json").write_text(json.dumps({**config, "gamma": gamma}))
    dist.barrier()
    return results


def _fmt(r):
    return "/".join(f"{r[k]:.1f}" for k in ("R@1", "R@5", "R@10")) if r else "-"


def main(argv=None):
    args = parse_args(Args, argv)
    rank, world, device = setup_distributed(args.dist_timeout_s)
    out, t0 = Path(args.out), time.time()
    log = jsonl_logger(out / "metrics.jsonl", rank)
    kb, val, test = load_splits(args)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"retrieve.py: {world} rank(s) on {device.type}; {len(kb)} knowledge-base pairs, {len(val)} validation, "
              f"{len(test)} test; domains {domains_of(kb)}")
    results = build_all(args, kb, val, test, rank, world, device, log)
    results["seconds"] = time.time() - t0
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli(main)
