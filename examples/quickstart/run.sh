#!/usr/bin/env bash
# Starts the quickstart: the example echo backend and the gateway in front of it.
# Then connect a client to ws://127.0.0.1:8080/echo. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p tollgate -p echo-backend
# The quickstart API runs the set-header policy: build it as a WebAssembly component.
rustup target add wasm32-wasip2 >/dev/null
cargo build --release --target wasm32-wasip2 -p set-header
mkdir -p examples/quickstart/plugins
cp target/wasm32-wasip2/release/set_header.wasm examples/quickstart/plugins/
./target/release/echo-backend --listen 127.0.0.1:9000 &
backend_pid=$!
trap 'kill "$backend_pid" 2>/dev/null || true' EXIT
echo "gateway: ws://127.0.0.1:8080/echo  (test console: http://127.0.0.1:9090/console; metrics: /metrics)"
./target/release/tollgate run --manifest examples/quickstart/tollgate.toml
