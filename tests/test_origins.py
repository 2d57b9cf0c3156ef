"""Origins one by one (file, HTTP, S3 against real servers) and the chain's first-hit-wins and error rules."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import boto3
import pytest

from service.config import ConfigError, Limits, parse_config
from service.errors import BadGateway, GatewayTimeout, NotFound, TooLarge
from service.origins import FileOrigin, HttpOrigin, OriginChain, OriginFailure, OriginTimeout, S3Origin, make_origin
from tests.support import AWS_ENV, CountingProxy, moto_s3, s3_client


def test_file_origin_reads_and_never_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b.jpg").write_bytes(b"image")
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "link").symlink_to(tmp_path / "secret")
    origin = FileOrigin(f"file://{root}", Limits())
    assert origin.fetch("a/b.jpg") == b"image"
    assert origin.fetch("a/missing.jpg") is None
    assert origin.fetch("a") is None  # a folder is not an original
    assert origin.fetch("link") is None  # a symlink out of the root is not followed out
    with pytest.raises(TooLarge):
        FileOrigin(f"file://{root}", Limits(max_original_bytes=3)).fetch("a/b.jpg")


def test_http_origin_statuses_and_timeouts() -> None:
    server = CountingProxy(files={"/up/new photo.jpg": b"fresh"})
    try:
        origin = HttpOrigin(server.url + "/up", Limits(origin_read_timeout=0.5))
        assert origin.fetch("new photo.jpg") == b"fresh"
        assert origin.fetch("other.jpg") is None
        server.status = 500
        with pytest.raises(OriginFailure):
            origin.fetch("new photo.jpg")
        server.status, server.delay = None, 1.5
        with pytest.raises(OriginTimeout):
            origin.fetch("new photo.jpg")
    finally:
        server.close()
    with pytest.raises(OriginFailure):  # nothing listens there any more
        HttpOrigin(server.url, Limits()).fetch("x.jpg")


def test_s3_origin_with_prefix(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="origin-unit")
    client.put_object(Bucket="origin-unit", Key="pre/x/y.jpg", Body=b"s3 bytes")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    config = parse_config({"origins": ["s3://origin-unit/pre"], "presets": {"s": {"width": 1}}}, {})
    origin = make_origin(config.origins[0], config)
    assert origin.fetch("x/y.jpg") == b"s3 bytes"
    assert origin.fetch("x/none.jpg") is None
    with pytest.raises(OriginFailure):
        make_origin("s3://no-such-bucket", config).fetch("x/y.jpg")


def test_s3_forbidden_can_mean_missing(logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``?forbidden=missing`` reads 403 AccessDenied as "not here"; by default it stays a failure (502).

    Real S3 answers AccessDenied for a missing key when the reader lacks s3:ListBucket. moto (5.2) does not: with
    IAM enforced it checks s3:GetObject against the key's ARN and then answers 404 NoSuchKey, ListBucket or not.
    So the 403 comes from a policy granting GetObject under ``originals/public/`` only: a key outside it is the
    same AccessDenied answer a missing key gets from S3.
    """
    with moto_s3(logs) as endpoint:  # its own moto: IAM is enforced below, which the session's must not be
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        s3_client(endpoint).create_bucket(Bucket="iam-unit")
        s3_client(endpoint).put_object(Bucket="iam-unit", Key="originals/public/a.jpg", Body=b"granted")
        iam = boto3.client("iam")
        iam.create_user(UserName="reader")
        policy = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::iam-unit/originals/public/*"}
        iam.put_user_policy(
            UserName="reader",
            PolicyName="get-public",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # From now on every request is authenticated and authorised (moto's own switch, as its decorator uses).
        switch = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", b"0", {"Content-Type": "text/plain"})
        urllib.request.urlopen(switch).close()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        config = parse_config({"origins": ["s3://iam-unit/originals"], "presets": {"s": {"width": 1}}}, {})
        lenient = make_origin("s3://iam-unit/originals?forbidden=missing", config)
        strict = make_origin("s3://iam-unit/originals", config)
        assert lenient.fetch("public/a.jpg") == strict.fetch("public/a.jpg") == b"granted"  # prefix without query
        assert lenient.fetch("public/none.jpg") is None and strict.fetch("public/none.jpg") is None  # moto's 404
        assert lenient.fetch("private/b.jpg") is None
        with pytest.raises(NotFound):
            OriginChain([lenient]).fetch("private/b.jpg")
        with pytest.raises(OriginFailure, match="AccessDenied"):
            strict.fetch("private/b.jpg")
        with pytest.raises(BadGateway):
            OriginChain([strict]).fetch("private/b.jpg")
        # Bad credentials are a 403 too (SignatureDoesNotMatch), but never read as missing.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(OriginFailure, match="SignatureDoesNotMatch"):
            make_origin("s3://iam-unit/originals?forbidden=missing", config).fetch("private/b.jpg")


def test_s3_options_are_checked() -> None:
    config = parse_config({"origins": ["s3://b"], "presets": {"s": {"width": 1}}}, {})
    assert S3Origin("s3://b/pre/fix?forbidden=missing", Limits(), 1).prefix == "pre/fix"
    assert not S3Origin("s3://b?forbidden=failure", Limits(), 1).forbidden_is_missing
    for url in (
        "s3://b/p?forbiden=missing",
        "s3://b/p?forbidden=maybe",
        "s3://b/p?forbidden",
        "s3://b/p?forbidden=missing&forbidden=failure",
        "s3://b/p?forbidden=missing&x=1",
    ):
        with pytest.raises(ConfigError, match="forbidden=failure or forbidden=missing"):
            make_origin(url, config)


class Fake:
    """A stand-in origin for the chain's own rules (a unit test of one module)."""

    def __init__(self, result: bytes | Exception | None) -> None:
        self.url = "fake://"
        self.result = result
        self.calls = 0

    def fetch(self, key: str) -> bytes | None:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_chain_first_hit_wins_in_order() -> None:
    first, second, third = Fake(None), Fake(b"two"), Fake(b"three")
    original = OriginChain([first, second, third]).fetch("k")
    assert original.data == b"two" and len(original.digest) == 32
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)


def test_chain_errors() -> None:
    with pytest.raises(NotFound):
        OriginChain([Fake(None), Fake(None)]).fetch("k")
    # A failure anywhere means the key may exist: never a (cacheable) 404.
    with pytest.raises(BadGateway):
        OriginChain([Fake(OriginFailure("boom")), Fake(None)]).fetch("k")
    with pytest.raises(GatewayTimeout):
        OriginChain([Fake(OriginTimeout("slow")), Fake(OriginTimeout("slow"))]).fetch("k")
    with pytest.raises(BadGateway):
        OriginChain([Fake(OriginTimeout("slow")), Fake(OriginFailure("boom"))]).fetch("k")
    assert OriginChain([Fake(OriginFailure("boom")), Fake(b"ok")]).fetch("k").data == b"ok"
