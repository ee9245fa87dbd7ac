"""Unit tests of the credential response parser and the provider's refresh and wait rules."""

import datetime as dt
import json

import pytest
import trio
import trio.testing

from minerva_mount.credentials import CredentialProvider, Credentials, parse_response
from minerva_mount.errors import CredentialError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEJr-session-token"


def body(**changes) -> dict:
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    doc = {
        "credentials": {"aws_region": "us-east-1", "aws_key_id": "ASIAEXAMPLE",
                        "aws_secret_access_key": SECRET, "aws_session_token": TOKEN,
                        "aws_session_expiration": expires},
        "bucket_info": {"name": "bucket", "prefix": "acme/", "uri": "s3://bucket/acme/"},
    }
    for path, value in changes.items():
        section, field = path.split("__")
        if value is None:
            del doc[section][field]
        else:
            doc[section][field] = value
    return doc


def parse(doc) -> Credentials:
    return parse_response(json.dumps(doc).encode())


def test_documented_body_parses():
    creds = parse(body())
    assert (creds.bucket, creds.prefix, creds.region) == ("bucket", "acme/", "us-east-1")
    assert 3500 < creds.seconds_left() <= 3600
    assert SECRET not in repr(creds) and TOKEN not in repr(creds)


@pytest.mark.parametrize("changes, message", [
    ({"credentials__aws_session_token": None}, "missing field 'aws_session_token'"),
    ({"bucket_info__prefix": None}, "missing field 'prefix'"),
    ({"credentials__aws_session_expiration": "next tuesday"}, "not an ISO 8601 date"),
    ({"credentials__aws_session_expiration": "2001-01-01T00:00:00+00:00"}, "expiry in the past"),
    ({"bucket_info__prefix": "acme"}, "is not of the form 'org/'"),
    ({"bucket_info__uri": "s3://bucket/globex/"}, "uri does not match"),
    ({"credentials__aws_key_id": ""}, "'aws_key_id' is empty"),
])
def test_malformed_bodies_get_a_clear_error_without_secrets(changes, message):
    with pytest.raises(CredentialError) as info:
        parse(body(**changes))
    assert message in str(info.value)
    assert SECRET not in str(info.value) and TOKEN not in str(info.value)


def test_not_json_is_refused():
    with pytest.raises(CredentialError, match="not the documented JSON"):
        parse_response(b"<html>gateway timeout</html>")


def creds_for(seconds: float) -> Credentials:
    return parse(body(credentials__aws_session_expiration=(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()))


def test_fatal_error_at_start_ends_start_at_once():
    def refuse(url, key):
        raise CredentialError("the Minerva API key was refused (401 unauthorized)", fatal=True)

    async def main():
        provider = CredentialProvider("http://x", "k", fetcher=refuse)
        with pytest.raises(CredentialError, match="401"):
            async with trio.open_nursery() as nursery:
                await nursery.start(provider.start)
    with pytest.raises(ExceptionGroup) as group:
        trio.run(main)
    assert group.group_contains(CredentialError)


def test_transient_errors_at_start_are_retried():
    calls = []

    def flaky(url, key):
        calls.append(1)
        if len(calls) < 3:
            raise CredentialError("credential endpoint answered 500 internal_error")
        return creds_for(3600)

    async def main():
        provider = CredentialProvider("http://x", "k", fetcher=flaky)
        async with trio.open_nursery() as nursery:
            creds = await nursery.start(provider.start)
            assert creds.prefix == "acme/"
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(calls) == 3


def test_get_waits_for_a_bounded_time_then_fails_with_the_cause():
    async def main():
        provider = CredentialProvider("http://x", "k", wait_timeout=30, fetcher=None)
        provider.current = creds_for(1)  # too close to expiry to sign with
        provider.last_error = CredentialError("credential endpoint answered 500 internal_error")
        with pytest.raises(CredentialError, match="after 30 s: credential endpoint answered 500"):
            await provider.get()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_revoked_key_fails_get_with_eacces_once_expired():
    async def main():
        provider = CredentialProvider("http://x", "k", fetcher=None)
        provider.current = creds_for(1)
        provider.last_error = CredentialError("key refused", fatal=True, err=13)
        with pytest.raises(CredentialError) as info:
            await provider.get()
        assert info.value.errno == 13
    trio.run(main)
