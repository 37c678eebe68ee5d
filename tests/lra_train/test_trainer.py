"""The generic training loop: exact resume, interrupts, NaN guard, files, precision."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from nystromer.lra.model import build_model, classification_objective, collate
from nystromer.train import NonFiniteLossError, ResumableBatchSampler, TrainConfig, train
from nystromer.train import checkpoint as ckpt
from nystromer.train.loop import split_batch

from .synthetic import TokenDataset, recording_objective, tiny_model_config

TRAIN = TokenDataset(40, seed=0)  # 5 batches of 8 per epoch: 12 steps cross two epochs
VAL = TokenDataset(16, seed=1)
TEST = TokenDataset(16, seed=2)


def config(**kw):
    base = dict(
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        eval_every=4,
        seed=3,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def run(run_dir, losses, *, resume=False, model_seed=0, objective=None, **kw):
    torch.manual_seed(model_seed)
    model = build_model(tiny_model_config())  # dropout 0.1: resume must restore the RNG
    return train(
        model,
        objective or recording_objective(losses),
        TRAIN,
        config(**kw),
        run_dir,
        val_data=VAL,
        test_data=TEST,
        collate_fn=collate,
        resume=resume,
        run_config={"note": "test"},
    ), model


def metric_lines(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    for r in lines:
        r.pop("elapsed_s", None)
        r.pop("train_s_per_step", None)  # timings differ between runs
    return lines


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run."""
    d = tmp_path_factory.mktemp("straight")
    losses = []
    result, model = run(d, losses)
    return d, losses, result, model


def assert_same_run(straight, run_dir, losses, model):
    ref_dir, ref_losses, _, ref_model = straight
    # Same process, same CPU kernels, same RNG streams: identical to the last bit.
    assert losses == ref_losses
    for (k, a), (_, b) in zip(
        ref_model.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert metric_lines(run_dir) == metric_lines(ref_dir)


def test_uninterrupted_run_writes_files_and_learns(straight):
    d, losses, result, _ = straight
    assert result.status == "completed" and result.step == 12 and len(losses) == 12
    summary = json.loads((d / "summary.json").read_text())
    for key in ("test_accuracy", "best_val_accuracy", "steps", "wall_time_s", "config"):
        assert key in summary
    assert summary["steps"] == 12 and summary["config"] == {"note": "test"}
    assert summary["test_checkpoint"] == "best"
    assert summary["test_accuracy"] == result.test["accuracy"]
    lines = metric_lines(d)
    assert [r["step"] for r in lines] == [4, 8, 12]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(lines[0])
    assert max(r["val_accuracy"] for r in lines) == summary["best_val_accuracy"]
    # Each line says how long its training steps took (validation not included).
    raw = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["train_s_per_step"] < r["elapsed_s"] for r in raw)
    assert ckpt.read_meta(d / "last")["step"] == 12
    assert ckpt.read_meta(d / "best")["step"] == summary["best_step"]
    assert not list(d.glob(".new-*")) and not list(d.glob(".old-*"))
    # The marker task is easy: 12 steps at lr 3e-3 leave chance (1/3) far behind.
    assert summary["best_val_accuracy"] > 0.6
    assert sum(losses[-3:]) < sum(losses[:3])


def test_resume_after_stop_at_equals_uninterrupted(straight, tmp_path):
    losses = []
    first, _ = run(tmp_path, losses, stop_at=6)  # 6 is not a checkpoint step (every 4)
    assert first.status == "stopped" and first.step == 6
    assert ckpt.read_meta(tmp_path / "last")["step"] == 6
    assert not (tmp_path / "summary.json").exists()
    # A different initial model proves the weights come from the checkpoint.
    second, model = run(tmp_path, losses, resume=True, model_seed=99)
    assert second.status == "completed"
    assert_same_run(straight, tmp_path, losses, model)
    summary = json.loads((tmp_path / "summary.json").read_text())
    ref = json.loads((straight[0] / "summary.json").read_text())
    assert summary["test_accuracy"] == ref["test_accuracy"]
    assert summary["best_step"] == ref["best_step"]


def _interrupt_then_resume(straight, tmp_path, saved_step: int, **interrupt) -> None:
    """Interrupt a run as ``interrupt`` says (recording_objective's options); `last` must hold
    ``saved_step`` and the resumed run must equal the uninterrupted one."""
    losses = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, losses, objective=recording_objective(losses, **interrupt))
    assert ckpt.read_meta(tmp_path / "last")["step"] == saved_step
    assert len(losses) == saved_step
    _, model = run(tmp_path, losses, resume=True, model_seed=99)
    assert_same_run(straight, tmp_path, losses, model)


def test_keyboard_interrupt_mid_step_saves_last_and_resumes_exactly(straight, tmp_path):
    # Step 7 never finished: `last` holds step 6 with the random state from before step 7.
    _interrupt_then_resume(straight, tmp_path, 6, fail_at=7)


def test_keyboard_interrupt_in_validation_saves_the_finished_step_exactly(straight, tmp_path):
    # Step 8 finished (its validation did not): `last` holds it with the random state after
    # it, not the one from before its dropout draws.
    _interrupt_then_resume(straight, tmp_path, 8, fail_eval_at=8)


def test_sigint_finishes_the_step_then_saves(straight, tmp_path):
    _interrupt_then_resume(straight, tmp_path, 5, signal_at=5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    losses = []
    with pytest.raises(NonFiniteLossError, match=r"step 7.*last good checkpoint.*step 4"):
        run(tmp_path, losses, objective=recording_objective(losses, nan_at=7))
    assert ckpt.read_meta(tmp_path / "last")["step"] == 4
    state = torch.load(tmp_path / "last" / ckpt.STATE, weights_only=True)
    assert state["step"] == 4
    assert not (tmp_path / "summary.json").exists()
    assert metric_lines(tmp_path)[-1]["event"] == "non-finite loss"
    # The weights are finite and the run resumes (the NaN was a one-off here).
    _, model = run(tmp_path, [], resume=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_gradient_under_a_finite_loss_never_reaches_a_checkpoint(tmp_path):
    # Step 8 validates and checkpoints: with NaN weights its validation accuracy could even
    # look best, and `last` would hold weights that no resume recovers from.
    losses = []
    with pytest.raises(NonFiniteLossError, match=r"gradient.*step 8.*last good checkpoint.*4"):
        run(tmp_path, losses, objective=recording_objective(losses, nan_grad_at=8))
    assert math.isfinite(losses[-1])
    assert ckpt.read_meta(tmp_path / "last")["step"] == 4
    assert ckpt.read_meta(tmp_path / "best")["step"] <= 4
    model = build_model(tiny_model_config())
    ckpt.load_weights(model, tmp_path / "last" / ckpt.WEIGHTS)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_advice_is_what_a_resume_allows(tmp_path):
    # It said "lower the learning rate ... then resume from it": a resume with another rate
    # is refused, so that remedy needs a new run directory.
    with pytest.raises(NonFiniteLossError, match="or lower the learning rate.*another output"):
        run(tmp_path, [], objective=recording_objective([], nan_at=6))
    with pytest.raises(ValueError, match="different training schedule"):
        run(tmp_path, [], resume=True, lr=1e-3)


def test_nan_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written"):
        run(tmp_path, [], objective=recording_objective([], nan_at=1))


def test_refuses_to_overwrite_or_resume_wrongly(straight, tmp_path):
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run(straight[0], [])
    with pytest.raises(ValueError, match="nothing to resume"):
        run(tmp_path, [], resume=True)
    run(tmp_path, [], stop_at=2)
    with pytest.raises(ValueError, match=r"different training schedule \(steps: 12 → 20"):
        run(tmp_path, [], resume=True, steps=20)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    torch.manual_seed(0)
    ref = build_model(tiny_model_config(dropout=0.0))
    batch = collate([TRAIN[i] for i in range(8)])
    with torch.no_grad():
        exact, _ = classification_objective(ref.eval(), batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = ref(batch["input_ids"])
            low, _ = classification_objective(ref, batch)
    assert logits.dtype == torch.bfloat16  # autocast is really engaged
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 4e-3); a few layers stay within 5e-2.
    assert low.item() == pytest.approx(exact.item(), rel=5e-2)
    losses = []
    result, model = run(tmp_path, losses, precision="bf16", steps=20, warmup_steps=4)
    assert all(math.isfinite(x) for x in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32
    assert result.best_val["accuracy"] > 0.6


def test_micro_batches_give_the_same_update(tmp_path):
    # float64 and no dropout: splitting each batch of 8 into parts of 3, 3 and 2 and
    # accumulating their size-weighted gradients must give the parameters and metrics of
    # whole batches, to rounding.
    def fit(run_dir, parts):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(dropout=0.0))
        cfg = config(steps=6, eval_every=3, precision="fp64", micro_batches=parts)
        train(
            model, classification_objective, TRAIN, cfg, run_dir,
            val_data=VAL, collate_fn=collate,
        )  # fmt: skip
        return model, metric_lines(run_dir)

    whole, whole_metrics = fit(tmp_path / "whole", 1)
    split, split_metrics = fit(tmp_path / "split", 3)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    assert len(whole_metrics) == len(split_metrics) == 2
    for a, b in zip(whole_metrics, split_metrics, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert v == pytest.approx(b[k], rel=1e-10), k


def test_split_batch_cuts_every_tensor_alike():
    batch = {"input_ids": torch.arange(14).view(7, 2), "labels": torch.arange(7)}
    parts = split_batch(batch, 3)
    assert [size for _, size in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p, _ in parts]), batch["input_ids"])
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    pair = (torch.zeros(2, 3), [torch.ones(2)])
    assert [size for _, size in split_batch(pair, 5)] == [1, 1]  # never an empty part
    assert isinstance(split_batch(pair, 2)[0][0][1], list)
    assert split_batch(batch, 1) == [(batch, 7)]
    with pytest.raises(ValueError, match="share a first .sample. dimension, got sizes \\[2, 7\\]"):
        split_batch({"a": torch.zeros(7), "b": torch.zeros(2)}, 2)
    with pytest.raises(TypeError, match="holding str into micro-batches"):
        split_batch({"a": torch.zeros(2), "name": "x"}, 2)


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16"):
        run(tmp_path, [], precision="fp16")


def test_train_config_validation_names_the_field():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, batch_size=2, warmup_steps=10)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(steps=10, batch_size=2, precision="half")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(steps=10, batch_size=0)
    for parts in (0, 3):
        with pytest.raises(ValueError, match=r"micro_batches must be an integer in \[1, batch"):
            TrainConfig(steps=10, batch_size=2, micro_batches=parts)


def test_sampler_order_is_seeded_resumable_and_shards_global_batches():
    full = ResumableBatchSampler(23, 4, seed=5)
    it = iter(full)
    seq = [next(it) for _ in range(12)]  # 5 batches per epoch (3 samples dropped)
    assert sorted(sum(seq[:5], [])) == sorted(full.order(0)[:20].tolist())
    assert seq[:5] != seq[5:10]  # a new order each epoch
    later = iter(ResumableBatchSampler(23, 4, seed=5, start_step=7))
    assert [next(later) for _ in range(5)] == seq[7:12]
    for step in range(12):
        parts = []
        for rank in range(2):
            s = iter(ResumableBatchSampler(23, 4, seed=5, start_step=step, rank=rank, world_size=2))
            parts += next(s)
        assert parts == seq[step]
    assert full.position(7) == {"epoch": 1, "batch": 2}
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatchSampler(3, 4)
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatchSampler(23, 3, world_size=2)


def test_checkpoint_swap_survives_a_crash_between_renames(tmp_path):
    model = torch.nn.Linear(2, 2)

    def writers(tag):
        return {
            ckpt.WEIGHTS: lambda p: ckpt.write_weights(model, p),
            ckpt.META: lambda p: ckpt.write_json(p, {"step": tag}, atomic=False),
        }

    ckpt.write_checkpoint(tmp_path, "last", writers(1))
    # Simulate the crash window: the old copy renamed away, the new one not yet in place.
    os.replace(tmp_path / "last", tmp_path / ".old-last-x")
    assert ckpt.read_meta(ckpt.find(tmp_path, "last"))["step"] == 1
    ckpt.write_checkpoint(tmp_path, "last", writers(2))
    assert ckpt.find(tmp_path, "last") == tmp_path / "last"
    assert ckpt.read_meta(tmp_path / "last")["step"] == 2


def test_a_checkpoint_write_removes_what_a_hard_kill_left(tmp_path):
    # SIGKILL runs no finally: a staging folder half written, a previous copy renamed away.
    model = torch.nn.Linear(2, 2)
    writers = {
        ckpt.WEIGHTS: lambda p: ckpt.write_weights(model, p),
        ckpt.META: lambda p: ckpt.write_json(p, {"step": 3}, atomic=False),
    }
    ckpt.write_checkpoint(tmp_path, "last", writers)
    staged = [".new-last-k1ll_ed0", ".new-best-k1ll_ed0"]
    stale = [*staged, ".old-last-k1ll_ed1", ".new-last-k1ll_ed2/.model.safetensors.abcd1234.tmp"]
    # Not ours: another name pattern, or a file where our folders would be.
    others = [".new-last-notes", ".new-last-my-notes", "new-last-k1ll_ed0"]
    for name in stale + others:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "half").write_bytes(b"\0" * 10)
    (tmp_path / ".new-last-k1ll_ed3").write_text("a file of the user's")
    ckpt.write_checkpoint(tmp_path, "last", writers)
    left = sorted(p.name for p in tmp_path.iterdir())
    # best's staging stays until best is written (its writer alone may remove it).
    assert left == sorted(["last", ".new-best-k1ll_ed0", ".new-last-k1ll_ed3", *others])
    assert ckpt.read_meta(ckpt.find(tmp_path, "last"))["step"] == 3
    ckpt.write_checkpoint(tmp_path, "best", writers)
    assert not (tmp_path / ".new-best-k1ll_ed0").exists() and (tmp_path / "best").is_dir()


def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    run(tmp_path, [], steps=4, warmup_steps=1, eval_every=2)
    before = (tmp_path / "summary.json").read_bytes()
    losses = []
    again, _ = run(tmp_path, losses, resume=True, steps=4, warmup_steps=1, eval_every=2)
    # Nothing to train: the summary (its timings included) is the run's, not rewritten with
    # this session's zero steps.
    assert losses == []
    assert (tmp_path / "summary.json").read_bytes() == before
    saved = json.loads(before)
    assert again.status == "completed" and again.step == 4
    assert again.summary == saved and saved["steps_per_s"] > 0
    assert again.test["accuracy"] == saved["test_accuracy"]
    assert again.best_step == saved["best_step"]
    assert again.best_val["accuracy"] == saved["best_val_accuracy"]
    assert again.wall_time_s == saved["wall_time_s"]


def test_a_new_run_never_overwrites_an_earlier_runs_results(straight, tmp_path):
    import shutil

    # A run killed before its first `last` (e.g. checkpoint_every=0) leaves best/ and
    # metrics.jsonl: a new run in that folder must not erase them.
    shutil.copytree(straight[0], tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "last")
    (tmp_path / "old" / "summary.json").unlink()
    metrics = (tmp_path / "old" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"metrics\.jsonl.*another output directory"):
        run(tmp_path / "old", [], steps=4, warmup_steps=1)
    assert (tmp_path / "old" / "metrics.jsonl").read_bytes() == metrics
    (tmp_path / "old" / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"best"):
        run(tmp_path / "old", [], steps=4, warmup_steps=1)


def test_resume_adopts_a_best_checkpoint_written_after_last(tmp_path):
    import shutil

    # A run killed after writing `best` at step 8 but before `last` there (checkpoint_every
    # larger than eval_every, or a crash between the two writes). Resumed from step 4, the
    # replay may not beat the score restored from step 4 (here a learning rate too small to
    # change a prediction; elsewhere another device or other micro-batches), so best/ keeps
    # the step-8 weights: the summary must describe those weights, not the lost step-4 ones.
    run(tmp_path, [], lr=1e-12, stop_at=4)
    shutil.copytree(tmp_path / "last", tmp_path / "best", dirs_exist_ok=True)
    (tmp_path / "best" / ckpt.STATE).unlink()
    meta = {"checkpoint": "best", "step": 8, "val": {"accuracy": 1.0, "loss": 0.01}}
    (tmp_path / "best" / ckpt.META).write_text(json.dumps(meta))
    result, _ = run(tmp_path, [], lr=1e-12, resume=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert ckpt.read_meta(tmp_path / "best")["step"] == 8
    assert summary["best_step"] == result.best_step == 8
    assert summary["best_val_accuracy"] == 1.0


def test_resuming_a_finished_run_leaves_the_model_at_its_best_weights(tmp_path):
    # A finished run leaves the model holding `best` (what the test metrics measured); so
    # must a resume of it (distillation resumes one killed before it saved its model, and
    # then saves the model it is handed).
    kw = dict(steps=6, warmup_steps=1, eval_every=2, select_metric="loss", select_mode="max")
    first, finished = run(tmp_path, [], **kw)
    assert first.best_step < 6  # the highest loss is an early one: best/ is not last/
    again, resumed = run(tmp_path, [], resume=True, model_seed=99, **kw)
    assert again.best_step == first.best_step and again.test == first.test
    for (k, a), (_, b) in zip(
        finished.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def test_an_interrupt_while_writing_best_leaves_best_to_the_resumed_run(tmp_path, monkeypatch):
    # Ctrl-C (a KeyboardInterrupt outside the signal handler) while `best` is being written:
    # `last` keeps the step with its validation pending. The score must not count as best
    # before best/ holds its weights, or the resumed validation, not beating it, never
    # writes them: best/ would keep older weights (or none) under the new step's name.
    kw = dict(steps=6, warmup_steps=1, eval_every=2, select_metric="loss", select_mode="max")
    ref, _ = run(tmp_path / "straight", [], **kw)
    assert ref.best_step == 2
    write = ckpt.write_checkpoint

    def interrupted(run_dir, name, writers):
        if name == "best":
            monkeypatch.setattr(ckpt, "write_checkpoint", write)
            raise KeyboardInterrupt
        return write(run_dir, name, writers)

    monkeypatch.setattr(ckpt, "write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", [], **kw)
    assert ckpt.find(tmp_path / "cut", "best") is None
    again, _ = run(tmp_path / "cut", [], resume=True, **kw)
    assert ckpt.read_meta(tmp_path / "cut" / "best")["step"] == 2
    assert again.best_step == 2 and again.test == ref.test
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["test_checkpoint"] == "best"


@pytest.mark.parametrize("damaged", [ckpt.STATE, ckpt.WEIGHTS])
def test_a_damaged_checkpoint_file_is_named(tmp_path, damaged):
    # Writes are atomic, but a copy or a disk can still cut a file: the error must say which
    # (a cut trainer_state.pt said only "[Errno 22] Invalid argument").
    run(tmp_path, [], steps=4, warmup_steps=1, stop_at=2)
    path = tmp_path / "last" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{path}.* damaged"):
        run(tmp_path, [], resume=True, steps=4, warmup_steps=1)


_SIGNALLED_RUN = """
import sys, time
import torch
from nystromer.lra.model import build_model, classification_objective, collate
from nystromer.train import TrainConfig, train
from tests.lra_train.synthetic import TokenDataset, tiny_model_config

class Slow(TokenDataset):  # loading is the bottleneck: the loop waits on the workers
    def __getitem__(self, i):
        time.sleep(0.02)
        return super().__getitem__(i)

torch.set_num_threads(1)
cfg = TrainConfig(steps=100000, batch_size=8, device="cpu", progress=False, num_workers=2,
                  checkpoint_every=1)
try:
    train(build_model(tiny_model_config()), classification_objective, Slow(40), cfg,
          sys.argv[1], collate_fn=collate)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_with_loader_workers_saves_last(tmp_path, signum):
    # A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the DataLoader's workers too,
    # which exited on it: the loop waiting for a batch failed with "DataLoader worker exited
    # unexpectedly" instead of saving `last` and stopping.
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "run.py"
    script.write_text(_SIGNALLED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while ckpt.find(tmp_path / "run", "last") is None and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # a few steps into the run, the loader's workers busy
        os.killpg(proc.pid, getattr(signal, signum))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-2000:]
    assert f"{signum}: stopping after this step" in out
    assert ckpt.read_meta(tmp_path / "run" / "last")["step"] >= 1
