import pytest
import torch

from prefalign.models.logprobs import completion_logprobs, position_ids_from_mask, sequence_logprobs


def _naive(model, ids, mask, comp, temperature=1.0):
    """One sequence at a time, unpadded, full logits: the obvious way."""
    out = torch.zeros(ids.shape, dtype=torch.float32)
    ent = torch.zeros(ids.shape, dtype=torch.float32)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        seq = ids[b][real][None]
        c = comp[b][real]
        logits = model(input_ids=seq).logits[0].float() / temperature  # (L, V)
        logp = torch.log_softmax(logits, -1)
        positions = real.nonzero()[:, 0]
        for j in range(1, seq.shape[1]):
            if c[j]:
                out[b, positions[j]] = logp[j - 1, seq[0, j]]
                p = logp[j - 1].exp()
                ent[b, positions[j]] = -(p * logp[j - 1]).sum()
    return out, ent


def _batch(pad_left: bool):
    # rows: prompt lengths 3, 1, 4 and completion lengths 2, 4, 1 (token values arbitrary)
    rows = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([15, 16, 17, 18], [19])]
    t = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    comp = torch.zeros(3, t, dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        start = t - n if pad_left else 0
        ids[b, start : start + n] = torch.tensor(p + c)
        mask[b, start : start + n] = 1
        comp[b, start + len(p) : start + n] = 1
    return ids, mask, comp


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_completion_logprobs_match_naive_loop(tiny_model):
    tiny_model.eval()
    for pad_left in (False, True):
        ids, mask, comp = _batch(pad_left)
        with torch.no_grad():
            got, ent = completion_logprobs(tiny_model, ids, mask, comp, temperature=0.7, return_entropy=True)
            want, want_ent = _naive(tiny_model, ids, mask, comp, temperature=0.7)
        assert torch.allclose(got, want, atol=1e-5), (pad_left, (got - want).abs().max())
        assert torch.allclose(ent, want_ent, atol=1e-4)
        assert (got[comp == 0] == 0).all()
        assert (got[comp == 1] < 0).all()
        sums = sequence_logprobs(got, comp)
        assert torch.allclose(sums, (want * comp).sum(-1), atol=1e-5)
        means = sequence_logprobs(got, comp, average=True)
        assert torch.allclose(means, sums / torch.tensor([2.0, 4.0, 1.0]), atol=1e-6)


def test_lm_head_runs_only_on_completion_positions(tiny_model):
    ids, mask, comp = _batch(pad_left=True)
    seen = []
    hook = tiny_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append((tuple(args[0].shape), tuple(out.shape)))
    )
    try:
        with torch.no_grad():
            completion_logprobs(tiny_model, ids, mask, comp)
    finally:
        hook.remove()
    n = int(comp.sum())
    assert n == 2 + 4 + 1
    # one call, on the N hidden states that predict a completion token: no prompt or padding logits
    assert seen == [((n, tiny_model.config.hidden_size), (n, tiny_model.config.vocab_size))]


def test_completion_logprobs_gradients_reach_the_model(tiny_model):
    ids, mask, comp = _batch(False)
    logps = completion_logprobs(tiny_model, ids, mask, comp)
    sequence_logprobs(logps, comp).sum().backward()
    assert tiny_model.model.embed_tokens.weight.grad is not None
    assert tiny_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_completion_at_position_zero_is_refused(tiny_model):
    ids, mask, comp = _batch(False)
    comp[0, 0] = 1
    try:
        completion_logprobs(tiny_model, ids, mask, comp)
    except ValueError as e:
        assert "position 0" in str(e)
    else:
        raise AssertionError("expected ValueError")


def _peaked_model(tokenizer):
    # a peaked next-token distribution (init_std 0.5, like a trained LM): near-uniform logits would give
    # entropies ~ln V and gradients so small that a 1e-5 tolerance could not tell chunked from plain apart
    from prefalign.models import tiny_causal_lm

    return tiny_causal_lm(tokenizer, layers=2, hidden=32, seed=5, init_std=0.5)[0]


def test_chunked_logprobs_and_entropy_match_one_chunk(tokenizer):
    model = _peaked_model(tokenizer)
    vocab = model.config.vocab_size
    seen = []  # output shapes of the LM head's calls
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        for pad_left in (False, True):
            ids, mask, comp = _batch(pad_left)
            with torch.no_grad():
                want, want_ent = completion_logprobs(model, ids, mask, comp, temperature=0.7, return_entropy=True)
                for chunk in (1, 3):
                    seen.clear()
                    got, ent = completion_logprobs(
                        model, ids, mask, comp, temperature=0.7, return_entropy=True, chunk_size=chunk
                    )
                    # 7 completion tokens: the head really ran in chunks (3, 3, 1 or seven 1s), not once
                    assert [tuple(shape) for shape in seen] == [(min(chunk, 7 - i), vocab) for i in range(0, 7, chunk)]
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
                    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)
                    assert (got[comp == 0] == 0).all() and (ent[comp == 0] == 0).all()
            assert want_ent[comp == 1].max() < torch.log(torch.tensor(float(vocab))) - 2  # far from uniform
    finally:
        hook.remove()


def _param_grads(model, ids, mask, comp, chunk_size):
    """Gradients of a weighted sum of log-probs and entropies (PPO's policy loss and entropy bonus)."""
    model.zero_grad(set_to_none=True)
    logps, ent = completion_logprobs(
        model, ids, mask, comp, temperature=0.7, return_entropy=True, chunk_size=chunk_size
    )
    # distinct weights per position, so a chunk's outputs landing in the wrong place changes the gradient
    w = torch.arange(1, ids.numel() + 1, dtype=torch.float32).view(ids.shape) / ids.numel()
    ((logps * w).sum() - 0.3 * (ent * w.flip(-1)).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_chunked_gradients_match_one_chunk(tokenizer):
    model = _peaked_model(tokenizer)
    for pad_left in (False, True):
        ids, mask, comp = _batch(pad_left)
        want = _param_grads(model, ids, mask, comp, chunk_size=None)
        got = _param_grads(model, ids, mask, comp, chunk_size=3)
        assert want.keys() == got.keys()
        for name, g in want.items():
            assert g.abs().max() > 1e-4, name  # every parameter gets a gradient big enough to compare
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def _largest_saved_logits(model, ids, mask, comp, chunk_size):
    """Rows of the largest ``(rows, V)`` tensor autograd saves for backward during the forward."""
    vocab = model.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the head saves its (H, V) weight
    rows = [0]

    def pack(t):
        if t.dim() == 2 and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
            rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, ids, mask, comp, return_entropy=True, chunk_size=chunk_size)
    return max(rows)


def test_chunked_forward_keeps_no_full_logits_for_backward(tiny_model):
    ids, mask, comp = _batch(pad_left=True)
    n = int(comp.sum())
    # the probe sees the full logits when they are kept (one plain chunk) ...
    assert _largest_saved_logits(tiny_model, ids, mask, comp, chunk_size=None) == n
    # ... and with chunks checkpointed backward recomputes them: no chunk's logits are kept at all
    assert _largest_saved_logits(tiny_model, ids, mask, comp, chunk_size=3) == 0


def test_chunk_size_below_one_is_refused(tiny_model):
    ids, mask, comp = _batch(False)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        completion_logprobs(tiny_model, ids, mask, comp, chunk_size=0)


def test_chunked_gradients_match_one_chunk_under_bf16_autocast(tokenizer):
    """PPO's update runs under bf16 autocast: every chunk, and its recompute in backward, runs under it too (chunks
    computed in float32 give gradients that differ beyond the bf16 rounding this tolerance allows: checked)."""
    model = _peaked_model(tokenizer)
    ids, mask, comp = _batch(pad_left=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _param_grads(model, ids, mask, comp, chunk_size=None)
        got = _param_grads(model, ids, mask, comp, chunk_size=3)
    for name, g in want.items():
        assert g.abs().max() > 1e-4, name
        # the chunks' head GEMMs take fewer rows than the plain one: bf16 products may round apart, no more
        torch.testing.assert_close(got[name], g, rtol=2e-2, atol=2e-3, msg=name)


def test_a_head_partitioned_by_zero3_runs_the_agreed_number_of_chunks(tokenizer, monkeypatch):
    """DeepSpeed ZeRO-3 marks each parameter it manages with ``ds_id``, and ``ds_persist`` on the small ones it keeps
    whole; a partitioned weight is all-gathered at every call of its module, a collective the processes must all
    join. Marked so (no DeepSpeed needed), the head runs as many chunks as the processes agreed on (here: told the
    others need 2 more than its 3), the extra ones empty, with the log-probs, entropies and gradients of one chunk;
    a persistent weight gathers nothing and asks nobody."""
    import prefalign.models.logprobs as logprobs

    model = _peaked_model(tokenizer)
    ids, mask, comp = _batch(pad_left=True)
    head = model.get_output_embeddings()
    vocab = model.config.vocab_size
    with torch.no_grad():
        want = completion_logprobs(model, ids, mask, comp, temperature=0.7, return_entropy=True)
    want_grads = _param_grads(model, ids, mask, comp, chunk_size=None)
    asked = []
    monkeypatch.setattr(logprobs, "process_max", lambda n, device: asked.append(n) or n + 2)
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    chunks = [(3, vocab), (3, vocab), (1, vocab)]  # 7 completion tokens, chunks of 3
    try:
        for persist, calls in ((False, chunks + [(0, vocab)] * 2), (True, chunks)):
            head.weight.ds_id, head.weight.ds_persist = 0, persist
            seen.clear(), asked.clear()
            with torch.no_grad():
                got = completion_logprobs(model, ids, mask, comp, temperature=0.7, return_entropy=True, chunk_size=3)
            assert seen == calls and asked == ([] if persist else [3]), persist
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            seen.clear()
            grads = _param_grads(model, ids, mask, comp, chunk_size=3)
            # forward, then backward's recompute of every chunk, empty ones too (in reverse order)
            assert seen == calls + calls[::-1], persist
            for name, g in want_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        hook.remove()
        del head.weight.ds_id, head.weight.ds_persist


def _family(name: str):
    import transformers

    common = dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, initializer_range=0.5,
    )  # fmt: skip
    config, cls = {
        "llama": (transformers.LlamaConfig(**common), transformers.LlamaForCausalLM),
        "gemma2-softcapping": (
            transformers.Gemma2Config(**common, final_logit_softcapping=3.0),
            transformers.Gemma2ForCausalLM,
        ),
        "cohere-logit-scale": (transformers.CohereConfig(**common, logit_scale=0.0625), transformers.CohereForCausalLM),
        "granite-logits-scaling": (
            transformers.GraniteConfig(**common, logits_scaling=8.0),
            transformers.GraniteForCausalLM,
        ),
    }[name]
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2-softcapping", "cohere-logit-scale", "granite-logits-scaling"])
def test_log_probs_are_those_of_the_model_s_own_logits(family):
    """Gemma 2's softcapping, Cohere's logit_scale and Granite's logits_scaling transform the LM head's output inside
    the model's forward: the head alone (the chunked path) was off by 7-8 nats per token."""
    model = _family(family)
    ids = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids)
    completion[:, 4:] = 1
    with torch.no_grad():
        got = completion_logprobs(model, ids, mask, completion, temperature=0.7)
        logits = model(input_ids=ids, attention_mask=mask).logits.float() / 0.7
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * completion[:, 1:]
    torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=1e-5)
