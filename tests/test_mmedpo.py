"""mmedpo.py: score normalisation (three modes), the weighted loss against TRL's per-pair DPO loss, local noise,
the judges' debate (scripted judges) and label reading (LLaVA and transformers judges), the choice of the rejected
answer, the released format, and the script end to end: the complete default pipeline under torchrun 2 processes
(the same pairs and weights as 1 process), the pair cache and its key, --eval-only, and the fault suite
(tests/faults.py: kill and resume, non-finite steps, a dead or stalled rank, bad data and a bad model folder)."""

import copy
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import llava_med as lm
import faults
import mmedpo
from data import toy_oracles
from conftest import ROOT

TOY = ROOT / "data" / "toy"


# ---------------------------------------------------------------- weights


def test_normalize_scores_three_modes():
    scores = [0.2, 0.4, 0.6, 0.8, 0.9, 0.9, 0.5]
    subsets = ["text"] * 4 + ["visual"] * 2 + ["text"]
    # paper, per subset. text: 0.2 0.4 0.6 0.8 0.5 -> mean 0.5, population std sqrt(0.04) = 0.2
    # w = clip(1 + sqrt(0.1) (s - 0.5) / 0.2, 0.75, 1.25): -1.5 -> 0.5257 -> 0.75; -0.5 -> 0.8419; 0.5 -> 1.1581;
    # 1.5 -> 1.4743 -> 1.25; 0 -> 1. visual: 0.9 0.9 (no spread) -> 1
    w = mmedpo.normalize_scores(scores, subsets, "paper")
    r = math.sqrt(0.1)
    expect = [0.75, 1 - 0.5 * r, 1 + 0.5 * r, 1.25, 1.0, 1.0, 1.0]
    assert np.allclose(w, expect, atol=1e-12), w
    # paper, global: mean 0.6143, every score in one group
    s = np.array(scores)
    z = (s - s.mean()) / s.std()
    assert np.allclose(mmedpo.normalize_scores(scores, subsets, "paper", "global"), np.clip(1 + r * z, 0.75, 1.25))
    # unclipped weights have mean 1 and variance 0.1 (the target moments)
    wide = np.random.default_rng(0).uniform(0, 1, 1000).tolist()
    raw = 1 + r * (np.array(wide) - np.mean(wide)) / np.std(wide)
    assert abs(raw.mean() - 1) < 1e-12 and abs(raw.var() - 0.1) < 1e-12
    # all scores equal (e.g. 320 judges' 0.1): weight 1, although the float std of [0.1] * 320 is 1.4e-17, not 0
    assert mmedpo.normalize_scores([0.1] * 320, ["text"] * 320) == [1.0] * 320
    assert mmedpo.normalize_scores(scores, subsets, "raw") == scores  # the released code: raw scores (0 drops a pair)
    assert mmedpo.normalize_scores(scores, subsets, "none") == [1.0] * 7
    with pytest.raises(ValueError):
        mmedpo.normalize_scores(scores, subsets, "paper_norm")


# ---------------------------------------------------------------- loss vs TRL


def _pairs(tmp_path, tok, cfg):
    """Two text pairs and one visual pair (rejected image = a locally noised copy), uneven answer lengths."""
    rec = next(r for r in json.loads((TOY / "train.json").read_text()) if r["findings"])  # an abnormal image
    im = np.asarray(lm.load_image(TOY / rec["image"]))
    heat, _ = mmedpo.box_heatmap(rec, 64, 64)
    Image.fromarray(mmedpo.local_noise(im, heat > 0.5, "diffusion", 500, np.random.default_rng(0))).save(tmp_path / "n.png")
    h = {"from": "human", "value": "<image>\nDescribe the image."}
    q = {"from": "human", "value": "<image>\nWhere is the nodule located?"}
    recs = [
        {"id": "t1", "image": rec["image"], "conversations": [h, {"from": "gpt", "value": rec["report"]}],
         "rejected_conversations": [h, {"from": "gpt", "value": "Chest x-ray. Both lungs are clear."}], "weighted_score": 0.9},
        {"id": "t2", "image": rec["image"], "conversations": [q, {"from": "gpt", "value": "right upper lung"}],
         "rejected_conversations": [q, {"from": "gpt", "value": "left lower lung"}], "weighted_score": 0.3},
        {"id": "v1", "image": rec["image"], "conversations": [q, {"from": "gpt", "value": "right upper lung"}],
         "rejected_conversations": [q, {"from": "gpt", "value": "right upper lung"}], "weighted_score": 0.8,
         "rejected_image": "n.png"},
    ]
    return mmedpo.ScoredPairs([(f"x[{i}]", r) for i, r in enumerate(recs)], TOY, tmp_path, tok, cfg, 512, False)


class _AsTRLModel(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, pixel_values=None, use_cache=False, **kw):
        return self.m(input_ids, pixel_values=pixel_values, attention_mask=attention_mask)


def test_weighted_loss_equals_trl_per_pair_loss_times_weight(tmp_path):
    """Our weighted loss on our tiny LLaVA == TRL 1.13 DPOTrainer._compute_loss run on each pair alone (B = 1, live
    reference model) times the pair's weight; the visual pair's rejected row sees the noised image."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.13.0":
        pytest.skip(f"the stub recipe is pinned to trl 1.13.0 (found {trl.__version__})")
    from accelerate import Accelerator
    from trl import DPOTrainer

    model, tok = lm.load("tiny")
    model.eval()
    data = _pairs(tmp_path, tok, model.config)
    assert [it["subset"] for it in data.items] == ["text", "text", "visual"]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.language_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = torch.tensor(mmedpo.normalize_scores([it["score"] for it in data.items],
                                                   [it["subset"] for it in data.items], "raw"))
    batch = mmedpo.collate_pairs(data, [0, 1, 2], tok.pad_token_id)  # text pairs: one shared-prompt row each
    assert batch["pixel_values"].shape[0] == 2  # original once, noised once
    with torch.no_grad():
        logps, _ = mmedpo.sequence_logps(model, batch, model.encode_images(batch["pixel_values"]))
        ref_logps, _ = mmedpo.sequence_logps(ref, batch, ref.encode_images(batch["pixel_values"]))
    ours, rc, rr = mmedpo.weighted_dpo_loss(logps[:3], logps[3:], ref_logps[:3], ref_logps[3:], weights, beta=0.1)

    policy, ref_m = _AsTRLModel(model), _AsTRLModel(ref)
    stub = SimpleNamespace(
        model=policy, ref_model=ref_m, accelerator=Accelerator(cpu=True), precompute_ref_logps=False,
        beta=0.1, loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
        aux_loss_enabled=False, router_aux_loss_coef=0.0, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05))
    trl_losses = []
    for i in range(3):
        b = mmedpo.collate_pairs(data, [i], tok.pad_token_id, share_prefix=False)  # TRL's two rows per pair
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                  "completion_mask": (b["labels"] != lm.IGNORE_INDEX).long(),
                  "pixel_values": b["pixel_values"][b["row_images"]]}
        with torch.no_grad():
            trl_losses.append(DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False))
    expected = torch.stack(trl_losses) * weights
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.mean(), expected.mean(), atol=1e-5, rtol=0)
    assert not torch.allclose(ours, torch.stack(trl_losses))  # the weights did something
    # rows: t1 and t2 (chosen + rejected answer after one prompt), then v1's chosen and rejected rows (two images)
    assert batch["row_images"].tolist() == [0, 0, 0, 1]  # only the visual pair's rejected row sees x*


def test_default_lora_has_no_dropout_in_dpo(tmp_path):
    """The released trainer (dpo_trainer_weighted.py, DPOTrainer(disable_dropout=True)) and TRL zero every dropout
    during DPO, LoRA's 0.05 included: by default two training-mode forwards of the policy are identical."""
    for args, same in ((mmedpo.Args(), True), (mmedpo.Args(lora_dropout=0.05), False)):  # the flag still turns it on
        model, tok = lm.load("tiny")
        policy, _ = lm.policy_and_reference(model, args.full_finetune, args.lora_r, args.lora_alpha,
                                            args.lora_dropout, args.tune_projector)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # B = 0 at init would hide the adapters (and their dropout) altogether
        batch = mmedpo.collate_pairs(_pairs(tmp_path, tok, model.config), [0, 1], tok.pad_token_id)
        policy.train()
        feats = policy.encode_images(batch["pixel_values"])
        a, b = (mmedpo.sequence_logps(policy, batch, feats)[0] for _ in range(2))
        assert torch.equal(a, b) == same


# ---------------------------------------------------------------- visual dispreference


@pytest.mark.parametrize("mode", ["diffusion", "replace"])
def test_local_noise_changes_only_pixels_inside_the_region(mode):
    rng = np.random.default_rng(1)
    image = rng.integers(40, 216, size=(48, 64, 3), dtype=np.uint8)
    rec = {"findings": [{"box": [10, 5, 30, 20]}, {"box": [50, 40, 64, 48]}]}
    heat, conf = mmedpo.box_heatmap(rec, 64, 48)
    region = heat > 0.5
    assert conf == 1.0 and region.sum() == 20 * 15 + 14 * 8
    out = mmedpo.local_noise(image, region, mode, 500, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[~region], image[~region])  # outside: bit-identical
    changed = (out != image).any(-1)
    assert changed[region].mean() > 0.9  # inside: (nearly) every pixel moved
    if mode == "replace":  # released code: near-black speckle N(0, 10)
        assert out[region].mean() < 15


def test_global_noise_and_the_diffusion_schedule():
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    region = np.zeros((16, 16), dtype=bool)
    region[:4, :4] = True
    out = mmedpo.local_noise(image, region, "global", 500, np.random.default_rng(0))
    assert (out != image).any(-1)[~region].mean() > 0.9  # the ablation noises everything
    a = [mmedpo.povid_xi_bar(k) for k in (0, 1, 250, 500, 999)]
    assert a[0] == 1.0 and all(x > y for x, y in zip(a, a[1:])) and 0 < a[-1] < 0.1
    # k = 1: xi_bar = 1 - beta_1 = 1 - (sigmoid(-6) (5e-3 - 1e-5) + 1e-5)
    assert abs(a[1] - (1 - (1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5))) < 1e-12
    assert mmedpo.box_heatmap({"findings": []}, 8, 8) is None  # a normal image has no lesion region


def test_noised_copies_of_images_with_alike_paths_are_two_files(tmp_path):
    (tmp_path / "a").mkdir()
    rec = {"findings": [{"box": [2, 2, 10, 10]}]}
    samples = []
    for n, (rel, grey) in enumerate([("a/b.png", 60), ("a_b.png", 200)]):  # one flat name before the path's hash
        Image.fromarray(np.full((16, 16, 3), grey, dtype=np.uint8)).save(tmp_path / rel)
        samples.append({"id": f"s{n}", "image": rel, "path": tmp_path / rel, "record": rec, "question": "q",
                        "answer": "a"})
    args = SimpleNamespace(localiser="boxes", noise="diffusion", noise_step=500, seed=0, heatmaps="", region_std=1.0)
    records, stats = mmedpo.visual_dispreference(args, None, None, samples, tmp_path / "prefs", 0)
    names = [r["rejected_image"] for r in records]
    assert stats["visual_pairs"] == 2 and len(set(names)) == 2
    for r, grey in zip(records, (60, 200)):  # each noised copy is of its own image: outside the box untouched
        assert np.asarray(Image.open(tmp_path / "prefs" / r["rejected_image"]))[12:, 12:].mean() == grey


def _planted_attention(model, tok, monkeypatch, attended: list[int]):
    """The LM's attention from the last prompt token put on the image tokens `attended` (row-major patch indices of
    the padded square, 4x4 for the tiny model), so a test knows where the localiser should point."""
    lmm = model.language_model.model

    def forward(inputs_embeds, output_attentions=False, **kw):
        assert output_attentions and lmm.config._attn_implementation == "eager"
        ids = torch.tensor(mmedpo.prompt_ids(tok, model.config, "Where is the lesion?"))
        image_pos = (ids == model.config.image_token_id).nonzero()[:, 0]
        a = torch.full((1, 2, inputs_embeds.shape[1], inputs_embeds.shape[1]), 1e-3)
        a[0, :, -1, image_pos[attended]] = 1.0
        return SimpleNamespace(attentions=(a, a, a))

    monkeypatch.setattr(lmm, "forward", forward)


def test_attention_localiser_region_and_confidence(tmp_path, monkeypatch):
    """A 64x32 image is padded to 64x64 with 16 grey rows above it, so patch (row 1, col 1) of the 4x4 grid covers
    image rows 0-15, columns 16-31. Attention planted on that patch: the map peaks there, the --region-std region
    covers it and little else, and the confidence is the attention share inside that same region (issue 15 bug 6:
    it was always taken at mean - 1 std)."""
    model, tok = lm.load("tiny")
    path = tmp_path / "wide.png"
    Image.new("RGB", (64, 32), (40, 40, 40)).save(path)
    _planted_attention(model, tok, monkeypatch, [1 * 4 + 1])
    lesion = np.zeros((32, 64), dtype=bool)
    lesion[0:16, 16:32] = True
    confs = []
    for region_std in (1.0, 0.5):
        heat, conf = mmedpo.attention_heatmap(model.eval(), tok, str(path), "Where is the lesion?", region_std)
        region = mmedpo.binarise(heat, region_std)
        ys, xs = region.nonzero()
        assert heat.shape == (32, 64) and region[lesion].mean() > 0.95 and region[~lesion].mean() < 0.1
        assert ys.max() <= 16 + 5 and 16 - 5 <= xs.min() and xs.max() <= 31 + 5  # the patch, give or take 5 px
        assert abs(conf - heat[region].sum() / heat.sum()) < 1e-6
        confs.append(conf)
    assert confs[0] < confs[1] < 0.9  # a larger region holds more of the attention
    heat, conf = mmedpo.attention_heatmap(model.eval(), tok, str(path), "Where is the lesion?", -1.0)
    assert mmedpo.binarise(heat, -1.0).all() and conf == pytest.approx(1.0)  # the released mean - std: everything
    _planted_attention(model, tok, monkeypatch, [1 * 4 + 3])  # the right-most patch of that row
    heat, _ = mmedpo.attention_heatmap(model.eval(), tok, str(path), "Where is the lesion?", 1.0)
    assert mmedpo.binarise(heat, 1.0)[:16, 48:].mean() > 0.5 and not mmedpo.binarise(heat, 1.0)[:, :32].any()
    assert model.language_model.model.config._attn_implementation == "sdpa"  # restored


# ---------------------------------------------------------------- clinical relevance debate


class Scripted:
    """A judge that returns scripted scores: fn(text, prev, call number) -> score; counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def score(self, texts, prevs):
        self.calls += 1
        return [self.fn(t, p, self.calls) for t, p in zip(texts, prevs)]


def test_debate_stops_on_agreement():
    judges = [Scripted(lambda t, p, c: 0.8) for _ in range(3)]
    [v] = mmedpo.debate_scores(["x"], judges, max_rounds=5)
    assert v == {"score": 0.8, "rounds": 1, "agreed": True, "history": [0.8]}
    assert [j.calls for j in judges] == [1, 1, 1]
    # round 1: G1 0.4, G2 0.9 (new), G3 agrees with 0.9; round 2: G1 0.4 (new), G2 now agrees, G3 agrees -> 0.4
    g1 = Scripted(lambda t, p, c: 0.4)
    g2 = Scripted(lambda t, p, c: 0.9 if c == 1 else p)
    g3 = Scripted(lambda t, p, c: p)
    [v] = mmedpo.debate_scores(["x"], [g1, g2, g3], max_rounds=5)
    assert v["agreed"] and v["rounds"] == 2 and v["score"] == 0.4 and v["history"] == [0.4, 0.9, 0.4]
    assert (g1.calls, g2.calls, g3.calls) == (2, 2, 2)


def test_debate_averages_without_agreement():
    judges = [Scripted(lambda t, p, c, s=s: s) for s in (0.2, 0.6, 1.0)]
    [v] = mmedpo.debate_scores(["x"], judges, max_rounds=5)
    assert not v["agreed"] and v["rounds"] == 5 and len(v["history"]) == 15
    assert abs(v["score"] - 0.6) < 1e-12 and [j.calls for j in judges] == [5, 5, 5]
    # batched: one text agrees at once and leaves the batch, the other runs all rounds
    judges = [Scripted(lambda t, p, c, s=s: 0.5 if t == "a" else s) for s in (0.1, 0.3)]
    a, b = mmedpo.debate_scores(["a", "b"], judges, max_rounds=3)
    assert a["agreed"] and a["rounds"] == 1 and not b["agreed"] and abs(b["score"] - 0.2) < 1e-12
    assert mmedpo.debate_scores(["a"], [Scripted(lambda t, p, c: 0.5), Scripted(lambda t, p, c: 0.54)])[0]["agreed"]


def _word_tokenizer(kind: str, texts: list[str]):
    """A small hand-made tokenizer over the words of `texts`, digits always single tokens. "sp": SentencePiece /
    Llama-2 style ('▁' for a space, prepended to every encode call: " 10" -> '▁', '1', '0'; Llama's normaliser and
    decoder). "bpe": byte-level BPE with split digits (Qwen2 style: " 10" -> 'Ġ', '1', '0')."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    norm = None
    if kind == "sp":
        norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        pre, space = pre_tokenizers.Split(Regex(r"▁?[^▁\d\n]+|▁|\d|\n"), "isolated"), "▁"
        decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+|\s+"), "isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        space, decoder = "Ġ", decoders.ByteLevel()
    pieces = {p for t in texts + ["\n"] for p, _ in pre.pre_tokenize_str(norm.normalize_str(t) if norm else t)}
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|start|>", "<|eot|>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + sorted(pieces | set("0123456789") | {space}))},
                                    unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre, decoder
    if norm:
        tk.normalizer = norm
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>"), space


class Bigram(torch.nn.Module):
    """A judge model whose next-token logits depend on the previous token only: table[prev] (0 unless planted)."""

    def __init__(self, tok, template, plant: dict):
        super().__init__()
        ids = lambda t: t if isinstance(t, int) else tok.convert_tokens_to_ids(t)
        self.table = torch.zeros(len(tok), len(tok))
        for prev, nexts in plant.items():
            for nxt, logit in nexts.items():
                self.table[ids(prev), ids(nxt)] = logit
        self.config = SimpleNamespace(template=template, num_image_tokens=0, image_token_id=-1)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, logits_mask=None, **kw):
        logits = self.table[input_ids]
        logits = logits[logits_mask] if logits_mask is not None else logits[:, -logits_to_keep:] if logits_to_keep else logits
        return SimpleNamespace(logits=logits)


# a Llama-3-like chat template: the answer follows the assistant header's blank line, no space token first
CHAT = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n\n{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}")


def _stub_judge(tok, template, plant):
    """A judge with planted logits: LLaVA-type (its training template) or, template "chat", a chat model."""
    judge = object.__new__(mmedpo.ModelJudge)
    judge.__dict__.update(name="stub", device=torch.device("cpu"), tok=tok, llava=template != "chat", rank=0, world=1,
                          max_new_tokens=8, model=Bigram(tok, template, plant), cache_arg="past_key_values")
    return judge


@pytest.mark.parametrize("kind,template", [("sp", "mistral_instruct"), ("bpe", "vicuna_v1"), ("bpe", "chat")])
def test_judge_reads_the_label_it_writes(kind, template):
    """Issue 15 bug 3. All tokenizers here split digits, so "10" is '1' '0' and summing the label's tokens alone
    gives log p("10") <= log p("1"); and LLaVA training writes the answer after a space token ('▁' after [/INST],
    'Ġ' after ASSISTANT:). Planted judges: after the prompt the separator (and, with less mass, a '3' straight
    after the prompt); after the separator '1'; then '0' and the end (a judge meaning 10) or the end at once
    (meaning 1). The chat model has no separator: '1' (or, less likely, '3') follows its prompt."""
    text = "A large nodule."
    prompt = mmedpo.JUDGE_SCORE.format(text=text)
    corpus = [prompt, "user assistant\n\n 0 10 yes no Yes No", "\nyes\nno\nYes\nNo"]
    if template != "chat":
        corpus.append(lm.render_chat(template, [prompt, "0 10 yes no"]))
    tok, space = _word_tokenizer(kind, corpus)
    tok.chat_template = CHAT if template == "chat" else None
    sep = space if template != "chat" else None
    last = _stub_judge(tok, template, {})._prompt(prompt)[-1]
    stop = "</s>" if sep else "<|eot|>"
    for means, after_one in ((10, {"0": 6.0, stop: 1.0}), (1, {"0": 1.0, stop: 6.0})):
        plant = {"1": after_one, "0": {stop: 6.0}}
        if sep:
            plant.update({last: {sep: 6.0, "3": 3.0}, sep: {"1": 6.0, "7": 3.0}})
        else:
            plant[last] = {"1": 6.0, "3": 3.0}
        judge = _stub_judge(tok, template, plant)
        assert judge.score([text], [None]) == [means / 10]
        lp = judge.label_logprobs([prompt], mmedpo.SCORE_LABELS)[0]
        assert lp.exp().sum() <= 1 + 1e-6 and int(lp.argmax()) == means
    # the continuation scored is the one training writes: separator, label, then the stop (not part of the label)
    if sep:
        conv = lm.tokenize_conversation(tok, [("user", prompt), ("assistant", "10")], template, 0, -1)
        trained = [t for t, l in zip(conv["input_ids"], conv["labels"]) if l != lm.IGNORE_INDEX]
    else:
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": "10"}],
                                       tokenize=True, return_dict=False)
        trained = full[len(judge._prompt(prompt)):]
    [tail] = judge._label_tails(prompt, ["10"])
    assert tok.convert_ids_to_tokens(tail) == [sep, "1", "0"][not sep:] and trained[:len(tail)] == tail
    assert tok.convert_ids_to_tokens(trained[len(tail):])[-1] == stop
    # yes / no the same way, either case: P(yes) follows the planted logits
    for yes, no, above in (({"yes": 4.0}, {"no": 2.0}, True), ({"yes": 2.0}, {"no": 4.0}, False),
                           ({"Yes": 4.0}, {"no": 3.0}, True), ({"yes": 3.0}, {"No": 4.0}, False)):
        judge = _stub_judge(tok, template, {last: {(sep or "") + w: x for w, x in {**yes, **no}.items()}})
        assert (judge.hallucination(["yes"], ["no"])[0] > 0.5) == above


def test_tiny_judge_label_logprobs_equal_a_plain_forward():
    """The cached computation (prompt once, then the label continuations on copies of its KV cache, left-padded
    prompts of different lengths) equals one full forward per (prompt, label): the sum of the label tokens' log-probs
    plus log P(the next token does not start with a letter or digit)."""
    judge = mmedpo.ModelJudge("tiny:1", torch.device("cpu"))
    prompts = ["Score: a", "Another, somewhat longer prompt about both lungs"]
    lp = judge.label_logprobs(prompts, mmedpo.SCORE_LABELS)
    tails = judge._label_tails(prompts[0], mmedpo.SCORE_LABELS)
    tokens = [judge.tok.convert_ids_to_tokens(t) for t in tails]
    assert tokens[0] == ["Ġ", "0"] and tokens[1] == ["Ġ1"] and tokens[10] == ["Ġ1", "0"]  # split, one, two tokens
    anchor = judge.tok.convert_tokens_to_ids("0")
    ends = torch.tensor([not judge.tok.decode([anchor, v])[1:2].isalnum() for v in range(len(judge.tok))])
    for p, prompt in enumerate(prompts):
        head = judge._prompt(prompt)
        for k, t in enumerate(tails):
            with torch.no_grad():
                logp = judge.model(torch.tensor([head + t])).logits[0].float().log_softmax(-1)
            expect = sum(logp[len(head) - 1 + j, tok] for j, tok in enumerate(t)) + logp[-1, ends].logsumexp(-1)
            assert abs(float(lp[p, k]) - float(expect)) < 1e-4, (p, k)


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_transformers_judge_reads_labels_through_its_cache(tmp_path):
    """A judge folder holding a plain transformers causal LM (here a small random Mistral with the tiny tokenizer):
    its KV cache goes in under the argument its forward takes (`cache` from transformers 5.24, where
    past_key_values warns), and the cached reading equals full forwards; no deprecation warning (issue 14)."""
    from transformers import AutoTokenizer, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
    torch.manual_seed(0)
    MistralForCausalLM(lm.tiny_config(tok).text_config).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    judge = mmedpo.ModelJudge(str(tmp_path / "judge"), torch.device("cpu"))
    assert not judge.llava and judge.cache_arg in inspect.signature(judge.model.forward).parameters
    prompts = ["Score: a", "Another, somewhat longer prompt about both lungs"]
    lp = judge.label_logprobs(prompts, mmedpo.SCORE_LABELS)
    tails = judge._label_tails(prompts[0], mmedpo.SCORE_LABELS)
    ends = ~judge._continues(tails[0][-1], len(tok))
    for p, prompt in enumerate(prompts):
        head = judge._prompt(prompt)
        for k, t in enumerate(tails):
            with torch.no_grad():
                logp = judge.model(torch.tensor([head + t])).logits[0].float().log_softmax(-1)
            expect = sum(logp[len(head) - 1 + j, x] for j, x in enumerate(t)) + logp[-1, ends].logsumexp(-1)
            assert abs(float(lp[p, k]) - float(expect)) < 1e-4, (p, k)
    assert judge.write_wrong(["yes"], seed=0) == [""]  # no free generation from an arbitrary LM: the rule fallback


# ---------------------------------------------------------------- text dispreference


class ScriptedJudge:
    def __init__(self, degrees, written):
        self.degrees, self.written, self.seen = degrees, written, []

    def hallucination(self, gts, cands):
        self.seen += cands
        return [self.degrees.get(c, 0.0) for c in cands]

    def write_wrong(self, gts, seed):
        return [self.written for _ in gts]


def test_choose_rejected():
    judge = ScriptedJudge({"left lung": 0.9, "right lung.": 0.2, "lung": 0.6}, written="")
    out = mmedpo.choose_rejected(judge, ["Right lung", "yes", "The right lung"],
                                 [["right lung.", "left lung", "lung", ""], ["Yes", "yes."], ["The right lung"]],
                                 0.5, [[], ["yes", "no"], []], seed=0)
    assert out[0] == ("left lung", "sampled")  # the most hallucinated; 'right lung.' is the ground truth
    assert out[1] == ("no", "rule_corruption")  # only ground-truth candidates; the judge wrote nothing
    assert out[2] == ("The left lung", "rule_corruption")
    assert "Yes" not in judge.seen and "" not in judge.seen
    judge = ScriptedJudge({"lung": 0.3}, written="A pneumothorax.")
    assert mmedpo.choose_rejected(judge, ["right lung"], [["lung"]], 0.5, [[]], 0) == [("A pneumothorax.", "judge_written")]
    rng = random.Random(0)
    assert mmedpo.corrupt_ground_truth("No abnormality is seen.", [], rng) == "A mass is seen."
    assert mmedpo.corrupt_ground_truth("Chest x-ray. Both lungs are clear.", [], rng) == "Chest x-ray. Both lungs are opacified."
    assert mmedpo.corrupt_ground_truth("nodule", ["nodule", "exudate"], rng) == "exudate"
    assert mmedpo.rule_hallucination("yes", "No.") == 1.0 and mmedpo.rule_hallucination("left lung", "left lung") == 0.0


# ---------------------------------------------------------------- the toy judge and what the weights do


def test_toy_judge_recovers_every_pair_kind_and_the_hallucination_rule():
    """mmedpo's toy judge (README (c)) names every prefs_train.json pair's toy_kind from its texts and findings;
    its parser is tests/test_toy.py's (the same word lists as data/make_toy.py); train reports hallucinate 25 %."""
    sys.path.insert(0, str(ROOT / "data"))
    import make_toy as mt
    assert sorted(toy_oracles.TOY_LESIONS) == sorted(mt.LESION_WORDS) and sorted(toy_oracles.TOY_LOCATIONS) == sorted(mt.LOCATION_WORDS)
    assert tuple(toy_oracles.TOY_NEGATIONS) == tuple(mt.NEGATIONS)
    pairs = json.loads((TOY / "prefs_train.json").read_text())
    assert all(toy_oracles.toy_kind(p["conversations"][1]["value"], p["rejected_conversations"][1]["value"],
                               p["toy_findings"]) == p["toy_kind"] for p in pairs)
    recs = json.loads((TOY / "train.json").read_text())
    assert sum(toy_oracles.toy_hallucinated(r["report"], r["findings"]) for r in recs) == 90  # 45 + 45 of 360
    assert not any(toy_oracles.toy_hallucinated(r["report_clean"], r["findings"]) for r in recs if "report_clean" in r)
    args = mmedpo.resolve_auto(mmedpo.Args())
    assert (args.judge, args.scorers, args.text_data) == ("toy", "toy", str(TOY.relative_to(ROOT) / "prefs_train.json"))
    records, stats = mmedpo.read_text_pairs(args, TOY / "prefs_train.json", "cpu", 0, 1)
    assert stats["text_scores"] == {0.0: 240, 1.0: 660} and not any(k.startswith("toy_") for r in records for k in r)
    assert toy_oracles.ToyJudge().hallucination(["no", "no", "Chest x-ray. A nodule in the left upper lung."],
                                           ["No.", "yes", "Chest x-ray. A nodule in the right upper lung."]) == [0, 1, 1]


def test_relevance_weights_shift_the_held_out_preference_to_serious_pairs():
    """MMedPO's own part, on the toy: from the same start, on the same prefs_train.json pairs, the weighted arm
    (toy relevance scores, the default --weight-mode) ends with a larger gap between its held-out (prefs_val.json)
    reward margins on clinically serious pairs and on wording-only pairs than the uniform arm (weights 1). Forcing
    the weights to 1 makes the arms one run, and the gap difference 0."""
    args = mmedpo.resolve_auto(mmedpo.Args())
    train_recs, _ = mmedpo.read_text_pairs(args, TOY / "prefs_train.json", "cpu", 0, 1)
    held_recs, _ = mmedpo.read_text_pairs(args, TOY / "prefs_val.json", "cpu", 0, 1)
    held_recs = [r for r in held_recs if r["weighted_score"] > 0][:16] + [r for r in held_recs if r["weighted_score"] == 0][:16]
    model, tok = lm.load("tiny")
    pairs = lambda recs: mmedpo.ScoredPairs([(f"p[{i}]", r) for i, r in enumerate(recs)], TOY, TOY, tok, model.config, 512, False)
    train, held = pairs(train_recs[:48]), pairs(held_recs)
    weights = mmedpo.arm_weights(args, train, False)
    assert weights["mmedpo"].min() < weights["mmedpo"].max()
    cpu, gaps = torch.device("cpu"), {}
    for arm in ("dpo", "mmedpo"):
        torch.manual_seed(0)
        policy, ref = lm.policy_and_reference(copy.deepcopy(model), args.full_finetune, args.lora_r, args.lora_alpha,
                                              args.lora_dropout, args.tune_projector)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
        for step in range(6):
            out = mmedpo.mmedpo_step(args, policy, ref, train, weights[arm], list(range(8 * step, 8 * step + 8)), tok, cpu)
            (out["loss"] / 8).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            margin = lambda idx: mmedpo.mmedpo_step(args, policy, ref, held, torch.ones(len(held)), idx, tok, cpu)["margin"] / len(idx)
            gaps[arm] = float(margin(list(range(16))) - margin(list(range(16, 32))))
    assert gaps["mmedpo"] > gaps["dpo"] + 0.05, gaps


# ---------------------------------------------------------------- the released format


def test_released_format_read_as_is(tmp_path):
    model, tok = lm.load("tiny")
    noised = tmp_path / "elsewhere" / "n.png"
    noised.parent.mkdir()
    Image.new("RGB", (64, 64), (10, 10, 10)).save(noised)
    h = {"from": "human", "value": "<image>\nOffer a thorough analysis of the image"}
    recs = [{"id": "CXR1", "image": "images/train_radiology_0000.png", "conversations": [h, {"from": "gpt", "value": " gt"}],
             "rejected_conversations": [h, {"from": "gpt", "value": " wrong"}], "weighted_score": 0.9},
            {"id": "CXR1v", "image": "images/train_radiology_0000.png", "conversations": [h, {"from": "gpt", "value": " gt"}],
             "rejected_conversations": [h, {"from": "gpt", "value": " gt"}], "weighted_score": 0.7,
             "rejected_image": str(noised)}]
    f = tmp_path / "iuxray_dpo_weighted.json"
    f.write_text(json.dumps(recs))
    data = mmedpo.ScoredPairs(lm.read_records(f), TOY, TOY, tok, model.config, 512, False)
    assert [(it["subset"], it["score"]) for it in data.items] == [("text", 0.9), ("visual", 0.7)]
    assert data.items[1]["rejected_images"] == [str(noised)]
    noised_rec = dict(recs[0], id="CXR1n", rejected_noised=1, rejected_conversations=recs[0]["conversations"])
    f.write_text(json.dumps([noised_rec]))  # MMed-RAG's cross-modality format: the noised image is drawn, a D_v pair
    assert [it["subset"] for it in mmedpo.ScoredPairs(lm.read_records(f), TOY, TOY, tok, model.config, 512, False).items] == ["visual"]
    f.write_text(json.dumps(recs))
    del recs[0]["weighted_score"]
    f.write_text(json.dumps(recs))
    with pytest.raises(lm.DataError, match=r"iuxray_dpo_weighted.json\[0\] id=CXR1: no numeric 'weighted_score'"):
        mmedpo.ScoredPairs(lm.read_records(f), TOY, TOY, tok, model.config, 512, False)
    assert len(mmedpo.ScoredPairs(lm.read_records(f), TOY, TOY, tok, model.config, 512, False, need_scores=False)) == 2


# ---------------------------------------------------------------- the script end to end

# the built-D_t pipeline (the toy default reads prefs_train.json with the toy judge: test_toy_default_pipeline);
# lr 1e-5, not the toy default 1e-3, as tests/test_dpo.py's equality runs: Adam's first steps move every weight by
# about lr, so reduction-order noise on a near-zero gradient would become a 1e-5 weight difference between 1 and 2 ranks
SMALL = ["--text-data", "build", "--judge", "tiny", "--scorers", "tiny:1,tiny:2,tiny:3", "--lr", "1e-5",
         "--max-samples", "16", "--n-samples", "2", "--sample-max-new-tokens", "8",
         "--max-rounds", "2", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
         "--eval-limit", "4", "--eval-max-new-tokens", "4", "--report-max-new-tokens", "8", "--curate-batch-size", "8"]
# the fault suite's runs: no warm start, built D_t, one scorer, few pairs (8 text + the visual ones), the weighted arm
FAST = ["--text-data", "build", "--judge", "tiny", "--sft-warmup-steps", "0", "--max-samples", "8", "--n-samples", "1",
        "--sample-max-new-tokens", "4", "--max-rounds", "1", "--scorers", "tiny:1", "--batch-size", "4",
        "--micro-batch-size", "2", "--no-eval", "--arms", "mmedpo", "--curate-batch-size", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "mmedpo.py"]


def _run(cmd):
    # one thread per process, as torchrun sets it: on a shared 2-core machine more threads spin against each other
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_complete_pipeline_on_two_ranks_equals_one_rank(tmp_path):
    """The default pipeline at small sizes (warm start, D_t sampled and judged, debate, D_v noised, both arms,
    base / dpo / mmedpo evaluated) under torchrun 2 processes; one process builds the same pairs (sampling seeds
    per fixed batch) and trains to the same weights; a rerun reuses the pairs and resumes both arms."""
    one, two = tmp_path / "one", tmp_path / "two"
    out_two = _run(TORCHRUN + ["--out", str(two), "--sft-warmup-steps", "5"] + SMALL)
    faults._in_process(mmedpo, ["--out", str(one), "--no-eval", "--sft-warmup-steps", "5"] + SMALL)  # one rank, here
    prefs = json.loads((two / "prefs" / "mmedpo_dpo_weighted.json").read_text())
    assert prefs == json.loads((one / "prefs" / "mmedpo_dpo_weighted.json").read_text())
    text = [r for r in prefs if r["subset"] == "text"]
    visual = [r for r in prefs if r["subset"] == "visual"]
    assert len(text) == 16 and visual and all(0 <= r["weighted_score"] <= 1 for r in prefs)
    for r in visual:  # the noised PNG exists and differs from the original exactly inside the lesion box
        rec = next(x for x in json.loads((TOY / "train.json").read_text()) if x["image"] == r["image"])
        a = np.asarray(lm.load_image(TOY / r["image"]))
        b = np.asarray(lm.load_image(two / "prefs" / r["rejected_image"]))
        heat, _ = mmedpo.box_heatmap(rec, 64, 64)
        assert np.array_equal(a[heat == 0], b[heat == 0]) and (a != b).any(-1)[heat > 0].mean() > 0.9
    for arm in ("dpo", "mmedpo"):
        wa, wb = faults.weights(one / arm), faults.weights(two / arm)
        assert wa.keys() == wb.keys() and any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
        la, lb = ([r["loss"] for r in faults.phase_rows(d, arm)] for d in (one, two))
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=0)
    res = json.loads((two / "results.json").read_text())["results"]
    assert set(res) == {"base", "dpo", "mmedpo"} and all(set(r) >= {"vqa", "report"} for r in res.values())
    assert res["mmedpo"]["vqa"]["n_closed"] + res["mmedpo"]["vqa"]["n_open"] == 4 and res["mmedpo"]["report"]["n"] == 4
    adapter = json.loads((two / "mmedpo" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(two / "base_llava_hf")
    assert (two / "mmedpo" / "adapter" / "adapter_model.safetensors").exists()
    assert "preference pairs:" in out_two.stdout and "FutureWarning" not in out_two.stderr
    again = _run(TORCHRUN + ["--out", str(two), "--no-eval", "--sft-warmup-steps", "5"] + SMALL)
    assert again.stdout.count("resumed from") == 2 and "preference pairs:" not in again.stdout


def test_toy_default_pipeline(tmp_path):
    """The toy default's pairs end to end (one step, no warm start): D_t = prefs_train.json scored by the toy judge
    (wording 0, serious 1; the toy_* documentation fields are not kept), D_v built on the pref images (not in the
    warm start), the toy hallucination rate among the report scores."""
    out = tmp_path / "run"
    res = faults._in_process(mmedpo, ["--sft-warmup-steps", "0", "--max-samples", "24", "--max-steps", "1",
                                      "--batch-size", "4", "--micro-batch-size", "2", "--arms", "mmedpo",
                                      "--eval-limit", "2", "--eval-max-new-tokens", "2", "--report-max-new-tokens", "4",
                                      "--out", str(out)])
    cur = json.loads((out / "prefs" / "curation.json").read_text())
    assert cur["toy_kinds"] == {"wrong_yes_no": 360, "wording": 240, "hallucinated_finding": 120, "wrong_location": 90,
                                "missed_lesion": 90} and cur["text_pairs"] == 900 and cur["visual_pairs"] > 0
    prefs = json.loads((out / "prefs" / "mmedpo_dpo_weighted.json").read_text())
    assert all(r["image"].startswith("images/pref_") and not any(k.startswith("toy_") for k in r) for r in prefs)
    assert {r["weighted_score"] for r in prefs if r["subset"] == "text"} == {0.0, 1.0}
    assert set(res) == {"base", "mmedpo"} and 0 <= res["mmedpo"]["report"]["toy_hallucination_rate"] <= 1


def test_warm_start_is_reused_from_the_same_data_elsewhere(tmp_path):
    """The warm start's key names each image by its path inside the image folder, so the same data in another
    folder (a checkout elsewhere) reuses it instead of training it again (it named the resolved absolute path)."""
    shutil.copytree(TOY, tmp_path / "toy")
    out = tmp_path / "run"
    warm_rows = lambda: sum('"phase": "sft_warmup"' in line for line in open(out / "metrics.jsonl"))  # noqa: E731
    run = FAST + ["--sft-warmup-steps", "2", "--max-steps", "1", "--out", str(out)]
    faults._in_process(mmedpo, run)
    assert warm_rows() == 2
    faults._in_process(mmedpo, run + ["--data", str(tmp_path / "toy")])
    assert warm_rows() == 2


def test_pair_cache_key_and_eval_only(tmp_path, capsys):
    """The built pairs are keyed on every Args field above --rejected-image-folder and the ground-truth records:
    --template rebuilds them, --beta does not. --eval-only evaluates --model without reading training data (a
    missing --data) and gives the scores of the untrained base row."""
    out, evals = tmp_path / "run", ["--eval", "--eval-limit", "6", "--eval-max-new-tokens", "4",
                                    "--report-max-new-tokens", "6"]
    key = lambda: json.loads((out / "prefs" / "curation.json").read_text())["key"]
    first = faults._in_process(mmedpo, FAST + ["--max-steps", "1", "--out", str(out)] + evals)
    assert "preference pairs:" in capsys.readouterr().out
    k0 = key()
    faults._in_process(mmedpo, FAST + ["--max-steps", "1", "--out", str(out), "--template", "vicuna_v1"])
    assert "preference pairs:" in capsys.readouterr().out and key() != k0  # rebuilt for the new template
    k1 = key()
    faults._in_process(mmedpo, FAST + ["--max-steps", "1", "--out", str(out), "--template", "vicuna_v1", "--beta", "0.2"])
    assert "preference pairs:" not in capsys.readouterr().out and key() == k1  # the loss does not change the pairs
    faults._in_process(mmedpo, FAST + ["--max-steps", "1", "--out", str(out), "--template", "vicuna_v1", "--grad-clip", "0.5"])
    assert "preference pairs:" in capsys.readouterr().out and key() != k1  # the warm start that samples them trains so
    only = faults._in_process(mmedpo, ["--eval-only", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "eval"),
                                       "--eval-data", str(TOY / "test_vqa.json"), "--report-data", str(TOY / "test.json")]
                              + evals)
    assert set(only) == {"model"} and only["model"]["vqa"] == first["base"]["vqa"]
    assert only["model"]["report_examples"] == first["base"]["report_examples"]  # the same generated reports
    assert only["model"]["report"] == first["base"]["report"] and not (tmp_path / "eval" / "prefs").exists()
    (tmp_path / "iu").mkdir()  # IU-Xray's layout: test.json next to images/, which --report-image-folder names
    shutil.copy(TOY / "test.json", tmp_path / "iu" / "test.json")
    moved = faults._in_process(mmedpo, ["--eval-only", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "e2"),
                                        "--eval-data", str(TOY / "test_vqa.json"), "--report-data",
                                        str(tmp_path / "iu" / "test.json"), "--report-image-folder", str(TOY)] + evals)
    assert moved["model"]["report"] == first["base"]["report"]


def test_kill_and_resume_is_bit_identical(tmp_path):
    faults.check_kill_and_resume("mmedpo.py", FAST + ["--max-steps", "4", "--save-every", "1"], "mmedpo", tmp_path)


def test_nonfinite_step_stops_or_is_skipped(tmp_path, monkeypatch):
    faults.check_nonfinite(mmedpo, FAST + ["--max-steps", "2"], "mmedpo", tmp_path, monkeypatch, call=2)


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(tmp_path, fault):
    faults.check_dead_rank("mmedpo.py", FAST + ["--max-steps", "500"], "mmedpo", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(tmp_path):
    faults.check_bad_inputs("mmedpo.py", FAST, ["--data", str(ROOT / "tests" / "fixtures" / "missing_image.jsonl"),
                                                "--arms", "dpo"], tmp_path)
