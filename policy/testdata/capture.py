#!/usr/bin/env python3
"""Captures the first bytes real TLS clients send (their ClientHello) on 127.0.0.1.

Regenerate with: python3 policy/testdata/capture.py policy/testdata [NAME...]
Each client connects to a local listener that records up to 4 KiB (or until the client stops
sending for 1 s), then closes; the client's handshake fails, which is expected.
"""
import os, socket, subprocess, sys, threading

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
HOST = "api.allowed.test"


ONLY = set(sys.argv[2:])


def capture(name, run_client):
    if ONLY and name not in ONLY:
        return
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    got = {}

    def serve():
        c, _ = ls.accept()
        c.settimeout(1.0)
        buf = b""
        try:
            while len(buf) < 4096:
                d = c.recv(4096 - len(buf))
                if not d:
                    break
                buf += d
        except socket.timeout:
            pass
        got["data"] = buf
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    run_client(port)
    t.join(10)
    ls.close()
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(got["data"])
    print(name, len(got["data"]))


def sh(*cmd, stdin=None):
    subprocess.run(cmd, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)


def curl(flag):
    return lambda p: sh("curl", "-sk", flag, "--max-time", "3", "--resolve", f"{HOST}:{p}:127.0.0.1", f"https://{HOST}:{p}/")


def s_client(*extra):
    return lambda p: sh("openssl", "s_client", "-connect", f"127.0.0.1:{p}", *extra, stdin=b"")


def python_ssl(p):
    import ssl
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    s = socket.create_connection(("127.0.0.1", p))
    try:
        ctx.wrap_socket(s, server_hostname=HOST)
    except Exception:
        pass


def node(p):
    js = f"""const tls=require('tls');const s=tls.connect({{host:'127.0.0.1',port:{p},servername:'{HOST}',ALPNProtocols:['h2','http/1.1']}});s.on('error',()=>{{}});"""
    sh("node", "-e", js)


capture("curl_http1.1", curl("--http1.1"))
capture("curl_http2", curl("--http2"))
capture("openssl_alpn", s_client("-servername", HOST, "-alpn", "h2,http/1.1"))
capture("openssl_nosni", s_client("-noservername"))
capture("openssl_tls12", s_client("-servername", HOST, "-tls1_2"))
capture("openssl_unicode_sni", s_client("-servername", "xn--bcher-kva.allowed.test"))
capture("python_ssl", python_ssl)
capture("curl_plain_http", lambda p: sh("curl", "-s", "--max-time", "3", "--resolve", f"{HOST}:{p}:127.0.0.1", f"http://{HOST}:{p}/"))
capture("node_tls", node)
