import json
import shutil

import pytest
import torch
from conftest import run_cli

from prefalign.errors import UserError
from prefalign.eval.evaluate import EvalConfig, evaluate, win_rate


def test_win_rate_counts_wins_ties_and_losses_by_index():
    rate, counts = win_rate(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert counts == {"wins": 2, "ties": 1, "losses": 1}
    assert rate == pytest.approx((2 + 0.5) / 4)
    assert win_rate(torch.ones(3), torch.ones(3))[0] == 0.5
    with pytest.raises(ValueError, match=r"^need two non-empty \(N,\) score tensors, got \(3,\) and \(2,\)$"):
        win_rate(torch.ones(3), torch.ones(2))


def test_policies_must_be_name_equals_path():
    base = dict(prompts=["x"], judge="vader")
    assert EvalConfig(policies=["a=dir/a", "b=x=y"], **base).policy_specs == [("a", "dir/a"), ("b", "x=y")]
    for bad, msg in [
        ("nosep", "expected NAME=PATH"),
        ("=path", "expected NAME=PATH"),
        ("a=", "expected NAME=PATH"),
        ("reference=x", "taken by --reference"),
    ]:
        with pytest.raises(ValueError, match=msg):
            EvalConfig(policies=[bad], **base)
    with pytest.raises(ValueError, match="given twice"):
        EvalConfig(policies=["a=x", "a=y"], **base)
    with pytest.raises(ValueError, match="--policies is required"):
        EvalConfig(**base)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model with non-zero B (peft's default init would change nothing)."""
    from peft import LoraConfig, get_peft_model

    from prefalign.models import load_causal_lm

    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_causal_lm(str(tiny_model_dir)),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path, peft_model.eval()


def test_load_policy_merges_a_lora_adapter(adapter_dir, tiny_model_dir):
    from prefalign.models import load_causal_lm, load_policy

    path, peft_model = adapter_dir
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = load_policy(str(path))
        got = merged(input_ids=ids).logits
        base = load_causal_lm(str(tiny_model_dir))(input_ids=ids).logits
    assert not hasattr(merged, "peft_config") and not merged.training
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter really changes the model
    # a full model directory loads as itself
    with torch.no_grad():
        torch.testing.assert_close(load_policy(str(tiny_model_dir))(input_ids=ids).logits, base)


def test_load_policy_refuses_an_adapter_whose_base_is_missing(adapter_dir, tmp_path):
    from prefalign.models import load_policy

    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir[0], moved)
    cfg_path = moved / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=r"needs its base model .*gone.*base_model_name_or_path"):
        load_policy(str(moved))
    cfg_path.write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    with pytest.raises(UserError, match="SEQ_CLS adapter"):
        load_policy(str(moved))


def test_policy_base_maps_a_stale_embedded_cache_path_to_the_embedded_name(tmp_path):
    from prefalign.models import policy_base

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/nowhere/.cache/prefalign/smollm2-135m", "task_type": "CAUSAL_LM"})
    )
    assert policy_base(str(tmp_path)) == ("smollm2-135m", tmp_path)
    assert policy_base("org/model") == ("org/model", None)


def _judges(tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text(
        "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n\n"
        "def vowels(prompts, completions):\n"
        "    return [float(sum(ch in 'aeiou' for ch in c)) for c in completions]\n"
    )
    return f"{judge}:length", f"{judge}:vowels"


def test_eval_self_is_zero_kl_and_all_ties_other_policies_are_not(tmp_path, tiny_model_dir, tokenizer, adapter_dir):
    from prefalign.models import tiny_causal_lm

    other = tmp_path / "other"
    model, _ = tiny_causal_lm(tokenizer, seed=1)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    gold, proxy = _judges(tmp_path)
    out = tmp_path / "eval"
    prompts = ["the movie was", "this film", "my cat"]
    result = evaluate(
        EvalConfig(
            policies=[f"same={tiny_model_dir}", f"other={other}", f"lora={adapter_dir[0]}"],
            reference=str(tiny_model_dir),
            prompts=prompts,
            chat=False,
            judge=gold,
            proxy=proxy,
            num_samples=2,
            max_new_tokens=6,
            batch_size=4,
            seed=3,
            output=str(out),
        )
    )
    m = result["policies"]
    assert list(m) == ["reference", "same", "other", "lora"]
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(result))
    # the reference itself: identical seed and weights -> identical samples and log-probs
    assert abs(m["same"]["kl_mean"]) < 1e-5 and m["same"]["kl_std"] < 1e-5
    assert m["same"]["win_rate"] == 0.5 and m["same"]["ties"] == 6
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    by_policy = {name: [r for r in rows if r["policy"] == name] for name in m}
    assert [r["completion"] for r in by_policy["same"]] == [r["completion"] for r in by_policy["reference"]]
    assert [(r["prompt"], r["sample"]) for r in by_policy["other"]] == [(p, k) for p in prompts for k in (0, 1)]
    # different weights: a non-zero KL, and the metrics agree with the completions written
    for name in ("other", "lora"):
        assert abs(m[name]["kl_mean"]) > 1e-3
        mine = by_policy[name]
        assert m[name]["gold_mean"] == pytest.approx(sum(r["gold"] for r in mine) / len(mine))
        assert m[name]["proxy_mean"] == pytest.approx(sum(r["proxy"] for r in mine) / len(mine))
        assert m[name]["kl_mean"] == pytest.approx(sum(r["kl"] for r in mine) / len(mine))
        assert all(r["gold"] == len(r["completion"]) for r in mine)
        wins = sum(a["gold"] > b["gold"] for a, b in zip(mine, by_policy["reference"]))
        ties = sum(a["gold"] == b["gold"] for a, b in zip(mine, by_policy["reference"]))
        assert m[name]["win_rate"] == pytest.approx((wins + 0.5 * ties) / 6)
        assert m[name]["length_mean"] == pytest.approx(sum(r["num_tokens"] for r in mine) / 6)
    assert m["reference"]["kl_mean"] == 0.0 and m["reference"]["win_rate"] == 0.5
    ref_proxy = [r["proxy"] for r in by_policy["reference"]]
    assert len(ref_proxy) == 6 and m["reference"]["proxy_mean"] == pytest.approx(sum(ref_proxy) / 6)
    assert all(r["proxy"] == sum(ch in "aeiou" for ch in r["completion"]) for r in rows)  # the proxy judge's own
    table = (out / "eval.md").read_text()
    assert table.count("\n") == 2 + 4 and "| other |" in table


def test_eval_cli_smoke(tmp_path, tiny_model_dir):
    gold, _ = _judges(tmp_path)
    out = tmp_path / "eval"
    r = run_cli(
        "eval",
        "--policies",
        f"me={tiny_model_dir}",
        "--reference",
        tiny_model_dir,
        "--prompts",
        "hello",
        "a film",
        "--judge",
        gold,
        "--max-new-tokens",
        "4",
        "--output",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["policies"]["me"]["n"] == 2 and result["policies"]["me"]["win_rate"] == 0.5
    assert result["policies"]["me"]["proxy_mean"] is None  # no --proxy
    assert len((out / "completions.jsonl").read_text().splitlines()) == 4
    assert "| me |" in r.stdout and (out / "eval.md").is_file() and (out / "config.yaml").is_file()


def test_eval_cli_refuses_a_policy_without_a_name_with_one_line(tmp_path, tiny_model_dir):
    r = run_cli(
        "eval", "--policies", str(tiny_model_dir), "--prompts", "x", "--judge", "vader", "--output", tmp_path / "x"
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --policies {str(tiny_model_dir)!r}: expected NAME=PATH, e.g. dpo=runs/dpo/final"
    assert not (tmp_path / "x").exists()


def test_eval_refuses_a_missing_policy_before_writing_anything(tmp_path, tiny_model_dir):
    gold, _ = _judges(tmp_path)
    cfg = EvalConfig(
        policies=[f"gone={tmp_path / 'gone'}"],
        reference=str(tiny_model_dir),
        prompts=["x"],
        judge=gold,
        output=str(tmp_path / "out"),
    )
    with pytest.raises(UserError, match=r"--policies gone=.*unknown model"):
        evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_eval_samples_are_keyed_batch_size_free_and_bf16_sampling_keeps_float32_kl(tmp_path, tiny_model_dir):
    """Keyed sampling: the same completions at batch 1 and 4. --dtype bfloat16 samples from a bf16 copy but
    scores log-probs with float32 weights: a policy equal to the reference still has KL exactly 0."""
    gold, _ = _judges(tmp_path)
    prompts = ["the movie was", "this film", "my cat"]
    runs = {}
    for name, bs, dtype in (("b4", 4, "float32"), ("b1", 1, "float32"), ("bf16", 4, "bfloat16")):
        evaluate(
            EvalConfig(
                policies=[f"same={tiny_model_dir}"],
                reference=str(tiny_model_dir),
                prompts=prompts,
                chat=False,
                judge=gold,
                num_samples=2,
                max_new_tokens=6,
                batch_size=bs,
                seed=3,
                dtype=dtype,
                output=str(tmp_path / name),
            )
        )
        rows = [json.loads(x) for x in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
        runs[name] = rows
    assert [r["completion"] for r in runs["b1"]] == [r["completion"] for r in runs["b4"]]
    assert all(r["kl"] == 0.0 for r in runs["bf16"])
    assert len({r["completion"] for r in runs["bf16"]}) > 1


def test_sampling_copy_is_bf16_keeps_float_buffers_and_refreshes(tiny_model):
    from prefalign.rollout import refresh_sampling_copy, sampling_copy

    assert sampling_copy(tiny_model, torch.float32) is tiny_model  # already float32: no copy
    copy = sampling_copy(tiny_model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # the original is untouched
    buffers = dict(copy.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    for name, b0 in tiny_model.named_buffers():  # RoPE's inv_freq stays float32, as in a model loaded in bf16
        assert buffers[name].dtype == b0.dtype and torch.equal(buffers[name], b0), name
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(1.0)
    assert not torch.equal(copy.model.norm.weight, tiny_model.model.norm.weight.to(torch.bfloat16))
    refresh_sampling_copy(copy, tiny_model)
    for (name, p), (_, p0) in zip(copy.named_parameters(), tiny_model.named_parameters()):
        assert torch.equal(p, p0.detach().to(torch.bfloat16)), name


def test_sampling_copy_never_duplicates_the_float32_weights(tokenizer, monkeypatch):
    """The copy is built from parameters cast one by one, never from a deepcopy of the float32 ones (which held a
    second float32 model at its peak); ties, requires_grad and the values survive, and no storage is shared."""
    from prefalign.models import tiny_causal_lm
    from prefalign.rollout import sampling_copy

    model, _ = tiny_causal_lm(tokenizer, tied=True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)  # one already in bf16

    def refuse(self, memo):
        raise AssertionError(f"deepcopy of a {self.dtype} parameter of shape {tuple(self.shape)}")

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    copy = sampling_copy(model, torch.bfloat16)
    monkeypatch.undo()
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    assert (
        not copy.model.layers[0].mlp.up_proj.weight.requires_grad
        and copy.model.layers[1].mlp.up_proj.weight.requires_grad
    )
    originals = dict(model.named_parameters())
    for name, p in copy.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, originals[name].detach().to(torch.bfloat16)), name
        assert p.data_ptr() != originals[name].data_ptr(), name  # refresh_sampling_copy writes into the copy only


def test_a_released_sampling_copy_holds_nothing_until_the_refresh_writes_it_whole(tokenizer):
    """A trainer frees its copy's weights for the update; the refresh allocates them again in the copy's dtype,
    with the model's current values, ties and requires_grad kept, and decodes as a copy never released."""
    from prefalign.models import tiny_causal_lm
    from prefalign.rollout import refresh_sampling_copy, release_sampling_copy, sampling_copy

    model, _ = tiny_causal_lm(tokenizer, tied=True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    copy, kept = sampling_copy(model, torch.bfloat16), sampling_copy(model, torch.bfloat16)
    release_sampling_copy(copy, model)
    assert sum(p.numel() for p in copy.parameters()) == 0 < sum(p.numel() for p in kept.parameters())
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step
            p.add_(0.01)
    refresh_sampling_copy(copy, model)
    refresh_sampling_copy(kept, model)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    assert not copy.model.layers[0].mlp.up_proj.weight.requires_grad and copy.model.norm.weight.requires_grad
    originals, same = dict(model.named_parameters()), dict(kept.named_parameters())
    for name, p in copy.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, originals[name].detach().to(torch.bfloat16)), name
        assert torch.equal(p, same[name]) and p.data_ptr() != originals[name].data_ptr(), name
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, kept(ids).logits)
    release_sampling_copy(model, model)  # the model itself samples: nothing to free
    assert all(p.numel() > 0 for p in model.parameters())


def test_bf16_sampling_copy_does_not_drift_from_float32_with_position(tokenizer):
    """A copy whose inv_freq was rounded to bf16 (what `.to(bfloat16)` does) turns RoPE's angles by up to 0.4% of
    the position. Measured here, mean |logp - float32 logp| at positions 1-99 and 700-899: the copy 0.067 and 0.086,
    the rounded one 0.072 and 0.434 (5x the copy's late)."""
    from prefalign.models import tiny_causal_lm
    from prefalign.models.logprobs import completion_logprobs
    from prefalign.rollout import sampling_copy

    model, _ = tiny_causal_lm(tokenizer, layers=2, hidden=64, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper attention, so the rotary angles matter
    ids = torch.randint(0, 1000, (2, 900), generator=torch.Generator().manual_seed(0))
    mask, completion = torch.ones_like(ids), torch.ones_like(ids)
    completion[:, 0] = 0
    copy = sampling_copy(model, torch.bfloat16)
    rounded = sampling_copy(model, torch.bfloat16)
    for name, buf in rounded.named_buffers():
        if "inv_freq" in name:
            buf.copy_(buf.to(torch.bfloat16).float())
    with torch.no_grad():
        ref = completion_logprobs(model, ids, mask, completion)
        errors = [(completion_logprobs(m, ids, mask, completion) - ref).abs() for m in (copy, rounded)]
    early, late = ([e[:, lo:hi].mean().item() for e in errors] for lo, hi in ((1, 100), (700, 900)))
    assert late[0] < late[1] / 3 and early[1] < late[1] / 3, (early, late)


def test_a_policy_with_nan_weights_is_one_line_and_nothing_written(tmp_path, tiny_model_dir, tokenizer, capsys):
    """Its log-probs are NaN: refused, not written into eval.json as a bare NaN (which is not JSON)."""
    import torch

    from prefalign.cli import main
    from prefalign.models import tiny_causal_lm

    broken = tmp_path / "broken"
    model, _ = tiny_causal_lm(tokenizer, seed=1)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    gold, _ = _judges(tmp_path)
    argv = ["eval", "--policies", f"nan={broken}", "--reference", str(tiny_model_dir), "--prompts", "x", "y"]
    assert main([*argv, "--judge", gold, "--max-new-tokens", "3", "--output", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"error: --policies nan={broken}: kl_mean, kl_std not finite")
    assert not (tmp_path / "out").exists()
