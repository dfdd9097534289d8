# Sourced by scripts/demo and scripts/test: make sure the venv exists and holds this
# checkout with the extras the caller set in EXTRAS (re-installed when they change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAFEAGENT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.safeagent-installed"
have="$(cat "$stamp" 2>/dev/null || true)"
case ",$have," in
  *",${EXTRAS:-},"*) need=0 ;;
  *) need=1 ;;
esac
if [ "$need" = 1 ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  spec="$ROOT"
  [ -n "${EXTRAS:-}" ] && spec="$ROOT[$EXTRAS]"
  "$VENV/bin/python" -m pip install --quiet -e "$spec"
  # Remember every extras set installed so far: the demo's and the tests' both stay valid.
  printf '%s,%s' "$have" "${EXTRAS:-}" > "$stamp"
fi
