"""``python -m nystromer.bench.worker SPEC_JSON TASKS``: one measurement in a fresh process, of a
:class:`~nystromer.bench.measure.CaseSpec` as JSON and comma-separated tasks (see
:func:`~nystromer.bench.measure.run_in_process`). The result is one JSON line after a marker, so
library warnings cannot corrupt it.
"""

from __future__ import annotations

import json
import sys
import traceback

from .measure import _RESULT_MARK, CaseSpec, run_in_process


def measure_and_report(spec_json: str, tasks: str) -> int:
    """Run the measurement and print its result line; a failure (out of memory included) is
    reported to the parent as data, not as a crash. Returns the exit code (0)."""
    spec = CaseSpec(**json.loads(spec_json))
    try:
        found = run_in_process(spec, [t for t in tasks.split(",") if t])
    except Exception as exc:
        traceback.print_exc()
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        found = {"status": "oom" if oom else "failed", "note": f"{type(exc).__name__}: {exc}"}
    print(_RESULT_MARK + json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(measure_and_report(*sys.argv[1:]))
