"""benchmarks/allocator.py at a tiny size: every allocator's times, the docs section written."""

from __future__ import annotations

import pytest

from .scripts import docs_file, load_script, written_section

TINY = ["-n", "128", "-m", "16", "--heads", "2", "--head-dim", "8", "--repeats", "2"]


@pytest.fixture(scope="module")
def script():
    return load_script("allocator.py")


def test_allocators_clear_the_callers_settings_and_check_preloads(script, tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    library = tmp_path / "libfake.so"
    library.write_bytes(b"")
    envs = script["allocators"]([f"fake={library}"])
    assert list(envs) == ["glibc", "glibc-reuse", "fake"]
    # The caller's own variable would blur the comparison: every allocator removes it.
    assert all(env["MALLOC_ARENA_MAX"] is None for env in envs.values())
    assert envs["glibc-reuse"]["MALLOC_MMAP_THRESHOLD_"] == str(2**32)
    assert envs["fake"]["LD_PRELOAD"] == str(library)
    with pytest.raises(ValueError, match="expected LABEL=PATH, got 'fake'"):
        script["allocators"](["fake"])
    with pytest.raises(ValueError, match="--preload nope: no file at"):
        script["allocators"]([f"nope={tmp_path / 'missing.so'}"])
    with pytest.raises(ValueError, match="'glibc' is used twice"):
        script["allocators"]([f"glibc={library}"])


def test_times_ours_and_a_peer_under_each_allocator_and_writes_its_section(
    script, tmp_path, capsys
):
    pytest.importorskip("nystrom_attention")  # the `bench` extra, which `make test` installs
    docs = docs_file(tmp_path)
    argv = [*TINY, "--rounds", "1", "--impl", "nystromer", "--impl", "nystrom-attention"]
    assert script["main"]([*argv, "--write-docs", str(docs)]) == 0
    section = written_section(docs, script)
    assert "`python benchmarks/allocator.py -n 128 -m 16" in section
    assert "- `glibc`: the C library's defaults" in section
    assert "- `glibc-reuse`: `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM" in section
    header = next(line for line in section.splitlines() if line.startswith("| implementation"))
    assert header.count("glibc-reuse") == 2  # forward and forward+backward
    for name in ("nystromer", "nystrom-attention"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        times = [float(x.replace(",", "")) for x in row.strip("|").split("|")[1:]]
        assert len(times) == 4 and all(t > 0 for t in times)
    ratio = next(line for line in section.splitlines() if line.startswith("| faster peer"))
    # Numbers, not "n/a"; their values at this size are noise (0.00 when a busy machine stalls
    # one call), so only their presence is checked.
    ratios = [float(x) for x in ratio.strip("|").split("|")[1:]]
    assert len(ratios) == 4 and all(r >= 0 for r in ratios)
    # A second run (ours alone, a median over two rounds) replaces the section.
    assert (
        script["main"]([*TINY, "--rounds", "2", "--impl", "nystromer", "--write-docs", str(docs)])
        == 0
    )
    assert docs.read_text().count(script["BEGIN"]) == 1
    with pytest.raises(SystemExit):
        script["main"](["--rounds", "0"])
    assert "--rounds must be ≥ 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script["main"](["--preload", "tcmalloc"])
    assert "--preload: expected LABEL=PATH, got 'tcmalloc'" in capsys.readouterr().err
