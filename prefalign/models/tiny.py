"""A tiny random Llama with the default tokenizer, for tests and smoke runs (seconds, not minutes)."""

from __future__ import annotations


def tiny_causal_lm(
    tokenizer=None,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    init_std: float = 0.02,
    tied: bool = True,
):
    """Return ``(model, tokenizer)``: a randomly initialised ``layers``-layer Llama, vocab of ``tokenizer``.

    The tokenizer defaults to the embedded model's, so token ids and chat templates are real. ``init_std`` is
    the weight init scale: the default 0.02 gives a near-uniform next-token distribution over the 49k vocabulary
    (entropy ~ln 49k); ~0.5 gives a peaked one, like a trained LM, so RL on sampled tokens has signal to learn from.
    ``tied=False``: the LM head gets its own weight, a copy of the input embeddings (the same numbers), and
    ``tie_word_embeddings`` is off, so it stays its own through save and load.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefalign.models.loading import disable_dropout, load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    disable_dropout(model)
    return model, tok
