"""Fine-tuning for sequence classification and Ray Tune sweeps over it.

task.py (built-in task, task files), worker.py (FinetuneSpec and the per-worker loop),
driver.py (driver steps shared by both commands), run.py (`ptm finetune`), sweep.py (`ptm tune`).
The search space is parsed in ptm_dist/space.py; `ptm pipeline` is ptm_dist/pipeline.py.
"""
