"""Hostile input from clients, against a real twistd: huge numbers and headers, slow and greedy clients."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time

from tests.fakes import FakeRegistry, digest_of, listen
from tests.realparts import Server, WebClient, WorkspaceTestCase, free_port, make_ca, sleep, start_server


def connect(port: int) -> socket.socket:
    """A client connection to the server under test."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def send_and_read(port: int, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes (a reset while sending ends the sending)."""
    with connect(port) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(response.split(b" ", 2)[1])


def error_body(response: bytes) -> dict[str, object]:
    """The first OCI error of a raw response's JSON body."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    first: dict[str, object] = json.loads(body)["errors"][0]
    return first


class ClientLimitsTests(WorkspaceTestCase):
    """What the server answers to input it will not serve, and how long it holds clients."""

    async def start(self, *args: str) -> Server:
        return await start_server(self.path("cache"), test=self, args=args)

    async def test_range_of_five_thousand_digits(self) -> None:
        """A Range ending in a 5,000-digit number is a 206 of the whole blob, not a 500; one starting so is a 416."""
        upstream = FakeRegistry()
        port, listening = await listen(upstream)
        self.addCleanup(listening.stopListening)
        registry = f"127.0.0.1:{port}"
        blob = os.urandom(10_000)
        digest = digest_of(blob)
        upstream.blobs[digest] = blob
        server = await self.start("--config-file", self.config([{"name": registry, "scheme": "http"}]))
        path = f"/v2/app/blobs/{digest}?ns={registry}"
        web = WebClient()
        self.addCleanup(web.close)
        response = await web.client.get(server.url + path)
        self.assertEqual(await response.content(), blob)
        huge = "9" * 5000

        def ask(header: str) -> bytes:
            return send_and_read(server.port, f"GET {path} HTTP/1.1\r\nHost: m\r\nRange: {header}\r\n"
                                              "Connection: close\r\n\r\n".encode("ascii"))

        whole = ask(f"bytes=0-{huge}")
        self.assertEqual(status_of(whole), 206, whole[:300])
        self.assertIn(f"content-range: bytes 0-{len(blob) - 1}/{len(blob)}".encode(), whole.lower())
        self.assertTrue(whole.endswith(blob))
        beyond = ask(f"bytes={huge}-")
        self.assertEqual(status_of(beyond), 416, beyond[:300])
        self.assertEqual(status_of(ask(f"bytes=-{huge}")), 206)
        self.assertEqual(status_of(ask(f"bytes=0-{'0' * 4999}1")), 206)

    async def test_oversized_requests_are_answered(self) -> None:
        """64 KiB and 1 MiB header fields are a 431, a 100 KiB request line a 414, each with an OCI error body."""
        server = await self.start()
        for size in (64 * 1024, 1024 * 1024):
            response = send_and_read(server.port, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: "
                                     + b"b" * size + b"\r\n\r\n")
            self.assertEqual(status_of(response), 431, response[:300])
            self.assertEqual(error_body(response)["code"], "UNSUPPORTED")
        many = b"".join(b"X-H%d: 1\r\n" % n for n in range(600))
        self.assertEqual(status_of(send_and_read(server.port, b"GET /v2/ HTTP/1.1\r\n" + many + b"\r\n")), 431)
        response = send_and_read(server.port, b"GET /v2/" + b"a" * 100 * 1024 + b" HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertEqual(status_of(response), 414, response[:300])
        self.assertIn("request line", str(error_body(response)["message"]))
        head = send_and_read(server.port, b"HEAD /v2/" + b"a" * 100 * 1024 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual((status_of(head), head.endswith(b"\r\n\r\n")), (414, True))
        malformed = send_and_read(server.port, b"GET /v2/ HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertEqual(status_of(malformed), 400)
        await self.healthy(server)

    async def healthy(self, server: Server) -> bytes:
        """The server still answers: the response to GET /v2/."""
        response = send_and_read(server.port, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        self.assertEqual(status_of(response), 200)
        return response

    async def test_slow_request_is_closed_at_the_deadline(self) -> None:
        """A client trickling its headers gets a 408 and is closed once the header deadline passes."""
        server = await self.start("--client-header-timeout", "2")
        with connect(server.port) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /v2/ HTTP/1.1\r\n")
            closed = False
            while time.monotonic() - started < 10:
                try:
                    sock.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                sock.settimeout(0.25)
                try:
                    answer = sock.recv(65536)
                except socket.timeout:
                    continue
                else:
                    closed = True
                    break
            took = time.monotonic() - started
        self.assertTrue(closed, "the trickling connection was never closed")
        self.assertGreater(took, 1.5)
        self.assertLess(took, 6.0)
        self.assertEqual(status_of(answer), 408)
        with connect(server.port) as idle:
            self.assertEqual(read_all(idle)[:12], b"HTTP/1.1 408")

    async def test_connections_per_client_are_capped(self) -> None:
        """Past the cap, a client's further connections are refused with a 429, on the API and the health port."""
        health = free_port()
        server = await self.start("--client-max-connections", "5", "--health", str(health))
        for port in (server.port, health):
            held = [connect(port) for _ in range(5)]
            try:
                for sock in held:
                    # An answer proves the server accepted and counts the connection.
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: m\r\n\r\n" if port == health
                                 else b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
                    self.assertIn(sock.recv(65536)[:12], (b"HTTP/1.1 200",))
                refused = send_and_read(port, b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
                self.assertEqual(status_of(refused), 429, refused[:300])
                self.assertEqual(error_body(refused)["code"], "TOOMANYREQUESTS")
            finally:
                held.pop().close()
            await sleep(0.2)
            try:
                response = send_and_read(port, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
                self.assertNotEqual(status_of(response), 429)
            finally:
                for sock in held:
                    sock.close()

    async def test_limits_over_tls(self) -> None:
        """The HTTPS listener keeps the same limits: an oversized header is a 431 the client reads, then a close."""
        ca = make_ca(self.path("ca"), "mirror")
        cert, key = ca.issue_server("127.0.0.1")
        tls_port = free_port()
        await self.start("--tls-cert", cert, "--tls-key", key, "--tls-port", str(tls_port),
                         "--client-max-connections", "3")
        context = ssl.create_default_context(cafile=ca.cert_path)

        def tls(request: bytes) -> bytes:
            with context.wrap_socket(connect(tls_port), server_hostname="127.0.0.1") as sock:
                sock.sendall(request)
                chunks = []
                try:
                    while chunk := sock.recv(65536):
                        chunks.append(chunk)
                except (ConnectionResetError, ssl.SSLError):
                    pass
                return b"".join(chunks)

        started = time.monotonic()
        response = tls(b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: " + b"b" * 64 * 1024 + b"\r\n\r\n")
        self.assertEqual(status_of(response), 431, response[:300])
        self.assertLess(time.monotonic() - started, 5)
        held = [connect(tls_port) for _ in range(3)]
        try:
            await sleep(0.5)
            refused = tls(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
            self.assertEqual(status_of(refused), 429, refused[:300])
        finally:
            for sock in held:
                sock.close()
