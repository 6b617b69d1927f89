"""Distributed pretraining on a real local Ray cluster with real DeepSpeed engines (gloo, CPU).

The reference for every ZeRO stage is a plain single-process PyTorch AdamW loop fed the same
global batches (rebuilt from each rank's deterministic stream): per-step losses must agree.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import check_figures, debug_job, read_lines

from ptm_dist import models
from ptm_dist.data.pipeline import SequenceStream, take_sequences
from ptm_dist.data.prepare import prepare_data
from ptm_dist.errors import ConfigError
from ptm_dist.train.pretrain import pretrain


def reference_lr(step: int, cfg) -> float:
    """The job's learning rate at optimizer step ``step`` (0-based), written out from README's
    description: linear warmup to train.lr over warmup_steps, then half a cosine down to min_lr
    at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    done = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + (t.lr - t.min_lr) * (1 + math.cos(math.pi * done)) / 2


ZERO3_INIT_SCRIPT = """
import sys, torch, deepspeed
from ptm_dist import models
from ptm_dist.config import load
from ptm_dist.data.prepare import prepare_data
from ptm_dist.dist import init_single_process
from ptm_dist.engine import EngineSpec, ds_config
cfg = load(JOB, [])
init_single_process(torch.device("cpu"))
wd = prepare_data(cfg).for_workers()
hf = models.hf_config(cfg.model.family, cfg.model.size, wd.vocab_size, cfg.data.seq_len,
                      models.SpecialTokens(**wd.special))
conf = ds_config(EngineSpec.for_pretraining(cfg), cfg.train.precision, False)
model = models.build(hf, seed=cfg.run.seed, zero3=conf)
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, OUT)
"""


def initial_model(cfg, hf):
    """The model a run of ``cfg`` starts from, unpartitioned. ZeRO-3 builds it partitioned
    (models.build's zero3 path), which initialises differently: its weights are built in a
    process group of one (the same for any number of ranks) and gathered, in a subprocess."""
    model = models.build(hf, seed=cfg.run.seed)
    if cfg.zero.stage != 3:
        return model
    import tempfile

    from e2e.test_faults import run_python

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.yaml").write_text(cfg.to_yaml())
        proc = run_python(f"JOB = {tmp + '/job.yaml'!r}; OUT = {tmp + '/init.pt'!r}\n" + ZERO3_INIT_SCRIPT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = torch.load(f"{tmp}/init.pt")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


def reference_adamw(params: list, cfg) -> torch.optim.AdamW:
    """torch's AdamW with the job's settings, weight decay on matrices only (not on biases and
    norms), its lr set by the caller at every step (reference_lr)."""
    t = cfg.train
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                             lr=t.lr, betas=tuple(t.betas), eps=1e-8)


def reference_streams(cfg, wd, world: int) -> list:
    """Each rank's sequence stream, packed in this process (what rank r's workers receive)."""
    return [iter(SequenceStream(list(wd.train_shards), wd.tokenizer_json, cfg.data.seq_len, wd.special["eos"],
                                cfg.run.seed, r, world, use_ray=False, shuffle_window=cfg.data.shuffle_window))
            for r in range(world)]


def reference_losses(cfg, world: int) -> list[float]:
    """Per-step losses of a plain single-process loop over the global batches the workers see.

    Independent of the code under test: its own AdamW parameter groups (no decay on vectors:
    biases and norms), its own schedule (reference_lr), its own causal-LM loss, clipping and
    gradient accumulation; only the model and the data stream are shared."""
    wd = prepare_data(cfg).for_workers()
    hf = models.hf_config(cfg.model.family, cfg.model.size, wd.vocab_size, cfg.data.seq_len,
                          models.SpecialTokens(**wd.special))
    model = initial_model(cfg, hf)
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = reference_adamw(params, cfg)
    streams = reference_streams(cfg, wd, world)
    losses = []
    for step in range(t.max_steps):
        for group in opt.param_groups:
            group["lr"] = reference_lr(step, cfg)
        total = 0.0
        for _ in range(t.grad_accum):
            ids = torch.stack([torch.as_tensor(next(s)[1], dtype=torch.long) for s in streams
                               for _ in range(t.micro_batch)])
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     ids[:, 1:].reshape(-1))
            (loss / t.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / t.grad_accum)
    return losses


# Downstream tasks scored during the ZeRO-2 and ZeRO-3 runs below, whose losses must still match
# the plain PyTorch reference step for step (so scoring changes neither weights nor random state).
EVAL_TASKS = ("train.eval_tasks=[ptm_builtin_word_order]", "train.eval_tasks_every=6", "train.eval_tasks_limit=40")


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, ray_session):
    """A 12-step ZeRO-2 run with every checkpoint kept (reused by resume and export tests), that
    scores a built-in downstream task at steps 0, 6 and 12."""
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = debug_job(tmp, "run.name=a", "zero.stage=2", "train.keep_ckpts=5", *EVAL_TASKS)
    run_dir = pretrain(cfg)
    return cfg, run_dir


def assert_task_scores(cfg, run_dir) -> None:
    """train.eval_tasks lines at steps 0, 6 and 12 with the harness's metrics; the scoring time is
    left out of tokens/s (log_every 1: the step-7 line's window is step 7 alone, scored after 6);
    the step-12 scores are those of `ptm eval` on the step-12 checkpoint (its exported weights,
    same items), so the scored model is the trained one; `ptm report` draws them."""
    from ptm_dist.config import cache_dir
    from ptm_dist.evaluate import evaluate
    from ptm_dist.report import report

    lines = read_lines(run_dir)
    key = "eval/ptm_builtin_word_order/acc"
    scored = [m for m in lines if "eval_tasks_s" in m]
    assert [m["step"] for m in scored] == [0, 6, 12]
    assert all(0 <= m[key] <= 1 and 0 <= m["eval/ptm_builtin_word_order/acc_norm"] <= 1 for m in scored)
    assert [m["tokens"] for m in scored] == [0, 6 * 4 * 32 * 2, 12 * 4 * 32 * 2]
    step7 = next(m for m in lines if m["step"] == 7 and "tokens_per_s" in m)
    step7_s = cfg.train.micro_batch * cfg.data.seq_len * 2 * cfg.train.grad_accum / step7["tokens_per_s"]
    print(f"ZeRO-{cfg.zero.stage}: scores {[m[key] for m in scored]}, scoring at step 6 took "
          f"{scored[1]['eval_tasks_s']:.2f} s, step 7 {step7_s:.3f} s")
    assert step7_s < scored[1]["eval_tasks_s"]
    result = evaluate(f"{run_dir}/checkpoint_00000012", ["ptm_builtin_word_order"], limit=40,
                      cache=cache_dir(cfg))
    assert result["step"] == 12
    assert result["tasks"]["ptm_builtin_word_order"]["acc"] == scored[2][key]
    assert result["tasks"]["ptm_builtin_word_order"]["acc_norm"] == scored[2]["eval/ptm_builtin_word_order/acc_norm"]
    md = check_figures(Path(report(run_dir)), {"loss.png", "eval_tasks.png"})  # the scores against tokens
    assert f"| ptm_builtin_word_order/acc, step 0 -> 12 | {scored[0][key]:.4f} -> {scored[2][key]:.4f} |" in md


def _train_losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_lines(run_dir) if "loss" in m]


def reference_eval_loss(cfg) -> float:
    """Token-weighted next-token loss of the initial model over the job's held-out sequences,
    in one process with plain transformers and its own cross-entropy."""
    wd = prepare_data(cfg).for_workers()
    hf = models.hf_config(cfg.model.family, cfg.model.size, wd.vocab_size, cfg.data.seq_len,
                          models.SpecialTokens(**wd.special))
    model = initial_model(cfg, hf).eval()
    _, val = take_sequences(list(wd.val_shards), wd.tokenizer_json, cfg.data.seq_len, wd.special["eos"],
                            cfg.train.eval_sequences)
    ids = torch.as_tensor(val, dtype=torch.long)
    assert len(ids) == cfg.train.eval_sequences
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                             ids[:, 1:].reshape(-1), reduction="sum").item() / ids[:, 1:].numel()


def assert_matches_plain_pytorch(cfg, run_dir) -> None:
    """The run's per-step losses and lrs and its step-0 eval loss against the one-process
    references (reference_losses, reference_lr, reference_eval_loss)."""
    stage, grad_accum = cfg.zero.stage, cfg.train.grad_accum
    lines = read_lines(run_dir)
    got = _train_losses(run_dir)
    want = reference_losses(cfg, cfg.scaling.num_workers)
    assert len(got) == cfg.train.max_steps >= 10
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want)]
    print(f"ZeRO-{stage} grad_accum={grad_accum}: max relative loss difference {max(rel):.2e}")
    # Measured 8e-8 to 1.6e-7 over the stages; a ZeRO-3 run whose weight decay missed every
    # partitioned matrix (it saw their flat 1-D pieces) differed by 5.5e-5.
    assert max(rel) < 1e-5, list(zip(got, want))
    assert got[-1] < got[0]  # and it learns
    # The logged lr is the one step s trained with (optimizer step s - 1, 0-based).
    lrs = [(m["lr"], reference_lr(m["step"] - 1, cfg)) for m in lines if "loss" in m]
    assert all(abs(g - w) <= 1e-12 * w for g, w in lrs), lrs
    # The step-0 eval loss is the token-weighted mean over every held-out token.
    first_eval = next(m["eval_loss"] for m in lines if "eval_loss" in m)
    ref = reference_eval_loss(cfg)
    print(f"ZeRO-{stage}: step-0 eval loss {first_eval:.7f}, one-process token-weighted {ref:.7f}")
    assert abs(first_eval - ref) / ref < 1e-5


# ZeRO-0 is checked on the run test_resume_false_starts_a_new_directory_and_zero0_matches_plain_pytorch
# starts.
# ZeRO-3 evaluates 33 held-out sequences on 2 workers: 17 and 16, in 5 and 4 micro batches of 4,
# so the second rank must make a fifth forward pass that counts nothing (ZeRO-3 forwards are
# collective; without it the run hangs at its first evaluation).
# ZeRO-3 also scores downstream tasks (EVAL_TASKS): every rank gathers the partitioned weights
# into a whole copy of its own, with no collective while it scores.
@pytest.mark.parametrize("stage,grad_accum,extra", [(1, 2, ()), (2, 1, ()),
                                                    (3, 1, ("train.eval_sequences=33", *EVAL_TASKS))])
def test_zero_stages_match_plain_pytorch(stage, grad_accum, extra, tmp_path, zero2_run, ray_session):
    if stage == 2:
        cfg, run_dir = zero2_run
    else:
        cfg = debug_job(tmp_path, "run.name=z", f"zero.stage={stage}", f"train.grad_accum={grad_accum}", *extra)
        run_dir = pretrain(cfg)
    assert_matches_plain_pytorch(cfg, run_dir)
    if cfg.train.eval_tasks:
        assert_task_scores(cfg, run_dir)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(zero2_run, tmp_path, ray_session):
    _, run_dir = zero2_run
    # A run stopped after its step-6 checkpoint: the same job resumed from that checkpoint alone.
    stopped = tmp_path / "b"
    stopped.mkdir()
    shutil.copy(f"{run_dir}/job.yaml", stopped / "job.yaml")
    shutil.copytree(f"{run_dir}/checkpoint_00000006", stopped / "checkpoint_00000006")
    resumed = pretrain(debug_job(tmp_path, "run.name=b", "zero.stage=2", "train.keep_ckpts=5"))
    full = {(m["step"], "loss" in m): m for m in read_lines(run_dir) if "eval_tasks_s" not in m}
    after = [m for m in read_lines(resumed) if m["step"] > 6]
    assert [m["step"] for m in after if "loss" in m] == list(range(7, 13))
    for m in after:
        key = "loss" if "loss" in m else "eval_loss"
        assert m[key] == full[m["step"], key == "loss"][key], m["step"]
        if key == "loss":
            assert m["grad_norm"] == full[m["step"], True]["grad_norm"]


def test_resume_false_starts_a_new_directory_and_zero0_matches_plain_pytorch(zero2_run, ray_session):
    """The zero2 run's job again with run.resume=false (and ZeRO stage 0): a new directory
    <name>-2, trained from step 1, the first run untouched; and that run, ZeRO-0's, matches the
    plain PyTorch reference as the other stages do (one Ray Train job for both checks)."""
    cfg, run_dir = zero2_run
    before = read_lines(run_dir)
    fresh = cfg.model_copy(deep=True)
    fresh.run.resume = False
    fresh.zero.stage = 0
    new_dir = pretrain(fresh)
    assert new_dir == run_dir + "-2"
    assert read_lines(run_dir) == before
    assert [m["step"] for m in read_lines(new_dir) if "loss" in m] == list(range(1, 13))
    assert_matches_plain_pytorch(fresh, new_dir)


def _corpus(path: Path) -> Path:
    """Three shards of random words: varied enough for a 512-token BPE vocabulary."""
    rng = random.Random(7)
    path.mkdir()
    for name in ("a", "b", "c"):
        (path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
                                         for _ in range(60))}) + "\n" for _ in range(150)))
    return path


def test_resume_refuses_other_data_and_a_new_lr_but_extends_max_steps_without_a_jump(
        zero2_run, tmp_path, ray_session):
    """The zero2 run's newest checkpoint refuses another peak lr and another corpus (new
    tokenizer, new shard list), each with a message naming what changed. Its step-6 checkpoint,
    resumed with run.allow_data_change and train.max_steps raised from 12 to 18, continues on the
    new corpus from its start, and its learning rate continues from the step-6 value of the old
    schedule down a half cosine to min_lr at 18 (the formula written out here)."""
    cfg, run_dir = zero2_run
    hotter = cfg.model_copy(deep=True)
    hotter.train.lr *= 2
    with pytest.raises(ConfigError) as err:
        pretrain(hotter)
    print("another lr:", err.value)
    assert f"train.lr: {cfg.train.lr!r} -> {hotter.train.lr!r}" in str(err.value)
    corpus = _corpus(tmp_path / "corpus")
    other = debug_job(tmp_path, "run.name=a", f"run.storage={Path(run_dir).parent}", "zero.stage=2",
                      "train.keep_ckpts=5", f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.34")
    with pytest.raises(ConfigError) as err:
        pretrain(other)
    print("other data:", err.value)
    assert "the tokenizer (sha256" in str(err.value) and "the training shard list (" in str(err.value)
    assert "-> 2 shards" in str(err.value) and "run.allow_data_change=true" in str(err.value)
    # Allowed, and longer: a copy of the run stopped at step 6.
    stopped = tmp_path / "runs" / "c"
    stopped.mkdir(parents=True)
    shutil.copy(f"{run_dir}/job.yaml", stopped / "job.yaml")
    shutil.copytree(f"{run_dir}/checkpoint_00000006", stopped / "checkpoint_00000006")
    allowed = other.model_copy(deep=True)
    allowed.run.name, allowed.run.storage, allowed.run.allow_data_change = "c", str(tmp_path / "runs"), True
    allowed.train.max_steps = 18
    resumed = pretrain(allowed)
    lines = [m for m in read_lines(resumed) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(7, 19))
    position = torch.load(f"{resumed}/checkpoint_00000018/rank_0.pt", weights_only=False)["data"]
    print("position after 12 steps on the new corpus:", position)
    assert position["epoch"] == 0 and position["consumed"] == 12 * cfg.train.micro_batch
    t, at6 = cfg.train, reference_lr(6, cfg)
    want = [t.min_lr + 0.5 * (at6 - t.min_lr) * (1 + math.cos(math.pi * (m["step"] - 1 - 6) / (18 - 6)))
            for m in lines]
    print("lr, steps 7-18:", [f"{m['lr']:.3e}" for m in lines])
    # rel=1e-12: float rounding between two formulas (4.0e-16 in tests/unit/test_engine.py)
    assert [m["lr"] for m in lines] == pytest.approx(want, rel=1e-12)
    full_step_7 = next(m for m in read_lines(run_dir) if m["step"] == 7 and "loss" in m)
    assert lines[0]["lr"] == pytest.approx(full_step_7["lr"], rel=1e-12)  # where the old run went on


def test_resuming_with_a_different_model_is_refused(zero2_run):
    cfg, _ = zero2_run
    other = cfg.model_copy(deep=True)
    other.model.family = "llama"
    with pytest.raises(ConfigError, match="different model"):
        pretrain(other)


def test_bert_learns_with_the_mlm_objective(tmp_path, ray_session):
    cfg = debug_job(tmp_path, "run.name=bert", "model.family=bert", "train.max_steps=80",
                    "train.eval_every=40", "train.ckpt_every=80", "train.log_every=10", "zero.stage=1")
    run_dir = pretrain(cfg)
    evals = [m["eval_loss"] for m in read_lines(run_dir) if "eval_loss" in m]
    print(f"bert debug eval loss: {evals}")
    assert len(evals) == 3 and evals[-1] < 0.85 * evals[0]


def test_export_round_trip_loads_offline_with_equal_logits(zero2_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptm_dist.export import export

    _, run_dir = zero2_run
    info = export(run_dir, str(tmp_path / "hf"))
    assert info["checkpoint"].endswith("checkpoint_00000012")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").exists()
    # The logits the live ZeRO-2 model computed when it saved its last checkpoint.
    probe = torch.load(f"{info['checkpoint']}/probe.pt", weights_only=False)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    diff = (logits - probe["logits"]).abs().max().item()
    print(f"export: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5
    text = "Return the number of items in a container."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>"


def test_export_refuses_an_incomplete_checkpoint(zero2_run, tmp_path):
    from ptm_dist.export import export

    _, run_dir = zero2_run
    partial = tmp_path / "checkpoint_00000099"
    shutil.copytree(f"{run_dir}/checkpoint_00000006", partial)
    (partial / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        export(str(partial), str(tmp_path / "out"))


def test_worker_step_runs_in_one_plain_process_without_ray(tmp_path):
    """The per-worker code (Trainer: model, DeepSpeed engine, stream) outside Ray, world of one,
    against the plain PyTorch reference over the same batches. A subprocess, because it sets up
    torch.distributed for itself."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from conftest import debug_job
        from test_train import reference_losses
        from ptm_dist.train.local import local_trainer
        cfg = debug_job({str(tmp_path)!r}, "scaling.num_workers=1", "train.max_steps=5", "zero.stage=1")
        tr = local_trainer(cfg)
        it = iter(tr.stream)
        got = [float(tr.train_one_step(it)[0]) for _ in range(5)]
        print(json.dumps([got, reference_losses(cfg, 1)]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(abs(g - w) / w for g, w in zip(got, want)) < 1e-5


def test_a_bad_shard_met_in_training_stops_the_run_with_a_one_line_error(tmp_path, cache_dir):
    """A corrupt line in a shard read by a worker's Ray Data task: the CLI's last line names
    the shard and line (no traceback), and the exit code is 2. It is the user's to fix, so the
    run ends at once: one worker group started, although train.max_failures (3) allows restarts."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        (corpus / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name} says hello world {i} " * 20}) + "\n" for i in range(150)))
    tok = prepare_data(debug_job(tmp_path, f"data.sources=[{{path: {corpus}}}]")).tokenizer_dir
    with open(corpus / "b.jsonl", "a") as f:
        f.write('{"text": broken\n')
    proc = subprocess.run(
        [sys.executable, "-m", "ptm_dist.cli", "pretrain", *[f"--set={o}" for o in (
            "model.size=debug", "data.seq_len=32", f"data.tokenizer.path={tok}", "train.max_steps=200",
            f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.3", f"run.storage={tmp_path}")]],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ptm pretrain: error: {corpus}/b.jsonl: line 151: not valid JSON (Expecting value) "
        "(bad shard 1, over data.max_bad_shards=0)")
    # Each worker process that starts writes a header into worker<rank>.log (Ray's forwarded
    # output is flushed when the CLI shuts its Ray down).
    (log,) = tmp_path.glob("*/logs/worker0.log")
    assert log.read_text().count("--- rank 0:") == 1


def test_a_bad_shard_within_the_budget_is_skipped_and_counted(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        (corpus / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name} says hello world {i} " * 20}) + "\n" for i in range(150)))
    with open(corpus / "b.jsonl", "a") as f:
        f.write('{"text": broken\n')
    cfg = debug_job(tmp_path, f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.2",
                    "data.max_bad_shards=1", "train.max_steps=40", "train.log_every=10",
                    "train.eval_every=40", "train.ckpt_every=40", "run.name=skip")
    run_dir = pretrain(cfg)
    lines = [m for m in read_lines(run_dir) if "loss" in m]
    assert lines[-1]["step"] == 40 and lines[-1]["bad_shards"] == 1
    rank_state = torch.load(f"{run_dir}/checkpoint_00000040/rank_0.pt", weights_only=False)["data"]
    other = torch.load(f"{run_dir}/checkpoint_00000040/rank_1.pt", weights_only=False)["data"]
    reasons = list(rank_state["bad"].values()) + list(other["bad"].values())
    assert any("b.jsonl: line 151: not valid JSON" in r for r in reasons)
