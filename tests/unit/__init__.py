"""Unit tier: no Ray cluster, no `ptm` subprocess, no pretrain/finetune/tune run."""
