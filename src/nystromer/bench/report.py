"""``nystromer bench report`` (``make bench``): run the benchmark commands as a user types
them and write each one's section of docs/benchmarks.md between its marker comments: command,
date, machine, the Markdown its own module renders from its JSON, and the plots, copied to
``docs/bench/``. docs/benchmarks.md lists the commands and how GPU results get in.
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
from pathlib import Path

from .._io import atomic_path
from .._markdown import replace_section

__all__ = [
    "REPORT_SECTIONS",
    "GPU_DTYPES",
    "GPU_LENGTHS",
    "DEFAULT_DOCS",
    "report_commands",
    "gpu_commands",
    "run_report",
    "render_gpu",
    "write_docs_section",
    "register_report",
]

_SPEED_PLOTS = ("speed_time.png", "speed_memory.png")
_APPROX_PLOTS = ("approx_landmarks.png", "approx_iterations.png")
#: Per section, in the order they appear in the Markdown file: its title, and the JSON its
#: command writes and the plots it shows (viz: its commands' own files; gpu: see render_gpu).
_SECTIONS = {
    "table": ("Table 1 form: memory and time per instance", "table1.json", ()),
    "speed": ("Speed and memory against n (CPU, float32)", "speed.json", _SPEED_PLOTS),
    "gpu": ("GPU", None, ()),
    "approx": ("Approximation error", "approx.json", _APPROX_PLOTS),
    "viz": ("Attention matrices", None, ()),
}
REPORT_SECTIONS = tuple(_SECTIONS)
GPU_DTYPES = ("bfloat16", "float32")
GPU_LENGTHS = tuple(512 * 2**i for i in range(9))  # 512 … 131,072
DEFAULT_DOCS = Path("docs/benchmarks.md")
# Tiny sizes for --quick, put before the section's first command's --out: seconds in all.
_QUICK_PROBLEM = ["--heads", "2", "--head-dim", "16", "--num-landmarks", "16"]
_QUICK = {
    "table": ["--lengths", "64", "--impl", "exact-matmul,nystromer", *_QUICK_PROBLEM],
    "speed": ["--lengths", "64,128", "--impl", "nystromer,exact", *_QUICK_PROBLEM, "--no-backward"],
    "approx": ["--seq-len", "128", *_QUICK_PROBLEM, "--landmarks", "8,16,32", "--iterations", "1,6"]
    + ["--model-seq-len", "64", "--model-source", "random-bert"],
    "viz": ["--seq-len", "64", "--num-landmarks", "8"],
}


def _shown(argv: Sequence[str]) -> str:
    return shlex.join(["nystromer", *argv])


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
    """The ``nystromer`` commands of each CPU section (the GPU section's: :func:`gpu_commands`),
    writing into ``out``: with ``quick`` at tiny sizes, ``lra_run`` for the ``lra`` inputs (None:
    the commands' default; ``with_lra=False`` leaves those inputs out), ``threads`` torch
    threads in the timed sections (None: torch's default; 1 with ``quick``)."""
    out = Path(out)
    lra = [] if lra_run is None else ["--lra-run", str(lra_run)]
    threads = 1 if quick and threads is None else threads
    timing = [] if threads is None else ["--threads", str(threads)]
    timing += ["--repeats", "1"] if quick else []
    lra_view = ["--num-landmarks", "16", "--window", "48"] if quick else ["--num-landmarks", "64"]
    commands = {
        "table": [["bench", "table", *timing, "--out", str(out / "table1")]],
        "speed": [
            ["bench", "speed", "--device", "cpu", "--dtype", "float32", *timing]
            + ["--out", str(out / "speed")]
        ],
        "approx": [["bench", "approx", *lra, "--out", str(out / "approx")]],
        "viz": [
            ["viz", "attention", "--out", str(out / "attention.png")],
            ["viz", "attention", "--source", "lra", *lra_view, *lra]
            + [*([] if quick else ["--window", "384"]), "--out", str(out / "attention_lra.png")],
        ],
    }
    for name, extra in (_QUICK if quick else {}).items():
        commands[name][0][-2:-2] = extra  # before --out
    if not with_lra:
        commands["approx"][0][2:2] = ["--sources", "random,lm"]
        commands["viz"] = commands["viz"][:1]
    return commands


# --- rendering --------------------------------------------------------------------------------


def _link(image: Path, docs: Path, alt: str) -> str:
    rel = os.path.relpath(image, docs.parent).replace(os.sep, "/")
    return f"![{alt}]({rel})"


def _measured(heading: str, report: dict, command: str, body: str, links: list[str]) -> list[str]:
    """One command's result: heading, command, date, machine, its Markdown, the plots."""
    date = report.get("date") or "on an unrecorded date"
    machine = f"Machine: {report['machine_label']}."
    return [heading, "", f"Measured {date} with `{command}`.", machine, "", body, "", *links, ""]


def render_gpu(results_dir: Path, docs: Path) -> str:
    """The GPU section: CUDA ``speed.json`` results under ``results_dir/*/`` (plots missing
    beside one are drawn from it), or the commands that make them."""
    from .speed import format_speed, write_speed_outputs

    commands = ["```", *(_shown(c) for c in gpu_commands(results_dir)), "```"]
    lines = [f"## {_SECTIONS['gpu'][0]}", ""]
    found = [(path, _load(path)) for path in sorted(results_dir.glob("*/speed.json"))]
    found = [(p, r) for p, r in found if r.get("machine", {}).get("device", "").startswith("cuda")]
    if not found:
        lines += [
            f"Not measured yet: no CUDA results under `{results_dir}/`. On a machine with a "
            "CUDA GPU (torch built for CUDA), run",
            "",
            *commands,
            "",
            "then `make bench` (or `nystromer bench report --only gpu`) renders them here, "
            "naming the device. `make bench` runs them itself when CUDA is available.",
        ]
        return "\n".join(lines) + "\n"
    for path, report in found:
        images = [path.parent / name for name in _SPEED_PLOTS]
        if not all(p.is_file() for p in images):
            write_speed_outputs(report, path.parent)
        device = report["machine"].get("gpu") or report["machine"]["device"]
        command = report.get("command") or "nystromer bench speed (command not recorded)"
        links = [_link(p, docs, f"{device} {p.stem.replace('_', ' ')}") for p in images]
        heading = f"### {device}, {report['base']['dtype']}"
        lines += _measured(heading, report, command, format_speed(report), links)
    lines += ["Commands that produce these results:", "", *commands]
    return "\n".join(lines).rstrip() + "\n"


def write_docs_section(path: str | os.PathLike[str], name: str, markdown: str) -> None:
    """Write or replace section ``name`` between its markers, appended when they are absent;
    the rest of the file is kept byte for byte."""
    if name not in REPORT_SECTIONS:
        raise ValueError(f"name must be one of {REPORT_SECTIONS}, got {name!r}")
    begin = f"<!-- bench-report:{name}:begin (written by nystromer bench report) -->"
    end = f"<!-- bench-report:{name}:end -->"
    replace_section(path, begin, end, markdown, new_file="# Benchmarks\n")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _build_section(
    name: str, commands: list[list[str]], docs: Path, images_dir: Path, gpu_dir: Path
) -> str:
    """Render one section from the outputs its commands wrote; plots are copied beside docs."""
    from .approx import format_approx
    from .speed import format_speed, format_table1

    if name == "gpu":
        return render_gpu(gpu_dir, docs)
    title, saved, plots = _SECTIONS[name]
    outs = [Path(argv[argv.index("--out") + 1]) for argv in commands]
    pngs = outs if name == "viz" else [outs[0] / image for image in plots]
    links = []
    for png in pngs:
        with atomic_path(images_dir / png.name) as tmp:
            shutil.copyfile(png, tmp)
        links.append(_link(images_dir / png.name, docs, png.stem.replace("_", " ")))
    shown = [_shown(c) for c in commands]
    lines = [f"## {title}", ""]
    if name == "viz":
        for out, command, link in zip(outs, shown, links, strict=True):
            info = _load(out.with_suffix(".json"))
            drawn = (
                f"Drawn {info['date']} with `{command}` ({info['machine_label']}): "
                f"{info['title']}; m = {info['num_landmarks']}, {info['pinv_iterations']} pinv "
                f"iterations, relative error of the matrix {info['relative_error']:.3f}."
            )
            lines += [drawn, "", link, ""]
    else:
        report = _load(outs[0] / saved)
        body = {"table": format_table1, "speed": format_speed, "approx": format_approx}[name]
        lines = _measured(lines[0], report, shown[0], body(report), links)
    return "\n".join(lines).rstrip() + "\n"


# --- running ----------------------------------------------------------------------------------


def run_report(
    *,
    out: str | os.PathLike[str] | None = None,
    docs: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    gpu_dir: str | os.PathLike[str] | None = None,
    quick: bool = False,
    only: Sequence[str] | None = None,
    lra_run: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    run_gpu: bool | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, str | None]:
    """Run the commands of the sections ``only`` names (default: all) into ``out`` (default
    ``bench-out/report``, ``-quick`` with ``quick``: tiny sizes) and write the sections into
    ``docs`` (default ``docs/benchmarks.md``; with ``quick``, ``out/benchmarks.md``), the plots
    into ``images_dir`` (default ``bench/`` beside docs); CUDA results are read from ``gpu_dir``
    (default ``images_dir/gpu``), and with ``run_gpu`` (default: CUDA available and not quick)
    measured first. Without a trained model at ``lra_run`` (default: the commands' own choice)
    the LRA inputs are left out. ``progress`` gets progress lines (None: silent). Returns
    section name → None when written, else why it failed (its markers left as they were)."""
    say = progress or (lambda _line: None)
    sections = list(REPORT_SECTIONS if only is None else only)
    if not sections or not set(sections) <= set(REPORT_SECTIONS):
        raise ValueError(f"only must name some of {REPORT_SECTIONS}, got {list(sections)!r}")
    out = Path(out or f"bench-out/report{'-quick' if quick else ''}")
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
    done: dict[str, str | None] = {}
    for name in [s for s in REPORT_SECTIONS if s in sections]:
        say(f"== {name} ==")
        try:
            for argv in commands[name]:
                say(f"$ {_shown(argv)}")
                sys.stdout.flush()
                code = subprocess.run([sys.executable, "-m", "nystromer", *argv]).returncode
                if code != 0:
                    raise RuntimeError(f"`{_shown(argv)}` exited with {code}")
            section = _build_section(name, commands[name], docs, images_dir, gpu_dir)
            write_docs_section(docs, name, section)
            done[name] = None
            say(f"wrote the {name} section of {docs}")
        except Exception as exc:
            traceback.print_exc()
            done[name] = f"{type(exc).__name__}: {exc}"
            say(f"section {name} FAILED: {done[name]}")
    return done


def _report_command(args: argparse.Namespace) -> int:
    from .._args import call_with

    done = call_with(run_report, args, images_dir=args.images, gpu_dir=args.gpu_results)
    failed = {name: why for name, why in done.items() if why is not None}
    for name, why in failed.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def register_report(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``nystromer bench report`` to the ``bench`` sub-parsers."""
    from .._args import file_to_write, folder, int_at_least, names_from

    r = bench_sub.add_parser(
        "report",
        help="run table, speed, approx and viz and rewrite their sections of docs/benchmarks.md "
        "(make bench)",
        description="Run bench table, bench speed (CPU; CUDA too when available), bench approx "
        "and viz attention, each into a folder under --out, and write their sections with "
        "plots into the Markdown file between marker comments.",
    )
    r.add_argument("--quick", action="store_true", help="tiny sizes: the pipeline in seconds")
    docs_help = (
        f"Markdown file to update (default: {DEFAULT_DOCS}; with --quick: OUT/benchmarks.md)"
    )
    for flag, type_, help in (
        ("--out", folder, "command outputs (default: bench-out/report[-quick])"),
        ("--docs", file_to_write, docs_help),
        ("--images", folder, "where plots are copied (default: DOCS_DIR/bench)"),
        ("--gpu-results", Path, "CUDA speed results to render (default: IMAGES/gpu)"),
        ("--lra-run", Path, "LRA run for the lra inputs (default: see approx)"),
    ):
        r.add_argument(flag, type=type_, help=help)
    r.add_argument(
        "--only",
        type=names_from(REPORT_SECTIONS, "sections"),
        help=f"comma-separated sections to run, from {','.join(REPORT_SECTIONS)} (default: all)",
    )
    r.add_argument("--threads", type=int_at_least(1), help="torch threads of the timed sections")
    r.add_argument(
        "--run-gpu",
        action=argparse.BooleanOptionalAction,
        help="run the CUDA speed commands (default: when CUDA is available, not with --quick)",
    )
    r.set_defaults(func=_report_command)
