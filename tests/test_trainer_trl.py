"""qGOFT/HRA penalties under transformers.Trainer, TRL's SFTTrainer and plain loops, and build_optimizer's checks.

Tiny Llama from config (MiniLM's tokenizer for TRL: it ships in a package), a few steps each.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import orthoft
from orthoft.adapters.regularization import batch_share
from orthoft.optim import build_optimizer

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _qgoft_model(reg_lambda: float = 1.0, vocab_size: int = 128, pad_token_id: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **TINY)
    adapter = orthoft.QGOFTConfig(target_modules=["q_proj", "v_proj"], reg_lambda=reg_lambda, init_weights=False)
    return get_peft_model(LlamaForCausalLM(config), adapter)


def _penalty(model: nn.Module) -> float:
    with torch.no_grad():
        return orthoft.regularization_loss(model).item()


def _raw_penalty(model: nn.Module) -> float:
    """The quasi-orthogonality penalty with weight 1, whatever reg_lambda the run used."""
    layers = [m for m in model.modules() if isinstance(m, orthoft.OrthoLayer)]
    saved = [layer.adapter_configs["default"].reg_lambda for layer in layers]
    for layer in layers:
        layer.adapter_configs["default"].reg_lambda = 1.0
    value = _penalty(model)
    for layer, reg in zip(layers, saved):
        layer.adapter_configs["default"].reg_lambda = reg
    return value


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.arange(24).reshape(2, 12) % 128


def test_training_forward_adds_the_penalty_and_eval_or_no_grad_does_not():
    model = _qgoft_model()
    penalty = _penalty(model)
    assert penalty > 0.1  # random blocks: far from orthogonal
    with torch.no_grad():
        plain = model.eval()(IDS, labels=IDS).loss.item()
        assert model.train()(IDS, labels=IDS).loss.item() == pytest.approx(plain)  # no gradient: nothing added
    trained = model.train()(IDS, labels=IDS).loss
    assert trained.item() == pytest.approx(plain + penalty, rel=1e-6)
    trained.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_penalty_counts_once_per_step_when_the_loss_is_scaled_by_num_items_in_batch():
    """Trainer's gradient accumulation: micro-batch losses are sums over num_items_in_batch, not divided again."""
    model = _qgoft_model()
    labels_a, labels_b = IDS.clone(), IDS.clone()
    labels_a[:, :9] = -100  # 2 x 3 counted labels (positions 9-11: a causal LM predicts them from 8-10)
    labels_b[:, :2] = -100  # 2 x 10
    items = sum(int(lab[..., 1:].ne(-100).sum()) for lab in (labels_a, labels_b))
    assert items == 26
    share = batch_share(model.base_model.model, {"labels": labels_a, "num_items_in_batch": items})
    assert float(share) == pytest.approx(6 / 26)
    for labels in (labels_a, labels_b):
        model(IDS, labels=labels, num_items_in_batch=torch.tensor(items)).loss.backward()
    accumulated = _adapter_grads(model)
    model.zero_grad()
    # reference (eval mode: the model adds nothing): the mean over every counted label, plus the penalty once
    logits = torch.cat([model.eval()(IDS).logits] * 2)[:, :-1]
    targets = torch.cat([labels_a, labels_b])[:, 1:]
    reference = nn.functional.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1), reduction="sum") / items
    (reference + orthoft.regularization_loss(model)).backward()
    for name, grad in _adapter_grads(model).items():
        assert torch.allclose(accumulated[name], grad, atol=1e-6, rtol=1e-4), name


def test_loss_computed_outside_the_model_gets_the_penalty_gradient_before_the_step():
    """TRL's fused head, compute_loss_func, plain loops on logits: the penalty is added once, before the step."""
    model = _qgoft_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(IDS).logits  # no labels: the model returns no loss
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1)).backward()
    optimizer.step()
    moved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # reference from the same start: task gradient + penalty gradient, by hand
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in start:
                param.copy_(start[name])
    model.zero_grad()
    logits = model.eval()(IDS).logits  # eval mode: the model adds nothing itself
    task = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    (task + orthoft.regularization_loss(model)).backward()
    for name, param in model.named_parameters():
        if name in start:
            assert torch.allclose(moved[name], start[name] - 0.1 * param.grad, atol=1e-6), name
    optimizer.zero_grad()
    optimizer.step()  # no forward since: nothing is added again
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_adding_regularization_loss_again_warns_about_double_counting():
    model = _qgoft_model()
    loss = model(IDS, labels=IDS).loss
    with pytest.warns(UserWarning, match="counts it twice"):
        loss = loss + orthoft.regularization_loss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            orthoft.regularization_loss(model)  # for logging: fine


def _causal_dataset(tokenizer=None):
    from datasets import Dataset

    texts = [f"line {i}: to be, or not to be, that is the question {i}." for i in range(16)]
    if tokenizer is not None:
        return Dataset.from_dict({"text": texts})
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (16, 16)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 16, "labels": ids})


COMMON_ARGS = dict(
    max_steps=4,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=0.02,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    dataloader_num_workers=0,
    disable_tqdm=True,
    logging_steps=100,
)


@pytest.mark.parametrize("reg_lambda", [0.0, 1.0])
def test_trainer_applies_the_qgoft_penalty_with_no_user_code(tmp_path, reg_lambda):
    from transformers import Trainer, TrainingArguments

    model = _qgoft_model(reg_lambda)
    start = _raw_penalty(model)
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON_ARGS)
    Trainer(model=model, args=args, train_dataset=_causal_dataset()).train()
    end = _raw_penalty(model)
    if reg_lambda:
        assert end < 0.5 * start, (start, end)  # the penalty was minimized
    else:
        assert end > 0.8 * start, (start, end)  # nothing pulls the blocks toward orthogonal


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from orthoft.defaults import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.eos_token = tokenizer.sep_token  # TRL appends EOS; MiniLM's WordPiece names none
    return tokenizer


@pytest.mark.parametrize("reg_lambda", [0.0, 1.0])
def test_sft_trainer_applies_the_penalty_and_trains_with_an_orthoft_optimizer(tmp_path, reg_lambda):
    trl = pytest.importorskip("trl")
    tokenizer = _minilm_tokenizer()
    model = _qgoft_model(reg_lambda, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    start_penalty = _raw_penalty(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, "muon", lr=0.02, adamw_lr=0.02)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=24, **COMMON_ARGS)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=_causal_dataset(tokenizer),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert trainer.model is model  # TRL kept the PEFT model, so the optimizer holds its tensors
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    end_penalty = _raw_penalty(model)
    assert math.isfinite(end_penalty)
    if reg_lambda:
        assert end_penalty < 0.5 * start_penalty, (start_penalty, end_penalty)
    else:
        assert end_penalty > 0.8 * start_penalty, (start_penalty, end_penalty)


def test_build_optimizer_refuses_a_model_without_adapters_and_names_the_wrapping_order():
    torch.manual_seed(0)
    bare = LlamaForCausalLM(LlamaConfig(vocab_size=128, **TINY))
    with pytest.raises(ValueError, match=r"holds no adapter.*before get_peft_model.*SFTTrainer.*wrapped model"):
        build_optimizer(bare, "muon", lr=0.02)
    with pytest.raises(ValueError, match="holds no adapter"):
        build_optimizer(bare, "adamw", lr=0.02)
    with pytest.raises(ValueError, match="no trainable parameters.*is_trainable=True"):
        build_optimizer(
            get_peft_model(bare, orthoft.OFTConfig(target_modules=["q_proj"], inference_mode=True)), "muon", lr=0.02
        )


def test_an_optimizer_built_before_wrapping_warns_at_its_first_empty_step():
    """What SFTTrainer(model, peft_config=..., optimizers=(opt, None)) does to an optimizer built on the bare model."""
    torch.manual_seed(0)
    bare = LlamaForCausalLM(LlamaConfig(vocab_size=128, **TINY))
    optimizer = build_optimizer(bare, "muon", lr=0.02, muon_for_plain_matrices=True)  # full fine-tuning on purpose
    model = get_peft_model(bare, orthoft.OFTConfig(target_modules=["q_proj"], block_size=16))
    model(IDS, labels=IDS).loss.backward()
    with pytest.warns(RuntimeWarning, match=r"none of its \d+ tensors has a gradient.*frozen now"):
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # once only


def test_sft_example_trains_and_writes_a_card_with_the_run(tmp_path):
    """examples/sft_trl.py end to end on a tiny model folder (the default is the embedded SmolLM2)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("trl")
    tokenizer = _minilm_tokenizer()
    model_dir = tmp_path / "tiny"
    _qgoft_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).get_base_model().save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    path = Path(__file__).resolve().parent.parent / "examples" / "sft_trl.py"
    spec = importlib.util.spec_from_file_location("sft_trl_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    example.main(
        ["--model", str(model_dir), "--max-steps", "2", "--max-length", "24", "--max-examples", "8",
         "--lines-per-example", "2", "--adapter-option", "target_modules=[q_proj,v_proj]", "--out", str(out)]
    )  # fmt: skip
    card = (out / "adapter" / "README.md").read_text()
    assert "ORTHOFT_QGOFT" in card and "import orthoft" in card
    assert "### Data" in card and "hamlet (8 examples" in card and "`train_loss`" in card
