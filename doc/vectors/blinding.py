#!/usr/bin/env python3
"""Section 11.1's vectors (doc/protocol.md), computed again from the
specification by plain Ed25519 arithmetic (RFC 8032), independent of the
Rust code: the blinded key of the service whose identity secret is 07^32,
in period 20832 of length 86400, and its blinded signature of "allium".
Exits non-zero if the specification's vectors differ."""
import hashlib
import pathlib
import sys

# Edwards25519 in affine coordinates: slow and plain, which is the point.
p = 2**255 - 19
l = 2**252 + 27742317777372353535851937790883648493
d = -121665 * pow(121666, p - 2, p) % p


def inv(x):
    return pow(x, p - 2, p)


def add(P, Q):
    (x1, y1), (x2, y2) = P, Q
    x3 = (x1 * y2 + x2 * y1) * inv(1 + d * x1 * x2 * y1 * y2) % p
    y3 = (y1 * y2 + x1 * x2) * inv(1 - d * x1 * x2 * y1 * y2) % p
    return (x3, y3)


def mul(k, P):
    R = (0, 1)
    while k:
        if k & 1:
            R = add(R, P)
        P = add(P, P)
        k >>= 1
    return R


def enc(P):
    x, y = P
    b = bytearray(y.to_bytes(32, "little"))
    b[31] |= (x & 1) << 7
    return bytes(b)


def dec(b):
    y = int.from_bytes(b, "little") & (2**255 - 1)
    x2 = (y * y - 1) * inv(d * y * y + 1) % p
    x = pow(x2, (p + 3) // 8, p)
    if (x * x - x2) % p:
        x = x * pow(2, (p - 1) // 4, p) % p
    if x & 1 != b[31] >> 7:
        x = p - x
    return (x, y)


def spec_vectors():
    spec = pathlib.Path(__file__).resolve().parent.parent / "protocol.md"
    out = {}
    for line in spec.read_text().splitlines():
        if ": " in line:
            k, v = line.strip().split(": ", 1)
            out[k] = v
    return out


By = 4 * inv(5) % p
B = dec(By.to_bytes(32, "little"))
hsk = hashlib.sha512(bytes([7] * 32)).digest()
a = bytearray(hsk[:32])
a[0] &= 248
a[31] &= 127
a[31] |= 64
a = int.from_bytes(a, "little")
A = enc(mul(a, B))
period = (86400).to_bytes(8, "big") + (20832).to_bytes(8, "big")
h = int.from_bytes(hashlib.sha512(b"allium service blinding" + A + period).digest(), "little") % l
blinded = enc(mul(h, dec(A)))
prefix = hashlib.sha512(b"allium service blinding prefix" + hsk[32:] + h.to_bytes(32, "little")).digest()[:32]
M = b"allium"
r = int.from_bytes(hashlib.sha512(prefix + M).digest(), "little") % l
R = enc(mul(r, B))
k = int.from_bytes(hashlib.sha512(R + blinded + M).digest(), "little") % l
S = (r + k * (h * a % l)) % l
sig = R + S.to_bytes(32, "little")

want = spec_vectors()
ok = True
for name, got in [("service.blinded", blinded.hex()), ("service.blinded.signature", sig.hex())]:
    if want.get(name) != got:
        print(f"{name}: the specification says {want.get(name)}, computed {got}")
        ok = False
    else:
        print(f"{name}: {got} (agrees)")
sys.exit(0 if ok else 1)
