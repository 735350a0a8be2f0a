"""Google-signed OIDC tokens, checked with a locally generated key and certificate (no
network fetch): signature, audience, issuer, expiry and the service account."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

import aioworkers
from aioworkers import push

AUDIENCE = "https://jobs-abc.a.run.app/pubsub"
EMAIL = "pusher@project.iam.gserviceaccount.com"


def key_and_cert() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem_key, cert.public_bytes(serialization.Encoding.PEM).decode()


KEY, CERT = key_and_cert()
OTHER_KEY, _ = key_and_cert()


def token(key: bytes = KEY, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "email": EMAIL,
        "email_verified": True,
        **claims,
    }
    signer = crypt.RSASigner.from_string(key, key_id="k1")
    encoded: bytes = jwt.encode(signer, payload)
    return encoded.decode()


@pytest.fixture
async def client(
    tmp_path: Path,
) -> AsyncIterator[tuple[aioworkers.App, httpx.AsyncClient, list[str]]]:
    app = aioworkers.App(f"sqlite:///{tmp_path / 'jobs.db'}")
    ran: list[str] = []

    @app.task
    async def record(tag: str) -> None:
        ran.append(tag)

    auth = push.google_oidc(AUDIENCE, email=EMAIL, certs={"k1": CERT})
    pushed = aioworkers.push_app(app, auth=auth)
    transport = httpx.ASGITransport(app=pushed)
    async with httpx.AsyncClient(transport=transport, base_url="http://push") as c:
        yield app, c, ran
    await app.aclose()


async def test_a_valid_google_token_runs_the_job(
    client: tuple[aioworkers.App, httpx.AsyncClient, list[str]],
) -> None:
    app, c, ran = client
    request = push.publish_request(app, aioworkers.Call("record", ("ok",)), url="http://push")
    request.headers["authorization"] = f"Bearer {token()}"
    assert (await c.send(request)).status_code == 204
    assert ran == ["ok"]


@pytest.mark.parametrize(
    "bad",
    [
        {"aud": "https://elsewhere.example/pubsub"},
        {"iss": "https://evil.example"},
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"email": "someone@else.iam.gserviceaccount.com"},
        {"email_verified": False},
        {"key": OTHER_KEY},
        {"garbage": True},
    ],
)
async def test_a_bad_token_is_401_and_nothing_runs(
    client: tuple[aioworkers.App, httpx.AsyncClient, list[str]], bad: dict[str, Any]
) -> None:
    app, c, ran = client
    request = push.publish_request(app, aioworkers.Call("record", ("no",)), url="http://push")
    if "garbage" in bad:
        value = "not.a.jwt"
    elif "key" in bad:
        value = token(bad["key"])
    else:
        value = token(**bad)
    request.headers["authorization"] = f"Bearer {value}"
    assert (await c.send(request)).status_code == 401
    assert ran == []
