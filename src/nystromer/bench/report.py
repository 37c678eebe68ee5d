"""``nystromer bench report`` (``make bench``): regenerate docs/benchmarks.md from the commands.

Runs, each into its own folder under ``--out``, the benchmark commands exactly as a user would
type them (``python -m nystromer ...``, one process per command):

* ``table``: ``nystromer bench table`` (the paper's Table 1 form, n = 512 … 8192);
* ``speed``: ``nystromer bench speed`` (CPU, float32, n = 512 … 65,536, every implementation);
* ``gpu``: ``nystromer bench speed --device cuda`` in bfloat16 and float32 up to n = 131,072,
  run only where CUDA is available; results found under ``docs/bench/gpu/<dtype>/`` (from such
  a run on another machine) are rendered naming the device, otherwise the section gives the
  commands that produce them;
* ``approx``: ``nystromer bench approx`` (all input kinds: random, a trained LRA model, a
  language model);
* ``viz``: ``nystromer viz attention`` on random inputs and on the LRA model.

The LRA inputs need a trained model (``--lra-run``, default ``runs/listops`` or the demo's
``runs/demo/run``); nothing is trained here. Without one, those parts are left out and the
report says which command makes one.

Each section is then written into the Markdown file between its own marker comments
(``<!-- bench-report:NAME:begin … -->`` … ``<!-- bench-report:NAME:end -->``), stating the
command, the date and the machine; sections without markers yet are appended. Everything
outside the markers, the attention-core section of ``make bench-core`` included, is left
byte for byte. Plots are copied next to the Markdown (``docs/bench/``) and linked.
``--quick`` runs the same pipeline on tiny sizes (seconds), into a scratch Markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .._io import atomic_path
from .._markdown import replace_section

__all__ = [
    "REPORT_SECTIONS",
    "GPU_DTYPES",
    "GPU_LENGTHS",
    "DEFAULT_DOCS",
    "ReportSection",
    "report_commands",
    "gpu_commands",
    "run_report",
    "render_speed",
    "render_table",
    "render_approx",
    "render_viz",
    "render_gpu",
    "write_docs_section",
    "register_report",
]

#: In the order they appear in the Markdown file.
REPORT_SECTIONS = ("table", "speed", "gpu", "approx", "viz")
GPU_DTYPES = ("bfloat16", "float32")
GPU_LENGTHS = tuple(512 * 2**i for i in range(9))  # 512 … 131,072
DEFAULT_DOCS = Path("docs/benchmarks.md")
_TITLES = {
    "table": "Table 1 form: memory and time per instance",
    "speed": "Speed and memory against n (CPU, float32)",
    "gpu": "GPU",
    "approx": "Approximation error",
    "viz": "Attention matrices",
}
# Tiny problem settings for --quick: the whole pipeline in seconds.
_QUICK_PROBLEM = ["--heads", "2", "--head-dim", "16", "--num-landmarks", "16"]
_QUICK_TIMING = ["--threads", "1", "--repeats", "1"]


def _begin(name: str) -> str:
    return f"<!-- bench-report:{name}:begin (written by nystromer bench report) -->"


def _end(name: str) -> str:
    return f"<!-- bench-report:{name}:end -->"


@dataclass
class ReportSection:
    """One section: the commands it runs and, once rendered, its Markdown and images.

    Attributes:
        name: one of :data:`REPORT_SECTIONS`.
        commands: argument lists of ``nystromer`` (without the program name).
        markdown: the section's text between its markers (set by :func:`run_report`).
        images: PNGs that the text links, as paths beside the Markdown file.
    """

    name: str
    commands: list[list[str]]
    markdown: str = ""
    images: list[Path] = field(default_factory=list)


def _shown(argv: Sequence[str]) -> str:
    return shlex.join(["nystromer", *argv])


def _lra_args(lra_run: str | os.PathLike[str] | None) -> list[str]:
    return [] if lra_run is None else ["--lra-run", str(lra_run)]


def gpu_commands(results_dir: str | os.PathLike[str], device: str = "cuda") -> list[list[str]]:
    """``bench speed`` on CUDA in bfloat16 and float32, n = 512 … 131,072, into
    ``results_dir/<dtype>/``."""
    lengths = ",".join(map(str, GPU_LENGTHS))
    return [
        ["bench", "speed", "--device", device, "--dtype", dtype, "--lengths", lengths]
        + ["--out", str(Path(results_dir) / dtype)]
        for dtype in GPU_DTYPES
    ]


def report_commands(
    out: str | os.PathLike[str],
    *,
    quick: bool = False,
    lra_run: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    with_lra: bool = True,
) -> dict[str, list[list[str]]]:
    """The ``nystromer`` commands of each CPU section (the GPU section's: :func:`gpu_commands`).

    Args:
        out: folder that receives each command's outputs.
        quick: tiny sizes (a few seconds in all) instead of the full benchmark.
        lra_run: LRA run directory for the ``lra`` inputs (None: the commands' default).
        threads: torch threads of the timed sections (None: torch's default).
        with_lra: False leaves out the inputs of a trained LRA model (when there is none).
    """
    commands = _commands(Path(out), quick, _lra_args(lra_run), threads)
    if not with_lra:
        commands["approx"][0][2:2] = ["--sources", "random,lm"]
        commands["viz"] = commands["viz"][:1]
    return commands


def _commands(out: Path, quick: bool, lra: list[str], threads: int | None) -> dict:
    timing = [] if threads is None else ["--threads", str(threads)]
    if not quick:
        return {
            "table": [["bench", "table", *timing, "--out", str(out / "table1")]],
            "speed": [
                ["bench", "speed", "--device", "cpu", "--dtype", "float32", *timing]
                + ["--out", str(out / "speed")]
            ],
            "approx": [["bench", "approx", *lra, "--out", str(out / "approx")]],
            "viz": [
                ["viz", "attention", "--out", str(out / "attention.png")],
                ["viz", "attention", "--source", "lra", "--num-landmarks", "64", *lra]
                + ["--window", "384", "--out", str(out / "attention_lra.png")],
            ],
        }
    timing = _QUICK_TIMING if threads is None else ["--threads", str(threads), "--repeats", "1"]
    return {
        "table": [
            ["bench", "table", "--lengths", "64", "--impl", "exact-matmul,nystromer"]
            + [*_QUICK_PROBLEM, *timing, "--out", str(out / "table1")]
        ],
        "speed": [
            ["bench", "speed", "--lengths", "64,128", "--impl", "nystromer,exact"]
            + [*_QUICK_PROBLEM, *timing, "--no-backward", "--out", str(out / "speed")]
        ],
        "approx": [
            ["bench", "approx", "--seq-len", "128", *_QUICK_PROBLEM, "--landmarks", "8,16,32"]
            + ["--iterations", "1,6", "--model-seq-len", "64", "--model-source", "random-bert"]
            + [*lra, "--out", str(out / "approx")]
        ],
        "viz": [
            ["viz", "attention", "--seq-len", "64", "--num-landmarks", "8"]
            + ["--out", str(out / "attention.png")],
            ["viz", "attention", "--source", "lra", "--num-landmarks", "16", *lra]
            + ["--window", "48", "--out", str(out / "attention_lra.png")],
        ],
    }


# --- rendering --------------------------------------------------------------------------------


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def _link(image: Path, docs: Path, alt: str) -> str:
    rel = os.path.relpath(image, docs.parent).replace(os.sep, "/")
    return f"![{alt}]({rel})"


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "—" if value is None else format(value, spec)


def _stop_notes(report: dict) -> list[str]:
    notes = []
    for impl, results in report["results"].items():
        found = [r["note"] for r in results if r["status"] != "ok" and r["note"]]
        if found:
            notes.append(f"{impl}: {found[0]}")
    return notes


def _speed_body(report: dict) -> list[str]:
    """Tables of one :func:`~nystromer.bench.speed.run_speed` report (no heading)."""
    base = report["base"]
    impls = list(report["curves"])
    lengths = report["lengths"]
    backward = any(v is not None for c in report["curves"].values() for v in c["backward_ms"])
    lines = [
        f"Batch {base['batch']}, {base['heads']} heads × {base['head_dim']}, m = "
        f"{base['num_landmarks']}, {base['pinv_iterations']} pinv iterations, {base['dtype']}, "
        f"{base['device']}; median of {base['repeats']} calls after {base['warmup']} warm-up; "
        "peak memory above the inputs, fresh process per measurement. "
        + ("Cells: forward / forward+backward." if backward else "Forward only."),
        "",
    ]
    for title, metrics, spec in (
        ("time (ms)", ("forward_ms", "backward_ms"), ",.1f"),
        ("peak memory (MiB)", ("forward_peak_mib", "backward_peak_mib"), ",.1f"),
    ):
        lines += [
            "| n | " + " | ".join(f"{impl} {title}" for impl in impls) + " |",
            "|--:|" + "--:|" * len(impls),
        ]
        for i, n in enumerate(lengths):
            cells = []
            for impl in impls:
                curve = report["curves"][impl]
                first = _fmt(curve[metrics[0]][i], spec)
                cells.append(first + (f" / {_fmt(curve[metrics[1]][i], spec)}" if backward else ""))
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
        lines.append("")
    names = {
        "forward_ms": "fwd time",
        "backward_ms": "fwd+bwd time",
        "forward_peak_mib": "fwd memory",
        "backward_peak_mib": "fwd+bwd memory",
    }
    shown = [m for m in names if backward or not m.startswith("backward")]
    lines += [
        "Fitted scaling exponent (slope of log value against log n over the larger half of "
        "the measured n; ours should be ≈ 1, exact attention's time ≈ 2):",
        "",
        "| implementation | " + " | ".join(names[m] for m in shown) + " |",
        "|---|" + "--:|" * len(shown),
    ]
    for impl in impls:
        fits = report["scaling_exponents"][impl]
        lines.append(f"| {impl} | " + " | ".join(_fmt(fits[m], ".2f") for m in shown) + " |")
    lines.append("")
    cross = report.get("nystromer_beats_exact_from") or {}
    for metric, label in (("forward_ms", "forward"), ("backward_ms", "forward+backward")):
        if metric in cross and (backward or metric == "forward_ms"):
            n = cross[metric]
            lines.append(
                f"- nystromer is faster than exact attention ({label}) "
                + (f"from n = {n:,} on." if n is not None else "at none of the measured n.")
            )
    for note in _stop_notes(report):
        lines.append(f"- {note}")
    return lines


def render_speed(report: dict, command: str, images: Sequence[Path], docs: Path) -> str:
    """The CPU speed section from a ``speed.json`` report."""
    lines = [
        f"## {_TITLES['speed']}",
        "",
        f"Measured {report.get('date') or _today()} with `{command}`.",
        f"Machine: {report['machine_label']}.",
        "",
        *_speed_body(report),
        "",
        *(_link(p, docs, p.stem.replace("_", " ")) for p in images),
    ]
    return "\n".join(lines).rstrip() + "\n"


def render_table(report: dict, command: str, docs: Path) -> str:
    """The Table 1 section from a ``table1.json`` report."""
    from .speed import format_table1

    base = report["base"]
    return (
        "\n".join(
            [
                f"## {_TITLES['table']}",
                "",
                f"Measured {report.get('date') or _today()} with `{command}`.",
                f"Machine: {report['machine_label']}.",
                "",
                f"Forward (inference) peak memory above the inputs (MiB) and time (ms) per "
                f"instance: batch {base['batch']}, {base['heads']} heads × {base['head_dim']}, "
                f"m = {base['num_landmarks']}, {base['dtype']}. `exact-matmul` is the paper's "
                "Transformer (softmax(QKᵀ)·V materialised), `exact` torch SDPA, `nystromer` ours; "
                "the last two columns are the paper's numbers (1080Ti GPU, their whole attention "
                "layer), for the shape of the curves rather than the values.",
                "",
                format_table1(report),
            ]
        ).rstrip()
        + "\n"
    )


def render_approx(
    report: dict, command: str, machine: str, date: str, images: Sequence[Path], docs: Path
) -> str:
    """The approximation section from an ``approx.json`` report."""
    from .approx import format_implementation_table, format_sweep_tables

    lines = [
        f"## {_TITLES['approx']}",
        "",
        f"Measured {date} with `{command}`.",
        f"Machine: {machine}.",
        "",
        "Relative error ‖approx − exact‖_F / ‖exact‖_F of the attention output (real query rows "
        "only) on each input kind:",
        "",
    ]
    for kind, entry in report["sources"].items():
        lines.append(f"- `{kind}`: {entry['description']}")
    lines += [
        "",
        format_sweep_tables(report),
        "",
        *(_link(p, docs, p.stem.replace("_", " ")) for p in images),
        "",
        "Every Nyström implementation on the same inputs. *unpadded*: sample 0 alone (n a "
        "multiple of m); *n not multiple of m*: its first n − m/2 tokens; *padded sample*: a "
        "batch of sample 0 and a right-padded sample 1 (the `lra` inputs: a shorter ListOps "
        "example with the model's own padding tokens), error of sample 1 against exact "
        "attention over its real tokens; *full sample, padded batch*: sample 0 in that batch; "
        "*batch coupling*: how much sample 0's output moves when sample 1 is scaled by 3 "
        "(0 when samples are independent). docs/design.md (what the other implementations do) "
        "explains the peers' masking defects these numbers show.",
        "",
        format_implementation_table(report),
    ]
    return "\n".join(lines).rstrip() + "\n"


def render_viz(
    found: Sequence[dict],
    commands: Sequence[str],
    machine: str,
    date: str,
    images: Sequence[Path],
    docs: Path,
) -> str:
    """The attention-matrix section from the ``viz attention`` JSON side files."""
    lines = [f"## {_TITLES['viz']}", ""]
    for info, command, image in zip(found, commands, images, strict=True):
        lines += [
            f"Drawn {date} with `{command}` ({machine}): {info['title']}; m = "
            f"{info['num_landmarks']}, {info['pinv_iterations']} pinv iterations, relative "
            f"error of the matrix {info['relative_error']:.3f}.",
            "",
            _link(image, docs, image.stem.replace("_", " ")),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _gpu_results(results_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(results_dir.glob("*/speed.json")):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if str(report.get("machine", {}).get("device", "")).startswith("cuda"):
            found.append((path, report))
    return found


def render_gpu(results_dir: Path, docs: Path) -> str:
    """The GPU section: CUDA ``speed.json`` results under ``results_dir/*/``, or the commands.

    Plots missing beside a result are drawn from its JSON.
    """
    from .speed import write_speed_outputs

    commands = [_shown(c) for c in gpu_commands(results_dir)]
    lines = [f"## {_TITLES['gpu']}", ""]
    found = _gpu_results(results_dir)
    if not found:
        lines += [
            "Not measured yet: no CUDA results under "
            f"`{results_dir}/`. On a machine with a CUDA GPU "
            "(torch built for CUDA), run",
            "",
            "```",
            *commands,
            "```",
            "",
            "then `make bench` (or `nystromer bench report --only gpu`) renders them here, "
            "naming the device. `make bench` runs them itself when CUDA is available.",
        ]
        return "\n".join(lines) + "\n"
    for path, report in found:
        folder = path.parent
        images = [folder / "speed_time.png", folder / "speed_memory.png"]
        if not all(p.is_file() for p in images):
            write_speed_outputs(report, folder)
        machine = report["machine"]
        device = machine.get("gpu") or machine["device"]
        command = report.get("command") or "nystromer bench speed (command not recorded)"
        lines += [
            f"### {device}, {report['base']['dtype']}",
            "",
            f"Measured {report.get('date') or 'on an unrecorded date'} with `{command}`.",
            f"Machine: {report['machine_label']}.",
            "",
            *_speed_body(report),
            "",
            *(_link(p, docs, f"{device} {p.stem.replace('_', ' ')}") for p in images),
            "",
        ]
    lines += ["Commands that produce these results:", "", "```", *commands, "```"]
    return "\n".join(lines).rstrip() + "\n"


def write_docs_section(path: str | os.PathLike[str], name: str, markdown: str) -> None:
    """Write or replace section ``name`` between its markers; append it when they are absent.

    Everything outside the markers is kept byte for byte. The file is replaced atomically.
    """
    if name not in REPORT_SECTIONS:
        raise ValueError(f"name must be one of {REPORT_SECTIONS}, got {name!r}")
    replace_section(path, _begin(name), _end(name), markdown, new_file="# Benchmarks\n")


# --- running ----------------------------------------------------------------------------------


def _run_command(argv: list[str], say: Callable[[str], None]) -> None:
    say(f"$ {_shown(argv)}")
    sys.stdout.flush()
    code = subprocess.run([sys.executable, "-m", "nystromer", *argv]).returncode
    if code != 0:
        raise RuntimeError(f"`{_shown(argv)}` exited with {code}")


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _out_arg(argv: Sequence[str]) -> Path:
    return Path(argv[list(argv).index("--out") + 1])


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _build_section(
    name: str, commands: list[list[str]], docs: Path, images_dir: Path, gpu_dir: Path
) -> ReportSection:
    """Render one section from the outputs its commands wrote."""
    from .._machine import machine_info, machine_label

    section = ReportSection(name, commands)
    shown = [_shown(c) for c in commands]
    if name == "gpu":
        section.markdown = render_gpu(gpu_dir, docs)
        return section
    out = _out_arg(commands[0])
    if name == "table":
        section.markdown = render_table(_load(out / "table1.json"), shown[0], docs)
    elif name == "speed":
        report = _load(out / "speed.json")
        section.images = [
            _copy(out / f"speed_{kind}.png", images_dir / f"speed_{kind}.png")
            for kind in ("time", "memory")
        ]
        section.markdown = render_speed(report, shown[0], section.images, docs)
    elif name == "approx":
        report = _load(out / "approx.json")
        section.images = [
            _copy(out / f"approx_{kind}.png", images_dir / f"approx_{kind}.png")
            for kind in ("landmarks", "iterations")
        ]
        machine = machine_label(machine_info("cpu"))
        section.markdown = render_approx(report, shown[0], machine, _today(), section.images, docs)
    elif name == "viz":
        found = [_load(_out_arg(c).with_suffix(".json")) for c in commands]
        section.images = [_copy(_out_arg(c), images_dir / _out_arg(c).name) for c in commands]
        machine = machine_label(machine_info("cpu"))
        section.markdown = render_viz(found, shown, machine, _today(), section.images, docs)
    return section


def run_report(
    *,
    out: str | os.PathLike[str] = Path("bench-out/report"),
    docs: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    gpu_dir: str | os.PathLike[str] | None = None,
    quick: bool = False,
    only: Sequence[str] | None = None,
    lra_run: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    run_gpu: bool | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, ReportSection | str]:
    """Run the benchmark commands and write their sections into the Markdown file.

    Args:
        out: folder for the commands' own outputs (JSON, CSV, PNG).
        docs: the Markdown file (default: ``docs/benchmarks.md``; with ``quick``:
            ``out/benchmarks.md``, so tiny numbers never land in the real docs by accident).
        images_dir: where the linked PNGs are copied (default: ``bench/`` beside ``docs``).
        gpu_dir: where CUDA results are looked for (default: ``images_dir/gpu``).
        quick: tiny sizes, seconds in all.
        only: run and write only these sections (default: all of :data:`REPORT_SECTIONS`).
        lra_run: LRA run directory for the ``lra`` inputs (default: the commands' own choice;
            without a trained model there, the LRA inputs are left out).
        threads: torch threads of the timed sections.
        run_gpu: run the GPU commands first (default: when CUDA is available and not quick).
        progress: called with progress lines (None: silent).

    Returns:
        Section name → the written :class:`ReportSection`, or the error message of a section
        that failed (its markers are then left as they were).
    """
    say = progress or (lambda _line: None)
    sections = list(REPORT_SECTIONS if only is None else only)
    unknown = [s for s in sections if s not in REPORT_SECTIONS]
    if unknown or not sections:
        raise ValueError(f"only must name some of {REPORT_SECTIONS}, got {list(sections)!r}")
    out = Path(out)
    docs = Path(docs) if docs is not None else (out / "benchmarks.md" if quick else DEFAULT_DOCS)
    images_dir = Path(images_dir) if images_dir is not None else docs.parent / "bench"
    gpu_dir = Path(gpu_dir) if gpu_dir is not None else images_dir / "gpu"
    with_lra = True
    if lra_run is None and {"approx", "viz"} & set(sections):
        from .lra_inputs import resolve_lra_run

        try:
            resolve_lra_run(None)
        except ValueError as exc:
            with_lra = False
            say(f"the sections leave out the inputs of a trained LRA model: {exc}")
    commands = report_commands(
        out, quick=quick, lra_run=lra_run, threads=threads, with_lra=with_lra
    )
    if run_gpu is None:
        import torch

        run_gpu = not quick and torch.cuda.is_available()
    commands["gpu"] = gpu_commands(gpu_dir) if run_gpu else []
    done: dict[str, ReportSection | str] = {}
    for name in [s for s in REPORT_SECTIONS if s in sections]:
        say(f"== {name} ==")
        try:
            for argv in commands[name]:
                _run_command(argv, say)
            section = _build_section(name, commands[name], docs, images_dir, gpu_dir)
            write_docs_section(docs, name, section.markdown)
        except Exception as exc:  # one failed section must not lose the others' hours
            traceback.print_exc()
            done[name] = f"{type(exc).__name__}: {exc}"
            say(f"section {name} FAILED: {done[name]}")
            continue
        done[name] = section
        say(f"wrote the {name} section of {docs}")
    return done


def _report_command(args: argparse.Namespace) -> int:
    done = run_report(
        out=args.out
        if args.out is not None
        else Path("bench-out/report-quick" if args.quick else "bench-out/report"),
        docs=args.docs,
        images_dir=args.images,
        gpu_dir=args.gpu_results,
        quick=args.quick,
        only=args.only,
        lra_run=args.lra_run,
        threads=args.threads,
        run_gpu=args.run_gpu,
    )
    failed = {k: v for k, v in done.items() if isinstance(v, str)}
    for name, message in failed.items():
        print(f"FAILED {name}: {message}", file=sys.stderr)
    return 1 if failed else 0


def register_report(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``nystromer bench report`` to the ``bench`` sub-parsers."""
    r = bench_sub.add_parser(
        "report",
        help="run every benchmark and regenerate docs/benchmarks.md (make bench)",
        description="Run bench table, bench speed (CPU; CUDA too when available), bench approx "
        "and viz attention, each into a folder under --out, and write their sections with "
        "plots into the Markdown file between marker comments.",
    )
    r.add_argument("--quick", action="store_true", help="tiny sizes: the pipeline in seconds")
    r.add_argument("--out", type=Path, help="command outputs (default: bench-out/report[-quick])")
    r.add_argument(
        "--docs",
        type=Path,
        help=f"Markdown file to update (default: {DEFAULT_DOCS}; with --quick: OUT/benchmarks.md)",
    )
    r.add_argument("--images", type=Path, help="where plots are copied (default: DOCS_DIR/bench)")
    r.add_argument(
        "--gpu-results", type=Path, help="CUDA speed results to render (default: IMAGES/gpu)"
    )
    r.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated sections to run, from {','.join(REPORT_SECTIONS)} (default: all)",
    )
    r.add_argument("--lra-run", type=Path, help="LRA run for the lra inputs (default: see approx)")
    r.add_argument("--threads", type=int, help="torch threads of the timed sections")
    gpu = r.add_mutually_exclusive_group()
    gpu.add_argument(
        "--run-gpu",
        dest="run_gpu",
        action="store_true",
        default=None,
        help="run the CUDA speed commands (default: when CUDA is available, not with --quick)",
    )
    gpu.add_argument("--no-run-gpu", dest="run_gpu", action="store_false")
    r.set_defaults(func=_report_command)
