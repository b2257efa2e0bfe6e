#!/usr/bin/env bash
# A fleet on one machine: redis-server, the example echo backend, three `tollgate run`
# processes sharing examples/fleet/tollgate.toml (and so one subscription limit, counted in
# Redis), and HAProxy in TCP mode, round robin over the three: ws://127.0.0.1:8080/echo.
# Then try it: python3 examples/fleet/try.py. Ctrl-C (or SIGTERM, or any failure) stops
# everything this script started, by pid. Needs bash 5.1 or later (Debian 11 and later have it).
#
# The manifest cannot give each process its own listen and admin ports (no CLI option, no
# environment override), so this script writes one copy per gateway into its temporary
# directory, changing only the lines tollgate.toml marks "run.sh".
#
# Environment, all optional (defaults shown):
#   FLEET_PORT=8080                       HAProxy's listener: what clients connect to
#   FLEET_GATEWAY_PORTS="8081 8082 8083"  the gateways' WebSocket listeners
#   FLEET_ADMIN_PORTS="9091 9092 9093"    the gateways' admin listeners (/readyz, /apis, /metrics)
#   FLEET_REDIS_PORT=6390  FLEET_BACKEND_PORT=9000
#   FLEET_KEY=fleet-demo-key-0123456789   the subscription's key (16+ printable characters)
#   TOLLGATE_BIN, ECHO_BACKEND_BIN        binaries to run; with both set nothing is built
#   REDIS_SERVER=redis-server  HAPROXY=haproxy
set -euo pipefail
cd "$(dirname "$0")/../.."

FLEET_PORT=${FLEET_PORT:-8080}
read -r -a gw_ports <<<"${FLEET_GATEWAY_PORTS:-8081 8082 8083}"
read -r -a admin_ports <<<"${FLEET_ADMIN_PORTS:-9091 9092 9093}"
redis_port=${FLEET_REDIS_PORT:-6390}
backend_port=${FLEET_BACKEND_PORT:-9000}
export FLEET_KEY=${FLEET_KEY:-fleet-demo-key-0123456789}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
HAPROXY=${HAPROXY:-haproxy}

die() {
  echo "run.sh: $*" >&2
  exit 1
}

[ "${#gw_ports[@]}" = 3 ] && [ "${#admin_ports[@]}" = 3 ] ||
  die "FLEET_GATEWAY_PORTS and FLEET_ADMIN_PORTS need three ports each"
all_ports=("$FLEET_PORT" "${gw_ports[@]}" "${admin_ports[@]}" "$redis_port" "$backend_port")
[ "$(printf '%s\n' "${all_ports[@]}" | sort -u | wc -l)" = "${#all_ports[@]}" ] ||
  die "the same port twice in: ${all_ports[*]}"
for p in "${all_ports[@]}"; do
  [[ $p =~ ^[0-9]+$ ]] && [ "$p" -gt 0 ] && [ "$p" -lt 65536 ] || die "not a port: $p"
  # Something already answering there would be taken for our own process: refuse.
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "127.0.0.1:$p is in use (another fleet or quickstart running?); see the FLEET_*PORT* variables at the top of $0"
  fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-fleet.XXXXXX")
pids=()   # everything started, in start order
names=()

# Stops the given pids: SIGTERM, up to 10 s (a gateway drains for up to drain_timeout = 5 s),
# then SIGKILL for whatever is left.
stop() {
  local p left
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do
    left=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
}

cleanup() {
  # Once: a second Ctrl-C must not cut it short (and leave processes behind). Inside a trap a
  # bare `return` would return the trap's status (set -e would end it): always `return 0`.
  trap - EXIT
  trap '' INT TERM
  local gateways=() lb=() rest=() i
  # The gateways first: they drain, and their close 1001 reaches clients through HAProxy
  # (which takes each out of rotation as its /readyz turns 503); then HAProxy; then the
  # backend and Redis.
  for i in "${!pids[@]}"; do
    case ${names[$i]} in
      gateway*) gateways+=("${pids[$i]}") ;;
      haproxy) lb+=("${pids[$i]}") ;;
      *) rest+=("${pids[$i]}") ;;
    esac
  done
  [ "${#gateways[@]}" = 0 ] || stop "${gateways[@]}"
  [ "${#lb[@]}" = 0 ] || stop "${lb[@]}"
  [ "${#rest[@]}" = 0 ] || stop "${rest[@]}"
  wait 2>/dev/null || true
  rm -rf "$tmp"
  [ "${#pids[@]}" = 0 ] || echo "fleet stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM # during a foreground command (cargo, apt-get): once it is done

# redis-server and haproxy: Debian's packages; installed here when running as root.
need() { # command package
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's $2 package (for $1)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
  command -v "$1" >/dev/null || die "$1 is missing: install Debian's $2 package (sudo apt-get install $2)"
}
need "$REDIS_SERVER" redis-server
need "$HAPROXY" haproxy

if [ -z "${TOLLGATE_BIN:-}" ] || [ -z "${ECHO_BACKEND_BIN:-}" ]; then
  cargo build --release -p tollgate -p echo-backend
fi
TOLLGATE_BIN=${TOLLGATE_BIN:-$PWD/target/release/tollgate}
ECHO_BACKEND_BIN=${ECHO_BACKEND_BIN:-$PWD/target/release/echo-backend}

start() { # name command...: output to $tmp/<name>.log
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

# Waits up to 30 s for `check` to succeed, while the last process started is alive.
ready() { # what check...
  local what=$1 pid=${pids[-1]} log="$tmp/${names[-1]}.log" deadline=$((SECONDS + 30))
  shift
  until "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run.sh: $what exited at start; its log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "run.sh: $what not ready after 30 s; its log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redis_pong() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 line <&3 && [ "${line%$'\r'}" = "+PONG" ]
  ) 2>/dev/null
}

http_200() { # port path
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    IFS= read -r -t 2 line <&3 && [[ $line == "HTTP/1.1 200 "* ]]
  ) 2>/dev/null
}

# Redis: no persistence, its own directory.
mkdir "$tmp/redis"
start redis "$REDIS_SERVER" --port "$redis_port" --bind 127.0.0.1 --dir "$tmp/redis" \
  --save '' --appendonly no
ready "redis-server" redis_pong "$redis_port"

start echo-backend "$ECHO_BACKEND_BIN" --listen "127.0.0.1:$backend_port"
ready "echo-backend" tcp_open "$backend_port"

# One manifest per gateway, from tollgate.toml: only the lines marked "run.sh" change.
for n in 1 2 3; do
  gp=${gw_ports[$((n - 1))]}
  ap=${admin_ports[$((n - 1))]}
  m="$tmp/gateway-$n.toml"
  sed -e "s|^name = \"fleet-1\"|name = \"fleet-$n\"|" \
    -e "s|^listen = \"127.0.0.1:8081\"|listen = \"127.0.0.1:$gp\"|" \
    -e "s|^listen = \"127.0.0.1:9091\"|listen = \"127.0.0.1:$ap\"|" \
    -e "s|^store = \"redis://127.0.0.1:6390\"|store = \"redis://127.0.0.1:$redis_port\"|" \
    -e "s|^gateway_id = \"fleet-1\"|gateway_id = \"fleet-$n\"|" \
    -e "s|^backend = \"ws://127.0.0.1:9000/\"|backend = \"ws://127.0.0.1:$backend_port/\"|" \
    examples/fleet/tollgate.toml >"$m"
  for want in "name = \"fleet-$n\"" "listen = \"127.0.0.1:$gp\"" "listen = \"127.0.0.1:$ap\"" \
    "store = \"redis://127.0.0.1:$redis_port\"" "gateway_id = \"fleet-$n\"" \
    "backend = \"ws://127.0.0.1:$backend_port/\""; do
    grep -qF "$want" "$m" || die "examples/fleet/tollgate.toml changed: cannot write '$want' into gateway $n's copy"
  done
  start "gateway-$n" "$TOLLGATE_BIN" run --manifest "$m"
  ready "gateway $n (fleet-$n)" http_200 "$ap" /readyz
done

# HAProxy: TCP mode (it never parses the WebSocket), round robin, keepalives on both sides,
# an hour of silence allowed once a connection is a tunnel; each gateway is checked on its
# admin port's /readyz (a draining gateway answers 503 and leaves the rotation).
cat >"$tmp/haproxy.cfg" <<EOF
global
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    option logasap
    option tcpka
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
    timeout client-fin 30s

frontend fleet
    bind 127.0.0.1:$FLEET_PORT
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    default-server inter 1s fall 2 rise 1
    server fleet-1 127.0.0.1:${gw_ports[0]} check port ${admin_ports[0]}
    server fleet-2 127.0.0.1:${gw_ports[1]} check port ${admin_ports[1]}
    server fleet-3 127.0.0.1:${gw_ports[2]} check port ${admin_ports[2]}
EOF
start haproxy "$HAPROXY" -db -f "$tmp/haproxy.cfg"
ready "haproxy" tcp_open "$FLEET_PORT"

echo "fleet ready: ws://127.0.0.1:$FLEET_PORT/echo (HAProxy, round robin over 3 gateways)"
for n in 1 2 3; do
  echo "  gateway fleet-$n  pid ${pids[$((n + 1))]}  ws://127.0.0.1:${gw_ports[$((n - 1))]}  admin http://127.0.0.1:${admin_ports[$((n - 1))]}/apis"
done
echo "  redis-server  pid ${pids[0]}  redis://127.0.0.1:$redis_port  (redis-cli -p $redis_port --scan --pattern 'tollgate:*')"
echo "  echo-backend  pid ${pids[1]}  ws://127.0.0.1:$backend_port/"
echo "  haproxy       pid ${pids[5]}"
echo "  subscription acme of product demo: max_connections = 3, key \$FLEET_KEY = $FLEET_KEY"
echo "  logs: $tmp/*.log (removed when this stops)"
echo "pids: ${pids[*]}"
echo "try it: python3 examples/fleet/try.py    (Ctrl-C here stops the fleet)"

# Until Ctrl-C / SIGTERM. A process that dies (say a gateway you kill -9) is reported and the
# rest carry on: HAProxy takes a dead gateway out of rotation, the others keep serving.
while :; do
  done_pid=
  status=0
  wait -n -p done_pid || status=$?
  [ -n "${done_pid:-}" ] || exit 1 # nothing left to wait for (wait -n unsets done_pid)
  for i in "${!pids[@]}"; do
    [ "${pids[$i]}" = "$done_pid" ] || continue
    if [ "$status" -gt 128 ]; then
      echo "run.sh: ${names[$i]} (pid $done_pid) was killed by signal $((status - 128)); the rest carry on" >&2
    else
      echo "run.sh: ${names[$i]} (pid $done_pid) exited with status $status; the rest carry on; its last log line:" >&2
      tail -n 1 "$tmp/${names[$i]}.log" >&2
    fi
    unset 'pids[i]' # gone: never signalled again (its pid may be reused)
  done
done
