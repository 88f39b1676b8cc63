"""Builders of the ``step_up`` and ``assertion`` sections (what a kept request may hold
and cost, and how the signed assertion is made) and of who may reach the gateway as a
proxy (``trusted_proxies``, ``unix_socket``). Pure, like the rest of :mod:`gateway.config`."""

from __future__ import annotations

import ipaddress
import re

from yaml.nodes import Node

from gateway import model
from gateway.config.defaults import (
    DEFAULT_ASSERTION_TTL_S,
    DEFAULT_AUTHORIZATION_DETAILS_TYPE,
    DEFAULT_HEADER_PREFIX,
    DEFAULT_KEEP_BUDGET_BYTES,
    DEFAULT_KEEP_PER_CLIENT,
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_LIMIT_BYTES,
    MAX_DETAILS_TYPE_CHARS,
    MAX_KEEP_BUDGET_BYTES,
    MAX_KEEP_PER_CLIENT,
    MAX_UNIX_SOCKET_PATH_BYTES,
    _parse_size,
)
from gateway.config.loader import (
    _TOKEN,
    _Invalid,
    _Reader,
)
from gateway.config.schema import RATIO_HINT
from gateway.model import MAX_ASSERTION_TTL_S

# In trusted_proxies: the connections on server.unix_socket.
UNIX_TRUST = "unix"


class _SectionBuilders(_Reader):
    def trusted_proxies(self, node: Node, path: str) -> tuple[tuple[model.IPNetwork, ...], bool]:
        """The networks, and whether ``unix`` (the unix socket's connections) is listed."""
        # An empty list is explicit and means the same as the default: trust no proxy.
        result: list[model.IPNetwork] = []
        unix = False
        for item_path, item in self.items(node, path, allow_empty=True):
            try:
                text = self.text(item, item_path).strip()
            except _Invalid:
                continue
            if text == UNIX_TRUST:
                unix = True
                continue
            try:
                result.append(ipaddress.ip_network(text, strict=True))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    self.note(
                        item_path,
                        f"not an IP network (CIDR like 10.0.0.0/8) nor {UNIX_TRUST}: {text!r}",
                        item,
                    )
                else:
                    self.note(item_path, f"{text!r} has host bits set; did you mean {loose}?", item)
        return tuple(result), unix

    def unix_socket(self, node: Node, path: str) -> str:
        socket_path = self.text(node, path)
        if not socket_path.startswith("/") or "\0" in socket_path:
            self.note(path, f"must be an absolute path (/run/...), got {socket_path!r}", node)
        elif len(socket_path.encode()) > MAX_UNIX_SOCKET_PATH_BYTES:
            self.note(
                path,
                f"is longer than a unix socket path may be ({MAX_UNIX_SOCKET_PATH_BYTES} bytes)",
                node,
            )
        return socket_path

    def unix_socket_mode(self, node: Node, path: str) -> int:
        text = self.text(node, path)
        if not re.fullmatch(r"0?[0-7]{3}", text):
            self.note(path, f"must be octal permissions like '0660', got {text!r}", node)
            return 0
        return int(text, 8)

    def check_unix_socket(self, server: model.ServerConfig, trusted: Node | None) -> None:
        """``unix`` trusted without a socket."""
        if server.trust_unix_socket and server.unix_socket is None:
            self.note(
                "server.trusted_proxies",
                f"lists {UNIX_TRUST} (the connections on server.unix_socket) but "
                "server.unix_socket is not set",
                trusted,
            )

    def step_up(self, node: Node, path: str) -> model.StepUpConfig:
        m = self.mapping(
            node,
            path,
            ("max_body", "authorization_details_type", "keep_budget", "keep_per_client"),
        )
        max_body = self.optional(m, "max_body", self.size_bytes, DEFAULT_MAX_BODY_BYTES)
        budget = self.optional(m, "keep_budget", self.keep_budget, DEFAULT_KEEP_BUDGET_BYTES)
        if budget < max_body:
            self.note(
                m.child("keep_budget"),
                f"is smaller than step_up.max_body ({max_body} bytes): a form at the body "
                "limit could never be kept",
                m.get("keep_budget"),
            )
        return model.StepUpConfig(
            max_body_bytes=max_body,
            authorization_details_type=self.optional(
                m,
                "authorization_details_type",
                self.details_type,
                DEFAULT_AUTHORIZATION_DETAILS_TYPE,
            ),
            keep_budget_bytes=budget,
            keep_per_client=self.optional(
                m, "keep_per_client", self.keep_per_client, DEFAULT_KEEP_PER_CLIENT
            ),
        )

    def keep_budget(self, node: Node, path: str) -> int:
        scalar = self.scalar(node, path, "a size")
        size = _size(scalar.value)
        if size is None or not 1 <= size <= MAX_KEEP_BUDGET_BYTES:
            raise self.fail(
                path,
                f"use a size between 1 byte and 4GiB, in bytes (67108864) or with a unit "
                f"(64MiB) (got {scalar.text!r})",
                node,
            )
        return size

    def keep_per_client(self, node: Node, path: str) -> int:
        scalar = self.scalar(node, path, "an integer")
        value = scalar.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "expected an integer", node)
        if not 1 <= value <= MAX_KEEP_PER_CLIENT:
            message = f"must be between 1 and {MAX_KEEP_PER_CLIENT} (got {value})"
            raise self.fail(path, message, node)
        return value

    def size_bytes(self, node: Node, path: str) -> int:
        """Bytes as an integer, or a number with a unit: 512KiB, 1MiB, 2MB."""
        scalar = self.scalar(node, path, "a size")
        size = _size(scalar.value)
        if size is None:
            raise self.fail(
                path,
                f"invalid size {scalar.text!r}: use bytes (65536) or a number with a unit "
                "KiB, MiB, GiB, kB, MB or GB (512KiB, 1MiB)",
                node,
            )
        if not 1 <= size <= MAX_BODY_LIMIT_BYTES:
            raise self.fail(
                path, f"must be between 1 byte and {MAX_BODY_LIMIT_BYTES} bytes (64MiB)", node
            )
        return size

    def details_type(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if (
            len(text) > MAX_DETAILS_TYPE_CHARS
            or not text.isprintable()
            or any(char.isspace() for char in text)
        ):
            raise self.fail(
                path,
                f"use up to {MAX_DETAILS_TYPE_CHARS} printable characters, no spaces "
                "(RFC 9396 type, e.g. payment_initiation)",
                node,
            )
        return text

    def assertion(self, node: Node, path: str) -> model.AssertionConfig:
        m = self.mapping(node, path, ("key_file", "ttl", "header_prefix"))
        return model.AssertionConfig(
            key_file=self.optional(m, "key_file", self.key_file, None),
            ttl_s=self.optional(m, "ttl", self.assertion_ttl, DEFAULT_ASSERTION_TTL_S),
            header_prefix=self.optional(
                m, "header_prefix", self.header_prefix, DEFAULT_HEADER_PREFIX
            ),
        )

    def key_file(self, node: Node, path: str) -> str:
        # Only resolved here; gateway.assertion reads and checks the key at start-up.
        return self.resolve_path(self.text(node, path))

    def assertion_ttl(self, node: Node, path: str) -> int:
        seconds = self.positive_duration_s(node, path)
        if seconds > MAX_ASSERTION_TTL_S:
            raise self.fail(path, f"at most {MAX_ASSERTION_TTL_S}s (got {seconds}s)", node)
        return seconds

    def header_prefix(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if not _TOKEN.fullmatch(text):
            raise self.fail(path, f"invalid header name prefix {text!r} (RFC 7230 token)", node)
        return text

    def telemetry(self, node: Node, path: str) -> model.TelemetryConfig:
        m = self.mapping(node, path, ("otlp_endpoint", "service_name", "sample_ratio"))
        return model.TelemetryConfig(
            otlp_endpoint=self.optional(m, "otlp_endpoint", self.otlp_endpoint, None),
            service_name=self.optional(m, "service_name", self.text, None),
            sample_ratio=self.optional(m, "sample_ratio", self.sample_ratio, None),
        )

    def otlp_endpoint(self, node: Node, path: str) -> str:
        text, _ = self.http_url(node, path, what="OTLP endpoint")
        return text

    def sample_ratio(self, node: Node, path: str) -> float:
        value = self.scalar(node, path, "a number from 0 to 1").value  # schema: $defs.ratio
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise self.fail(path, f"expected {RATIO_HINT}", node)
        return float(value)


def _size(value: object) -> int | None:
    """Bytes from a YAML integer or a number with a unit (512KiB); None from anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _parse_size(value)
    return None
