"""stllava_med.py: the v1_sq template (exact strings, targets, seeded VUSER draws), the cluster projector (formula,
checkpoint names, load round trip), ViT LoRA training through the tower, the judge rules and DPO records, and the
script end to end: torchrun 2 ranks == 1 rank x 2 accumulation for stage 1, then DPO from the saved stage-1 model."""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dpo
import llava_med as lm
import stllava_med as st
from conftest import ROOT

TOY = ROOT / "data" / "toy"

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
    assert st.render_sq(TURNS[:4], {2}) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>VUSER: Q2?</s> ASSISTANT: A2.</s>"
    assert st.render_sq(TURNS[:4], set()) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    assert st.render_sq(TURNS, {4}) == (SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
                                        "VUSER: Q3?</s> ASSISTANT: A3.</s>")
    # the self-questioning prompt (visual_sq.py: description answered, then an empty VUSER message)
    assert st.render_sq(TURNS[:2], set(), add_vuser_prompt=True) == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>VUSER:"
    assert st.render_sq(TURNS[:1], set()) == SYSTEM + " USER: <image>\nQ1? ASSISTANT:"
    # the v1 template of stage 2 / evaluation: vicuna_v1, whose system prompt the v1_sq one extends
    assert lm.render_chat("vicuna_v1", [("user", "Q1?"), ("assistant", "A1.")]) == SYSTEM.split("Also,")[0] + " USER: Q1? ASSISTANT: A1.</s>"


def test_v1_sq_targets_are_answers_and_vuser_questions():
    _, tok = lm.load("tiny")
    img = tok.convert_tokens_to_ids("<image>")
    s = st.tokenize_sq(tok, st.sq_segments(TURNS, {4}, tok.eos_token), 3, img)
    ids, labels = s["input_ids"], s["labels"]
    assert ids[0] == tok.bos_token_id and ids.count(img) == 3
    assert tok.decode(ids[1:]).replace("<image>" * 3, "<image>") == st.render_sq(TURNS, {4})
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
    toy = st.toy_sq_records(TOY / "train.json", seed=0)
    assert toy == st.toy_sq_records(TOY / "train.json", seed=0)
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
    st.use_cluster_projector(args, model)
    assert model.config.projector_type == "cluster8" and isinstance(model.projector, lm.ClusterProjector)
    st.save_llava_original(model, tok, tmp_path / "ckpt")
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


# ---------------------------------------------------------------- ViT LoRA


def test_vit_lora_weights_change_after_a_step():
    """The released tower forward is @torch.no_grad, so its ViT LoRA never receives a gradient; here it must."""
    args = st.resolve_defaults(st.Args(train_llm="lora", lora_r=8, lora_alpha=16))
    model, tok = lm.load("tiny")
    st.use_cluster_projector(args, model)
    st.add_lora(model, args.lora_r, args.lora_alpha, 0.0)
    st.add_vit_lora(model, args.vit_lora_r, args.vit_lora_alpha, 0.0)
    st.set_trainable_stage1(model, args)
    assert model.lora_config.r == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("vision_tower.") and "lora_A" in n for n in trainable)
    assert not any(n.startswith("vision_tower.") and "lora_" not in n for n in trainable)  # the ViT base stays frozen
    assert not any(n.startswith("language_model.") and "lora_" not in n for n in trainable)
    data = st.SQData(lm.read_records(TOY / "train.json")[:4], TOY, tok, model.config, args)
    batch = data.batch([data.sample(i, 0) for i in range(4)], tok.pad_token_id)
    assert model.vision_features(batch["pixel_values"]).requires_grad
    name = "vision_tower.encoder.layers.0.self_attn.q_proj.lora_B.default.weight"
    params = dict(model.named_parameters())
    lora_a = name.replace("lora_B", "lora_A")
    before = {n: params[n].detach().clone() for n in (name, lora_a, "projector.c.weight")}
    opt = st.make_optimizer(model, {"projector.": 1e-3, "vision_tower.": 5e-3, "": 1e-3}, torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-3, 1e-3]
    loss, n = st.sft_loss_sum(model, batch)
    (loss / n).backward()
    assert params[name].grad.abs().sum() > 0
    opt.step()
    for k in (name, "projector.c.weight"):
        assert (params[k] - before[k]).abs().max() > 0, k
    assert torch.equal(params[lora_a], before[lora_a])  # B was 0, so A had no gradient yet (LoRA's init)
    opt.zero_grad()
    loss, n = st.sft_loss_sum(model, batch)
    (loss / n).backward()  # lora_B != 0 now: lora_A gets a gradient and moves too
    opt.step()
    assert (params[lora_a] - before[lora_a]).abs().max() > 0
    with pytest.raises(ValueError, match="differs"):
        st.add_vit_lora(model, 32, 32, 0.0)


# ---------------------------------------------------------------- judge and preference records


def test_judge_rules_and_dpo_records(monkeypatch):
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
    rec = lm.read_records(TOY / "train.json")[0][1]
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
    model, tok = lm.load("tiny")
    model.config.template = "vicuna_v1"
    # a judge VLM by path: any llava_med model, given the image and the judge message (here the random tiny one)
    judge = st.model_judge(model.eval(), tok, st.resolve_defaults(st.Args(judge_max_new_tokens=4)))
    pix = lm.preprocess_image(lm.load_image(TOY / rec["image"]), 64)
    assert isinstance(judge(pix, "Where is the nodule located?", "left upper lung", "right upper lung"), str)
    seen = []

    def scripted(m, t, prompts, pixel_values, **kw):
        seen.append((t.decode(prompts[0]), pixel_values.shape, kw["temperature"]))
        return ["8 3\nAnswer 1 names the right lobe."]

    monkeypatch.setattr(st.lm, "generate", scripted)
    reply = judge(pix, "Where is the nodule located?", "left upper lung", "right upper lung")
    assert st.parse_scores(reply) == (8.0, 3.0)
    assert st.judge_content("Where is the nodule located?", "left upper lung", "right upper lung").strip() in seen[0][0]
    assert seen[0][1] == (1, 3, 64, 64) and seen[0][2] == 0.2
    monkeypatch.undo()
    data = st.AnswerPairData([("mem", r)], TOY, tok, model.config, 512, False)
    batch = st.collate_pairs(data, [0], tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2  # one image for both rows
    assert "questions. USER:" in tok.decode(data.items[0]["chosen"]["input_ids"])  # vicuna v1's system prompt
    sq = st.AnswerPairData([("mem", r)], TOY, tok, model.config, 512, False, system=st.SQ_SYSTEM)
    text = tok.decode(sq.items[0]["rejected"]["input_ids"])
    assert "questions.Also," in text and text.endswith("ASSISTANT: left upper lung</s>")
    assert tok.decode([t for t in sq.items[0]["chosen"]["labels"] if t != lm.IGNORE_INDEX]) == " right upper lung</s>"


# ---------------------------------------------------------------- the script


def _run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_all_stages_and_torchrun_two_ranks_equal_one_rank(tmp_path):
    """One process runs every stage: stage 1 (full LLM + cluster projector + ViT LoRA), preference generation, DPO on
    STLLaVA-Med-format pairs, evaluation. Stage 1 on 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches (losses and
    the saved stage-1 model, atol 1e-5); the ViT really trained in both stages."""
    recs = [r for _, r in lm.read_records(TOY / "train.json")[:8]]
    pairs = [st.dpo_record(r["id"], r["image"], qa["question"], qa["answer"], "no" if qa["answer"] == "yes" else "yes", (9, 1))
             for r in recs for qa in r["qa"][:2]]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    stage1 = ["--sft-epochs", "0.015", "--batch-size", "8", "--micro-batch-size", "4", "--vit-lora-dropout", "0"]
    _run([sys.executable, "stllava_med.py", "--out", str(tmp_path / "one"), "--no-eval-before"] + stage1 +
         ["--prefs-limit", "4", "--n-questions", "2", "--gen-batch-size", "4", "--describe-max-new-tokens", "4",
          "--q-max-new-tokens", "8", "--a-max-new-tokens", "4", "--dpo-data", str(tmp_path / "pairs.json"),
          "--image-folder", str(TOY), "--dpo-batch-size", "8", "--dpo-micro-batch-size", "8", "--dpo-epochs", "1",
          "--dpo-lr", "1e-3", "--eval-limit", "4", "--eval-max-new-tokens", "4"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "stllava_med.py",
          "--stages", "sft", "--out", str(tmp_path / "two")] + stage1)
    rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert [r["phase"] for r in rows] == ["stage1"] * 2 + ["eval_sft", "prefs"] + ["stage2_dpo"] * 2 + ["eval_dpo"]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows[:2]]), torch.tensor([r["loss"] for r in two]),
                               atol=1e-5, rtol=0)
    a = load_file(str(tmp_path / "one" / "stage1_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "stage1_model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    base, _ = lm.load("tiny")
    q0 = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert (a[q0] - base.vision_tower.encoder.layers[0].self_attn.q_proj.weight).abs().max() > 1e-7  # ViT LoRA merged in
    res = json.loads((tmp_path / "one" / "results.json").read_text())
    prefs = res["prefs"]
    assert prefs["images"] == 4 and prefs["questions"] == 8
    assert prefs["pairs"] + sum(v for k, v in prefs.items() if k not in ("pairs", "images", "questions", "tie")) == 8
    assert len(json.loads((tmp_path / "one" / "stllava_med_dpo.json").read_text())) == prefs["pairs"]
    assert set(res) == {"sft", "prefs", "dpo", "wall_s"} and res["dpo"]["n_closed"] + res["dpo"]["n_open"] == 4
    assert abs(rows[4]["loss"] - 0.693147) < 1e-4  # DPO step 1: policy == reference (the frozen stage-1 model)
    c = load_file(str(tmp_path / "one" / "stage2_model" / "model.safetensors"))
    assert (c[q0] - a[q0]).abs().max() > 0  # stage 2's new ViT LoRA trained and merged
