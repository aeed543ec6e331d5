"""llava_med.py -- the shared vision-language model: CLIP ViT -> projector -> causal LM.

Every method file (dpo.py, mmedpo.py, mmed_rag.py, stllava_med.py, huatuo_vision.py, medrega.py) builds its
model with this file. It is readable top to bottom:

    1. config + checkpoint layouts      (LLaVA-Med v1.5, HuatuoGPT-Vision, llava-hf in both key eras, "tiny")
    2. images                           (pad to square with the mean colour, resize, centre crop, normalise)
    3. data records                     (LLaVA conversation json / jsonl; errors name the file and record)
    4. chat templates + tokenisation    (segment by segment: prompt segments -100, answer segments copied)
    5. the model                        (image tokens pre-expanded in input_ids, llava-hf style)
    6. generation                       (batched, left padding, KV cache, greedy or sampled, stop strings)
    6b. training helpers                (LoRA, adapters-off reference, merged export, PEFT adapter, sharded generation)
    7. load / save                      (meta-device init; safetensors only; llava-hf export for vLLM)
    8. evaluation                       (Med-VQA readers, LLaVA-Med's released scorer)
    9. command line                     (ask a question about an image)

Ask the tiny random model (no download, CPU) or a real checkpoint a question:

    python llava_med.py --model tiny --image data/toy/images/test_radiology_0000.png --question "Is there a nodule?"
    python llava_med.py --model /ckpt/llava-med-v1.5-mistral-7b --image chest.png --question "Is there a pneumothorax?"

Image tokens. The original LLaVA code splices 576 image features in at a single sentinel id (-200), so its
logits are longer than its input_ids (spec 1.1). Here, as in llava-hf and nanoVLM, every `<image>` marker is
expanded to N copies of the image-token id *before* the model sees it; the model writes the projected image
features over those positions. Logits, labels and input_ids then have the same length, which is what makes
the parity tests against `transformers.LlavaForConditionalGeneration` and TRL possible.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

IGNORE_INDEX = -100  # label value that cross-entropy skips (PyTorch / transformers convention)
IMAGE_MARKER = "<image>"  # the placeholder users write in prompts; one per image
REPO = Path(__file__).resolve().parent
TINY_TOKENIZER = REPO / "data" / "tokenizer"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (CLIPImageProcessor defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """A bad sample or file. The message names the file and the record (or line) so it can be fixed."""


class ModelError(DataError):
    """A --model folder that cannot be loaded (no config.json, unreadable config, missing or mismatched weights).
    One line naming the folder and what is wrong; the scripts exit 2 on it as on bad data."""


# ----------------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LlavaMedConfig:
    text_config: transformers.PretrainedConfig  # the causal LM (Mistral, Llama, Qwen2, ...)
    vision_config: CLIPVisionConfig  # the CLIP ViT
    projector_type: str = "mlp2x_gelu"  # LLaVA's mm_projector_type: "linear" or "mlp{N}x_gelu"
    vision_feature_layer: int = -2  # mm_vision_select_layer: features from the penultimate ViT layer
    vision_feature_select_strategy: str = "default"  # "default" drops CLS (mm_vision_select_feature=patch); "full" keeps it
    image_token_id: int = 32000  # id written at image positions (llava-hf convention: 32000 for Llama/Mistral)
    image_aspect_ratio: str = "pad"  # "pad": pad to square with the mean colour first (LLaVA-1.5); "crop": no pad
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    template: str = "mistral_instruct"  # chat template, see TEMPLATES
    max_length: int = 2048  # tokenizer_model_max_length of the checkpoint

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        n = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return n if self.vision_feature_select_strategy == "default" else n + 1


def tiny_config(tokenizer) -> LlavaMedConfig:
    """A small random LLaVA (Mistral LM + CLIP ViT) that trains on CPU in minutes. 64 px images, 16 px patches:
    16 image tokens per image."""
    text = transformers.MistralConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=64, hidden_act="quick_gelu")
    return LlavaMedConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_MARKER),
                          template="mistral_instruct", max_length=512)


# ----------------------------------------------------------------------------------------------------------
# 2. Images: LLaVA-1.5 'pad' preprocessing with pillow + numpy (spec 1.1); equals CLIPImageProcessor after the pad
# ----------------------------------------------------------------------------------------------------------


def load_image(path) -> Image.Image:
    """Open an image as RGB (a single-channel grey "L" image stays "L": LLaVA-Med pads it with a grey, see
    preprocess_image), or raise DataError naming the file: missing, zero-byte, truncated, not an image, or
    over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS; a warning there is an error here). The format
    is read from the content, so a PNG named .jpg opens."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.copy() if im.mode == "L" else im.convert("RGB")  # both read the whole file now
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image too large ({e})") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot open image ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=64)
def _resolved(cwd: str, folder: str) -> Path:  # one realpath per image folder, not per image (thousands per run)
    return (Path(cwd) / folder).resolve()


def resolve_image(folder, rel: str, where: str = "", allow_outside: bool = False) -> Path:
    """folder / rel, refusing absolute paths and '..' that leave the image folder (a data file must not make the
    trainer read /etc/passwd) unless allow_outside is set."""
    folder = _resolved(os.getcwd(), str(folder))
    path = (folder / rel).resolve()
    if not allow_outside and folder not in path.parents:
        raise DataError(f"{where}: image path {rel!r} leaves the image folder {folder} "
                        f"(pass --allow-images-outside-folder to permit)")
    return path


def expand2square(image: Image.Image, background) -> Image.Image:
    """Pad to a square, image centred (LLaVA's expand2square; LLaVA-Med v1.5 adds a +-1 px random jitter, not here)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD, pad: bool = True) -> torch.Tensor:
    """PIL image -> float tensor [3, size, size]: pad to square (mean colour), resize the short side to `size`
    (bicubic), centre crop, scale to [0, 1], normalise. Same numbers as CLIPImageProcessor (tested). A grey "L"
    image is padded with one grey level, int(255 * mean(mean)) = 114, not the mean colour (122, 116, 104), as the
    released LLaVA-Med does (mm_utils.py:process_images on model_vqa.py's unconverted Image.open; tested against it)."""
    if pad:
        grey = image.mode == "L"
        image = expand2square(image if grey else image.convert("RGB"),
                              int(255 * sum(mean) / len(mean)) if grey else tuple(int(x * 255) for x in mean))
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # transformers' get_resize_output_image_size truncates the same way
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32)  # [H, W, 3]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[top:top + size, left:left + size]
    x = (x * (1 / 255) - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------
# 3. Data records: the LLaVA conversation format, shared by every method file
# ----------------------------------------------------------------------------------------------------------
#   {"id": "...", "image": "rel/path.png" | ["a.png", "b.png"] | absent,
#    "conversations": [{"from": "human", "value": "<image>\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}


def read_records(path, skipped: dict | None = None) -> list[tuple[str, dict]]:
    """Read a .json list or a .jsonl file. Returns [(where, record)] where `where` is "file:line" (jsonl) or
    "file[index]" (json) so later errors can name the record. A malformed or non-UTF-8 jsonl line raises DataError
    naming the line, or, when a `skipped` dict is given, is counted there and skipped. A .json file is parsed whole:
    if it is malformed there is no record to skip, so it always raises."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None

    def bad(msg):
        if skipped is None:
            e = DataError(msg)
            e.skippable = True  # one record: the scripts' --skip-bad-samples would count and skip it
            raise e
        key = msg.split(": ", 1)[-1].split(" (")[0]
        skipped[key] = skipped.get(key, 0) + 1

    out = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)")
                continue
            except json.JSONDecodeError as e:
                bad(f"{path}:{lineno}: malformed json line ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                bad(f"{path}:{lineno}: expected a json object, got {type(rec).__name__}")
                continue
            out.append((f"{path}:{lineno}", rec))
        return out
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed json ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a json list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad(f"{path}[{i}]: expected a json object, got {type(rec).__name__}")
            continue
        out.append((f"{path}[{i}]" + (f" id={rec['id']}" if "id" in rec else ""), rec))
    return out


def record_images(rec: dict, where: str = "") -> list[str]:
    """The record's image paths as a list ("image" may be a string, a list, or absent)."""
    img = rec.get("image")
    if img is None:
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(x, str) for x in img):
        return list(img)
    raise DataError(f"{where}: 'image' must be a string or a list of strings, got {img!r}")


def record_turns(rec: dict, where: str = "", key: str = "conversations") -> list[tuple[str, str]]:
    """Validate a conversation and return [(role, text)] with role in {"user", "assistant"}. Turns must
    alternate human/gpt, start with human, and every answer must be a non-empty string."""
    conv = rec.get(key)
    if conv is None and key == "conversations":
        conv = rec.get("conversatons")  # LLaVA-Med's test.json typo, accepted there too (spec 2.4)
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: missing or empty '{key}' list")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: {key}[{i}] needs 'from' and 'value'")
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(t["from"])
        if role is None:
            raise DataError(f"{where}: {key}[{i}] has unknown role {t['from']!r} (expected human/gpt)")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{where}: {key}[{i}] is {t['from']!r}; turns must alternate human, gpt, human, ...")
        if not isinstance(t["value"], str):
            raise DataError(f"{where}: {key}[{i}]['value'] must be a string")
        if role == "assistant" and not t["value"].strip():
            raise DataError(f"{where}: {key}[{i}] is an empty answer")
        turns.append((role, t["value"]))
    return turns


def place_image_markers(turns: list[tuple[str, str]], n_images: int, where: str = "") -> list[tuple[str, str]]:
    """Put one `<image>\\n` per image at the start of the first user turn (LLaVA's preprocess_multimodal). Markers may
    sit anywhere in the data (LLaVA-Med puts some at the end; PubMedVision has none): they are counted and moved.
    A count that is neither 0 nor the number of images is an error."""
    n_markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if n_markers not in (0, n_images):
        raise DataError(f"{where}: {n_markers} '<image>' markers but {n_images} images")
    cleaned = [(r, text.replace(IMAGE_MARKER, "").strip() if r == "user" and IMAGE_MARKER in text else text)
               for r, text in turns]  # as LLaVA: "A\n<image>\nB" -> "A\n\nB"; a later turn without one is kept as is
    role, text = cleaned[0]
    cleaned[0] = (role, (IMAGE_MARKER + "\n") * n_images + text.strip())
    return cleaned


def checked_image(folder, rel: str, where: str = "", allow_outside: bool = False, opened: set | None = None) -> Path:
    """A record's image path (resolve_image), which must exist and, given a set `opened`, open (load_image) -- checked
    while the data is prepared, each path once, so a bad file fails (or is skipped) before training, not at hour 30.
    Without `opened` only existence is checked (an SFT set of a million images would take hours to open up front;
    a bad one then fails, named, when its batch loads)."""
    path = resolve_image(folder, rel, where, allow_outside)
    if not path.exists():
        raise DataError(f"{where}: image not found: {path}")
    if opened is not None and path not in opened:
        try:
            load_image(path)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        opened.add(path)
    return path


def keep_good(items, make, skip_bad: bool, what: str = "record", skipped: dict | None = None):
    """(kept, skipped, examples): make(*item) for each item, whose first field names it ("file:line"). A DataError
    stops the run (cli() prints it and, marked skippable, suggests --skip-bad-samples) or, with skip_bad, is counted
    per reason (paths masked) in `skipped`, with the first 5 messages kept for the log. Nothing kept is an error."""
    kept, skipped, examples = [], dict(skipped or {}), []
    for item in items:
        try:
            kept.append(make(*item))
        except DataError as e:
            if not skip_bad:
                e.skippable = True
                raise
            msg = str(e)[len(item[0]) + 2:] if str(e).startswith(item[0]) else str(e)
            reason = re.sub(r"\S*/\S*|\S+\.(png|jpe?g|gif|bmp|tiff?)\b", "<path>", msg).split(" (")[0][:70]
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples) < 5:
                examples.append(str(e))
    if not kept:
        raise DataError(f"no usable {what} (skipped: {skipped})")
    return kept, skipped, examples


def file_sha256(path) -> str:
    """A file's sha256, read in 1 MiB blocks (checkpoint checksums, cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(value, out=None):
    """What a path argument stands for in a cache key (the recipes' cache_key): its content, not its name, so a data
    set or model that moved (mv, cp -a, rsync -a: a cluster job's scratch copy) keeps its caches and checkpoints, and a
    file changed under the same name rebuilds them. A file: its sha256 (over 64 MiB: its size and modification time);
    a folder: the name, size and modification time of every file under it (checkpoint folders aside, and `out`, the
    run's own output folder, should it lie inside); a comma list of paths: each. Any other value ("tiny", "", "auto")
    stands for itself."""
    paths = [Path(v) for v in value.split(",")] if isinstance(value, str) and value else []
    if not paths or not all(p.exists() for p in paths):
        return value
    h = hashlib.sha256()
    for p in paths:
        if p.is_file() and p.stat().st_size <= 64 << 20:
            h.update(file_sha256(p).encode())
            continue
        o, here = Path(out or p).resolve(), p.resolve()
        inside = o.relative_to(here).parts if o.is_relative_to(here) else ()  # () also when out is p itself
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            rel = f.relative_to(p)
            if (f.is_file() and not any(part.startswith("checkpoints") for part in rel.parts)
                    and not (inside and rel.parts[:len(inside)] == inside)):
                st = f.stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "content " + h.hexdigest()[:16]


def cached_json(path: Path, rank: int, make):
    """(make(), False), or (what an earlier run stored at `path`, True); `path` names the cache key of what make()
    builds (the recipes' cache_key). Rank 0 reads the cache and sends it to the other ranks, so every rank takes the
    same branch (make() may run collectives) and none reads a file that another one is still writing; a new value is
    written by rank 0 under a temporary name, then renamed: never a half cache."""
    import torch.distributed as dist

    found = [json.loads(path.read_text()) if rank == 0 and path.exists() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        return found[0], True
    value = make()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(value, ensure_ascii=False))
        os.replace(path.with_suffix(".tmp"), path)
    return value, False


# ----------------------------------------------------------------------------------------------------------
# 4. Chat templates. Each renders a conversation into (text, is_answer) segments; the text is the exact
#    string of the original code (spec 2.2, 3.3, 4.1, 5.2; tested), the flags say what is trained.
# ----------------------------------------------------------------------------------------------------------

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
HERMES_SYSTEM = "Answer the questions."


def _segments(template: str, turns: list[tuple[str, str]], eos: str, add_generation_prompt: bool, system=None):
    """[(text, is_answer)]. `turns` alternate user/assistant; a trailing user turn (or add_generation_prompt)
    gets the assistant prefix so generation can start. Where the original masks a separator *before* the
    answer (e.g. the space after "[/INST]"), we put that separator into the answer segment instead, so the
    trained prompt is byte-for-byte the generation prompt (the rendered string is unchanged)."""
    segs = []
    for i in range(0, len(turns), 2):
        q = turns[i][1]
        a = turns[i + 1][1] if i + 1 < len(turns) else None
        if template == "mistral_instruct":  # LLaVA-Med v1.5: LLAMA_2 style, empty system, sep2 "</s>"
            q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}" if i == 0 and system else q  # a system prompt: LLAMA_2's wrap
            segs.append((f"[INST] {q} [/INST]", False))
            if a is not None:
                segs.append((f" {a} {eos}", True))
        elif template == "vicuna_v1":  # LLaVA v1 / MMed-RAG / MMedPO / STLLaVA-Med: sep " ", sep2 "</s>"
            head = ((VICUNA_SYSTEM if system is None else system) + " ") if i == 0 else ""
            segs.append((f"{head}USER: {q} ASSISTANT:", False))
            if a is not None:
                segs.append((f" {a}{eos}", True))
        elif template == "huatuo":  # HuatuoGPT-Vision cli.py: plain-text role tags, no system, EOS ends answers
            segs.append((f"<|user|>\n{q}\n<|assistant|>\n", False))
            if a is not None:
                segs.append((f"{a}{eos}", True))
        elif template == "chatml":  # InternVL "Hermes-2" (MedRegA): no newline between <|im_end|> and <|im_start|>
            head = f"<|im_start|>system\n{HERMES_SYSTEM if system is None else system}<|im_end|>" if i == 0 else ""
            segs.append((f"{head}<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n", False))
            if a is not None:
                segs.append((f"{a}<|im_end|>", True))
        else:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return segs


# template -> (prepend BOS?, stop strings besides EOS)
TEMPLATES = {
    "mistral_instruct": (True, ["</s>"]),
    "vicuna_v1": (True, ["</s>"]),
    "huatuo": (False, []),
    "chatml": (False, ["<|im_end|>"]),
}


def render_chat(template: str, turns, eos: str = "</s>", add_generation_prompt: bool = False, system=None) -> str:
    """The prompt string for `turns` ([(role, text)] or ["q", "a", ...]) under `template` (no BOS)."""
    turns = [t if isinstance(t, tuple) else (("user", "assistant")[i % 2], t) for i, t in enumerate(turns)]
    return "".join(s for s, _ in _segments(template, turns, eos, add_generation_prompt, system))


def chat_template_jinja(template: str) -> str:
    """`template` as a Jinja chat template, written with every llava-hf export, so that transformers'
    apply_chat_template and vLLM's chat API render what render_chat does (tested). Built from _segments on
    placeholders: the strings have one home. A message's content is a string or llava-hf's list of parts (images
    first, as "<image>\\n", then the texts); a "system" message replaces the template's system prompt."""
    mark = {"\x01q\x01": "text(m)", "\x01s\x01": "text(ns.sys)", "\x01a\x01": "text(m)", "\x01e\x01": "eos_token"}
    jinja = lambda pattern: "".join("{{ " + (mark.get(x) or json.dumps(x)) + " }}" for x in re.split("(\x01.\x01)", pattern) if x)
    segs = lambda system: [t for t, _ in _segments(template, [("user", "\x01q\x01"), ("assistant", "\x01a\x01")] * 2,
                                                   "\x01e\x01", False, system)]
    (first, answer, later, _), with_system = segs(None), segs("\x01s\x01")[0]
    return ("{#- llava_med.py template " + template + " -#}{%- macro text(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
            "{%- for p in m['content'] if p['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
            "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
            + "{{- bos_token -}}" * TEMPLATES[template][0] + "{%- set ns = namespace(sys=none) -%}"
            "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.sys = m -%}{%- endfor -%}"
            "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'assistant' -%}" + jinja(answer)
            + "{%- elif not loop.first -%}" + jinja(later) + "{%- elif ns.sys is not none -%}" + jinja(with_system)
            + "{%- else -%}" + jinja(first) + "{%- endif -%}{%- endfor -%}")


@functools.lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> list[int]:  # the '\n' probe of encode_segment, once per tokenizer
    return tokenizer.encode("\n", add_special_tokens=False)


def encode_segment(tokenizer, text: str, previous: str | None) -> list[int]:
    """Token ids of one segment (`previous`: the segment before it, None for the first), as LLaVA's
    tokenizer_image_token makes them from the whole prompt (tested on its outputs): text after a special token --
    `<image>`, or the EOS ending `previous` -- is a tokenizer call of its own, which a SentencePiece tokenizer
    (Llama/Mistral) starts with '▁' whatever its `legacy` flag, as the released checkpoints were trained; text that
    continues a segment (an answer after "[/INST]") is tokenised as '\\n' + text with the tokens of '\\n' dropped,
    so the pieces concatenate to the same text. Byte-level BPE (Qwen2, tiny) gives the same ids either way."""
    head, *after_images = text.split(IMAGE_MARKER)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    if previous is None or not head or (tokenizer.eos_token and previous.endswith(tokenizer.eos_token)):
        ids = encode(head)
    else:
        probe = _newline_ids(tokenizer)
        ids = encode("\n" + head)
        ids = ids[len(probe):] if ids[:len(probe)] == probe else encode(head)  # a merged newline: plain encoding
    for chunk in after_images:
        ids += [tokenizer.convert_tokens_to_ids(IMAGE_MARKER)] + encode(chunk)
    return ids


def tokenize_conversation(tokenizer, turns, template: str, num_image_tokens: int, image_token_id: int,
                          max_length: int | None = None, where: str = "", system=None) -> dict:
    """Conversation -> {"input_ids", "labels", "n_images"} (python lists), built segment by segment:
    prompt segments get IGNORE_INDEX, answer segments are copied; each `<image>` becomes `num_image_tokens`
    copies of `image_token_id`. Too long: cut from the right; a cut through image tokens raises (the caller
    counts and skips: an image must never lose half its features). A sample with no supervised token left raises DataError (never a silent 0 loss)."""
    add_bos, _ = TEMPLATES[template]
    eos = tokenizer.eos_token
    ids, labels = [], []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    segs = _segments(template, turns, eos, False, system)
    for k, (text, is_answer) in enumerate(segs):
        seg = encode_segment(tokenizer, text, segs[k - 1][0] if k else None)
        expanded = []
        for t in seg:
            expanded.extend([image_token_id] * num_image_tokens if t == image_token_id else [t])
        ids.extend(expanded)
        labels.extend(expanded if is_answer else [IGNORE_INDEX] * len(expanded))
    n_images = sum(text.count(IMAGE_MARKER) for r, text in turns if r == "user")
    if sum(1 for t in ids if t == image_token_id) != n_images * num_image_tokens:
        raise DataError(f"{where}: '<image>' did not tokenise to the image token (tokenizer lacks {IMAGE_MARKER!r}?)")
    if max_length is not None and len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            raise DataError(f"{where}: {len(ids)} tokens > max_length {max_length} and truncation would cut "
                            f"through image tokens (raise --max-length or shorten the prompt)")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        raise DataError(f"{where}: no supervised token" + (f" after truncation to {max_length}" if max_length else ""))
    return {"input_ids": ids, "labels": labels, "n_images": n_images}


def tokenize_prompt(tokenizer, turns, template: str, num_image_tokens: int, image_token_id: int, system=None) -> list[int]:
    """Generation prompt ids: the conversation so far plus the assistant prefix (the last turn is the user's)."""
    add_bos, _ = TEMPLATES[template]
    ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    segs = _segments(template, turns, tokenizer.eos_token, True, system)
    for k, (text, _) in enumerate(segs):
        for t in encode_segment(tokenizer, text, segs[k - 1][0] if k else None):
            ids.extend([image_token_id] * num_image_tokens if t == image_token_id else [t])
    return ids


def collate(samples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of {"input_ids", "labels"?, "pixel_values"?: [n, 3, H, W]} to a batch. Images are concatenated in
    sample order, which is the order of their tokens in the flattened batch."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[i, sl] = torch.as_tensor(s["input_ids"])
        attention_mask[i, sl] = 1
        if "labels" in s:
            labels[i, sl] = torch.as_tensor(s["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None and len(s["pixel_values"])]
    batch["pixel_values"] = torch.cat(pix) if pix else None
    return batch


# ----------------------------------------------------------------------------------------------------------
# 5. The model
# ----------------------------------------------------------------------------------------------------------


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """LLaVA's builder: "linear" or "mlp{N}x_gelu" (Linear, GELU, Linear, ...; state-dict indices 0, 2, ...);
    "cluster" (STLLaVA-Med / SQ-LLaVA prototype extractor, 256 centres) or "cluster{K}" (K centres)."""
    if kind == "linear":
        return nn.Linear(vision_dim, text_dim)
    c = re.fullmatch(r"cluster(\d*)", kind)
    if c is not None:
        return ClusterProjector(vision_dim, text_dim, num_centers=int(c.group(1) or 256), iterations=2)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m is None:
        raise ValueError(f"unknown projector type {kind!r} (known: linear, mlp2x_gelu, mlpNx_gelu, cluster, clusterK)")
    layers = [nn.Linear(vision_dim, text_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    return nn.Sequential(*layers)


class ClusterProjector(nn.Module):
    """STLLaVA-Med's "cluster" projector (SQ-LLaVA's prototype extractor; spec 4.3, released
    llava/model/multimodal_projector/cluster.py): soft-cluster the ViT tokens around K centres for T iterations,
    hard-assign each token to its most similar centre, add that centre's prototype to the token, then the 2-layer
    MLP. The token count is unchanged (576 in, 576 out). Parameter names are the released ones, so
    `model.mm_projector.{sim_alpha, sim_beta, c, v, f, ln_1, mlp.0, mlp.2}` load as they are; `ln_1` exists in the
    released state dict but its forward never uses it (kept for loading). The sums below are matmuls where the
    released code broadcasts a [B, K, L, D] tensor (the same numbers, without ~0.6 GB per 336 px image)."""

    def __init__(self, vision_dim: int, text_dim: int, num_centers: int = 256, iterations: int = 2):
        super().__init__()
        self.num_centers, self.iterations = num_centers, iterations
        self.sim_alpha = nn.Parameter(torch.ones(1, 1, 1))  # similarity scale and shift, learnt
        self.sim_beta = nn.Parameter(torch.zeros(1, 1, 1))
        self.c = nn.Linear(vision_dim, vision_dim)  # centre update
        self.v = nn.Linear(vision_dim, vision_dim)  # token "values" the centres are compared with
        self.f = nn.Linear(vision_dim, vision_dim)  # token features aggregated into the prototypes
        self.ln_1 = nn.LayerNorm(vision_dim)  # unused in the released forward; present in its checkpoints
        self.mlp = nn.Sequential(OrderedDict([("0", nn.Linear(vision_dim, text_dim)),
                                              ("1", transformers.activations.ACT2FN["quick_gelu"]),
                                              ("2", nn.Linear(text_dim, text_dim))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, D] ViT features
        # each channel is normalised across the tokens, not each token across the channels: the release computes
        # value = v(x).permute(0, 2, 1) [B, D, L], then F.normalize(value, dim=-1) (tested against its output)
        value = F.normalize(self.v(x), dim=1)  # [B, L, D], unit norm along L
        feature = self.f(x)  # [B, L, D]
        k = self.num_centers  # initial centres: average-pool the token axis down to K (AdaptiveAvgPool1d)
        centers = F.adaptive_avg_pool1d(x.transpose(1, 2), k).transpose(1, 2)  # [B, K, D]
        centers_feature = F.adaptive_avg_pool1d(feature.transpose(1, 2), k).transpose(1, 2)  # [B, K, D]
        for _ in range(self.iterations):  # soft assignment: each token spreads over the centres (softmax over K)
            centers = self.c(centers)
            assign = (F.normalize(centers, dim=-1) @ value.transpose(1, 2)).softmax(dim=1)  # [B, K, L]
            centers = assign @ feature  # [B, K, D]
        cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # [B, K, L]
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        mask = F.one_hot(sim.argmax(dim=1), k).transpose(1, 2).to(sim.dtype)  # hard: the closest centre per token
        sim = sim * mask
        prototypes = (sim @ feature + centers_feature) / (mask.sum(dim=-1, keepdim=True) + 1.0)  # [B, K, D]
        return self.mlp(x + sim.transpose(1, 2) @ prototypes)  # each token + its centre's prototype -> MLP


class Output(NamedTuple):
    """A NamedTuple (not a dataclass) so torch's pytree sees the tensors inside: FSDP2 hooks the root module's
    outputs to re-gather its parameters for backward and release them after; with an opaque output the root
    (embeddings, lm_head) would keep its first gathered copy and never see its own updates."""
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: object = None


class VisionTower(CLIPVisionModel):
    """CLIPVisionModel (same parameters and names) whose forward returns LLaVA's image features: hidden state
    `feature_layer` (-2: the penultimate layer's output), CLS dropped for strategy "default". Layers after the
    selected one are not run. Its own forward (not output_hidden_states) keeps it a single FSDP unit."""

    def forward(self, pixel_values, feature_layer: int = -2, strategy: str = "default"):
        vit = getattr(self, "vision_model", self)  # transformers < 5.6 nests the ViT under vision_model.
        h = vit.pre_layrnorm(vit.embeddings(pixel_values.to(vit.embeddings.patch_embedding.weight.dtype)))
        layers = vit.encoder.layers
        for layer in layers[: feature_layer % (len(layers) + 1)]:  # hidden_states[i] = output of the first i layers
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return h[:, 1:] if strategy == "default" else h


class LlavaMed(nn.Module):
    """CLIP ViT (frozen by default) -> projector -> causal LM. Parameter names: vision_tower.vision_model.*,
    projector.{0,2}.*, language_model.{model.*, lm_head.*}."""

    def __init__(self, config: LlavaMedConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.projector = build_projector(config.projector_type, config.vision_config.hidden_size,
                                         config.text_config.hidden_size)
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        self.language_model = AutoModelForCausalLM.from_config(config.text_config, attn_implementation=attn_implementation)
        # the decoder's KV-cache argument: `past_key_values` up to transformers 5.23, `cache` from 5.24 (where the old
        # name warns on every call and goes in 5.40); asked of the signature so one code runs on every 5.x
        params = inspect.signature(self.language_model.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> ViT features [n, num_image_tokens, vision_dim] (select layer, CLS dropped). Runs without
        building a graph unless a ViT parameter trains (e.g. ViT LoRA), so a frozen tower costs no activations."""
        tower = self.vision_tower
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(needs_grad):
            return tower(pixel_values, self.config.vision_feature_layer, self.config.vision_feature_select_strategy)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> projected image features [n, num_image_tokens, hidden]."""
        return self.projector(self.vision_features(pixel_values))

    def embed(self, input_ids, pixel_values=None, image_features=None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions."""
        is_image = input_ids == self.config.image_token_id
        # the image id may be outside the LM's vocabulary (original LLaVA-Med: vocab 32000, image id 32000)
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_tokens = int(is_image.sum())
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_feats:
            n_img = 0 if image_features is None else image_features.shape[0]
            raise DataError(f"image tokens ({n_tokens}) != image features ({n_feats} = {n_img} images x "
                            f"{self.config.num_image_tokens}); was a sequence truncated through its image tokens?")
        if n_tokens:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_features=None,
                position_ids=None, past_key_values=None, use_cache=False, logits_to_keep: int = 0,
                logits_mask=None) -> Output:
        """Logits [B, T, V] aligned with input_ids; with labels, the mean token cross-entropy over supervised
        tokens (shifted by one, like every causal LM). `image_features` (already projected, one row per image in
        token order) replaces `pixel_values` when the caller has encoded the images once for several forwards.
        `logits_mask` [B, T] (bool) or (rows, positions) index tensors: return logits only there, as [n, V]; the
        vocabulary projection is then paid only where a loss is taken (e.g. completion tokens in DPO).
        `attention_mask` is [B, T] (1 = token, 0 = padding; causal attention) or a boolean [B, 1, T, T] mask
        (True = may attend; e.g. two answers sharing one prompt) with explicit `position_ids`."""
        embeds = self.embed(input_ids, pixel_values, image_features)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            # once, as the additive mask every layer adds to its scores (eager needs it; SDPA would otherwise make
            # and keep a float copy of a boolean mask in every layer)
            attention_mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~attention_mask, torch.finfo(embeds.dtype).min)
        if use_cache and past_key_values is None:  # ours, filled in place by the decoder: never read back from its output
            past_key_values = transformers.DynamicCache(config=self.language_model.config)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=use_cache, **{self._cache_arg: past_key_values})
        hidden = out.last_hidden_state
        lm_head = self.language_model.lm_head
        if logits_mask is not None:
            return Output(logits=lm_head(hidden[logits_mask]))
        logits = lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            shift_labels = labels[:, 1:]
            if not (shift_labels != IGNORE_INDEX).any():
                raise DataError("batch has no supervised token (all labels are -100)")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shift_labels.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return Output(logits=logits, loss=loss, past_key_values=past_key_values if use_cache else None)

    def freeze_vision(self):
        self.vision_tower.requires_grad_(False)
        return self


# ----------------------------------------------------------------------------------------------------------
# 6. Generation: batched, left-padded prompts, KV cache; greedy (temperature 0) or sampled
# ----------------------------------------------------------------------------------------------------------


def _sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p (as HF's TopP)
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LlavaMed, tokenizer, prompts: list[list[int]], pixel_values=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None, image_features=None, sync: bool = True) -> list[str]:
    """Continue each prompt (token ids with expanded image tokens; images in `pixel_values` in prompt order).
    Stops a row at EOS or when its decoded text contains a stop string (cut there). Returns the new text.
    Under torch.distributed with a sharded model, every rank must call this with the same number of prompts
    batches; `sync` keeps the ranks decoding until all of them are done."""
    device = next(model.parameters()).device
    batch = collate([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, padding_side="left")
    input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = stop if stop is not None else TEMPLATES[model.config.template][1]
    eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.config.text_config, "eos_token_id", None)))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    out = model(input_ids, pixel_values=pixel_values, image_features=image_features, attention_mask=attn,
                position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, B = out.past_key_values, input_ids.shape[0]
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = pos[:, -1:] + 1
    logits = out.logits[:, -1]
    texts = [""] * B
    for _ in range(max_new_tokens):
        if model.config.image_token_id < logits.shape[-1]:  # a generated placeholder would have no image behind it
            logits[..., model.config.image_token_id] = float("-inf")
        tok = _sample_next(logits, temperature, top_k, top_p, generator)
        tok = tok.masked_fill(done, tokenizer.pad_token_id)
        for i in range(B):
            if done[i]:
                continue
            t = int(tok[i])
            if t in eos_ids:
                done[i] = True
                continue
            new[i].append(t)
            if stop:
                texts[i] = tokenizer.decode(new[i], skip_special_tokens=False)
                if any(s in texts[i] for s in stop):
                    done[i] = True
        all_done = done.all().long()
        if sync and torch.distributed.is_initialized():  # sharded (FSDP) ranks must run the same number of forwards
            torch.distributed.all_reduce(all_done, op=torch.distributed.ReduceOp.MIN)
        if bool(all_done):
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(-1)], dim=-1)
        out = model(tok.unsqueeze(-1), attention_mask=attn, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    results = []
    for i in range(B):
        full = tokenizer.decode(new[i], skip_special_tokens=False)
        text = tokenizer.decode(new[i], skip_special_tokens=True)
        if cuts := [full.index(s) for s in stop if s in full]:  # at the first stop string in the text
            text = full[:min(cuts)]
            for special in tokenizer.all_special_tokens:
                text = text.replace(special, "")
        results.append(text.strip())
    return results


def _as_list(x):
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


# ----------------------------------------------------------------------------------------------------------
# 6b. What training does to the model: LoRA, the adapters-off reference, whole (gathered) weights, merged
#     export, PEFT adapters, and generation over many prompts shared out to the ranks
# ----------------------------------------------------------------------------------------------------------

# every linear layer of the language model's decoder (MMed-RAG / MMedPO / STLLaVA-Med: find_all_linear_names)
LORA_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# every linear layer of CLIP's encoder (STLLaVA-Med's ViT LoRA, spec 4.4)
VIT_LORA_TARGETS = r".*vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


def add_lora(model: LlavaMed, r: int, alpha: int, dropout: float, targets: str = LORA_TARGETS) -> LlavaMed:
    """Inject peft LoRA layers (B = 0: the model is unchanged until trained) into the modules matching `targets`.
    A second call adds more layers under the same adapter; merge_lora uses one scale alpha / r for all of them."""
    from peft import LoraConfig, inject_adapter_in_model

    first = getattr(model, "lora_config", None)
    if first is not None and first.lora_alpha / first.r != alpha / r:
        raise ValueError(f"LoRA scale {alpha}/{r} differs from the first adapter's {first.lora_alpha}/{first.r}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft warns that a second injection adds adapters: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model)
    model.lora_config = first or config
    return model


class adapters_off:
    """Context: LoRA layers skip their adapters, so the model is its own frozen reference (what peft's
    disable_adapter does, without toggling requires_grad, which FSDP2 has already recorded)."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def __enter__(self):
        for m in self.layers:
            m._disable_adapters = True

    def __exit__(self, *exc):
        for m in self.layers:
            m._disable_adapters = False


def policy_and_reference(model: LlavaMed, full_finetune: bool, lora_r: int, lora_alpha: int, lora_dropout: float,
                         tune_projector: bool):
    """A preference policy (trainable parameters in fp32) and its reference: the adapters switched off (LoRA on
    every linear layer of the LM's decoder, LORA_TARGETS; the returned reference is None) or a frozen copy (full
    fine-tuning). A trained projector keeps a frozen copy for the reference (adapters-off would use the trained one)."""
    import copy

    model.requires_grad_(False)
    ref_model = None
    if full_finetune:
        ref_model = copy.deepcopy(model).eval()
        model.language_model.requires_grad_(True)
    else:
        add_lora(model, lora_r, lora_alpha, lora_dropout)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    if tune_projector:
        model.projector.requires_grad_(True)
        if ref_model is None:
            ref_model = copy.deepcopy(model.projector).requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, ref_model


def image_features(model: LlavaMed, ref_model, pixel_values, device):
    """(policy features, reference features) of each distinct image, encoded once: the projected features serve the
    policy and, when the tower and projector are frozen, the reference too. A trained projector has a frozen copy
    for the reference (ref_model, or its .projector); a ViT with LoRA (STLLaVA-Med) runs a second tower pass with
    the adapters off."""
    if pixel_values is None:
        return None, None
    vis = model.vision_features(pixel_values.to(device))
    policy = model.projector(vis)
    vit_lora = any(p.requires_grad for p in model.vision_tower.parameters())
    if ref_model is None and not vit_lora:
        return policy, policy.detach()
    with torch.no_grad(), adapters_off(model):
        ref_vis = model.vision_features(pixel_values.to(device)) if vit_lora else vis
        ref_proj = model.projector if ref_model is None else getattr(ref_model, "projector", ref_model)
        return policy, ref_proj(ref_vis)


def full_state_dict(model) -> dict:
    """Every parameter and buffer as a whole CPU tensor. FSDP2 shards are gathered (a collective: every rank calls)."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for n, t in model.state_dict().items()}


def merge_lora(model: LlavaMed, state: dict) -> LlavaMed:
    """A plain LlavaMed holding W + (alpha/r) * B @ A for every LoRA layer (in W's dtype), built from the whole
    tensors in `state`; parameters are assigned, not initialised first (a 7B model is not built twice). It keeps the
    model's attention kernel (its constructor writes its own into the shared config)."""
    with _params_on_meta():
        plain = LlavaMed(model.config, model.config.text_config._attn_implementation)
    base = {n.replace(".base_layer.", "."): t for n, t in state.items() if "lora_" not in n}
    lcfg = getattr(model, "lora_config", None)
    for n, a in state.items():
        if n.endswith("lora_A.default.weight"):
            prefix = n[: -len(".lora_A.default.weight")]
            b, w = state[prefix + ".lora_B.default.weight"], base[prefix + ".weight"]
            base[prefix + ".weight"] = (w.float() + lcfg.lora_alpha / lcfg.r * (b.float() @ a.float())).to(w.dtype)
    plain.load_state_dict(base, strict=True, assign=True)
    if getattr(model.config.text_config, "tie_word_embeddings", False):
        plain.language_model.tie_weights()  # assign=True made two Parameters: one again, as load() leaves it
    return plain


def save_peft_adapter(model: LlavaMed, state: dict, out_dir, base_model: str, trained_prefixes=()) -> Path:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) whose module names are those of the
    llava-hf export of the base, so `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base),
    out_dir)` loads it. Trained non-LoRA parts named by prefix (e.g. "projector.") are written beside it with
    llava-hf names in non_lora_trainables.safetensors (LLaVA's name for them); a trained projector is also in the
    adapter, as PEFT's modules_to_save, so that PeftModel computes what was trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = {}
    for n, t in state.items():
        if ".lora_A." in n or ".lora_B." in n:
            part = ".lora_A.weight" if ".lora_A." in n else ".lora_B.weight"
            hf = _rename(n.split(".lora_")[0].replace(".base_layer", "") + ".weight", TO_LLAVA_HF)
            adapter["base_model.model." + hf[: -len(".weight")] + part] = t.contiguous()
    extra = {_rename(n, TO_LLAVA_HF): t.contiguous() for n, t in state.items() if n.startswith(tuple(trained_prefixes))}
    saved = sorted({k.split(".")[1] for k in extra if k.startswith("model.multi_modal_projector.")})
    adapter.update({"base_model.model." + k: t for k, t in extra.items() if saved})  # PEFT's modules_to_save:
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})  # it swaps them in
    leaves = sorted({k.split(".")[-3] for k in adapter if ".lora_" in k})  # q_proj, ..., fc2
    parts = [p for p, key in (("language_model", ".language_model."), ("vision_tower", ".vision_tower."))
             if any(key in k for k in adapter)]
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in model.lora_config.to_dict().items()}
    cfg.update(base_model_name_or_path=str(base_model), peft_type="LORA", task_type=None, modules_to_save=saved or None,
               target_modules=rf".*({'|'.join(parts)}).*\.({'|'.join(leaves)})")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1, default=str))
    if extra:
        save_file(extra, str(out / "non_lora_trainables.safetensors"), metadata={"format": "pt"})
    return out


def image_tensor(cfg: LlavaMedConfig, image) -> torch.Tensor:
    """A path, a PIL image or an already preprocessed tensor -> the model's input [3, S, S] (the config's own
    preprocessing: pad to square or not, its mean and std)."""
    if torch.is_tensor(image):
        return image
    image = image if isinstance(image, Image.Image) else load_image(image)
    return preprocess_image(image, cfg.image_size, cfg.image_mean, cfg.image_std, pad=cfg.image_aspect_ratio == "pad")


def generate_sharded(model, tokenizer, jobs: list[dict], batch_size: int = 16, rank: int = 0, world: int = 1,
                     desc: str = "generate", seed: int | None = None, **gen_kwargs) -> list[str]:
    """Answers for every job {"turns": [(role, text), ...] ending with a user turn (or "prompt": token ids with the
    image tokens expanded), "images": [path | PIL | tensor], "system"?: str}. The jobs are cut into fixed batches (the same for any number of ranks, so the answers and the
    sampling seeds, seed + batch number, do not depend on it); batch b runs on rank b % world, a rank with fewer
    batches repeats one so every rank makes the same forwards (FSDP2's collectives stay in step); the answers are
    gathered on every rank. For a sharded or a plain model, in one process or under torchrun."""
    import torch.distributed as dist
    from tqdm import tqdm

    cfg = model.config
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(jobs)))) for i in range(0, len(jobs), batch_size)]
    answers = {}
    for r in tqdm(range(-(-len(batches) // world)), desc=desc, disable=rank != 0, leave=False):
        b = r * world + rank
        idx = batches[min(b, len(batches) - 1)]
        prompts = [jobs[i]["prompt"] if "prompt" in jobs[i] else tokenize_prompt(  # token ids, or turns to render
            tokenizer, place_image_markers(jobs[i]["turns"], len(jobs[i]["images"])), cfg.template,
            cfg.num_image_tokens, cfg.image_token_id, jobs[i].get("system")) for i in idx]
        pix = [image_tensor(cfg, im) for i in idx for im in jobs[i]["images"]]
        out = generate(model, tokenizer, prompts, torch.stack(pix) if pix else None,
                       seed=None if seed is None else seed + b, **gen_kwargs)
        if b < len(batches):
            answers.update(zip(idx, out))
    if hasattr(model, "reshard"):
        model.reshard()  # forwards without backward leave the FSDP2 root gathered; training must see the shards
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, answers)
        answers = {i: a for part in parts for i, a in part.items()}
    return [answers[i] for i in range(len(jobs))]


# ----------------------------------------------------------------------------------------------------------
# 7. Load and save. The on-disk layouts map onto our parameter names (spec 1.2): original LLaVA/LLaVA-Med/
#    HuatuoGPT-Vision, and llava-hf as transformers wrote it: language_model.model.* + language_model.lm_head.*
#    (< 4.52, and save_pretrained of 5.x, which converts back), model.language_model.* + lm_head.* (4.52-4.57,
#    and 5.x's in-memory names); the ViT with its vision_model. level or without it (transformers >= 5.6).
# ----------------------------------------------------------------------------------------------------------

KEY_RULES = [  # (regex on the checkpoint key, replacement) -> our name; first match wins. The ViT maps to
    # vision_tower.vision_model.*; load() drops that level where our CLIPVisionModel has none (transformers >= 5.6)
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower.vision_model.\1"),  # original
    (r"^model\.mm_projector\.(.*)$", r"projector.\1"),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower.vision_model.\1"),  # llava-hf
    (r"^(?:model\.)?multi_modal_projector\.linear_1\.(.*)$", r"projector.0.\1"),
    (r"^(?:model\.)?multi_modal_projector\.linear_2\.(.*)$", r"projector.2.\1"),
    (r"^model\.language_model\.(.*)$", r"language_model.model.\1"),  # llava-hf 4.52-4.57
    (r"^language_model\.(model\..*|lm_head\..*)$", r"language_model.\1"),  # llava-hf < 4.52 and 5.x save_pretrained
    (r"^model\.(.*)$", r"language_model.model.\1"),  # original: the LLM's own keys
    (r"^lm_head\.(.*)$", r"language_model.lm_head.\1"),
]
TO_LLAVA_HF = [  # our name -> llava-hf (transformers >= 4.52) name; the ViT keeps its "vision_model." level,
    # which every transformers version reads (5.x drops it from CLIPVisionModel and converts on load)
    (r"^vision_tower\.vision_model\.(.*)$", r"model.vision_tower.vision_model.\1"),
    (r"^vision_tower\.(.*)$", r"model.vision_tower.vision_model.\1"),
    (r"^projector\.0\.(.*)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^projector\.2\.(.*)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^language_model\.model\.(.*)$", r"model.language_model.\1"),
    (r"^language_model\.lm_head\.(.*)$", r"lm_head.\1"),
]


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _checkpoint_files(path: Path) -> list[Path]:
    """safetensors shards (via the index when there is one); a legacy pytorch_model*.bin as the last resort."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        return files
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ModelError(f"{path}: no *.safetensors (or pytorch_model*.bin) weights found")


def _iter_tensors(files):
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            else:  # legacy pickle: never execute code from it
                for k, v in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items():
                    yield k, v
        except Exception as e:  # a missing or truncated shard, a pickle holding more than tensors
            raise ModelError(f"{f}: cannot read weights ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device (no memory) while buffers (rotary inv_freq, CLIP position_ids) are
    real; the weights are then assigned from the checkpoint, so a 7B model is never materialised twice."""
    old = nn.Module.register_parameter

    def register(module, name, param):
        old(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _default_template(path: Path, lm_type: str, tokenizer, tower: str = "") -> str:
    """The chat template the checkpoint was trained with. The LM type alone does not say it: HuatuoGPT-Vision-34B is a
    Yi-34B `llava_llama` like LLaVA v1 (Vicuna), yet uses HuatuoGPT's <|user|>/<|assistant|> tags (spec 3.2, 3.3).
    HuatuoGPT-Vision shows itself by its ViT folder (mm_vision_tower "./vit/clip_vit_large_patch14_336"), the
    <|user|> chat template of its -hf copies, or a folder named like the release (cli.py's own test: 'huatuogpt')."""
    chat = str(getattr(tokenizer, "chat_template", None) or "") + "".join(
        f.read_text(errors="replace") for f in (path / "chat_template.json", path / "chat_template.jinja") if f.is_file())
    if named := re.search(r"llava_med\.py template (\w+)", chat):  # ours (save_llava_hf's chat_template.jinja)
        return named.group(1)
    if ("<|user|>" in chat and "<|assistant|>" in chat) or Path(tower).parts[:1] == ("vit",) \
            or "huatuogpt" in path.resolve().name.lower():
        return "huatuo"
    return {"mistral": "mistral_instruct", "qwen2": "huatuo"}.get(lm_type, "vicuna_v1")


def _config_from_checkpoint(path: Path, raw: dict, tokenizer) -> tuple[LlavaMedConfig, str]:
    """Our config from config.json (`raw`) of either layout. Returns (config, layout)."""
    mt = raw.get("model_type", "")
    if mt == "llava":  # llava-hf
        if raw.get("projector_hidden_act", "gelu") != "gelu":  # ours is LLaVA's mlp2x_gelu (exact GELU)
            raise ModelError(f"{path}: projector_hidden_act {raw['projector_hidden_act']!r} is not supported (gelu)")
        text = AutoConfig.for_model(**raw["text_config"])
        vision = CLIPVisionConfig(**{k: v for k, v in raw["vision_config"].items() if k != "model_type"})
        image_token_id = raw.get("image_token_index", raw.get("image_token_id", 32000))
        template = _default_template(path, text.model_type, tokenizer)
        cfg = LlavaMedConfig(text, vision, "mlp2x_gelu", raw.get("vision_feature_layer", -2),
                             raw.get("vision_feature_select_strategy", "default"), image_token_id,
                             raw.get("image_aspect_ratio", "pad"), template=template,  # ours: save_llava_hf's
                             max_length=raw.get("tokenizer_model_max_length",
                                                min(getattr(text, "max_position_embeddings", 4096), 4096)))
        pp = path / "preprocessor_config.json"
        if pp.exists():
            p = json.loads(pp.read_text())
            cfg.image_mean, cfg.image_std = tuple(p.get("image_mean", CLIP_MEAN)), tuple(p.get("image_std", CLIP_STD))
        return cfg, "llava-hf"
    if mt.startswith("llava_"):  # original LLaVA: llava_mistral, llava_llama, llava_qwen2 (not registered in transformers)
        base = mt[len("llava_"):]
        text_fields = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tokenizer_", "image_"))}
        text_fields.pop("model_type", None)
        text_fields.pop("architectures", None)
        text = AutoConfig.for_model(base, **text_fields)
        vision = _vision_config(raw.get("mm_vision_tower", ""), path)
        template = _default_template(path, base, tokenizer, raw.get("mm_vision_tower", ""))
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
        cfg = LlavaMedConfig(text, vision, raw.get("mm_projector_type", "linear"), raw.get("mm_vision_select_layer", -2),
                             "default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full",
                             image_token_id, raw.get("image_aspect_ratio", "pad"), template=template,
                             max_length=raw.get("tokenizer_model_max_length", 2048))
        return cfg, "original"
    raise ModelError(f"{path}/config.json: model_type {mt!r} is neither 'llava' (llava-hf) nor 'llava_*' (LLaVA)")


def _vision_config(tower: str, ckpt: Path) -> CLIPVisionConfig:
    """The ViT config named by mm_vision_tower: a local folder with config.json (HuatuoGPT ships ./vit/...),
    else the known OpenAI CLIP ViT-L/14 shapes (the weights themselves come from the checkpoint)."""
    for cand in (Path(tower), ckpt / tower):
        if (cand / "config.json").exists():
            raw = json.loads((cand / "config.json").read_text())
            return CLIPVisionConfig(**{k: v for k, v in raw.get("vision_config", raw).items() if k != "model_type"})
    if "clip-vit-large-patch14" in tower or "clip_vit_large_patch14" in tower:
        size = 336 if "336" in tower else 224
        return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=size, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5)
    raise ModelError(f"{ckpt}: unknown vision tower {tower!r}: put its config.json in a folder and set mm_vision_tower to it")


def load(name_or_path: str = "tiny", dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa", template: str | None = None, seed: int = 0):
    """Returns (model, tokenizer). `name_or_path`: "tiny" (random weights from a small config; offline tokenizer
    in data/tokenizer), or a folder in the original LLaVA(-Med)/HuatuoGPT-Vision layout or the llava-hf layout.
    dtype "auto" = bf16 on CUDA, fp32 on CPU. Weights are read from safetensors (legacy .bin with weights_only)."""
    device = torch.device(device)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    if name_or_path == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
        cfg = tiny_config(tokenizer)
        if template:
            cfg.template = template
        torch.manual_seed(seed)
        model = LlavaMed(cfg, attn_implementation)
        model.freeze_vision()
        return model.to(device=device, dtype=dtype), tokenizer

    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: {'no config.json in it' if path.is_dir() else 'no such folder'} "
                         f"(pass 'tiny' or a local checkpoint folder; nothing is downloaded)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}/config.json: not valid json ({e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}/config.json: expected a json object, got {type(raw).__name__}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing or broken tokenizer files raise many types
        raise ModelError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if IMAGE_MARKER not in tokenizer.get_vocab():  # original LLaVA-Med: no <image> token; llava-hf adds it as 32000
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    try:
        cfg, layout = _config_from_checkpoint(path, raw, tokenizer)
        if template:
            cfg.template = template
        with _params_on_meta():
            model = LlavaMed(cfg, attn_implementation)
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a field missing or of the wrong kind, an unknown LM type
        raise ModelError(f"{path}/config.json: cannot build the model from it ({type(e).__name__}: {e})") from None
    expected = {k: v for k, v in model.state_dict().items()}
    state, unexpected, mismatched = {}, [], []
    for key, tensor in _iter_tensors(_checkpoint_files(path)):
        ours = _rename(key, KEY_RULES)
        if ours is not None and ours not in expected and ours.startswith("vision_tower.vision_model."):
            ours = "vision_tower." + ours[len("vision_tower.vision_model."):]  # CLIPVisionModel flat (transformers >= 5.6)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs config {tuple(expected[ours].shape)}")
            continue
        state[ours] = tensor.to(device=device, dtype=dtype)
    if getattr(cfg.text_config, "tie_word_embeddings", False) and "language_model.lm_head.weight" not in state:
        state["language_model.lm_head.weight"] = state.get("language_model.model.embed_tokens.weight")
    missing = [k for k in expected if k not in state and not k.endswith(("position_ids", "inv_freq"))]
    if mismatched or missing:
        raise ModelError(f"{path}: checkpoint does not match its config: shape mismatches ({len(mismatched)}): "
                         f"{mismatched[:20]}; missing keys ({len(missing)}): {missing[:20]}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(cfg.text_config, "tie_word_embeddings", False):
        model.language_model.tie_weights()
    for name, buf in model.named_buffers():  # non-persistent buffers were built on CPU in fp32
        if buf.device != device:
            mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            mod._buffers[name.rsplit(".", 1)[-1]] = buf.to(device)
    model.freeze_vision()
    model.loaded_from = (str(path), layout, unexpected)
    return model, tokenizer


def state_dict_llava_hf(model: LlavaMed) -> tuple[dict, int]:
    """Our weights under llava-hf (>= 4.52) names, with the vocabulary grown to hold the image token if needed
    (padded to a multiple of 64 like transformers' converter; new rows = mean of the old ones)."""
    sd = {}
    for k, v in model.state_dict().items():
        name = _rename(k, TO_LLAVA_HF)
        if name is not None and not k.endswith(("position_ids", "inv_freq")):
            sd[name] = v.detach().to("cpu").contiguous()
    vocab = model.config.text_config.vocab_size
    if model.config.image_token_id >= vocab:
        new_vocab = (model.config.image_token_id + 1 + 63) // 64 * 64
        for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            w = sd[name]
            sd[name] = torch.cat([w, w.mean(0, keepdim=True).expand(new_vocab - vocab, -1)]).contiguous()
        vocab = new_vocab
    if getattr(model.config.text_config, "tie_word_embeddings", False):  # one tensor, written once: transformers
        sd.pop("lm_head.weight")  # re-ties it on load (its save_pretrained leaves it out too; safetensors refuses both)
    return sd, vocab


def save_llava_hf(model: LlavaMed, tokenizer, out_dir, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a checkpoint that `transformers.LlavaForConditionalGeneration.from_pretrained` and vLLM load:
    config.json (LlavaConfig), safetensors shards (+ index), tokenizer, preprocessor/processor configs.
    Note: llava-hf processors resize + centre-crop and do not pad to square; pad images yourself for LLaVA-1.5
    parity (preprocess_image does)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd, vocab = state_dict_llava_hf(model)
    text = cfg.text_config.to_dict()
    text["vocab_size"] = vocab
    for k in ("_attn_implementation", "_attn_implementation_autoset"):
        text.pop(k, None)
    text["architectures"] = [type(model.language_model).__name__]  # not the original's Llava*: vLLM builds the LM by it
    vision = cfg.vision_config.to_dict()
    vision.pop("_attn_implementation", None)
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"llava-hf has only the mlp2x_gelu projector; this model has {cfg.projector_type}")
    dtype = next(model.parameters()).dtype
    hf_cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id, projector_hidden_act="gelu",
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, vision_feature_layer=cfg.vision_feature_layer,
        image_seq_length=cfg.num_image_tokens, tie_word_embeddings=getattr(cfg.text_config, "tie_word_embeddings", False))
    hf_cfg.architectures = ["LlavaForConditionalGeneration"]
    hf_cfg.dtype = str(dtype).replace("torch.", "")
    hf_cfg.image_aspect_ratio, hf_cfg.tokenizer_model_max_length = cfg.image_aspect_ratio, cfg.max_length  # LLaVA's
    # own config names: load() reads them back (transformers keeps and ignores them), the template is in its jinja
    hf_cfg.save_pretrained(out)
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = sd[k], size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat_template_jinja(cfg.template))  # the processor's, and vLLM's
    size = cfg.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std), "do_convert_rgb": True}, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "patch_size": cfg.vision_config.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy, "image_token": IMAGE_MARKER,
        "num_additional_image_tokens": 1}, indent=2))
    return out


def save_llava_original(model, tokenizer, out_dir) -> Path:
    """The model in the original LLaVA layout (config model_type llava_<lm>, mm_projector_type, keys
    model.mm_projector.*, model.vision_tower.vision_tower.vision_model.*, model.*, lm_head.*), which
    llava_med.load reads back. llava-hf has no cluster projector, so this is how a stage model is kept."""
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
    if getattr(cfg.text_config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight")  # tied: the loaders re-tie it (safetensors refuses two names of one tensor)
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


def save_merged(model: LlavaMed, tokenizer, out_dir, rank: int = 0, layout: str = "llava-hf") -> LlavaMed:
    """The model with its LoRA merged (whole tensors gathered: every rank calls), written by rank 0 as a llava-hf
    checkpoint or in the original LLaVA layout (the one that holds a cluster projector) under a temporary name and
    renamed, so a crash never leaves half a model. Returns the merged plain model."""
    merged = merge_lora(model, full_state_dict(model))
    if rank == 0:
        out = Path(out_dir)
        tmp = (save_llava_hf if layout == "llava-hf" else save_llava_original)(merged, tokenizer, out.with_name(f".{out.name}.tmp"))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return merged


def save_trained(model: LlavaMed, tokenizer, out, rank: int, base: str, full_finetune: bool = False,
                 export_merged: bool = False, tune_projector: bool = False):
    """What a preference run leaves in `out`: LoRA -> a PEFT adapter in out/adapter on `base` (the model it was
    trained from; the projector too when it was trained); full fine-tuning, or export_merged -> the merged model as a
    llava-hf checkpoint in out/llava_hf (transformers, vLLM). Whole tensors are gathered on every rank (every rank
    calls); rank 0 writes."""
    state = full_state_dict(model)
    if rank == 0 and not full_finetune:
        save_peft_adapter(model, state, Path(out) / "adapter", base, ("projector.",) if tune_projector else ())
    if rank == 0 and (export_merged or full_finetune):
        save_llava_hf(merge_lora(model, state), tokenizer, Path(out) / "llava_hf")


# ----------------------------------------------------------------------------------------------------------
# 8. Evaluation shared by the recipes: Med-VQA test sets (LLaVA-Med test.json, VQA-RAD, SLAKE), LLaVA-Med's
#    released scorer (v1.0.0 llava/eval: normalize_word, calculate_f1score, run_eval(_batch).py) exactly, and
#    the report-generation metrics
# ----------------------------------------------------------------------------------------------------------

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


def token_recall(prediction: str, reference: str, compat: bool = False) -> tuple[float, float, float]:
    """(precision, recall, f1) over normalised whitespace tokens.
    Default: a reference token is matched at most as often as it occurs (clipped counts, as SQuAD's token F1), so
    "effusion effusion" recalls 1/2 of "pleural effusion".
    compat=True: LLaVA-Med's calculate_f1score (eval_metrics/evaluate_metrics.py) as run_eval.py calls it, quirks
    included: (1) the answers are normalised twice (evaluate() normalises them, calculate_f1score again; only an
    answer with more than 32 periods notices); (2) true positives are counted on the prediction side, so a repeated
    matching word counts every time ("effusion effusion" recalls 2/3 of "pleural effusion"); (3) all zero when
    either side is empty or nothing matches."""
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


def yes_no(prediction: str) -> str | None:
    """The first word of the normalised answer that is 'yes' or 'no' ("Answer:no" counts; 'normal', 'note' or
    'know' never count as 'no'), else None."""
    for w in re.findall(r"\w+", normalize_answer(prediction)):
        if w in ("yes", "no"):
            return w
    return None


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


def read_vqa(path: str, image_folder: str = "") -> list[dict]:
    """One reader for the VQA test sets users have; returns [{"id","image","question","answer","answer_type"}]
    with absolute image paths. Formats: LLaVA-Med test.json / toy test_vqa.json ("conversations" + answer_type),
    VQA-RAD (MEVF testset.json, or the OSF public json: its test_freeform/test_para rows), SLAKE (English rows)."""
    path = Path(path)
    rows = []
    for where, rec in read_records(path):
        if "conversations" in rec or "conversatons" in rec:
            turns = record_turns(rec, where)
            folder = Path(image_folder or path.parent)
            rows.append({"id": rec.get("id", where), "image": str(folder / rec["image"]),
                         "question": turns[0][1].replace(IMAGE_MARKER, "").strip(), "answer": turns[1][1],
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
            raise DataError(f"{where}: unknown VQA record (expected conversations, image_name or img_name)")
    return rows



# Report generation (MMed-RAG Table 2, MMedPO Table 1): BLEU-1..4 over the corpus, ROUGE-L and METEOR per report,
# on lower-cased word tokens; hand-written, tested against sacrebleu and rouge-score.


def report_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, as pycocoevalcap's PTB tokenizer does before scoring."""
    return re.findall(r"\w+", text.lower())


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4, tokens=report_tokens) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n] in % over the corpus (Papineni et al. 2002): clipped n-gram counts summed over
    all sentences, geometric mean of the first n precisions, brevity penalty exp(1 - r/c) when the summed
    hypothesis length c is below the summed reference length r. No smoothing, as pycocoevalcap: a corpus with
    no matching n-gram scores 0 for that order and above. Equals sacrebleu's BLEU(tokenize="none",
    smooth_method="none", max_ngram_order=n) on report_tokens-joined text (tested); `tokens` splits a text
    (MedRegA's BLEU-1 passes its own)."""
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = tokens(hyp), tokens(ref)
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
# 9. Command line: ask a question about an image
# ----------------------------------------------------------------------------------------------------------


def ask(model, tokenizer, images: list, question: str, **gen_kwargs) -> str:
    """One question about zero or more PIL images; returns the answer text."""
    cfg = model.config
    turns = place_image_markers([("user", question)], len(images))
    prompt = tokenize_prompt(tokenizer, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)
    pix = torch.stack([preprocess_image(im, cfg.image_size, cfg.image_mean, cfg.image_std,
                                        pad=cfg.image_aspect_ratio == "pad") for im in images]) if images else None
    return generate(model, tokenizer, [prompt], pix, **gen_kwargs)[0]


def main():
    p = argparse.ArgumentParser(description="Ask a LLaVA-style medical model about an image.")
    p.add_argument("--model", default="tiny", help="'tiny' or a checkpoint folder (LLaVA-Med v1.5, HuatuoGPT-Vision, llava-hf)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--question", required=True)
    p.add_argument("--template", default=None, help="override the chat template: " + ", ".join(TEMPLATES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (LLaVA-Med's model_vqa default)")
    args = p.parse_args()
    try:
        model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, template=args.template)
        images = [load_image(f) for f in args.image]
    except DataError as e:  # a bad --model folder or image: one line, exit 2, like the method files
        print(f"llava_med.py: {'bad model' if isinstance(e, ModelError) else 'bad data'}: {e}", file=sys.stderr)
        sys.exit(2)
    model.eval()
    print(ask(model, tokenizer, images, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature))


if __name__ == "__main__":
    main()
