"""A web server for seer-rs's tests: Python's standard server over a folder, read-only, with
paths that misbehave on purpose.

    python3 web_server.py PORT FOLDER

- GET and HEAD serve FOLDER's files (404 for anything else, as for a missing object);
- /forbidden/NAME answers 403, as a bucket does to credentials that may not read there;
- /slow/NAME serves NAME after 15 s;
- /signed/NAME serves NAME only with the query ?sig=abc, as a presigned URL;
- /nolength/NAME serves NAME without a Content-Length, as dynamic servers do;
- PROPFIND (a WebDAV listing) answers 404: nothing is listed;
- PUT, POST and DELETE answer 403: nothing can be written, as in a read-only bucket.
"""

import functools
import http.server
import sys
import time


class Server(http.server.SimpleHTTPRequestHandler):
    def answer(self, status):
        # Read any body first, so that the client sees the answer, not a reset connection.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
            return
        if self.path.startswith("/slow/"):
            time.sleep(15)
            self.path = self.path[len("/slow"):]
        if self.path.startswith("/signed/"):
            name, _, query = self.path[len("/signed"):].partition("?")
            if query != "sig=abc":
                self.send_error(403)
                return
            self.path = name
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
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
