"""``orthoft.export_merged`` and ``orthoft export``: exact dense merges of 4-bit models, loadable without orthoft.

Each registered method is trained a few steps on a tiny Llama loaded in nf4 (double quantization)
on CPU, exported, and reloaded by plain transformers in a subprocess where ``import orthoft``
fails; its logits must match the adapter model's within 1e-3 relative. SmolLM2-135M (4-bit) does
the same with OFT. Also: requantized exports report their error honestly, combined adapters merge
in the stated order, the CLI, atomic writes (injected failure and SIGKILL) and NaN refusal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import orthoft
from orthoft import export as export_module
from orthoft.adapters import REGISTERED
from orthoft.export import export_merged
from orthoft.io import files
from tests.test_quantized import METHODS, exact_logits, load_quantized, method_config, save_tiny_llama, train_steps

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # relative max logit difference allowed for a dense (dequantized) export

# Runs in `python -I` (no cwd, no PYTHON* variables) with orthoft made unimportable, proves the block,
# then loads every exported folder with plain transformers and writes its logits on the probe ids.
PLAIN_TRANSFORMERS_LOADER = textwrap.dedent(
    """
    import sys

    class BlockOrthoft:
        def find_spec(self, name, path=None, target=None):
            if name == "orthoft" or name.startswith("orthoft."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockOrthoft())
    try:
        import orthoft  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the orthoft import block did not work")

    import torch
    from transformers import AutoModelForCausalLM

    input_ids = torch.load(sys.argv[1])
    logits = {}
    for folder in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False  # the standard 4-bit kernel, as the export measured
        model.eval()
        with torch.no_grad():
            logits[folder] = model(input_ids=input_ids).logits.float()
    assert not any(name == "orthoft" or name.startswith("orthoft.") for name in sys.modules)
    torch.save(logits, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def reload_without_orthoft(folders: list[Path], input_ids: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    ids_file, out_file = tmp_path / "probe_ids.pt", tmp_path / "reloaded_logits.pt"
    torch.save(input_ids, ids_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_TRANSFORMERS_LOADER, str(ids_file), str(out_file), *map(str, folders)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file)


def relative_max(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).abs().max() / reference.abs().max())


def probe_ids(vocab_size: int = 128, shape: tuple[int, int] = (2, 32)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))


def trained_tiny_model(tiny_llama_dir, peft_type: str = "ORTHOFT_OFT", seed: int = 0, **config):
    torch.manual_seed(seed)
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4-double"), method_config(peft_type, **config))
    train_steps(model, torch.randint(0, 128, (2, 16)))
    return model


# ---- every method on a 4-bit tiny Llama -----------------------------------------------------------

_EXPORTS: dict[str, tuple[Path, torch.Tensor, object]] = {}


def tiny_export(peft_type: str, tiny_llama_dir, root: Path) -> tuple[Path, torch.Tensor, object]:
    """Train and export ``peft_type`` once per session; (folder, adapter logits on the probe, report)."""
    if peft_type not in _EXPORTS:
        model = trained_tiny_model(tiny_llama_dir, peft_type)
        base_logits = exact_logits(load_quantized(tiny_llama_dir, "nf4-double", prepare=False), probe_ids())
        adapter_logits = exact_logits(model, probe_ids())
        assert (adapter_logits - base_logits).abs().max() > 1e-3, f"{peft_type}: training left the model unchanged"
        out = root / peft_type.lower()
        report = export_merged(model, out, dtype="fp32")
        _EXPORTS[peft_type] = (out, adapter_logits, report)
    return _EXPORTS[peft_type]


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
    _EXPORTS.clear()
    return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("peft_type", METHODS)
def test_dense_export_of_4bit_model_is_exact(peft_type, tiny_llama_dir, export_root):
    out, adapter_logits, report = tiny_export(peft_type, tiny_llama_dir, export_root)
    assert report.merge_error["relative_max"] < TOLERANCE, report.merge_error
    assert report.export_error["relative_max"] < TOLERANCE, report.export_error
    assert report.requantization_error is None
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors"))
    card = (out / "README.md").read_text()
    method = report.methods["default"]
    assert method in card and "orthoft version" in card and f"{report.merge_error['max_abs']:.3e}" in card
    info = json.loads((out / "orthoft_export.json").read_text())
    assert info["adapter_configs"]["default"]["peft_type"] == peft_type
    assert not list(export_root.glob(".*partial*")), "staging folder left behind"


def test_exports_load_with_plain_transformers_without_orthoft(tiny_llama_dir, export_root, tmp_path):
    exports = {peft_type: tiny_export(peft_type, tiny_llama_dir, export_root) for peft_type in METHODS}
    reloaded = reload_without_orthoft([out for out, _, _ in exports.values()], probe_ids(), tmp_path)
    errors = {t: relative_max(reloaded[str(out)], logits) for t, (out, logits, _) in exports.items()}
    print("relative max logit difference, dense fp32 export of nf4 tiny Llama:", errors)
    assert all(error < TOLERANCE for error in errors.values()), errors


def test_requantized_export_keeps_4bit_and_reports_its_error(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir, "ORTHOFT_OFT")
    adapter_logits = exact_logits(model, probe_ids())
    out = tmp_path / "requantized"
    report = export_merged(model, out, quantization="base")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    # the merge itself is exact; requantizing adds a visible, reported error
    assert report.merge_error["relative_max"] < TOLERANCE
    assert report.requantization_error["max_abs"] > 10 * report.merge_error["max_abs"]
    assert "added by requantization" in (out / "README.md").read_text()
    reloaded = reload_without_orthoft([out], probe_ids(), tmp_path)[str(out)]
    # what a user loads is what the report measured
    measured = float((reloaded - adapter_logits).abs().max())
    assert measured == pytest.approx(report.export_error["max_abs"], rel=1e-3, abs=1e-5)
    print("requantized nf4 export, tiny Llama OFT:", report.export_error, report.requantization_error)


def test_int8_export_differs_only_by_the_int8_kernel(tiny_llama_dir, tmp_path):
    """Linear8bitLt quantizes activations in its forward; the export's gap is that kernel's, not the merge's."""
    torch.manual_seed(0)
    untrained = get_peft_model(load_quantized(tiny_llama_dir, "int8"), method_config("ORTHOFT_OFT"))
    kernel_noise = export_merged(untrained, tmp_path / "identity", dtype="fp32").merge_error["max_abs"]
    torch.manual_seed(0)
    model = get_peft_model(load_quantized(tiny_llama_dir, "int8"), method_config("ORTHOFT_OFT"))
    train_steps(model, torch.randint(0, 128, (2, 16)))
    report = export_merged(model, tmp_path / "trained", dtype="fp32")
    assert 0 < kernel_noise and report.merge_error["max_abs"] < 3 * kernel_noise, (kernel_noise, report.merge_error)
    requantized = export_merged(model, tmp_path / "int8", quantization="base")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert "int8" in (tmp_path / "int8" / "README.md").read_text()
    assert requantized.requantization_error is not None


# ---- combining adapters -----------------------------------------------------------------------------


def test_combined_adapters_merge_in_the_stated_order(tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        load_quantized(tiny_llama_dir, "nf4-double"),
        orthoft.OFTConfig(
            target_modules=["q_proj", "v_proj"], block_size=16, init_weights=False, use_exact_cayley=True
        ),
        adapter_name="first",
    )
    model.add_adapter(
        "second",
        orthoft.OFTConfig(
            target_modules=["q_proj", "o_proj"], block_size=32, init_weights=False, use_exact_cayley=True
        ),
    )
    trainable_before = {name: param.requires_grad for name, param in model.named_parameters()}
    layers = [module for module in model.modules() if isinstance(module, orthoft.OrthoLayer)]
    layer_state_before = [(layer.active_adapters, layer.disable_adapters) for layer in layers]
    reports = {}
    for order in (["first", "second"], ["second", "first"]):
        reports[tuple(order)] = export_merged(model, tmp_path / "-".join(order), adapter_names=order, dtype="fp32")
        assert reports[tuple(order)].adapters == order
        assert reports[tuple(order)].merge_error["relative_max"] < TOLERANCE
    from safetensors.torch import load_file

    weights = {order: load_file(tmp_path / "-".join(order) / "model.safetensors") for order in reports}
    key = "model.layers.0.self_attn.q_proj.weight"
    first_second, second_first = weights[("first", "second")][key], weights[("second", "first")][key]
    assert not torch.allclose(first_second, second_first, atol=1e-4), "order should matter for non-commuting rotations"
    # both are the base weight times an orthogonal map: same singular values as the dequantized base
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base_singular = torch.linalg.svdvals(layer.dense_base_weight())
    for merged in (first_second, second_first):
        assert torch.allclose(torch.linalg.svdvals(merged), base_singular, atol=1e-4)
    # the adapter model was left as it was: one active adapter, trainable flags untouched
    assert model.active_adapters == ["first"]
    assert [(layer.active_adapters, layer.disable_adapters) for layer in layers] == layer_state_before
    assert {name: param.requires_grad for name, param in model.named_parameters()} == trainable_before


def test_cli_export_two_adapters_from_saved_folders(tiny_llama_dir, tmp_path, capsys):
    from orthoft.cli import main

    first = trained_tiny_model(tiny_llama_dir, "ORTHOFT_OFT", seed=1)
    first.save_pretrained(tmp_path / "adapter-a")
    second = trained_tiny_model(tiny_llama_dir, "ORTHOFT_OFT", seed=2, target_modules=["q_proj", "o_proj"])
    second.save_pretrained(tmp_path / "adapter-b")
    out = tmp_path / "cli-out"
    argv = ["export", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter-a")]
    argv += ["--adapter", str(tmp_path / "adapter-b"), "--out", str(out), "--load-in-4bit", "--dtype", "fp32"]
    assert main(argv) == 0
    info = json.loads((out / "orthoft_export.json").read_text())
    assert info["adapters"] == ["adapter_a", "adapter_b"]
    assert info["merge_error"]["relative_max"] < TOLERANCE
    assert info["base"] == str(tiny_llama_dir)
    # same result as the API on the same adapters
    api_model, names = export_module.load_for_export(
        str(tiny_llama_dir), [str(tmp_path / "adapter-a"), str(tmp_path / "adapter-b")], load_in_4bit=True
    )
    assert isinstance(api_model, PeftModel) and names == ["adapter_a", "adapter_b"]
    api_report = export_merged(api_model, tmp_path / "api-out", dtype="fp32")  # default: active adapter only
    assert api_report.adapters == ["adapter_a"]
    with pytest.raises(SystemExit):
        main(["export", "--base", str(tiny_llama_dir), "--out", str(tmp_path / "x")])  # --adapter is required
    missing_config = ["export", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "x")]
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        main(["--debug", *missing_config])
    assert main(missing_config) == 2  # without --debug: one line on stderr, exit status 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_modules_to_save_copy_is_exported(tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    config = orthoft.OFTConfig(target_modules=["q_proj"], block_size=16, modules_to_save=["lm_head"])
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4-double"), config)
    train_steps(model, torch.randint(0, 128, (2, 16)), steps=2)
    wrapper = model.base_model.model.lm_head
    trainable_before = {name: param.requires_grad for name, param in model.named_parameters()}
    report = export_merged(model, tmp_path / "out", dtype="fp32")
    assert report.merge_error["relative_max"] < TOLERANCE
    # the probe switched the wrapper to the exported copy and back
    assert wrapper.active_adapters == ["default"] and not wrapper.disable_adapters
    assert {name: param.requires_grad for name, param in model.named_parameters()} == trainable_before
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"]
    trained = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(saved, trained.detach().float())


# ---- atomic writes and refusals -------------------------------------------------------------------------


def test_failure_mid_write_leaves_nothing_at_out(tiny_llama_dir, tmp_path, monkeypatch):
    model = trained_tiny_model(tiny_llama_dir)
    written = []
    real_fsync_path = files.fsync_path

    def disk_full_after_first_file(path, directory=False):
        real_fsync_path(path, directory)
        if not directory:  # the first file reached the disk; the next write finds it full
            written.append(path)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(files, "fsync_path", disk_full_after_first_file)  # looked up there by files.sync_tree
    out = tmp_path / "model"
    with pytest.raises(OSError, match="No space left"):
        export_merged(model, out, max_shard_size="100KB")
    assert written, "the hook never ran"
    assert not out.exists()
    assert os.listdir(tmp_path) == [], "temporary folders left behind"


KILLED_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from peft import get_peft_model
    import orthoft
    from orthoft import export
    from orthoft.io import files
    from tests.test_quantized import load_quantized

    base, out, marker = sys.argv[1:4]
    config = orthoft.OFTConfig(target_modules=["q_proj"], block_size=16)
    model = get_peft_model(load_quantized(base, "nf4-double"), config)
    real_fsync_path = files.fsync_path

    def stall(path, directory=False):
        real_fsync_path(path, directory)
        if not directory:  # stop right after the first file reached the disk, to be killed there
            Path(marker).write_text(str(path))
            time.sleep(300)

    files.fsync_path = stall  # looked up there by files.sync_tree
    export.export_merged(model, out, max_shard_size="100KB")
    """
)


def test_sigkill_mid_write_leaves_nothing_at_out(tiny_llama_dir, tmp_path):
    out, marker = tmp_path / "exports" / "model", tmp_path / "marker"
    out.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, str(tiny_llama_dir), str(out), str(marker)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "export never reached the write phase"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    partials = [p.name for p in out.parent.iterdir()]
    assert len(partials) == 1 and partials[0].startswith(".model.partial-"), partials
    # the next export to the same place succeeds and clears the dead process's staging folder
    report = export_merged(trained_tiny_model(tiny_llama_dir), out, dtype="fp32")
    assert report.merge_error["relative_max"] < TOLERANCE
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_nan_adapter_is_refused_naming_the_tensor(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.orthoft_oft_Q["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight has \d+ NaN/inf"):
        export_merged(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_fp16_overflow_is_refused(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir)
    with torch.no_grad():
        model.base_model.model.model.norm.weight[0] = 1e6  # fine in float32, inf in float16
    with pytest.raises(ValueError, match=r"model\.norm\.weight .*float16.*bf16 or fp32"):
        export_merged(model, tmp_path / "out", dtype="fp16")
    assert os.listdir(tmp_path) == []


def test_existing_out_dir_needs_overwrite(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir)
    out = tmp_path / "model"
    export_merged(model, out, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(model, out)
    report = export_merged(model, out, dtype="fp32", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert report.export_error["relative_max"] < TOLERANCE
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_argument_errors(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\] not in the model"):
        export_merged(model, tmp_path / "a", adapter_names=["nope"])
    with pytest.raises(ValueError, match="dtype 'int4'"):
        export_merged(model, tmp_path / "a", dtype="int4")
    with pytest.raises(ValueError, match="quantization 'gptq'"):
        export_merged(model, tmp_path / "a", quantization="gptq")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        export_merged(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no orthoft adapter layer"):
        export_merged(load_quantized(tiny_llama_dir, prepare=False), tmp_path / "a")
    assert os.listdir(tmp_path) == []


# ---- SmolLM2-135M in 4-bit --------------------------------------------------------------------------------


SMOLLM2_CONFIGS = {
    "ORTHOFT_OFT": dict(target_modules=["q_proj", "v_proj"], block_size=32),
    "ORTHOFT_PSOFT": dict(target_modules=["q_proj", "v_proj"], r=16),  # additive, SVD of the dequantized weight
}


@pytest.mark.slow
@pytest.mark.parametrize("peft_type", list(SMOLLM2_CONFIGS))
def test_smollm2_4bit_export_reloads_without_orthoft(peft_type, tmp_path):
    from orthoft.defaults import MissingResourceError, smollm2_path

    if peft_type not in METHODS:
        pytest.skip(f"{peft_type} is not registered")
    try:
        folder = smollm2_path()
    except MissingResourceError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    model = load_quantized(folder, "nf4-double")
    model = get_peft_model(model, REGISTERED[peft_type][0](**SMOLLM2_CONFIGS[peft_type]))
    vocab = model.config.vocab_size
    train_steps(model, torch.randint(0, vocab, (1, 16)), steps=2, lr=1e-2)
    probe = {"input_ids": probe_ids(vocab, (1, 16))}
    out = tmp_path / "smollm2-merged"
    report = export_merged(model, out, dtype="fp32", probe_inputs=probe)
    assert report.merge_error["relative_max"] < TOLERANCE, report.merge_error
    assert (out / "tokenizer.json").exists(), "the base folder's tokenizer should travel with the export"
    folders = [out]
    if peft_type == "ORTHOFT_OFT":
        requantized = export_merged(model, tmp_path / "smollm2-nf4", quantization="base", probe_inputs=probe)
        assert requantized.requantization_error["max_abs"] > 10 * report.merge_error["max_abs"]
        print("SmolLM2-135M requantized nf4 export:", requantized.export_error, requantized.requantization_error)
        folders.append(tmp_path / "smollm2-nf4")
    adapter_logits = exact_logits(model, probe["input_ids"])
    reloaded = reload_without_orthoft(folders, probe["input_ids"], tmp_path)
    error = relative_max(reloaded[str(out)], adapter_logits)
    print(f"SmolLM2-135M nf4, {peft_type} q/v: relative max logit difference of the reloaded export", error)
    assert error < TOLERANCE
    if peft_type == "ORTHOFT_OFT":
        measured = float((reloaded[str(folders[1])] - adapter_logits).abs().max())
        assert measured == pytest.approx(requantized.export_error["max_abs"], rel=1e-3, abs=1e-5)


# ---- destinations that would destroy an input --------------------------------------------------------


def test_out_dir_that_would_destroy_an_input_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    model = trained_tiny_model(tiny_llama_dir)
    adapter = tmp_path / "runs" / "r1" / "final" / "adapter"
    model.save_pretrained(adapter)
    (tmp_path / "runs" / "r1" / "recipe.yaml").write_text("model: {}\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "notes")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    refusals = {
        tmp_path / "notes": "is the working directory",
        tmp_path: "is a parent of the working directory",
        tiny_llama_dir: "is the base model folder",
        adapter: "is the adapter folder",
        tmp_path / "runs" / "r1": "is the run folder (its adapter, checkpoints and metrics)",
        tmp_path / "runs": "holds the run folder",
        tmp_path / "runs" / "r1" / "checkpoints" / "step-000002": "checkpoints folder of the run",
    }
    for out, reason in refusals.items():
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=re.escape(reason)) as refused:
                export_merged(model, out, overwrite=overwrite, adapter_dirs=[adapter])
            assert str(out) in str(refused.value) and "Fix: pass a new folder" in str(refused.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="is not an orthoft export"):
        export_merged(model, tmp_path / "other", overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*") if "other" not in p.parts) == before
    assert (tmp_path / "other" / "data.csv").read_text() == "1,2\n"
    # an empty folder holds nothing to lose: overwrite may replace it
    (tmp_path / "empty").mkdir()
    assert export_merged(model, tmp_path / "empty", overwrite=True, dtype="fp32").files


def test_old_export_left_aside_by_a_crash_is_restored(tiny_llama_dir, tmp_path):
    model = trained_tiny_model(tiny_llama_dir)
    out = tmp_path / "model"
    export_merged(model, out, dtype="bf16")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".model.old-{int(dead.stdout)}-abcd"
    os.rename(out, aside)  # what a kill between the two renames of the swap leaves
    with pytest.raises(FileExistsError, match=f"restored from {aside.name}"):
        export_merged(model, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16" and not aside.exists()
    os.rename(out, aside)
    with pytest.warns(UserWarning, match="restored it from"):
        export_merged(model, out, dtype="fp32", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["model"]
