"""Stores: a local folder and S3 over HTTP (moto) pass the same tests; settings; base models from S3."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from store_harness import StoreBackend

from lorafleet.worker.engine import synthetic
from lorafleet.worker.store.models import CorruptModel, fetch_model, push_model
from lorafleet.worker.store.settings import GiB, StoreSettings, parse_bytes
from lorafleet.worker.store.store import LocalStore, ObjectNotFound, S3Store, StoreUnavailable, open_store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_round_trip_records_sha256(store_backend):
    store = store_backend.open()
    info = store.put_bytes("bot/v1/adapter_config.json", b'{"r": 8}')
    assert (info.size, info.sha256) == (8, sha(b'{"r": 8}'))
    assert store.get_bytes("bot/v1/adapter_config.json") == b'{"r": 8}'
    assert store.stat("bot/v1/adapter_config.json") == info
    assert store.exists("bot/v1/adapter_config.json")


def test_file_round_trip_returns_the_sha256_of_what_was_written(store_backend, tmp_path):
    store = store_backend.open()
    source = tmp_path / "weights"
    source.write_bytes(random.Random(7).randbytes(2_500_000))  # 2.5 MB: three chunks, each different
    first = store.put_file("bot/weights", source)
    assert store.get_file("bot/weights", tmp_path / "copy") == sha(source.read_bytes())
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    source.write_bytes(b"changed")
    second = store.put_file("bot/weights", source)
    assert second.etag != first.etag
    assert second.sha256 == sha(b"changed")


def test_listing_keys_and_folder_names(store_backend):
    store = store_backend.open()
    for key in ("a/1", "a/v/2", "ab/3", "b/4"):
        store.put_bytes(key, b"x")
    assert store.list_keys("a/") == ["a/1", "a/v/2"]
    assert store.list_keys() == ["a/1", "a/v/2", "ab/3", "b/4"]
    assert store.names() == ["a", "ab", "b"]
    assert store.names("a/") == ["v"]
    assert store.names("missing/") == []


def test_missing_objects(store_backend, tmp_path):
    store = store_backend.open()
    with pytest.raises(ObjectNotFound):
        store.stat("ghost/adapter_config.json")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("ghost/adapter_config.json")
    with pytest.raises(ObjectNotFound):
        store.get_file("ghost/adapter_config.json", tmp_path / "out")
    assert not store.exists("ghost/adapter_config.json")
    store.delete("ghost/adapter_config.json")  # deleting what is gone is fine


def test_delete_prefix_spares_names_that_share_it(store_backend):
    store = store_backend.open()
    for key in ("bot/v1/a", "bot/v2/a", "bot2/v1/a"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("bot/") == 2
    assert store.list_keys() == ["bot2/v1/a"]


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a/./b", ""])
def test_keys_never_leave_the_root(store_backend, key):
    store = store_backend.open()
    with pytest.raises(ValueError, match="invalid store key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid store key"):
        store.stat(key)


def test_an_outage_is_transient_and_service_resumes(store_backend):
    store = store_backend.open()
    store.put_bytes("bot/a", b"x")
    store_backend.down()
    with pytest.raises(StoreUnavailable):
        store.stat("bot/a")
    with pytest.raises(StoreUnavailable):
        store.list_keys()
    store_backend.up()
    assert store.get_bytes("bot/a") == b"x"


def self_signed_certificate(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key: (cert file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorafleet test S3")])
    now = datetime.datetime.now(datetime.UTC)
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(loopback, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "s3.crt", folder / "s3.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file)


def test_s3_over_https_checks_the_certificate(tmp_path):
    """LORAFLEET_S3_SECURE=1 speaks HTTPS and trusts LORAFLEET_S3_CA_FILE; a certificate the CA bundle
    does not vouch for is refused (the store is unavailable, nothing is sent in the clear)."""
    from s3_server import S3Server

    server = S3Server.start(tls=self_signed_certificate(tmp_path))
    try:
        server.create_bucket("tls")
        settings = server.settings(cache_dir=tmp_path / "cache")
        assert settings.secure
        store = open_store("s3://tls/adapters", settings)
        store.put_bytes("bot/a", b"over tls")
        assert store.get_bytes("bot/a") == b"over tls"
        untrusted = open_store(
            "s3://tls/adapters", server.settings(cache_dir=tmp_path / "cache", ca_file=None)
        )
        with pytest.raises(StoreUnavailable):
            untrusted.get_bytes("bot/a")
        plain = open_store("s3://tls/adapters", server.settings(cache_dir=tmp_path / "cache", secure=False))
        with pytest.raises(StoreUnavailable):
            plain.get_bytes("bot/a")
    finally:
        server.stop()


def test_open_store_reads_the_uri(tmp_path):
    assert isinstance(open_store("./adapters"), LocalStore)
    assert open_store(f"file://{tmp_path}").uri == str(tmp_path)
    s3 = open_store("s3://my-bucket/team/adapters/", StoreSettings())
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("my-bucket", "team/adapters/")
    assert open_store("s3://my-bucket", StoreSettings()).prefix == ""  # type: ignore[attr-defined]
    for bad in ("s3://", "http://host/x", ""):
        with pytest.raises(ValueError, match="store URI"):
            open_store(bad, StoreSettings())


def test_settings_from_environment(tmp_path):
    (tmp_path / "access").write_text("AKIA-from-file\n")
    (tmp_path / "secret").write_text("s3cr3t\n")
    env = {
        "LORAFLEET_S3_ENDPOINT": "minio:9000",
        "LORAFLEET_S3_ACCESS_KEY_FILE": str(tmp_path / "access"),
        "LORAFLEET_S3_SECRET_KEY_FILE": str(tmp_path / "secret"),
        "LORAFLEET_S3_SECURE": "1",
        "LORAFLEET_S3_REGION": "eu-west-1",
        "LORAFLEET_CACHE_DIR": str(tmp_path / "cache"),
        "LORAFLEET_CACHE_DISK_BYTES": "512M",
        "LORAFLEET_CACHE_HOST_BYTES": "3G",
        "LORAFLEET_MAX_ADAPTER_BYTES": "1048576",
    }
    settings = StoreSettings.from_env(env)
    assert settings.endpoint == "minio:9000"
    assert (settings.access_key, settings.secret_key) == ("AKIA-from-file", "s3cr3t")
    assert settings.secure
    assert settings.region == "eu-west-1"
    assert settings.cache_dir == tmp_path / "cache"
    assert (settings.cache_disk_bytes, settings.cache_host_bytes) == (512 << 20, 3 * GiB)
    assert settings.max_adapter_bytes == 1 << 20
    assert "s3cr3t" not in repr(settings)
    assert "AKIA" not in repr(settings)
    defaults = StoreSettings.from_env({})
    assert not defaults.secure
    assert defaults.endpoint == "127.0.0.1:9000"


def test_settings_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="LORAFLEET_S3_SECURE"):
        StoreSettings.from_env({"LORAFLEET_S3_SECURE": "maybe"})
    with pytest.raises(ValueError, match="LORAFLEET_CACHE_DISK_BYTES"):
        StoreSettings.from_env({"LORAFLEET_CACHE_DISK_BYTES": "lots"})
    with pytest.raises(ValueError, match="cannot be read"):
        StoreSettings.from_env({"LORAFLEET_S3_SECRET_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="endpoint"):
        StoreSettings(endpoint="http://minio:9000")
    assert parse_bytes("1.5K") == 1536


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic.write_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def s3(tmp_path):
    backend = StoreBackend.make("s3", tmp_path)
    yield backend
    backend.close()


def test_base_model_from_s3_is_cached_and_survives_an_outage(s3, model_dir):
    bucket = s3.uri.split("/")[2]
    store = open_store(f"s3://{bucket}/models/tiny", s3.settings)
    uploaded = push_model(model_dir, store)
    local = fetch_model(f"s3://{bucket}/models/tiny", s3.settings)
    assert local.is_relative_to(s3.settings.cache_dir)
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert len(files) == uploaded
    for name in files:
        assert (local / name).read_bytes() == (model_dir / name).read_bytes()
    assert json.loads((local / "config.json").read_text())["model_type"] == "llama"
    s3.down()
    assert fetch_model(f"s3://{bucket}/models/tiny", s3.settings) == local  # the cached copy serves


def test_base_model_with_a_corrupt_file_is_refused(s3, model_dir):
    bucket = s3.uri.split("/")[2]
    store = open_store(f"s3://{bucket}/models/tiny", s3.settings)
    push_model(model_dir, store)
    s3.corrupt("config.json", b'{"model_type": "llama", "hidden_size": 1}', store=store)
    with pytest.raises(CorruptModel, match=r"config\.json"):
        fetch_model(f"s3://{bucket}/models/tiny", s3.settings)


def test_local_model_folders_are_used_in_place(model_dir):
    assert fetch_model(str(model_dir)) == model_dir
    with pytest.raises(FileNotFoundError):
        fetch_model(str(model_dir / "nothing-here"))
