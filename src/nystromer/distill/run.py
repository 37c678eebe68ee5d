"""Distil an exact pretrained encoder into its Nyström-attention conversion.

The teacher is the pretrained model with exact attention (with its position table lengthened
by :func:`nystromer.extend_positions` when ``max_length`` asks for more positions); the
student starts as :func:`nystromer.convert` of the same weights, its convolution skip fitted
to exact attention by :func:`nystromer.calibrate` (``calibrate`` windows; 0 skips it), and is
trained to reproduce the teacher's hidden states on unlabeled text: a per-token loss over real
tokens (1 − cosine similarity, or the squared error) of the last layer (``layers="last"``) or
averaged over every layer (``layers="all"``).
The score is the cosine similarity of mean-pooled embeddings (the sentence-embedding recipe)
between student and teacher on held-out text, measured before training and, on the best
checkpoint, after it.

A run directory holds ``config.json`` (the distillation settings), ``before.json``, the
``last``/``best`` checkpoints, ``metrics.jsonl`` and, when done, ``summary.json``,
``distill.json`` (before/after), ``cosine.png`` and ``model/`` (the trained student with
the teacher's tokenizer, loadable with :func:`nystromer.from_pretrained`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf
from .._checks import check_positive_int, is_number
from .._version import __version__
from ..calibration import calibrate
from ..conversion import convert, extend_positions, reserved_positions
from ..functional import check_nystrom_options
from ..train import TrainConfig, evaluate, train
from ..train import checkpoint as ckpt
from ..train.distributed import DistInfo, resolve_device
from ..train.loop import check_no_earlier_run
from ..train.metrics import plot_metrics
from .data import TokenWindows, collate, read_texts, split_corpus

__all__ = ["DistillConfig", "distill", "distill_objective", "load_teacher", "mean_pool"]

CONFIG_FILE = "config.json"
# Weights of the calibrated student before training: the baseline training must beat.
CALIBRATED_WEIGHTS = "calibrated.safetensors"
LAYERS = ("last", "all")
LOSSES = ("cosine", "mse")


@dataclass
class DistillConfig:
    """What to distil and how (``nystromer distill``'s flags).

    Attributes:
        teacher: the pretrained model's folder (Hugging Face format, BERT or RoBERTa, with
            its tokenizer).
        texts: text files or built-in texts (``builtin:pydoc``).
        num_landmarks, pinv_iterations, conv_kernel_size, kmeans_iterations: the student's
            Nyström attention (:func:`nystromer.convert`); 3 k-means iterations of the
            landmarks by default (docs/results.md: they halve the error the fitted
            convolution leaves).
        calibrate: training windows on which the convolution skip is fitted to exact attention
            by least squares before training (:func:`nystromer.calibrate`); 0 skips it. Needs
            ``conv_kernel_size``.
        calibrate_output: with ``calibrate``, also fit each layer's attention output
            projection, shrunk towards the identity by this factor (``output_projection`` of
            :func:`nystromer.calibrate`); None skips it.
        max_length: tokens per window, special tokens included.
        layers: ``all`` matches every layer's hidden states, ``last`` the last layer's.
        loss: per real token, ``cosine`` (1 − cosine similarity of student and teacher
            hidden states, DistilBERT's hidden-state loss; insensitive to the few
            large-magnitude dimensions of BERT-style models) or ``mse`` (mean squared error).
        steps, batch_size, lr, warmup_steps, weight_decay: the optimisation (AdamW, one-cycle
            schedule; see :class:`nystromer.train.TrainConfig`). The defaults are the recipe
            that did best on all-MiniLM-L6-v2 (docs/results.md): k-means landmarks, a
            convolution skip of 35 and the output projections fitted on 16 windows, all
            layers, batch 4, lr 3e-5 (a start this close to the teacher loses ground at
            1e-4), no dropout; docs/results.md gives what it reaches and how long it takes.
        dropout: dropout probability of every dropout layer of the student (attention
            dropout included) while it trains; 0 (default) trains the deterministic model
            that is evaluated, None keeps the teacher's own rates (0.1 for BERT). The
            student is chasing the teacher's eval-mode outputs, which carry no dropout
            noise (docs/results.md compares the two).
        eval_fraction: share of the text held out (half validation, half test).
        stride: tokens between consecutive training windows (default: half a window).
        eval_every: validate every this many steps.
        seed: data order and initialisation of new parameters.
        precision: fp32, bf16 (autocast) or fp64.
    """

    teacher: str
    texts: list[str]
    num_landmarks: int = 64
    pinv_iterations: int = 6
    kmeans_iterations: int = 3
    conv_kernel_size: int | None = 35
    calibrate: int = 16
    calibrate_output: float | None = 0.3
    max_length: int = 512
    layers: str = "all"
    loss: str = "cosine"
    steps: int = 800
    batch_size: int = 4
    lr: float = 3e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    dropout: float | None = 0.0
    eval_fraction: float = 0.1
    stride: int | None = None
    eval_every: int = 50
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_nystrom_options(
            self.num_landmarks, self.pinv_iterations, self.conv_kernel_size, self.kmeans_iterations
        )
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("max_length", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.calibrate, bool) or not isinstance(self.calibrate, int):
            raise ValueError(f"calibrate must be a number of windows (≥ 0), got {self.calibrate!r}")
        if self.calibrate < 0:
            raise ValueError(f"calibrate must be ≥ 0 windows, got {self.calibrate}")
        if self.calibrate_output is not None and (
            not is_number(self.calibrate_output) or not self.calibrate_output > 0
        ):
            raise ValueError(
                f"calibrate_output must be a shrinkage > 0 or None, got {self.calibrate_output!r}"
            )
        if self.calibrate and self.conv_kernel_size is None:
            raise ValueError(
                "calibrate fits the convolution skip, which needs conv_kernel_size "
                "(e.g. --conv-kernel-size 35)"
            )
        if self.max_length < 4:
            raise ValueError(
                f"max_length must be ≥ 4 (special tokens + text), got {self.max_length}"
            )
        if self.dropout is not None and (
            not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be in [0, 1) or None, got {self.dropout!r}")
        if not is_number(self.eval_fraction) or not 0.0 < self.eval_fraction < 1.0:
            # Checked again where the text is split, after the teacher is loaded: too late.
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            raise ValueError(f"stride must be a positive integer or None, got {self.stride!r}")
        if not self.texts:
            raise ValueError("texts must name at least one text file or built-in text")
        self.texts = [str(t) for t in self.texts]
        self.teacher = str(self.teacher)

    def train_config(self, **runtime: Any) -> TrainConfig:
        warmup = self.warmup_steps
        if warmup is None:
            warmup = self.steps // 10
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=warmup,
            weight_decay=self.weight_decay,
            eval_every=self.eval_every,
            seed=self.seed,
            precision=self.precision,
            select_metric="cosine",
            select_mode="max",
            **runtime,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        # Runs from before calibration, k-means landmarks, the output fit and the dropout
        # setting had none of them (and trained with the teacher's dropout).
        data = {
            "calibrate": 0,
            "kmeans_iterations": 0,
            "calibrate_output": None,
            "dropout": None,
            **data,
        }
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown distillation settings {sorted(unknown)}")
        return cls(**data)


def read_run_config(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a distillation run folder; ValueError naming the folder when it
    has none or holds another command's run (an LRA run's), or naming a malformed file."""
    config = ckpt.read_json(
        Path(out) / CONFIG_FILE,
        f"{out} is not a distillation run directory ({CONFIG_FILE} is missing)",
    )
    if not isinstance(config, dict) or not isinstance(config.get("distill"), dict):
        raise ValueError(
            f"{out} is not a distillation run directory: its {CONFIG_FILE} has no 'distill' "
            "settings (`nystromer distill` writes them)"
        )
    return config


def load_teacher(directory: str | os.PathLike[str], max_length: int) -> tuple[nn.Module, Any]:
    """The exact teacher (transformers AutoModel, SDPA attention, float32, eval mode, frozen)
    and its tokenizer; the position table is lengthened when ``max_length`` needs it.

    Raises:
        ValueError: not an encoder Nyström attention can serve (docs/models.md).
        FileNotFoundError: no such folder.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher must be a model folder with a config.json: {path}")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "nystromformer":
        raise ValueError(
            "teacher must be an exact-attention encoder (BERT, RoBERTa, ELECTRA, …: "
            f"docs/models.md), got model_type {model_type!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    # In float32 whatever dtype the checkpoint was saved in (transformers 5 keeps a bfloat16
    # one in bfloat16): the student is a copy and trains in it; precision sets autocast.
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    hf.check_supported(model)
    reserved = reserved_positions(model)
    if max_length + reserved > model.config.max_position_embeddings:
        extend_positions(model, max_length + reserved)
    model.eval().requires_grad_(False)
    return model, tokenizer


def build_student(teacher: nn.Module, config: DistillConfig) -> nn.Module:
    """The student before calibration and training: a converted copy of ``teacher``.

    Nyström attention as ``config`` sets it (:func:`nystromer.convert`), the pooler frozen, the
    dropout rates of ``config.dropout``, in training mode. ``teacher`` is not modified.
    """
    student = copy.deepcopy(teacher).requires_grad_(True)
    torch.manual_seed(config.seed)  # new parameters (a convolution skip) start the same
    convert(
        student,
        num_landmarks=config.num_landmarks,
        pinv_iterations=config.pinv_iterations,
        conv_kernel_size=config.conv_kernel_size,
        kmeans_iterations=config.kmeans_iterations,
    )
    pooler = getattr(student, "pooler", None)
    if pooler is not None:
        # Mean-pooled embeddings do not use it; frozen, it keeps the teacher's weights and
        # DistributedDataParallel does not wait for its gradients.
        pooler.requires_grad_(False)
    if config.dropout is not None:
        set_dropout(student, config.dropout)
    return student.train()


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``model`` to ``p``.

    Covers attention dropout too: BERT-style attention reads its rate from its
    ``nn.Dropout`` module (``self.dropout.p``) and hands it to the attention function.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: (B, n, d), (B, n) → (B, d)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def distill_objective(
    student: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    teacher: nn.Module,
    layers: str = "all",
    loss: str = "cosine",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The distillation objective for :func:`nystromer.train.train`.

    Returns:
        The loss (``loss`` of the hidden states, averaged over real tokens and, with
        ``layers="all"``, over layers) and per-batch sums of ``loss``, ``mse`` (of the last
        hidden state per real token and dimension) and ``cosine`` (of the mean-pooled last
        hidden states, the held-out score).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    every = layers == "all"
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=every)
    s = student(input_ids=ids, attention_mask=mask, output_hidden_states=every)
    pairs = (
        list(zip(s.hidden_states[1:], t.hidden_states[1:], strict=True))
        if every
        else [(s.last_hidden_state, t.last_hidden_state)]
    )
    real = mask.to(torch.float32)
    tokens = real.sum()

    def per_token(a: Tensor, b: Tensor, kind: str) -> Tensor:
        a, b = a.float(), b.float()
        if kind == "cosine":
            return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
        return ((a - b) ** 2).mean(-1)

    value = sum((per_token(a, b, loss) * real).sum() / tokens for a, b in pairs) / len(pairs)
    last_s, last_t = s.last_hidden_state.float(), t.last_hidden_state.float()
    mse = (per_token(last_s, last_t, "mse") * real).sum(1) / real.sum(1).clamp_min(1.0)
    cosine = torch.nn.functional.cosine_similarity(mean_pool(last_s, mask), mean_pool(last_t, mask))
    n = ids.shape[0]
    sums = {
        "count": n,
        "loss": value.detach() * n,
        "mse": mse.detach().sum(),
        "cosine": cosine.detach().sum(),
    }
    return value, sums


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int], int]:
    # BERT: [CLS] … [SEP]; RoBERTa: <s> … </s>.
    prefix = [] if tokenizer.cls_token_id is None else [tokenizer.cls_token_id]
    suffix = [] if tokenizer.sep_token_id is None else [tokenizer.sep_token_id]
    pad = tokenizer.pad_token_id
    return prefix, suffix, 0 if pad is None else pad


def _datasets(
    cfg: DistillConfig, texts: list[str], tokenizer: Any
) -> tuple[dict[str, TokenWindows], dict]:
    ids: list[int] = []
    for text in texts:
        # One call per text; verbose=False: the corpus is longer than the model on purpose.
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    prefix, suffix, pad = _special_tokens(tokenizer)
    body = cfg.max_length - len(prefix) - len(suffix)
    train_ids, val_ids, test_ids = split_corpus(ids, cfg.eval_fraction, body)
    common = {"prefix": prefix, "suffix": suffix, "pad_id": pad}
    splits = {
        "train": TokenWindows(
            train_ids, cfg.max_length, stride=cfg.stride or max(body // 2, 1), **common
        ),
        "val": TokenWindows(val_ids, cfg.max_length, keep_partial=True, **common),
        "test": TokenWindows(test_ids, cfg.max_length, keep_partial=True, **common),
    }
    info = {
        "tokens": len(ids),
        # Which text: a resume must see the same (an edited file, or builtin:stdlib-docs
        # under another Python, would move the held-out windows that before.json measured).
        "ids_sha256": hashlib.sha256(torch.as_tensor(ids, dtype=torch.long).numpy()).hexdigest(),
        **{f"{k}_tokens": v.num_tokens for k, v in splits.items()},
        **{f"{k}_windows": len(v) for k, v in splits.items()},
    }
    return splits, info


def distill(
    config: DistillConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    **runtime: Any,
) -> dict[str, Any]:
    """Distil ``config.teacher`` into its Nyström conversion; see the module docstring.

    Args:
        config: the settings (with ``resume``, the saved ones are used and this must equal
            them, runtime settings aside).
        out_dir: the run directory.
        resume: continue the run in ``out_dir`` from its ``last`` checkpoint.
        runtime: :class:`~nystromer.train.TrainConfig` settings that do not change the result
            (device, num_workers, stop_at, progress, checkpoint_every, eval_batch_size;
            micro_batches up to rounding).

    Returns:
        ``{"status", "cosine_before", "cosine_after", "step", ...}``; ``cosine_after`` is None
        while the run is paused (``stop_at``).
    """
    out = Path(out_dir)
    info = DistInfo.current()
    train_config = config.train_config(**runtime)
    if resume:
        saved = read_run_config(out)
        # Through from_dict, so settings added since the run was saved take their old values.
        kept, given = DistillConfig.from_dict(saved["distill"]).to_dict(), config.to_dict()
        if kept != given:
            changed = "; ".join(
                f"{k}: {kept[k]!r} → {given[k]!r}" for k in given if kept[k] != given[k]
            )
            raise ValueError(f"cannot resume {out} with different settings ({changed})")
        if (out / "distill.json").is_file():
            # Finished: its report, model and summary stand as they are.
            return ckpt.read_json(out / "distill.json", f"{out} has no distill.json")
    elif ckpt.find(out, "last") is not None:
        raise ValueError(f"{out} already holds a run; pass resume=True (--resume) or another out")
    elif (out / CONFIG_FILE).is_file():
        saved = read_run_config(out)
        if DistillConfig.from_dict(saved["distill"]).to_dict() != config.to_dict():
            raise ValueError(
                f"{out} holds another distillation run ({CONFIG_FILE} differs); resume it "
                "(--resume) or choose another --out"
            )
    if not resume:
        # The trainer refuses this folder too, but only after the start was measured and
        # calibrated and before.json rewritten beside the earlier run's results.
        check_no_earlier_run(out, instead="another --out")

    texts = read_texts(config.texts)  # a missing or undecodable file before the teacher
    teacher, tokenizer = load_teacher(config.teacher, config.max_length)
    splits, data_info = _datasets(config, texts, tokenizer)
    if resume:
        was = saved.get("data", {})
        differ = [f"{k}: {was[k]!r} → {v!r}" for k, v in data_info.items() if was.get(k, v) != v]
        if differ:
            raise ValueError(
                f"cannot resume {out}: the text ({', '.join(config.texts)}) changed since the "
                f"run started ({'; '.join(differ)})"
            )
    student = build_student(teacher, config)
    if config.precision == "fp64":
        student.double()
    device = resolve_device(train_config.device, info)
    teacher.to(device)
    if config.precision == "fp64":
        teacher.double()
    objective = functools.partial(
        distill_objective, teacher=teacher, layers=config.layers, loss=config.loss
    )
    pad = splits["train"].pad_id
    collate_fn = functools.partial(collate, pad_id=pad)
    run_config = {
        "distill": config.to_dict(),
        "data": data_info,
        "teacher_max_position_embeddings": teacher.config.max_position_embeddings,
        "nystromer_version": __version__,
    }
    before_file = out / "before.json"
    if resume:
        before = ckpt.read_json(before_file, f"{before_file} is missing")
    else:
        if info.is_main:
            ckpt.write_json(out / CONFIG_FILE, run_config)
        # The converted, untrained student on the held-out text: the gap distillation closes.
        student.to(device)
        before = _held_out(student, objective, splits, train_config, collate_fn, device)
        if info.is_main:
            print(f"before distillation: test cosine {before['test']['cosine']:.4f}", flush=True)
        if config.calibrate:
            started = time.perf_counter()
            fit = calibrate(
                student,
                _calibration_batches(splits["train"], config, device),
                output_projection=config.calibrate_output,
            )
            before["calibrated"] = {
                "seconds": round(time.perf_counter() - started, 1),
                **_held_out(student, objective, splits, train_config, collate_fn, device),
                "windows": config.calibrate,
                "explained": [e.tolist() for e in fit.explained],
                "output_explained": fit.output_explained,
            }
            student.train()
            if info.is_main:
                # Kept so that training can be judged against it (and lose to it) at the end.
                ckpt.save_weights(student, out / CALIBRATED_WEIGHTS)
                print(
                    "after calibrating the convolution skip: test cosine "
                    f"{before['calibrated']['test']['cosine']:.4f}",
                    flush=True,
                )
        if info.is_main:
            ckpt.write_json(before_file, before)
    result = train(
        student,
        objective,
        splits["train"],
        train_config,
        out,
        val_data=splits["val"],
        test_data=splits["test"],
        collate_fn=collate_fn,
        resume=resume,
        run_config=run_config,
        weights_metadata={"teacher": config.teacher},
        description="distill",
    )
    calibrated = before.get("calibrated")
    best_val, best_step, test = result.best_val, result.best_step, result.test
    if (
        result.status == "completed"
        and calibrated is not None
        and (out / CALIBRATED_WEIGHTS).is_file()
        and calibrated["val"]["cosine"] > best_val.get("cosine", float("-inf"))
    ):
        # Training never beat its calibrated start on validation: that start is the result.
        ckpt.load_weights(student, out / CALIBRATED_WEIGHTS)
        best_val, best_step, test = calibrated["val"], 0, calibrated["test"]
    report: dict[str, Any] = {
        "status": result.status,
        "step": result.step,
        "cosine_before": before["test"]["cosine"],
        "cosine_calibrated": calibrated["test"]["cosine"] if calibrated else None,
        "mse_calibrated": calibrated["test"]["mse"] if calibrated else None,
        "calibration_s": calibrated["seconds"] if calibrated else None,
        "cosine_after": test.get("cosine"),
        "mse_before": before["test"]["mse"],
        "mse_after": test.get("mse"),
        "best_step": best_step,
        "wall_time_s": round(result.wall_time_s, 1),
    }
    if result.status != "completed":
        return report
    if info.is_main:
        from .._machine import machine_info

        # The student holds the best weights (train()'s best, or the calibrated start); save
        # it as a usable model.
        model_dir = out / "model"
        tokenizer.model_max_length = config.max_length
        _save_model_atomically(student.eval(), tokenizer, model_dir)
        report.update(
            {
                "test_windows": len(splits["test"]),
                "max_length": config.max_length,
                "num_landmarks": config.num_landmarks,
                "texts": config.texts,
                "model_dir": str(model_dir),
                # The machine that trained (threads as set for this run), for the report,
                # which may be written later by another process.
                "machine": machine_info(str(device)),
            }
        )
        ckpt.write_json(out / "distill.json", report)
        try:
            plot_metrics(
                out / "metrics.jsonl",
                "val_cosine",
                out / "cosine.png",
                title=f"Distillation: cosine to the exact model (m = {config.num_landmarks}, "
                f"{config.max_length} tokens)",
                ylabel="validation cosine of mean-pooled embeddings",
                start=(0, (calibrated or before)["val"]["cosine"]),
            )
        except ImportError:
            pass  # matplotlib is optional: the numbers are in metrics.jsonl
    return report


def _held_out(student, objective, splits, train_config, collate_fn, device) -> dict[str, Any]:
    return {
        split: evaluate(
            student, objective, splits[split], train_config, collate_fn=collate_fn, device=device
        )
        for split in ("val", "test")
    }


def _calibration_batches(
    windows: TokenWindows, config: DistillConfig, device: torch.device
) -> list[dict[str, Tensor]]:
    # Windows spread over the training text, the same for a seed on every rank.
    gen = torch.Generator().manual_seed(config.seed)
    count = min(config.calibrate, len(windows))
    chosen = torch.randperm(len(windows), generator=gen)[:count].tolist()
    batches = []
    for i in range(0, count, config.batch_size):
        batch = collate([windows[j] for j in chosen[i : i + config.batch_size]], windows.pad_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _save_model_atomically(model: nn.Module, tokenizer: Any, target: Path) -> None:
    # save_pretrained writes file by file: write a sibling folder, then swap it in, so an
    # interrupted save never leaves a half-written model/ behind.
    partial = target.with_name(f".{target.name}.partial")
    old = target.with_name(f".{target.name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)
