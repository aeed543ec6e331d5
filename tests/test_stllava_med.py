"""stllava_med.py: the v1_sq template (exact strings, targets, seeded VUSER draws), the system prompts, the cluster
projector (formula, checkpoint names, load round trip), what each stage trains (ViT LoRA through the tower, the
projector in DPO against a frozen copy, the released dropouts), the judges and DPO records, the preference cache, and
the script: the complete pipeline on 2 ranks from an empty --out (== 1 rank for stage 1 and the pairs), evaluation
only, and the fault suite (kill and resume, non-finite steps, a dead or stalled rank, bad inputs)."""

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
import faults
import llava_med as lm
import stllava_med as st
from conftest import ROOT
from data import toy_readers

TOY = ROOT / "data" / "toy"
FIX = ROOT / "tests" / "fixtures"
CPU = torch.device("cpu")


def render(turns, vuser, eos="</s>", add_vuser_prompt=False):
    return "".join(text for text, _ in st.sq_segments(turns, vuser, eos, add_vuser_prompt))

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
          "and polite answers to the user's questions.Also, the artificial intelligence assistant is a curious virtual "
          "user. The virtual user asks complex questions that are relevant to the content in the image, for example, "
          "asking about background knowledge of the objects in the image, asking to discuss about events happening in "
          "the image, etc. Again, do not ask about uncertain details.")
TURNS = [("user", "<image>\nQ1?"), ("assistant", "A1."), ("user", "Q2?"), ("assistant", "A2."),
         ("user", "Q3?"), ("assistant", "A3.")]


# ---------------------------------------------------------------- v1_sq template


def test_v1_sq_rendered_strings():
    assert st.SQ_SYSTEM == SYSTEM  # the released "questions.Also" without a space
    assert render(TURNS[:4], {2}) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>VUSER: Q2?</s> ASSISTANT: A2.</s>"
    assert render(TURNS[:4], set()) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    assert render(TURNS, {4}) == (SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
                                        "VUSER: Q3?</s> ASSISTANT: A3.</s>")
    # the self-questioning prompt (visual_sq.py: description answered, then an empty VUSER message)
    assert render(TURNS[:2], set(), add_vuser_prompt=True) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>VUSER:"
    assert render(TURNS[:1], set()) == SYSTEM + " USER: <image>\nQ1? ASSISTANT:"
    # the v1 template of stage 2 / evaluation: vicuna_v1, whose system prompt the v1_sq one extends
    v1 = SYSTEM.split("Also,")[0]
    assert lm.render_chat("vicuna_v1", [("user", "Q1?"), ("assistant", "A1.")]) == v1 + " USER: Q1? ASSISTANT: A1.</s>"
    # llava_v1 (conversation.py conv_llava_v1, the --conv-mode default of model_collectA.py / model_vqa.py) is v1's
    # prompt with "human" for "user"; v1 (conv_vicuna_v1) is the template's own
    assert st.SYSTEMS["llava_v1"] == v1.replace("curious user", "curious human").replace("user's", "human's")
    assert st.SYSTEMS["llava_v1"] != v1 and st.SYSTEMS["v1"] is None and st.SYSTEMS["v1_sq"] == SYSTEM
    assert (lm.render_chat("vicuna_v1", [("user", "Q1?")], add_generation_prompt=True, system=st.SYSTEMS["llava_v1"])
            == "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the human's questions. USER: Q1? ASSISTANT:")
    real = st.resolve_defaults(st.Args(model="/ckpt/x"))
    assert (real.answer_system, real.dpo_system, real.train_llm) == ("llava_v1", "v1", "lora")  # as released
    toy = st.resolve_defaults(st.Args())
    assert (toy.answer_system, toy.dpo_system, toy.train_llm) == ("v1_sq", "v1_sq", "full")
    assert st.resolve_defaults(st.Args(eval_only=True)).stages == "eval"
    with pytest.raises(ValueError, match="--stages"):
        st.resolve_defaults(st.Args(stages="sft,rl"))


def test_v1_sq_targets_are_answers_and_vuser_questions():
    _, tok = lm.load("tiny")
    img = tok.convert_tokens_to_ids("<image>")
    s = st.tokenize_sq(tok, st.sq_segments(TURNS, {4}, tok.eos_token), 3, img)
    ids, labels = s["input_ids"], s["labels"]
    assert ids[0] == tok.bos_token_id and ids.count(img) == 3
    assert tok.decode(ids[1:]).replace("<image>" * 3, "<image>") == render(TURNS, {4})
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != lm.IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    runs.append(tok.decode(cur)) if cur else None
    # targets: each answer + </s>, and the VUSER question + </s>; role prefixes and USER questions are masked
    assert runs == [" A1.</s>", " A2.</s>", " Q3?</s>", " A3.</s>"]
    with pytest.raises(lm.DataError, match="no supervised token"):
        st.tokenize_sq(tok, st.sq_segments(TURNS[:1], set(), tok.eos_token), 3, img, where="x")
    with pytest.raises(lm.DataError, match="cut through image tokens"):
        st.tokenize_sq(tok, st.sq_segments(TURNS, set(), tok.eos_token), 3, img, max_length=20, where="x")


def test_vuser_draws_are_seeded_and_skip_the_image_turn():
    draws = [st.draw_vuser_turns(12, 0.5, random.Random(k)) for k in range(400)]
    assert all(0 not in d and all(i % 2 == 0 for i in d) for d in draws)
    rate = sum(len(d) for d in draws) / (400 * 5)  # 5 later human turns (2, 4, ..., 10)
    assert 0.45 < rate < 0.55
    assert st.draw_vuser_turns(12, 0.0, random.Random(0)) == set()
    assert st.draw_vuser_turns(12, 1.0, random.Random(0)) == {2, 4, 6, 8, 10}
    toy = toy_readers.toy_sq_records(TOY / "train.json", seed=0)
    assert toy == toy_readers.toy_sq_records(TOY / "train.json", seed=0)
    source = lm.read_records(TOY / "train.json")
    assert sum(len(r["conversations"]) for _, r in toy) == sum(2 * len(r["qa"]) + 2 for _, r in source)  # every round once
    assert all(len(r["conversations"]) in (2, 4) for _, r in toy)  # at most two rounds per conversation
    first = [r["conversations"][0]["value"] for _, r in toy]
    assert all(f.startswith("<image>\n") for f in first) and len({f.split()[1] for f in first}) >= 3  # varied openers
    assert sum(t["value"].count("<image>") for _, r in toy for t in r["conversations"]) == len(toy)
    model, tok = lm.load("tiny")
    args = st.resolve_defaults(st.Args(sq_r=0.5))
    data = st.SQData(lm.read_records(TOY / "train.json")[:6], TOY, tok, model.config, args)
    a = [data.sample(i, 0)["labels"] for i in range(6)]
    assert a == [data.sample(i, 0)["labels"] for i in range(6)]  # same seed, epoch, sample -> same draw
    assert a != [data.sample(i, 1)["labels"] for i in range(6)]  # a new epoch draws again
    args.seed = 1
    assert a != [data.sample(i, 0)["labels"] for i in range(6)]


# ---------------------------------------------------------------- cluster projector


def cluster_reference(p, x):
    """Spec 4.3 written with explicit loops over centres and tokens (no matmul tricks); tests/test_llava_med.py also checks the
    projector against the released module's own outputs."""
    B, L, D = x.shape
    K = p.num_centers
    out = torch.empty(B, L, p.mlp[2].out_features)
    for b in range(B):
        V, Fe, X = p.v(x[b]), p.f(x[b]), x[b]
        Vn = torch.nn.functional.normalize(V, dim=0)  # released Clustering: each channel normalised across the tokens
        bounds = [((k * L) // K, -(-((k + 1) * L) // K)) for k in range(K)]  # AdaptiveAvgPool1d windows
        C = torch.stack([X[s:e].mean(0) for s, e in bounds])
        CF = torch.stack([Fe[s:e].mean(0) for s, e in bounds])
        for _ in range(p.iterations):
            C = p.c(C)
            S = torch.stack([torch.stack([(torch.nn.functional.normalize(C[n], dim=0) * Vn[l]).sum() for l in range(L)])
                             for n in range(K)])
            S = S.softmax(dim=0)  # each token distributes over the centres
            C = S @ Fe
        sim = torch.sigmoid(p.sim_beta.flatten() + p.sim_alpha.flatten() * torch.stack(
            [torch.stack([torch.cosine_similarity(C[n], X[l], dim=0) for l in range(L)]) for n in range(K)]))
        best = sim.argmax(0)
        new = X.clone()
        for n in range(K):
            members = (best == n).nonzero().flatten()
            proto = (sum(Fe[l] * sim[n, l] for l in members) + CF[n]) / (len(members) + 1)
            for l in members:
                new[l] = new[l] + sim[n, l] * proto
        out[b] = p.mlp(new)
    return out


def test_cluster_projector_matches_the_spec_formula():
    torch.manual_seed(0)
    p = lm.build_projector("cluster5", 12, 20)
    with torch.no_grad():
        p.sim_alpha.fill_(3.0), p.sim_beta.fill_(-0.5)
    x = torch.randn(2, 16, 12)
    y = p(x)
    assert y.shape == (2, 16, 20)  # the token count is unchanged
    torch.testing.assert_close(y, cluster_reference(p, x), atol=1e-5, rtol=0)
    full = lm.build_projector("cluster", 1024, 64)
    assert full.num_centers == 256 and full.iterations == 2
    assert list(full.state_dict()) == ["sim_alpha", "sim_beta", "c.weight", "c.bias", "v.weight", "v.bias", "f.weight",
                                       "f.bias", "ln_1.weight", "ln_1.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                       "mlp.2.bias"]
    with pytest.raises(ValueError, match="unknown projector"):
        lm.build_projector("clusterx", 4, 4)


def test_cluster_checkpoint_saves_in_llava_layout_and_loads(tmp_path):
    args = st.resolve_defaults(st.Args())
    model, tok = lm.load("tiny")
    st.use_cluster_projector(args, model, stage1=False)  # later stages keep the checkpoint's projector
    assert model.config.projector_type == "mlp2x_gelu"
    st.use_cluster_projector(args, model, stage1=True)
    assert model.config.projector_type == "cluster8" and isinstance(model.projector, lm.ClusterProjector)
    lm.save_llava_original(model, tok, tmp_path / "ckpt")
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert {"model.mm_projector.sim_alpha", "model.mm_projector.sim_beta", "model.mm_projector.c.weight",
            "model.mm_projector.ln_1.weight", "model.mm_projector.mlp.0.weight", "model.mm_projector.mlp.2.bias"} <= set(keys)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in keys
    again, tok2 = lm.load(str(tmp_path / "ckpt"))
    assert again.loaded_from[1] == "original" and again.loaded_from[2] == []  # every key used
    assert again.config.projector_type == "cluster8" and again.projector.num_centers == 8
    turns = lm.place_image_markers([("user", "Is there a nodule?"), ("assistant", "yes")], 1)
    ids = torch.tensor([lm.tokenize_conversation(tok, turns, "vicuna_v1", 16, model.config.image_token_id)["input_ids"]])
    pix = lm.preprocess_image(lm.load_image(TOY / "images" / "train_radiology_0000.png"), 64)[None]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, pix).logits, model.eval()(ids, pix).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="only the mlp2x_gelu projector"):
        lm.save_llava_hf(model, tok, tmp_path / "hf")


# ---------------------------------------------------------------- the released prompts, from the upstream code

# Produced by running heliossun/STLLaVA-Med llava/conversation.py (commit 9113c41f13de3234d13db3ca154b2cb9b9e3779a):
# conv_templates[name].copy(), append_message per turn (None for the open one), get_prompt().
UPSTREAM_PROMPTS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions. USER: <image>\nIs there a nodule? ASSISTANT:",
    "v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
          "and polite answers to the user's questions. USER: <image>\nIs there a nodule? ASSISTANT:",
    "v1_sq": SYSTEM + " USER: <image>\nIs there a nodule? ASSISTANT:",
    "v1_sq vuser": SYSTEM + " USER: <image>\nCan you describe the image in detail? ASSISTANT: A chest x-ray.</s>VUSER:",
}


def test_answer_and_self_questioning_prompts_equal_the_released_ones():
    for name in ("llava_v1", "v1", "v1_sq"):  # answers (model_collectA.py, model_vqa.py: llava_v1), DPO (v1)
        prompt = lm.render_chat("vicuna_v1", [("user", "<image>\nIs there a nodule?")], add_generation_prompt=True,
                                system=st.SYSTEMS[name])
        assert prompt == UPSTREAM_PROMPTS[name], name
    describe = [("user", "<image>\nCan you describe the image in detail?"), ("assistant", "A chest x-ray.")]
    assert render(describe, set(), add_vuser_prompt=True) == UPSTREAM_PROMPTS["v1_sq vuser"]  # visual_sq.py


# ---------------------------------------------------------------- what each stage trains


def lora_dropouts(model):
    """{"vision_tower" | "language_model": set of LoRA dropout probabilities}."""
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            d = m.lora_dropout["default"]
            out.setdefault(n.split(".")[0], set()).add(d.p if isinstance(d, torch.nn.Dropout) else 0.0)
    return out


def test_stage1_trains_llm_projector_and_vit_lora_through_the_tower():
    """The released tower forward is @torch.no_grad, so its ViT LoRA never receives a gradient; here it must."""
    args = st.resolve_defaults(st.Args(train_llm="lora", lora_r=8, lora_alpha=16))
    model, tok = lm.load("tiny")
    st.use_cluster_projector(args, model, stage1=True)
    assert st.add_adapters(args, model, stage=1) is None
    assert model.lora_config.r == 8
    assert lora_dropouts(model) == {"language_model": {0.05}, "vision_tower": {0.2}}  # train.py: 0.05, 0.2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("vision_tower.") and "lora_A" in n for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    data = st.SQData(lm.read_records(TOY / "train.json")[:4], TOY, tok, model.config, args)
    batch = data.batch([data.sample(i, 0) for i in range(4)], tok.pad_token_id)
    assert model.vision_features(batch["pixel_values"]).requires_grad
    name = "vision_tower.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"
    params = dict(model.named_parameters())
    lora_a = name.replace("lora_B", "lora_A")
    before = {n: params[n].detach().clone() for n in (name, lora_a, "projector.c.weight")}
    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for step in range(2):
        stats = st.sft_step(model, tok, data, [0, 1, 2, 3], 0, CPU)
        (stats["loss"] / stats["n"]).backward()
        if step == 0:
            assert params[name].grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        if step == 0:
            assert torch.equal(params[lora_a], before[lora_a])  # B was 0, so A had no gradient yet (LoRA's init)
    for k in (name, lora_a, "projector.c.weight"):  # lora_B != 0 after step 1: lora_A moves in step 2
        assert (params[k] - before[k]).abs().max() > 0, k
    with pytest.raises(ValueError, match="differs"):
        lm.add_lora(model, 32, 32, 0.0, targets=lm.VIT_LORA_TARGETS)


def test_stage2_trains_the_projector_against_the_frozen_stage1_model():
    """DPO as released: a new LoRA (LLM dropout 0.05, ViT 0.1) and the projector train (mm_projector_lr); the reference
    stays exactly the stage-1 model (a frozen projector copy, the ViT with adapters off), also after updates."""
    args = st.resolve_defaults(st.Args(lora_r=8, lora_alpha=16))
    model, tok = lm.load("tiny")
    st.use_cluster_projector(args, model, stage1=True)
    model.config.template = "vicuna_v1"
    stage1 = copy.deepcopy(model).eval()
    recs = [r for _, r in lm.read_records(TOY / "train.json")[:3]]
    pairs = [(f"mem[{i}]", st.dpo_record(r["id"], r["image"], "Is there a nodule?", "yes", "no", (9, 1)))
             for i, r in enumerate(recs)]
    data = st.PairData(pairs, TOY, tok, model.config, 512, False, system=st.SQ_SYSTEM)
    frozen = st.add_adapters(dataclasses.replace(args, dpo_freeze_projector=True), copy.deepcopy(model), stage=2)
    assert frozen is None
    ref_projector = st.add_adapters(args, model, stage=2)
    assert lora_dropouts(model) == {"language_model": {0.05}, "vision_tower": {0.1}}  # train_dpo.py: 0.05, 0.1
    assert not any(p.requires_grad for p in ref_projector.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    model.train()
    stats = st.dpo_step(args, model, ref_projector, data, [0, 1, 2], tok, CPU)
    assert abs(float(stats["loss"].detach()) / 3 - math.log(2)) < 1e-6  # LoRA B = 0 and the same projector: policy == reference
    stats["loss"].backward()
    opt.step()
    model.eval()
    batch = st.collate_pairs(data, [0, 1, 2], tok.pad_token_id)
    with torch.no_grad():
        feats, ref_feats = lm.image_features(model, ref_projector, batch["pixel_values"], CPU)
        ref, _ = st.reference_logps(model, None, batch, ref_feats)
        want, _ = st.sequence_logps(stage1, batch, stage1.encode_images(batch["pixel_values"]))
        policy, _ = st.sequence_logps(model, batch, feats)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)  # the reference did not move
    assert (policy - want).abs().max() > 1e-3  # the policy did
    assert (model.projector.c.weight - stage1.projector.c.weight).abs().max() > 0  # the projector trained


# ---------------------------------------------------------------- judges, preference records, the pair cache


def test_judge_rules_and_dpo_records(monkeypatch, tmp_path):
    assert st.parse_scores("8 6\nAnswer 1 is better.") == (8.0, 6.0)
    assert st.parse_scores("7, 7") == (7.0, 7.0)
    for bad in ["", "Answer 1: 8, Answer 2: 6", "8\n6", "eight six", "8 6 5"]:
        assert st.parse_scores(bad) is None, bad
    stats = {}
    assert st.preference_pair("q?", ("a", "b"), "8 6", "answer2", stats) == ("a", "b", (8.0, 6.0))
    assert st.preference_pair("q?", ("a", "b"), "3 9", "answer2", stats) == ("b", "a", (3.0, 9.0))
    assert st.preference_pair("q?", ("a", "b"), "5 5", "answer2", stats) == ("b", "a", (5.0, 5.0))  # tie -> answer 2
    assert st.preference_pair("q?", ("a", "b"), "5 5", "skip", stats) is None
    assert st.preference_pair("q?", ("a", "b"), "no scores here", "answer2", stats) is None
    assert st.preference_pair("q?", ("a", "b"), "", "answer2", stats) is None
    assert st.preference_pair("q?", ("same", "same"), "9 1", "answer2", stats) is None
    assert st.preference_pair(" ", ("a", "b"), "9 1", "answer2", stats) is None
    assert st.preference_pair("q?", ("a <image>", "b"), "9 1", "answer2", stats) is None
    assert stats == {"tie": 2, "unparsable judge reply": 1, "no reference answer": 1, "identical answers": 1,
                     "empty question or answer": 1, "'<image>' in generated text": 1}
    rec = next(r for _, r in lm.read_records(TOY / "train.json") if r["findings"])  # toy_train_rad_0002
    refs = st.reference_answers(rec)
    assert refs["where is the nodule located"] == "right upper lung" and refs["is there a nodule in this image"] == "yes"
    assert st.reference_judge("Where is the nodule located?", "left upper lung", "right upper lung", refs).startswith("7 10\n")
    assert st.reference_judge("Is there a nodule in this image?", "yes", "No.", refs).split("\n")[0] == "10 0"
    assert st.reference_judge("What color is the sky?", "blue", "red", refs) == ""
    content = st.judge_content("Q?", "A1", "A2")
    assert content.startswith("[Question]\nQ?\n\n[Answer 1]\nA1\n\n[End of Answer 1]\n\n[Answer 2]\nA2\n\n[End of Answer 2]\n\n[System]\n")
    # the record format is STLLaVA-Med's and dpo.py reads it
    r = st.dpo_record("x_sq0", rec["image"], "Where is the nodule located?", "right upper lung", "left upper lung", (10, 7))
    chosen, rejected = dpo.pair_turns(r, "mem")
    assert chosen[0] == rejected[0] == ("user", "<image>\nWhere is the nodule located?")
    assert chosen[1] == ("assistant", "right upper lung") and rejected[1] == ("assistant", "left upper lung")
    # a judge VLM by path: any checkpoint llava_med reads, given the image and the judge message, sampled at T 0.2
    model, tok = lm.load("tiny")
    lm.save_llava_hf(model, tok, tmp_path / "judge")
    args = st.resolve_defaults(st.Args(judge=str(tmp_path / "judge"), judge_max_new_tokens=4, gen_batch_size=2))
    facts = {"findings": rec["findings"], "modality": rec["modality"]}
    items = [(TOY / rec["image"], f"Question {k}?", "left upper lung", "right upper lung", refs, facts) for k in range(3)]
    real = st.judge_replies(args, items, 0, 1, CPU)
    assert len(real) == 3 and real == st.judge_replies(args, items, 0, 1, CPU)  # seeded
    assert st.judge_replies(dataclasses.replace(args, judge="reference"), items, 0, 1, CPU) == [""] * 3
    seen = []

    def scripted(m, t, prompts, pixel_values, **kw):
        seen.append(([t.decode(p) for p in prompts], pixel_values.shape, kw["temperature"], kw["seed"]))
        return ["8 3\nAnswer 1 names the right lobe."] * len(prompts)

    monkeypatch.setattr(st.lm, "generate", scripted)
    replies = st.judge_replies(args, items, 0, 1, CPU)
    assert [st.parse_scores(x) for x in replies] == [(8.0, 3.0)] * 3
    assert [len(s[0]) for s in seen] == [2, 1] and seen[0][1] == (2, 3, 64, 64) and seen[0][2] == 0.2
    assert seen[1][3] == seen[0][3] + 1  # batch b samples with the pass's seed + b
    assert all(st.judge_content(q, a1, a2).strip() in p for (_, q, a1, a2, _, _), p in zip(items, seen[0][0] + seen[1][0]))
    monkeypatch.undo()
    model.config.template = "vicuna_v1"
    data = st.PairData([("mem", r)], TOY, tok, model.config, 512, False)
    batch = st.collate_pairs(data, [0], tok.pad_token_id)  # same image and question: one prefix-shared row
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 1
    batch = st.collate_pairs(data, [0], tok.pad_token_id, share_prefix=False)
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2  # one image for both rows
    assert "questions. USER:" in tok.decode(data.items[0]["chosen"]["input_ids"])  # vicuna v1's system prompt
    sq = st.PairData([("mem", r)], TOY, tok, model.config, 512, False, system=st.SQ_SYSTEM)
    text = tok.decode(sq.items[0]["rejected"]["input_ids"])
    assert "questions.Also," in text and text.endswith("ASSISTANT: left upper lung</s>")
    assert tok.decode([t for t in sq.items[0]["chosen"]["labels"] if t != lm.IGNORE_INDEX]) == " right upper lung</s>"


def test_toy_judge_prefers_the_image_grounded_answer():
    """The toy's stand-in for GPT-4o reads only the texts and the record's findings and modality. On the held-out
    pairs of data/toy/prefs_val.json (built by make_toy.py, never by this file) it prefers the chosen, image-grounded
    answer of every clinically serious pair (wrong yes/no, side, missed lesion, hallucinated finding) and scores
    (nearly) every wording-only pair a tie; a judge that ignores the findings cannot. (Its parser is the toy
    hallucination rule's, data/toy_oracles.py.) As the default of the toy run: pref-split images with their facts,
    and ties skipped."""
    from data.toy_oracles import toy_judge_reply
    records = {r["image"]: r for _, r in lm.read_records(TOY / "val.json")}
    verdict = {}
    for _, pair in lm.read_records(TOY / "prefs_val.json"):
        q = pair["conversations"][0]["value"].replace("<image>\n", "")
        chosen, rejected = pair["conversations"][-1]["value"], pair["rejected_conversations"][-1]["value"]
        facts = {"findings": pair["toy_findings"], "modality": records[pair["image"]]["modality"]}
        s1, s2 = st.parse_scores(toy_judge_reply(q, chosen, rejected, facts))
        # the released rule: answer 1 is chosen when it scores higher; swap the order, same verdict
        assert st.parse_scores(toy_judge_reply(q, rejected, chosen, facts)) == (s2, s1)
        verdict.setdefault(pair["toy_serious"], []).append("chosen" if s1 > s2 else "tie" if s1 == s2 else "rejected")
    assert len(verdict[True]) > 200 and set(verdict[True]) == {"chosen"}
    assert verdict[False].count("tie") / len(verdict[False]) > 0.9
    # the facts decide: the same answers about another image flip the verdict
    nodule = {"findings": [{"name": "nodule", "location": "left upper lung"}], "modality": "chest x-ray"}
    normal = {"findings": [], "modality": "chest x-ray"}
    for q, a, b in [("Is this image normal?", "no", "yes"), ("Is there a nodule in this image?", "yes", "no"),
                    ("Is the nodule located in the left upper lung?", "yes", "no"), ("What abnormality is seen?", "nodule", "none")]:
        assert st.parse_scores(toy_judge_reply(q, a, b, nodule)) == (10, 0) and st.parse_scores(toy_judge_reply(q, a, b, normal)) == (0, 10)
    assert st.parse_scores(toy_judge_reply("Is this a chest x-ray?", "yes", "no", normal)) == (10, 0)
    assert st.parse_scores(toy_judge_reply("Where is the nodule located?", "left upper lung", "right upper lung", nodule)) == (10, 0)
    assert st.parse_scores(toy_judge_reply("Is this image normal?", "yes", "the chest", nodule)) == (0, 0)  # no answer = wrong
    assert st.parse_scores(toy_judge_reply("What abnormality is seen?", "chest x-ray", "none", nodule)) == (0, 0)  # no evasion
    assert toy_judge_reply("What colour is the sky?", "blue", "red", nodule) == ""  # not settled by the facts: no reply
    args = st.resolve_defaults(st.Args())
    rows, folder = st.image_sources(args)
    assert (args.judge, args.ties, Path(args.prefs_images).name, len(rows)) == ("toy", "skip", "pref.json", 120)
    # the toy run's stage 1 is long enough to read some of the image (12 epochs) and asks 20 questions per image
    assert (args.sft_epochs, args.n_questions, args.a_temperature, args.dpo_lr) == (12, 20, 1.2, 2e-5)  # val-chosen
    assert all(r["facts"]["modality"] for r in rows) and folder == TOY
    real = st.resolve_defaults(st.Args(model="/ckpt/x", sft_data="/data/x.json"))
    assert (real.judge, real.ties, real.q_temperature, real.describe_prompt) == (
        "reference", "answer2", 1.2, "Can you describe the image in detail?")  # real runs: the released values
    assert (real.sft_epochs, real.n_questions, real.a_temperature, real.dpo_lr) == (3, 5, 1.2, 5e-6)


PREFS = ["--stages", "prefs", "--prefs-limit", "2", "--n-questions", "2", "--gen-batch-size", "2",
         "--describe-max-new-tokens", "2", "--q-max-new-tokens", "4", "--a-max-new-tokens", "2"]


def test_preference_cache_is_keyed_on_the_args_that_change_the_pairs(tmp_path):
    """The pairs are cached under a key of every Args field above dpo_data (and the image rows): a rerun reuses them,
    a stage-2 flag does not change the key, --template does (the pairs are rebuilt); --model counts by its files."""
    out = ["--out", str(tmp_path)]
    prefs = lambda: [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["phase"] == "prefs"]
    faults._in_process(st, PREFS + out)
    faults._in_process(st, PREFS + out + ["--dpo-lr", "1e-3"])
    assert [r["cached"] for r in prefs()] == [False, True] and len(list(tmp_path.glob("prefs_*.json"))) == 1
    faults._in_process(st, PREFS + out + ["--template", "mistral_instruct"])
    assert [r["cached"] for r in prefs()] == [False, True, False] and len(list(tmp_path.glob("prefs_*.json"))) == 2
    rows = prefs()
    assert rows[0]["images"] == 2 and rows[0]["questions"] == 4
    # a --model folder (e.g. runs/stllava_med/stage1_model) keys by its files: rewritten weights rebuild the pairs
    lm.save_llava_hf(*lm.load("tiny"), tmp_path / "m")
    folder = PREFS + out + ["--model", str(tmp_path / "m")]
    faults._in_process(st, folder)
    faults._in_process(st, folder)
    weights = tmp_path / "m" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    faults._in_process(st, folder)
    shutil.copytree(tmp_path / "m", tmp_path / "moved")  # copy2 keeps the file times, as cp -a / rsync -a do
    faults._in_process(st, PREFS + out + ["--model", str(tmp_path / "moved")])
    assert [r["cached"] for r in prefs()][3:] == [False, True, False, True]  # a moved model keeps its pairs


# ---------------------------------------------------------------- the script

SQ_CONV = [{"from": "human", "value": "<image>\nCan you describe the image in detail?"},
           {"from": "gpt", "value": "a chest x-ray"}, {"from": "human", "value": "Is there a nodule?"},
           {"from": "gpt", "value": "yes"}]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Stage-1 data the tiny model memorises in a few dozen steps (8 images, one conversation; with --sq-r 1 its
    second question is a VUSER target), so the self-asked questions hit the reference answers and the reference judge
    yields pairs; and 12 hand-made DPO pairs."""
    d = tmp_path_factory.mktemp("stllava")
    recs = [r for _, r in lm.read_records(TOY / "train.json")[:8]]
    (d / "sq.json").write_text(json.dumps([{"id": r["id"], "image": r["image"], "conversations": SQ_CONV} for r in recs]))
    pairs = [st.dpo_record(r["id"], r["image"], qa["question"], qa["answer"], "no" if qa["answer"] == "yes" else "yes",
                           (9, 1)) for r in recs[:6] for qa in r["qa"][:2]]
    (d / "pairs.json").write_text(json.dumps(pairs))
    return d


def sft_args(small, epochs):
    return ["--sft-data", str(small / "sq.json"), "--image-folder", str(TOY), "--sq-r", "1", "--sft-epochs", str(epochs),
            "--sft-lr", "3e-3", "--projector-lr", "3e-3", "--batch-size", "8", "--micro-batch-size", "4"]


def _run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=faults.ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_complete_pipeline_on_two_ranks_from_an_empty_out(small, tmp_path):
    """Every default stage under torchrun with 2 ranks from an empty --out (issue 15 bug 7: rank 1 read the pairs
    file before rank 0 had written it). On 1 rank, stage 1 with 2 micro-batches accumulated gives the same first
    losses (later ones drift by float reassociation, amplified by training), and preference generation from the same
    stage-1 model gives exactly the same pairs (fixed batches and seeds, whatever the number of ranks)."""
    gen = ["--n-questions", "3", "--gen-batch-size", "4", "--describe-max-new-tokens", "8", "--q-max-new-tokens", "8",
           "--q-temperature", "0.7", "--a-max-new-tokens", "4", "--a-temperature", "5", "--vit-lora-dropout", "0"]
    two, one, again = tmp_path / "two", tmp_path / "one", tmp_path / "again"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "stllava_med.py",
          "--out", str(two), "--dpo-batch-size", "2", "--dpo-micro-batch-size", "1", "--dpo-epochs", "1",
          "--eval-limit", "4", "--eval-max-new-tokens", "4"] + sft_args(small, 60) + gen)
    faults._in_process(st, ["--stages", "sft", "--out", str(one)] + sft_args(small, 2) + gen)  # one rank, here
    faults._in_process(st, ["--stages", "prefs", "--model", str(two / "stage1_model"), "--answer-system", "v1_sq",
                            "--sft-data", str(small / "sq.json"), "--image-folder", str(TOY), "--out", str(again)] + gen)
    rows = [json.loads(line) for line in open(two / "metrics.jsonl")]
    phases = [r["phase"] for r in rows]
    n_dpo = phases.count("dpo")
    assert phases == ["eval_base"] + ["stage1"] * 60 + ["eval_sft", "prefs"] + ["dpo"] * n_dpo + ["eval_dpo"]
    res = json.loads((two / "results.json").read_text())
    prefs_stats = res["prefs"]
    assert prefs_stats["images"] == 8 and prefs_stats["questions"] == 24 and prefs_stats["pairs"] >= 4
    assert prefs_stats["pairs"] + sum(v for k, v in prefs_stats.items() if k not in ("pairs", "images", "questions", "tie")) == 24
    assert len(json.loads((two / "stllava_med_dpo.json").read_text())) == prefs_stats["pairs"]
    assert set(res) == {"train", "base", "sft", "prefs", "dpo", "wall_s"}
    assert n_dpo == res["prefs"]["pairs"] // 2 and res["train"]["dpo"]["steps"] == n_dpo
    assert res["dpo"]["n_closed"] + res["dpo"]["n_open"] == 4
    assert abs(rows[phases.index("dpo")]["loss"] - math.log(2)) < 1e-5  # DPO step 1: policy == the stage-1 reference
    ones = [json.loads(line) for line in open(one / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ones]), torch.tensor([r["loss"] for r in rows[1:3]]),
                               atol=1e-5, rtol=0)  # step 2's loss follows the first update (the same lr in both runs)
    assert json.loads((again / "stllava_med_dpo.json").read_text()) == json.loads((two / "stllava_med_dpo.json").read_text())
    base, _ = lm.load("tiny")
    a = load_file(str(two / "stage1_model" / "model.safetensors"))
    q0 = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert (a[q0] - base.vision_tower.encoder.layers[0].self_attn.q_proj.weight).abs().max() > 1e-7  # ViT LoRA merged
    c = load_file(str(two / "stage2_model" / "model.safetensors"))
    assert (c[q0] - a[q0]).abs().max() > 0  # stage 2's new ViT LoRA trained and merged
    assert (c["model.mm_projector.c.weight"] - a["model.mm_projector.c.weight"]).abs().max() > 0  # projector trained


def test_eval_only_reads_no_training_data(tmp_path):
    model, tok = lm.load("tiny")
    st.use_cluster_projector(st.resolve_defaults(st.Args()), model, stage1=True)
    lm.save_llava_original(model, tok, tmp_path / "ckpt")
    missing = str(tmp_path / "missing.json")
    res = faults._in_process(st, ["--eval-only", "--model", str(tmp_path / "ckpt"), "--sft-data", missing,
                                  "--prefs-images", missing, "--dpo-data", missing, "--eval-limit", "6",
                                  "--eval-max-new-tokens", "2", "--out", str(tmp_path / "out")])
    assert set(res) == {"train", "model", "wall_s"} and res["train"] == {}
    assert res["model"]["n_closed"] + res["model"]["n_open"] == 6
    assert [json.loads(line)["phase"] for line in open(tmp_path / "out" / "metrics.jsonl")] == ["eval_model"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["args.json", "metrics.jsonl", "predictions_model.json",
                                                                    "results.json"]


def test_kill_and_resume_gives_the_same_weights(small, tmp_path):
    """SIGKILL during DPO: the rerun reloads stage 1 from its last checkpoint and resumes DPO, bit-identical."""
    faults.check_kill_and_resume("stllava_med.py", sft_args(small, 2) + [
        "--stages", "sft,dpo", "--dpo-data", str(small / "pairs.json"), "--dpo-batch-size", "2",
        "--dpo-micro-batch-size", "2", "--dpo-epochs", "1", "--save-every", "1"], "dpo", tmp_path)


def test_stage_2_is_keyed_on_its_pairs(small, tmp_path):
    """--stages dpo reads the pairs a prefs run wrote (--prefs-out): other pairs under another name (or edited in place)
    train stage 2 afresh instead of resuming the checkpoint made on the first ones."""
    pairs = json.loads((small / "pairs.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(pairs))
    (tmp_path / "b.json").write_text(json.dumps([dict(p, chosen_conversations=p["reject_conversations"],
                                                       reject_conversations=p["chosen_conversations"]) for p in pairs]))
    run = lambda name: faults._in_process(st, sft_args(small, 1) + [  # noqa: E731
        "--stages", "sft,dpo", "--prefs-out", str(tmp_path / name), "--dpo-batch-size", "4", "--dpo-micro-batch-size", "4",
        "--dpo-epochs", "1", "--out", str(tmp_path / "out")])
    rows = lambda: sum('"phase": "dpo"' in line for line in open(tmp_path / "out" / "metrics.jsonl"))  # noqa: E731
    run("a.json")
    trained = rows()
    run("a.json")
    assert rows() == trained > 0  # the same pairs: resumed, nothing trained
    run("b.json")
    assert rows() == 2 * trained  # other pairs: trained afresh


def test_nonfinite_step_stops_or_is_skipped(small, monkeypatch, tmp_path):
    faults.check_nonfinite(st, sft_args(small, 3) + ["--stages", "sft"], "stage1", tmp_path, monkeypatch, call=3)


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(small, tmp_path, fault):
    faults.check_dead_rank("stllava_med.py", sft_args(small, 500) + ["--stages", "sft"], "stage1", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(small, tmp_path):
    faults.check_bad_inputs("stllava_med.py", sft_args(small, 1) + ["--stages", "sft"],
                            ["--sft-data", str(FIX / "missing_image.jsonl"), "--image-folder", str(FIX)], tmp_path)
