"""DNS on the wire: messages and framing (wire.py), connections under a deadline (transport.py)."""
