"""The service around the address space: ports, endpoints, banner, certificate, history hook, copies."""

from __future__ import annotations

import copy
import gc
import logging
import socket

import pytest
from asyncua import ua
from asyncua.server import monitored_item_service
from cryptography import x509
from labctl.ioc.errors import LabctlError
from labctl.server.app import Overrides, Server
from labctl.server.opcua.address_space import application_uri
from labctl.server.opcua.pki import CERT_FILE, ensure_certificate
from labctl.server.opcua.publisher import _snapshot, install_copy_fastpath

from .conftest import SITE, make_site, pv_node


async def test_port_zero_is_read_back_and_served(service, connect):
    assert service.port and service.port > 0
    assert service.url == f"opc.tcp://127.0.0.1:{service.port}"
    assert service.endpoints() == [f"{service.url} (OPC UA; security: None, Basic256Sha256_Sign, Basic256Sha256_SignAndEncrypt)"]
    client = await connect()
    assert (await client.nodes.server.read_browse_name()).Name == "Server"


async def test_banner_lists_accounts_without_secrets(service):
    lines = service.banner()
    assert lines[0] == "OPC UA anonymous access: read-only"
    assert "OPC UA user operator [operator] (password)" in lines
    assert not any("scrypt$" in line for line in lines)


async def test_gc_is_frozen_while_serving(tmp_path):
    srv = Server(make_site(tmp_path))
    await srv.start()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        await srv.stop()
    assert gc.get_freeze_count() == 0


async def test_history_hook_marks_pvs_historizing(server, service, connect):
    class NoHistory:  # a storage that answers nothing; the historian provides the real one
        async def init(self):
            return None

        async def stop(self):
            return None

    service.enable_history(NoHistory())
    client = await connect("operator")
    node = await pv_node(client, "LAB:TEMP")
    assert (await node.read_attribute(ua.AttributeIds.Historizing)).Value.Value is True
    assert (await node.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value == 1 | 2 | 4
    assert (await node.read_attribute(ua.AttributeIds.UserAccessLevel)).Value.Value == 1 | 2 | 4


def test_certificate_is_made_once_and_kept(tmp_path, caplog):
    pki = tmp_path / "pki"
    uri = application_uri(SITE)
    cert, key = ensure_certificate(pki, uri, "labctl lab")
    first = cert.read_bytes()
    assert ensure_certificate(pki, uri, "labctl lab") == (cert, key)
    assert cert.read_bytes() == first, "a restart keeps the certificate"
    assert (pki.stat().st_mode & 0o777, key.stat().st_mode & 0o777) == (0o700, 0o600)
    parsed = x509.load_der_x509_certificate(first)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri in san.get_values_for_type(x509.UniformResourceIdentifier)
    # A renamed site needs a certificate naming its new ApplicationUri; the key stays.
    key_bytes = key.read_bytes()
    with caplog.at_level(logging.WARNING, logger="labctl.server.opcua.pki"):
        ensure_certificate(pki, application_uri("other"), "labctl other")
    assert "clients must trust it again" in caplog.text
    assert (pki / CERT_FILE).read_bytes() != first and key.read_bytes() == key_bytes


def test_notification_copy_fastpath():
    install_copy_fastpath()
    install_copy_fastpath()  # idempotent
    assert getattr(monitored_item_service.MonitoredItemValues.set_current_datavalue, "_labctl", False)
    scalar = ua.DataValue(ua.Variant(1.5, ua.VariantType.Double))
    assert _snapshot(scalar) is scalar, "immutable leaves need no copy"
    array = ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double, is_array=True))
    snap = _snapshot(array)
    array.Value.Value.append(3.0)
    assert snap.Value.Value == [1.0, 2.0], "a list is copied"
    nested = ua.DataValue(ua.Variant(ua.Range(0.0, 1.0), ua.VariantType.ExtensionObject))
    snap = _snapshot(nested)
    nested.Value.Value.High = 5.0
    assert snap.Value.Value.High == 1.0, "anything else is deep-copied"
    values = monitored_item_service.MonitoredItemValues()
    values.set_current_datavalue(scalar)
    values.set_current_datavalue(copy.copy(scalar))
    assert values.get_old_datavalue() is scalar


async def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = Server(Overrides(opcua_port=port).apply(make_site(tmp_path)))
        with pytest.raises(LabctlError, match=f"OPC UA: cannot listen on 127.0.0.1:{port}: "):
            await srv.start()
