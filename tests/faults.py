"""The fault suite, written once and run over every recipe (each method's test file calls these with its own fast
arguments): kill and resume (bit-identical weights), non-finite loss stop / skip, a dead or stalled rank, bad data
and a bad model folder (exit 2, one line naming the file). Every recipe trains through its copy of dpo.py's
`train` loop and checkpoints to <out>/<phase>/checkpoints, so one set of checks covers all of them."""

import contextlib
import importlib
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1")
_SERVER = []  # the forkserver context, once started


def start(script: str, args: list[str], env: dict | None = None, stderr: Path | None = None):
    """Start `python <script> <args>` (cwd ROOT, environment `env`, stdout dropped, stderr to a file) as a process of
    its own, to be killed or stopped: forked from a server process that imported torch, transformers and llava_med
    once, so each start skips the ~8 s of imports a fresh python spends (the fault suite starts ~25 of them on 2
    cores); everything else is the fresh run's. Returns the multiprocessing Process (.pid, .is_alive(), .exitcode)."""
    if not _SERVER:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "transformers", "llava_med"])
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved]))  # the server imports llava_med
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
        _SERVER.append(ctx)
    p = _SERVER[0].Process(target=_run_script, args=(script, args, dict(env or ENV), str(stderr or os.devnull)))
    p.start()
    return p


def _run_script(script, args, env, stderr):
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    with open(os.devnull, "w") as null, open(stderr, "w") as err:
        os.dup2(null.fileno(), 1)
        os.dup2(err.fileno(), 2)
    sys.argv = [script] + args
    module = importlib.import_module(Path(script).stem)
    module.cli(module.main)


def run(cmd, ok=True, timeout=600):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=ENV)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def latest(phase_dir):
    """The newest complete checkpoint under <phase_dir>/checkpoints (the recipes' own latest_checkpoint logic is
    tested in test_reliability.py; here only complete ones exist)."""
    done = sorted(p for p in (phase_dir / "checkpoints").glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def weights(phase_dir):
    return load_file(str(latest(phase_dir) / "trainable.safetensors"))


def phase_rows(out, phase):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("phase") == phase]


def check_kill_and_resume(script: str, args: list[str], phase: str, tmp_path, kill_at: int = 2):
    """SIGKILL the run once <phase> has written checkpoint `kill_at` (args must checkpoint every step or so), resume
    it: the weights and the last loss equal an uninterrupted run's exactly."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    module = importlib.import_module(Path(script).stem)
    _in_process(module, args + ["--out", str(full)])  # the uninterrupted run and the resume run in this process
    p = start(script, args + ["--out", str(killed)])
    deadline = time.time() + 400
    while not (killed / phase / "checkpoints" / f"step_{kill_at:07d}" / "state.json").exists():
        assert p.is_alive() and time.time() < deadline, f"{script} ended before {phase} checkpoint {kill_at}"
        time.sleep(0.05)
    p.kill()
    p.join()
    _in_process(module, args + ["--out", str(killed)])  # resumes from the newest complete checkpoint
    a, b = weights(full / phase), weights(killed / phase)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{script}: resumed weights differ"
    assert phase_rows(full, phase)[-1]["loss"] == phase_rows(killed, phase)[-1]["loss"]


def check_nonfinite(module, args: list[str], phase: str, tmp_path, monkeypatch, call: int = 2):
    """The `call`-th micro-batch of <phase> returns a NaN loss: the run stops with FloatingPointError naming the
    step (no checkpoint written from it); with --on-nonfinite skip that update is dropped and counted."""
    real = module.train

    def train_with_nan(targs, name, model, n_items, step_fn, *rest, **kw):
        calls = []

        def nan_step(idx, epoch):
            stats = step_fn(idx, epoch)
            calls.append(1)
            return {**stats, "loss": stats["loss"] * float("nan")} if name == phase and len(calls) == call else stats

        return real(targs, name, model, n_items, nan_step, *rest, **kw)

    monkeypatch.setattr(module, "train", train_with_nan)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
        _in_process(module, args + ["--out", str(tmp_path / "stop")])
    assert latest(tmp_path / "stop" / phase) is None
    _in_process(module, args + ["--on-nonfinite", "skip", "--out", str(tmp_path / "skip")])
    rows = phase_rows(tmp_path / "skip", phase)
    assert sum(1 for r in rows if r.get("skipped_nonfinite")) == 1 and len(rows) >= 2
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "skip" / phase).values())


def _in_process(module, argv, cli=False):
    """module.main(argv) (or module.cli(module.main) on sys.argv) in this process (one-rank group), restoring the
    environment it sets."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    try:
        return module.cli(module.main) if cli else module.main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def check_dead_rank(script: str, args: list[str], phase: str, tmp_path, fault: str):
    """One of 2 ranks is SIGKILLed (the survivor's next collective fails at once) or SIGSTOPped (it fails after
    --dist-timeout-s 10) while <phase> trains: the survivor exits 1 with one line instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(start(script, args + ["--dist-timeout-s", "10", "--out", str(tmp_path)], env,
                           tmp_path.parent / f"{tmp_path.name}_rank{rank}.err"))
    survivor, victim = procs
    deadline = time.time() + 400
    metrics = tmp_path / "metrics.jsonl"
    while not metrics.exists() or f'"phase": "{phase}"' not in metrics.read_text():
        assert time.time() < deadline and survivor.is_alive(), f"{script}: {phase} did not start"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    t0 = time.time()
    try:
        survivor.join(timeout=120)
    finally:
        victim.kill()
        victim.join()
    err = (tmp_path.parent / f"{tmp_path.name}_rank0.err").read_text()
    assert survivor.exitcode == 1, err[-2000:]
    assert "another rank died or stalled" in err and "Traceback" not in err
    assert time.time() - t0 < 90


def check_bad_inputs(script: str, args: list[str], bad_data: list[str], tmp_path):
    """A data file with a bad record (args `bad_data`, e.g. ["--data", missing_image.jsonl]) and a model folder
    without config.json: each exits 2 with one line on stderr that names the file, and no traceback. Run through
    the script's own cli() in this process (what a user sees, without a python start per case)."""
    code, err = _cli(script, args + bad_data + ["--out", str(tmp_path / "data")])
    assert code == 2 and "bad data:" in err and "Traceback" not in err, err[-2000:]
    assert any(part in err for part in bad_data if "/" in part)
    (tmp_path / "empty_model").mkdir()
    code, err = _cli(script, args + ["--model", str(tmp_path / "empty_model"), "--out", str(tmp_path / "model")])
    assert code == 2 and "bad model:" in err and "Traceback" not in err, err[-2000:]
    bad = [line for line in err.strip().splitlines() if "bad model:" in line or "Error" in line]
    assert str(tmp_path / "empty_model") in err and len(bad) == 1, err[-2000:]


def _cli(script: str, argv: list[str]):
    """(exit code, stderr) of `python <script> <argv>`, run in this process through the script's cli(main)."""
    module = importlib.import_module(Path(script).stem)
    err, argv0 = io.StringIO(), sys.argv
    sys.argv = [script] + argv
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            _in_process(module, None, cli=True)
    finally:
        sys.argv = argv0
    return exit_.value.code, err.getvalue()
