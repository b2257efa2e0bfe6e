#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (committed; scripts/fuzz runs on a copy).

Seeds are small valid or nearly valid inputs the fuzzer mutates from: frames of every kind
(fragmented and masked text, close frames, 16- and 64-bit lengths), the conformance suite's
UTF-8 cases (Autobahn section 6, as in tests/e2e/conformance.rs), the repository's manifests
(examples/ and the TOML blocks of README.md and docs/), keys files, JWTs and JWKS/PEM keys.
Regenerate with `python3 fuzz/make-seeds.py` (needs openssl for the key seeds).
"""
import base64, hashlib, hmac, json, os, re, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- frames ----------------------------------------------------------------------------------
KEY = bytes([0x37, 0xFA, 0x21, 0x3D])


def frame(op, payload, fin=True, mask=None, rsv=0):
    b0 = (0x80 if fin else 0) | rsv | op
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, m | 127]) + n.to_bytes(8, "big")
    if mask:
        return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + payload


def header(client, ext=False, max_frame=0xFFFF, max_msg=None, chunks=(0, 0, 0)):
    flags = (1 if client else 0) | (2 if ext else 0) | (4 if max_msg is None else 0)
    return bytes([flags]) + max_frame.to_bytes(2, "little") + (max_msg or 0).to_bytes(2, "little") + bytes(chunks)


def stream(name, client, frames, **kw):
    put("frame_stream", name, header(client, **kw) + b"".join(frames))


def close(code, reason=b""):
    return code.to_bytes(2, "big") + reason


for client in (True, False):
    mk = KEY if client else None
    side = "client" if client else "backend"
    stream(f"{side}-text", client, [frame(1, b"hello", mask=mk)])
    stream(f"{side}-fragmented-text-with-ping", client, [
        frame(1, "κό".encode()[:3], fin=False, mask=mk),
        frame(9, b"ping", mask=mk),
        frame(0, "κόσμε".encode()[3:], mask=mk),
    ], chunks=(1, 3, 7))
    stream(f"{side}-binary-16bit-length", client, [frame(2, bytes(range(256)) * 2, mask=mk)], chunks=(5, 100, 0))
    # A 64-bit length; only the first bytes of its payload have arrived.
    stream(f"{side}-binary-64bit-length", client, [frame(2, b"x" * 65536, mask=mk)[:120]], max_frame=0xFFFF, chunks=(20, 0, 0))
    stream(f"{side}-close", client, [frame(1, b"bye soon", mask=mk), frame(8, close(1000, b"bye"), mask=mk)], chunks=(2, 2, 2))
    stream(f"{side}-close-empty", client, [frame(8, b"", mask=mk)])
    stream(f"{side}-close-bad-code", client, [frame(8, close(1005), mask=mk)])
    stream(f"{side}-pong-and-binary", client, [frame(10, b"", mask=mk), frame(2, b"\x00\xff", mask=mk)], max_msg=16)
    stream(f"{side}-too-big", client, [frame(2, b"y" * 40, mask=mk)], max_frame=32, max_msg=64)
    stream(f"{side}-message-too-big", client, [frame(2, b"y" * 30, fin=False, mask=mk), frame(0, b"z" * 30, mask=mk)], max_frame=32, max_msg=50)
    stream(f"{side}-deflate-rsv1", client, [frame(1, b"\xf2\x48\xcd\xc9\xc9\x07\x00", mask=mk, rsv=0x40)], ext=True)
    stream(f"{side}-rsv1-without-extension", client, [frame(1, b"a", mask=mk, rsv=0x40)])
    stream(f"{side}-wrong-masking", client, [frame(1, b"a", mask=None if client else KEY)])
    stream(f"{side}-incomplete-header", client, [frame(2, b"abc", mask=mk)[:3]])

# The conformance suite's UTF-8 cases (Autobahn 6.x), as one text frame each, and for
# utf8_stream with a few cuts.
UTF8 = [
    "κόσμε".encode(), b"", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xed\xbf\xbf", b"\xef\xbf\xbf", b"\xf0\x9f\x98", b"a\xff",
    b"\xce", b"\xf4\x8f\xbf\xbf", b"\xed\x9f\xbf", bytes(range(0x80, 0xC0)),
    b"".join(bytes([b, 0x20]) for b in range(0xC0, 0xE0)),
    b"\xc0\xe0\x80\xf0\x80\x80\xf8\x80\x80\x80\xfc\x80\x80\x80\x80\xdf\xef\xbf\xf7\xbf\xbf",
    b"\xfe\xfe\xff\xff", b"\xe0\x80\xaf", b"\xf0\x8f\xbf\xbf", b"\xed\xa0\x80\xed\xb0\x80",
    "\U0010ffff\ufdd0\ufffe".encode(), "e\u0301\ufeffok".encode(), b"ok\xf0\x9f\x98", b"ok\x80ok",
    "𝄞 and 😀".encode(),
]
for i, t in enumerate(UTF8):
    put("utf8_stream", f"case-{i:02}", bytes([3, 1, 2, 5]) + t)
    stream(f"utf8-case-{i:02}-client", True, [frame(1, t, mask=KEY)], chunks=(1, 2, 3))
    stream(f"utf8-case-{i:02}-backend-fragments", False, [frame(1, t[:2], fin=False), frame(0, t[2:])], chunks=(1, 0, 0))

# --- manifests -------------------------------------------------------------------------------
for rel in ["examples/quickstart/tollgate.toml", "examples/tenant-check/tollgate.toml"]:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        put("manifest", rel.replace("/", "-"), f.read())
n = 0
for rel in ["README.md"] + [os.path.join("docs", d) for d in sorted(os.listdir(os.path.join(ROOT, "docs")))]:
    if not rel.endswith(".md"):
        continue
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"```toml\n(.*?)```", text, re.S):
        if "[gateway]" in block or "[[apis]]" in block or "[[products" in block:
            put("manifest", f"doc-block-{n:02}", block)
            n += 1
put("manifest", "bad-type", '[gateway]\nname = 5\nlisten = "127.0.0.1:0"\n')
put("manifest", "unknown-key", '[gateway]\nname = "g"\nlisten = "127.0.0.1:0"\nlisten_port = 1\n')

put("keys_file", "valid", '[alice]\nprimary = "alice-key-0123456789"\nsecondary = "alice-key-9876543210"\n\n[bob]\nprimary = "bob-key-0123456789ab"\n')
put("keys_file", "short-and-unknown", '[alice]\nprimary = "short"\n[nobody]\nprimary = "nobody-key-0123456789"\n')
put("keys_file", "wrong-shape", 'alice = "alice-key-0123456789"\n[bob]\nprimary = 5\n')
put("keys_file", "unknown-field", '[alice]\nprimary = "alice-key-0123456789"\ntertiary = "x"\n')

# --- JWT -------------------------------------------------------------------------------------
SECRET = b"a shared secret of decent length!"
NOW = 1_700_000_000


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256(h, c, secret=SECRET):
    signing = f"{b64(h.encode())}.{b64(c.encode())}"
    tag = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(tag)}"


H = '{"alg":"HS256","kid":"hs1","typ":"JWT"}'
GOOD = json.dumps({"sub": "ann", "iss": "https://issuer.test", "aud": ["chat", "other"], "exp": NOW + 600, "nbf": NOW - 10, "scope": "chat read"})
put("jwt_token", "signed-good", b"\x01" + f"{H}\n{GOOD}".encode())
put("jwt_token", "signed-expired", b"\x01" + f"{H}\n" .encode() + json.dumps({"iss": "https://issuer.test", "aud": "chat", "exp": NOW - 100, "scope": "chat"}).encode())
put("jwt_token", "signed-no-kid-wrong-aud", b"\x01" + b'{"alg":"HS256"}\n' + json.dumps({"iss": "https://issuer.test", "aud": "x", "exp": NOW + 1, "scope": ["chat"]}).encode())
put("jwt_token", "wrong-secret", b"\x02" + f"{H}\n{GOOD}".encode())
put("jwt_token", "token-as-is", b"\x00" + hs256(H, GOOD).encode())
NONE = b64(b'{"alg":"none"}')
put("jwt_token", "alg-none", b"\x00" + f"{NONE}.{b64(GOOD.encode())}.".encode())
put("jwt_token", "bearer-header", b"\x03" + f"Bearer {hs256(H, GOOD)}".encode())
put("jwt_token", "query-token", b"\x04" + hs256(H, GOOD).encode())

put("jwks", "oct", b"\x00" + json.dumps({"keys": [{"kty": "oct", "kid": "hs1", "k": b64(SECRET)}]}).encode())
put("jwks", "enc-skipped-and-bad-kty", b"\x00" + json.dumps({"keys": [{"kty": "RSA", "use": "enc"}, {"kty": "XYZ"}]}).encode())
try:
    with tempfile.TemporaryDirectory() as tmp:
        def openssl(*args):
            return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout
        ec = os.path.join(tmp, "ec.pem")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", ec)
        ec_pub = openssl("pkey", "-in", ec, "-pubout")
        ec_der = openssl("pkey", "-in", ec, "-pubout", "-outform", "DER")
        point = ec_der[-65:]
        ed = os.path.join(tmp, "ed.pem")
        openssl("genpkey", "-algorithm", "ED25519", "-out", ed)
        ed_pub = openssl("pkey", "-in", ed, "-pubout")
        ed_der = openssl("pkey", "-in", ed, "-pubout", "-outform", "DER")
        rsa = os.path.join(tmp, "rsa.pem")
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", rsa)
        rsa_pub = openssl("pkey", "-in", rsa, "-pubout")
        modulus = openssl("rsa", "-in", rsa, "-noout", "-modulus").decode().strip().split("=", 1)[1]
        put("jwks", "ec-okp-rsa", b"\x00" + json.dumps({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "x": b64(point[1:33]), "y": b64(point[33:])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": b64(ed_der[-32:])},
            {"kty": "RSA", "kid": "rsa1", "alg": "RS256", "n": b64(bytes.fromhex(modulus)), "e": "AQAB"},
        ]}).encode())
        put("jwks", "pem-three-keys", b"\x01" + ec_pub + ed_pub + rsa_pub)
        put("jwks", "pem-private-block", b"\x01" + b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
except (OSError, subprocess.CalledProcessError) as e:
    print(f"openssl unavailable, key seeds skipped: {e}")
print("seeds written to", OUT)
