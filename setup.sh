#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment in .venv and install projlens_mi into it.
# CPU by default: torch is pinned to the CPU build that installs fast on machines without a GPU.
# GPU users: TORCH_SPEC="torch==2.8.0" bash setup.sh   (or any torch spec / an already-installed torch: TORCH_SPEC=none)
set -euo pipefail
cd "$(dirname "$0")"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.projlens-installed"
want="$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  extra=()
  [ "$TORCH_SPEC" != none ] && extra+=("$TORCH_SPEC")
  # One pip call, so the torch pin and the package's ranges are resolved together.
  .venv/bin/python -m pip install -q --disable-pip-version-check "${extra[@]}" -e ".[tl,test]"
  echo "$want" > "$stamp"
fi
