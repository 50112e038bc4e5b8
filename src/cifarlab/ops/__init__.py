"""Custom ops: LayerNorm three ways and its C kernel, a CPU SyncBatchNorm, gradient checking."""
