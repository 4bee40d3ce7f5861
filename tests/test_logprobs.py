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
