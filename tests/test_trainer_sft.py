import json
import math

import pytest
import torch
from conftest import learnable_pairs, run_cli, write_jsonl
from transformers import AutoModelForCausalLM

from prefalign.trainers.sft import SFTConfig, SFTTrainer


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_lowers_completion_nll_and_changes_every_parameter(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Q{i}: say yes.", "completion": " yes yes yes."} for i in range(24)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    trainer = SFTTrainer(
        SFTConfig(
            data=str(data),
            model=str(tiny_model_dir),
            output=str(tmp_path / "run"),
            batch_size=4,
            max_steps=10,
            learning_rate=1e-2,
            precision="fp32",
            lr_scheduler="constant",
            eval_split=0.25,
        )
    )
    final = trainer.train()
    metrics = _metrics(tmp_path / "run")
    start = metrics[0]
    assert start["step"] == 0
    # a random model over a 49k vocabulary: nll near ln(49152) ~ 10.8 per token
    assert abs(start["eval/nll"] - math.log(49152)) < 1.0
    assert final["eval/nll"] < start["eval/nll"] - 2.0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    for name, p in before.named_parameters():
        assert not torch.equal(p, after[name].detach()), name


def test_sft_batch_masks_prompt_tokens(tmp_path, tiny_model_dir):
    """Loss only on completion tokens: changing a prompt token's target does not move the loss input set."""
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "A B C", "completion": " D"}] * 4)
    trainer = SFTTrainer(
        SFTConfig(
            data=str(data),
            model=str(tiny_model_dir),
            output=str(tmp_path / "r"),
            batch_size=2,
            max_steps=1,
            precision="fp32",
        )
    )
    trainer.train()
    batch = trainer.collate(trainer.train_data[:2])
    # completion = " D" + EOS: exactly two completion tokens per row, the last one EOS
    assert batch["completion_mask"].sum(1).tolist() == [2, 2]
    last = batch["completion_mask"][0].nonzero()[-1].item()
    assert batch["input_ids"][0, last].item() == trainer.tokenizer.eos_token_id


def _setup_only(tmp_path, model_dir, data, **kw) -> SFTTrainer:
    """A trainer with its model and data loaded, nothing trained or written."""
    trainer = SFTTrainer(SFTConfig(data=str(data), model=str(model_dir), output=str(tmp_path / "r"), **kw))
    trainer.setup()
    return trainer


def test_sft_loss_is_the_mean_nll_of_the_completion_tokens_only(tmp_path, tiny_model_dir):
    """The exact value, from the model's full logits: prompt positions and padding add nothing."""
    rows = [{"prompt": "A B C D E F", "completion": " yes"}, {"prompt": "Q:", "completion": " no no no no"}]
    trainer = _setup_only(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "sft.jsonl", rows))
    batch = trainer.collate(trainer.train_data)
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    with torch.no_grad():
        loss, stats = trainer.compute_loss(batch)
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits  # (N, T, V)
    # token t is scored by the logits at t - 1
    nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, T - 1)
    want = nll[comp[:, 1:]].mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert stats["nll"].item() == loss.item()
    every_real_token = nll[attn[:, 1:].bool()].mean()
    assert abs(every_real_token.item() - want.item()) > 1e-3  # so the check above can tell them apart


def test_sft_on_preference_data_trains_on_the_chosen_side(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Review {i}:", "chosen": f" good {i}.", "rejected": f" bad {i}."} for i in range(4)]
    trainer = _setup_only(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "pairs.jsonl", rows))
    batch = trainer.collate(trainer.train_data)
    tok = trainer.tokenizer
    for i, row in enumerate(rows):
        ids, comp = batch["input_ids"][i], batch["completion_mask"][i].bool()
        prompt = ids[batch["attention_mask"][i].bool() & ~comp]
        assert tok.decode(prompt, skip_special_tokens=True) == row["prompt"]
        assert tok.decode(ids[comp]) == row["chosen"] + tok.eos_token


def test_cli_sft_smoke_on_preference_data(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
    out = tmp_path / "cli"
    r = run_cli(
        "sft",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--output",
        out,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        "--merge-lora",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged")
    assert merged.config.num_hidden_layers == 2
    assert len(_metrics(out)) == 2


def test_forward_chunks_keep_the_token_level_mean(tmp_path, tiny_model_dir):
    """Completions of 1 to 8 words: chunks are weighted by their completion tokens, so the update is the same as
    one forward over the micro-batch (weighting chunks by examples would not be)."""
    rows = [{"prompt": f"Q{i}:", "completion": " yes" * (1 + i % 8)} for i in range(16)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    params = {}
    for fb in (8, 1, 3):
        trainer = SFTTrainer(
            SFTConfig(
                data=str(data),
                model=str(tiny_model_dir),
                output=str(tmp_path / f"fb{fb}"),
                batch_size=8,
                max_steps=2,
                learning_rate=1e-3,
                precision="fp32",
                lr_scheduler="constant",
                forward_batch_size=fb,
            )
        )
        trainer.train()
        params[fb] = (
            _metrics(tmp_path / f"fb{fb}"),
            dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters()),
        )
    for fb in (1, 3):
        for a, b in zip(params[8][0], params[fb][0]):
            assert b["nll"] == pytest.approx(a["nll"], abs=1e-5)
        for name, p in params[8][1].items():
            # float-order noise through Adam ~1e-6; a wrong chunk weighting moves weights by ~lr = 1e-3
            torch.testing.assert_close(params[fb][1][name], p, atol=2e-5, rtol=0, msg=name)
