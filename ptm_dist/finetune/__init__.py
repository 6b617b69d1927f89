"""Fine-tuning for sequence classification and Ray Tune sweeps over it.

task.py (built-in task, task files), worker.py (the per-worker loop), run.py (`ptm finetune`,
`ptm pipeline`), sweep.py (`ptm tune`), space.py (search-space parsing).
"""
