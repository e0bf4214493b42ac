# Sourced by .ci/run: install PostgreSQL from the distribution if needed, start a private cluster on
# 127.0.0.1 (its own port and socket folder), export OAQ_TEST_POSTGRES_URL, and stop it on exit.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$pg_bin" ]; then
    echo "+ installing PostgreSQL from the distribution's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
pg_port=${OAQ_PG_PORT:-54329}
pg_data=$(mktemp -d /tmp/oaq-pg.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$pg_data"
as_pg "$pg_bin/initdb -D $pg_data -A trust -U postgres >/dev/null"
as_pg "$pg_bin/pg_ctl -D $pg_data -l $pg_data/server.log -w -o '-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_data' start >/dev/null"
trap 'as_pg "$pg_bin/pg_ctl -D $pg_data -m fast stop" >/dev/null 2>&1 || true' EXIT
as_pg "$pg_bin/createdb -h 127.0.0.1 -p $pg_port -U postgres oaq_test"
export OAQ_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$pg_port/oaq_test"
echo "+ PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port"
