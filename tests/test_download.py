"""Downloads against a loopback HTTP server (127.0.0.1 only): full, interrupted + resumed, corrupt, offline."""

import gzip
import hashlib
import http.server
import socket
import threading

import pytest

from llm import download as dl
from llm.download import DownloadError, Remote, download_file, fetch


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]``; honours Range; can cut the first response short or flip a byte."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if srv.corrupt:
            body = body[:10] + bytes([body[10] ^ 0xFF]) + body[11:]
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.cut_after is not None:  # announce the full length, send part of it, hang up
            payload, srv.cut_after = payload[: srv.cut_after], None
            self.wfile.write(payload)
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.corrupt, srv.cut_after, srv.honour_range = {}, [], False, None, True
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _payload(n: int = 300_000) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32) + b"tail"


def test_full_download(server, tmp_path):
    body = _payload()
    server.files["/f.txt"] = body
    info = download_file(server.url + "/f.txt", tmp_path / "f.txt", expected_sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert (tmp_path / "f.txt").read_bytes() == body
    assert info["sha256"] == hashlib.sha256(body).hexdigest() and info["bytes"] == len(body)
    assert not (tmp_path / "f.txt.part").exists()
    assert server.requests == [("/f.txt", None)]


def test_interrupted_then_resumed(server, tmp_path):
    body = _payload()
    server.files["/f.txt"] = body
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match="rerun the same command to resume"):
        download_file(server.url + "/f.txt", tmp_path / "f.txt", retries=0, progress=False, chunk_size=8192)
    part = tmp_path / "f.txt.part"
    assert part.stat().st_size == 100_000 and not (tmp_path / "f.txt").exists()
    info = download_file(server.url + "/f.txt", tmp_path / "f.txt", retries=0, progress=False)
    assert (tmp_path / "f.txt").read_bytes() == body
    assert info["resumed_from"] == 100_000
    assert server.requests[-1] == ("/f.txt", "bytes=100000-"), "the second request asks only for the rest"


def test_retry_resumes_within_one_call(server, tmp_path):
    body = _payload()
    server.files["/f.txt"] = body
    server.cut_after = 50_000
    download_file(server.url + "/f.txt", tmp_path / "f.txt", retries=2, backoff=0.0, progress=False, chunk_size=4096)
    assert (tmp_path / "f.txt").read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = _payload()
    server.files["/f.txt"] = body
    server.honour_range = False
    (tmp_path / "f.txt.part").write_bytes(b"stale bytes from elsewhere")
    download_file(server.url + "/f.txt", tmp_path / "f.txt", progress=False)
    assert (tmp_path / "f.txt").read_bytes() == body


def test_complete_part_file_is_finished(server, tmp_path):
    body = _payload(1000)
    server.files["/f.txt"] = body
    (tmp_path / "f.txt.part").write_bytes(body)  # finished transfer, killed before the rename
    download_file(server.url + "/f.txt", tmp_path / "f.txt", progress=False)
    assert (tmp_path / "f.txt").read_bytes() == body


def test_corrupted_download_detected(server, tmp_path):
    body = _payload()
    server.files["/f.txt"] = body
    server.corrupt = True
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download_file(server.url + "/f.txt", tmp_path / "f.txt", expected_sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert not (tmp_path / "f.txt").exists() and not (tmp_path / "f.txt.part").exists()
    server.corrupt = False
    with pytest.raises(DownloadError, match="expected 5"):
        download_file(server.url + "/f.txt", tmp_path / "f.txt", expected_size=5, progress=False)


def test_http_error_and_offline(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url + "/missing", tmp_path / "m.txt", progress=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now: connection refused, like being offline
    with pytest.raises(DownloadError, match="cannot reach 127.0.0.1.*rerun"):
        download_file(f"http://127.0.0.1:{port}/f.txt", tmp_path / "f.txt", progress=False)


def test_gz_is_unpacked_and_rerun_skips(server, tmp_path, capsys):
    text = b"hello world\n<|endoftext|>\n" * 1000
    server.files["/owt_valid.txt.gz"] = gzip.compress(text)
    r = Remote(server.url + "/owt_valid.txt.gz", "owt_valid.txt")
    info = fetch(r, tmp_path, progress=False)
    assert (tmp_path / "owt_valid.txt").read_bytes() == text and info["unpacked_bytes"] == len(text)
    assert not (tmp_path / "owt_valid.txt.gz").exists()
    n = len(server.requests)
    assert fetch(r, tmp_path, progress=False)["skipped"]
    assert len(server.requests) == n


def test_cli(server, tmp_path, capsys, monkeypatch):
    body = b"once upon a time\n<|endoftext|>\n" * 50
    server.files["/a/train.txt"] = body
    server.files["/a/valid.txt"] = body[:62]
    rc = dl.main(["tinystories", "--out", str(tmp_path), "--url", server.url + "/a/train.txt", "--url", server.url + "/a/valid.txt"])
    assert rc == 0
    assert (tmp_path / "tinystories" / "train.txt").read_bytes() == body
    assert "--val-input" in capsys.readouterr().err
    # --mirror swaps the host of the built-in URLs (here: to the loopback server, which lacks them).
    monkeypatch.setattr(dl, "DATASETS", {"tinystories": [Remote("https://example.invalid/a/train.txt", "x.txt")]})
    (tmp_path / "tinystories" / "train.txt").unlink()
    rc = dl.main(["tinystories", "--out", str(tmp_path / "m"), "--mirror", server.url, "--quiet"])
    assert rc == 0 and (tmp_path / "m" / "tinystories" / "x.txt").read_bytes() == body
    rc = dl.main(["tinystories", "--out", str(tmp_path), "--url", server.url + "/nope.txt", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_progress_line(capsys):
    bar = dl._Progress("f.txt", 2_000_000, 0, True)
    bar.update(1_000_000, final=True)
    err = capsys.readouterr().err
    assert "50.0%" in err and "MB/s" in err and "ETA" in err
