"""`ptm generate`: what a model writes, sampled with transformers' ``generate`` and streamed.

    ptm generate runs/tiny --prompt "The" --max-new-tokens 64 --seed 0

SRC is a Hugging Face model directory (config.json), a ptm run or a ptm checkpoint, local or
in object storage; a run or checkpoint is exported first (ptm_dist.export, into a temporary
directory). Sampling is transformers' own: temperature, top-k and top-p, or greedy decoding at
temperature 0. Each prompt starts from ``set_seed(seed)``, so the same seed on the same device
gives the same text. The model runs on the GPU when there is one, else on the CPU.

After pretraining, the driver shows :func:`summary_sample`: one greedy continuation of
SUMMARY_PROMPT, so a user sees at once whether the model learned anything.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from transformers.generation.streamers import TextStreamer

from ptm_dist import storage
from ptm_dist.errors import ConfigError, user_message
from ptm_dist.runlogs import quiet_output

SUMMARY_PROMPT = "The"
SUMMARY_TOKENS = 24
# Above this a checkpoint (weights and optimizer states) is not exported just for the summary's
# sample: about 180M parameters trained in fp32 with Adam.
SUMMARY_MAX_CHECKPOINT_BYTES = 3 << 30


@dataclass(frozen=True)
class Sampling:
    """How to sample; ``temperature`` 0 is greedy decoding, ``top_k``/``top_p`` None are off."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    num_samples: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples {self.num_samples}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Sample:
    prompt: str
    text: str  # the continuation alone, special tokens left out
    new_tokens: int


class _Streamer(TextStreamer):
    """transformers' TextStreamer, writing the continuation to ``out`` instead of print()."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def non_causal_reason(config: dict) -> str | None:
    """Why a model (its config.json, as a dict) cannot continue text left to right, or None when
    it can: a masked (BERT-style) or other non-causal model. The saved architectures decide;
    without them, the model type (bert is in both of transformers' tables: causal needs is_decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = list(config.get("architectures") or [])
    kind = config.get("model_type")
    if archs:
        if any(a in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) for a in archs):
            return None
    elif kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
            kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.get("is_decoder")):
        return None
    what = archs[0] if archs else f"model type {kind}"
    masked = any(a.endswith("ForMaskedLM") for a in archs) or (not archs and kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return f"{what} is {'a masked language model' if masked else 'not a causal language model'}"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off the terminal while loading and sampling (ptm's lines only)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class Generator:
    """A causal LM and its tokenizer, loaded from a local Hugging Face directory."""

    def __init__(self, model_dir: str, src: str, device: str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.src, self.device = src, device or default_device()
        self.step: int | None = None  # the checkpoint's step when src is a ptm run or checkpoint (open_model)
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{src}: cannot read the model's config.json: {_first_line(e)}") from e
        reason = non_causal_reason(config.to_dict())
        if reason:
            raise ConfigError(f"{src}: {reason}; ptm generate needs a causal LM (gpt2, llama, qwen2, mistral, ...)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{src}: no tokenizer that transformers can load: {_first_line(e)}") from e
        try:
            with _quiet_transformers():
                self.model = AutoModelForCausalLM.from_pretrained(model_dir, config=config)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"{src}: cannot load the model's weights: {_first_line(e)}") from e
        self.model.to(self.device).eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def _prompt_ids(self, prompt: str):
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:  # an empty prompt: start a new document
            start = self.tokenizer.bos_token_id
            start = start if start is not None else self.tokenizer.eos_token_id
            if start is None:
                raise ConfigError(f"{self.src}: empty prompt, and the tokenizer has no bos or eos token to start from")
            ids = torch.tensor([[start]])
        if self.context is not None and ids.shape[1] >= self.context:
            raise ConfigError(f"prompt {prompt[:40]!r}...: {ids.shape[1]} tokens; the model's context is "
                              f"{self.context} tokens")
        return ids

    def _generation_config(self, sampling: Sampling, max_new_tokens: int):
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        sample = {} if sampling.greedy else {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k or 0,  # 0: off (transformers' own default would be 50)
            "top_p": sampling.top_p or 1.0,
        }
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not sampling.greedy, eos_token_id=eos,
                                pad_token_id=pad if pad is not None else eos, **sample)

    def sample(self, prompt: str, sampling: Sampling, out: TextIO | None = None,
               header: str | None = None) -> list[Sample]:
        """``sampling.num_samples`` continuations of ``prompt``, each streamed to ``out`` (after
        ``header`` and the prompt) as it is generated."""
        import torch
        from transformers import set_seed

        ids = self._prompt_ids(prompt).to(self.device)
        new = sampling.max_new_tokens
        if self.context is not None and ids.shape[1] + new > self.context:
            new = self.context - ids.shape[1]
            if out is not None:
                print(f"[ptm] --max-new-tokens {sampling.max_new_tokens} -> {new}: the model's context is "
                      f"{self.context} tokens", file=sys.stderr, flush=True)
        gen_config = self._generation_config(sampling, new)
        set_seed(sampling.seed)
        samples = []
        for i in range(sampling.num_samples):
            streamer = None
            if out is not None:
                if header is not None:
                    label = f" sample {i + 1}/{sampling.num_samples}" if sampling.num_samples > 1 else ""
                    out.write(f"{header}{label} ---\n")
                out.write(prompt)
                out.flush()
                streamer = _Streamer(self.tokenizer, out)
            with torch.no_grad(), _quiet_transformers():
                result = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             generation_config=gen_config, streamer=streamer)
            tokens = result[0, ids.shape[1]:].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            samples.append(Sample(prompt=prompt, text=text, new_tokens=len(tokens)))
        return samples


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


@contextlib.contextmanager
def open_model(src: str, device: str | None = None) -> Iterator[Generator]:
    """A Generator for ``src`` (Hugging Face directory, ptm run or ptm checkpoint, path or URI);
    its ``step`` is the exported checkpoint's (None for a Hugging Face directory). An export or a
    copy made for it is deleted afterwards."""
    from ptm_dist.export import hf_model_dir

    src = storage.absolute(src)
    with tempfile.TemporaryDirectory(prefix="ptm-generate-") as tmp:
        local, is_tmp = None, False
        try:
            with quiet_output():
                model_dir, info = hf_model_dir(src, tmp, src)
                local, is_tmp = storage.local_copy(model_dir)  # a Hugging Face directory in object storage
                model = Generator(str(local), src, device)
            model.step = info["step"] if info else None
            yield model
        finally:
            if local is not None:
                storage.drop_local_copy(local, is_tmp)


def generate(src: str, prompts: list[str], sampling: Sampling, out: TextIO | None = None,
             device: str | None = None) -> list[Sample]:
    """Every prompt's samples, streamed to ``out`` when given (with a header line per prompt or
    sample when there are several)."""
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT or a --prompt-file with one prompt per line")
    samples = []
    with open_model(src, device) as model:
        several = len(prompts) > 1 or sampling.num_samples > 1
        for i, prompt in enumerate(prompts):
            header = f"--- prompt {i + 1}/{len(prompts)}" if len(prompts) > 1 else "---"
            samples += model.sample(prompt, sampling, out, header if several else None)
    return samples


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a local file or URI."""
    try:
        text = storage.read_text(storage.absolute(path))
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({_first_line(e)})") from e
    return [ln for ln in text.splitlines() if ln.strip()]


def _bytes_under(path: str) -> int:
    import pyarrow.fs as pafs

    fs, p = storage.resolve(path)
    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
               if i.type == pafs.FileType.File)


def _checkpoint_model_config(ckpt: str) -> dict:
    """The model config saved with a checkpoint; for checkpoints without one, the job's family."""
    import json

    import yaml

    from ptm_dist import checkpoint as ckpt_lib

    path = storage.join(ckpt, ckpt_lib.MODEL_CONFIG)
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    job = yaml.safe_load(storage.read_text(storage.join(ckpt, "job.yaml"))) or {}
    return {"model_type": (job.get("model") or {}).get("family")}


def summary_sample(run_dir: str, device: str | None = None) -> str | None:
    """One line for the pretraining summary: a greedy continuation of SUMMARY_PROMPT by the run's
    newest checkpoint, or a note saying why there is none; None for a masked LM. Never raises: a
    run that trained is not failed by its sample."""
    from ptm_dist import checkpoint as ckpt_lib

    try:
        ckpt = ckpt_lib.latest_complete_checkpoint(run_dir)
        if ckpt is None:
            return "sample: none (no complete checkpoint)"
        if non_causal_reason(_checkpoint_model_config(ckpt)):
            return None  # a masked LM: nothing to continue
        if _bytes_under(ckpt) > SUMMARY_MAX_CHECKPOINT_BYTES:
            return f"sample: skipped for a checkpoint this large; ptm generate {run_dir} --prompt TEXT"
        samples = generate(ckpt, [SUMMARY_PROMPT], Sampling(max_new_tokens=SUMMARY_TOKENS, temperature=0.0),
                           device=device)
        return f"sample (greedy, {samples[0].new_tokens} new tokens): {SUMMARY_PROMPT!r} -> {samples[0].text!r}"
    except Exception as e:  # noqa: BLE001 - a note, never a failed run
        return f"sample: none ({user_message(e) or _first_line(e)})"
