"""`ptm` command line: parses arguments and calls one function per command."""

from __future__ import annotations

import argparse
import os
import sys

_EPILOG = "Job keys are documented in ptm_dist/config.py and README (Job file)."


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job YAML file (default: the built-in tiny job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's, DeepSpeed's and other libraries' output here (as PTM_VERBOSE=1); "
                   "it always goes to <run_dir>/logs/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm", description="Language-model pretraining on Ray + DeepSpeed.",
                                     epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain a model (Ray Train + DeepSpeed ZeRO)",
                       description="Pretrain a model. Resumes <run.storage>/<run.name> when it has a checkpoint.",
                       epilog=_EPILOG)
    _job_args(p)
    p = sub.add_parser("finetune", help="fine-tune for sequence or token classification (Ray Train + DeepSpeed)",
                       description="Fine-tune finetune.init (default: this job's pretraining run, trained "
                       "first when missing) on finetune.data (default: the built-in task of finetune.task, sequence_"
                       "classification or token_classification). Resumes "
                       "<run.storage>/<finetune.name>; ends with run_dir: <path>.", epilog=_EPILOG)
    _job_args(p)
    p = sub.add_parser("tune", help="Ray Tune sweep over the fine-tuning hyperparameters (ASHA by default)",
                       description="Sweep the job's tune.space with Ray Tune; re-running resumes an "
                       "interrupted sweep. Ends with sweep_dir: <path>.", epilog=_EPILOG)
    _job_args(p)
    p = sub.add_parser("pipeline", help="pretrain, then the fine-tuning sweep on its result",
                       description="ptm pretrain, then ptm tune starting from the run it produced. "
                       "Ends with sweep_dir: <path>.", epilog=_EPILOG)
    _job_args(p)
    p = sub.add_parser("prepare", help="build the corpus shard lists and train the tokenizer",
                       description="Find the job's shards, build the built-in corpus if used, train the tokenizer "
                       "(sampling shards with Ray tasks); with --tokens also tokenize and pack the corpus into "
                       "token shards that `ptm pretrain` reads without tokenizing.")
    _job_args(p)
    p.add_argument("--tokens", metavar="DIR", help="write token shards (and index.json) here: a directory or URI")
    p = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint",
                       description="Export the newest complete checkpoint of a run (or a given checkpoint).")
    p.add_argument("src", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p = sub.add_parser("generate", help="sample continuations of a prompt from a model, streamed",
                       description="Sample continuations of a prompt with transformers' generate and stream them "
                       "here. SRC: a ptm run or checkpoint directory (exported first) or a Hugging Face model "
                       "directory, local or a URI. The same --seed gives the same text; GPU when there is one.")
    p.add_argument("src", help="run, checkpoint or Hugging Face model directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="many prompts: one per non-empty line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only (default: off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the likeliest tokens up to this mass (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed; each prompt starts from it (default 0)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show the libraries' output while the model is exported and loaded")
    p = sub.add_parser("eval", help="downstream evaluation with lm-evaluation-harness",
                       description="Evaluate a model on lm-evaluation-harness tasks with the harness's own Hugging "
                       "Face adapter. SRC: a ptm run or checkpoint directory (exported first) or a Hugging Face model "
                       "directory, local or a URI. Results: SRC/eval/<time>.json, and for a run a metrics.jsonl line.")
    p.add_argument("src", help="run, checkpoint or Hugging Face model directory")
    p.add_argument("--tasks", required=True,
                   help="comma-separated harness task names; ptm_builtin_word_order and ptm_builtin_docstrings "
                   "are built in and offline")
    p.add_argument("--num-fewshot", type=int, help="in-context examples per question (default: the task's own)")
    p.add_argument("--limit", type=float, help="evaluate only this many examples per task (below 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--include-path", metavar="DIR", help="a directory of harness task YAML files (local data works "
                   "offline)")
    p.add_argument("--seed", type=int, default=0, help="seed of the harness's sampling and few-shot choice (default 0)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show the libraries' output while the model is exported, loaded and evaluated")
    p = sub.add_parser("bench", help="benchmarks printed side by side with their baselines",
                       description="ptm bench train: this system against plain PyTorch loops; ptm bench job: a "
                       "whole job against the strong baseline; ptm bench ckpt: what a checkpoint costs training.")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("train", help="system vs plain PyTorch loop tokens/s, step breakdown, memory",
                        description="Measure the system (Ray Train + DeepSpeed + Ray Data), a plain "
                        "single-process PyTorch loop over the same model, and (GPT-2) a minimal loop over "
                        "a compact GPT-2 of the same architecture, on the same batch, precision and device; "
                        "the ratio is against the faster plain loop.")
    _job_args(b)
    b.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    b.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    b.add_argument("--search-micro-batch", action="store_true",
                   help="also time the baseline at other micro batch sizes (until out of memory on GPU)")
    b.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    b = bsub.add_parser("job", help="the whole job vs the strong baseline: tokens/s, held-out loss, wall time",
                        description="Run the job as `ptm pretrain` runs it (into a scratch run directory, "
                        "deleted afterwards), then a minimal single-process trainer over a compact GPT-2 "
                        "on the same global batches from the same initial weights; print tokens/s, "
                        "held-out loss at every evaluation step and wall time side by side.")
    _job_args(b)
    b.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    b = bsub.add_parser("ckpt", help="training time a checkpoint costs: upload in the foreground vs background",
                        description="Run the job three times into object storage (--storage, or a moto S3 "
                        "server started here): with one checkpoint at the end, and with a checkpoint every "
                        "--every steps uploaded in the foreground and in the background; print the training "
                        "time lost per checkpoint for each.")
    _job_args(b)
    b.add_argument("--storage", metavar="URI", help="object storage for the scratch runs, e.g. s3://bucket/prefix "
                   "(default: a moto S3 server on localhost; needs moto[server], in the test extra)")
    b.add_argument("--every", type=int, default=10, help="checkpoint every N steps (default 10)")
    b.add_argument("--repeat", type=int, default=1, help="run the three in turn N times; medians (default 1)")
    b.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    b = bsub.add_parser("init", help="ZeRO-3 peak memory per rank: model built whole vs partitioned",
                        description="Peak host RSS per rank of ZeRO-3 training with the model built whole "
                        "on every rank and built partitioned (no Ray; a process group on this machine).")
    _job_args(b)
    b.add_argument("--steps", type=int, default=3, help="training steps after building (default 3)")
    b.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    b = bsub.add_parser("data", help="raw tokenizer throughput vs this read+tokenize+pack pipeline",
                        description="Measure raw Hugging Face tokenizers batch encoding and this "
                        "pipeline's read + tokenize + pack throughput on the same shards.")
    _job_args(b)
    b.add_argument("--max-shards", type=int, help="use only the first N training shards")
    b.add_argument("--scale", type=int, default=1, metavar="N",
                   help="repeat each (local jsonl/txt) shard N times: a corpus N times larger (default 1)")
    b.add_argument("--memory", action="store_true",
                   help="also stream the unscaled corpus and compare peak memory (use with --scale)")
    b.add_argument("--epochs", type=int, default=1, metavar="N",
                   help="time N epochs through one warm stream (default 1)")
    b.add_argument("--big-shard-mb", type=int, default=0, metavar="MB",
                   help="also measure a corpus of one shard of MB megabytes (the job's documents repeated)")
    b.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    p = sub.add_parser("plan", help="memory per ZeRO stage, recommended stage, time and GPU-hours",
                       description="Estimate per-GPU memory for each ZeRO stage and offload choice, "
                       "recommend a stage and micro batch, and estimate time to the job's token budget.")
    _job_args(p)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GB", help="memory per GPU in GiB")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU in TFLOP/s (default 989, H100 SXM)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p = sub.add_parser("report", help="figures and report.md for a run or sweep directory",
                       description="Write DIR/report/: PNG figures (loss, learning rate, tokens/s, MFU, "
                       "data wait; for a sweep the metric per trial and each hyperparameter against it) "
                       "and report.md embedding them with the job, final metrics and hardware.")
    p.add_argument("dir", help="run directory (metrics.jsonl) or sweep directory (sweep.json)")
    p = sub.add_parser("submit", help="submit a job file to a Ray cluster (Ray Jobs API)",
                       description="Submit JOB to the Ray cluster at --address (or RAY_ADDRESS). The job file "
                       "is validated here, then sent with this ptm_dist package in the job's runtime env.")
    _job_args(p)
    p.add_argument("--address", help="Ray Jobs API address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    p.add_argument("--command", dest="job_command", default="pretrain",
                   help="ptm command to run on the cluster (default pretrain)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p = sub.add_parser("jobs", help="list, inspect, follow and stop cluster jobs",
                       description="Ray Jobs API client; every command takes --address or RAY_ADDRESS.")
    jsub = p.add_subparsers(dest="jobs", required=True)
    for name, text in (("list", "all jobs"), ("status", "one job's status"), ("logs", "one job's logs"),
                       ("stop", "stop a job")):
        j = jsub.add_parser(name, help=text)
        if name != "list":
            j.add_argument("job_id")
        if name == "logs":
            j.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        j.add_argument("--address", help="Ray Jobs API address (default: RAY_ADDRESS)")
    return parser


def cmd_pretrain(args) -> None:
    from ptm_dist.config import load

    cfg = load(args.job, args.overrides)  # before the heavy imports: a typo is reported at once
    from ptm_dist.train.pretrain import pretrain

    pretrain(cfg)


def cmd_finetune(args) -> None:
    from ptm_dist.config import load

    cfg = load(args.job, args.overrides)  # before the heavy imports: a typo is reported at once
    from ptm_dist.finetune.run import finetune

    finetune(cfg)


def cmd_tune(args) -> None:
    from ptm_dist.config import load

    cfg = load(args.job, args.overrides)  # before the heavy imports: a typo is reported at once
    from ptm_dist.finetune.sweep import tune

    tune(cfg)


def cmd_pipeline(args) -> None:
    from ptm_dist.config import load

    cfg = load(args.job, args.overrides)  # before the heavy imports: a typo is reported at once
    from ptm_dist.pipeline import pipeline

    pipeline(cfg)


def cmd_prepare(args) -> None:
    import ray

    from ptm_dist.config import cache_dir, load
    from ptm_dist.data.prepare import prepare_data
    from ptm_dist.launch import connect_ray
    from ptm_dist.pretrained import resolve_init
    from ptm_dist.progress import Progress, human

    cfg = load(args.job, args.overrides)
    # model.init's tokenizer, as ptm pretrain would take it: the token shards are made with it.
    start = resolve_init(cfg, cache_dir(cfg))
    # The tokenizer sample and the token shards are read by Ray tasks.
    owns_ray = connect_ray(cfg.scaling.max_workers, cfg.scaling.resources_per_worker)
    try:
        data = prepare_data(cfg, start.tokenizer_dir if start else None)
        print(f"training shards: {len(data.train)}")
        print(f"held-out shards: {len(data.val)}")
        print(f"tokenizer: {data.tokenizer_dir}")
        if args.tokens:
            from ptm_dist.data.prepare import write_tokens

            total = len(data.train) + len(data.val)  # the bar's total becomes the pieces' count
            with Progress(total=total, desc="tokenize", unit="piece", plain_interval=10.0) as bar:
                def progress(done: int, total: int, documents: int, tokens: int, seconds: float) -> None:
                    bar.update(done, total, docs=human(documents), tokens=human(tokens),
                               tok_s=human(tokens / max(seconds, 1e-9)))

                index = write_tokens(cfg, data, args.tokens, progress)
            n_train = sum(e["tokens"] for e in index["train"])
            n_val = sum(e["tokens"] for e in index["val"])
            print(f"token shards: {len(index['train'])} train ({n_train:,} tokens), {len(index['val'])} held-out "
                  f"({n_val:,} tokens), {index['dtype']}, seq_len {index['seq_len']}")
            print(f"use them with: data.sources: [{{path: {args.tokens}, format: tokens}}]")
    finally:
        if owns_ray:
            ray.shutdown()


def cmd_export(args) -> None:
    from ptm_dist.export import export

    info = export(args.src, args.out)
    print(f"exported {info['checkpoint']} (step {info['step']}); "
          f"probe logits match within {info['max_abs_logit_diff']:.2g}")
    print(f"out: {info['out']}")


def cmd_generate(args) -> None:
    from ptm_dist.generate import Sampling, generate, read_prompts

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, num_samples=args.num_samples)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    generate(args.src, prompts, sampling, out=sys.stdout)


def cmd_eval(args) -> None:
    from ptm_dist.errors import ConfigError
    from ptm_dist.evaluate import evaluate, format_table, parse_tasks, save_results

    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit {args.limit:g}: must be > 0")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    result = evaluate(args.src, parse_tasks(args.tasks), num_fewshot=args.num_fewshot, limit=limit,
                      batch_size=args.batch_size, include_path=args.include_path, seed=args.seed)
    print(format_table(result))
    print(f"results: {save_results(result)}")


def cmd_bench(args) -> None:
    import json

    from ptm_dist.bench import bench_train, format_report
    from ptm_dist.config import load

    if args.bench == "init":
        from ptm_dist.bench_init import bench_init, format_init_report

        report = bench_init(load(args.job, args.overrides), args.steps)
        print(format_init_report(report))
    elif args.bench == "ckpt":
        from ptm_dist.bench_ckpt import bench_ckpt, format_ckpt_report

        report = bench_ckpt(load(args.job, args.overrides), args.storage, args.every, args.repeat)
        print(format_ckpt_report(report))
    elif args.bench == "job":
        from ptm_dist.bench_job import bench_job, format_job_report

        report = bench_job(load(args.job, args.overrides))
        print(format_job_report(report))
    elif args.bench == "data":
        from ptm_dist.bench import bench_data

        report = bench_data(load(args.job, args.overrides), args.max_shards, args.scale, args.memory,
                            args.epochs, args.big_shard_mb)
        print(f"job's corpus ({report['shards']} shards, {report['epochs']} epoch(s)): raw tokenizers "
              f"{report['raw_tokens_per_s']:,.0f} tokens/s; pipeline {report['pipeline_tokens_per_s']:,.0f} "
              f"tokens/s (cold start: {report['pipeline_cold_tokens_per_s']:,.0f}); ratio {report['ratio']:.3f}; "
              f"first sequence after {report['first_sequence_s']:.1f}s (cold: {report['cold_first_sequence_s']:.1f}s)")
        if "big" in report:
            big = report["big"]
            print(f"one {big['shard_bytes'] / 2**20:,.0f} MiB shard ({big['pieces']} pieces): raw tokenizers "
                  f"{big['raw_tokens_per_s']:,.0f} tokens/s; pipeline {big['pipeline_tokens_per_s']:,.0f} tokens/s; "
                  f"ratio {big['ratio']:.3f}; first sequence after {big['first_sequence_s']:.1f}s; "
                  f"peak memory {big['peak_mem_bytes'] / 2**20:,.0f} MiB")
        if args.memory:
            print(f"peak memory (this process + Ray workers): {report['peak_mem_bytes_1x'] / 2**20:,.0f} MiB "
                  f"at 1x, {report['peak_mem_bytes'] / 2**20:,.0f} MiB at {args.scale}x "
                  f"({report['memory_growth']:+.1%})")
    else:
        report = bench_train(load(args.job, args.overrides), args.steps, args.warmup, args.search_micro_batch)
        print(format_report(report))
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


def cmd_plan(args) -> None:
    import json

    from ptm_dist.config import load
    from ptm_dist.errors import ConfigError
    from ptm_dist.plan import format_plan, plan

    cfg = load(args.job, args.overrides)
    if args.gpus < 1 or args.gpu_mem <= 0 or not 0 < args.mfu <= 1:
        raise ConfigError("--gpus must be >= 1, --gpu-mem > 0 and --mfu in (0, 1]")
    vocab = cfg.data.tokenizer.vocab_size
    if cfg.data.tokenizer.path:
        from pathlib import Path

        from tokenizers import Tokenizer

        from ptm_dist.config import cache_dir
        from ptm_dist.data.tokenizer import convert_to_fast

        tok_dir = convert_to_fast(Path(cfg.data.tokenizer.path).expanduser().resolve(), cache_dir(cfg),
                                  "data.tokenizer.path")
        vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    result = plan(cfg, args.gpus, args.gpu_mem, vocab, args.mfu, args.gpu_tflops * 1e12, args.precision)
    print(format_plan(result))
    print(json.dumps(result, indent=2))


def cmd_report(args) -> None:
    from ptm_dist import storage
    from ptm_dist.report import report

    out = report(args.dir)
    for name in sorted(n for n in _list_names(out) if n.endswith(".png")):
        print(f"figure: {storage.join(out, name)}")
    print(f"report: {storage.join(out, 'report.md')}", flush=True)


def _list_names(path: str) -> list[str]:
    import pyarrow.fs as pafs

    from ptm_dist import storage

    fs, p = storage.resolve(path)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(p))]


def cmd_submit(args) -> None:
    from ptm_dist import submit as sm

    job_id = sm.submit(args.job, args.address, args.overrides, args.job_command)
    address = sm.resolve_address(args.address)
    print(f"submitted {args.job_command} job {job_id} to {address}")
    forwarded = sorted(sm.storage_env())
    if forwarded:
        print(f"  storage settings forwarded to the job (values not shown): {', '.join(forwarded)}")
    print(f"  follow:  ptm jobs logs {job_id} --follow --address {address}")
    print(f"  status:  ptm jobs status {job_id} --address {address}")
    print(f"  stop:    ptm jobs stop {job_id} --address {address}")
    if args.wait:
        for chunk in sm.follow_logs(args.address, job_id):
            print(chunk, end="", flush=True)
        print(f"status: {sm.status(args.address, job_id)['status']}")
    print(f"job_id: {job_id}", flush=True)


def cmd_jobs(args) -> None:
    from ptm_dist import submit as sm

    if args.jobs == "list":
        jobs = sm.list_jobs(args.address)
        print(f"{'job_id':<30}{'status':<12}entrypoint")
        for j in jobs:
            print(f"{j['job_id']:<30}{j['status']:<12}{j['entrypoint']}")
    elif args.jobs == "status":
        info = sm.status(args.address, args.job_id)
        print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    elif args.jobs == "logs":
        if args.follow:
            for chunk in sm.follow_logs(args.address, args.job_id):
                print(chunk, end="", flush=True)
        else:
            print(sm.logs(args.address, args.job_id), end="")
    elif args.jobs == "stop":
        print(f"{args.job_id}: {'stop requested' if sm.stop(args.address, args.job_id) else 'already ended'}")


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray(was_up: bool) -> None:
    """Shut the Ray this command connected to down, so its forwarded worker logs are flushed
    before our last line; a Ray the caller had started before (main() called in-process) stays."""
    if _ray_is_up() and not was_up:
        sys.modules["ray"].shutdown()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["PTM_VERBOSE"] = "1"
    handler = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "tune": cmd_tune, "pipeline": cmd_pipeline,
               "prepare": cmd_prepare, "export": cmd_export, "generate": cmd_generate, "eval": cmd_eval,
               "bench": cmd_bench, "plan": cmd_plan, "report": cmd_report, "submit": cmd_submit,
               "jobs": cmd_jobs}[args.command]
    ray_was_up = _ray_is_up()
    try:
        handler(args)
    except BrokenPipeError:  # output piped into head and the like
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        print("ptm: interrupted; the newest complete checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as e:
        from ptm_dist.errors import user_message
        from ptm_dist.stopping import EXIT_STATUS, RunStopped

        if isinstance(e, RunStopped):  # SIGTERM: checkpointed and stopped, as asked
            _stop_ray(ray_was_up)
            print(f"ptm {args.command}: {e}", file=sys.stderr)
            return EXIT_STATUS
        msg = user_message(e)
        logs = getattr(e, "ptm_logs", None)  # set by runlogs.RunLogs, which holds the traceback
        if msg is None and logs is None:
            raise
        status = 2  # the user's to fix
        if msg is None:  # a library's error (or a bug): one line, the traceback is in the log
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            msg = f"{type(e).__name__}: {first}".rstrip(": ") + f" (traceback and library output: {logs})"
            status = 1
        _stop_ray(ray_was_up)
        print(f"ptm {args.command}: error: {msg}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
