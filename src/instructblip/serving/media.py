"""Where a request's image comes from: data URLs, remote http(s) URLs guarded against server-side request forgery,
and local files under one allowed directory.

- `data:` URLs with base64: always.
- `http(s)` URLs (the server's `--allow-remote-images`): the URL is parsed once, the host resolved, every address it
  resolves to must be public (no loopback, private, link-local, metadata, shared, multicast or reserved ranges,
  IPv4-mapped and NAT64 forms included) and the connection goes to the address that was checked (no second lookup:
  DNS rebinding); redirects (at most 3) are checked the same way; downloads are capped in bytes and in time (for the
  whole fetch).
- `file://` URLs only under one directory (`--allowed-local-media-path`), symlinks resolved.

Every refusal is an `ImageError` whose message says why (the server answers it as a 400).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import re
import socket
import ssl
import time
from urllib.parse import unquote, urljoin, urlsplit

MAX_REDIRECTS = 3


class ImageError(ValueError):
    """The image of a request cannot be used; the message says why."""


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def read_data_url(url: str, max_bytes: int, kind: str = "image") -> bytes:
    """The bytes of a base64 data URL of an `kind` ("image" or "video") MIME type (or none)."""
    head = _DATA_URL.match(url[:1024])
    if head is None:
        raise ImageError(f"malformed data URL: expected data:{kind}/<type>;base64,<data>")
    mime = head["mime"].strip().lower()
    params = [p.strip().lower() for p in head["params"].split(";")[1:]]
    if "base64" not in params:
        raise ImageError(f"only base64 data URLs are supported (data:{kind}/<type>;base64,...)")
    if mime and not mime.startswith(f"{kind}/"):
        raise ImageError(f"the data URL holds {mime!r}, not an {kind}" if kind == "image" else
                         f"the data URL holds {mime!r}, not a {kind}")
    payload = url[head.end():]
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    if any(c in payload for c in " \t\r\n"):
        payload = re.sub(r"\s+", "", payload)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URL is not valid base64: {e}") from None
    if not data:
        raise ImageError("the data URL holds no data")
    if len(data) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    return data


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address on the public internet: not loopback, private, link-local (cloud metadata at
    169.254.169.254), shared (100.64/10), multicast, reserved or unspecified; IPv6 forms that embed an IPv4 address
    (mapped, NAT64, 6to4) are judged by it, Teredo is refused."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None:
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def resolve_checked(host: str, port: int, allowed=is_public_address) -> list[str]:
    """Resolve `host` and return its addresses, all of which `allowed` must accept (ImageError otherwise)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"cannot resolve the image host {host!r}: {e}") from None
    addresses = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        ip = ipaddress.ip_address(address)
        if not allowed(ip):
            raise ImageError(f"the image host {host!r} resolves to {ip}, a private, loopback, link-local or "
                             f"otherwise non-public address, which this server does not fetch from")
        addresses.append(address)
    if not addresses:
        raise ImageError(f"the image host {host!r} has no address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand; the certificate is verified against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_remote_image(url: str, max_bytes: int, timeout: float, allowed=is_public_address,
                       max_redirects: int = MAX_REDIRECTS) -> bytes:
    """GET an http(s) image URL under the rules of the module docstring: every hop's host resolved and checked with
    `allowed` before connecting to the checked address, at most `max_redirects` redirects, `max_bytes`, and
    `timeout` seconds for everything."""
    deadline = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        if any(c in url for c in "\\\r\n\t ") or any(ord(c) < 32 or ord(c) == 127 for c in url):
            raise ImageError("the image URL contains spaces, control characters or backslashes")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageError(f"image URLs must be http or https, got {parts.scheme or 'none'!r}")
        if parts.username is not None or parts.password is not None:
            raise ImageError("image URLs with credentials are not fetched")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ImageError("the image URL has an invalid port") from None
        host = parts.hostname
        if not host:
            raise ImageError("the image URL has no host")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            raise ImageError(f"the image host {parts.hostname!r} is not a valid name") from None
        address = resolve_checked(host, port, allowed)[0]
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageError(f"fetching the image took longer than {timeout:g} s")
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, address, timeout=left)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "instructblip-server", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise ImageError(f"the image URL redirects ({response.status}) without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ImageError(f"fetching the image failed: HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"the image is larger than {max_bytes} bytes")
            chunks, total = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageError(f"fetching the image took longer than {timeout:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"the image is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise ImageError(f"fetching the image took longer than {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"could not fetch the image: {e}") from None
        finally:
            conn.close()
    raise ImageError(f"the image URL redirects more than {max_redirects} times")


def read_local_file(url: str, root: str, max_bytes: int) -> bytes:
    """A `file://` URL whose real path (symlinks resolved) lies under `root`."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError("file URLs must name a local path (file:///path)")
    try:
        path = os.path.realpath(unquote(parts.path))
        base = os.path.realpath(root)
        inside = os.path.commonpath([path, base]) == base
    except ValueError:
        raise ImageError("the file URL is not a valid path") from None
    if not inside:
        raise ImageError("the file is outside the directory this server may read (--allowed-local-media-path)")
    if not os.path.isfile(path):
        raise ImageError("the file does not exist")
    if os.path.getsize(path) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_image_bytes(url: str, *, max_bytes: int, allow_remote: bool, local_root: str | None,
                     fetch_timeout: float, kind: str = "image") -> bytes:
    """The bytes of an image (or, `kind="video"`, a video file) URL: a data URL always; http(s) only if
    `allow_remote`; file:// only under `local_root`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return read_data_url(url, max_bytes, kind)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise ImageError("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                             "send the image as a data: URL")
        return fetch_remote_image(url, max_bytes, fetch_timeout)
    if scheme == "file":
        if not local_root:
            raise ImageError("file URLs are disabled on this server (see --allowed-local-media-path)")
        return read_local_file(url, local_root, max_bytes)
    raise ImageError("the image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL")
