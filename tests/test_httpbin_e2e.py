"""httpbin as the origin: what a producer gets back for redirects, compressed bodies, ETags,
basic auth, slow bodies and non-ASCII URLs, from a server nobody here wrote."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid
import zlib
from pathlib import Path

import pytest

from tests.conftest import failure, run, submit
from tests.harness import wait_for


def _file(worker, result) -> bytes:
    return (Path(worker.download_dir) / result["path"]).read_bytes()


@pytest.mark.parametrize(
    ("path", "encoding", "decode"),
    [
        ("/gzip", "gzip", gzip.decompress),
        ("/deflate", "deflate", zlib.decompress),
        ("/brotli", "br", None),
    ],
)
def test_compressed_bodies_are_kept_as_sent_and_said(
    client, worker, httpbin, path, encoding, decode
):
    result = run(client, worker, url=f"{httpbin.url}{path}", dest=f"enc/{uuid.uuid4().hex}")
    assert result["content_encoding"] == encoding
    data = _file(worker, result)
    assert result["size"] == len(data) and result["sha256"] == hashlib.sha256(data).hexdigest()
    if decode is not None:  # the stored bytes are the encoded body: decoding them gives the JSON
        echoed = json.loads(decode(data))
        assert echoed.get("gzipped") or echoed.get("deflated")


def test_an_identity_body_has_no_content_encoding(client, worker, httpbin):
    result = run(client, worker, url=f"{httpbin.url}/range/1000", dest=f"enc/{uuid.uuid4().hex}")
    assert result["content_encoding"] is None and result["size"] == 1000


def test_redirects_are_followed_and_final_url_is_where_the_body_came_from(client, worker, httpbin):
    url = f"{httpbin.url}/redirect-to?url=/range/2000&status_code=307"
    result = run(client, worker, url=url, dest=f"redir/{uuid.uuid4().hex}")
    assert result["url"] == url and result["final_url"] == f"{httpbin.url}/range/2000"
    assert result["size"] == 2000 and result["http_status"] == 200
    chain = run(
        client, worker, url=f"{httpbin.url}/relative-redirect/3", dest=f"redir/{uuid.uuid4().hex}"
    )
    assert chain["final_url"] == f"{httpbin.url}/get"


def test_an_etag_makes_the_second_submission_a_304(client, worker, httpbin):
    url, dest = f"{httpbin.url}/etag/v1-{uuid.uuid4().hex}", f"etag/{uuid.uuid4().hex}.json"
    first = run(client, worker, url=url, dest=dest)
    assert first["http_status"] == 200 and first["skipped"] is False
    second = run(client, worker, url=url, dest=dest)
    if second["http_status"] == 200:  # no user xattrs on this file system: downloaded again
        pytest.skip("the download directory keeps no user xattrs")
    assert second["http_status"] == 304 and second["skipped"] is True
    assert second["sha256"] == first["sha256"]


def test_basic_auth_from_headers_or_the_url(client, worker, httpbin):
    user, password = "alice", f"pw-{uuid.uuid4().hex}"
    url = f"{httpbin.url}/basic-auth/{user}/{password}"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    ok = run(
        client,
        worker,
        url=url,
        dest=f"auth/{uuid.uuid4().hex}",
        headers={"Authorization": f"Basic {token}"},
    )
    assert json.loads(_file(worker, ok)) == {"authenticated": True, "user": user}
    in_url = url.replace("http://", f"http://{user}:{password}@")
    ok2 = run(client, worker, url=in_url, dest=f"auth/{uuid.uuid4().hex}")
    assert ok2["url"] == url.replace("http://", f"http://{user}:***@")
    state, message = failure(client, worker, url=url, dest=f"auth/{uuid.uuid4().hex}")
    assert state == "FAILURE" and "HTTP 401" in message
    assert password not in worker.log().replace(f"/basic-auth/{user}/{password}", "")


def test_a_slow_body_reports_progress(client, worker, httpbin):
    url = f"{httpbin.url}/drip?numbytes=3000&duration=1.5&delay=0&code=200"
    res = submit(client, worker, url=url, dest=f"slow/{uuid.uuid4().hex}")
    info = wait_for(lambda: res.state == "PROGRESS" and res.info, 30, "PROGRESS from a drip")
    assert info["total"] == 3000 and 0 < info["bytes"] <= 3000
    result = res.get(timeout=30)
    assert result["size"] == 3000 and result["url"] == url  # `code=200` is no secret


def test_a_non_ascii_url_keeps_its_text_and_gets_a_readable_name(client, worker, httpbin):
    url = f"{httpbin.url}/anything/猫の写真.json?名前=値&author=bob#top"
    result = run(client, worker, url=url)
    assert result["url"] == url and result["final_url"] == url
    assert result["path"].startswith("猫の写真-") and result["path"].endswith(".json")
    echoed = json.loads(_file(worker, result))
    assert echoed["args"] == {"名前": "値", "author": "bob"}
