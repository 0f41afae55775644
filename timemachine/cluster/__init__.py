"""The cluster layer: ring, shard logs (the seam Raft groups fill), coordinator."""
