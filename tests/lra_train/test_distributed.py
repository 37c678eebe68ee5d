"""Two CPU processes (gloo, DistributedDataParallel) train like one with the same global batch."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nystromer.lra.model import build_model, classification_objective, collate
from nystromer.train import TrainConfig, train
from nystromer.train.distributed import shutdown

from .synthetic import TokenDataset, tiny_model_config

TRAIN = TokenDataset(40, seed=0)
VAL = TokenDataset(13, seed=1)  # odd size: the two shards differ in length


def _config(micro_batches=1):
    # float64 so that the only difference, the order of the gradient sums, is ~1e-16.
    return TrainConfig(
        steps=4, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=2, seed=1,
        device="cpu", precision="fp64", progress=False, micro_batches=micro_batches,
    )  # fmt: skip


def _model():
    torch.manual_seed(0)
    # No dropout: the processes' random streams differ from the single process's.
    return build_model(tiny_model_config(dropout=0.0, attention_dropout=0.0))


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    finished = False
    try:
        model = _model()
        # Each process also splits its 4 samples in two and accumulates (DDP's no_sync for
        # the first part): still the single process's update.
        train(model, classification_objective, TRAIN, _config(micro_batches=2), run_dir,
              val_data=VAL, collate_fn=collate)  # fmt: skip
        if rank == 0:
            torch.save(model.state_dict(), f"{run_dir}/params.pt")
        finished = True
    finally:
        # As a user's script leaves the group: waiting for every process and freeing the
        # DistributedDataParallel wrapper first (destroy_process_group alone can abort a
        # process that still uses its gloo connections).
        shutdown(synchronize=finished)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    model = _model()
    train(model, classification_objective, TRAIN, _config(), single_dir,
          val_data=VAL, collate_fn=collate)  # fmt: skip
    mp.spawn(_worker, args=(2, _free_port(), str(multi_dir)), nprocs=2, join=True)

    multi = torch.load(multi_dir / "params.pt", weights_only=True)
    # Each process averages its half of the batch and DDP averages the halves: the same
    # mean gradient as one process, up to float64 rounding of the sums (~1e-16 relative).
    # Adam divides by sqrt(v) + eps (eps = 1e-6), which can amplify a gradient difference
    # by at most lr/eps per step; after 4 steps 1e-9 still leaves ample margin.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(multi[k], v, rtol=0, atol=1e-9, msg=k)
    assert not torch.equal(multi["head.2.bias"], _model().state_dict()["head.2.bias"])

    # Validation is sharded across the processes and summed: the same metrics.
    ref, got = _metrics(single_dir), _metrics(multi_dir)
    assert [r["step"] for r in got] == [2, 4]
    for a, b in zip(ref, got, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12), key
    # Rank 0 alone wrote: exactly one copy of each file, no stray staging directories.
    names = sorted(p.name for p in multi_dir.iterdir())
    assert names == ["best", "last", "metrics.jsonl", "params.pt", "summary.json"]
    assert json.loads((multi_dir / "summary.json").read_text())["world_size"] == 2


def test_torchrun_cli_matches_a_single_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    entry = Path(__file__).with_name("torchrun_entry.py")
    flags = [
        "train", "listops", "--data", str(tmp_path), "--steps", "4", "--batch-size", "8",
        "--eval-every", "2", "--lr", "3e-3", "--embed-dim", "16", "--ffn-dim", "32",
        "--classifier-dim", "16", "--num-landmarks", "8", "--conv-kernel-size", "5",
        "--max-length", "128", "--num-classes", "3", "--dropout", "0",
        "--attention-dropout", "0", "--precision", "fp64", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    # src/ first: the processes must import this checkout's nystromer, not an installed one.
    path = os.pathsep.join([str(root / "src"), str(root)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip
    multi = subprocess.run(
        [*torchrun, str(entry), *flags, "--out", str(tmp_path / "multi")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(entry), *flags, "--out", str(tmp_path / "single")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "summary.json").read_text())
    b = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    # float64 and no dropout: as in the spawn test above, only summation order differs.
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-9)
    assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=1e-9)
