"""Run a document's Python blocks in order, in one namespace, the way a reader runs them in a notebook.

``python docs_runner.py OUT.json BLOCK.py [BLOCK.py ...]`` executes each block file as written (each
compiled from its own file, so nnsight can read a ``with`` body's source), then writes OUT.json:
``{"ran": k, "error": traceback or null, "values": {name: summary}}`` where the summary of each
top-level name is JSON (numbers and strings as they are, tensors / arrays as shape + dtype + values
when small, DataFrames as columns + length, lists and dicts recursively). Used by tests/test_docs.py.
"""

from __future__ import annotations

import json
import sys
import traceback
import types


def summary(v, depth: int = 0):
    if isinstance(v, (bool, int, str)) or v is None:
        return v[:4000] if isinstance(v, str) else v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else str(v)
    shape = getattr(v, "shape", None)
    if shape is not None and hasattr(v, "dtype") and hasattr(v, "tolist"):
        n = 1
        for s in shape:
            n *= int(s)
        return {"shape": [int(s) for s in shape], "dtype": str(v.dtype),
                "values": summary(v.tolist(), depth + 1) if n <= 200_000 else None}
    if hasattr(v, "columns") and hasattr(v, "index"):
        return {"columns": [str(c) for c in v.columns], "rows": len(v)}
    if depth < 6 and isinstance(v, (list, tuple)):
        return [summary(x, depth + 1) for x in list(v)[:2000]]
    if depth < 6 and isinstance(v, dict):
        return {str(k): summary(x, depth + 1) for k, x in list(v.items())[:2000]}
    return {"type": type(v).__name__}


def main(out: str, blocks: list[str]) -> int:
    ns: dict = {"__name__": "__main__"}
    ran, error = 0, None
    for path in blocks:
        try:
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), ns)
        except BaseException:   # noqa: BLE001 (SystemExit too: a block must not end the session)
            error = f"{path}:\n{traceback.format_exc()}"
            break
        ran += 1
    values = {k: summary(v) for k, v in ns.items()
              if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    with open(out, "w") as f:
        json.dump({"ran": ran, "error": error, "values": values}, f)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
