#!/usr/bin/env bash
# The test suite: lint, then pytest. Called by `./fv test` (which installs what is
# missing first) and by CI. Arguments go to pytest.
#
# PostgreSQL: when FLEETVISOR_TEST_DB is unset and PostgreSQL's server binaries are
# on the machine, a throwaway server is started on a Unix socket in a temp dir for
# the store tests, and removed afterwards.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

"$here/scripts/system-deps.sh"

echo "== ruff"
ruff check src tests $([ -d benchmarks ] && echo benchmarks)
echo "== mypy"
mypy src

pg_dir=""
cleanup() {
    if [ -n "$pg_dir" ]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$pg_dir"
    fi
}
trap cleanup EXIT

if [ -z "${FLEETVISOR_TEST_DB:-}" ]; then
    pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$pg_bin" ] && [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
        pg_dir="$(mktemp -d /tmp/fv-pg-XXXXXX)"
        chown postgres "$pg_dir"
        chmod 700 "$pg_dir"
        runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U fleetvisor >/dev/null
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -w -l "$pg_dir/log" \
            -o "-k $pg_dir -c listen_addresses='' -c fsync=off" start >/dev/null
        runuser -u postgres -- "$pg_bin/createdb" -h "$pg_dir" -U fleetvisor fleetvisor_test
        export FLEETVISOR_TEST_DB="postgresql+psycopg://fleetvisor@/fleetvisor_test?host=$pg_dir"
        echo "== PostgreSQL for the store tests: $pg_dir"
    else
        echo "== PostgreSQL server not found (or not root): store tests run on SQLite only"
    fi
fi

echo "== pytest"
python -m pytest "$@"
