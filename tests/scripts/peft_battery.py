"""Run PEFT's own ``tests/test_custom_models.py`` battery on orthoft configs (Linear, Conv1D, Conv2d).

Not part of the suite: it needs PEFT's source distribution (the wheel has no tests), fetched with
``pip download`` unless ``--peft-tests`` points at an unpacked ``tests/`` folder. It copies those
tests to a scratch package, swaps the battery's ``TEST_CASES`` for the cases below and runs
``TestPeftCustomModel`` on them (the non-parametrized LoRA-specific tests, which read the hub, are
deselected)::

    python tests/scripts/peft_battery.py                      # all tests of the class
    python tests/scripts/peft_battery.py -k "test_save_pretrained or test_adapter_dtype_autocast"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft

CASES = """
import orthoft
import orthoft.adapters

O, B, Q, H = orthoft.OFTConfig, orthoft.BOFTConfig, orthoft.QGOFTConfig, orthoft.HRAConfig
P, S, C, A = orthoft.PSOFTConfig, orthoft.SVFTConfig, orthoft.CLOVERConfig, orthoft.adapters.OrthogonalAdaptationConfig
LIN = ["lin0", "lin1"]
ORTHOFT_CASES = [
    ("MLP OFT", "MLP", O, {"target_modules": LIN, "block_size": 5}),
    ("MLP OFT save", "MLP", O, {"target_modules": ["lin0"], "block_size": 5, "modules_to_save": ["lin1"]}),
    ("MLP OFT exact shared", "MLP", O, {"target_modules": LIN, "block_size": 5, "use_exact_cayley": True,
                                         "block_share": True}),
    ("Conv1D OFT", "EmbConv1D", O, {"target_modules": ["conv1d"], "block_size": 5}),
    ("Conv2d OFT", "Conv2d", O, {"target_modules": ["conv2d"], "block_size": 9}),
    ("MLP BOFT", "MLP", B, {"target_modules": LIN, "block_size": 2, "n_butterfly_factor": 1}),
    ("MLP BOFT butterfly", "MLP", B, {"target_modules": ["lin1"], "block_size": 2, "n_butterfly_factor": 2}),
    ("Conv2d BOFT", "Conv2d2", B, {"target_modules": ["conv2d"], "block_size": 4, "n_butterfly_factor": 2}),
    ("MLP qGOFT", "MLP", Q, {"target_modules": LIN}),
    ("MLP GOFT strict", "MLP", Q, {"target_modules": LIN, "strict": True}),
    ("Conv1D qGOFT", "EmbConv1D", Q, {"target_modules": ["conv1d"]}),
    ("Conv2d qGOFT", "Conv2d", Q, {"target_modules": ["conv2d"]}),
    ("MLP HRA", "MLP", H, {"target_modules": LIN, "r": 2}),
    ("Conv1D HRA", "EmbConv1D", H, {"target_modules": ["conv1d"], "r": 2}),
    ("Conv2d HRA", "Conv2d", H, {"target_modules": ["conv2d"], "r": 4}),
    ("MLP PSOFT", "MLP", P, {"target_modules": LIN, "r": 2}),
    ("Conv1D PSOFT", "EmbConv1D", P, {"target_modules": ["conv1d"], "r": 1}),
    ("Conv2d PSOFT", "Conv2d", P, {"target_modules": ["conv2d"], "r": 4}),
    ("MLP SVFT", "MLP", S, {"target_modules": LIN}),
    ("Conv1D SVFT", "EmbConv1D", S, {"target_modules": ["conv1d"]}),
    ("Conv2d SVFT", "Conv2d", S, {"target_modules": ["conv2d"]}),
    ("MLP CLOVER", "MLP", C, {"target_modules": ["lin0"], "projection_roles": {"lin0": "q"}, "num_heads": 2,
                              "head_dim": 10, "rotary": True}),
    ("MLP OA", "MLP", A, {"target_modules": LIN, "rank": 2}),
    ("Conv1D OA", "EmbConv1D", A, {"target_modules": ["conv1d"], "rank": 1}),
    ("Conv2d OA", "Conv2d", A, {"target_modules": ["conv2d"], "rank": 2}),
]
"""


def peft_tests(download_dir: Path) -> Path:
    """PEFT's ``tests/`` folder of the installed version, from its source distribution."""
    spec = f"peft=={peft.__version__}"
    pip = [sys.executable, "-m", "pip", "download", "-q", spec, "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, "-d", str(download_dir)], check=True)
    archive = next(download_dir.glob("peft-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(download_dir, filter="data")
    return next(download_dir.glob("peft-*/tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-tests", type=Path, default=None, help="an unpacked PEFT tests/ folder")
    parser.add_argument("-k", default=None, help="pytest -k expression, ANDed with the orthoft cases")
    args, pytest_args = parser.parse_known_args()
    scratch = Path(tempfile.mkdtemp(prefix="peft-battery-"))
    source = args.peft_tests or peft_tests(scratch / "download")
    package = scratch / "battery"
    shutil.copytree(source, package)
    (package / "__init__.py").touch()
    (package / "orthoft_cases.py").write_text(CASES)
    battery = package / "test_custom_models.py"
    text = battery.read_text()
    marker = "\nMULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = ["
    text = text.replace(marker, "\nfrom .orthoft_cases import ORTHOFT_CASES as TEST_CASES\n" + marker, 1)
    battery.write_text(text)
    selection = "(MLP or Conv1D or Conv2d)" + (f" and ({args.k})" if args.k else "")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "--tb=line"]
    command += [f"{battery}::TestPeftCustomModel", "-k", selection, *pytest_args]
    return subprocess.run(command, cwd=scratch, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main())
