"""dpo.py: the loss (worked example, TRL parity), sequence log-probs (transformers parity), the VQA scorer and
readers, and the training script end to end: torchrun 2 ranks == 1 rank x 2 accumulation, kill-and-resume,
DPO raises held-out reward accuracy."""

import copy
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

import dpo
import faults
import llava_med as lm
from conftest import ROOT

REAL = ROOT.parent / "shared" / "realdata"


# ---------------------------------------------------------------- loss


def test_dpo_loss_worked_example():
    """Log-ratio differences D = [0, 10, 20] with beta 0.1 give beta*D = [0, 1, 2] and losses -log sigmoid([0, 1, 2])
    = [log 2, 0.3133, 0.1269] (torchtune's test_dpo_loss vectors)."""
    pc = torch.tensor([-1.0, -2.0, -3.0])
    pr = torch.tensor([-1.0, -12.0, -23.0])
    zero = torch.zeros(3)
    losses, rc, rr = dpo.dpo_loss(pc, pr, zero, zero, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([math.log(2), 0.313262, 0.126928]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rc, 0.1 * pc)
    torch.testing.assert_close(rr, 0.1 * pr)
    # a reference shifts the log-ratios: with ref = policy the loss is log 2 everywhere
    losses, rc, rr = dpo.dpo_loss(pc, pr, pc, pr, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    # cDPO, eps = 0.1: -(0.9) log s(x) - 0.1 log s(-x) at x = 1  ->  0.9*0.313262 + 0.1*1.313262
    losses, _, _ = dpo.dpo_loss(pc, pr, zero, zero, beta=0.1, label_smoothing=0.1)
    assert abs(float(losses[1]) - (0.9 * 0.313262 + 0.1 * 1.313262)) < 1e-5
    # IPO: ((pc-rc)/lc - (pr-rr)/lr - 1/(2*beta))^2; pair 1: (-2/2 - (-12/4) - 5)^2 = 9; pairs 0, 2: (0 - 5)^2
    losses, _, _ = dpo.dpo_loss(pc, pr, zero, zero, beta=0.1, loss_type="ipo",
                                chosen_len=torch.tensor([1.0, 2.0, 3.0]), rejected_len=torch.tensor([1.0, 4.0, 23.0]))
    torch.testing.assert_close(losses, torch.tensor([25.0, 9.0, 25.0]))


def test_dpo_loss_gradient_prefers_chosen():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo.dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]))
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises the chosen and lowers the rejected log-prob


def test_loss_equals_trl_preference_loss_fn():
    trl_loss = pytest.importorskip("trl.losses.dpo_loss")
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(5, generator=g) for _ in range(4))
    ours, our_rc, our_rr = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss, chosen_rewards, rejected_rewards = trl_loss.FusedLinearDPOFunction.preference_loss_fn(
        pc, pr, torch.zeros(10), rc, rr, beta=0.1, loss_type="sigmoid")
    torch.testing.assert_close(ours.mean(), loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_rc, chosen_rewards, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- log-probs and the full TRL loss on our model


@pytest.fixture(scope="module")
def tiny_pairs():
    model, tok = lm.load("tiny")
    model.eval()
    args = dpo.Args()
    records, folder = dpo.load_preferences(args, "test")
    data = dpo.PairData(records[:40:7], folder, tok, model.config, 512, False)  # uneven answer lengths
    return model, tok, data


def test_sequence_logps_equal_llava_hf(tiny_pairs, tmp_path):
    model, tok, data = tiny_pairs
    lm.save_llava_hf(model, tok, tmp_path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = dpo.collate_pairs(data, [0, 1, 2], tok.pad_token_id, share_prefix=False)  # TRL's rows
    with torch.no_grad():
        feats = model.encode_images(batch["pixel_values"])
        ours, counts = dpo.sequence_logps(model, batch, feats)
        pix_rows = batch["pixel_values"][batch["row_images"]]
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pix_rows).logits
    targets = batch["labels"][:, 1:]
    mask = targets != lm.IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (logp * mask).sum(-1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)
    assert counts.tolist() == mask.sum(-1).float().tolist()


class _AsTRLModel(torch.nn.Module):
    """Our model with the interface TRL's _compute_loss calls: model(input_ids, attention_mask, pixel_values,
    use_cache=False).logits, one image per row."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, pixel_values=None, use_cache=False, **kw):
        return self.m(input_ids, pixel_values=pixel_values, attention_mask=attention_mask)


def test_loss_equals_trl_compute_loss_on_our_model(tiny_pairs):
    """TRL 1.13 DPOTrainer._compute_loss with a stub self (spec B.7) on our tiny LLaVA, live reference model."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.13.0":
        pytest.skip(f"the stub recipe is pinned to trl 1.13.0 (found {trl.__version__})")
    from accelerate import Accelerator
    from trl import DPOTrainer

    model, tok, data = tiny_pairs
    ref = copy.deepcopy(model)
    with torch.no_grad():  # make the reference differ from the policy
        for p in ref.language_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    idx = [0, 1, 2]
    batch = dpo.collate_pairs(data, idx, tok.pad_token_id, share_prefix=False)
    with torch.no_grad():
        logps, _ = dpo.sequence_logps(model, batch, model.encode_images(batch["pixel_values"]))
        ref_logps, _ = dpo.sequence_logps(ref, batch, ref.encode_images(batch["pixel_values"]))
    ours, _, _ = dpo.dpo_loss(logps[:3], logps[3:], ref_logps[:3], ref_logps[3:], beta=0.1)

    policy, ref_m = _AsTRLModel(model), _AsTRLModel(ref)
    stub = SimpleNamespace(
        model=policy, ref_model=ref_m, accelerator=Accelerator(cpu=True), precompute_ref_logps=False,
        beta=0.1, loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
        aux_loss_enabled=False, router_aux_loss_coef=0.0, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != lm.IGNORE_INDEX).long(),
              "pixel_values": batch["pixel_values"][batch["row_images"]]}
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
    torch.testing.assert_close(ours.mean(), trl_loss, atol=1e-5, rtol=0)


def test_each_image_encoded_once_per_step(tiny_pairs):
    model, tok, data = tiny_pairs
    batch = dpo.collate_pairs(data, [0, 1, 2], tok.pad_token_id, share_prefix=False)
    assert batch["pixel_values"].shape[0] == 3 and batch["row_images"].tolist() == [0, 1, 2, 0, 1, 2]
    calls = []
    h = model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        feats, ref_feats = lm.image_features(model, None, batch["pixel_values"], torch.device("cpu"))
        dpo.sequence_logps(model, batch, feats)
        with torch.no_grad():
            dpo.sequence_logps(model, batch, ref_feats)
    finally:
        h.remove()
    assert calls == [3]  # 3 images for 6 policy rows + 6 reference rows


def _pair_data(tmp_path, tok, cfg):
    """Pairs of every kind: short and long answers, two images in one prompt, a pair with a rejected image (it
    cannot share its prompt), and answers that begin with the same words."""
    im = [f"images/test_radiology_{i:04d}.png" for i in range(3)]
    def rec(i, images, q, a, b, rejected_image=None):
        h = {"from": "human", "value": "<image>\n" * len(images) + q}
        r = {"id": str(i), "image": images, "conversations": [h, {"from": "gpt", "value": a}],
             "rejected_conversations": [h, {"from": "gpt", "value": b}]}
        return {**r, "rejected_image": rejected_image} if rejected_image else r
    recs = [rec(0, im[:1], "Is there a nodule?", "yes", "no"),
            rec(1, im[:2], "Compare the two images. Where is the nodule?", "in the left upper lung of the first image",
                "none"),
            rec(2, im[1:2], "What is shown?", "a chest x-ray", "a fundus photograph", rejected_image=im[2]),
            rec(3, im[2:3], "Describe the image.", "Chest x-ray. A round nodule is seen in the right lower lung.",
                "Chest x-ray. The lungs are clear.")]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    return dpo.PairData(lm.read_records(f), ROOT / "data" / "toy", tok, cfg, 512, False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_sharing_equals_two_rows(tiny_pairs, tmp_path, attn):
    """One row per pair that shares images and prompt gives the per-answer log-probs (and counts) of two rows,
    for single and mixed batches (a pair with a rejected image keeps two rows), several images per sample, rows of
    different lengths (right padding on shorter rows of either kind), SDPA and eager attention; fp32."""
    model, tok, _ = tiny_pairs
    data = _pair_data(tmp_path, tok, model.config)
    model.config.text_config._attn_implementation = model.language_model.config._attn_implementation = attn
    try:
        for idx in ([0], [1], [2], [3], [0, 1, 2, 3], [3, 2, 1], [1, 3]):
            shared, plain = (dpo.collate_pairs(data, idx, tok.pad_token_id, share) for share in (True, False))
            assert shared["input_ids"].shape[0] == sum(2 if i == 2 else 1 for i in idx)  # pair 2: two rows
            with torch.no_grad():
                a = dpo.sequence_logps(model, shared, model.encode_images(shared["pixel_values"]))
                b = dpo.sequence_logps(model, plain, model.encode_images(plain["pixel_values"]))
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
            assert torch.equal(a[1], b[1]) and (a[1] > 0).all()
            assert shared["n_tokens"] < plain["n_tokens"] or idx == [2]  # the prompt ran once
    finally:
        model.config.text_config._attn_implementation = model.language_model.config._attn_implementation = "sdpa"


# ---------------------------------------------------------------- scorer and readers


def test_scorer_edge_cases():
    rows = [
        {"answer": "no", "prediction": "Normal chest x-ray.", "answer_type": "CLOSED"},  # 'normal' is not 'no'
        {"answer": "yes", "prediction": "Yes, there is a nodule.", "answer_type": "CLOSED"},
        {"answer": "no", "prediction": "No.", "answer_type": "CLOSED"},
        {"answer": "yes", "prediction": "I cannot tell", "answer_type": "CLOSED"},
        {"answer": "Left upper lung", "prediction": "the left upper lung.", "answer_type": "OPEN"},
        {"answer": "right lower lung", "prediction": "lung", "answer_type": "OPEN"},
    ]
    s = lm.score_vqa(rows)
    assert s["n_closed"] == 4 and s["n_open"] == 2
    assert s["closed_accuracy"] == 0.5  # hits: rows 2 and 3
    assert abs(s["closed_f1"] - 2 / 3) < 1e-9  # tp=1 (row 2), fn=1 (row 4), fp=0
    assert abs(s["open_recall"] - (1.0 + 1 / 3) / 2) < 1e-9
    assert s["open_exact"] == 0.5
    buggy = lm.score_vqa(rows, closed_scoring="llava_med")  # our numbers, plus the released ones
    assert buggy["closed_accuracy"] == 0.5 and buggy["compat_closed_accuracy"] == 0.75  # row 1: 'no' in 'normal'
    assert lm.normalize_answer('The "left"/right lung, 3.5 cm.') == "left right lung 3.5 cm"
    assert lm.token_recall("lung lung", "lung", compat=True) == (1.0, 1.0, 1.0)  # the released count
    assert lm.token_recall("lung lung", "lung") == (0.5, 1.0, 2 / 3)  # clipped: the second 'lung' matches nothing
    assert lm.yes_no("Answer: no, it is not") == "no" and lm.yes_no("nothing") is None


@pytest.mark.skipif(not REAL.exists(), reason="../shared/realdata not present")
def test_readers_on_real_vqa_sets():
    rad = lm.read_vqa(str(REAL / "vqa_rad" / "testset.json"))
    assert len(rad) == 451 and sum(r["answer_type"] == "CLOSED" for r in rad) == 272
    public = lm.read_vqa(str(REAL / "vqa_rad" / "VQA_RAD Dataset Public.json"))
    assert len(public) == 451
    slake = lm.read_vqa(str(REAL / "slake" / "test.json"))
    assert slake and all(os.path.exists(r["image"]) for r in slake + rad[:20])
    toy = lm.read_vqa(str(ROOT / "data" / "toy" / "test_vqa.json"))
    assert len(toy) == 528 and toy[0]["question"] and "<image>" not in toy[0]["question"]


def test_bad_preference_records(tmp_path):
    model, tok = lm.load("tiny")
    (tmp_path / "x.png").write_bytes((ROOT / "data/toy/images/train_radiology_0000.png").read_bytes())
    h = {"from": "human", "value": "<image>\nq?"}
    recs = [{"id": "ok", "image": "x.png", "conversations": [h, {"from": "gpt", "value": "yes"}],
             "rejected_conversations": [h, {"from": "gpt", "value": "no"}]},
            {"id": "noimg", "image": "missing.png", "conversations": [h, {"from": "gpt", "value": "yes"}],
             "rejected_conversations": [h, {"from": "gpt", "value": "no"}]},
            {"id": "norej", "image": "x.png", "conversations": [h, {"from": "gpt", "value": "yes"}]}]
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(lm.DataError, match=r"prefs.jsonl:2: image not found"):
        dpo.PairData(lm.read_records(f), tmp_path, tok, model.config, 512, skip_bad=False)
    data = dpo.PairData(lm.read_records(f), tmp_path, tok, model.config, 512, skip_bad=True)
    assert len(data) == 1 and sum(data.skipped.values()) == 2
    f.write_text(json.dumps(dict(recs[0], image="../../etc/passwd")))
    with pytest.raises(lm.DataError, match=r"prefs.jsonl:1: image path .* leaves the image folder"):
        dpo.PairData(lm.read_records(f), tmp_path, tok, model.config, 512, skip_bad=False)


# ---------------------------------------------------------------- the script end to end

# lr 1e-5 (not the toy default 1e-3) for the equality tests: Adam's first steps move every weight by about lr, so
# reduction-order noise on a near-zero gradient would become a 1e-5 weight difference at lr 1e-3
FAST = ["--sft-warmup-steps", "5", "--lora-dropout", "0", "--batch-size", "8", "--micro-batch-size", "4",
        "--no-eval", "--no-export-merged", "--lr", "1e-5"]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(out_dir / "metrics.jsonl")) if r.get("phase") == "dpo"]


def _final_weights(out_dir):
    ckpt = dpo.latest_checkpoint(out_dir / "dpo")
    return load_file(str(ckpt / "trainable.safetensors"))


def test_two_ranks_and_precomputed_reference_equal_one_rank_live(tmp_path):
    """One reference run (1 rank, 2 micro-batches of 4, live reference model), 2 steps, against: (a) torchrun 2
    ranks x 1 micro-batch, the same global batch of 8 pairs: tolerance 1e-5 on the loss and on every LoRA weight
    (reduction order differs; fp32); (b) --precompute-ref (cached table) + --activation-checkpointing: the same
    losses. One reference run for both saves a run of the suite."""
    one, two, pre = tmp_path / "one", tmp_path / "two", tmp_path / "pre"
    faults._in_process(dpo, ["--max-steps", "2", "--out", str(one)] + FAST)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "dpo.py",
          "--max-steps", "2", "--out", str(two)] + FAST)
    torch.testing.assert_close(torch.tensor(_losses(one)), torch.tensor(_losses(two)), atol=1e-5, rtol=0)
    a, b = _final_weights(one), _final_weights(two)
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    faults._in_process(dpo, ["--max-steps", "2", "--out", str(pre), "--precompute-ref", "--activation-checkpointing"]
                       + FAST)
    assert list(pre.glob("ref_logps_*.safetensors")) and not list(pre.glob("*.tmp"))  # written whole, then renamed
    torch.testing.assert_close(torch.tensor(_losses(one)), torch.tensor(_losses(pre)), atol=1e-5, rtol=0)


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "dpo.py", "--max-steps", "6", "--save-every", "2", "--lora-dropout", "0.05"] + FAST[:2] + FAST[4:]
    faults._in_process(dpo, cmd[2:] + ["--out", str(full)])  # the uninterrupted and the resumed run: this process
    p = faults.start("dpo.py", cmd[2:] + ["--out", str(killed)])
    deadline = time.time() + 240
    while not (killed / "dpo" / "checkpoints" / "step_0000002" / "state.json").exists():
        assert p.is_alive() and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    p.kill()
    p.join()
    assert not (killed / "dpo" / "checkpoints" / "step_0000006").exists()
    # damage the newest checkpoint if the kill left one after step 2: resume must detect it and use an older one
    newest = dpo.latest_checkpoint(killed / "dpo")
    if newest.name != "step_0000002":
        (newest / "trainable.safetensors").write_bytes(b"\0" * 16)
        assert dpo.latest_checkpoint(killed / "dpo").name < newest.name
    faults._in_process(dpo, cmd[2:] + ["--out", str(killed)])  # resumes from the newest complete, undamaged checkpoint
    a, b = _final_weights(full), _final_weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert _losses(full)[-1] == _losses(killed)[-1]
    final = dpo.latest_checkpoint(killed / "dpo")  # a checksum mismatch is detected and the previous checkpoint used
    assert final.name == "step_0000006"
    (final / "optimizer.safetensors").write_bytes(b"x")
    assert dpo.latest_checkpoint(killed / "dpo").name == "step_0000004"


def test_dpo_raises_heldout_reward_accuracy(tmp_path):
    """20 DPO steps after a 30-step warm start: the implicit reward ranks held-out pairs (prefs_val.json, 256 pairs,
    a quarter of them wording-only) above chance (measured 0.590; a no-op DPO gives 0, a random direction ~0.5)
    with a positive mean margin. Closed accuracy is left to the default run: a 30-step model answers by wording."""
    out = tmp_path / "run"
    faults._in_process(dpo, ["--sft-warmup-steps", "30", "--max-steps", "20", "--eval-limit", "20",
                             "--no-eval-before", "--no-export-merged", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_pairs"]["pairs"] == 256
    assert res["heldout_pairs"]["pair_accuracy"] > 0.55 and res["heldout_pairs"]["pair_margin"] > 0
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A") for k in adapter)


@pytest.mark.parametrize("tune_projector", [False, True])
def test_adapter_and_merged_export_load_in_transformers(tmp_path, tune_projector):
    """adapter/ (PEFT format, llava-hf module names) on base_llava_hf/ == the merged llava_hf/ export; both load
    with transformers' LlavaForConditionalGeneration (what vLLM serves). A trained projector is in the adapter too
    (PEFT's modules_to_save; before, PeftModel kept the base's projector and only the merged export had it)."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    faults._in_process(dpo, ["--max-steps", "2", "--sft-warmup-steps", "5", "--lr", "1e-3", "--no-eval",
                             "--export-merged", "--batch-size", "8", "--micro-batch-size", "8", "--out", str(out)]
                       + ["--tune-projector", "--projector-lr", "1e-2"] * tune_projector)
    base = transformers.LlavaForConditionalGeneration.from_pretrained(out / "base_llava_hf", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(out / "llava_hf", dtype=torch.float32).eval()
    cfg = merged.config
    ids = torch.tensor([[1] + [cfg.image_token_index] * cfg.image_seq_length + [5, 40, 41, 42, 43]])
    pix = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids, pixel_values=pix).logits, merged(input_ids=ids, pixel_values=pix).logits
        plain = transformers.LlavaForConditionalGeneration.from_pretrained(out / "base_llava_hf", dtype=torch.float32)
        c = plain.eval()(input_ids=ids, pixel_values=pix).logits
        proj = lambda m: m.multi_modal_projector(torch.ones(1, cfg.vision_config.hidden_size))
        torch.testing.assert_close(proj(with_adapter.base_model.model.model), proj(merged.model), atol=1e-6, rtol=0)
        assert ((proj(plain.model) - proj(merged.model)).abs().max() > 1e-4) == tune_projector
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a - c).abs().max() > 1e-4  # the adapter is not a no-op


def test_full_finetune_runs(tmp_path):
    out = tmp_path / "full"
    faults._in_process(dpo, ["--max-steps", "2", "--full-finetune", "--lr", "1e-5", "--out", str(out)] + FAST)
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    trained = load_file(str(dpo.latest_checkpoint(out / "dpo") / "trainable.safetensors"))["language_model.lm_head.weight"]
    start = load_file(str(out / "base_llava_hf" / "model.safetensors"))["lm_head.weight"]
    assert (trained - start).abs().max() > 0  # the FSDP root's parameters (lm_head) really train
    assert (out / "llava_hf" / "config.json").exists()  # full fine-tuning always writes the model
