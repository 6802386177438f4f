"""``lrpcli explain``'s batch runs: one process (``local``) and torchrun ranks with their shard merge."""
