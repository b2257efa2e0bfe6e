"""type-filter: a Tollgate message policy in Python (componentize-py).

Lets through only JSON messages whose `type` is on the configured list, so a client cannot
send the backend message kinds it has no business sending (an admin command, a debug hook).
Messages that are not JSON objects with a string `type` count as not allowed.

Config (the attachment's `config` table in the manifest):
    allowed_types = ["chat", "typing"]    # exact match
    action = "drop"        # "drop" (default): the message is not forwarded; "close": the
                           # sender gets close 1008 (policy violation) naming the type
    field = "type"         # the member to read
"""

import json
from functools import cache

from componentize_py_types import Err

from wit_world import exports
from wit_world.imports import config, log, message_types as mt


@cache
def _config() -> dict:
    """The prepared config, parsed once per instance (it never changes for an instance)."""
    return json.loads(config.prepared())


class Message(exports.Message):
    def declare(self) -> mt.Declaration:
        return mt.Declaration(
            name="type-filter",
            version="0.1.0",
            capabilities=[mt.Capability.DROP_MESSAGES, mt.Capability.CLOSE_CONNECTIONS],
        )

    def configure(self, config_json: str) -> str:
        try:
            raw = json.loads(config_json)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        allowed = raw.get("allowed_types")
        if not isinstance(allowed, list) or not allowed or not all(isinstance(t, str) for t in allowed):
            raise Err("allowed_types: must be a non-empty list of strings, e.g. [\"chat\"]")
        action = raw.get("action", "drop")
        if action not in ("drop", "close"):
            raise Err(f"action: `{action}` is not \"drop\" or \"close\"")
        field = raw.get("field", "type")
        if not isinstance(field, str) or not field:
            raise Err("field: must be a non-empty string")
        return json.dumps({"allowed": allowed, "action": action, "field": field})

    def on_message(self, connection: mt.Connection, message: mt.Message) -> mt.MessageDecision:
        c = _config()
        kind = None
        if message.kind == mt.Kind.TEXT:
            try:
                doc = json.loads(message.payload)
            except (ValueError, RecursionError):  # deep nesting: not allowed, not a failure
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get(c["field"]), str):
                kind = doc[c["field"]]
        if kind in c["allowed"]:
            return mt.MessageDecision_Forward()
        if c["action"] == "close":
            named = kind if kind is not None else "(none)"
            # A lone surrogate in the type cannot be encoded as is: replaced, never a failure.
            reason = f"message type {named} not allowed".encode("utf-8", "replace")[:123].decode("utf-8", "ignore")
            return mt.MessageDecision_Close(mt.CloseConnection(1008, reason))
        log.log(log.Level.DEBUG, f"dropped a message of type {kind!r} on connection {connection.id}")
        return mt.MessageDecision_Drop()
