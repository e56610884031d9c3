"""The agent's one error tree: the core raises these, the edges translate them."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class UsageError(AgentError):
    """A value given by the user (CLI argument, config entry) is not acceptable."""


class TransportError(AgentError):
    """Talking to a peer failed; `reason` is a stable, machine-readable word."""

    reason = "transport"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class Timeout(TransportError):
    reason = "timeout"


class Refused(TransportError):
    reason = "refused"


class Reset(TransportError):
    reason = "reset"


class Closed(TransportError):
    """The peer closed the connection cleanly before we had what we needed."""

    reason = "closed"


class Unreachable(TransportError):
    reason = "unreachable"


class TLSHandshakeFailed(TransportError):
    reason = "tls-handshake-failed"


class CertificateRejected(TransportError):
    """The handshake completed (or failed on verification) but the peer did not authenticate.

    `tls` carries what the server showed (a model.TLSInfo), when the handshake completed.
    """

    reason = "cert-not-authenticated"

    def __init__(self, detail: str = "", tls: object | None = None) -> None:
        super().__init__(detail)
        self.tls = tls


class MalformedMessage(TransportError):
    reason = "malformed-response"


class MismatchedMessage(TransportError):
    reason = "mismatched-response"
