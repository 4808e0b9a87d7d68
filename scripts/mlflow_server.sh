#!/usr/bin/env bash
# A shared MLflow tracking server: PostgreSQL 15 as the backend store (runs, params, metrics,
# logged models, the Model Registry) and a folder as the artifact store, served by MLflow
# (--serve-artifacts: clients upload and download through the server, no shared file system).
#
#   scripts/mlflow_server.sh start|stop|status     (make mlflow-server / make mlflow-server-stop)
#
# Settings (environment):
#   MLFLOW_DATA  folder for everything (default: ./mlflow-server); it holds pg/ (the database
#                cluster, owned by the postgres user when run as root), artifacts/, the logs,
#                the pid file and pgpass (the generated database password, mode 600)
#   MLFLOW_PORT  the tracking server's port on 127.0.0.1 (default 5000)
#   PG_PORT      PostgreSQL's port on 127.0.0.1 (default 5433)
#   MLFLOW_WORKERS  server worker processes (default 1)
# Both listen on 127.0.0.1 only; PostgreSQL asks for a password (scram-sha-256) even there.
# The pipeline then logs to it with: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DATA=$(mkdir -p "${MLFLOW_DATA:-mlflow-server}" && cd "${MLFLOW_DATA:-mlflow-server}" && pwd)
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PG_PORT=${PG_PORT:-5433}
PGDATA="$DATA/pg"
PIDFILE="$DATA/mlflow.pid"
WAIT=${MLFLOW_SERVER_WAIT:-90}  # seconds to wait for each service to answer
export PGPASSFILE="$DATA/pgpass"
URI="http://127.0.0.1:$MLFLOW_PORT"

die() { echo "mlflow-server: $*" >&2; exit 1; }

for v in MLFLOW_PORT PG_PORT; do
  [[ ${!v} =~ ^[0-9]+$ ]] && (( ${!v} > 0 && ${!v} < 65536 )) \
    || die "$v=${!v} is not allowed; expected a TCP port number 1-65535"
done

as_pg() {  # PostgreSQL refuses to run as root: as root, run it as the postgres user
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
mlflow_pid() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }

start_postgres() {
  [ -x "$PG_BIN/pg_ctl" ] || die "PostgreSQL 15 not found in $PG_BIN; install it with " \
    "'apt-get install postgresql-15' (make postgres does it), or set PG_BIN"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA"
    chmod 700 "$PGDATA"
    as_pg test -w "$PGDATA" || die "the postgres user cannot write $PGDATA: every parent " \
      "folder of MLFLOW_DATA must be searchable by it (chmod o+x), or choose another MLFLOW_DATA"
    python3 -c "import secrets; print(secrets.token_hex(16))" > "$DATA/.pw"
    [ "$(id -u)" = 0 ] && chown postgres: "$DATA/.pw"
    chmod 600 "$DATA/.pw"
    (umask 077; echo "127.0.0.1:*:*:postgres:$(cat "$DATA/.pw")" > "$PGPASSFILE")
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=scram-sha-256 \
      --pwfile="$DATA/.pw" -E UTF8 --no-instructions >"$DATA/initdb.log" 2>&1 \
      || { rm -f "$DATA/.pw"; die "initdb failed, see $DATA/initdb.log"; }
    rm -f "$DATA/.pw"
  fi
  if pg_running; then
    echo "PostgreSQL already running ($PGDATA)"
  else
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w -t "$WAIT" \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" start \
      >/dev/null || die "PostgreSQL did not start on 127.0.0.1:$PG_PORT, see $PGDATA/postgres.log"
  fi
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres mlflow
}

start_mlflow() {
  if pid=$(mlflow_pid); then echo "MLflow server already running (pid $pid) at $URI"; return; fi
  python3 - "$MLFLOW_PORT" <<'EOF' || die "port $MLFLOW_PORT on 127.0.0.1 is in use; set MLFLOW_PORT"
import socket, sys
s = socket.socket()  # SO_REUSEADDR as the server sets it: a just-stopped server's TIME_WAIT
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections do not block a restart
s.bind(("127.0.0.1", int(sys.argv[1]))); s.close()
EOF
  mkdir -p "$DATA/artifacts"
  # the database URI (no password: libpq reads PGPASSFILE) goes in the environment, not argv
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow" \
  MLFLOW_DISABLE_TELEMETRY=true \
    setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --workers "${MLFLOW_WORKERS:-1}" --serve-artifacts \
      --artifacts-destination "$DATA/artifacts" \
      >"$DATA/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq "$WAIT"); do
    if python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "$URI/health" 2>/dev/null; then
      echo "MLflow server at $URI (backend PostgreSQL 127.0.0.1:$PG_PORT/mlflow, artifacts" \
           "$DATA/artifacts; log $DATA/mlflow.log)"
      echo "use it with: export MLFLOW_TRACKING_URI=$URI"
      return
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 1
  done
  tail -n 20 "$DATA/mlflow.log" >&2 || true
  stop_mlflow
  die "MLflow server did not answer at $URI/health within ${WAIT}s (log: $DATA/mlflow.log)"
}

stop_mlflow() {
  if pid=$(mlflow_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "MLflow server stopped"
  fi
  rm -f "$PIDFILE"
}

stop_postgres() {
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t "$WAIT" stop >/dev/null
    echo "PostgreSQL stopped"
  fi
}

case "${1:-start}" in
  start) start_postgres; start_mlflow ;;
  stop) stop_mlflow; stop_postgres ;;
  status)
    pg_running && echo "PostgreSQL: running ($PGDATA)" || echo "PostgreSQL: stopped"
    pid=$(mlflow_pid) && echo "MLflow server: running at $URI (pid $pid)" \
      || { echo "MLflow server: stopped"; exit 3; } ;;
  *) die "unknown command '$1'; expected start, stop or status" ;;
esac
