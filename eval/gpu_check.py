"""One GPU check of orthoft (issue 16): CUDA tests, per-method correctness, QLoRA-style throughput, Newton-Schulz.

    python eval/gpu_check.py OUT_DIR                  # one CUDA GPU, about 8 minutes at most
    python eval/gpu_check.py OUT_DIR --dry-run        # tiny shapes on the CPU, tens of seconds
    python eval/gpu_check.py OUT_DIR --sections 3 4   # a subset (a rerun inside a short device lease)

Writes ``OUT_DIR/gpu_check.json`` (every number) and ``OUT_DIR/gpu_check.md`` (a table per section),
both rewritten after each section so a run cut short still leaves what it measured. Sections:

1. the CUDA-only tests (``-m cuda`` if that marker is registered, else ``-k cuda`` over the test files
   that skip without CUDA), as a pytest subprocess; pass/fail/skip counts from its JUnit XML.
2. every orthoft method on a random-init tiny Llama, per layer kind (GPU: bf16, bitsandbytes nf4 and
   int8; dry run: CPU float32 and CPU nf4): identity at init, merged == unmerged, finite gradients
   after a few AdamW steps, the error of ``export_merged``'s dense export, and fp32 rotations under
   bf16 autocast (see ``RotationDtypeProbe`` for exactly what that checks).
3. fwd+bwd+AdamW tokens/s and peak ``max_memory_allocated`` on nf4 random-init Llama shapes (1B-, 3B-,
   8B-shaped, fewer layers and a smaller vocabulary than the real models; stated in the output) for
   PEFT LoRA r16 (QLoRA), PEFT OFT and orthoft OFT/BOFT/HRA/qGOFT/PSOFT: all configs resident at once,
   timed round-robin, medians, ratios to QLoRA; shapes that would overrun ``--budget-s`` are skipped.
4. Newton-Schulz (every method of ``orthoft.optim.newton_schulz.METHODS``) in bf16 at adapter and
   full-matrix shapes, CUDA-event medians, with the orthogonality error of each result.

The sections live in ``gpu_check_correctness.py`` and ``gpu_check_speed.py`` beside this file,
shared pieces in ``gpu_check_common.py``. The dry run's timings are CPU timings of tiny shapes: they
only show that the code paths run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from gpu_check_common import HAS_BNB, ROOT, Budget, Run, table
from gpu_check_correctness import markdown_correctness, section_correctness
from gpu_check_speed import markdown_newton_schulz, markdown_throughput, section_newton_schulz, section_throughput

import orthoft

# ---- 1. CUDA-only tests -------------------------------------------------------------------------


def cuda_test_selection() -> list[str]:
    """``-m cuda`` where the marker is registered; else ``-k cuda`` over the files that skip without CUDA."""
    if "cuda:" in (ROOT / "pyproject.toml").read_text(encoding="utf-8"):
        return ["-m", "cuda", "tests"]
    files = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "cuda.is_available()" in path.read_text(encoding="utf-8")
    )
    return ["-k", "cuda", *files]


def section_cuda_tests(run: Run, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *cuda_test_selection()]
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    if run.dry_run or run.device != "cuda":
        return {**result, "status": "skipped", "reason": "dry run / no CUDA device: these tests need a GPU"}
    with tempfile.TemporaryDirectory() as scratch:
        xml_path = Path(scratch) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [*command, f"--junitxml={xml_path}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as error:
            tail = (error.stdout or b"")[-3000:]
            return {
                **result,
                "status": "timeout",
                "reason": f"killed after {timeout_s:.0f} s",
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
            }
        result.update(
            status="ran",
            seconds=round(time.monotonic() - start, 1),
            returncode=proc.returncode,
            output_tail=(proc.stdout + proc.stderr)[-3000:],
        )
        if xml_path.exists():
            result.update(junit_counts(xml_path))
    return result


def junit_counts(xml_path: Path) -> dict[str, Any]:
    cases = ET.parse(xml_path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if outcome in ("failure", "error"):
            message = next(child for child in case if child.tag == outcome).get("message", "")
            counts["not_passed"].append(f"{case.get('classname')}::{case.get('name')}: {message[:200]}")
    return counts


# ---- output -------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# orthoft GPU check{' (DRY RUN: CPU, tiny shapes, timings meaningless)' if meta['dry_run'] else ''}",
        "",
        f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, peft "
        f"{meta['peft']}, bitsandbytes {meta['bitsandbytes']}; {meta.get('elapsed_s', 0):.0f} s of a "
        f"{meta['budget_s']:.0f} s budget.",
        "",
    ]
    lines += markdown_cuda_tests(results.get("cuda_tests"))
    lines += markdown_correctness(results.get("correctness"))
    lines += markdown_throughput(results.get("throughput"))
    lines += markdown_newton_schulz(results.get("newton_schulz"))
    return "\n".join(lines)


def markdown_cuda_tests(section: dict | None) -> list[str]:
    if section is None:
        return ["## 1. CUDA-only tests", "", "not run (section not selected)", ""]
    head = [
        "## 1. CUDA-only tests",
        "",
        f"`python {section['command']}`: {section['status']}"
        + (f" ({section['reason']})" if section.get("reason") else ""),
        "",
    ]
    if section["status"] != "ran":
        return head
    rows = [[str(section.get(k, "")) for k in ("passed", "failed", "errors", "skipped")] + [str(section["seconds"])]]
    failures = [f"- {line}" for line in section.get("not_passed", [])[:20]]
    return head + table(["passed", "failed", "errors", "skipped", "seconds"], rows) + failures + ([""] * bool(failures))


def write_outputs(run: Run) -> None:
    run.results["meta"]["elapsed_s"] = round(run.budget.elapsed(), 1)
    text = json.dumps(run.results, indent=2, default=str) + "\n"
    (run.out_dir / "gpu_check.json").write_text(text, encoding="utf-8")
    (run.out_dir / "gpu_check.md").write_text(markdown(run.results), encoding="utf-8")


def metadata(run: Run) -> dict[str, Any]:
    bnb_version = version("bitsandbytes") if HAS_BNB else None
    name = torch.cuda.get_device_name() if run.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "dry_run": run.dry_run,
        "device": run.device,
        "device_name": name,
        "budget_s": run.budget.seconds,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "orthoft": orthoft.__version__,
        "python": sys.version.split()[0],
    }


SECTIONS = {
    "1": ("cuda_tests", None),
    "2": ("correctness", section_correctness),
    "3": ("throughput", section_throughput),
    "4": ("newton_schulz", section_newton_schulz),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (tests, no GPU)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=sorted(SECTIONS),
        default=sorted(SECTIONS),
        help="sections to run (default all)",
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device. Fix: run it on a GPU machine, or pass --dry-run.", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args.out_dir, args.dry_run, "cpu" if args.dry_run else "cuda", Budget(args.budget_s))
    run.results["meta"] = metadata(run)
    # cheap, fixed-size sections first; throughput takes what is left of the budget
    for key in [k for k in ("1", "2", "4", "3") if k in args.sections]:
        name, section = SECTIONS[key]
        print(f"section {key} ({name}), {run.budget.elapsed():.0f} s in", flush=True)
        if key == "1":
            run.results[name] = section_cuda_tests(run, timeout_s=min(150.0, 0.3 * args.budget_s))
        else:
            run.results[name] = section(run)
        write_outputs(run)
    print(markdown(run.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
