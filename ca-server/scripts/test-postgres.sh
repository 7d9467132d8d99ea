#!/usr/bin/env bash
# A throwaway PostgreSQL 15 (Debian's postgresql-15) for the test suite and for trying the
# PostgreSQL store by hand: a new cluster in a temporary folder, on a free loopback port, with
# TLS (a test CA and a server certificate for 127.0.0.1), scram-sha-256 passwords, a role and a
# database named imprint. Prints the environment the tests read:
#
#   eval "$(ca-server/scripts/test-postgres.sh start)"     # start; exports IMPRINT_TEST_PG_*
#   ca-server/scripts/test-postgres.sh stop "$IMPRINT_TEST_PG_DIR"
#   ca-server/scripts/test-postgres.sh pause DIR    # stop the server, keep the cluster
#   ca-server/scripts/test-postgres.sh resume DIR   # start it again, same port and settings
#   ca-server/scripts/test-postgres.sh standby DIR  # a synchronous standby of the cluster in DIR
#                                                   # (streaming replication, on a port of its
#                                                   # own); prints IMPRINT_TEST_PG_STANDBY_DIR and
#                                                   # _PORT
#   ca-server/scripts/test-postgres.sh kill DIR     # SIGKILL the server and all its processes
#   ca-server/scripts/test-postgres.sh promote DIR  # promote a standby to primary
#   ca-server/scripts/test-postgres.sh freeze DIR   # SIGSTOP the server and all its processes:
#                                                   # connections stay open, nothing answers
#   ca-server/scripts/test-postgres.sh thaw DIR     # SIGCONT them
#
# The role's password is IMPRINT_STORE_PASSWORD when that is set, else a new random one.
# IMPRINT_TEST_PG_OPTIONS adds server settings at start, e.g. for a profile of the statements:
#   IMPRINT_TEST_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements"
# PostgreSQL refuses to run as root: as root the server runs as the postgres user.
set -euo pipefail

bin=/usr/lib/postgresql/15/bin
[ -x "$bin/initdb" ] || { echo "test-postgres: $bin/initdb not found (apt-get install postgresql-15)" >&2; exit 2; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-start}" in
start)
  dir=$(mktemp -d /tmp/imprint-pg.XXXXXX)
  chmod 755 "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  password=${IMPRINT_STORE_PASSWORD:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  superpw=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
      -days 7 -subj /CN=imprint-test-database-ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
      -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt \
      -days 7 -extfile server.ext 2>/dev/null
    printf '%s\n' "$superpw" > superpw
    chmod 600 server.key ca.key superpw
  )
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir/server.key" "$dir/server.crt" "$dir/superpw"; mkdir "$dir/data"; chown postgres "$dir/data" "$dir"; fi
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 --pwfile="$dir/superpw" >"$dir/initdb.log" 2>&1
  echo "-p $port -k $dir -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key -c max_connections=300 -c fsync=on -c synchronous_commit=on ${IMPRINT_TEST_PG_OPTIONS:-}" > "$dir/options"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$(cat "$dir/options")" start >/dev/null
  PGPASSWORD=$superpw "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE imprint LOGIN PASSWORD '$password'" -c "CREATE DATABASE imprint OWNER imprint" >/dev/null
  echo "export IMPRINT_TEST_PG_DIR=$dir"
  echo "export IMPRINT_TEST_PG_URL='postgresql://imprint@127.0.0.1:$port/imprint?sslmode=require'"
  echo "export IMPRINT_TEST_PG_CA=$dir/ca.pem"
  echo "export IMPRINT_STORE_PASSWORD=$password"
  ;;
standby)
  primary=${2:?usage: test-postgres.sh standby PRIMARY_DIR}
  dir=$(mktemp -d /tmp/imprint-pg-standby.XXXXXX)
  chmod 755 "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  pport=$(sed -E 's/^-p ([0-9]+) .*/\1/' "$primary/options")
  superpw=$(cat "$primary/superpw")
  cp "$primary/server.crt" "$primary/server.key" "$primary/superpw" "$primary/ca.pem" "$dir/"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir" "$dir/server.key" "$dir/server.crt" "$dir/superpw"; fi
  conninfo="host=127.0.0.1 port=$pport user=postgres password=$superpw application_name=imprint_standby"
  as_pg "$bin/pg_basebackup" -d "$conninfo" -D "$dir/data" -R -X stream -c fast >"$dir/basebackup.log" 2>&1
  sed "s/^-p $pport /-p $port /; s#$primary#$dir#g" "$primary/options" > "$dir/options"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$(cat "$dir/options")" start >/dev/null
  # The primary waits for this standby's flush before any commit returns.
  PGPASSWORD=$superpw "$bin/psql" -q -h 127.0.0.1 -p "$pport" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "ALTER SYSTEM SET synchronous_standby_names = 'imprint_standby'" -c "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 100); do
    state=$(PGPASSWORD=$superpw "$bin/psql" -qtA -h 127.0.0.1 -p "$pport" -U postgres -d postgres \
      -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'imprint_standby'")
    [ "$state" = sync ] && break
    sleep 0.1
  done
  [ "$state" = sync ] || { echo "test-postgres: the standby did not become synchronous ($state)" >&2; exit 1; }
  echo "export IMPRINT_TEST_PG_STANDBY_DIR=$dir"
  echo "export IMPRINT_TEST_PG_STANDBY_PORT=$port"
  ;;
kill)
  dir=${2:?usage: test-postgres.sh kill DIR}
  pid=$(head -1 "$dir/data/postmaster.pid")
  # The postmaster and every backend at once, as a power cut would.
  pkill -KILL -P "$pid" || true
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  ;;
freeze|thaw)
  dir=${2:?usage: test-postgres.sh freeze|thaw DIR}
  pid=$(head -1 "$dir/data/postmaster.pid")
  # The postmaster first when freezing, so that it starts no backend meanwhile.
  if [ "$1" = freeze ]; then
    kill -STOP "$pid"
    pkill -STOP -P "$pid" || true
  else
    pkill -CONT -P "$pid" || true
    kill -CONT "$pid"
  fi
  ;;
promote)
  dir=${2:?usage: test-postgres.sh promote DIR}
  as_pg "$bin/pg_ctl" -D "$dir/data" -w promote >/dev/null
  ;;
pause)
  dir=${2:?usage: test-postgres.sh pause DIR}
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  ;;
resume)
  dir=${2:?usage: test-postgres.sh resume DIR}
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "$(cat "$dir/options")" start >/dev/null
  ;;
stop)
  dir=${2:?usage: test-postgres.sh stop DIR}
  # A frozen server would never stop.
  if pid=$(head -1 "$dir/data/postmaster.pid" 2>/dev/null); then
    kill -CONT "$pid" 2>/dev/null || true
    pkill -CONT -P "$pid" 2>/dev/null || true
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: test-postgres.sh start | standby DIR | kill DIR | promote DIR | pause DIR | resume DIR | freeze DIR | thaw DIR | stop DIR" >&2
  exit 2
  ;;
esac
