"""The peer protocol: framing, the Twisted protocol, the connections between nodes."""
