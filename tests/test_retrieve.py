"""retrieve.py: adaptive-k rules on hand-made score lists, the gamma sweep, the faiss index round trip (flat, IVF,
HNSW), the InfoNCE loss against a plain formula, the 2-rank gathered loss == 1-rank full-batch gradient, and the
toy run end to end (router accuracy, fine-tuned Recall@k above the untrained retriever, index loads and searches)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import retrieve as R
from conftest import ROOT


# ---------------------------------------------------------------- adaptive k


def test_paper_rule_cuts_at_the_first_large_log_ratio():
    s = [0.9, 0.88, 0.87, 0.5, 0.49]  # log-ratios 0.0225, 0.0114, 0.554, 0.0202
    assert R.adaptive_k_paper(s, gamma=0.1, k_max=5) == 3
    assert R.adaptive_k_paper(s, gamma=0.02, k_max=5) == 1  # 0.0225 > 0.02 already
    assert R.adaptive_k_paper(s, gamma=1.0, k_max=5) == 5  # no gap: keep all k_max
    assert R.adaptive_k_paper(s, gamma=1.0, k_max=2) == 2  # capped
    assert R.adaptive_k_paper([0.9, 0.3, 0.29], gamma=0.5, k_max=10) == 1  # log 3 = 1.10 at once
    assert R.adaptive_k_paper([0.7], gamma=0.1, k_max=5) == 1
    # the first gap wins even when a later one is larger
    assert R.adaptive_k_paper([1.0, 0.8, 0.79, 0.1], gamma=0.2, k_max=4) == 1  # log 1.25 = 0.223


def test_code_rule_keeps_scores_within_a_ratio_of_the_top():
    s = [0.9, 0.88, 0.87, 0.5, 0.49]  # top / s = 1, 1.02, 1.03, 1.8, 1.84
    assert R.adaptive_k_code(s, threshold=1.5, k_max=5) == 3
    assert R.adaptive_k_code(s, threshold=2.0, k_max=5) == 5
    assert R.adaptive_k_code(s, threshold=2.0, k_max=2) == 2
    assert R.adaptive_k_code(s, threshold=1.01, k_max=5) == 1  # the top-1 itself always stays
    # the two rules differ: a slow decline has no sharp gap (paper keeps all) but drifts far from the top (code cuts)
    slow = [1.0, 0.9, 0.81, 0.73, 0.66]
    assert R.adaptive_k_paper(slow, gamma=0.2, k_max=5) == 5 and R.adaptive_k_code(slow, 1.3, 5) == 3
    assert R.choose_k(s, "fixed", 4) == 4 and R.choose_k(s, "paper", 5, gamma=0.1) == 3
    with pytest.raises(ValueError):
        R.choose_k(s, "nope", 5)


def test_positive_similarity_and_gamma_sweep():
    assert np.allclose(R.positive_similarity([1.0, 0.0, -1.0]), [1.0, 0.5, 1e-6])
    rows = [np.array([0.9, 0.88, 0.5]), np.array([0.95, 0.6, 0.58])]
    rel = [np.array([True, True, False]), np.array([True, False, False])]  # relevant = the head before the gap
    best, table = R.sweep_gamma([0.01, 0.1, 2.0], rows, rel, k_max=3)
    assert best == 0.1  # cuts both lists exactly at their gap: precision 1, recall 1
    row = {r["gamma"]: r for r in table}
    assert row[0.1]["f1"] == pytest.approx(1.0) and row[0.1]["mean_k"] == 1.5
    assert row[2.0]["mean_k"] == 3 and row[2.0]["precision"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    best, table = R.sweep_gamma([0.01, 2.0], rows, rel, 3, score_fn=lambda g, ks: sum(ks))  # caller's criterion
    assert best == 2.0 and table[1]["score"] == 6
    best, table = R.sweep_gamma([0.01, 2.0], rows, None, 3, score_fn=lambda g, ks: -sum(ks))  # no relevance labels
    assert best == 0.01 and set(table[0]) == {"gamma", "mean_k", "score"}
    assert R.relevance_key("Nodule, 13 pixels.") == R.relevance_key("nodule,  9 pixels.")
    # the toy's findings decide where both entries carry them (its reports word one finding in several ways)
    toy = R.read_pairs(ROOT / "data" / "toy" / "val.json")[0]
    twin = {"report": "A faint round nodule is seen.", "finding": R.finding_key({"findings": [
        {"name": "nodule", "location": "left upper lung", "box": [0, 0, 1, 1]}]})}
    assert toy["finding"] == [["nodule", "left upper lung"]] and R.same_finding(toy, twin)
    assert not R.same_finding(toy, {**twin, "finding": [["nodule", "right upper lung"]]})
    assert not R.same_finding(toy, {**twin, "finding": []})  # a normal image
    assert R.same_finding({"report": "No acute process.", "finding": None}, {"report": "no acute  process.", "finding": []})


# ---------------------------------------------------------------- index


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 16)).astype(np.float32)
    reports = [f"report {i}" for i in range(60)]
    index = R.ReportIndex.build(emb, reports, kind, nlist=4, nprobe=4)
    queries = emb[:10] + 0.01 * rng.normal(size=(10, 16)).astype(np.float32)
    s, ids = index.search(queries, 5)
    assert ids[:, 0].tolist() == list(range(10))  # each query finds its own vector first
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert np.allclose(s[:, 0], (q * unit[:10]).sum(1), atol=1e-5)  # scores are cosines
    index.save(tmp_path / kind)
    back = R.ReportIndex.load(tmp_path / kind)
    s2, ids2 = back.search(queries, 5, batch_size=3)  # batched search gives the same answer
    assert back.reports == reports and back.kind == kind
    assert (ids2 == ids).all() and np.allclose(s2, s, atol=1e-6)
    with pytest.raises(ValueError, match="reports"):
        R.ReportIndex(back.index, reports[:-1], kind)


# ---------------------------------------------------------------- loss


def test_clip_loss_is_symmetric_infonce_with_temperature_007():
    towers = R.build_towers("tiny")
    scale = towers.model.scale_param().detach()
    assert 1 / math.exp(scale.item()) == pytest.approx(0.07, rel=1e-4)  # CLIPConfig stores log(1/0.07) as 2.6592
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    logits = math.exp(scale.item()) * img @ txt.T
    expect = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert float(R.clip_loss(img, txt, scale)) == pytest.approx(6 * float(expect), rel=1e-6)  # the sum over rows


TWO_RANKS = r"""
import json, sys, torch, torch.distributed as dist, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
import retrieve as R
rank, world, _ = R.setup_distributed()
torch.manual_seed(0)
x, y = torch.randn(8, 5), torch.randn(8, 7)
wi, wt = torch.nn.Linear(5, 4), torch.nn.Linear(7, 4)
scale = torch.nn.Parameter(torch.full((1,), 2.0))
params = [wi.weight, wt.weight, scale]
mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
loss = R.clip_loss(F.normalize(wi(x[mine]), dim=-1), F.normalize(wt(y[mine]), dim=-1), scale)
loss.backward()
grads = [p.grad.clone() for p in params]
for g in grads:  # what FSDP2 does (average over ranks), then the train loop (times ranks / rows of the step)
    dist.all_reduce(g)
    g *= (1 / world) * world / 8
total = loss.detach().clone()
dist.all_reduce(total)
if rank == 0:
    json.dump({"loss": float(total) / 8, "grads": [g.flatten().tolist() for g in grads]}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_two_ranks_gathered_loss_equals_one_rank_full_batch(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(tmp_path / "r2.json"), str(ROOT)], check=True, env=env, capture_output=True,
                   timeout=120)
    two = json.loads((tmp_path / "r2.json").read_text())
    torch.manual_seed(0)  # the same tensors, one process, the whole batch
    x, y = torch.randn(8, 5), torch.randn(8, 7)
    wi, wt = torch.nn.Linear(5, 4), torch.nn.Linear(7, 4)
    scale = torch.nn.Parameter(torch.full((1,), 2.0))
    loss = R.clip_loss(F.normalize(wi(x), dim=-1), F.normalize(wt(y), dim=-1), scale) / 8  # the mean InfoNCE
    loss.backward()
    assert two["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip([wi.weight, wt.weight, scale], two["grads"]):  # towers and the logit scale
        assert np.allclose(p.grad.flatten().tolist(), g, atol=1e-6), (p.grad, g)


# ---------------------------------------------------------------- toy run end to end


def test_toy_run_router_recall_index(tmp_path):
    train = json.loads((ROOT / "data" / "toy" / "train.json").read_text())  # 48 records per domain keep the run short
    sub = [{**r, "image": str(ROOT / "data" / "toy" / r["image"])} for d in ("radiology", "pathology", "ophthalmology")
           for r in [q for q in train if q["domain"] == d][:48]]
    (tmp_path / "train.json").write_text(json.dumps(sub))
    out = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "retrieve.py"), "--data", str(tmp_path / "train.json"),
                           "--test-data", str(ROOT / "data" / "toy" / "test.json"), "--out", str(out), "--epochs", "20",
                           "--batch-size", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gamma sweep" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["domains"] == ["radiology", "pathology", "ophthalmology"]
    assert min(res["router_accuracy"].values()) >= 0.9
    before = np.mean([v for d in res["domains"] for v in res["recall_before"][d].values()])
    after = np.mean([v for d in res["domains"] for v in res["recall_after"][d].values()])
    assert after > before + 10, (res["recall_before"], res["recall_after"])
    cfg = json.loads((out / "rag_config.json").read_text())
    assert max(r["f1"] for r in res["gamma_sweep"]) > 0.3  # relevant candidates are seen (text-equal reports: none)
    assert cfg["gamma"] in [r["gamma"] for r in res["gamma_sweep"]]
    assert cfg["gammas"] == [r["gamma"] for r in res["gamma_sweep"]]  # the grid mmed_rag.py re-scores by accuracy
    rag = R.DomainRAG.load(out)  # router + towers + indexes from disk
    test = R.read_pairs(ROOT / "data" / "toy" / "test.json")[::15]
    got = rag.retrieve([p["image"] for p in test], k_max=4, rule="fixed")
    assert [g["domain"] for g in got] == [p["domain"] for p in test]
    assert all(g["k"] == 4 and len(g["reports"]) == 4 for g in got)
    assert all(r in rag.indexes[g["domain"]].reports for g in got for r in g["reports"])
    kb = sub[0]
    idx = rag.indexes[kb["domain"]]
    assert idx.sources[0] == kb["image"] and idx.reports[0] == kb["report"]  # the index knows each report's image
    assert rag.kb_images() == {p["image"] for p in R.split_validation(sub, 0.15)[0]}  # validation images are not in it
    excl = rag.retrieve([kb["image"]], k_max=5, rule="fixed", exclude=[kb["image"]])[0]
    assert len(excl["candidates"]) == 5
    kept = rag.retrieve([kb["image"]], k_max=len(idx.reports), rule="fixed", exclude=[kb["image"]])[0]["candidates"]
    assert len(kept) == len(idx.reports) - 1  # exactly its own entry is gone (same-text reports of others stay)
    idx.sources[1] = kb["image"]  # an image with two reports in the knowledge base: both go, k_max still come
    two = rag.retrieve([kb["image"]], k_max=5, rule="fixed", exclude=[kb["image"]])[0]
    assert len(two["candidates"]) == 5 and kb["image"] not in two["sources"]


# ---------------------------------------------------------------- the fault suite (tests/faults.py) on the copied loop

import faults  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """12 toy pairs per domain, absolute image paths: 3 contrastive steps per epoch at batch 4."""
    train = json.loads((ROOT / "data" / "toy" / "train.json").read_text())
    sub = [dict(r, image=str(ROOT / "data" / "toy" / r["image"])) for d in ("radiology", "pathology", "ophthalmology")
           for r in [x for x in train if x["domain"] == d][:12]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(sub))
    return path


def fast(small, epochs):
    return ["--data", str(small), "--val-fraction", "0", "--batch-size", "4", "--probe-steps", "5", "--epochs", str(epochs)]


def test_kill_and_resume_gives_the_same_weights(small, tmp_path):
    faults.check_kill_and_resume("retrieve.py", fast(small, 2) + ["--save-every", "1"], "retriever_radiology", tmp_path)


def test_nonfinite_step_stops_or_is_skipped(small, monkeypatch, tmp_path):
    faults.check_nonfinite(R, fast(small, 1), "retriever_radiology", tmp_path, monkeypatch, call=2)


# "stalled" (SIGSTOP, caught by --dist-timeout-s in the copied setup_distributed) runs once, in test_reliability.py
@pytest.mark.parametrize("fault", ["killed"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(small, tmp_path, fault):
    faults.check_dead_rank("retrieve.py", fast(small, 500), "retriever_radiology", tmp_path, fault)


def test_bad_data_and_bad_encoder_exit_2_with_one_line(small, tmp_path):
    """faults.check_bad_inputs' two checks, with --encoder for --model (retrieve.py loads no VLM)."""
    recs = json.loads(small.read_text())
    recs[3]["image"] = str(tmp_path / "missing.png")
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    code, err = faults._cli("retrieve.py", fast(small, 1) + ["--data", str(tmp_path / "bad.json"), "--out",
                                                            str(tmp_path / "d")])
    assert code == 2 and "bad data:" in err and "Traceback" not in err, err[-2000:]
    assert str(tmp_path / "missing.png") in err and str(tmp_path / "bad.json") in err
    (tmp_path / "empty").mkdir()
    code, err = faults._cli("retrieve.py", fast(small, 1) + ["--encoder", str(tmp_path / "empty"), "--out",
                                                            str(tmp_path / "m")])
    assert code == 2 and "bad model:" in err and str(tmp_path / "empty") in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "bad model:" in line]) == 1, err


@pytest.mark.parametrize("image_kind", ["clip_vision", "resnet"])
def test_an_image_and_a_text_encoder_pair_embeds_and_reloads(tmp_path, image_kind):
    """--encoder IMAGE_DIR+TEXT_DIR with two transformers encoders (a CLIP vision tower, whose projection_dim is not
    its pooled width, or a ResNet; a BERT): both towers embed into one space, and the saved retriever reloads."""
    from transformers import (AutoTokenizer, BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, ResNetConfig,
                              ResNetModel)
    import llava_med as lm
    tok = AutoTokenizer.from_pretrained(lm.TINY_TOKENIZER)
    if image_kind == "clip_vision":
        image = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=16, projection_dim=48))
    else:
        image = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1], layer_type="basic"))
    text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2))
    image.save_pretrained(tmp_path / "img")
    text.save_pretrained(tmp_path / "txt")
    tok.save_pretrained(tmp_path / "txt")
    towers = R.build_towers(f"{tmp_path / 'img'}+{tmp_path / 'txt'}", embed_dim=16)
    ids = towers.tokens(["a nodule in the left lung", "clear lungs"], 16)
    img, txt, scale = towers.model(torch.rand(2, 3, 32, 32), ids["input_ids"], ids["attention_mask"])
    assert img.shape == txt.shape == (2, 16) and torch.allclose(img.norm(dim=-1), torch.ones(2))
    towers.save(tmp_path / "saved")
    again = R.load_towers(tmp_path / "saved").model
    assert torch.allclose(again(torch.ones(1, 3, 32, 32))[0], towers.model.eval()(torch.ones(1, 3, 32, 32))[0], atol=1e-6)


def test_a_gpu_index_goes_to_this_rank_s_gpu(monkeypatch):
    """With faiss-gpu each rank's index lives on its own GPU (torch's current device, LOCAL_RANK under torchrun), all
    indexes of a device share one StandardGpuResources (each reserves scratch memory); HNSW and use_gpu=False stay on
    CPU. A stand-in faiss module records the calls (no GPU here)."""
    from types import SimpleNamespace
    calls = []
    fake = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 8,
                           index_cpu_to_gpu=lambda res, device, index: calls.append((res, device)) or "gpu")
    monkeypatch.setattr(R.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(R.torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(R, "_GPU_RESOURCES", {})
    assert R._on_gpu(fake, "cpu", "flat", True) == R._on_gpu(fake, "cpu", "ivf", True) == "gpu"
    assert [d for _, d in calls] == [3, 3] and calls[0][0] is calls[1][0]
    assert R._on_gpu(fake, "cpu", "hnsw", True) == R._on_gpu(fake, "cpu", "flat", False) == "cpu" and len(calls) == 2
