#!/usr/bin/env python3
"""Tries the fleet that examples/fleet/run.sh started (Python 3 standard library only).

Opens N WebSockets to /echo through HAProxy, one after another, all with the key of
subscription `acme` (max_connections = 3 across the fleet), and prints for each the status
(101 or 429) and which gateway answered (the one whose tollgate_handshakes_total moved on its
admin port's /metrics); each 101 echoes a message. Then what each gateway holds (/apis).

    python3 examples/fleet/try.py            # 6 connections: 3 x 101, 3 x 429
    python3 examples/fleet/try.py -n 4 --hold      # keep the 101s open until Enter
    python3 examples/fleet/try.py --hold 60        # ... or for 60 s

Ports and key come from the same variables as run.sh: FLEET_PORT (8080), FLEET_ADMIN_PORTS
("9091 9092 9093"), FLEET_KEY (fleet-demo-key-0123456789).
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import select
import socket
import struct
import sys
import time

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def admin_get(port, path):
    """GET on a gateway's admin port: the body, or None if the gateway does not answer."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return body if r.status == 200 else None
    except OSError:
        return None


def handshakes(port):
    """{status: count} of the gateway's handshakes on API echo, or None if it is down."""
    text = admin_get(port, "/metrics")
    if text is None:
        return None
    counts = {}
    for line in text.splitlines():
        if not line.startswith("tollgate_handshakes_total{"):
            continue
        labels_text, _, value = line.rpartition("} ")
        labels = dict(LABEL.findall(labels_text))
        if labels.get("api") == "echo":
            status = labels.get("status", "?")
            counts[status] = counts.get(status, 0) + float(value)
    return counts


def apis(port):
    text = admin_get(port, "/apis")
    return json.loads(text) if text else None


def subscription(doc, name):
    for p in doc.get("products", []):
        for s in p.get("subscriptions", []):
            if s.get("name") == name:
                return s
    return None


def read_head(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the response head")
        buf += chunk
        if len(buf) > 65536:
            raise ConnectionError("response head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def header(head, name):
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


class Ws:
    """The client side of one WebSocket (RFC 6455), just enough for text and close."""

    def __init__(self, sock, carry):
        self.sock, self.buf = sock, carry

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + body)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def recv(self):
        """(opcode, payload) of the next frame."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, off = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(off + n)
        payload, self.buf = self.buf[off : off + n], self.buf[off + n :]
        return b0 & 0x0F, payload

    def close(self):
        try:
            self.send(8, struct.pack("!H", 1000))
            self.sock.settimeout(2)
            while self.recv()[0] != 8:
                pass
        except OSError:
            pass
        self.sock.close()


def handshake(port, key):
    """(status, response head, Ws or None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /echo HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
            f"Ocp-Apim-Subscription-Key: {key}\r\n\r\n"
        ).encode()
    )
    head, carry = read_head(sock)
    status = int(head.split(" ", 2)[1])
    if status != 101:
        sock.close()
        return status, head, None
    accept = base64.b64encode(hashlib.sha1((nonce + GUID).encode()).digest()).decode()
    if header(head, "sec-websocket-accept") != accept:
        sock.close()
        raise ConnectionError("101 with a wrong Sec-WebSocket-Accept")
    return status, head, Ws(sock, carry)


def who_answered(before, admin_ports, status):
    """The admin port whose count of `status` moved since `before` (waits up to 2 s)."""
    deadline = time.monotonic() + 2
    while True:
        for port in admin_ports:
            if before.get(port) is None:
                continue
            now = handshakes(port)
            if now and now.get(status, 0) > before[port].get(status, 0):
                return port
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def hold(held, seconds):
    """Keeps the open connections until Enter (or `seconds`), reporting any the fleet closes
    (a gateway killed, drained, or idle_timeout)."""
    if seconds is None:
        print(f"holding {len(held)} connection(s): press Enter (or Ctrl-C) to close them")
    else:
        print(f"holding {len(held)} connection(s) for {seconds:g} s")
    deadline = None if seconds is None else time.monotonic() + seconds
    watch = {ws.sock: (i, gw, ws) for i, gw, ws in held}
    try:
        while watch:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return
            rlist = list(watch) + ([sys.stdin] if seconds is None else [])
            ready, _, _ = select.select(rlist, [], [], left)
            for r in ready:
                if r is sys.stdin:
                    return
                i, gw, ws = watch.pop(r)
                try:
                    opcode, payload = ws.recv()
                except OSError:
                    print(f"connection {i} (via {gw}) was closed by the other side")
                    continue
                if opcode == 8 and len(payload) >= 2:
                    code = struct.unpack("!H", payload[:2])[0]
                    print(f"connection {i} (via {gw}) closed by the gateway: {code}")
                else:
                    print(f"connection {i} (via {gw}) got a frame (opcode {opcode}): closing")
        print("no connection left open")
    except KeyboardInterrupt:
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=6, help="connections to open (default 6)")
    ap.add_argument(
        "--hold",
        nargs="?",
        type=float,
        const=-1,
        metavar="SECONDS",
        help="keep the 101s open until Enter, or for SECONDS",
    )
    args = ap.parse_args()
    port = int(os.environ.get("FLEET_PORT", "8080"))
    admin_ports = [int(p) for p in os.environ.get("FLEET_ADMIN_PORTS", "9091 9092 9093").split()]
    key = os.environ.get("FLEET_KEY", "fleet-demo-key-0123456789")

    names, shown = {}, []
    for p in admin_ports:
        doc = apis(p)
        names[p] = doc["gateway"] if doc else f"admin :{p}"
        shown.append(f"{names[p]} (admin :{p})" if doc else f"admin :{p} not answering")
    print(f"through HAProxy ws://127.0.0.1:{port}/echo; gateways: " + ", ".join(shown))

    held, tally = [], {}
    for i in range(1, args.n + 1):
        before = {p: handshakes(p) for p in admin_ports}
        try:
            status, head, ws = handshake(port, key)
        except OSError as e:
            print(f"connection {i}: failed: {e}")
            tally["error"] = tally.get("error", 0) + 1
            continue
        tally[str(status)] = tally.get(str(status), 0) + 1
        by = who_answered(before, admin_ports, str(status))
        gw = names[by] if by else "an unknown gateway"
        if ws is not None:
            msg = f"hello from connection {i}".encode()
            ws.send(1, msg)
            opcode, echo = ws.recv()
            note = f"echoed {echo.decode()!r}" if (opcode, echo) == (1, msg) else "NO ECHO"
            held.append((i, gw, ws))
        else:
            retry = header(head, "retry-after")
            note = f"Retry-After: {retry}" if retry else head.split("\r\n")[0]
        print(f"connection {i}: {status} from {gw}  ({note})")

    print("summary: " + ", ".join(f"{n} x {s}" for s, n in sorted(tally.items())))
    parts, total, limit = [], 0, None
    for p in admin_ports:
        doc = apis(p)
        sub = subscription(doc, "acme") if doc else None
        if sub is None:
            parts.append(f"{names[p]} not answering")
            continue
        parts.append(f"{names[p]} {sub['active_connections']}")
        total += sub["active_connections"]
        limit = sub["max_connections"]
    print(f"subscription acme now held per gateway (/apis): {', '.join(parts)}; "
          f"{total} in all, max_connections = {limit}")

    if args.hold is not None and held:
        hold(held, None if args.hold < 0 else args.hold)
    for _, _, ws in held:
        ws.close()


if __name__ == "__main__":
    main()
