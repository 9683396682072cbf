"""PEFT and transformers loaders on orthoft adapters, each checked against LoRA on the same stack.

Tiny Llama from config (saved to a folder so that ``base_model_name_or_path`` resolves offline),
adapters with random (non-identity) weights so that a load that silently drops them shows.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import orthoft
from orthoft.adapters import OrthogonalAdaptationConfig
from orthoft.adapters.card import write_adapter_card

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ATTN = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=ATTN, init_lora_weights=False),
    "oft": lambda: orthoft.OFTConfig(target_modules=ATTN, block_size=16, init_weights=False),
    "boft": lambda: orthoft.BOFTConfig(target_modules=ATTN, block_size=4, init_weights=False),
    "qgoft": lambda: orthoft.QGOFTConfig(target_modules=ATTN, init_weights=False),
    "hra": lambda: orthoft.HRAConfig(target_modules=ATTN, r=4, init_weights=False),
    "psoft": lambda: orthoft.PSOFTConfig(target_modules=ATTN, r=8, init_weights=False),
    "svft": lambda: orthoft.SVFTConfig(target_modules=ATTN, init_weights=False),
    "clover": lambda: orthoft.CLOVERConfig(init_weights=False),
    "oa": lambda: OrthogonalAdaptationConfig(target_modules=ATTN, rank=4, init_weights=False),
}
IDS = torch.arange(16).reshape(2, 8) % 128


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


def _load_base(base_dir, **kwargs):
    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)


@pytest.fixture(scope="module")
def saved(base_dir, tmp_path_factory):
    """method -> (adapter folder, logits of the adapter model that saved it)."""
    out = {}
    for method, make in CONFIGS.items():
        torch.manual_seed(1)
        model = get_peft_model(_load_base(base_dir), make()).eval()
        with torch.no_grad():
            logits = model(IDS).logits
        folder = tmp_path_factory.mktemp(method)
        model.save_pretrained(folder)
        out[method] = (folder, logits)
    return out


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_orthoft_peft_type_has_value_and_stays_a_plain_string_in_json(saved, tmp_path):
    config = orthoft.OFTConfig()
    assert config.peft_type == "ORTHOFT_OFT" and config.peft_type.value == "ORTHOFT_OFT"
    assert type(config.peft_type.value) is str and hash(config.peft_type) == hash("ORTHOFT_OFT")
    written = json.loads((saved["oft"][0] / "adapter_config.json").read_text())
    assert written["peft_type"] == "ORTHOFT_OFT"
    # an adapter_config.json from before (plain string, no "requires" note) still loads as the orthoft class
    del written["requires"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(written))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, orthoft.OFTConfig) and loaded.peft_type.value == "ORTHOFT_OFT"


LOADERS = {
    "PeftModel.from_pretrained": lambda base_dir, folder: PeftModel.from_pretrained(_load_base(base_dir), folder),
    "AutoPeftModelForCausalLM": lambda base_dir, folder: AutoPeftModelForCausalLM.from_pretrained(folder),
    "AutoModelForCausalLM(adapter_dir)": lambda base_dir, folder: AutoModelForCausalLM.from_pretrained(folder),
    "model.load_adapter": lambda base_dir, folder: _load_adapter(_load_base(base_dir), folder),
}


def _load_adapter(model, folder):
    model.load_adapter(str(folder))
    return model


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_loader_restores_the_saved_adapter_as_for_lora(saved, base_dir, method, loader):
    folder, expected = saved[method]
    model = LOADERS[loader](base_dir, folder)
    assert torch.allclose(_logits(model), expected, atol=1e-5), f"{loader} lost the {method} adapter"
    assert not torch.allclose(_logits(_load_base(base_dir)), expected, atol=1e-3)  # the adapter does change it


@pytest.mark.parametrize("method", ["lora", "oft", "qgoft"])
def test_transformers_add_adapter_injects_like_lora(base_dir, method, monkeypatch):
    """transformers 5.x gates ``add_adapter`` behind PEFT >= 0.22, for LoRA too; orthoft acts like LoRA either way."""
    import transformers.integrations.peft as hf_peft

    try:
        _load_base(base_dir).add_adapter(CONFIGS["lora"]())
        gated = False
    except ValueError as error:
        gated = "version of PEFT" in str(error)
        assert gated, error
    if gated:
        monkeypatch.setattr(hf_peft, "check_peft_version", lambda min_version: None)  # the gate, not the feature
    model = _load_base(base_dir)
    model.add_adapter(CONFIGS[method]())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "orthoft_" in n for n in trainable)
    assert not torch.allclose(_logits(model), _logits(_load_base(base_dir)), atol=1e-4)


@pytest.mark.parametrize("method", ["oft", "qgoft", "hra", "psoft"])
def test_second_all_linear_adapter_also_takes_the_layers_the_first_wrapped(base_dir, method):
    config = CONFIGS[method]()
    config.target_modules = "all-linear"
    model = get_peft_model(_load_base(base_dir), config)
    second = CONFIGS[method]()
    second.target_modules = "all-linear"
    model.add_adapter("second", second)  # PEFT's scan alone raised NoMatchingPeftModuleError here

    def holding(name):
        return {n for n, m in model.named_modules() if isinstance(m, orthoft.OrthoLayer) and m.has_adapter(name)}

    assert holding("second") == holding("default")
    assert {n.rsplit(".", 1)[-1] for n in holding("second")} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_mixed_true_is_refused_by_peft_with_its_own_message(base_dir):
    mixed = get_peft_model(_load_base(base_dir), CONFIGS["lora"](), mixed=True)
    assert type(mixed).__name__ == "PeftMixedModel"
    # PEFT 0.21's PeftMixedModel takes a closed list of its own types (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA)
    with pytest.raises(ValueError, match="ORTHOFT_OFT.*not compatible with the `PeftMixedModel`"):
        get_peft_model(_load_base(base_dir), CONFIGS["oft"](), mixed=True)


def _adapter_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "orthoft_" in n or "lora_" in n}


@pytest.mark.parametrize("method", ["lora", "oft", "qgoft", "hra", "psoft", "svft", "clover"])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft_does_for_lora(base_dir, tmp_path, method, autocast):
    expected = torch.float32 if autocast else torch.bfloat16
    model = get_peft_model(
        _load_base(base_dir, dtype=torch.bfloat16), CONFIGS[method](), autocast_adapter_dtype=autocast
    )
    model.add_adapter("other", CONFIGS[method](), autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(model) == {expected}
    model.train()
    model(IDS, labels=IDS).loss.backward()  # the adapter runs and trains in that dtype
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        _load_base(base_dir, dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    )
    loaded.load_adapter(tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(loaded) == {expected}
    assert torch.isfinite(_logits(loaded).float()).all()


def test_model_card_names_orthoft_base_method_and_config(saved, base_dir):
    folder = saved["qgoft"][0]
    card = (folder / "README.md").read_text()
    for needed in ("pip install orthoft", "import orthoft", "ORTHOFT_QGOFT", "QGOFT", str(base_dir), "target_modules"):
        assert needed in card, needed
    assert "More Information Needed" not in card  # PEFT's blank template is replaced
    assert "library_name: peft" in card and "- orthoft" in card  # PEFT's metadata stays, orthoft's tags join
    note = json.loads((folder / "adapter_config.json").read_text())["requires"]
    assert "pip install orthoft" in note and "import orthoft" in note


def test_model_card_keeps_user_text_and_training_block_across_saves(base_dir, tmp_path):
    model = get_peft_model(_load_base(base_dir), CONFIGS["hra"]())
    (tmp_path / "README.md").write_text("# My adapter\n\nTrained on my notes.\n")
    model.save_pretrained(tmp_path)
    write_adapter_card(tmp_path, model.peft_config["default"], {"data": "my notes", "metrics": {"ppl": 12.5}})
    model.save_pretrained(tmp_path)  # a later checkpoint save without training info
    card = (tmp_path / "README.md").read_text()
    assert "Trained on my notes." in card and "my notes" in card and "`ppl`: 12.5" in card
    assert card.count("orthoft:adapter:start") == 1 and card.count("orthoft:training:start") == 1
    model.add_adapter("second", CONFIGS["hra"]())
    model.save_pretrained(tmp_path)
    assert "ORTHOFT_HRA" in (tmp_path / "second" / "README.md").read_text()  # each adapter folder has a card


def test_merge_and_unload_on_4bit_base_warns_and_points_to_export_merged():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    quantized = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    quantized.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    dense = torch.nn.Sequential()
    dense.add_module("q", quantized.to("cpu"))
    dense.add_module("d", torch.nn.Linear(32, 8))
    model = get_peft_model(dense, orthoft.OFTConfig(target_modules=["q", "d"], block_size=8))
    with pytest.warns(UserWarning, match=r"1 adapted layer\(s\) \(q\).*requantiz.*orthoft.export_merged"):
        model.merge_and_unload()
    plain = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), orthoft.OFTConfig(target_modules=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.merge_and_unload()  # a dense base merges without the warning
