"""The training loop: any model, any objective, any map-style dataset.

:func:`train` runs AdamW with the one-cycle schedule, periodic validation, ``last``/``best``
checkpoints, exact resume, graceful Ctrl-C, a NaN guard and DistributedDataParallel when it
runs under ``torchrun``. What is trained is given by three things only: the model, an
*objective* and the datasets, so the LRA classifiers and a later distillation share it.

An objective is ``objective(model, batch) -> (loss, sums)``: ``loss`` is the scalar to
minimise (the mean over the batch on this process), ``sums`` maps names to per-batch sums
over samples, with ``"count"`` the number of samples, e.g. ``{"count": 32, "loss": 70.1,
"accuracy": 9}``. Reported metrics are sums / count over all batches and processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_sum, gather_objects, resolve_device
from .metrics import MetricsLog, Stats, stats_tensor
from .sampler import ResumableBatchSampler
from .schedule import OneCycle

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Objective",
    "NonFiniteLossError",
    "Trainer",
    "train",
    "evaluate",
    "autocast",
    "PRECISIONS",
]

Objective = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, Any]]]
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")

# Settings that change the sequence of losses; a resumed run must keep them.
_RESUME_INVARIANT = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "adam_eps")
_RESUME_INVARIANT += ("grad_clip", "seed", "precision")


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient became NaN or infinite; the run stopped without overwriting
    ``last``."""


@dataclass
class TrainConfig:
    """How to train (what to train is the model, objective and data given to :func:`train`).

    Attributes:
        steps: optimiser steps in the whole run (the schedule's length).
        batch_size: global batch size (summed over processes).
        lr: peak learning rate of the one-cycle schedule.
        warmup_steps: steps of linear warm-up from ``lr/25`` to ``lr``; the rate then decays
            linearly to ``lr/25e4`` at the last step, and Adam's β₁ cycles 0.95 → 0.85 → 0.95
            (:class:`~nystromer.train.schedule.OneCycle`, the authors' ``OneCycleLR``).
        weight_decay, adam_eps: AdamW's decoupled weight decay and ε.
        grad_clip: clip the gradient's global norm to this value (None: no clipping).
        eval_every: validate every this many steps (0: only at the end).
        eval_batches: validate on the first this many batches of the split (None: all).
        eval_batch_size: batch size for evaluation (default ``batch_size``).
        checkpoint_every: write ``last`` every this many steps (None: every ``eval_every``;
            0: only at the end, on Ctrl-C and at ``stop_at``).
        seed: seeds the data order and, per process, python/numpy/torch's generators.
        precision: ``fp32``; ``bf16`` or ``fp16`` autocast (fp16 with gradient scaling, CUDA
            only); ``fp64`` converts the model to float64 (for reference checks).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: DataLoader worker processes.
        select_metric, select_mode: the validation metric that picks ``best`` and whether
            larger (``max``) or smaller (``min``) is better.
        stop_at: leave the loop after this step, saving ``last``, to resume later (the
            schedule still spans ``steps``).
        progress: show a progress bar (rank 0 only).
        micro_batches: split each batch (each process's share of it) into this many parts
            and accumulate their gradients, weighted by the parts' sample counts, before the
            step: the same update (up to rounding and the order dropout draws its masks) when
            the objective's loss is a mean over samples (or over tokens, with as many real
            tokens in every sample), with a fraction of the activation memory.
            On the CPU it is also faster when activations are large (docs/lra.md measures it
            on Pathfinder's batches of 256 × 1,024 tokens).
    """

    steps: int
    batch_size: int
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-6
    grad_clip: float | None = None
    eval_every: int = 0
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    num_workers: int = 0
    select_metric: str = "accuracy"
    select_mode: str = "max"
    stop_at: int | None = None
    progress: bool = True
    micro_batches: int = 1

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.steps) and self.steps >= 1, "steps", "an integer ≥ 1")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer ≥ 1")
        # A non-finite rate or decay would turn the first update into NaN or inf weights.
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(
            is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.steps,
            "warmup_steps",
            f"an integer in [0, steps={self.steps})",
        )
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "≥ 0")
        need(math.isfinite(self.adam_eps) and self.adam_eps > 0, "adam_eps", "> 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "> 0 or None")
        need(is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an integer ≥ 0")
        for name in ("eval_batches", "eval_batch_size"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 1), name, "an integer ≥ 1 or None")
        need(
            self.checkpoint_every is None
            or (is_int(self.checkpoint_every) and self.checkpoint_every >= 0),
            "checkpoint_every",
            "an integer ≥ 0 or None",
        )
        # numpy's SeedSequence (each process's generators) takes no negative seed, and torch's
        # generators no seed of 64 bits or more (the data order adds the rank and the step).
        need(is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(is_int(self.num_workers) and self.num_workers >= 0, "num_workers", "≥ 0")
        need(self.select_mode in ("max", "min"), "select_mode", "'max' or 'min'")
        need(self.stop_at is None or (is_int(self.stop_at) and self.stop_at >= 0), "stop_at", "≥ 0")
        need(
            is_int(self.micro_batches) and 1 <= self.micro_batches <= self.batch_size,
            "micro_batches",
            f"an integer in [1, batch_size={self.batch_size}]",
        )

    @property
    def checkpoint_interval(self) -> int:
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        status: ``completed`` (all steps, test evaluated) or ``stopped`` (at ``stop_at``).
        step: optimiser steps done.
        best_step, best_val: the step and validation metrics of the ``best`` checkpoint.
        test: test metrics of the ``best`` checkpoint (or of the final model without
            validation data); empty without test data or when stopped.
        wall_time_s: training time over all sessions of the run (evaluation included).
        summary: the contents of ``summary.json`` (completed runs).
    """

    status: str
    step: int
    best_step: int | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (a no-op for fp32/fp64)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _StopRequest:
    """SIGINT/SIGTERM → finish the current step, save ``last``, stop; a second signal aborts.

    Handlers can only be installed from the main thread; elsewhere a Ctrl-C arrives as a
    plain KeyboardInterrupt, which :func:`train` also handles.
    """

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.requested = False
        self.aborted = False
        self._first = 0.0
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested:
            # torchrun forwards the terminal's Ctrl-C to workers that already got it: a
            # repeat within a second is the same request, not a second press.
            if now - self._first < 1.0:
                return
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True
        self._first = now
        self._announce(
            f"{signal.Signals(signum).name}: stopping after this step and saving `last` "
            "(press Ctrl-C again to abort without saving)"
        )

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _seed_process(seed: int, rank: int) -> None:
    # Distinct streams per process (dropout differs across ranks) derived from one seed.
    s = np.random.SeedSequence([seed, rank]).generate_state(3)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[2]))


def _worker_ignores_sigint(worker_id: int) -> None:
    # A terminal's Ctrl-C goes to the whole process group; a DataLoader worker would exit on
    # it and the loop, finishing its step before it stops, would find its loader dead. The
    # main process stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _eval_indices(n: int, cfg: TrainConfig, info: DistInfo) -> tuple[list[int], int]:
    batch = cfg.eval_batch_size or cfg.batch_size
    if cfg.eval_batches is not None:
        n = min(n, cfg.eval_batches * batch)
    local_batch = max(1, math.ceil(batch / info.world_size))
    return list(range(info.rank, n, info.world_size)), local_batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: Objective,
    dataset: Dataset,
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` over ``dataset`` (or its first ``config.eval_batches`` batches).

    Under a process group each process evaluates every W-th sample and the sums are
    all-reduced, so the result is the same for any number of processes.

    Returns:
        ``{name: sum / count}`` for every sum the objective reports.
    """
    info = DistInfo.current()
    device = device or resolve_device(config.device, info)
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    indices, local_batch = _eval_indices(len(dataset), config, info)  # type: ignore[arg-type]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=local_batch,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        worker_init_fn=_worker_ignores_sigint,
        generator=torch.Generator().manual_seed(config.seed),
    )
    keys: list[str] | None = None
    total: Tensor | None = None
    try:
        for batch in loader:
            with autocast(device, config.precision):
                _, sums = objective(module, to_device(batch, device))
            if keys is None:
                keys = sorted(sums)
                total = torch.zeros(len(keys), dtype=torch.float64)
            total += stats_tensor(sums, keys)
    finally:
        module.train(was_training)
    # A process with no samples still joins the all-reduce: agree on the keys first.
    keys = next((k for k in gather_objects(keys, info) if k is not None), None)
    if keys is None:
        return {}
    if total is None:
        total = torch.zeros(len(keys), dtype=torch.float64)
    total = all_reduce_sum(total.to(device), info).cpu()
    return Stats(dict(zip(keys, total.tolist(), strict=True))).means()


def split_batch(batch: Any, parts: int) -> list[tuple[Any, int]]:
    """``batch`` cut along its first dimension into at most ``parts`` pieces of nearly equal
    size (no empty piece), with each piece's size. A batch is a tensor, or a tuple, list or
    mapping of batches (what a collate function returns); every tensor in it must have the
    same first dimension.

    Raises:
        TypeError: the batch holds something other than tensors and those containers.
        ValueError: its tensors differ in their first dimension (or one is a scalar).
    """
    sizes: set[int] = set()

    def count(x: Any) -> None:
        if isinstance(x, Tensor):
            sizes.add(x.shape[0] if x.dim() else -1)
        elif isinstance(x, Mapping):
            for v in x.values():
                count(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                count(v)
        else:
            raise TypeError(
                f"cannot split a batch holding {type(x).__name__} into micro-batches: a batch "
                "must be tensors in tuples, lists or dicts (use micro_batches=1)"
            )

    count(batch)
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "cannot split a batch into micro-batches: its tensors must share a first "
            f"(sample) dimension, got sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    k = max(1, min(parts, n))
    if k == 1:
        return [(batch, n)]

    def piece(x: Any, i: int) -> Any:
        if isinstance(x, Tensor):
            return x.tensor_split(k)[i]
        if isinstance(x, Mapping):
            return {key: piece(v, i) for key, v in x.items()}
        return type(x)(piece(v, i) for v in x)

    bounds = [len(r) for r in torch.arange(n).tensor_split(k)]
    return [(piece(batch, i), bounds[i]) for i in range(k)]


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the lra extra
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def _non_finite(run_dir: Path, step: int, loss: float, metrics_log: MetricsLog | None) -> None:
    where = ckpt.find(run_dir, "last")
    if math.isfinite(loss):  # then the gradient is what became non-finite
        what = f"the gradient became non-finite (loss {loss})"
    else:
        what = f"the loss became {loss}"
    if metrics_log is not None:
        metrics_log.append({"step": step, "event": "non-finite loss", "loss": loss})
    # A resumed run keeps its schedule and precision (they are checked), so these remedies
    # mean a new run.
    remedy = (
        "lower the learning rate, lengthen the warm-up, set grad_clip or train in fp32, and "
        "start again in another output directory (this one keeps the record)."
    )
    if where is not None:
        kept = f"the last good checkpoint is {where} (step {ckpt.read_meta(where)['step']})"
        advice = f"{kept}, untouched. Resume from it if this was a one-off, or {remedy}"
    else:
        advice = f"no checkpoint had been written yet. To go on, {remedy}"
    raise NonFiniteLossError(f"{what} at step {step}; training stopped and {advice}")


def check_no_earlier_run(run_dir: Path, instead: str = "another output directory") -> None:
    """Raise ValueError if ``run_dir`` holds files of an earlier :func:`train` (not resumed:
    the caller knows it has no ``last``), naming them; ``instead`` says where to go. A run
    stopped before its first ``last`` (killed, or checkpoint_every=0) leaves results that a
    new run would erase (metrics.jsonl) or mix with its own (best/)."""
    found = []
    if ckpt.find(run_dir, "best") is not None:
        found.append("best/")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    if (run_dir / "summary.json").is_file():
        found.append("summary.json")
    if found:
        raise ValueError(
            f"{run_dir} holds the results of an earlier run ({', '.join(found)}) and no `last` "
            f"checkpoint to resume from; move them away or choose {instead}"
        )


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


class Trainer:
    """One training run: set-up (or resume), the loop, checkpoints, validation, summary.

    :func:`train` is the usual entry point (``Trainer(...).fit()``) and documents the
    arguments; the class exists so that a different task can reuse or override single pieces
    (e.g. :meth:`validate`).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_data: Dataset,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        val_data: Dataset | None = None,
        test_data: Dataset | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        resume: bool = False,
        run_config: Mapping[str, Any] | None = None,
        weights_metadata: Mapping[str, str] | None = None,
        description: str = "train",
    ) -> None:
        self.config = config
        self.objective = objective
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.collate_fn = collate_fn
        self.run_dir = Path(run_dir)
        # JSON round trip: only plain values go into checkpoints (weights_only loading).
        self.run_config = json.loads(json.dumps(dict(run_config or {})))
        self.weights_metadata = dict(weights_metadata or {})
        self.description = description
        self.info = DistInfo.current()
        self.device = resolve_device(config.device, self.info)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' on CPU")
        if config.batch_size % self.info.world_size:
            raise ValueError(
                f"batch_size={config.batch_size} must be divisible by the number of "
                f"processes ({self.info.world_size})"
            )
        last = ckpt.find(self.run_dir, "last")
        if not resume and last is not None:
            raise ValueError(
                f"{self.run_dir} already holds a checkpoint ({last}); resume it (--resume) "
                "or choose another output directory"
            )
        if resume and last is None:
            raise ValueError(f"nothing to resume: {self.run_dir} has no `last` checkpoint")
        if not resume:
            check_no_earlier_run(self.run_dir)

        self.module = model.to(self.device)
        if config.precision == "fp64":
            self.module = self.module.double()
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(),
            lr=config.lr,
            betas=(0.9, 0.999),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = OneCycle(self.optimizer, config.lr, config.steps, config.warmup_steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None

        self.step = 0
        # This step's validation was interrupted: run it before the next step (on resume).
        self.pending_validation = False
        self.best_step: int | None = None
        self.best_val: dict[str, float] = {}
        self.elapsed_before = 0.0
        self.interval_stats = Stats()  # training sums since the last validation
        # Seconds spent in training steps since the last validation, and how many (this
        # session only: a timing is not part of a run's reproducible state).
        self.step_seconds, self.timed_steps = 0.0, 0
        if last is not None:
            self._restore(last)
        else:
            _seed_process(config.seed, self.info.rank)

        self.net: nn.Module = self.module
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl") if self.info.is_main else None
        if self.metrics_log is not None:
            # A pending validation is written again: drop any line it left.
            self.metrics_log.truncate(self.step - 1 if self.pending_validation else self.step)
        self.sampler = ResumableBatchSampler(
            len(train_data),  # type: ignore[arg-type]
            config.batch_size,
            seed=config.seed,
            start_step=self.step,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self.bar: Any = None
        self._session_start = time.perf_counter()
        self._updating = False

    # -- state ------------------------------------------------------------------------------

    def _restore(self, last: Path) -> None:
        cfg, info = self.config, self.info
        state = ckpt.read_state(last)
        saved = state["config"]
        changed = [
            f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}"
            for k in _RESUME_INVARIANT
            if saved.get(k) != getattr(cfg, k)
        ]
        if changed:
            raise ValueError(
                "cannot resume with a different training schedule (" + "; ".join(changed) + ")"
            )
        n = len(self.train_data)  # type: ignore[arg-type]
        if state["data"]["num_samples"] != n:
            raise ValueError(
                f"the training set changed since the checkpoint: it had "
                f"{state['data']['num_samples']} samples, now {n}"
            )
        ckpt.load_weights(self.module, last / ckpt.WEIGHTS)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_step = state["best_step"]
        self.best_val = dict(state["best_val"])
        best = ckpt.find(self.run_dir, "best")
        if best is not None:
            meta = ckpt.read_meta(best)
            if meta.get("step", 0) > self.step and meta.get("val"):
                # Written after `last` by a session that then died: its weights are what
                # best/ holds (no earlier best survives), so its score is the one to beat and
                # the one the summary reports.
                self.best_step, self.best_val = int(meta["step"]), dict(meta["val"])
        self.elapsed_before = float(state["elapsed_s"])
        self.interval_stats = Stats(state["interval_stats"])
        self.pending_validation = bool(state.get("pending_validation", False))
        if len(state["rng"]) == info.world_size:
            ckpt.restore_rng(state["rng"][info.rank], self.device)
        else:
            warnings.warn(
                f"the checkpoint was written by {len(state['rng'])} processes and this run "
                f"has {info.world_size}: random states are re-seeded, so dropout differs from "
                "an uninterrupted run (the data order does not)",
                stacklevel=3,
            )
            _seed_process(cfg.seed + self.step, info.rank)

    def _trainer_state(self, rng_states: list[Any]) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "data": {**self.sampler.position(self.step), "num_samples": self.sampler.num_samples},
            "best_step": self.best_step,
            "best_val": self.best_val,
            "elapsed_s": self.elapsed(),
            "interval_stats": dict(self.interval_stats.sums),
            "pending_validation": self.pending_validation,
            "world_size": self.info.world_size,
            "config": asdict(self.config),
            "run_config": self.run_config,
        }

    def elapsed(self) -> float:
        """Seconds of training over all sessions of this run."""
        return self.elapsed_before + time.perf_counter() - self._session_start

    def _weights_writer(self) -> Callable[[Path], None]:
        meta = {**self.weights_metadata, "step": str(self.step)}
        return lambda p: ckpt.write_weights(self.module, p, meta)

    def save_last(self, rng_local: dict[str, Any]) -> None:
        """Write ``last`` (collective under a process group: every rank's RNG is gathered)."""
        rng_states = gather_objects(rng_local, self.info)
        if self.info.is_main:
            state = self._trainer_state(rng_states)
            meta = {"checkpoint": "last", "step": self.step}
            ckpt.write_checkpoint(
                self.run_dir,
                "last",
                {
                    ckpt.WEIGHTS: self._weights_writer(),
                    ckpt.STATE: lambda p: torch.save(state, p),
                    ckpt.META: lambda p: ckpt.write_json(p, meta, atomic=False),
                },
            )
        self.info.barrier()

    def save_best(self, val: Mapping[str, float]) -> None:
        """Write ``best``: weights and the validation metrics that made it best."""
        if self.info.is_main:
            meta = {"checkpoint": "best", "step": self.step, "val": dict(val)}
            ckpt.write_checkpoint(
                self.run_dir,
                "best",
                {
                    ckpt.WEIGHTS: self._weights_writer(),
                    ckpt.META: lambda p: ckpt.write_json(p, meta, atomic=False),
                },
            )
        self.info.barrier()

    # -- reporting --------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        """Print a line on rank 0 (above the progress bar)."""
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation set, log a metrics line, update ``best``."""
        cfg = self.config
        train_means = self.interval_stats.means()
        step_s = self.step_seconds / self.timed_steps if self.timed_steps else None
        self.step_seconds, self.timed_steps = 0.0, 0
        val = evaluate(
            self.net, self.objective, self.val_data, cfg,  # type: ignore[arg-type]
            collate_fn=self.collate_fn, device=self.device,
        )  # fmt: skip
        self.interval_stats.reset()
        score = val.get(cfg.select_metric)
        if score is None:
            raise ValueError(
                f"select_metric={cfg.select_metric!r} is not among the objective's metrics "
                f"{sorted(val)}"
            )
        improved = _better(score, self.best_val.get(cfg.select_metric), cfg.select_mode)
        if improved:
            # Written first: a score counts as best only once best/ holds its weights (an
            # interrupted write leaves this validation pending, to be redone on resume).
            self.save_best(val)
            self.best_step, self.best_val = self.step, dict(val)
        if self.metrics_log is not None:
            record: dict[str, Any] = {
                "step": self.step,
                "epoch": self.sampler.position(self.step)["epoch"],
                "lr": self.scheduler.get_last_lr()[0],
                **{f"train_{k}": v for k, v in train_means.items()},
                **{f"val_{k}": v for k, v in val.items()},
                "elapsed_s": round(self.elapsed(), 3),
            }
            if step_s is not None:
                record["train_s_per_step"] = round(step_s, 4)
            self.metrics_log.append(record)
        tr = " ".join(f"{k} {v:.4f}" for k, v in train_means.items())
        va = " ".join(f"{k} {v:.4f}" for k, v in val.items())
        mark = "  *best*" if improved else ""
        pace = "" if step_s is None else f" ({step_s:.3g} s/step)"
        self.say(f"step {self.step}/{cfg.steps}{pace}  train {tr} | val {va}{mark}")
        return val

    # -- the loop ---------------------------------------------------------------------------

    def _batches(self) -> Iterator[Any]:
        loader = DataLoader(
            self.train_data,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            worker_init_fn=_worker_ignores_sigint,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating the loader must not draw from torch's global one.
            generator=torch.Generator().manual_seed(self.config.seed + self.info.rank),
        )
        return iter(loader)

    def _forward_backward(self, batch: Any) -> tuple[list[Tensor], dict[str, float]]:
        """Losses and summed metrics of one batch, its gradients accumulated part by part
        (``micro_batches``); DDP synchronises them with the last part only."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(batch, cfg.micro_batches)
        total = sum(size for _, size in parts)
        losses: list[Tensor] = []
        sums: dict[str, float] = {}
        for i, (part, size) in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.info.enabled else self.net.no_sync()
            with sync:
                with autocast(self.device, cfg.precision):
                    loss, part_sums = self.objective(self.net, part)
                # The objective's loss is the mean over its part; the batch's is their mean
                # weighted by size.
                weighted = loss * (size / total) if len(parts) > 1 else loss
                if self.scaler is not None:
                    self.scaler.scale(weighted).backward()
                else:
                    weighted.backward()
            losses.append(loss.detach())
            for k, v in part_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return losses, sums

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def _update(self) -> None:
        cfg = self.config
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
        self._updating = True  # from here to the step count, an interrupt leaves no valid state
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._updating = False

    def _show(self, recent: deque[dict[str, float]]) -> None:
        if self.bar is None:
            return
        window = Stats()
        for r in recent:
            window.add(r)
        post = {k: f"{v:.4f}" for k, v in window.means().items()}
        post["lr"] = f"{self.scheduler.get_last_lr()[0]:.2e}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def fit(self) -> TrainResult:
        """Run the loop to ``config.steps`` (or ``stop_at``), then test and summarise."""
        cfg, info = self.config, self.info
        if self.step >= cfg.steps and (done := self._completed()) is not None:
            # Resuming a finished run: report it as it is rather than rewrite its summary
            # with the timings of a session that trained nothing.
            return done
        self._session_start = time.perf_counter()
        session_start_step = self.step
        self._updating = False
        batches = self._batches()
        keys: list[str] | None = None
        recent: deque[dict[str, float]] = deque(maxlen=50)  # progress-bar window
        # The random state after the last finished step: what `last` needs if an interrupt
        # comes before the next step finishes (during it, or during this step's validation).
        rng_after_step = ckpt.capture_rng(self.device)
        stop = _StopRequest(self.say)
        self.bar = _progress_bar(
            cfg.steps, self.step, self.description, cfg.progress and info.is_main
        )
        if cfg.stop_at is not None and self.step >= cfg.stop_at:
            if ckpt.find(self.run_dir, "last") is None:
                # Paused before the first step (stop_at=0): `last` is what --resume needs.
                self.save_last(ckpt.capture_rng(self.device))
        try:
            with stop:
                if self.pending_validation and self.val_data is not None:
                    self.validate()
                self.pending_validation = False
                while self.step < cfg.steps and (cfg.stop_at is None or self.step < cfg.stop_at):
                    started = time.perf_counter()
                    batch = to_device(next(batches), self.device)
                    self.net.train()
                    losses, sums = self._forward_backward(batch)
                    if keys is None:
                        keys = sorted(sums)
                        if "count" not in keys:
                            raise ValueError(
                                f"the objective's sums must include 'count', got {keys}"
                            )
                    # One all-reduce carries the metric sums and two flags all processes must
                    # agree on: a stop request and a non-finite loss.
                    finite = all(torch.isfinite(x).item() for x in losses)
                    # A finite loss can still have a non-finite gradient (an overflow in the
                    # backward pass); the update would leave NaN weights that this step's
                    # validation and checkpoint would save. With fp16 the scaler skips it.
                    finite = finite and (self.scaler is not None or self._gradients_finite())
                    flags = [float(stop.requested), float(not finite)]
                    vec = torch.cat(
                        [stats_tensor(sums, keys), torch.tensor(flags, dtype=torch.float64)]
                    )
                    vec = all_reduce_sum(vec.to(self.device), info).cpu()
                    reduced = dict(zip(keys, vec[:-2].tolist(), strict=True))
                    stop_now = vec[-2].item() > 0 or (not info.enabled and stop.requested)
                    if vec[-1].item() > 0 or not all(math.isfinite(v) for v in reduced.values()):
                        loss = sum(x.item() for x in losses) / len(losses)
                        _non_finite(self.run_dir, self.step + 1, loss, self.metrics_log)
                    self._update()
                    rng_after_step = ckpt.capture_rng(self.device)
                    self.step_seconds += time.perf_counter() - started
                    self.timed_steps += 1
                    self.interval_stats.add(reduced)
                    recent.append(reduced)
                    self._show(recent)

                    at_end = self.step == cfg.steps
                    if self.val_data is not None and (
                        at_end or (cfg.eval_every and self.step % cfg.eval_every == 0)
                    ):
                        self.pending_validation = True
                        self.validate()
                        self.pending_validation = False
                    every = cfg.checkpoint_interval
                    paused = cfg.stop_at is not None and self.step >= cfg.stop_at
                    if at_end or paused or stop_now or (every and self.step % every == 0):
                        self.save_last(rng_after_step)
                    if stop_now:
                        self.say(f"stopped at step {self.step}; `last` saved in {self.run_dir}")
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            # One that did not come through the handler (not the main thread, or raised by
            # user code) mid-step: save the last finished step, unless the optimiser was
            # half-way through an update, or other processes would wait in the collective.
            if not stop.requested and not self._updating and not info.enabled:
                self.save_last(rng_after_step)
                self.say(f"interrupted; `last` saved at step {self.step} in {self.run_dir}")
            raise
        except RuntimeError:
            # A SIGTERM sent to the whole process group (by a scheduler) also ended the
            # DataLoader's workers, and the loader reports them dead wherever the loop is: that
            # is the stop the signal asked for, at the last finished step.
            if not stop.requested:
                raise
            if not self._updating and not info.enabled:
                self.save_last(rng_after_step)
                self.say(f"stopped; `last` saved at step {self.step} in {self.run_dir}")
            raise KeyboardInterrupt from None
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        session_s = time.perf_counter() - self._session_start
        steps_per_s = (self.step - session_start_step) / max(session_s, 1e-9)
        if self.step < cfg.steps:
            return TrainResult(
                "stopped", self.step, self.best_step, self.best_val, {}, self.elapsed()
            )
        return self._finish(steps_per_s)

    def _completed(self) -> TrainResult | None:
        """The result recorded in ``summary.json`` by a run that finished, or None."""
        path = self.run_dir / "summary.json"
        if not path.is_file():
            return None
        summary = ckpt.load_json(path)
        if summary.get("status") != "completed" or summary.get("steps") != self.step:
            return None
        not_metrics = ("test_checkpoint", "test_examples")
        test = {
            k.removeprefix("test_"): v
            for k, v in summary.items()
            if k.startswith("test_") and k not in not_metrics
        }
        # The model ends as a finishing run leaves it: holding the weights the test measured.
        if self.best_step is not None and (best := ckpt.find(self.run_dir, "best")) is not None:
            ckpt.load_weights(self.module, best / ckpt.WEIGHTS)
        self.say(f"{self.run_dir} is complete (step {self.step}); its summary is unchanged")
        return TrainResult(
            "completed",
            self.step,
            summary.get("best_step"),
            dict(self.best_val),
            test,
            float(summary.get("wall_time_s", self.elapsed())),
            summary,
        )

    def _finish(self, steps_per_s: float) -> TrainResult:
        cfg, info = self.config, self.info
        wall = self.elapsed()
        test: dict[str, float] = {}
        tested = "final"
        if self.best_step is not None and (best := ckpt.find(self.run_dir, "best")) is not None:
            ckpt.load_weights(self.module, best / ckpt.WEIGHTS)
            tested = "best"
        if self.test_data is not None:
            whole = replace(cfg, eval_batches=None)  # the test split is never truncated
            test = evaluate(
                self.net, self.objective, self.test_data, whole,
                collate_fn=self.collate_fn, device=self.device,
            )  # fmt: skip
        summary: dict[str, Any] = {
            "status": "completed",
            "steps": self.step,
            **{f"test_{k}": v for k, v in test.items()},
            "test_checkpoint": tested if test else None,
            # How many examples the test metrics average over, so that reports can give their
            # sampling error.
            "test_examples": len(self.test_data) if test else None,  # type: ignore[arg-type]
            **{f"best_val_{k}": v for k, v in self.best_val.items()},
            "best_step": self.best_step,
            "wall_time_s": round(wall, 3),
            "steps_per_s": round(steps_per_s, 4),
            "world_size": info.world_size,
            "device": str(self.device),
            "precision": cfg.precision,
            "num_parameters": sum(p.numel() for p in self.module.parameters()),
            "torch_version": torch.__version__,
            "train_config": asdict(cfg),
            "config": self.run_config,
        }
        if info.is_main:
            ckpt.write_json(self.run_dir / "summary.json", summary)
            if test:
                line = " ".join(f"{k} {v:.4f}" for k, v in test.items())
                self.say(f"test {line} ({tested} checkpoint, step {self.best_step or self.step})")
        return TrainResult(
            "completed", self.step, self.best_step, self.best_val, test, wall, summary
        )


def train(
    model: nn.Module,
    objective: Objective,
    train_data: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    **options: Any,
) -> TrainResult:
    """Train ``model`` on ``train_data``; write checkpoints, metrics and a summary to ``run_dir``.

    Files (written by rank 0 only, each atomically): ``last/`` and ``best/`` checkpoints
    (see :mod:`nystromer.train.checkpoint`), ``metrics.jsonl`` (one line per validation),
    ``summary.json`` when all steps are done (test metrics of ``best``, best validation
    metrics, steps, wall time and ``run_config``).

    Args:
        model: built on any device (moved to ``config.device``); for ``fp64`` converted to
            float64 in place. Under a process group it is wrapped in DistributedDataParallel;
            a script that started the group leaves it with
            :func:`nystromer.train.distributed.shutdown`, which waits for every process and
            frees the wrapper first (``destroy_process_group`` alone can abort a process).
        objective: ``objective(model, batch) -> (loss, sums)`` (see the module docstring);
            called with the wrapped model in training and the bare model in evaluation.
        train_data, val_data, test_data: map-style datasets; ``collate_fn`` builds a batch.
        config: :class:`TrainConfig`.
        run_dir: output directory. Without ``resume`` it must not hold a checkpoint.
        options: the keyword arguments of :class:`Trainer` (all optional):
            ``val_data``, ``test_data``, ``collate_fn``, ``resume``, ``run_config``,
            ``weights_metadata``, ``description``, described below.
        resume: continue from ``run_dir/last``: weights, optimiser, schedule, random states
            and data position are restored, so the losses equal those of an uninterrupted
            run (bit for bit on the same hardware and number of processes).
        run_config: the caller's full configuration (JSON-able), kept in checkpoints and the
            summary.
        weights_metadata: strings stored in each ``model.safetensors``.
        description: label of the progress bar.

    Returns:
        A :class:`TrainResult`.

    Raises:
        NonFiniteLossError: the loss or its gradient became NaN/inf; ``last`` keeps the last
            good state.
        KeyboardInterrupt: Ctrl-C or SIGTERM; ``last`` was saved at the last finished step.
        ValueError: inconsistent arguments (e.g. resuming with a different schedule).
    """
    return Trainer(model, objective, train_data, config, run_dir, **options).fit()
