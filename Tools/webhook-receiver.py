#!/usr/bin/env python3
"""A small offline-push webhook receiver (Docs/delivery.md, "Offline push"), for trying `[push]` and for
the tests that start one.

Every POST is appended to LOG as one JSON line: the status answered, whether its X-Weft-Signature
matched the HMAC-SHA256 of the body under SECRET, the path, the client's port (the same port again means
a kept-alive connection) and the body. The first FAIL POSTs are answered 503 (the sender must retry),
the rest 200. When it listens, the port is written to PORT_FILE (atomically).

With --tls DIR it serves https: it makes a self-signed certificate for the name localhost (not for 127.0.0.1: send to https://localhost:PORT) in
DIR/cert.pem (with its key in DIR/key.pem) with the openssl command; give DIR/cert.pem to the nodes as
`[push] ca_file`.

    python3 Tools/webhook-receiver.py PORT_FILE LOG SECRET [FAIL] [--tls DIR]
"""
import argparse
import hashlib
import hmac
import json
import os
import ssl
import subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("port_file")
parser.add_argument("log")
parser.add_argument("secret")
parser.add_argument("fail", nargs="?", type=int, default=0)
parser.add_argument("--tls", metavar="DIR")
args = parser.parse_args()
secret = args.secret.encode()
count = [0]


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: connections stay open between POSTs unless the client closes them.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        count[0] += 1
        status = 503 if count[0] <= args.fail else 200
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        with open(args.log, "a") as f:
            f.write(json.dumps({
                "status": status,
                "sig_ok": hmac.compare_digest(want, self.headers.get("X-Weft-Signature", "")),
                "path": self.path,
                "client_port": self.client_address[1],
                "body": parsed,
            }) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if args.tls:
    cert, key = os.path.join(args.tls, "cert.pem"), os.path.join(args.tls, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=weft-test-webhook",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
with open(args.port_file + ".tmp", "w") as f:
    f.write(str(server.server_port))
os.rename(args.port_file + ".tmp", args.port_file)
server.serve_forever()
