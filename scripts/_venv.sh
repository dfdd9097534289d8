# Sourced by scripts/demo and scripts/test: make sure the venv exists and holds this
# checkout with the extras the caller set in EXTRAS (re-installed when they change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAFEAGENT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
too_old='import sys; sys.exit(sys.version_info < (3, 10))'
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c "$too_old"; then
  echo "error: $VENV was made by $("$VENV/bin/python" -V 2>&1); SafeAgent needs 3.10+." >&2
  echo "Remove it (rm -rf '$VENV') and run again, with PYTHON=python3.X if python3 is older." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -c "$too_old"; then
    echo "error: $PY is $("$PY" -V 2>&1); SafeAgent needs Python 3.10+ (set PYTHON=...)." >&2
    exit 2
  fi
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
