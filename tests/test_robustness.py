"""Issue 18: nothing lost, nobody confused. Each fault first reproduced, then its fix."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from ebdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _ckpts(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if e.startswith("ebdiff: error:")] or err
    assert len(err) == 1, err
    return err[0]


def _spawn(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "ebdiff.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(cond, timeout=180.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------- 1. non-finite loss / weights
def test_nan_stops_before_writing_and_keeps_the_good_checkpoints(tmp_path, has_fmnist, capsys):
    """The issue's command: the loss turns NaN at iteration 12 (lr 0.3, no clip)."""
    run = tmp_path / "R"
    args = tiny_args(run, "train.iters=16", "train.log_every=1", "train.ckpt_every=2", "train.keep_last=2",
                     "train.lr=0.3", "train.grad_clip=0")
    assert main(["train", *args]) == 2
    line = _one_line(capsys)
    assert "iteration 12" in line and "not finite" in line and "ckpt-000000010" in line
    assert _ckpts(run) == ["ckpt-000000008", "ckpt-000000010"]  # nothing non-finite written, nothing good rotated away
    for c in _ckpts(run):
        for f in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(run / "checkpoints" / c / f)).values())
    assert not (run / "summary.json").exists()
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    # a non-finite checkpoint made by an older ebdiff is refused, not sampled into black images
    from safetensors.torch import save_file

    ema = run / "checkpoints" / "ckpt-000000010" / "ema.safetensors"
    sd = load_file(str(ema))
    sd[next(iter(sd))][0] = float("nan")
    save_file(sd, str(ema))
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "b.png")]) == 2
    assert "non-finite" in _one_line(capsys) and not (tmp_path / "b.png").exists()


def test_nonfinite_skip_setting_drops_steps_and_goes_on(tmp_path, has_fmnist):
    run = tmp_path / "S"
    args = tiny_args(run, "train.iters=16", "train.log_every=1", "train.ckpt_every=4", "train.lr=0.3",
                     "train.grad_clip=0", "train.nonfinite=skip")
    assert main(["train", *args]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["iterations"] == 16 and s["skipped_steps"] > 0
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(x.get("skipped_steps", 0) for x in logs) == s["skipped_steps"]
    assert all(np.isfinite(x["loss"]) for x in logs if "loss" in x)


def test_nonfinite_settings_refused(tmp_path, capsys):
    for bad in ("train.lr=nan", "train.lr=.inf", "train.adam_betas=[0.9,1.2]", "train.weight_decay=-0.1",
                "model.dropout=2", "train.adam_eps=0", "sample.eta=-1", "data.image_size=30"):
        rc = main(["train", *tiny_args(tmp_path / "x", "train.iters=2", bad)])
        assert rc == 2, bad
        assert _one_line(capsys).startswith("ebdiff: error:")
        assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- 2. one writer per run folder
def test_one_writer_per_run_folder_and_stale_locks(tmp_path, has_fmnist, capsys):
    run = tmp_path / "L"
    first = _spawn("train", *tiny_args(run, "train.iters=100000", "train.ckpt_every=2"))
    try:
        assert _wait_for(lambda: bool(_ckpts(run))), first.stderr.read() if first.poll() is not None else "no ckpt"
        assert main(["train", *tiny_args(run, "train.iters=4")]) == 2  # a second `train --out SAME`
        assert "already holds a run" in _one_line(capsys)
        assert main(["train", "--resume", str(run), "train.iters=8"]) == 2
        assert "in use by another ebdiff process (train, pid" in _one_line(capsys)
        assert main(["eval", str(run), "--n", "4"]) == 2
        assert "in use by another ebdiff process" in _one_line(capsys)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock must not stay stuck
        first.wait()
    assert (run / ".ebdiff.lock").is_file()
    its = int(_ckpts(run)[-1][5:])
    assert main(["train", "--resume", str(run), f"train.iters={its + 2}"]) == 0


def test_two_starts_into_one_folder(tmp_path, has_fmnist):
    """Two `ebdiff train --out SAME` seconds apart: exactly one trains, the other stops with one line."""
    run = tmp_path / "T"
    procs = [_spawn("train", *tiny_args(run, "train.iters=40", "train.ckpt_every=10")) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    rcs = sorted(p.returncode for p in procs)
    assert rcs == [0, 2], outs
    err = next(e for (_, e), p in zip(outs, procs) if p.returncode == 2)
    assert ("in use by another ebdiff process" in err or "already holds a run" in err) and "Traceback" not in err
    assert json.loads((run / "summary.json").read_text())["iterations"] == 40


# ---------------------------------------------------------------------- 3. safe resume
def test_resume_refuses_an_edited_model_and_applies_new_training_settings(tmp_path, has_fmnist, capsys):
    run = tmp_path / "E"
    assert main(["train", *tiny_args(run, "train.iters=4", "train.ckpt_every=2")]) == 0
    before = _ckpts(run)
    cfg = run / "config.yaml"
    text = cfg.read_text()
    cfg.write_text(text.replace("preset: tiny", "preset: fmnist"))
    assert main(["train", "--resume", str(run), "train.iters=8"]) == 2
    line = _one_line(capsys)
    assert "model.preset: 'tiny' -> 'fmnist'" in line and "cannot change" in line
    assert _ckpts(run) == before  # the good checkpoints are untouched
    assert main(["train", "--resume", str(run), "train.iters=6", "model.preset=tiny", "data.limit=128"]) == 2
    assert "data.limit: 256 -> 128" in _one_line(capsys)
    cfg.write_text(text)
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    # settings that may change take effect: the new lr is the optimizer's
    assert main(["train", "--resume", str(run), "train.iters=6", "train.lr=0.001", "train.log_every=1"]) == 0
    assert "resume: train.lr 0.0002 -> 0.001" in capsys.readouterr().out
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["lr"] for x in logs if x["iter"] > 4] == [0.001, 0.001]
    state = torch.load(run / "checkpoints" / "ckpt-000000006" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.001


def test_resume_after_a_crash_logs_each_iteration_once(tmp_path, has_fmnist):
    from ebdiff.app.assemble import train
    from ebdiff.config import load_config

    run = tmp_path / "C"
    cfg = load_config(None, tiny_args(run, "train.iters=10", "train.log_every=1")[2:] + ["train.ckpt_every=4"])

    def crash(tr):
        if tr.state.iteration == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(cfg, run, callbacks=[crash])
    assert [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 8))
    assert main(["train", "--resume", str(run)]) == 0
    assert [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 11))


# ---------------------------------------------------------------------- 4. signals
def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, has_fmnist):
    run = tmp_path / "G"
    p = _spawn("train", *tiny_args(run, "train.iters=100000", "train.ckpt_every=1000", "train.log_every=1"))
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text()) > 300)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err
    its = int(_ckpts(run)[-1][5:])
    assert its > 0
    assert main(["train", "--resume", str(run), f"train.iters={its + 2}"]) == 0


def _branch_pids(run: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ebdiff.app.taeb_worker" in cmd and str(run) in cmd and "torch.distributed.run" not in cmd:
                pids.append(int(d.name))  # a branch process (not the torchrun agent that started it)
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the branch processes")
def test_taeb_stops_every_branch_on_sigterm_and_leaves_no_orphans(tmp_path, has_fmnist):
    run = tmp_path / "TA"
    args = tiny_args(run, "train.iters=100000", "early_bird.check_every=2", "early_bird.queue=2",
                     "early_bird.eta=0.9", "train.ckpt_every=1000", "train.log_every=1",
                     "regions=[{t: [0, 499], ratio: 0.3}, {t: [480, 999], ratio: 0.6}]")
    p = _spawn("ta-eb", "--config", "configs/demo_taeb.yaml", *args)
    logs = [run / f"region-{k}" / "metrics.jsonl" for k in range(2)]
    assert _wait_for(lambda: all(f.is_file() for f in logs), 300), p.stderr.read() if p.poll() is not None else ""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 128 + signal.SIGTERM and "every branch saved a checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _wait_for(lambda: not _branch_pids(run), 30)
    assert all(_ckpts(run / f"region-{k}") for k in range(2))  # each branch saved where it stopped
    # the launcher killed outright (no handler can run): its branches must not survive it
    q = _spawn("ta-eb", "--resume", str(run))
    assert _wait_for(lambda: len(_branch_pids(run)) == 2, 300)
    q.send_signal(signal.SIGKILL)
    q.wait()
    assert _wait_for(lambda: not _branch_pids(run), 90), _branch_pids(run)


# ---------------------------------------------------------------------- one clear line for every bad input
def test_bad_inputs_end_in_one_line(tmp_path, has_fmnist, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    cases = [
        ["train", "--out", str(f), "model.preset=tiny"],  # --out is a file
        ["train", "--config", str(tmp_path / "bin.yaml")],  # binary config
        ["train", "--config", str(tmp_path / "empty.yaml")],  # empty config
        ["sample", str(tmp_path / "nowhere")],
    ]
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.yaml").write_text("\n")
    for args in cases:
        assert main(args) == 2, args
        assert _one_line(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root writes anyway
        assert main(["train", *tiny_args(ro / "run", "train.iters=2")]) == 2
        assert "Permission denied" in _one_line(capsys)
    run = tmp_path / "r"
    assert main(["train", *tiny_args(run, "train.iters=2")]) == 0
    for bad in (["--batch-size", "0"], ["--n", "0"], ["--steps", "0"], ["--eta", "-1"]):
        assert main(["sample", str(run), *bad]) == 2, bad
        assert _one_line(capsys)


def test_corrupt_fashion_mnist_and_images(tmp_path, capsys):
    src = Path("/usr/share/datasets/fashion-mnist")
    root = tmp_path / "fm"
    root.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        data = (src / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2] if "images" in name else data)
    assert main(["train", *tiny_args(tmp_path / "x", "train.iters=2", f"data.root={root}")]) == 2
    line = _one_line(capsys)
    assert "corrupt or truncated" in line and "train-images" in line and not (tmp_path / "x").exists()
    # an image folder with one corrupt JPEG: one line naming it, or skipped and counted
    from PIL import Image

    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    for i in range(20):
        Image.fromarray(np.full((40, 40, 3), i * 10, np.uint8)).save(imgs / "a" / f"{i:02d}.jpg")
    (imgs / "a" / "07.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    from ebdiff.data.datasets import FileImageDataset, load_image_folder
    from ebdiff.errors import DataError

    files = sorted((imgs / "a").glob("*.jpg"))
    with pytest.raises(DataError, match="07.jpg"):
        FileImageDataset(files, 32, "center")[7]
    x = FileImageDataset(files, 32, "center", bad_images="skip")[7]
    assert x.shape == (3, 32, 32)
    with pytest.raises(DataError, match="07.jpg"):
        load_image_folder(imgs, 32, cache_dir=str(tmp_path / "c"), progress=False)
    images, _ = load_image_folder(imgs, 32, cache_dir=str(tmp_path / "c"), progress=False, bad_images="skip")
    assert len(images) == 19
    assert "left out 1 unreadable image(s) of 20" in capsys.readouterr().err


def test_checkpoint_faults(tmp_path, has_fmnist, capsys, monkeypatch):
    run = tmp_path / "K"
    assert main(["train", *tiny_args(run, "train.iters=4", "train.ckpt_every=2")]) == 0
    # a wrong-shape checkpoint names the tensor
    meta = run / "checkpoints" / "ckpt-000000004" / "meta.json"
    m = json.loads(meta.read_text())
    json.dump(dict(m, preset="fmnist"), meta.open("w"))
    assert main(["sample", str(run), "--n", "2", "--steps", "2"]) == 2
    assert "tensor '" in _one_line(capsys)
    json.dump(m, meta.open("w"))
    # the disk fills during a checkpoint: one line, the older checkpoint kept, no temp folder left
    import safetensors.torch as st

    real = st.save_file

    def full(tensors, path, *a, **k):
        real(tensors, path, *a, **k)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    assert main(["train", "--resume", str(run), "train.iters=8"]) == 2
    line = _one_line(capsys)
    assert "No space left on device" in line and "ckpt-000000004 is kept" in line
    assert _ckpts(run) == ["ckpt-000000002", "ckpt-000000004"]
    assert not list((run / "checkpoints").glob(".ckpt-*"))
    monkeypatch.setattr(st, "save_file", real)
    # a temp folder left by a killed write is removed by the next checkpoint
    (run / "checkpoints" / ".ckpt-000000006.abc").mkdir()
    assert main(["train", "--resume", str(run), "train.iters=6"]) == 0
    assert not list((run / "checkpoints").glob(".ckpt-*"))
    # eval of a run without a checkpoint fails at once (before training any classifier)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    t0 = time.time()
    assert main(["eval", str(empty), "--n", "4"]) == 2
    assert "holds no checkpoint" in _one_line(capsys) and time.time() - t0 < 10


def test_taeb_missing_dataset_is_one_line_before_launching(tmp_path, capsys):
    run = tmp_path / "ta"
    assert main(["ta-eb", "--config", "configs/demo_taeb.yaml", "--out", str(run),
                 *tiny_args(run, f"data.root={tmp_path / 'nowhere'}", "data.download=false")[2:]]) == 2
    line = _one_line(capsys)
    assert "Fashion-MNIST not found" in line and not run.exists()


# ---------------------------------------------------------------------- multi-node, simulated
def test_two_node_agents_on_one_machine_train_one_run(tmp_path, has_fmnist):
    """`torchrun --nnodes 2` as two node agents (c10d rendezvous on 127.0.0.1, gloo): one run folder,
    written by global rank 0 only, DDP over both nodes; benchmarks/multinode_cpu.sh also runs ta-eb."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "mn"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "ebdiff-test",
           "-m", "ebdiff.cli", "train", *tiny_args(run, "train.iters=4", "train.ckpt_every=2")]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    s = json.loads((run / "summary.json").read_text())
    assert s["processes"] == 2 and s["iterations"] == 4
    assert sum("== ebdiff train summary ==" in o for o, _ in outs) == 1  # printed by rank 0 only
    assert _ckpts(run) == ["ckpt-000000002", "ckpt-000000004"]
    logged = [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5 * i for i in range(1, 5) if 5 * i <= 4] + [4]  # log_every 5: the last iteration only


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    """tempfile makes its files 0600 and folders 0700; what ebdiff renames into place (summaries, configs,
    checkpoints, exports) must get what open()/mkdir() give under the umask, so a group can read a run."""
    import os
    import stat

    import torch.nn as nn

    from ebdiff.runs import checkpoint as ck
    old = os.umask(0o022)
    try:
        ck.atomic_write_json(tmp_path / "summary.json", {"a": 1})
        ck.atomic_save(tmp_path / "x.npz", lambda p: open(p, "wb").write(b"x"))
        folder = ck.write_model_folder(tmp_path / "checkpoints" / "ckpt-000000001", 1, {"preset": "tiny"},
                                       {"model.safetensors": nn.Linear(2, 2)})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "summary.json") == 0o644 and mode(tmp_path / "x.npz") == 0o644
    assert mode(folder) == 0o755 and mode(folder / "meta.json") == 0o644
