#!/usr/bin/env python3
"""Makes fuzz/seeds/TARGET/ from the committed test vectors (protocol-spec/vectors); run from
anywhere, commit the result. Standard library only. The seeds are the inputs each fuzz run
starts from and the inputs ca-server/tests/fuzz_corpus.rs replays on stable."""

import base64
import hashlib
import json
import shutil
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
VECTORS = FUZZ.parent / "protocol-spec" / "vectors"
SEEDS = FUZZ / "seeds"


def cbor_item(b, i):
    """Decodes one CBOR item of the kinds EnrollRequest uses; returns (value, next index)."""
    major, info = b[i] >> 5, b[i] & 31
    i += 1
    if info < 24:
        n = info
    else:
        size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
        n = int.from_bytes(b[i : i + size], "big")
        i += size
    if major == 0:
        return n, i
    if major == 1:
        return -1 - n, i
    if major in (2, 3):
        return b[i : i + n], i + n
    if major == 5:
        m = {}
        for _ in range(n):
            k, i = cbor_item(b, i)
            v, i = cbor_item(b, i)
            m[k] = v
        return m, i
    raise ValueError(f"CBOR major type {major} not expected")


def put(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def coap(mid, token, code, path=None, options=(), payload=b"", con=True):
    """A CoAP message: options as (number, value) pairs, Uri-Path first."""
    opts = []
    if path is not None:
        opts.append((11, path.encode()))
    opts.extend(options)
    opts.sort(key=lambda o: o[0])
    out = bytes([0x40 | (0 if con else 0x10) | len(token), code]) + struct.pack(">H", mid) + token
    last = 0
    for num, val in opts:
        delta, length = num - last, len(val)
        last = num

        def nib(x):
            if x < 13:
                return x, b""
            if x < 269:
                return 13, bytes([x - 13])
            return 14, struct.pack(">H", x - 269)

        dn, dx = nib(delta)
        ln, lx = nib(length)
        out += bytes([(dn << 4) | ln]) + dx + lx + val
    if payload:
        out += b"\xff" + payload
    return out


def uint(v):
    return v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""


def block(num, more, szx):
    return uint((num << 4) | (8 if more else 0) | szx)


def frame(control, datagram):
    return bytes([control]) + struct.pack(">H", len(datagram)) + datagram


def main():
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    cases = sorted((VECTORS / "cases").iterdir())
    requests = []
    for case in cases:
        for f in sorted(case.iterdir()):
            name = f"{case.name}-{f.name}"
            data = f.read_bytes()
            if f.name == "request.cbor":
                put("enroll_request_cbor", name, data)
                requests.append(data)
                try:
                    m, _ = cbor_item(data, 0)
                except (ValueError, KeyError, IndexError):
                    continue
                if isinstance(m, dict):
                    if isinstance(m.get(1), bytes):
                        put("factory_token", case.name, m[1])
                    if isinstance(m.get(2), bytes):
                        put("csr", case.name, m[2])
                    if isinstance(m.get(1), bytes) and isinstance(m.get(2), bytes):
                        # The same request in the JSON mapping (SPEC.md section 7).
                        b64 = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
                        j = {"token": b64(m[1]), "csr": b64(m[2])}
                        if m.get(3) == 1:
                            j["form"] = "compact"
                        put("enroll_request_json", f"{case.name}-from-cbor.json",
                            json.dumps(j).encode())
            elif f.name == "request.json":
                put("enroll_request_json", name, data)
            elif f.name.startswith("response-") and f.name.endswith(".cbor"):
                put("compact_response", name, data)
    for f in sorted((VECTORS / "secrets").iterdir()):
        if f.name.startswith("ack"):
            put("secret_ack", f.name, f.read_bytes())

    # CoAP: whole requests, GET /ca, a duplicate and its reflection attempt, Block1 pieces,
    # Block2 follow-ups, garbage; control bytes vary the source, the job's fate and the clock.
    cf = (12, bytes([60]))
    for n, req in enumerate(requests[:12]):
        d = coap(0x100 + n, struct.pack(">I", n), 0x02, "enroll", [cf], req)
        put("coap_datagram", f"enroll-{n}", frame(n % 16, d) + frame(0, d) + frame(1, d[:6]))
    get_ca = coap(7, b"\x01\x02\x03\x04\x05\x06\x07\x08", 0x01, "ca")
    put("coap_datagram", "get-ca", frame(0, get_ca))
    small = coap(8, b"", 0x01, "ca", [(23, block(2, False, 0))])
    put("coap_datagram", "get-ca-block2", frame(2, small) + frame(0x30, small))
    req = requests[0] if requests else b"\xa0"
    pieces = [req[i : i + 64] for i in range(0, len(req), 64)]
    seq = b""
    for num, piece in enumerate(pieces):
        more = num + 1 < len(pieces)
        d = coap(0x200 + num, b"\x09", 0x02, "enroll",
                 [cf, (27, block(num, more, 2)), (292, b"tag")], piece)
        seq += frame(0x10 if num else 0, d)
    put("coap_datagram", "block1", seq)
    big = coap(0x300, b"\x0a" * 8, 0x02, "enroll", [cf, (23, block(0, False, 0))], req)
    follow = b"".join(
        frame(0, coap(0x301 + k, b"\x0b", 0x02, "enroll", [(23, block(k + 1, False, 0))]))
        for k in range(4)
    )
    put("coap_datagram", "block2", frame(0, big) + follow)
    put("coap_datagram", "ping-and-garbage",
        frame(0, bytes([0x40, 0, 0, 1])) + frame(1, b"\xff" * 9) + frame(2, b"\x40\x01"))
    put("coap_datagram", "too-large", frame(0, coap(9, b"", 0x02, "enroll", [cf], b"\0" * 4700)))

    line_pem = (VECTORS / "lines" / "line-a.pub.pem").read_text()
    admin = [
        {"id": "line-a", "public_key": line_pem, "serials": "1000-1999", "quota": 10,
         "rate": 5, "secret_source": "dukpt:12345678"},
        {"rate": 100},
        {"line": "line-a"},
        {"bdk_id": "12345678", "key": "FEDCBA9876543210F1F1F1F1F1F1F1F1"},
        {"ksn": "123456789012345600000001", "usage": "pin-encryption", "key_type": "aes-128"},
    ]
    for which, body in enumerate(admin):
        put("admin_body", f"body-{which}", bytes([which]) + json.dumps(body).encode())
    put("admin_body", "generate", bytes([3]) + b'{"bdk_id":"0000ABCD","generate":true}')

    for d in sorted(SEEDS.iterdir()):
        files = list(d.iterdir())
        size = sum(f.stat().st_size for f in files)
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(files))).hexdigest()[:12]
        print(f"{d.name}: {len(files)} seeds, {size} bytes, {digest}")


if __name__ == "__main__":
    main()
