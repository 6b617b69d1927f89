"""End-to-end tier: Ray clusters, `ptm` subprocesses, pretrain/finetune/tune runs (marked e2e)."""
