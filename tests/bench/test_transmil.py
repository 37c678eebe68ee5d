"""``nystromer bench transmil`` end to end at a tiny size: the JSON, the Markdown table, the
plot and the docs section are written (no timing assertions), and the runners compute what
the section says they do."""

from __future__ import annotations

import json

import pytest
import torch

from nystromer.bench.measure import CaseSpec
from nystromer.bench.transmil import (
    BEGIN,
    END,
    LayerOptions,
    _build,
    format_section,
    registered_layers,
)
from nystromer.cli import main

pytest.importorskip("nystrom_attention")

TINY = [
    "--lengths", "300", "--dim", "64", "--heads", "2", "--dim-head", "32", "-m", "16",
    "--conv-kernel", "5", "--repeats", "1", "--warmup", "0", "--timeout", "300",
]  # fmt: skip


def test_command_writes_json_table_plot_and_docs(tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nkept\n\n{BEGIN}\nold\n{END}\n\ntail\n", encoding="utf-8")
    # A limit far below the package's 2 × 304² float32 matrix skips its heatmap (one worker
    # fewer) and shows the note.
    argv = ["bench", "transmil", *TINY, "--package-heatmap-limit-gb", "1e-6"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--write-docs", str(docs)]) == 0
    report = json.loads((tmp_path / "out" / "transmil.json").read_text(encoding="utf-8"))
    (row,) = report["rows"]
    assert row["seq_len"] == 300 and report["settings"]["dim"] == 64
    for label in ("nystromer", "nystrom-attention"):
        layer = row[label]["layer"]
        assert layer["status"] == "ok", layer["note"]
        assert layer["forward_ms"] > 0 and layer["backward_ms"] > 0
        assert layer["forward_peak_mib"] >= 0 and layer["backward_peak_mib"] >= 0
    assert row["nystromer"]["heatmap"]["status"] == "ok"
    # The heatmap alone is ours only; its ratio is against the package's heatmap.
    assert row["nystromer"]["map"]["status"] == "ok" and row["nystromer"]["map"]["forward_ms"] > 0
    assert row["nystrom-attention"]["map"]["status"] == "skipped"
    assert row["ratios"]["map_forward_ms"] is None  # the package's heatmap was skipped here
    skipped = row["nystrom-attention"]["heatmap"]
    assert skipped["status"] == "skipped"
    assert skipped["note"].startswith("skipped (n×n would need 0.0 GB)")
    assert row["ratios"]["layer_forward_ms"] is not None
    assert row["ratios"]["heatmap_forward_ms"] is None

    table = (tmp_path / "out" / "transmil.md").read_text(encoding="utf-8")
    assert "| 300 |" in table and "skipped" in table and "--dim 64" in table
    assert "alone ours ms" in table and "without its forward" not in table
    assert (tmp_path / "out" / "transmil.png").stat().st_size > 0
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nkept\n\n") and text.endswith(f"{END}\n\ntail\n")
    assert "old" not in text and "![TransMIL layer](bench/transmil.png)" in text
    assert (tmp_path / "bench" / "transmil.png").is_file()
    assert table.strip() in text

    # --from-json measures nothing and renders the same table.
    capsys.readouterr()
    again = tmp_path / "again"
    src = str(tmp_path / "out" / "transmil.json")
    assert main(["bench", "transmil", "--from-json", src, "--out", str(again)]) == 0
    assert (again / "transmil.md").read_text(encoding="utf-8") == table
    assert format_section(report) in capsys.readouterr().out


def test_runners_share_weights_and_return_the_class_token_rows():
    # n a multiple of m: no front padding, so the package's class-token row is its row 0.
    spec = CaseSpec("exact", heads=2, head_dim=8, seq_len=104, num_landmarks=8)
    options = LayerOptions(dim=16, conv_kernel=3)
    with registered_layers(options):
        ours = _build(spec.config(), options, "nystromer", "heatmap", seed=0)
        alone = _build(spec.config(), options, "nystromer", "map", seed=0)
        package = _build(spec.config(), options, "nystrom-attention", "heatmap", seed=0)
    for name, tensor in package.layer.state_dict().items():
        assert torch.equal(ours.layer.state_dict()[name], tensor), name
    (x,) = ours.prepare(*torch.zeros(3, 1, 2, 104, 8), None)
    assert x.shape == (1, 104, 16)
    with torch.no_grad():
        # In the package's numerics ours reproduces the package, so the two heatmap rows
        # (ours at row 0, the package's at its padded position) must agree.
        # The heatmap alone (attention_map, default numerics) is the default forward's row.
        default, without_forward = ours.run(x), alone.run(x)
        ours.layer.numerics = "lucidrains"
        mine, theirs = ours.run(x), package.run(x)
    assert mine.shape == theirs.shape == default.shape == without_forward.shape == (1, 2, 104)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(without_forward, default, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [104, 100])  # n a multiple of m, and not (the package pads)
def test_layer_runners_compute_the_same_layer_forward_and_backward(n):
    # The forward and forward+backward columns compare the package's layer with ours on the
    # same weights and input: in the package's numerics ours must give the package's output
    # and the gradients of x and of every parameter, so that both do the same work.
    spec = CaseSpec("exact", heads=2, head_dim=8, seq_len=n, num_landmarks=8)
    options = LayerOptions(dim=16, conv_kernel=3)
    with registered_layers(options):
        ours = _build(spec.config(), options, "nystromer", "layer", seed=0)
        package = _build(spec.config(), options, "nystrom-attention", "layer", seed=0)
    shape = (1, 2, n, 8)
    (x,) = package.prepare(*torch.zeros(3, *shape), None)
    torch.testing.assert_close(ours.prepare(*torch.zeros(3, *shape), None)[0], x, rtol=0, atol=0)
    grad = torch.randn(ours.output_shape(*shape), generator=torch.Generator().manual_seed(1))

    def forward_backward(runner):
        x_ = x.clone().requires_grad_()
        out = runner.run(x_)
        out.backward(grad)
        params = {name: p.grad for name, p in runner.layer.named_parameters()}
        return out.detach(), x_.grad, params

    with torch.no_grad():
        default = ours.run(x)
    ours.layer.numerics = "lucidrains"
    mine, theirs = forward_backward(ours), forward_backward(package)
    # float32, the same operations in another order: rounding only (measured ~1e-7 relative).
    for a, b in zip(mine[:2], theirs[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert mine[2].keys() == theirs[2].keys() and len(mine[2]) == 4  # to_qkv, to_out, res_conv
    for name, g in theirs[2].items():
        torch.testing.assert_close(mine[2][name], g, rtol=1e-4, atol=1e-5, msg=name)
    # Ours by default differs by design (no zero tokens padded in front, pinv scale per
    # matrix), but computes the same layer: close to the package where it pads nothing.
    error = float((default - theirs[0]).norm() / theirs[0].norm())
    assert error < (1e-3 if n % 8 == 0 else 0.1), error
