"""Transfer (issue 16) without Ray: standard tokenizers' special tokens and packing, configs for
any architecture, model.config, loading a pretrained model's weights (whole, and under ZeRO-3 on
two gloo ranks spawned by torch), FLOPs per token by hand, and the driver's one-line checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_helpers import make_hub_model, make_tokenizer
from tokenizers import Tokenizer

from ptm_dist import models
from ptm_dist.config import ConfigError, load
from ptm_dist.data.packing import pack_shard
from ptm_dist.data.sources import Shard
from ptm_dist.data.tokenizer import has_mask, special_ids
from ptm_dist.errors import DataError
from ptm_dist.pretrained import check_model, resolve_init

SPECIAL = models.SpecialTokens(eos=0, pad=0, mask=0)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {f: make_hub_model(root / f, f) for f in ("gpt2", "llama", "bert", "qwen2")}


def _tok(d: Path) -> Tokenizer:
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def test_special_tokens_come_from_the_tokenizers_own_configuration(hub):
    gpt2, llama, bert = (_tok(hub[f]) for f in ("gpt2", "llama", "bert"))
    eot = gpt2.token_to_id("<|endoftext|>")
    # GPT-2 style has no pad: it defaults to eos (README, Continued pretraining)
    assert special_ids(hub["gpt2"], gpt2) == {"eos": eot, "pad": eot, "mask": eot}
    eos = llama.token_to_id("</s>")
    assert special_ids(hub["llama"], llama) == {"eos": eos, "pad": eos, "mask": eos}
    # WordPiece: documents end with [SEP]; [PAD] and [MASK] are the tokenizer's own
    assert special_ids(hub["bert"], bert) == {"eos": bert.token_to_id("[SEP]"), "pad": bert.token_to_id("[PAD]"),
                                              "mask": bert.token_to_id("[MASK]")}
    assert has_mask(hub["bert"], bert) and not has_mask(hub["gpt2"], gpt2)


def test_a_tokenizer_without_an_end_of_text_token_is_a_one_line_error(tmp_path, hub):
    d = tmp_path / "tok"
    make_tokenizer("bytelevel", d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token", "unk_token"):
        conf.pop(key, None)
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    for extra in d.glob("special_tokens_map.json"):
        extra.unlink()
    with pytest.raises(DataError, match=r"names no end-of-text token \(eos_token or sep_token") as e:
        special_ids(d, _tok(d))
    assert "\n" not in str(e.value) and str(d) in str(e.value)


@pytest.mark.parametrize("family,first,last", [("gpt2", None, "<|endoftext|>"), ("llama", "<s>", "</s>"),
                                               ("bert", "[CLS]", "[SEP]")])
def test_documents_are_packed_with_the_tokenizers_own_special_tokens(tmp_path, hub, family, first, last):
    docs = ["the first river of the north was quiet", "a small garden in the valley"]
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = _tok(hub[family])
    eos = special_ids(hub[family], tok)["eos"]
    # The tokenizer's own encoding of each document (transformers' view of it), then the
    # end-of-text token unless the encoding already ends with it.
    want: list[int] = []
    for t in docs:
        ids = tok.encode(t).ids
        want += ids if ids[-1] == eos else [*ids, eos]
    rows = next(pack_shard(Shard(str(shard), "jsonl", "text"), 0, tok.to_str(), len(want), eos))["input_ids"]
    assert len(rows) == 1
    stream = rows[0].tolist()
    assert stream == want
    pieces = [tok.id_to_token(i) for i in stream]
    if first:
        assert pieces[0] == first and pieces.count(first) == 2
    assert pieces[-1] == last and pieces.count(last) == 2


def test_any_transformers_architecture_and_model_config(tmp_path):
    # qwen2 is not in the registry: the generic debug size, with the standard config names
    cfg = load(None, ["model.family=qwen2", "model.size=debug", "model.config={num_hidden_layers: 3}"])
    config = models.config_for(cfg.model, 300, 32, SPECIAL)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
            config.vocab_size) == ("qwen2", 32, 3, 1, 300)
    model = models.build(config, seed=0)
    assert models.is_causal(config) and type(model).__name__ == "Qwen2ForCausalLM"
    out = model(input_ids=torch.randint(0, 300, (2, 16)))
    assert out.logits.shape == (2, 16, 300)
    # a registry family with a custom shape
    cfg = load(None, ["model.family=gpt2", "model.size=debug", "model.config={n_layer: 3, n_embd: 64}"])
    config = models.config_for(cfg.model, 300, 32, SPECIAL)
    assert (config.n_layer, config.n_embd, config.n_head) == (3, 64, 2)
    # masked families beyond bert are masked LMs
    cfg = load(None, ["model.family=roberta", "model.size=debug"])
    assert not models.is_causal(models.config_for(cfg.model, 300, 32, SPECIAL))


def test_a_misspelt_config_field_or_family_is_a_one_line_error():
    cfg = load(None, ["model.family=llama", "model.size=debug", "model.config={num_hiden_layers: 3}"])
    with pytest.raises(ConfigError, match=r"model.config.num_hiden_layers: not a field of LlamaConfig; "
                                          r"did you mean num_hidden_layers") as e:
        models.config_for(cfg.model, 300, 32, SPECIAL)
    assert "\n" not in str(e.value)
    cfg = load(None, ["model.family=qwen3x", "model.size=debug"])
    with pytest.raises(ConfigError, match=r"model.family 'qwen3x': not a model type of the installed transformers"):
        models.config_for(cfg.model, 300, 32, SPECIAL)
    with pytest.raises(ConfigError, match=r"model.size 'huge' does not exist for family 'qwen2'; allowed: debug"):
        load(None, ["model.family=qwen2", "model.size=huge"])


def test_flops_per_token_by_hand_for_llama_qwen2_and_gemma():
    """6 x (matmul weights) + 12 x layers x (heads x head_dim) x seq_len, counted by hand from
    each architecture's shapes (untied input embeddings are a lookup: no FLOPs)."""
    v, t = 300, 32

    def count(family, **over):
        cfg = load(None, [f"model.family={family}", "model.size=debug",
                          "model.config=" + json.dumps(over)])
        config = models.config_for(cfg.model, v, t, SPECIAL)
        model = models.build(config, seed=0)
        return models.flops_per_token(config, models.matmul_params(model), t)

    # llama, debug size: hidden 32, 2 layers, 2 heads of 16, 1 kv head, mlp 64; untied here
    h, L, heads, hd, kv, ff = 32, 2, 2, 16, 1, 64
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * ff + 2 * h  # q, k+v, o, mlp, 2 norms
    matmul = L * per_layer + h + v * h  # + final norm + lm_head (input embedding: a lookup)
    assert count("llama", tie_word_embeddings=False) == 6 * matmul + 12 * L * heads * hd * t
    # qwen2: the same shape with q/k/v biases, tied embeddings (the lm_head's matmul counted once)
    per_layer_q = per_layer + heads * hd + 2 * kv * hd
    assert count("qwen2") == 6 * (L * per_layer_q + h + v * h) + 12 * L * heads * hd * t
    # gemma: head_dim 24 != hidden / heads; the attention term uses heads x head_dim
    hd = 24
    per_layer_g = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * ff + 2 * h
    assert count("gemma", head_dim=24) == 6 * (L * per_layer_g + h + v * h) + 12 * L * heads * hd * t


def test_a_pretrained_models_weights_and_config_are_loaded(hub):
    from transformers import AutoModelForCausalLM

    cfg = load(None, [f"model.init={hub['llama']}"])
    start = resolve_init(cfg, Path("/nonexistent-cache"))
    assert start.init_dir == str(hub["llama"]) and start.tokenizer_dir == hub["llama"]
    config = models.config_for(cfg.model, 400, 32, SPECIAL, start.config)
    assert (config.model_type, config.vocab_size, config.tie_word_embeddings) == ("llama", 448, False)
    model = models.build(config, seed=123, init_dir=start.init_dir)
    ref = AutoModelForCausalLM.from_pretrained(str(hub["llama"]))
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    ids = torch.as_tensor(np.arange(20)[None])
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_model_checks_are_one_line_errors(tmp_path, hub):
    cfg = load(None, [f"model.init={hub['llama']}"])
    start = resolve_init(cfg, tmp_path)
    check_model(cfg, start, hub["llama"], 400)  # the model's own tokenizer fits (448 >= 400)
    big = tmp_path / "big-tok"
    make_tokenizer("bytelevel", big, vocab_size=600)
    n = _tok(big).get_vocab_size()
    with pytest.raises(ConfigError, match=rf"the tokenizer {big} has {n} tokens but the model's vocabulary "
                                          r"\(vocab_size\) has 448") as e:
        check_model(cfg, start, big, n)
    assert "\n" not in str(e.value)
    bert = load(None, ["model.family=bert", "model.size=debug"])
    with pytest.raises(ConfigError, match=r"masked LM but the tokenizer .* names no mask token"):
        check_model(bert, None, hub["gpt2"], 400)
    scored = load(None, ["model.family=bert", "model.size=debug", "train.eval_tasks=[ptm_builtin_word_order]"])
    with pytest.raises(ConfigError, match=r"train.eval_tasks ptm_builtin_word_order: the model is a masked LM; "
                                          r"the harness scores causal models"):
        check_model(scored, None, hub["bert"], 400)
    with pytest.raises(ConfigError, match=r"model.init .*nope: no such directory"):
        resolve_init(load(None, [f"model.init={tmp_path / 'nope'}"]), tmp_path)
    (tmp_path / "empty").mkdir()
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a document"}\n')
    with pytest.raises(ConfigError, match=r"neither a Hugging Face model directory \(config.json\) nor a ptm run"):
        resolve_init(load(None, [f"model.init={tmp_path / 'empty'}"]), tmp_path)


def test_a_sentencepiece_only_tokenizer_is_converted_once_and_encodes_as_sentencepiece(tmp_path):
    """A model directory with only tokenizer.model (no tokenizer.json), as older Llama
    checkpoints ship: model.init and data.tokenizer.path both take it; transformers converts it
    to a fast tokenizer once (saved in the cache and reused), which encodes text as the
    sentencepiece library itself does (plus <s> in front, as the Llama tokenizer adds)."""
    import sentencepiece as spm
    from hub_helpers import HUB_TEXT, make_sentencepiece_model

    from ptm_dist.data.prepare import prepare_data

    init = make_sentencepiece_model(tmp_path / "sp-llama")
    assert not (init / "tokenizer.json").exists()
    cache = tmp_path / "cache"
    cfg = load(None, [f"model.init={init}", f"data.cache_dir={cache}"])
    start = resolve_init(cfg, cache)
    assert start.tokenizer_dir != init and (start.tokenizer_dir / "tokenizer.json").is_file()
    mtime = (start.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert resolve_init(cfg, cache).tokenizer_dir == start.tokenizer_dir  # converted once, then reused
    assert (start.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == mtime

    sp = spm.SentencePieceProcessor(model_file=str(init / "tokenizer.model"))
    tok = _tok(start.tokenizer_dir)
    for text in [*HUB_TEXT[:20], "The small river, of the north: hidden in 7 ways! Ünïcode ☃"]:
        assert tok.encode(text).ids == [1, *sp.encode(text)], text
    assert tok.decode(tok.encode("hidden ☃ ways").ids, skip_special_tokens=True) == "hidden ☃ ways"
    assert special_ids(start.tokenizer_dir, tok) == {"eos": 2, "pad": 2, "mask": 2}  # </s>; no pad: eos

    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HUB_TEXT))
    data = prepare_data(load(None, [f"data.tokenizer.path={init}", f"data.cache_dir={cache}",
                                    f"data.sources=[{{path: {tmp_path / 'train.jsonl'}}}]",
                                    f"data.val_sources=[{{path: {tmp_path / 'val.jsonl'}}}]"]))
    assert data.tokenizer_dir == start.tokenizer_dir


def test_a_directory_without_any_tokenizer_is_a_one_line_error(tmp_path):
    from ptm_dist.data.prepare import prepare_data

    (tmp_path / "empty").mkdir()
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a document"}\n')
    with pytest.raises(DataError, match=r"^data.tokenizer.path .*empty: no tokenizer there \(neither tokenizer.json"):
        prepare_data(load(None, [f"data.tokenizer.path={tmp_path / 'empty'}", f"data.cache_dir={tmp_path}",
                                 f"data.sources=[{{path: {tmp_path / 'train.jsonl'}}}]",
                                 f"data.val_sources=[{{path: {tmp_path / 'val.jsonl'}}}]"]))


def test_zero3_loads_each_ranks_partition_from_safetensors_and_falls_back_to_transformers(hub, tmp_path):
    """Two gloo ranks load hub models under ZeRO-3; the gathered weights equal what plain
    transformers loads: a tied GPT-2 and an untied Llama read partitioned from safetensors, the
    Llama again from bf16 safetensors shards, and from a .bin file through transformers."""
    import torch.multiprocessing as mp
    from hub_helpers import partitioned_load_worker
    from transformers import AutoModelForCausalLM

    from ptm_dist.dist import free_port

    bf16 = tmp_path / "llama-bf16-shards"
    AutoModelForCausalLM.from_pretrained(str(hub["llama"]), dtype=torch.bfloat16).save_pretrained(
        str(bf16), max_shard_size="20KB")
    assert (bf16 / "model.safetensors.index.json").exists()
    pickled = tmp_path / "llama-bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((hub["llama"] / "config.json").read_text())
    torch.save(AutoModelForCausalLM.from_pretrained(str(hub["llama"])).state_dict(), pickled / "pytorch_model.bin")
    dirs = [str(hub["gpt2"]), str(hub["llama"]), str(bf16), str(pickled)]
    mp.start_processes(partitioned_load_worker, args=(2, free_port(), dirs, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == dict(zip(dirs, [True, True, True, False]))
    for i, d in enumerate(dirs):
        loaded = torch.load(tmp_path / f"{i}.pt")
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
        assert loaded.keys() == ref.keys(), d
        for k, v in ref.items():
            assert torch.equal(loaded[k], v), (d, k)
