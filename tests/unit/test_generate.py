"""ptm_dist.generate on small random "hub" models (tests/hub_helpers.py), no Ray: sampling
repeats with its seed and changes with it, greedy decoding is the argmax continuation, text is
streamed as it comes, and a bad SRC or a masked LM is a one-line user error. On a real trained
run: tests/e2e/test_generate.py."""

from __future__ import annotations

import io

import pytest
import torch

from ptm_dist.cli import build_parser, main
from ptm_dist.errors import ConfigError, UserError
from ptm_dist.generate import Sampling, generate, non_causal_reason, read_prompts, summary_sample

PROMPT = "The first river of the"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from hub_helpers import make_hub_model

    return make_hub_model(tmp_path_factory.mktemp("gen") / "gpt2", "gpt2")  # n_layer=2, n_embd=32


def sample(src, prompt=PROMPT, **kw):
    out = io.StringIO()
    (s,) = generate(str(src), [prompt], Sampling(**kw), out=out)
    return s, out.getvalue()


def test_sampling_repeats_with_its_seed_and_changes_with_another(gpt2_dir):
    a, streamed = sample(gpt2_dir, max_new_tokens=12, temperature=1.0, seed=3)
    assert a.prompt == PROMPT and 1 <= a.new_tokens <= 12
    assert streamed == PROMPT + a.text + "\n"  # the prompt, then its continuation as it came
    again, streamed_again = sample(gpt2_dir, max_new_tokens=12, temperature=1.0, seed=3)
    assert (again, streamed_again) == (a, streamed)
    other, _ = sample(gpt2_dir, max_new_tokens=12, temperature=1.0, seed=4)
    assert other.text != a.text  # a random model at temperature 1: 12 tokens from ~400


def test_greedy_is_the_argmax_continuation_whatever_the_seed(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, _ = sample(gpt2_dir, max_new_tokens=10, temperature=0, seed=0)
    b, _ = sample(gpt2_dir, max_new_tokens=10, temperature=0, seed=1)
    assert a == b
    tok = AutoTokenizer.from_pretrained(str(gpt2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(gpt2_dir)).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(10):  # the reference: argmax of the next-token logits, one token at a time
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert a.new_tokens == len(new) and a.text == tok.decode(new, skip_special_tokens=True)


def test_many_samples_and_prompts_each_under_a_header(gpt2_dir, tmp_path):
    out = io.StringIO()
    samples = generate(str(gpt2_dir), [PROMPT], Sampling(max_new_tokens=6, seed=5, num_samples=3), out=out)
    assert len(samples) == 3 and len({s.text for s in samples}) > 1
    text = out.getvalue()
    assert [ln for ln in text.splitlines() if ln.startswith("---")] == [f"--- sample {i}/3 ---" for i in (1, 2, 3)]
    first, _ = sample(gpt2_dir, max_new_tokens=6, seed=5)
    assert first.text == samples[0].text  # a prompt's first sample does not depend on --num-samples

    f = tmp_path / "prompts.txt"
    f.write_text("The small city\n\nThe last garden\n")
    prompts = read_prompts(str(f))
    assert prompts == ["The small city", "The last garden"]
    out = io.StringIO()
    samples = generate(str(gpt2_dir), prompts, Sampling(max_new_tokens=4, seed=0), out=out)
    assert [s.prompt for s in samples] == prompts
    text = out.getvalue()
    assert "--- prompt 1/2 ---\nThe small city" in text and "--- prompt 2/2 ---\nThe last garden" in text
    with pytest.raises(ConfigError, match="prompt-file"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_new_tokens_stop_at_the_models_context(gpt2_dir, capsys):
    s, _ = sample(gpt2_dir, max_new_tokens=1000, temperature=0)  # n_positions 256
    assert s.new_tokens <= 256
    assert "--max-new-tokens 1000 -> " in capsys.readouterr().err


def test_a_llama_style_model_whose_tokenizer_adds_bos(tmp_path):
    from hub_helpers import make_hub_model

    src = make_hub_model(tmp_path / "llama", "llama")
    a, streamed = sample(src, prompt="The large harbor", max_new_tokens=5, seed=2)
    assert streamed.startswith("The large harbor") and 1 <= a.new_tokens <= 5
    assert sample(src, prompt="The large harbor", max_new_tokens=5, seed=2)[0] == a


def test_options_are_checked():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": 0}, {"top_p": 1.5}, {"num_samples": 0}):
        with pytest.raises(ConfigError):
            Sampling(**bad)
    a = build_parser().parse_args(["generate", "runs/tiny", "--prompt", "Hi", "--top-k", "5", "--top-p", "0.9"])
    assert (a.src, a.prompt, a.prompt_file, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed,
            a.num_samples) == ("runs/tiny", "Hi", None, 64, 0.8, 5, 0.9, 0, 1)
    with pytest.raises(SystemExit):  # --prompt and --prompt-file are exclusive, and one is needed
        build_parser().parse_args(["generate", "runs/tiny", "--prompt", "a", "--prompt-file", "p.txt"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "runs/tiny"])


def test_a_bad_source_is_a_one_line_user_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing}: no such directory"):
        generate(str(missing), ["x"], Sampling())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"{empty}: neither a Hugging Face model directory"):
        generate(str(empty), ["x"], Sampling())
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UserError, match=str(no_weights)):
        generate(str(no_weights), ["x"], Sampling())
    # ... and the CLI prints one line, status 2, no traceback.
    capsys.readouterr()
    assert main(["generate", str(missing), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"ptm generate: error: {missing}: no such directory\n"


def test_a_masked_lm_is_refused(tmp_path):
    from hub_helpers import make_hub_model

    src = make_hub_model(tmp_path / "bert", "bert")
    with pytest.raises(UserError, match="BertForMaskedLM is a masked language model; ptm generate needs a causal LM"):
        generate(str(src), ["the city"], Sampling())
    assert non_causal_reason({"model_type": "bert"}) == "model type bert is a masked language model"
    assert non_causal_reason({"model_type": "bert", "is_decoder": True}) is None
    assert non_causal_reason({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}) is None
    assert non_causal_reason({"model_type": "llama"}) is None
    assert non_causal_reason({"architectures": ["T5ForConditionalGeneration"]}) == (
        "T5ForConditionalGeneration is not a causal language model")


def test_the_summary_sample_is_a_note_when_there_is_no_checkpoint(tmp_path):
    assert summary_sample(str(tmp_path)) == "sample: none (no complete checkpoint)"
