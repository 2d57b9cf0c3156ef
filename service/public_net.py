"""Connections to public addresses only: the HTTP origins' guard against server-side request forgery.

An image URL is public and an HTTP origin's host name (or a redirect) could point phizer at an internal service
(a metadata endpoint, an admin page). These urllib3 connection and pool classes resolve the host once, refuse
every address that is not globally routable (``address_refusal``) and connect to the checked address itself, so
DNS rebinding cannot slip a second answer in between. service/origins.py uses them unless
``allow_private_origins`` is set.
"""

from __future__ import annotations

import ipaddress
import socket

import urllib3
from urllib3.util.connection import allowed_gai_family, create_connection


def address_refusal(address: str) -> str | None:
    """Why an HTTP origin may not connect to ``address`` (None: it may): anything not globally routable.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) reaches, and is judged as, its IPv4 address.
    """
    ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    kinds = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not globally routable", not ip.is_global),  # e.g. 100.64.0.0/10, carrier-grade NAT
    )
    return next((kind for kind, applies in kinds if applies), None)


class AddressRefused(Exception):
    """A host resolved only to addresses an HTTP origin may not connect to; raised through urllib3 untouched."""


class PublicHTTPConnection(urllib3.connection.HTTPConnection):
    """A connection that goes only to public addresses, and to exactly the address it checked.

    The host name is resolved once, here; each address is checked and a permitted one is connected to by number,
    so a second DNS answer (rebinding) cannot slip in between the check and the connection. The Host header, TLS
    SNI and the certificate check still use the host name: only the socket's destination is chosen here.
    """

    def _new_conn(self) -> socket.socket:
        try:
            resolved = socket.getaddrinfo(self.host.strip("[]"), self.port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(self.host, self, exc) from exc
        refused: list[str] = []
        error: OSError | None = None
        for *_, sockaddr in resolved:
            address = str(sockaddr[0])
            reason = address_refusal(address)
            if reason:
                refused.append(f"{address} ({reason})")
                continue
            try:
                return create_connection((address, self.port), self.timeout, self.source_address, self.socket_options)
            except OSError as exc:
                error = exc
        if error is None:
            addresses = ", ".join(refused)
            raise AddressRefused(f"refused to connect to {self.host}: {addresses}; allow_private_origins is off")
        if isinstance(error, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from error
        raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {error}") from error


class PublicHTTPSConnection(PublicHTTPConnection, urllib3.connection.HTTPSConnection):
    """HTTPS to public addresses only: the checked socket, then urllib3's TLS on the host name."""


class PublicHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = PublicHTTPConnection


class PublicHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = PublicHTTPSConnection
