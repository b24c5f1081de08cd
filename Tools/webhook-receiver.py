#!/usr/bin/env python3
"""A small offline-push webhook receiver (Docs/delivery.md, "Offline push"), for trying `[push]` and for
the tests that start one.

Every POST is appended to LOG as one JSON line: the status answered, whether its X-Weft-Signature
matched the HMAC-SHA256 of the body under SECRET, the path, the client's port (the same port again means
a kept-alive connection) and the body. The first FAIL POSTs are answered 503 (the sender must retry),
the rest 200. When it listens, the port is written to PORT_FILE (atomically).

--answer changes what a 2xx-bound POST gets, to test senders: "redirect" (307 to /elsewhere), "big"
(200 with a 1 MiB body), "trickle" (200, then a body without a length, one byte a second).

It listens on 127.0.0.1 and, where the machine has it, on [::1] at the same port.

With --tls DIR it serves https: it makes a self-signed certificate for the name localhost (not for 127.0.0.1: send to https://localhost:PORT) in
DIR/cert.pem (with its key in DIR/key.pem) with the openssl command; give DIR/cert.pem to the nodes as
`[push] ca_file`.

    python3 Tools/webhook-receiver.py PORT_FILE LOG SECRET [FAIL] [--tls DIR] [--answer MODE]
"""
import argparse
import hashlib
import hmac
import json
import os
import ssl
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("port_file")
parser.add_argument("log")
parser.add_argument("secret")
parser.add_argument("fail", nargs="?", type=int, default=0)
parser.add_argument("--tls", metavar="DIR")
parser.add_argument("--answer", choices=["ok", "redirect", "big", "trickle"], default="ok")
args = parser.parse_args()
secret = args.secret.encode()
count = [0]
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: connections stay open between POSTs unless the client closes them.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        with lock:
            count[0] += 1
            status = 503 if count[0] <= args.fail else (307 if args.answer == "redirect" else 200)
            with open(args.log, "a") as f:
                f.write(json.dumps({
                    "status": status,
                    "sig_ok": hmac.compare_digest(want, self.headers.get("X-Weft-Signature", "")),
                    "path": self.path,
                    "client_port": self.client_address[1],
                    "body": parsed,
                }) + "\n")
        self.send_response(status)
        if status == 200 and args.answer == "big":
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"x" * (1 << 20))
        elif status == 200 and args.answer == "trickle":
            # No length: the body runs until the connection closes, so a reader cannot tell it is long.
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(1000000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(1)
        else:
            if status == 307:
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *a):
        pass


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler)]
port = servers[0].server_port
try:
    servers.append(Server6(("::1", port), Handler))
except OSError:
    pass  # no IPv6 loopback here (or the port is taken there): 127.0.0.1 only
if args.tls:
    cert, key = os.path.join(args.tls, "cert.pem"), os.path.join(args.tls, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=weft-test-webhook",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for s in servers:
        # The handshake happens in each connection's own thread (at its first read), not in accept: a
        # client that connects and says nothing holds up no one else.
        s.socket = context.wrap_socket(s.socket, server_side=True, do_handshake_on_connect=False)
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
with open(args.port_file + ".tmp", "w") as f:
    f.write(str(port))
os.rename(args.port_file + ".tmp", args.port_file)
servers[0].serve_forever()
