"""benchmarks/against_commit.py at a tiny size: a past functional.py beside the current one."""

from __future__ import annotations

import pytest

from .scripts import load_script

TINY = ["-n", "96", "--heads", "2", "--head-dim", "8", "-m", "16", "--repeats", "2"]


def test_times_a_revision_beside_the_working_tree(capsys):
    script = load_script("against_commit.py")
    # The revision's module is its own copy, not the imported nystromer.functional.
    old = script["functional_at"]("HEAD")
    assert old is not script["functional"] and hasattr(old, "nystrom_attention")
    assert script["main"](["HEAD", *TINY, "--kmeans-iterations", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "python benchmarks/against_commit.py HEAD -n 96" in out
    assert "| ms | HEAD | working tree | HEAD ÷ working tree |" in out
    rows = [line for line in out.splitlines() if line.startswith("| forward")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "forward",
        "forward+backward",
        "forward, padded",
        "forward+backward, padded",
    ]
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # the ratio, from unrounded medians
    faults = next(line for line in out.splitlines() if line.startswith("| page faults"))
    assert all(int(x.replace(",", "")) >= 0 for x in faults.split("|")[2:4])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-revision", *TINY], "cannot read src/nystromer/functional.py at revision"),
        (["HEAD", *TINY, "--padding", "1"], "--padding must be in [0, 1), got 1.0"),
    ],
)
def test_bad_revision_or_padding_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        load_script("against_commit.py")["main"](argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
