"""Fault suite for the shared blocks (llava_med.py, dpo.py): bad inputs (fixtures in tests/fixtures/), non-finite
steps, a rank that dies or stalls, SIGKILL in the middle of writing a checkpoint, determinism."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import dpo
import faults
import llava_med as lm
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures"
FAST = ["--sft-warmup-steps", "5", "--batch-size", "8", "--micro-batch-size", "4", "--no-eval"]


@pytest.fixture(scope="module")
def tiny():
    return lm.load("tiny")


BAD = [  # fixture -> what the error must say (after naming the file and the record's line)
    ("missing_image.jsonl", "image not found"),
    ("zero_byte_image.jsonl", "zero_byte.png: cannot open image"),
    ("truncated_image.jsonl", "truncated.jpg: cannot open image"),
    ("not_an_image.jsonl", "not_an_image.png: cannot open image"),
    ("bomb_image.jsonl", "bomb.png: image too large"),
    ("escaping_path.jsonl", "leaves the image folder"),
    ("absolute_path.jsonl", "leaves the image folder"),
    ("missing_keys.jsonl", "missing or empty 'conversations'"),
    ("image_count_mismatch.jsonl", "2 '<image>' markers but 1 images"),
    ("empty_answer.jsonl", "empty answer"),
    ("too_long.jsonl", "no supervised token after truncation to 512"),
    ("truncated.jsonl", "malformed json line"),
    ("not_utf8.jsonl", "not valid UTF-8"),
]


@pytest.mark.parametrize("name,message", BAD)
def test_bad_input_is_named_or_counted(tiny, name, message):
    model, tok = tiny
    with pytest.raises(lm.DataError) as err:
        dpo.PairData(lm.read_records(FIX / name), FIX, tok, model.config, 512, skip_bad=False)
    assert f"{name}:2" in str(err.value) and message in str(err.value), str(err.value)
    skipped = {}
    data = dpo.PairData(lm.read_records(FIX / name, skipped), FIX, tok, model.config, 512, skip_bad=True,
                        skipped=skipped)
    assert len(data) == 1 and sum(data.skipped.values()) == 1  # the good first record stays


@pytest.mark.parametrize("name", ["dpo", "mmed_rag", "mmedpo", "stllava_med"])
def test_every_copy_of_pair_data_reads_a_noise_pair(tiny, name):
    """MMed-RAG's released cross-modality pairs (rejected_noised) through each file's copy of PairData: the copy runs
    in its own module (stllava_med.py lacked numpy and PIL, so its copy raised NameError on the noise image) and
    gives dpo.py's pixels, a fixed noise draw unlike the image."""
    import importlib

    model, tok = tiny
    rec = dict(json.loads((FIX / "missing_image.jsonl").read_text().splitlines()[0]), rejected_noised=True)
    data = [importlib.import_module(m).PairData([("x:1", rec)], FIX, tok, model.config, 512, False) for m in (name, "dpo")]
    image, noise = data[0].items[0]["images"][0], data[0].items[0]["rejected_images"][0]
    assert noise == "noise:" + image
    assert torch.equal(data[0].pixel(noise), data[1].pixel(noise)) and not torch.equal(data[0].pixel(noise), data[0].pixel(image))


def test_good_fixtures_and_whole_file_errors(tiny):
    model, tok = tiny
    data = dpo.PairData(lm.read_records(FIX / "good.jsonl"), FIX, tok, model.config, 512, skip_bad=False)
    assert len(data) == 2  # png_named.jpg: a PNG with a .jpg name opens (the content decides)
    with pytest.raises(lm.DataError, match=r"truncated.json:1: malformed json"):  # a .json list cannot be half-read
        lm.read_records(FIX / "truncated.json", {})
    outside = dpo.PairData(lm.read_records(FIX / "absolute_path.jsonl"), FIX, tok, model.config, 512, skip_bad=True)
    assert len(outside) == 1


def _run(cmd, ok=True, timeout=300):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_script_reports_bad_data_and_skips_with_a_summary(tmp_path):
    code, err = faults._cli("dpo.py", ["--data", str(FIX / "missing_image.jsonl"), "--out", str(tmp_path / "a")] + FAST)
    assert code == 2 and "missing_image.jsonl:2: image not found" in err
    assert "Traceback" not in err
    lines = []
    for name, _ in BAD:
        lines += (FIX / name).read_bytes().splitlines()[1:]  # each file's bad record(s)
    good = (FIX / "good.jsonl").read_bytes().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join(good * 4 + lines) + b"\n")
    faults._in_process(dpo, ["--data", str(mixed), "--image-folder", str(FIX), "--skip-bad-samples",
                             "--max-steps", "1", "--out", str(tmp_path / "b")] + FAST)
    summary = json.loads((tmp_path / "b" / "results.json").read_text())["summary"]
    assert sum(summary["skipped_records_train"].values()) == len(lines) == len(BAD)


def test_nonfinite_step_stops_or_is_skipped(monkeypatch, tmp_path):
    faults.check_nonfinite(dpo, ["--max-steps", "3"] + FAST, "dpo", tmp_path, monkeypatch, call=3)  # 3rd micro = step 2
    rows = [r for r in map(json.loads, open(tmp_path / "skip" / "metrics.jsonl")) if r.get("phase") == "dpo"]
    assert [r.get("skipped_nonfinite") for r in rows] == [None, 1, None]


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_dead_or_stalled_rank_makes_the_other_exit(tmp_path, fault):
    faults.check_dead_rank("dpo.py", ["--max-steps", "500"] + FAST, "dpo", tmp_path, fault)


def test_bad_data_and_bad_model_exit_2_with_one_line(tmp_path):
    faults.check_bad_inputs("dpo.py", FAST, ["--data", str(FIX / "missing_image.jsonl")], tmp_path)


def test_sigkill_while_writing_a_checkpoint(tmp_path):
    """Kill the run while a checkpoint is half written (its temporary folder exists): the previous checkpoint is
    intact and verified, and resuming ends with the same weights as an uninterrupted run."""
    cmd = [sys.executable, "dpo.py", "--max-steps", "12", "--save-every", "1"] + FAST
    faults._in_process(dpo, cmd[2:] + ["--out", str(tmp_path / "full")])  # uninterrupted and resumed: this process
    for attempt in range(5):
        out = tmp_path / f"killed{attempt}"
        p = faults.start("dpo.py", cmd[2:] + ["--out", str(out)])
        ck, hit = out / "dpo" / "checkpoints", None
        while p.is_alive():
            tmp = [d for d in ck.glob(".tmp_step_*")] if ck.exists() else []
            if tmp and int(tmp[0].name[-7:]) >= 2:
                p.kill()
                p.join()
                hit = tmp[0]
                break
        if hit is not None and hit.exists():  # really killed mid-save (not just after the rename)
            break
    else:
        pytest.fail("never caught the run inside save_checkpoint")
    newest = dpo.latest_checkpoint(out / "dpo")
    assert newest is not None and int(newest.name[-7:]) < int(hit.name[-7:])  # the half-written one is not used
    faults._in_process(dpo, cmd[2:] + ["--out", str(out)])
    a = load_file(str(dpo.latest_checkpoint(tmp_path / "full" / "dpo") / "trainable.safetensors"))
    b = load_file(str(dpo.latest_checkpoint(out / "dpo") / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "dpo" / "checkpoints").glob(".tmp_step_*"))  # the stale temporary folder was replaced


def test_same_seed_same_loss_curve(tmp_path):
    """Two runs with the same seed and data (LoRA dropout on) give the identical loss curve and weights on CPU."""
    cmd = [sys.executable, "dpo.py", "--max-steps", "3", "--lora-dropout", "0.1"] + FAST
    faults._in_process(dpo, cmd[2:] + ["--out", str(tmp_path / "a")])  # one run in this process, one in a fresh one
    _run(cmd + ["--out", str(tmp_path / "b")])
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if r.get("phase") == "dpo"]
              for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    wa, wb = (load_file(str(dpo.latest_checkpoint(tmp_path / d / "dpo") / "trainable.safetensors")) for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_is_continued_only_by_the_run_that_made_it(tmp_path, capsys):
    """In the same --out: the same command resumes the finished phase (nothing trains, no "before" evaluation); a
    micro-batch change (below --on-nonfinite) still resumes; another --grad-clip (above it) moves DPO's checkpoints
    aside and trains afresh from step 0, with the "before" evaluation, on a new warm start (its key has the clip)."""
    out = tmp_path / "run"
    args = ["--max-steps", "2", "--eval-limit", "2"] + FAST[:-1] + ["--out", str(out)]
    marker = lambda: [p.name for p in (out / "base_llava_hf").glob("warm_start_*")]  # noqa: E731
    first, warm = faults._in_process(dpo, args), marker()
    assert "before" in first and len(faults.phase_rows(out, "dpo")) == 2
    again = faults._in_process(dpo, args + ["--micro-batch-size", "2"])
    assert "before" not in again and len(faults.phase_rows(out, "dpo")) == 2
    assert "dpo: resumed from" in capsys.readouterr().out
    other = faults._in_process(dpo, args + ["--grad-clip", "0.5"])
    assert "before" in other and [r["step"] for r in faults.phase_rows(out, "dpo")] == [1, 2, 1, 2]
    assert len(faults.phase_rows(out, "sft_warmup")) == 10 and marker() != warm  # the warm start was retrained
    aside = list((out / "dpo").glob("checkpoints.*"))
    assert len(aside) == 1 and json.loads((dpo.latest_checkpoint(out / "dpo") / "state.json").read_text())["key"] != \
        aside[0].name.split(".")[1]


def test_the_warm_start_is_keyed_on_the_model_s_content(tmp_path):
    """A warm start from a checkpoint folder is reused while the folder holds the same files, also under another
    name, and retrained when other weights are written there (it keyed on the folder's name before)."""
    lm.save_llava_hf(*lm.load("tiny", seed=1), tmp_path / "ckpt")
    out = tmp_path / "run"
    args = ["--sft-warmup-steps", "2", "--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "4", "--no-eval",
            "--out", str(out)]
    marker = lambda: sorted(p.name for p in (out / "base_llava_hf").glob("warm_start_*"))  # noqa: E731
    faults._in_process(dpo, args + ["--model", str(tmp_path / "ckpt")])
    first = marker()
    shutil.copytree(tmp_path / "ckpt", tmp_path / "moved")  # copytree keeps the file times (copy2)
    faults._in_process(dpo, args + ["--model", str(tmp_path / "moved")])
    assert marker() == first and len(faults.phase_rows(out, "sft_warmup")) == 2  # reused
    lm.save_llava_hf(*lm.load("tiny", seed=2), tmp_path / "moved")  # other weights under the same name
    faults._in_process(dpo, args + ["--model", str(tmp_path / "moved")])
    assert marker() != first and len(faults.phase_rows(out, "sft_warmup")) == 4  # trained again


def test_a_path_counts_by_its_content(tmp_path):
    """lm.fingerprint: a moved copy (file times kept) is the same, an edited file is not; the run's own --out inside a
    data folder and checkpoint folders do not count; names that are no path stand for themselves."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text("[]")
    (data / "images" / "a.png").write_bytes(b"png")
    key = lm.fingerprint(str(data), str(data / "run"))
    for what in ("run/metrics.jsonl", "checkpoints/step_1/state.json"):  # written by the run itself
        (data / what).parent.mkdir(parents=True, exist_ok=True)
        (data / what).write_text("{}")
    assert lm.fingerprint(str(data), str(data / "run")) == key
    shutil.copytree(data, tmp_path / "moved")
    assert lm.fingerprint(str(tmp_path / "moved"), str(tmp_path / "moved" / "run")) == key
    assert lm.fingerprint(str(data / "train.json")) == lm.fingerprint(str(tmp_path / "moved" / "train.json"))
    (tmp_path / "moved" / "images" / "a.png").write_bytes(b"png2")
    assert lm.fingerprint(str(tmp_path / "moved"), str(tmp_path / "moved" / "run")) != key
    assert lm.fingerprint(f"{data / 'train.json'},{data}") not in (lm.fingerprint(str(data)), f"{data / 'train.json'},{data}")
    assert [lm.fingerprint(v) for v in ("tiny", "", "auto", 3, str(tmp_path / "absent"))] == \
        ["tiny", "", "auto", 3, str(tmp_path / "absent")]


RANK_KEYS = """
import dataclasses, json, os, sys
from pathlib import Path
import torch.distributed as dist
import dpo
dpo.setup_distributed(60)
data = Path(sys.argv[1]) / f"node{dist.get_rank()}"  # each node's own copy of the data, with its own file times
data.mkdir()
(data / "train.json").write_text("[]")
os.utime(data / "train.json", ns=(10**9 * (1 + dist.get_rank()),) * 2)
keys = [None, None]
dist.all_gather_object(keys, dpo.cache_key(dataclasses.replace(dpo.Args(), data=str(data)), "on_nonfinite"))
print(json.dumps(keys))
dist.destroy_process_group()
"""


def test_every_rank_gets_rank_0s_key(tmp_path):
    """A key differs per rank when each node's copy of the data has its own file times; cache_key hands every rank
    rank 0's, so all take the same resume / rebuild branch (different ones would deadlock at the next barrier)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_KEYS, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(faults.ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT)))
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    keys = json.loads(outs[0][0].strip().splitlines()[-1])
    assert keys[0] == keys[1]
    assert lm.fingerprint(str(tmp_path / "node0")) != lm.fingerprint(str(tmp_path / "node1"))  # without the broadcast


@pytest.mark.parametrize("recipe", ["dpo", "mmedpo", "mmed_rag", "stllava_med", "huatuo_vision", "medrega", "retrieve"])
def test_every_recipe_keys_its_checkpoints_on_its_own_args(recipe, tmp_path, monkeypatch):
    """Each file's copy of the loop with that file's Args: a rerun resumes, also with another --dist-timeout-s (how
    the steps run); another --seed or --weight-decay (above --on-nonfinite in every Args) moves the checkpoints aside,
    unless --resume-any; --no-resume moves them aside too; a moved data folder resumes, an edited one does not."""
    import dataclasses
    import importlib

    from torch.distributed.fsdp import fully_shard

    module = importlib.import_module(recipe)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    module.setup_distributed()
    try:
        def run(args):
            torch.manual_seed(0)
            model, x = fully_shard(torch.nn.Linear(4, 1)), torch.randn(8, 4)
            step = lambda idx, epoch: {"loss": model(x[idx]).pow(2).sum(), "n": torch.tensor(float(len(idx)))}  # noqa: E731
            return module.train(args, "phase", model, 8, step, tmp_path, 0, 1, lambda row: None, {"": 1e-2}, 4, 4,
                                max_steps=2)

        args = module.Args()
        run(args)
        for same in (args, dataclasses.replace(args, dist_timeout_s=99)):
            run(same)
            assert not list(tmp_path.glob("checkpoints.*"))  # resumed
        for n, other in enumerate((dataclasses.replace(args, seed=1), dataclasses.replace(args, seed=1, weight_decay=0.5))):
            run(other)
            assert len(list(tmp_path.glob("checkpoints.*"))) == n + 1, f"{recipe}: {other} resumed another run"
        run(dataclasses.replace(args, seed=2, resume_any=True))  # the user vouches: continued, not moved aside
        assert len(list(tmp_path.glob("checkpoints.*"))) == 2
        run(dataclasses.replace(args, seed=2, resume=False))  # --no-resume: kept aside, trained afresh
        assert len(list(tmp_path.glob("checkpoints.*"))) == 3
        # paths count by their content (lm.fingerprint): a moved data folder resumes, a file edited in place does not
        field = next(f for f in ("data", "sft_data", "source") if hasattr(args, f))
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "train.json").write_text("[]")
        run(dataclasses.replace(args, **{field: str(tmp_path / "data")}))
        assert len(list(tmp_path.glob("checkpoints.*"))) == 4
        shutil.copytree(tmp_path / "data", tmp_path / "moved")  # copy2 keeps the file times, as cp -a / rsync -a do
        run(dataclasses.replace(args, **{field: str(tmp_path / "moved")}))
        assert len(list(tmp_path.glob("checkpoints.*"))) == 4, f"{recipe}: a moved data folder did not resume"
        (tmp_path / "moved" / "train.json").write_text('[{"id": 1}]')
        run(dataclasses.replace(args, **{field: str(tmp_path / "moved")}))
        assert len(list(tmp_path.glob("checkpoints.*"))) == 5, f"{recipe}: an edited data file resumed"
    finally:
        dist.destroy_process_group()
