"""A web server for seer-rs's tests: Python's standard server over a folder, read-only, with
paths that misbehave on purpose.

    python3 web_server.py PORT FOLDER [CERT KEY]

With CERT and KEY (PEM files) it speaks HTTPS. tls/cert.pem and tls/key.pem are a self-signed
certificate for 127.0.0.1 made for these tests (a client must refuse it unless told to accept
invalid certificates), by `openssl req -x509 -newkey rsa:2048 -nodes -subj "/CN=seer-rs test
server" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -addext
"basicConstraints=critical,CA:FALSE" -days 36500 -keyout key.pem -out cert.pem`.

- GET and HEAD serve FOLDER's files (404 for anything else, as for a missing object);
- /forbidden/NAME answers 403, as a bucket does to credentials that may not read there;
- /slow/NAME serves NAME after 15 s;
- /signed/NAME serves NAME only with the query ?sig=abc, as a presigned URL;
- /nolength/NAME serves NAME without a Content-Length, as dynamic servers do;
- /status/CODE/NAME answers CODE (a client or server error);
- /busy/NAME answers the first request for it 503 with `Retry-After: 3`, then serves NAME;
- /busydate/NAME does the same with the wait as an HTTP date;
- /toobusy/NAME always answers 429 with `Retry-After: 3600`;
- /tofile/NAME redirects (302) to file:///etc/passwd, which a client must not follow;
- /moved/PATH redirects (302) to /PATH on the same server;
- /changing/NAME serves NAME with bytes appended that differ on every request (after a JPEG's
  end, where decoders stop), as an endpoint that answers another image each time;
- /agent/NAME serves NAME only to the User-Agent `seer-test-agent` (403 otherwise);
- as an HTTP proxy, it serves NAME for any http://HOST/viaproxy/NAME, whatever HOST is;
  /viaproxy/NAME asked of it directly, not as a proxy, answers 403;
- PROPFIND (a WebDAV listing) answers 404: nothing is listed;
- PUT, POST and DELETE answer 403: nothing can be written, as in a read-only bucket.
"""

import email.utils
import functools
import http.server
import re
import ssl
import sys
import threading
import time

# Paths already answered "busy" once.
busy_seen = set()
busy_lock = threading.Lock()


class Server(http.server.SimpleHTTPRequestHandler):
    def answer(self, status, headers=()):
        """An empty answer with `status` and `headers` (name, value pairs)."""
        # Read any body first, so that the client sees the answer, not a reset connection.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        # A proxy is asked for absolute URLs; only /viaproxy/ paths are served that way.
        proxied = re.match(r"http://[^/]+(/viaproxy/.*)", self.path)
        if proxied:
            self.path = proxied.group(1)[len("/viaproxy"):]
        elif self.path.startswith("/viaproxy/"):
            self.send_error(403)
            return
        if self.path.startswith("/agent/"):
            if self.headers.get("User-Agent") != "seer-test-agent":
                self.send_error(403)
                return
            self.path = self.path[len("/agent"):]
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
            return
        status = re.match(r"/status/(\d{3})/", self.path)
        if status:
            self.send_error(int(status.group(1)))
            return
        if self.path.startswith("/moved/"):
            self.answer(302, [("Location", self.path[len("/moved"):])])
            return
        if self.path.startswith("/tofile/"):
            self.answer(302, [("Location", "file:///etc/passwd")])
            return
        if self.path.startswith("/toobusy/"):
            self.answer(429, [("Retry-After", "3600")])
            return
        for prefix in ("/busy/", "/busydate/"):
            if self.path.startswith(prefix):
                with busy_lock:
                    first = self.path not in busy_seen
                    busy_seen.add(self.path)
                if first:
                    wait = "3" if prefix == "/busy/" else email.utils.formatdate(time.time() + 3, usegmt=True)
                    self.answer(503, [("Retry-After", wait)])
                    return
                self.path = self.path[len(prefix) - 1:]
        if self.path.startswith("/slow/"):
            time.sleep(15)
            self.path = self.path[len("/slow"):]
        if self.path.startswith("/signed/"):
            name, _, query = self.path[len("/signed"):].partition("?")
            if query != "sig=abc":
                self.send_error(403)
                return
            self.path = name
        if self.path.startswith("/changing/"):
            with open(self.translate_path(self.path[len("/changing"):]), "rb") as file:
                body = file.read() + str(time.time_ns()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/nolength/"):
            with open(self.translate_path(self.path[len("/nolength"):]), "rb") as file:
                body = file.read()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        super().do_GET()

    def do_PROPFIND(self):
        self.answer(404)

    def do_PUT(self):
        self.answer(403)

    do_POST = do_DELETE = do_PUT

    def log_message(self, *args):
        pass


handler = functools.partial(Server, directory=sys.argv[2])
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler)
if len(sys.argv) > 3:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    # The handshake happens in the request's thread, so a client that never completes one
    # (the test's readiness probe) holds up no other.
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
server.serve_forever()
