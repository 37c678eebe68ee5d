"""The implementation registry: every entry computes the attention it claims to, on tiny sizes."""

from __future__ import annotations

import pytest
import torch

from nystromer.bench.implementations import (
    IMPLEMENTATIONS,
    PEERS,
    AttentionConfig,
    available_implementations,
    get_implementation,
    naive_nystrom_attention,
    unavailable_reason,
)
from nystromer.bench.inputs import padding_mask, random_qkv, relative_error
from tests.reference import exact_attention

B, H, N, D, M = 2, 2, 96, 8, 16


def _qkv(batch=B, heads=H, n=N, seed=0):
    return random_qkv(batch, heads, n, D, style="structured", dtype=torch.float64, seed=seed)


def _config(n=N, heads=H):
    return AttentionConfig(heads, D, n, M, 6, "cpu", torch.float64)


def test_registry_lists_ours_references_and_peers():
    assert {"nystromer", "naive", "exact", "exact-matmul"} <= set(available_implementations())
    assert set(PEERS) == {"nystrom-attention", "transformers"}
    assert all(IMPLEMENTATIONS[p].is_peer for p in PEERS)
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        get_implementation("nope")


def test_naive_formula_equals_fused_in_float64():
    q, k, v = _qkv()
    fused = get_implementation("nystromer").build(_config())(q, k, v)
    naive = get_implementation("naive").build(_config())(q, k, v)
    # Same math in another evaluation order: float64 rounding only (~1e-16 relative).
    torch.testing.assert_close(naive, fused, rtol=1e-10, atol=1e-12)

    mask = padding_mask(B, N, 0.2)
    fused = get_implementation("nystromer").build(_config())(q, k, v, mask)
    naive = naive_nystrom_attention(q, k, v, num_landmarks=M, mask=mask)
    torch.testing.assert_close(naive, fused, rtol=1e-10, atol=1e-12)
    assert naive[~mask[:, None, :, None].expand_as(naive)].abs().max() == 0


def test_naive_refuses_samples_with_too_few_real_tokens():
    q, k, v = _qkv()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :M] = True
    with pytest.raises(ValueError, match="mask: every sample needs more than"):
        naive_nystrom_attention(q, k, v, num_landmarks=M, mask=mask)


def test_plain_runs_the_definition_without_the_cpu_speed_ups(monkeypatch):
    import nystromer._cpu as cpu

    calls = []
    for name in ("shared_segment_means", "segment_means", "attention_by_row_blocks"):
        original = getattr(cpu, name)
        monkeypatch.setattr(
            cpu, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )
    q, k, v = _qkv()
    mask = padding_mask(B, N, 0.25)
    for t in (q, k, v):
        t.requires_grad_(True)
    fast = get_implementation("nystromer").build(_config())(q, k, v, mask)
    assert calls, "the CPU speed-ups should run by default"
    calls.clear()
    plain = get_implementation("nystromer-plain").build(_config())(q, k, v, mask)
    assert calls == [] and cpu.applies(q)  # off inside the call only
    assert relative_error(plain, fast) < 1e-12
    grads = torch.autograd.grad(fast.sum(), (q, k, v))
    plain_grads = torch.autograd.grad(plain.sum(), (q, k, v))
    assert all(relative_error(a, b) < 1e-12 for a, b in zip(plain_grads, grads, strict=True))


@pytest.mark.parametrize("name", ["exact", "exact-matmul"])
def test_exact_implementations_match_the_float64_reference(name):
    q, k, v = _qkv()
    mask = padding_mask(B, N, 0.25)
    out = get_implementation(name).build(_config())(q, k, v, mask)
    for b in range(B):
        length = int(mask[b].sum())
        for h in range(H):
            ref = exact_attention(q[b, h, :length], k[b, h, :length], v[b, h, :length])
            torch.testing.assert_close(out[b, h, :length], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PEERS)
def test_peer_wrappers_feed_q_k_v_exactly(name):
    if unavailable_reason(name):
        pytest.skip(unavailable_reason(name))
    # One sample, one head: the peers' whole-batch pseudo-inverse scale is then the per-matrix
    # one, so with q, k, v selected exactly their output equals ours to float64 rounding.
    q, k, v = _qkv(batch=1, heads=1)
    ours = get_implementation("nystromer").build(_config(heads=1))(q, k, v)
    runner = get_implementation(name).build(_config(heads=1))
    native = runner.run(*runner.prepare(q, k, v, None))
    assert native.shape == runner.output_shape(1, 1, N, D)
    torch.testing.assert_close(runner.to_bhnd(native), ours, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("iterations", [3, 10])
def test_peers_run_the_configured_pinv_iterations(name, iterations):
    # transformers' iterative_inv runs 6 iterations whatever its config says: a benchmark with
    # --pinv-iterations would compare ours at that count against the peer at 6.
    if unavailable_reason(name):
        pytest.skip(unavailable_reason(name))
    q, k, v = _qkv(batch=1, heads=1)
    config = AttentionConfig(1, D, N, M, iterations, "cpu", torch.float64)
    ours = get_implementation("nystromer").build(config)(q, k, v)
    theirs = get_implementation(name).build(config)(q, k, v)
    # One sample, one head: the same math up to float64 rounding (6 iterations: ~0.3 away).
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PEERS)
def test_peers_show_their_padding_and_batch_defects(name):
    if unavailable_reason(name):
        pytest.skip(unavailable_reason(name))
    q, k, v = _qkv()
    mask = padding_mask(B, N, 0.25)
    ours = get_implementation("nystromer").build(_config())(q, k, v, mask)
    theirs = get_implementation(name).build(_config())(q, k, v, mask)
    # Padding inside their landmarks (transformers) or a pseudo-inverse scale shared by the
    # batch (both) moves their output on real rows well beyond rounding.
    assert relative_error(theirs, ours, mask) > 1e-3


def test_transformers_size_limit_is_reported_not_crashed():
    impl = get_implementation("transformers")
    assert impl.supports(_config(n=100), False) is not None
    assert "multiple of m" in impl.supports(_config(n=100), False)
    assert impl.supports(_config(n=96), True) is None


def test_padding_mask_and_inputs_validate():
    mask = padding_mask(1, 100, 0.1)
    assert mask.shape == (1, 100) and int(mask.sum()) == 90
    assert padding_mask(3, 50, 0.0) is None
    with pytest.raises(ValueError, match="padding must be a fraction"):
        padding_mask(1, 10, 1.5)
    with pytest.raises(ValueError, match="style must be one of"):
        random_qkv(1, 1, 8, 4, style="uniform")
    q, k, _ = random_qkv(1, 2, 512, 32, style="structured", logit_std=2.0)
    logits = q @ k.transpose(-1, -2) / 32**0.5
    assert 1.5 < float(logits.std()) < 2.5  # the requested spread, up to sampling


@pytest.mark.parametrize("name", ["nystromer", "naive", "exact", "exact-matmul"])
def test_head_taking_implementations_get_a_projections_layout(name):
    # Ours and SDPA take heads: in a model their inputs are (B, n, H, d) memory viewed as
    # (B, H, n, d), and so are the output gradient and the inputs' gradients. The benchmark
    # feeds them that layout instead of charging them a transpose no model pays.
    from nystromer.bench.measure import CaseSpec, _call, _prepared

    spec = CaseSpec(impl=name, seq_len=N, heads=H, head_dim=D, num_landmarks=M, dtype="float64")
    runner, args, grad = _prepared(spec, backward=True)
    for t in (*args[:3], grad):
        assert t.transpose(1, 2).is_contiguous()
    _call(runner, args, grad)
    for t in args[:3]:
        assert t.grad.stride() == t.stride()
    # (Their outputs through this layout are checked against references above.)


@pytest.mark.parametrize("name", ["naive", *PEERS])
def test_measured_backward_reaches_the_same_gradients_for_every_nystrom_implementation(name):
    # forward+backward is timed as _call builds it from _prepared: the same random output
    # gradient, in each implementation's layout, back to q, k, v (the peers: x = [q | k | v]).
    # One sample, one head (the peers' pseudo-inverse scale is then ours): the gradients must
    # be the same to float64 rounding, so that every row does the same work.
    from nystromer.bench.measure import CaseSpec, _call, _prepared

    def gradients(impl):
        spec = CaseSpec(impl, heads=1, seq_len=N, head_dim=D, num_landmarks=M, dtype="float64")
        runner, args, grad = _prepared(spec, backward=True)
        _call(runner, args, grad)
        if runner.grad_args == (0,):  # (B, n, 3·d) → three (B, 1, n, d)
            return [t.unsqueeze(1) for t in args[0].grad.chunk(3, dim=-1)]
        return [args[i].grad for i in runner.grad_args]

    if unavailable_reason(name):
        pytest.skip(unavailable_reason(name))
    for theirs, ours in zip(gradients(name), gradients("nystromer"), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-12)
