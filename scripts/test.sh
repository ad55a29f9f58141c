#!/usr/bin/env bash
# The one test entry point, for CI (.ci/run) and by hand: installs what the tests need,
# starts the default search servers, runs pytest (extra arguments pass through) and ruff.
# Safe to re-run: every step skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "system packages"
# javac builds the GET / module of the Elasticsearch 8+ test servers; gcc builds lua_sandbox's own
# matcher, which tests/test_matcher.py compares with hindsight-py's.
# tmux drives `hindsight-py top` in tests/test_top.py.
bash scripts/install_debian_packages.sh lua-lpeg lua-cjson lua-socket lua-filesystem lua-zlib lua-bitop nginx-light maven openjdk-17-jdk-headless \
    gcc libc6-dev tmux

step "python packages"
"$PYTHON" -m pip install -q -e '.[test]'

step "upstream sources"
# The pinned public sources the upstream tests compare against (scripts/fetch_upstream.py; a clone
# of each pinned commit, or with HINDSIGHT_PY_UPSTREAM_SOURCE=DIR the archives in DIR), once into
# the cache. In CI (CI=true) a missing one fails the run, and so do the tests that need it;
# elsewhere (a laptop offline) those tests skip, each naming the command that fetches it.
ci=${CI:-}
if ! "$PYTHON" scripts/fetch_upstream.py; then
    if [[ ${ci,,} == true || $ci == 1 ]]; then
        echo "the upstream sources are required in CI (CI=true)" >&2
        exit 1
    fi
    echo "going on without them: the tests that need them will skip" >&2
fi

step "search servers"
"$PYTHON" scripts/search_servers.py start

step "pytest"
# Exit 5 (no test ran) stays a failure like any other non-zero status.
pytest_status=0
"$PYTHON" -m pytest -q "$@" || pytest_status=$?

step "pytest: the Lua-level suites again under PUC Lua 5.1 (HINDSIGHT_PY_LUA=lua51)"
# The default runtime is LuaJIT; these also hold the upstream expectations that depend on
# Lua 5.1's table order byte for byte (marked lua51, skipped above).
if ((pytest_status == 0)); then
    HINDSIGHT_PY_LUA=lua51 "$PYTHON" -m pytest -q tests/test_heka_pb_lua.py tests/test_message.py \
        tests/test_sandbox_lua.py tests/test_sandbox_security.py tests/test_upstream_suites.py \
        tests/test_refused_sandbox.py tests/test_c_module_standins.py || pytest_status=$?
fi

step "ruff"
ruff_status=0
"$PYTHON" -m ruff check . || ruff_status=$?

step "done: pytest exit $pytest_status, ruff exit $ruff_status"
if ((pytest_status != 0)); then exit "$pytest_status"; fi
exit "$ruff_status"
