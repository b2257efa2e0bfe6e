"""origin-check: a Tollgate onHandshake policy in Python (componentize-py).

Rejects a WebSocket handshake whose Origin header is not on the configured list and logs
why; browsers always send Origin, so this keeps other sites' pages from opening sockets to
the API with the user's cookies (cross-site WebSocket hijacking).

Config (the attachment's `config` table in the manifest):
    allowed_origins = ["https://app.example.com", ...]   # exact match, case-insensitive
    allow_missing = false      # let clients without an Origin header (non-browsers) through
    status = 403               # status for a refused handshake
"""

import json
from functools import cache

from componentize_py_types import Err

from wit_world import exports
from wit_world.imports import config, handshake_types as ht, log
from wit_world.imports.types import Pair


@cache
def _config() -> dict:
    """The prepared config, parsed on the first handshake an instance serves: it is the same
    string for the instance's whole life (`config.prepared`), and a pooled instance serves
    many handshakes. Parsing it on every call cost a fifth of a warm call (43 -> 34 us p50,
    `tollgate-bench chain`, 2026-11-25)."""
    return json.loads(config.prepared())


def _proceed(context: list[Pair]) -> ht.Decision:
    return ht.Decision_Proceed(ht.Proceed([], [], [], context, None, None))


class Handshake(exports.Handshake):
    def declare(self) -> ht.Declaration:
        return ht.Declaration(
            name="origin-check",
            version="0.1.0",
            capabilities=[
                ht.Capability.READ_REQUEST,
                ht.Capability.USE_CONTEXT,  # puts origin.checked into the context
                ht.Capability.REJECT,
            ],
        )

    def configure(self, config_json: str) -> str:
        try:
            raw = json.loads(config_json)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        allowed = raw.get("allowed_origins")
        if not isinstance(allowed, list) or not allowed or not all(isinstance(o, str) for o in allowed):
            raise Err("allowed_origins: must be a non-empty list of origins, e.g. [\"https://app.example.com\"]")
        for o in allowed:
            if "://" not in o or o.endswith("/"):
                raise Err(f"allowed_origins: `{o}` is not an origin (scheme://host[:port], no path)")
        allow_missing = raw.get("allow_missing", False)
        if not isinstance(allow_missing, bool):
            raise Err("allow_missing: must be true or false")
        status = raw.get("status", 403)
        if not isinstance(status, int) or not 400 <= status <= 499:
            raise Err("status: must be a 4xx status code")
        unknown = set(raw) - {"allowed_origins", "allow_missing", "status"}
        if unknown:
            raise Err(f"unknown key(s): {', '.join(sorted(unknown))}")
        # Prepared once per attachment: lower-cased origins, so each handshake only compares.
        return json.dumps(
            {"allowed": [o.lower() for o in allowed], "allow_missing": allow_missing, "status": status}
        )

    def on_handshake(self, request: ht.Request) -> ht.Decision:
        c = _config()
        origin = request.header("origin")
        if origin is None:
            if c["allow_missing"]:
                return _proceed([])
            why = "no Origin header"
        elif origin.lower() in c["allowed"]:
            return _proceed([Pair("origin.checked", origin)])
        else:
            why = f"Origin {origin!r} is not allowed"
        log.log(log.Level.INFO, f"refused handshake from {request.client_address()}: {why}")
        return ht.Decision_Reject(
            ht.Rejection(
                status=c["status"],
                headers=[Pair("content-type", "text/plain")],
                body=b"origin not allowed\n",
            )
        )
