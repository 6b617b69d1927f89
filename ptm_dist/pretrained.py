"""`model.init`: the pretrained model a run starts from, resolved once by the driver.

    start = resolve_init(cfg, cache)   # None without model.init
    start.init_dir      # a Hugging Face model directory every worker reads (path or URI)
    start.config        # its config.json, as a dict
    start.tokenizer_dir # a local directory with its tokenizer, when it has one

A Hugging Face directory is used as it is (on a cluster, a local one is first copied once to
``<run.storage>/.ptm-cache/init-<key>/``, where every node reads it); a ptm run or checkpoint is
exported to Hugging Face format first (ptm_dist.export), into the cache. The model's own
tokenizer is the run's tokenizer unless data.tokenizer.path is set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ptm_dist import storage
from ptm_dist.data.tokenizer import SLOW_TOKENIZER_FILES, TOKENIZER_FILES, convert_to_fast
from ptm_dist.errors import ConfigError

LOG_PREFIX = "[ptm]"


@dataclass(frozen=True)
class ModelStart:
    init_dir: str  # Hugging Face model directory: local path or URI
    config: dict  # its config.json
    tokenizer_dir: Path | None  # local copy of its tokenizer files (tokenizer.json present), if any


def _read_config(init_dir: str, given: str) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(init_dir, "config.json")))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init {given}: config.json is not readable JSON ({e})") from None


def _tokenizer_copy(init_dir: str, cache: Path) -> Path | None:
    """A local directory with the init model's tokenizer (tokenizer.json): the directory itself
    when it is local and has one, a copy of its tokenizer files for a URI, and for a tokenizer
    saved without tokenizer.json (a SentencePiece model, say) the fast tokenizer transformers
    converts from it, saved once in the cache (data.tokenizer.convert_to_fast). None when the
    directory holds no tokenizer."""
    names = ("tokenizer.json", *SLOW_TOKENIZER_FILES, "vocab.txt", "vocab.json")
    if not any(storage.exists(storage.join(init_dir, n)) for n in names):
        return None
    if not storage.is_uri(init_dir):
        return convert_to_fast(Path(init_dir), cache, "model.init")
    out = cache / "init-tokenizer-files" / hashlib.sha1(init_dir.encode()).hexdigest()[:12]
    if not (out / "DONE").is_file():
        wanted = set(TOKENIZER_FILES) | set(SLOW_TOKENIZER_FILES)
        local, is_tmp = storage.local_copy(init_dir, select=lambda rel: rel in wanted)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local, tmp)
            (tmp / "DONE").write_text("")
            storage.publish_local_dir(tmp, out, "DONE")
        finally:
            storage.drop_local_copy(local, is_tmp)
    return convert_to_fast(out, cache, "model.init")


def hf_model_dir(src: str, out: Path, what: str) -> str:
    """``src`` as a Hugging Face model directory: itself when it is one (config.json), else its
    newest complete checkpoint (a ptm run) or the checkpoint it names, exported into ``out``
    (kept: a later call for the same checkpoint reuses it). ``what`` names the field in errors."""
    from ptm_dist import checkpoint as ckpt_lib
    from ptm_dist.export import export

    src = storage.absolute(src)
    if not storage.exists(src):
        raise ConfigError(f"{what} {src}: no such directory")
    if storage.exists(storage.join(src, "config.json")):
        return src
    ckpt = src if storage.exists(storage.join(src, ckpt_lib.MARKER)) else ckpt_lib.latest_complete_checkpoint(src)
    if not ckpt:
        raise ConfigError(f"{what} {src}: neither a Hugging Face model directory (config.json) nor a ptm run "
                          "or checkpoint directory with a complete checkpoint")
    stamp = out / "ptm_source.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("checkpoint") == ckpt:
        return str(out)
    info = export(ckpt, str(out))
    stamp.write_text(json.dumps({"checkpoint": ckpt, "step": info["step"]}) + "\n")
    print(f"{LOG_PREFIX} start model: {ckpt} (step {info['step']}) exported to {out}", flush=True)
    return str(out)


def init_config(given: str) -> dict:
    """The config.json of a model.init source without exporting it: a Hugging Face directory's
    own, or the model config saved with a ptm checkpoint (for ``ptm plan``)."""
    from ptm_dist import checkpoint as ckpt_lib

    src = storage.absolute(given)
    if storage.exists(storage.join(src, "config.json")):
        return _read_config(src, given)
    try:
        ckpt = ckpt_lib.resolve_source(src)
    except FileNotFoundError as e:
        raise ConfigError(f"model.init {given}: neither a Hugging Face model directory (config.json) nor a "
                          f"ptm run or checkpoint ({e})") from None
    path = storage.join(ckpt, ckpt_lib.MODEL_CONFIG)
    if not storage.exists(path):
        raise ConfigError(f"model.init {given}: {ckpt} predates {ckpt_lib.MODEL_CONFIG}; export it with "
                          "`ptm export` and give the exported directory")
    return json.loads(storage.read_text(path))


def _stage(init_dir: str, storage_root: str) -> str:
    """A local model directory copied once to ``<storage_root>/.ptm-cache/init-<key>`` (key:
    the directory's path, file names, sizes and times), for the nodes of a cluster."""
    root = Path(init_dir)
    files = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in root.rglob("*") if p.is_file())
    key = hashlib.sha256(json.dumps([str(root.resolve()), files]).encode()).hexdigest()[:16]
    target = storage.join(storage_root, ".ptm-cache", f"init-{key}")
    if not storage.exists(storage.join(target, "DONE")):
        print(f"{LOG_PREFIX} copying the start model {init_dir} to {target} for the cluster's nodes", flush=True)
        storage.upload_dir(root, target)
        storage.write_text(storage.join(target, "DONE"), "")
    return target


def resolve_init(cfg, cache: Path, cluster: bool = False) -> ModelStart | None:
    """The job's start model (``cfg.model.init``), or None for random weights. ``cluster``:
    the workers run on other nodes, which cannot read this machine's files."""
    given = cfg.model.init
    if given is None:
        return None
    key = hashlib.sha1(storage.absolute(given).encode()).hexdigest()[:12]
    init_dir = hf_model_dir(given, cache / "init" / key, "model.init")
    config = _read_config(init_dir, given)
    tok_dir = _tokenizer_copy(init_dir, cache)
    if cluster and not storage.is_uri(init_dir):
        init_dir = _stage(init_dir, storage.absolute(cfg.run.storage))
    return ModelStart(init_dir, config, tok_dir)


def check_model(cfg, start: ModelStart | None, tokenizer_dir: Path, vocab_size: int) -> None:
    """Driver-side checks of the model a job trains, each a one-line ConfigError: the family and
    ``model.config`` fields exist, the config is valid, the tokenizer fits the model's vocabulary
    and a masked LM's tokenizer has a mask token (and no train.eval_tasks: those score causal
    LMs). Imports transformers only when the model is not a plain registry one."""
    from tokenizers import Tokenizer

    from ptm_dist.data.tokenizer import has_mask
    from ptm_dist.sizes import CAUSAL_FAMILIES, SIZES

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if start is None and not cfg.model.config and cfg.model.family in SIZES:
        causal = cfg.model.family in CAUSAL_FAMILIES
        model_vocab = vocab_size
    else:
        from ptm_dist import models

        special = models.SpecialTokens(eos=0, pad=0, mask=0)
        try:
            config = models.config_for(cfg.model, vocab_size, cfg.data.seq_len, special,
                                       start.config if start else None)
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError) as e:  # transformers' own checks of a config
            what = f"model.init {cfg.model.init}" if start else f"model.family {cfg.model.family}"
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ConfigError(f"{what} with model.config {cfg.model.config}: not a valid config: {first}") from None
        causal = models.is_causal(config)
        model_vocab = config.vocab_size
    if vocab_size > model_vocab:
        raise ConfigError(f"the tokenizer {tokenizer_dir} has {vocab_size} tokens but the model's vocabulary "
                          f"(vocab_size) has {model_vocab}; use the model's own tokenizer (leave "
                          "data.tokenizer.path empty)")
    if not causal and cfg.train.eval_tasks:
        raise ConfigError(f"train.eval_tasks {', '.join(cfg.train.eval_tasks)}: the model is a masked LM; the "
                          "harness scores causal models (leave train.eval_tasks empty)")
    if not causal and not has_mask(tokenizer_dir, tok):
        raise ConfigError(f"the model is a masked LM but the tokenizer {tokenizer_dir} names no mask token "
                          "(mask_token in tokenizer_config.json)")
