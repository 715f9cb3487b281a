"""Downloads against a loopback HTTP server (127.0.0.1 only): full, interrupted + resumed, corrupt, offline,
and the named datasets (WikiText parquet -> articles) on fixture files the tests make."""

import gzip
import hashlib
import http.server
import json
import socket
import threading

import pytest

from llm import download as dl
from llm.data import prepare
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


# ----------------------------------------------------------------------------- the named datasets

WIKI_ARTICLES = [
    [" = Alpha Beta = \n", "", " Alpha is the first letter . \n", "", " = = History = = \n", "", " It came from Aleph . \n"],
    [" = Gamma = \n", "", " Gamma is the third . It has an = sign in 1 = 1 . \n"],
    [" = Delta ( river ) = \n", "", " = = = Course = = = \n", " The river runs south . \n", ""],
]


def _wiki_rows(articles):
    return [row for a in articles for row in ["", *a]]  # WikiText opens every article with an empty row


def _expected(articles):  # each article's rows joined and stripped, then a separator line
    return "".join("".join(a).strip() + "\n<|endoftext|>\n" for a in articles)


def _parquet_bytes(rows, tmp_path, name):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    import pyarrow as pa

    path = tmp_path / "fixtures" / name
    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path, row_group_size=4)
    return path.read_bytes()


@pytest.fixture
def wikitext(server, tmp_path, monkeypatch):
    """A WikiText-shaped dataset on the loopback server: train in two shards (the second article runs across
    the cut), valid and test; pinned sizes and hashes as in the real table."""
    rows = _wiki_rows(WIKI_ARTICLES)
    files = {
        "train-00000-of-00002.parquet": _parquet_bytes(rows[:12], tmp_path, "a"),
        "train-00001-of-00002.parquet": _parquet_bytes(rows[12:], tmp_path, "b"),
        "validation-00000-of-00001.parquet": _parquet_bytes(_wiki_rows(WIKI_ARTICLES[1:2]), tmp_path, "c"),
        "test-00000-of-00001.parquet": _parquet_bytes(_wiki_rows(WIKI_ARTICLES[2:]), tmp_path, "d"),
    }
    remotes = []
    for name, body in files.items():
        server.files[f"/w/{name}"] = body
        remotes.append(Remote(f"{server.url}/w/{name}", name, len(body), hashlib.sha256(body).hexdigest()))
    monkeypatch.setitem(dl.DATASETS, "wikitext-2", remotes)
    return files


def test_wikitext_download_joins_rows_into_articles(wikitext, server, tmp_path, capsys):
    assert dl.main(["wikitext-2", "--out", str(tmp_path / "d")]) == 0
    out = tmp_path / "d" / "wikitext-2"
    assert (out / "train.txt").read_text() == _expected(WIKI_ARTICLES), "the article cut across shards is one article"
    assert (out / "valid.txt").read_text() == _expected(WIKI_ARTICLES[1:2])
    assert (out / "test.txt").read_text() == _expected(WIKI_ARTICLES[2:])
    res = capsys.readouterr()
    assert json.loads(res.out)["text_files"] == [str(out / n) for n in ("train.txt", "valid.txt", "test.txt")]
    assert f"--input {out / 'train.txt'} --val-input {out / 'valid.txt'}" in res.err
    n = len(server.requests)
    assert dl.main(["wikitext-2", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert len(server.requests) == n, "a rerun downloads nothing"
    meta = prepare(out / "train.txt", tmp_path / "p", 300, val_input=out / "valid.txt", quiet=True)
    assert meta["train_documents"] == 3 and meta["val_documents"] == 1


def test_wikitext_articles_cut_only_at_titles():
    lines = [" = A = \n", " x = y = z \n", " = = B = = \n", "= not a title =\n", " = C = \n", "c\n"]
    assert list(dl.wikitext_articles(lines)) == ["= A = \n x = y = z \n = = B = = \n= not a title =", "= C = \nc"]


def test_named_dataset_interrupted_resumes_and_corrupt_is_not_kept(wikitext, server, tmp_path, capsys):
    server.cut_after = 300  # the first response hangs up early: the same command goes on with a Range request
    assert dl.main(["wikitext-2", "--out", str(tmp_path), "--quiet"]) == 0
    assert ("/w/train-00000-of-00002.parquet", "bytes=300-") in server.requests
    assert (tmp_path / "wikitext-2" / "train.txt").read_text() == _expected(WIKI_ARTICLES)
    server.corrupt = True  # a flipped byte: the pinned sha256 catches it, and nothing half-good stays
    assert dl.main(["wikitext-2", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train-00000-of-00002.parquet: sha256 ") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "c" / "wikitext-2").iterdir()) == []


def test_unpinned_hash_is_recorded_then_checked(server, tmp_path, monkeypatch, capsys):
    server.files["/t/train.txt"] = b"one story\n<|endoftext|>\n" * 100
    monkeypatch.setitem(dl.DATASETS, "tinystories", [Remote(server.url + "/t/train.txt", "train.txt")])
    assert dl.main(["tinystories", "--out", str(tmp_path), "--quiet"]) == 0
    record = tmp_path / "tinystories" / "train.txt.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(server.files["/t/train.txt"]).hexdigest()
    (tmp_path / "tinystories" / "train.txt").unlink()
    server.files["/t/train.txt"] = b"another story\n<|endoftext|>\n" * 100  # the host changed it
    assert dl.main(["tinystories", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the hash recorded at the first download" in err and err.count("\n") == 1
    assert not (tmp_path / "tinystories" / "train.txt").exists()


def test_wikitext_without_pyarrow_is_one_line_before_any_request(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl, "pyarrow_module", lambda: None)
    assert dl.main(["wikitext-103", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: wikitext-103 comes as parquet, which needs pyarrow: "
                                       "uv sync --extra parquet (or pip install pyarrow)\n")
    assert server.requests == [] and not (tmp_path / "wikitext-103").exists()
