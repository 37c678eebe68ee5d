"""Time and peak memory of one attention implementation on one problem size, each measurement
in a fresh ``python -m nystromer.bench.worker`` process (the only place where the CPU's memory
reading is reliable). docs/benchmarks.md, "How it is measured", says what the numbers mean.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from .._checks import check_int_at_least, check_positive_int
from .implementations import AttentionConfig, get_implementation, unavailable_reason
from .inputs import padding_mask, random_qkv

__all__ = [
    "CaseSpec",
    "CaseResult",
    "DTYPES",
    "measure_case",
    "run_in_process",
    "run_worker",
    "recorded_command",
    "fmt",
]

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}

#: What a :class:`CaseResult` reports per case, as its attribute names.
METRICS = ("forward_ms", "backward_ms", "forward_peak_mib", "backward_peak_mib")
TASKS = ("memory_forward", "memory_backward", "time_forward", "time_backward")
_RESULT_MARK = "NYSTROMER_BENCH_RESULT "


def recorded_command(program: str | list[str], argv: list[str], drop: tuple[str, ...]) -> str:
    """The command line a report records: ``program argv…`` (the words of a command, e.g.
    ``["nystromer", "eval-long"]``; a string is a script, run as ``python script``) without the
    ``drop`` options (``--flag value`` or ``--flag=value``), which say where copies go and
    change no number."""
    if isinstance(program, str):
        program = ["python", program]
    shown, skip = [], False
    for arg in argv:
        if not skip and arg.partition("=")[0] not in drop:
            shown.append(arg)
        skip = not skip and arg in drop  # the next argument is the dropped flag's value
    return shlex.join([*program, *shown])


@dataclass(frozen=True)
class CaseSpec:
    """One measurement: an implementation and a problem size.

    Attributes:
        impl: registry name (see :mod:`nystromer.bench.implementations`).
        batch, heads, seq_len, head_dim: B, H, n, d of the (B, H, n, d) inputs.
        num_landmarks, pinv_iterations: m and pinv iterations (ignored by ``exact``).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        padding: fraction of key positions that are right padding (0: no mask at all).
        threads: torch intra-op threads (None: torch's default).
        warmup, repeats: untimed and timed calls per timing.
        seed: input seed.
    """

    impl: str
    batch: int = 1
    heads: int = 8
    seq_len: int = 16384
    head_dim: int = 64
    num_landmarks: int = 64
    pinv_iterations: int = 6
    dtype: str = "float32"
    device: str = "cpu"
    padding: float = 0.0
    threads: int | None = None
    warmup: int = 1
    repeats: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "heads", "seq_len", "head_dim", "num_landmarks", "repeats"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup", "pinv_iterations"):
            check_int_at_least(name, getattr(self, name), 0)
        get_implementation(self.impl)  # ValueError for an unknown name

    def config(self) -> AttentionConfig:
        """The runner's shape: this case's fields of the same names, the dtype as a torch one."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(AttentionConfig)}
        return AttentionConfig(**shared | {"dtype": DTYPES[self.dtype]})


@dataclass
class CaseResult:
    """What :func:`measure_case` found. Times in milliseconds, memory in MiB.

    ``status`` is ``ok``, ``skipped`` (not installed / unsupported size), ``oom`` (the process
    ran out of memory) or ``failed``; ``note`` says why when not ``ok``.
    """

    spec: CaseSpec
    status: str = "ok"
    note: str = ""
    forward_ms: float | None = None
    backward_ms: float | None = None
    forward_times_ms: list[float] = field(default_factory=list)
    backward_times_ms: list[float] = field(default_factory=list)
    forward_peak_mib: float | None = None
    backward_peak_mib: float | None = None
    memory_method: str | None = None
    threads: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One progress line: times and peaks, or the status and why."""
        if self.status != "ok":
            return f"{self.status}: {self.note}"
        times = f"fwd {fmt(self.forward_ms)} ms"
        peaks = f"peak {fmt(self.forward_peak_mib)}"
        if self.backward_ms is not None or self.backward_peak_mib is not None:
            times += f", fwd+bwd {fmt(self.backward_ms)} ms"
            peaks += f" / {fmt(self.backward_peak_mib)}"
        return f"{times}, {peaks} MiB"


def fmt(value: float | None, spec: str = ",.1f") -> str:
    """A number for a table or a progress line; — where there is none."""
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


# --- in-process measurement (valid for memory only in a fresh process) ------------------------


def _status_kib(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux always has VmRSS and VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


def _prepared(spec: CaseSpec, backward: bool):
    """``spec``'s runner, its prepared inputs and (with ``backward``) a random output gradient."""
    runner = get_implementation(spec.impl).build(spec.config())
    dtype = DTYPES[spec.dtype]
    shape = (spec.batch, spec.heads, spec.seq_len, spec.head_dim)
    qkv = random_qkv(*shape, dtype=dtype, device=spec.device, seed=spec.seed)
    mask = padding_mask(spec.batch, spec.seq_len, spec.padding, device=spec.device)
    # A peer's prepare copies q, k, v into one tensor: keep one copy resident.
    args, qkv = runner.prepare(*qkv, mask), None
    if not backward:
        return runner, args, None
    args = tuple(
        a.detach().requires_grad_() if i in runner.grad_args else a for i, a in enumerate(args)
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    grad = torch.randn(runner.output_shape(*shape), generator=gen)
    return runner, args, runner.prepare_grad(grad.to(device=spec.device, dtype=dtype))


def _call(runner, args, grad) -> None:
    if grad is None:
        with torch.no_grad():
            runner.run(*args)
    else:
        for i in runner.grad_args:
            args[i].grad = None
        runner.run(*args).backward(grad)


def _memory(spec: CaseSpec, backward: bool) -> tuple[float, str]:
    # One call at a small size first loads kernels and libraries outside the measured region.
    _call(*_prepared(dataclasses.replace(spec, seq_len=4 * spec.num_landmarks, batch=1), backward))
    runner, args, grad = _prepared(spec, backward)
    if spec.device.startswith("cuda"):
        dev = torch.device(spec.device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        _call(runner, args, grad)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20, "cuda-allocated"
    # Freed heap memory kept by glibc could be reused by the measured call without showing in
    # RSS; handing it back first makes the baseline exact.
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS")
    try:  # "5" resets the resident-set high-water mark
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        method = "rss-reset"
    except OSError:
        method = "rss-hwm"
    _call(runner, args, grad)
    return max(0, _status_kib("VmHWM") - base) / 1024, method


def _times(spec: CaseSpec, backward: bool) -> list[float]:
    runner, args, grad = _prepared(spec, backward)
    cuda = spec.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(torch.device(spec.device))) if cuda else lambda: None
    for _ in range(spec.warmup):
        _call(runner, args, grad)
    times = []
    for _ in range(spec.repeats):
        sync()
        t0 = time.perf_counter()
        _call(runner, args, grad)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_in_process(spec: CaseSpec, tasks: tuple[str, ...] | list[str]) -> dict:
    """Run ``tasks`` (from :data:`TASKS`) here and return their results as a dict. Memory tasks
    must come first, in a process that has done nothing else (the worker); timings can follow."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}, expected some of {TASKS}")
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    out: dict = {"threads": torch.get_num_threads()}
    for task in tasks:
        kind, _, which = task.partition("_")
        if kind == "memory":
            out[f"{which}_peak_mib"], out["memory_method"] = _memory(spec, which == "backward")
        else:
            out[f"{which}_times_ms"] = times = _times(spec, which == "backward")
            out[f"{which}_ms"] = statistics.median(times)
    return out


# --- fresh-process measurement ----------------------------------------------------------------


def run_worker(
    spec: CaseSpec, tasks: list[str], timeout: float | None, *, command: list[str] | None = None
) -> dict:
    """Run ``tasks`` for ``spec`` in a fresh process started by ``command`` (default ``python
    -m nystromer.bench.worker``) with the spec as JSON and the comma-joined tasks appended; it
    prints its result dict on one line after the result mark. A crash or timeout becomes
    ``{"status": "oom" | "failed", "note": ...}``."""
    env = os.environ | ({} if spec.threads is None else {"OMP_NUM_THREADS": str(spec.threads)})
    start = command if command is not None else [sys.executable, "-m", "nystromer.bench.worker"]
    cmd = [*start, json.dumps(dataclasses.asdict(spec)), ",".join(tasks)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "note": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower():
        return {"status": "oom", "note": f"out of memory (exit {proc.returncode})"}
    return {"status": "failed", "note": f"worker exit {proc.returncode}: {tail}"}


def measure_case(
    spec: CaseSpec,
    *,
    backward: bool = True,
    timing: bool = True,
    timeout: float | None = None,
    worker: list[str] | None = None,
) -> CaseResult:
    """Measure one case: forward memory and the timings (of the forward, and with ``backward``
    of forward+backward; none without ``timing``) in one fresh process, forward+backward memory
    in another. ``timeout`` is per worker process; ``worker`` the command that starts one (see
    :func:`run_worker`). An implementation that is not installed or does not accept the size is
    ``skipped`` with the reason, a crashed worker ``failed``/``oom``."""
    impl = get_implementation(spec.impl)
    reason = unavailable_reason(spec.impl) or impl.supports(spec.config(), spec.padding > 0)
    if reason is not None:
        return CaseResult(spec, "skipped", reason)
    times = (["time_forward", "time_backward"] if backward else ["time_forward"]) if timing else []
    found: dict = {}
    for tasks in [["memory_forward", *times]] + ([["memory_backward"]] if backward else []):
        found |= run_worker(spec, tasks, timeout, command=worker)
        if found.get("status", "ok") != "ok":
            return CaseResult(spec, found["status"], found["note"])
    return CaseResult(spec, **found)
