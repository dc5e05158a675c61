"""A stand-in for the Hugging Face hub on 127.0.0.1, answering as the real one does (for the tests; HF_ENDPOINT).

    HEAD/GET /{org}/{repo}/resolve/{rev}/{file}  -> 200 with X-Repo-Commit and ETag (small files), or a 302 to
                                                    the "CDN" port with X-Linked-Etag / X-Linked-Size (large files)
    GET /blob/{sha256} (on the CDN port)         -> the bytes; Range requests get 206
    unknown repo -> 401 X-Error-Code RepoNotFound; unknown file -> 404 X-Error-Code EntryNotFound
Requests in absolute form (`GET http://host/...`, as a client sends them to an HTTP proxy) are served the same,
so the stub doubles as a proxy. Every request is recorded in `requests`. `faults[(repo, file)]` makes one file
answer 403 (gated), 5xx, or "truncate" (the CDN sends half the bytes and hangs up; a resume gets nothing).
"""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LARGE = 10 * 2**20  # files from this size on are "LFS" files, served through the CDN redirect


class HubStub:
    def __init__(self):
        self.files, self.blobs, self.faults, self.requests = {}, {}, {}, []
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]
        for t in self.threads:
            t.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.hub.server_port}"

    def add(self, repo, filename, path):
        """Serve the file at `path` as `filename` of `repo`."""
        with open(path, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
        self.files[(repo, filename)] = dict(data=data, sha256=sha, git_sha=hashlib.sha1(data).hexdigest())
        self.blobs[sha] = data

    def stop(self):
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    def handler(stub):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, code, headers=(), body=b""):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)) if code != 206 or body else "0")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = urlparse(self.path).path  # absolute form (through a proxy) or origin form
                stub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[0] == "blob":
                    return self.blob(parts[1])
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.send(404, [("X-Error-Code", "EntryNotFound")])
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                commit = [("X-Repo-Commit", COMMIT)]
                if not any(r == repo for r, _ in stub.files):
                    return self.send(401, [("X-Error-Code", "RepoNotFound"),
                                           ("X-Error-Message", "Repository not found")])
                fault = stub.faults.get((repo, filename))
                if fault == 403:
                    return self.send(403, commit + [("X-Error-Code", "GatedRepo"),
                                                    ("X-Error-Message", "Access to model is restricted")])
                if isinstance(fault, int):
                    return self.send(fault, commit)
                f = stub.files.get((repo, filename))
                if f is None:
                    return self.send(404, commit + [("X-Error-Code", "EntryNotFound"),
                                                    ("X-Error-Message", "Entry not found")])
                if len(f["data"]) >= LARGE or fault == "truncate":
                    cdn = f"http://127.0.0.1:{stub.cdn.server_port}/blob/{f['sha256']}"
                    return self.send(302, commit + [("Location", cdn), ("ETag", f'"{f["git_sha"]}"'),
                                                    ("X-Linked-Etag", f'"{f["sha256"]}"'),
                                                    ("X-Linked-Size", str(len(f["data"])))])
                self.send(200, commit + [("ETag", f'"{f["git_sha"]}"')], f["data"])

            def blob(self, sha):
                data = stub.blobs.get(sha)
                if data is None:
                    return self.send(404)
                truncated = any(stub.faults.get(k) == "truncate" for k, f in stub.files.items()
                                if f["sha256"] == sha)
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
                if truncated:
                    if start:  # a resume: hang up without an answer
                        self.close_connection = True
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.close_connection = True
                    return
                if start:
                    return self.send(206, [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")],
                                     data[start:])
                self.send(200, [], data)

        return Handler
