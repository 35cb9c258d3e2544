"""The demo upstream of `cargo xtask run`: an HTTPS server standing in for a third-party API.

It runs inside its own network namespace, prints every request it receives (headers included:
this is the side that is meant to get the real value) to stdout and to a log file, and answers
with a short JSON summary. `GET /echo` answers with the request headers themselves, to show
veil scrubbing a value an upstream sends back.

Usage: demo-upstream.py CERT KEY PORT LOG
"""

import http.server
import json
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "veil-demo-upstream"

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        lines = [f"demo-upstream: {self.command} {self.path} (from {self.client_address[0]})"]
        lines += [f"demo-upstream:   {k}: {v}" for k, v in self.headers.items()]
        if body:
            lines.append(f"demo-upstream:   body: {body}")
        text = "\n".join(lines) + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(text)
        if self.path.startswith("/echo"):
            answer = {"you_sent": dict(self.headers.items()), "body": body}
        else:
            answer = {
                "upstream": "veil demo upstream",
                "received": f"{self.command} {self.path}",
                "headers": sorted(k.lower() for k in self.headers.keys()),
                "note": "header values are printed in the `cargo xtask run` terminal",
            }
        data = (json.dumps(answer, indent=2) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    cert, key, port, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"demo-upstream: listening on port {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
