"""Merge orthoft adapters into a plain Hugging Face model for deployment: ``export_merged`` and ``orthoft export``.

The exported folder loads with ``AutoModel*.from_pretrained`` and needs neither orthoft nor PEFT.

How the merge is done, and why:

* A fresh dense model is built from the base's config (quantization settings removed). Every
  adapted layer contributes ``layer.merged_weight(name, layer.dense_base_weight())`` for each
  exported adapter in order: the layer's own float32 math on the exactly dequantized base weight.
  Quantized layers that carry no adapter are dequantized. Nothing is written into a 4-bit layer,
  because that would requantize the merged weight and hide the rounding in the model.
  (:mod:`orthoft.export.merge`)
* With ``quantization`` (CLI ``--requantize``) the dense merge is quantized again with
  bitsandbytes and saved in that format; the error this adds is measured and reported.
  (:mod:`orthoft.export.quantize`)
* The export is measured, not assumed: logits of the adapter model and of the exported model on
  a probe batch, written to the model card (README.md) and ``orthoft_export.json``.
  (:mod:`orthoft.export.probe`, :mod:`orthoft.export.card`)
* Writes are atomic (:mod:`orthoft.io.files`): everything goes to a hidden temporary folder next
  to ``out_dir``, files and folder are fsynced, then the folder is renamed. A crash or a full disk
  leaves no half-written model at ``out_dir`` (a stale ``.NAME.partial-PID-*`` folder at most,
  removed by the next export once its process is gone). Tensors with NaN/inf are refused before
  anything is written.
* Several adapters merge in the stated order: ``W -> W T1^T -> W T1^T T2^T``; products of
  rotations stay orthogonal. The adapter model is probed with the same adapters active in the
  same order, so the measured error covers the composition.

The command line (``orthoft export``) lives in :mod:`orthoft.cli.export`.
"""

from .api import export_merged, load_for_export
from .probe import PROBE_SHAPE
from .quantize import QUANTIZATIONS
from .report import EXPORT_INFO_FILE, ExportReport

__all__ = ["EXPORT_INFO_FILE", "PROBE_SHAPE", "QUANTIZATIONS", "ExportReport", "export_merged", "load_for_export"]
