"""llava_med.py: parity with transformers' LlavaForConditionalGeneration, checkpoint layouts, templates, labels,
image preprocessing, bad records. All offline, CPU, tiny configs."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import llava_med as lm
from conftest import ROOT

TOY = ROOT / "data" / "toy"


@pytest.fixture(scope="module")
def tiny():
    model, tok = lm.load("tiny")
    return model.eval(), tok


@pytest.fixture(scope="module")
def hf_copy(tiny, tmp_path_factory):
    model, tok = tiny
    d = tmp_path_factory.mktemp("llava_hf")
    lm.save_llava_hf(model, tok, d)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    return hf, d


def _toy_sample(tok, cfg, k=0, split="train"):
    where, rec = lm.read_records(TOY / f"{split}.json")[k]
    turns = lm.place_image_markers(lm.record_turns(rec, where), 1, where)
    s = lm.tokenize_conversation(tok, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id, 512, where)
    s["pixel_values"] = lm.preprocess_image(lm.load_image(TOY / rec["image"]), cfg.image_size)[None]
    return s


# ---------------------------------------------------------------- parity with transformers


def test_logits_equal_llava_hf(tiny, hf_copy):
    model, tok = tiny
    hf, _ = hf_copy
    batch = lm.collate([_toy_sample(tok, model.config, k) for k in range(3)], tok.pad_token_id)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                 attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=0)


def test_multi_image_logits_equal_llava_hf(tiny, hf_copy):
    model, tok = tiny
    hf, _ = hf_copy
    cfg = model.config
    turns = lm.place_image_markers([("user", "Compare the two images."), ("assistant", "left upper lung")], 2)
    s = lm.tokenize_conversation(tok, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)
    assert s["n_images"] == 2 and s["input_ids"].count(cfg.image_token_id) == 2 * cfg.num_image_tokens
    imgs = [lm.load_image(TOY / "images" / f) for f in ("train_radiology_0000.png", "train_pathology_0001.png")]
    pix = torch.stack([lm.preprocess_image(im, cfg.image_size) for im in imgs])
    ids = torch.tensor([s["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pix).logits, hf(input_ids=ids, pixel_values=pix).logits, atol=1e-5, rtol=0)
    with pytest.raises(lm.DataError, match="image tokens"):  # one image for two markers
        model(ids, pix[:1])


@pytest.mark.parametrize("warnings_as_errors", [False, True])
def test_greedy_generation_equals_llava_hf(tiny, hf_copy, warnings_as_errors):
    """Greedy tokens equal LlavaForConditionalGeneration.generate's. With warnings_as_errors, our generate (prefill
    + cached decoding) runs with FutureWarning / DeprecationWarning raised as errors and transformers' own
    deprecation log lines counted: the decoder's KV-cache argument must be the current one."""
    import logging
    import warnings
    model, tok = tiny
    hf, _ = hf_copy
    cfg = model.config
    qs = ["Is there a nodule in this image?", "What imaging modality is this? Answer briefly please."]
    prompts = [lm.tokenize_prompt(tok, lm.place_image_markers([("user", q)], 1), cfg.template,
                                  cfg.num_image_tokens, cfg.image_token_id) for q in qs]
    pix = torch.stack([lm.preprocess_image(lm.load_image(TOY / "images" / f), cfg.image_size)
                       for f in ("test_radiology_0000.png", "test_ophthalmology_0001.png")])
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    tf_logger = transformers.utils.logging.get_logger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            if warnings_as_errors:
                warnings.simplefilter("error", FutureWarning)
                warnings.simplefilter("error", DeprecationWarning)
            texts = lm.generate(model, tok, prompts, pix, max_new_tokens=8, stop=[])
    finally:
        tf_logger.removeHandler(handler)
    assert not [m for m in logged if "deprecated" in m], logged
    ours = [tok.encode(t, add_special_tokens=False) for t in texts]
    batch = lm.collate([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
    with torch.no_grad():
        ref = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pix,
                          max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_text = [tok.decode([t for t in row.tolist() if t != tok.eos_token_id and t != tok.pad_token_id],
                           skip_special_tokens=True).strip() for row in ref[:, batch["input_ids"].shape[1]:]]
    assert [tok.decode(o) for o in ours] == ref_text


# ---------------------------------------------------------------- checkpoint layouts

V15_CONFIG = {  # field names of microsoft/llava-med-v1.5-mistral-7b config.json, dimensions shrunk
    "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["LlavaMistralForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "feature_outs": "encoder+decoder",
    "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 64, "image_aspect_ratio": "pad",
    "img_size": 640, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 32768,
    "mm_hidden_size": 32, "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "mm_vision_tower": "clip_tiny", "model_type": "llava_mistral",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "proj_vis_to_txt_tokens": False,
    "prompt_segtok_w_instruct": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "segtok_posembed": "sincos",
    "sliding_window": None, "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right", "torch_dtype": "bfloat16", "transformers_version": "4.36.2",
    "tune_mm_mlp_adapter": False, "tune_vision_tokenizer": "none", "use_cache": True, "use_mm_proj": True,
    "vision_backbone": "convnextlarge", "vocab_size": 2048}


def _write_original_checkpoint(d, tok_dir_src):
    """A tiny checkpoint in the original LLaVA-Med layout: llava_mistral config, sharded safetensors + index,
    model.mm_projector.0/2, model.vision_tower.vision_tower.vision_model.*, and a tokenizer WITHOUT <image>
    (LLaVA-Med v1.5 has vocab 32000 and no image token; the loader must add one outside the LM vocabulary)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(V15_CONFIG))
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=32, patch_size=8)
    (d / "clip_tiny").mkdir()
    vcfg.save_pretrained(d / "clip_tiny")
    torch.manual_seed(1)
    tcfg = transformers.MistralConfig(**{k: V15_CONFIG[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "rope_theta", "rms_norm_eps")})
    llm = transformers.MistralForCausalLM(tcfg)
    vit = transformers.CLIPVisionModel(vcfg)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    sd = {k: v for k, v in llm.state_dict().items()}  # model.embed_tokens..., model.layers..., lm_head
    sd.update({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    sd.update({"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
               for k, v in vit.state_dict().items() if "position_ids" not in k})
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(d / name), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    tj = json.loads((tok_dir_src / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<image>":
            t["content"] = "<unused_4>"
    tj["model"]["vocab"] = {("<unused_4>" if k == "<image>" else k): v for k, v in tj["model"]["vocab"].items()}
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((tok_dir_src / "tokenizer_config.json").read_text())
    tc.pop("extra_special_tokens", None)
    tc.pop("additional_special_tokens", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return sd


def test_original_layout_loads_and_matches_llava_hf_copy(tmp_path):
    src = tmp_path / "llava-med-v1.5-tiny"
    sd = _write_original_checkpoint(src, lm.TINY_TOKENIZER)
    model, tok = lm.load(str(src))
    model.eval()
    cfg = model.config
    assert cfg.template == "mistral_instruct" and cfg.projector_type == "mlp2x_gelu"
    assert cfg.image_token_id == 2048 == len(tok) - 1  # added outside the LM vocabulary, like llava-hf's 32000
    assert model.loaded_from[1] == "original" and model.loaded_from[2] == []  # every checkpoint key was used
    torch.testing.assert_close(model.projector[2].weight, sd["model.mm_projector.2.weight"])
    torch.testing.assert_close(model.vision_tower.get_submodule("encoder.layers.1.mlp.fc1").weight
                               if not hasattr(model.vision_tower, "vision_model") else
                               model.vision_tower.vision_model.encoder.layers[1].mlp.fc1.weight,
                               sd["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"])
    out = tmp_path / "hf"
    lm.save_llava_hf(model, tok, out)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.text_config.vocab_size == 2112  # grown to hold id 2048, padded to a multiple of 64
    turns = lm.place_image_markers([("user", "Is there a nodule?"), ("assistant", "yes")], 1)
    s = lm.tokenize_conversation(tok, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)
    pix = lm.preprocess_image(lm.load_image(TOY / "images" / "train_radiology_0000.png"), cfg.image_size)[None]
    ids = torch.tensor([s["input_ids"]])
    with torch.no_grad():
        ours = model(ids, pix).logits
        ref = hf(input_ids=ids, pixel_values=pix).logits[..., :2048]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # and our loader reads the llava-hf copy back to the same logits
    again, _ = lm.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, pix).logits[..., :2048], ours, atol=1e-5, rtol=0)


def test_llava_hf_old_key_era_loads(tiny, hf_copy, tmp_path):
    """transformers < 4.52 named keys language_model.model.*, multi_modal_projector.*, vision_tower.*"""
    model, tok = tiny
    _, d = hf_copy
    sd = load_file(str(d / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        k = k.replace("model.vision_tower.", "vision_tower.").replace("lm_head.", "language_model.lm_head.")
        old[k] = v
    for f in d.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(old, str(tmp_path / "model.safetensors"))
    again, _ = lm.load(str(tmp_path))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.fixture(scope="module")
def hf_saved(tiny, tmp_path_factory):
    """A random LlavaForConditionalGeneration (tiny model's shapes, built from config, offline) written by the
    installed transformers' own save_pretrained, with the tiny tokenizer."""
    _, tok = tiny
    cfg = lm.tiny_config(tok)
    hf_cfg = transformers.LlavaConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(), image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=cfg.num_image_tokens)
    torch.manual_seed(3)
    hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
    d = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return hf, d


def _llava_hf_layout(sd: dict, era: str, vit_level: bool) -> dict:
    """transformers' in-memory llava names -> the key layout one of its versions wrote: era "<4.52" (also what 5.x
    save_pretrained writes) or ">=4.52"; the ViT with or without its "vision_model." level (none from 5.6 on)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^model\.vision_tower\.(vision_model\.)?", "model.vision_tower." + "vision_model." * vit_level, k)
        if era == "<4.52":
            k = re.sub(r"^model\.language_model\.", "language_model.model.", k)
            k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
            k = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", k)
        out[k] = v
    return out


def _sample_inputs(tok, cfg):
    turns = lm.place_image_markers([("user", "Is there a nodule?"), ("assistant", "yes, left upper lung")], 1)
    s = lm.tokenize_conversation(tok, turns, cfg.template, cfg.num_image_tokens, cfg.image_token_id)
    pix = lm.preprocess_image(lm.load_image(TOY / "images" / "train_radiology_0000.png"), cfg.image_size)[None]
    return torch.tensor([s["input_ids"]]), pix


@pytest.mark.parametrize("layout", ["save_pretrained", "<4.52", "<4.52 no vision_model", ">=4.52", ">=4.52 no vision_model"])
def test_llava_hf_checkpoints_written_by_transformers_load(tiny, hf_saved, tmp_path, layout):
    """save_pretrained of the installed transformers -> lm.load -> the same logits; the same weights under every
    key layout transformers has written for Llava (hand-built from its state dict) load to the same logits too."""
    _, tok = tiny
    hf, d = hf_saved
    if layout == "save_pretrained":
        src = d
    else:
        src = tmp_path / "ckpt"
        src.mkdir()
        for f in d.iterdir():
            if f.suffix != ".safetensors":
                (src / f.name).write_bytes(f.read_bytes())
        era, _, rest = layout.partition(" ")
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        save_file(_llava_hf_layout(sd, era, vit_level=not rest), str(src / "model.safetensors"))
    model, _ = lm.load(str(src))
    assert model.loaded_from[1:] == ("llava-hf", [])  # every checkpoint key was used
    ids, pix = _sample_inputs(tok, model.config)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix).logits
        torch.testing.assert_close(model.eval()(ids, pix).logits, ref, atol=1e-5, rtol=0)


def test_save_llava_hf_loads_in_transformers_to_the_same_logits(tiny, hf_saved, tmp_path):
    """The reverse: a model loaded from transformers' own checkpoint, written by save_llava_hf, read by
    LlavaForConditionalGeneration.from_pretrained: the same logits as the model transformers started from."""
    _, tok = tiny
    hf, d = hf_saved
    model, _ = lm.load(str(d))
    lm.save_llava_hf(model, tok, tmp_path)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, pix = _sample_inputs(tok, model.config)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pix).logits,
                                   hf(input_ids=ids, pixel_values=pix).logits, atol=1e-5, rtol=0)


def test_shape_mismatch_names_the_keys(tiny, hf_copy, tmp_path):
    _, d = hf_copy
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 999
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lm.ModelError, match="mlp.gate_proj.weight") as e:
        lm.load(str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value) and "shape mismatches (" in str(e.value)


def test_model_folder_errors_are_one_line_model_errors(hf_copy, tmp_path):
    """A --model folder we cannot read raises ModelError (a DataError: the scripts exit 2 on it) with one line naming
    the folder and what is wrong."""
    _, d = hf_copy

    def folder(name, edit=None, drop=()):
        f = tmp_path / name
        f.mkdir()
        for src in d.iterdir():
            if src.name not in drop:
                (f / src.name).write_bytes(src.read_bytes())
        if edit:
            edit(f)
        return f

    cases = {
        "no such folder": tmp_path / "nonexistent",
        "no config.json": folder("noconfig", drop=("config.json",)),
        "not valid json": folder("badjson", lambda f: (f / "config.json").write_text('{"model_type": "llava",')),
        "model_type 'bert' is neither": folder("bert", lambda f: (f / "config.json").write_text('{"model_type": "bert"}')),
        "cannot build the model": folder("notext", lambda f: (f / "config.json").write_text('{"model_type": "llava"}')),
        "no \\*.safetensors": folder("noweights", drop=("model.safetensors",)),
        "cannot read weights": folder("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:5000])),
        r"missing keys \(1\)": folder("missing", lambda f: save_file(
            {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k != "lm_head.weight"},
            str(f / "model.safetensors"))),
    }
    for what, path in cases.items():
        with pytest.raises(lm.ModelError, match=what) as e:
            lm.load(str(path))
        assert isinstance(e.value, lm.DataError) and "\n" not in str(e.value) and str(path) in str(e.value), what
    out = subprocess.run([sys.executable, str(ROOT / "llava_med.py"), "--model", str(tmp_path / "nonexistent"),
                          "--question", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("llava_med.py: bad model: ") and "Traceback" not in out.stderr


def _checkpoint_config(d, raw, files=None):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    return lm._config_from_checkpoint(d, raw, lm.AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER))[0]


def test_template_follows_what_the_checkpoint_is(tmp_path):
    """The template comes from what the checkpoint is, not only its LM type: HuatuoGPT-Vision-34B is a `llava_llama`
    (Yi-34B) like LLaVA v1, but is prompted with <|user|>/<|assistant|> (spec 3.2, 3.3). Field names from the
    released config.json files, dimensions shrunk."""
    lm_dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048)
    mm = dict(mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
              mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
              image_aspect_ratio="pad", tokenizer_padding_side="right", use_mm_proj=True)
    openai = "openai/clip-vit-large-patch14-336"
    huatuo_vit = "./vit/clip_vit_large_patch14_336"  # HuatuoGPT-Vision ships its ViT config in the checkpoint folder
    llava_med = dict(V15_CONFIG, mm_vision_tower=openai)
    llava_v1 = dict(lm_dims, **mm, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                    _name_or_path="lmsys/vicuna-7b-v1.5", mm_vision_tower=openai, tokenizer_model_max_length=2048)
    huatuo_7b = dict(lm_dims, **mm, architectures=["LlavaQwen2ForCausalLM"], model_type="llava_qwen2", bos_token_id=151643,
                     eos_token_id=151643, mm_vision_tower=huatuo_vit, tokenizer_model_max_length=4096, rope_theta=1e6)
    huatuo_34b = dict(lm_dims, **mm, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", bos_token_id=1,
                      eos_token_id=2, mm_vision_tower=huatuo_vit, tokenizer_model_max_length=4096, rope_theta=5e6)
    huatuo_34b["tokenizer_padding_side"] = "left"
    assert _checkpoint_config(tmp_path / "a", llava_med).template == "mistral_instruct"
    assert _checkpoint_config(tmp_path / "b", llava_v1).template == "vicuna_v1"
    assert _checkpoint_config(tmp_path / "c", huatuo_7b).template == "huatuo"
    cfg = _checkpoint_config(tmp_path / "d", huatuo_34b)
    assert cfg.template == "huatuo" and cfg.text_config.model_type == "llama" and cfg.image_size == 336
    # cli.py's own rule: a folder named like the release (here with a ViT named like OpenAI's)
    assert _checkpoint_config(tmp_path / "HuatuoGPT-Vision-34B", dict(huatuo_34b, mm_vision_tower=openai)).template == "huatuo"
    # llava-hf copies: the LM type, and for a Llama LM the chat template shipped with the checkpoint
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    hf = lambda text: dict(model_type="llava", text_config=dict(lm_dims, **text), vision_config=vision, image_token_index=2047)
    vicuna_chat = "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}{% endfor %}ASSISTANT:"
    huatuo_chat = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '\\n' }}{% else %}"
                   "{{ '<|assistant|>\\n' + m['content'] + '\\n' }}{% endif %}{% endfor %}<|assistant|>")
    llama = hf({"model_type": "llama"})
    assert _checkpoint_config(tmp_path / "e", hf({"model_type": "mistral"})).template == "mistral_instruct"
    assert _checkpoint_config(tmp_path / "f", llama, {"chat_template.jinja": vicuna_chat}).template == "vicuna_v1"
    assert _checkpoint_config(tmp_path / "g", llama, {"chat_template.jinja": huatuo_chat}).template == "huatuo"  # -34B-hf
    assert _checkpoint_config(tmp_path / "h", hf({"model_type": "qwen2"})).template == "huatuo"


# ---------------------------------------------------------------- templates (exact strings from the spec)


def test_template_strings():
    mi = [("user", "<image>\nQ1?"), ("assistant", "A1."), ("user", "Q2?"), ("assistant", "A2.")]
    assert lm.render_chat("mistral_instruct", mi) == "[INST] <image>\nQ1? [/INST] A1. </s>[INST] Q2? [/INST] A2. </s>"
    assert lm.render_chat("mistral_instruct", [("user", "<image>\nIs there a pneumothorax?")], add_generation_prompt=True) \
        == "[INST] <image>\nIs there a pneumothorax? [/INST]"
    assert lm.render_chat("vicuna_v1", mi) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? "
        "ASSISTANT: A2.</s>")
    assert lm.render_chat("vicuna_v1", mi[:1], add_generation_prompt=True).endswith("USER: <image>\nQ1? ASSISTANT:")
    assert lm.render_chat("mistral_instruct", mi[:2], system="You are a radiologist.") == (  # LLaVA's LLAMA_2 style
        "[INST] <<SYS>>\nYou are a radiologist.\n<</SYS>>\n\n<image>\nQ1? [/INST] A1. </s>")
    assert lm.render_chat("huatuo", mi[:1], add_generation_prompt=True) == "<|user|>\n<image>\nQ1?\n<|assistant|>\n"
    assert lm.render_chat("huatuo", mi[:2], eos="<|endoftext|>") == "<|user|>\n<image>\nQ1?\n<|assistant|>\nA1.<|endoftext|>"
    assert lm.render_chat("chatml", mi[:2]) == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                                                "<image>\nQ1?<|im_end|><|im_start|>assistant\nA1.<|im_end|>")


def test_generation_is_cut_at_the_first_stop_string(tiny):
    """Several stop strings completed by one token: the text ends before the earliest (it ended before the one
    listed last)."""
    model, tok = tiny
    cfg = model.config
    pix = lm.preprocess_image(lm.load_image(TOY / "images" / "test_radiology_0000.png"), cfg.image_size)[None]
    for q in ("Is there a nodule?", "What is seen?", "Describe the image.", "Where is it?", "What modality?"):
        prompt = [lm.tokenize_prompt(tok, lm.place_image_markers([("user", q)], 1), cfg.template, cfg.num_image_tokens,
                                     cfg.image_token_id)]
        first = lm.generate(model, tok, prompt, pix, max_new_tokens=1, stop=[])[0]
        if len(first) >= 2 and first[0] != first[-1]:
            break
    else:
        pytest.fail("no first token of two or more characters")
    assert lm.generate(model, tok, prompt, pix, max_new_tokens=4, stop=[first[0], first[-1]])[0] == ""
    assert lm.generate(model, tok, prompt, pix, max_new_tokens=4, stop=[first[-1]])[0] == first[:-1].strip()


def test_sampling_keeps_the_top_k_and_the_smallest_top_p_set():
    """top-k / top-p filtering as transformers' TopKLogitsWarper / TopPLogitsWarper: the smallest set of the most
    probable tokens whose mass reaches top_p (four equal tokens, top_p 0.5: two of them, not three)."""
    g = torch.Generator().manual_seed(0)
    draw = lambda logits, **kw: {int(lm._sample_next(logits, 1.0, kw.get("top_k", 0), kw.get("top_p", 1.0), g))
                                 for _ in range(400)}
    assert len(draw(torch.zeros(1, 4), top_p=0.5)) == 2 and len(draw(torch.zeros(1, 4), top_p=0.51)) == 3
    assert draw(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), top_k=2) == {0, 1}
    assert draw(torch.tensor([[9.0, 0.0, 0.0]]), top_p=0.5) == {0} and draw(torch.zeros(1, 3)) == {0, 1, 2}
    assert int(lm._sample_next(torch.tensor([[0.0, 5.0, 1.0]]), 0.0, 0, 1.0, g)) == 1  # temperature 0: greedy


def test_image_markers_are_placed_as_llava_does():
    """tests/fixtures/llava_preprocess_multimodal.json: LLaVA's preprocess_multimodal (commit in the file) on markers at
    the start, the end, the middle ("A\\n<image>\\nB" -> "A\\n\\nB"; ours gave "A\\nB") and with spaces; later
    turns without a marker are left as they are (ours stripped them)."""
    fx = json.loads((ROOT / "tests" / "fixtures" / "llava_preprocess_multimodal.json").read_text(encoding="utf-8"))
    assert len(fx["cases"]) == 5
    for c in fx["cases"]:
        turns = [(("user", "assistant")[i % 2], t) for i, t in enumerate(c["input"])]
        assert [t for _, t in lm.place_image_markers(turns, 1)] == c["output"]


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_ids_are_those_llava_trained_on(legacy):
    """tests/fixtures/llava_tokenizer_image_token.json: the ids of LLaVA's own tokenizer_image_token on prompts its
    conversation.py renders (source in the file: upstream commit, how it was run), with a SentencePiece-style BPE
    tokenizer (Metaspace '▁', byte fallback; vocabulary and merges in the file) as the slow legacy Llama tokenizer
    LLaVA trained with. Ours give the same ids, single- and multi-turn, whichever `legacy` flag the tokenizer loads
    with (legacy=False before: the '▁' after <image> and after </s> was missing)."""
    from transformers import LlamaTokenizer
    fx = json.loads((ROOT / "tests" / "fixtures" / "llava_tokenizer_image_token.json").read_text(encoding="utf-8"))
    tok = LlamaTokenizer(vocab=fx["vocab"], merges=[tuple(m) for m in fx["merges"]], legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    img = tok.convert_tokens_to_ids("<image>")
    assert img == fx["image_token_id"] and len(fx["cases"]) == 10
    for c in fx["cases"]:
        turns = [tuple(t) for t in c["turns"]]
        assert lm.render_chat(c["template"], turns, add_generation_prompt=turns[-1][0] == "user") == c["prompt"]
        ours = (lm.tokenize_prompt(tok, turns, c["template"], 1, img) if turns[-1][0] == "user" else
                lm.tokenize_conversation(tok, turns, c["template"], 1, img)["input_ids"])
        assert ours == c["input_ids"], (c["template"], len(turns), tok.convert_ids_to_tokens(ours))


@pytest.mark.parametrize("template", sorted(lm.TEMPLATES))
def test_labels_are_exactly_the_answers(tiny, template):
    model, tok = tiny
    turns = [("user", "<image>\nIs there a nodule in this image?"), ("assistant", "yes"),
             ("user", "Where is it?"), ("assistant", "left upper lung"), ("user", "描述图像。"), ("assistant", "左上肺可见结节。")]
    s = lm.tokenize_conversation(tok, turns, template, 16, model.config.image_token_id)
    ids, labels = s["input_ids"], s["labels"]
    assert len(ids) == len(labels)
    # the pieces decode to the rendered string (after collapsing the expanded image tokens)
    collapsed, prev = [], None
    for t in ids:
        if not (t == model.config.image_token_id and prev == t):
            collapsed.append(t)
        prev = t
    bos = tok.bos_token if lm.TEMPLATES[template][0] else ""
    assert tok.decode(collapsed) == bos + lm.render_chat(template, turns, eos=tok.eos_token)
    # supervised tokens: each answer with its end-of-turn marker, nothing else
    spans, cur = [], []
    for t, l in zip(ids, labels):
        if l != lm.IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    end = {"mistral_instruct": " </s>", "vicuna_v1": "</s>", "huatuo": "</s>", "chatml": "<|im_end|>"}[template]
    lead = " " if template in ("mistral_instruct", "vicuna_v1") else ""
    assert spans == [lead + a + end for a in ("yes", "left upper lung", "左上肺可见结节。")]


def test_no_supervised_token_after_truncation_raises(tiny):
    model, tok = tiny
    turns = lm.place_image_markers([("user", "Describe the image in detail please."), ("assistant", "yes")], 1)
    with pytest.raises(lm.DataError, match="no supervised token"):
        lm.tokenize_conversation(tok, turns, "mistral_instruct", 16, model.config.image_token_id, max_length=28, where="x.json[3]")
    with pytest.raises(lm.DataError, match=r"x.json\[3\].*cut\s+through image tokens"):
        lm.tokenize_conversation(tok, turns, "mistral_instruct", 16, model.config.image_token_id, max_length=10, where="x.json[3]")


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("size_wh", [(80, 50), (50, 90), (64, 64)])
def test_preprocess_matches_clip_image_processor(size_wh):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    ref = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(lm.preprocess_image(img, 48, pad=False), ref, atol=1e-5, rtol=0)
    padded = lm.expand2square(img, tuple(int(x * 255) for x in lm.CLIP_MEAN))
    ref = torch.as_tensor(np.asarray(proc(images=padded, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(lm.preprocess_image(img, 48), ref, atol=1e-5, rtol=0)
    if size_wh[0] != size_wh[1]:  # the pad colour is the CLIP mean: (122, 116, 104)
        assert padded.getpixel((0, 0)) in ((122, 116, 104), tuple(img.getpixel((0, 0))))


def test_grayscale_and_bad_image(tmp_path):
    Image.fromarray(np.full((20, 30), 200, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    x = lm.preprocess_image(lm.load_image(tmp_path / "g.png"), 32)
    assert x.shape == (3, 32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(lm.DataError, match="bad.png"):
        lm.load_image(tmp_path / "bad.png")
    with pytest.raises(lm.DataError, match="not found"):
        lm.load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- records


def test_bad_records_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    good = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    f.write_text(json.dumps(good) + "\n" + '{"id": "b", "conversations": [\n')
    with pytest.raises(lm.DataError, match=r"d.jsonl:2: malformed json"):
        lm.read_records(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"id": "c", "image": "x.png"}) + "\n")
    (where, rec), (where2, rec2) = lm.read_records(f)
    assert lm.record_turns(rec, where)[0] == ("user", "<image>\nq")
    with pytest.raises(lm.DataError, match=r"d.jsonl:2: missing or empty 'conversations'"):
        lm.record_turns(rec2, where2)
    bad = dict(good, conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}])
    with pytest.raises(lm.DataError, match="empty answer"):
        lm.record_turns(bad, "d.jsonl:7")
    bad = dict(good, conversations=[{"from": "gpt", "value": "a"}])
    with pytest.raises(lm.DataError, match="alternate"):
        lm.record_turns(bad, "d.jsonl:8")
    with pytest.raises(lm.DataError, match="2 '<image>' markers but 1 images"):
        lm.place_image_markers([("user", "<image>\n<image>\nq"), ("assistant", "a")], 1, "d.jsonl:9")
    # markers at the end (LLaVA-Med instruct data) or absent (PubMedVision) are moved to the front
    assert lm.place_image_markers([("user", "Describe.\n<image>"), ("assistant", "a")], 1)[0][1] == "<image>\nDescribe."
    assert lm.place_image_markers([("user", "Describe."), ("assistant", "a")], 2)[0][1] == "<image>\n<image>\nDescribe."
    (tmp_path / "l.json").write_text("[1, 2")
    with pytest.raises(lm.DataError, match=r"l.json:1: malformed json"):
        lm.read_records(tmp_path / "l.json")
    (tmp_path / "u.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(lm.DataError, match="UTF-8"):
        lm.read_records(tmp_path / "u.json")


def test_forward_without_supervised_tokens_raises(tiny):
    model, tok = tiny
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(lm.DataError, match="no supervised token"):
        model(ids, labels=torch.full_like(ids, lm.IGNORE_INDEX))


def test_cli_answers(tmp_path):
    img = TOY / "images" / "test_radiology_0000.png"
    out = subprocess.run([sys.executable, str(ROOT / "llava_med.py"), "--model", "tiny", "--image", str(img),
                          "--question", "Is there a nodule?", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model, tok = lm.load("tiny")  # the CLI's model (seed 0): its printed answer is this model's greedy answer
    want = lm.ask(model.eval(), tok, [lm.load_image(img)], "Is there a nodule?", max_new_tokens=4)
    assert out.stdout.strip() == want and want  # four random tokens: never empty


def test_bad_image_files(tmp_path, monkeypatch):
    src = TOY / "images" / "train_radiology_0000.png"
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(lm.DataError, match="zero.png: cannot open image"):
        lm.load_image(tmp_path / "zero.png")
    buf = tmp_path / "full.jpg"
    Image.open(src).convert("RGB").save(buf, quality=95)
    (tmp_path / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    with pytest.raises(lm.DataError, match="truncated.jpg: cannot open image"):
        lm.load_image(tmp_path / "truncated.jpg")
    (tmp_path / "png_named.jpg").write_bytes(src.read_bytes())  # wrong extension: the content decides
    assert lm.load_image(tmp_path / "png_named.jpg").size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px is over the (patched) bomb limit
    with pytest.raises(lm.DataError, match="too large"):
        lm.load_image(src)


def test_image_paths_may_not_leave_the_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    assert lm.resolve_image(tmp_path / "imgs", "a/b.png") == (tmp_path / "imgs" / "a" / "b.png").resolve()
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../x.png"):
        with pytest.raises(lm.DataError, match="leaves the image folder"):
            lm.resolve_image(tmp_path / "imgs", bad, "d.json[0]")
    assert lm.resolve_image(tmp_path / "imgs", "/etc/passwd", allow_outside=True) == __import__("pathlib").Path("/etc/passwd")


class _Evil:  # a pickle that would run code when loaded without weights_only
    def __reduce__(self):
        return (print, ("pwned",))


def test_legacy_bin_is_read_with_weights_only(tiny, hf_copy, tmp_path):
    model, _ = tiny
    _, d = hf_copy
    for f in d.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(d / "model.safetensors"))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    again, _ = lm.load(str(tmp_path))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    torch.save({**sd, "evil": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        lm.load(str(tmp_path))


# ---------------------------------------------------------------- cluster projector vs the released module


def test_cluster_projector_equals_released_clustering():
    """Outputs of the unmodified released `Clustering` (STLLaVA-Med cluster.py; SQ-LLaVA's is the same), run with
    the weights and input stored in the fixture (its metadata names the commit). The release normalises each
    channel of v(x) across the tokens; normalising each token across the channels differs by 0.026 here."""
    from safetensors import safe_open
    with safe_open(str(ROOT / "tests" / "fixtures" / "cluster_upstream_stllava_med.safetensors"), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["commit"] == "9113c41f13de3234d13db3ca154b2cb9b9e3779a"
    args = json.loads(meta["args"])
    p = lm.build_projector(f"cluster{args['num_centers']}", args["channels"], args["channels_out"])
    assert p.iterations == args["num_clusters"]
    p.load_state_dict({k.removeprefix("state."): v for k, v in t.items() if k.startswith("state.")})  # strict: same names
    with torch.no_grad():
        y = p(t["input"])
    assert y.shape == t["output"].shape
    torch.testing.assert_close(y, t["output"], atol=1e-5, rtol=0)


def test_grey_images_pad_like_released_llava_med():
    """Outputs of the released LLaVA-Med v1.5 image path (model_vqa.py opens without .convert('RGB'); mm_utils.py
    process_images pads a mode-L image with grey int(255 * mean(image_mean)) = 114, others with the mean colour),
    run on the fixture PNGs with the jitter draw at LLaVA's centred offset (fixture metadata names the commit)."""
    from safetensors import safe_open
    fx = ROOT / "tests" / "fixtures"
    with safe_open(str(fx / "llava_med_pad_upstream.safetensors"), "pt") as f:
        meta, ref = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["commit"] == "d406e3fc7c3d1e4c797a7676de18cbfd070b6d2c" and len(ref) == 3
    for name, expected in ref.items():
        im = lm.load_image(fx / name)
        assert im.mode == ("L" if "gray" in name else "RGB")
        torch.testing.assert_close(lm.preprocess_image(im, 32), expected, atol=1e-5, rtol=0)
    grey_pad = (114 / 255 - np.asarray(lm.CLIP_MEAN)) / np.asarray(lm.CLIP_STD)
    torch.testing.assert_close(ref["llava_med_gray_wide.png"][:, 0, 0].double(), torch.from_numpy(grey_pad), atol=1e-5, rtol=0)


@pytest.mark.parametrize("template", sorted(lm.TEMPLATES))
def test_the_llava_hf_export_keeps_its_template_max_length_and_padding(tiny, tmp_path, template):
    """save_llava_hf -> lm.load gives the same chat template, max length and image padding (before: a HuatuoGPT-
    Vision-34B, a Llama LM, came back as vicuna_v1, LLaVA-Med's 2048 as 4096, "crop" as "pad"), and the export's
    chat_template.jinja makes transformers' processor render what render_chat does (vLLM's chat API reads it too)."""
    model, tok = lm.load("tiny", template=template)
    model.config.image_aspect_ratio, model.config.max_length = "crop", 1234
    lm.save_llava_hf(model, tok, tmp_path)
    back = lm.load(str(tmp_path))[0].config
    assert (back.template, back.max_length, back.image_aspect_ratio) == (template, 1234, "crop")
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["architectures"] == ["MistralForCausalLM"]
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    turns = [("user", "<image>\nQ1?"), ("assistant", "A1."), ("user", "Q2?")]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Q1?"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A1."}]},
                {"role": "user", "content": [{"type": "text", "text": "Q2?"}]}]
    bos = tok.bos_token if lm.TEMPLATES[template][0] else ""
    assert processor.apply_chat_template(messages, tokenize=False) == bos + lm.render_chat(
        template, turns, eos=tok.eos_token, add_generation_prompt=True, system="Be brief.")
    assert processor.apply_chat_template(messages[1:], tokenize=False) == bos + lm.render_chat(
        template, turns, eos=tok.eos_token, add_generation_prompt=True)


def test_a_projector_activation_other_than_gelu_is_refused(hf_saved, tmp_path):
    _, d = hf_saved  # a quick_gelu projector loaded as GELU changed the logits by 2e-2, silently
    shutil.copytree(d, tmp_path / "q")
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**raw, "projector_hidden_act": "quick_gelu"}))
    with pytest.raises(lm.ModelError, match="projector_hidden_act 'quick_gelu' is not supported"):
        lm.load(str(tmp_path / "q"))


def test_tied_embeddings_save_merge_and_export(tiny, tmp_path):
    """A tied LLM (Qwen2 0.5B/1.5B, Llama 3.2): the checkpoint transformers' save_pretrained writes (no lm_head)
    loads tied; merge_lora keeps it tied (assign=True made two Parameters, parted by the first .to()); both savers
    write it once (safetensors refused two names of one tensor) and transformers reads the export back exactly."""
    _, tok = tiny
    cfg = lm.tiny_config(tok)
    cfg.text_config.tie_word_embeddings = True
    torch.manual_seed(3)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id, image_seq_length=cfg.num_image_tokens, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "a")
    model, _ = lm.load(str(tmp_path / "a"))
    tied = lambda m: m.language_model.lm_head.weight.data_ptr() == m.language_model.model.embed_tokens.weight.data_ptr()
    lm.add_lora(model, 4, 8, 0.0)
    merged = lm.merge_lora(model, lm.full_state_dict(model))
    assert tied(merged.to(torch.float64)) and tied(merged.float())
    lm.save_llava_hf(merged, tok, tmp_path / "b")
    lm.save_llava_original(merged, tok, tmp_path / "c")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    ids, pix = _sample_inputs(tok, merged.config)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pix).logits
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pix).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lm.load(str(tmp_path / "c"))[0].eval()(ids, pix).logits, want, atol=1e-5, rtol=0)


def test_merging_the_lora_keeps_the_weights_it_adds_and_the_attention_kernel():
    """merge_lora's plain model computes what the adapted one does, and keeps the attention kernel it was loaded
    with (huatuo_vision.py's stage 2 and every export are built by it): eager stays eager."""
    model, _ = lm.load("tiny", attn_implementation="eager")
    lm.add_lora(model, 4, 8, 0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 13]])
    merged = lm.merge_lora(model, lm.full_state_dict(model))
    assert merged.config.text_config._attn_implementation == "eager"
    assert merged.language_model.config._attn_implementation == "eager"
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
