#!/usr/bin/env python3
"""Drive an Allium client's control port with stem, Tor's controller
library, as Tor's tools do. Run by tests/control.rs:

    control_stem.py CONTROL_PORT SOCKS_PORT WEB_PORT PASSWORD

The client must have no circuit but the one its bootstrap built, keep no
spare circuits (preemptive_circuits = 0), and admit PASSWORD. WEB_PORT is
an HTTP server on this machine answering "ok". Exits 0 and prints
"stem: all checks passed" if every check passes.
"""

import logging
import queue
import socket
import struct
import sys
import time

try:
    import stem
    import stem.connection
    import stem.version
    from stem.control import Controller, EventType, Signal
except ImportError:
    sys.exit("stem is missing: pip install stem")

CONTROL, SOCKS, WEB = (int(a) for a in sys.argv[1:4])
PASSWORD = sys.argv[4]
TIMEOUT = 60


class Warnings(logging.Handler):
    """What stem warns of: anything it could not do with the client."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


WARNINGS = Warnings()
logging.getLogger("stem").addHandler(WARNINGS)


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def fetch(path):
    """GET http://localhost:WEB/path through SOCKS5 (the name is resolved
    at the exit); the body."""
    s = socket.create_connection(("127.0.0.1", SOCKS), timeout=TIMEOUT)
    s.sendall(b"\x05\x01\x00")
    check(s.recv(2) == b"\x05\x00", "SOCKS5 method")
    host = b"localhost"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", WEB))
    reply = s.recv(10)
    check(reply[:2] == b"\x05\x00", "SOCKS5 reply %r" % reply)
    s.sendall(b"GET /" + path.encode() + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    return data.split(b"\r\n\r\n", 1)[1]


class Events:
    """The events stem delivers (on its own thread), kept in order."""

    def __init__(self):
        self.queue = queue.Queue()
        self.seen = []

    def wait(self, pred, what):
        """The first event so far or within TIMEOUT for which pred holds."""
        for e in self.seen:
            if pred(e):
                return e
        end = time.time() + TIMEOUT
        while time.time() < end:
            try:
                e = self.queue.get(timeout=max(0.1, end - time.time()))
            except queue.Empty:
                break
            self.seen.append(e)
            if pred(e):
                return e
        raise AssertionError("no %s within %d s" % (what, TIMEOUT))


def is_fingerprint(fp):
    return len(fp) == 40 and all(c in "0123456789ABCDEF" for c in fp)


def each_method():
    """Every authentication method stem knows, each on its own connection."""
    with Controller.from_port(port=CONTROL) as c:
        info = stem.connection.get_protocolinfo(c)
        methods = set(info.auth_methods)
        want = {stem.connection.AuthMethod.COOKIE, stem.connection.AuthMethod.SAFECOOKIE,
                stem.connection.AuthMethod.PASSWORD}
        check(methods == want, "PROTOCOLINFO methods %s" % methods)
        check(info.tor_version.major == 0 and info.tor_version.minor == 4, "PROTOCOLINFO version")
        stem.connection.authenticate_cookie(c, info.cookie_path)
        check(c.get_info("status/bootstrap-phase").startswith("NOTICE BOOTSTRAP"), "GETINFO after COOKIE")
    with Controller.from_port(port=CONTROL) as c:
        info = stem.connection.get_protocolinfo(c)
        stem.connection.authenticate_safecookie(c, info.cookie_path)
        check(int(c.get_info("traffic/read")) >= 0, "GETINFO after SAFECOOKIE")
    with Controller.from_port(port=CONTROL) as c:
        stem.connection.authenticate_password(c, PASSWORD)
        check(c.get_info("version"), "GETINFO after HASHEDPASSWORD")
    with Controller.from_port(port=CONTROL) as c:
        try:
            stem.connection.authenticate_password(c, PASSWORD + "x")
            raise AssertionError("a wrong password was accepted")
        except stem.connection.AuthenticationFailure:
            pass


def main():
    each_method()

    c = Controller.from_port(port=CONTROL)
    # As a tool would: stem picks SAFECOOKIE, the cookie path from PROTOCOLINFO.
    c.authenticate()
    v = c.get_version()
    check(v >= stem.version.Version("0.4.0.0"), "version %s" % v)
    check(v.status.startswith("allium-"), "version status %s" % v.status)
    phase = c.get_info("status/bootstrap-phase")
    check("PROGRESS=100" in phase and "TAG=done" in phase, "bootstrap phase: %s" % phase)
    check(c.get_info("status/circuit-established") == "1", "circuit established")

    events = Events()
    c.add_event_listener(events.queue.put, EventType.CIRC, EventType.STREAM, EventType.BW,
                         EventType.SIGNAL, EventType.CONF_CHANGED)
    read_before = int(c.get_info("traffic/read"))

    # A stream on the circuit the bootstrap built.
    check(fetch("one") == b"ok", "first fetch")
    ours = lambda e: e.type == "STREAM" and e.target_port == WEB
    first = events.wait(lambda e: ours(e) and e.status == "SUCCEEDED", "STREAM SUCCEEDED")
    check(first.target_address == "localhost", "stream target %s" % first.target)
    circ1 = first.circ_id
    new = events.wait(lambda e: ours(e) and e.id == first.id and e.status == "NEW", "STREAM NEW")
    check(new.circ_id is None, "a NEW stream is on no circuit")
    sent = events.wait(lambda e: ours(e) and e.id == first.id and e.status == "SENTCONNECT",
                       "STREAM SENTCONNECT")
    check(sent.circ_id == circ1, "SENTCONNECT on the stream's circuit")
    closed = events.wait(lambda e: ours(e) and e.id == first.id and e.status == "CLOSED", "STREAM CLOSED")
    check(closed.circ_id == circ1 and closed.reason in ("END", "DONE"), "CLOSED %s" % closed)
    circ = c.get_circuit(circ1)
    check(circ.status == "BUILT" and circ.purpose == "GENERAL", "circuit-status %s" % circ)
    check(len(circ.path) == 3 and all(is_fingerprint(fp) and nick for fp, nick in circ.path),
          "path %s" % (circ.path,))
    check(int(c.get_info("traffic/read")) > read_before, "traffic/read grew")
    events.wait(lambda e: e.type == "BW" and e.read > 0, "BW with bytes read")
    events.wait(lambda e: e.type == "BW" and e.written > 0, "BW with bytes written")

    # NEWNYM: the next stream gets a new circuit, built now.
    c.signal(Signal.NEWNYM)
    events.wait(lambda e: e.type == "SIGNAL" and e.signal == "NEWNYM", "SIGNAL NEWNYM")
    check(fetch("two") == b"ok", "second fetch")
    second = events.wait(lambda e: ours(e) and e.id != first.id and e.status == "SUCCEEDED",
                         "second STREAM SUCCEEDED")
    circ2 = second.circ_id
    check(circ2 != circ1, "NEWNYM: circuit %s again" % circ1)
    # The new circuit was launched and built while we listened.
    events.wait(lambda e: e.type == "CIRC" and e.id == circ2 and e.status == "LAUNCHED",
                "CIRC LAUNCHED for circuit %s" % circ2)
    built = events.wait(lambda e: e.type == "CIRC" and e.id == circ2 and e.status == "BUILT",
                        "CIRC BUILT for circuit %s" % circ2)
    check(len(built.path) == 3 and all(is_fingerprint(fp) and nick for fp, nick in built.path),
          "BUILT path %s" % (built.path,))
    check(built.purpose == "GENERAL" and built.created is not None, "BUILT %s" % built)

    streams = c.get_streams()
    check(all(s.target_port for s in streams), "stream-status parses")

    # Configuration: one key may change.
    check(c.get_conf("SocksPort") == "127.0.0.1:%d" % SOCKS, "GETCONF SocksPort")
    check(c.get_conf("MaxCircuitDirtiness") == "600", "GETCONF MaxCircuitDirtiness")
    c.set_conf("MaxCircuitDirtiness", "10 minutes")
    c.set_conf("MaxCircuitDirtiness", "30")
    check(c.get_conf("MaxCircuitDirtiness") == "30", "SETCONF MaxCircuitDirtiness")
    events.wait(lambda e: e.type == "CONF_CHANGED" and e.changed == {"MaxCircuitDirtiness": ["30"]},
                "CONF_CHANGED")
    c.reset_conf("MaxCircuitDirtiness")
    check(c.get_conf("MaxCircuitDirtiness") == "600", "RESETCONF MaxCircuitDirtiness")
    try:
        c.set_conf("SocksPort", "9999")
        raise AssertionError("SETCONF SocksPort was accepted")
    except stem.InvalidRequest:
        pass
    try:
        c.get_info("no/such/key")
        raise AssertionError("GETINFO no/such/key was answered")
    except stem.InvalidArguments:
        pass
    c.close()
    check(not WARNINGS.seen, "stem warned: %s" % WARNINGS.seen)
    print("stem: all checks passed")


if __name__ == "__main__":
    main()
