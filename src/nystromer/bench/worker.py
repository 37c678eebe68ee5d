"""``python -m nystromer.bench.worker SPEC_JSON TASKS``: one measurement in a fresh process.

SPEC_JSON is a :class:`~nystromer.bench.measure.CaseSpec` as JSON, TASKS a comma-separated
list of ``memory_forward``, ``memory_backward``, ``time_forward``, ``time_backward``. The
result is printed as one JSON line after a marker, so library warnings cannot corrupt it.
"""

from __future__ import annotations

import json
import sys
import traceback

from .measure import _RESULT_MARK, CaseSpec, run_in_process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m nystromer.bench.worker SPEC_JSON TASKS", file=sys.stderr)
        return 2
    spec = CaseSpec(**json.loads(argv[0]))
    try:
        found = run_in_process(spec, [t for t in argv[1].split(",") if t])
    except Exception as exc:  # reported to the parent as data, not as a crash
        traceback.print_exc()
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        found = {"status": "oom" if oom else "failed", "note": f"{type(exc).__name__}: {exc}"}
    print(_RESULT_MARK + json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
