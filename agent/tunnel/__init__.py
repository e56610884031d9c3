"""The local TLS tunnel: a loopback DNS forwarder over long-lived, pipelined TLS.

listeners.py (clients in), forwarder.py (routing, limits, deadlines, profile),
upstream.py (one resolver: state machine, connecting), connection.py (one live
connection: the batched hot path), stats.py. The order of upstreams is handed in;
the tunnel never chooses it. settings.py: TunnelConfig, light to import (nothing is
imported here: `from agent.tunnel.settings import ...` loads no more than it).
"""
