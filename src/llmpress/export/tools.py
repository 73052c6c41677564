"""Which tools can read a folder llmpress wrote, from its ``config.json`` alone: the names, and what was checked.

Each entry of the format table (``llmpress.export.formats``) says its readers with these names;
``formats.readers(folder)`` asks the entry that detects the folder.

Checked on this machine with transformers 5.24 and compressed-tensors 0.20 (CPU), by
``tests/test_plain_transformers.py`` (logits against ``llmpress.load_model``):

=====================  ======================================================  ==============================
format                 plain transformers                                      readers
=====================  ======================================================  ==============================
dense                  ``from_pretrained(folder)``: identical logits           llmpress, transformers, vLLM,
                                                                               lm-eval
pack-quantized,        ``quantization_config=CompressedTensorsConfig(          llmpress, transformers
one config group       dequantize=True)``: identical logits; the default       (compressed-tensors), vLLM,
                       (compressed execution) too for symmetric schemes; for   lm-eval (symmetric only)
                       asymmetric ones it raises (zero-point size mismatch)
pack-quantized,        dequantizes every layer with the first group's          llmpress, vLLM
several groups         scheme and fails
int-quantized (W8A8)   ``from_pretrained(folder)``: the same int8 codes and    llmpress, transformers
                       scales, activations fake-quantized per token; logits    (compressed-tensors), vLLM,
                       equal llmpress's up to the float GEMM's rounding (see   lm-eval
                       ``llmpress.quant.w8a8``). ``dequantize=True`` drops
                       the activation quantization (a W8A16 model)
sparse-bitmask,        refused ("no file named model.safetensors"):            llmpress
sparse-24-bitmask      compressed-tensors 0.15+ cannot decompress them
low-rank (factorized)  refused ("no file named model.safetensors")             llmpress
=====================  ======================================================  ==============================

vLLM is listed from the format's schema (its compressed-tensors WNA16 and W8A8 int8 paths,
and plain dense folders), not from a run here; lm-eval's ``--model hf`` loads through
``AutoModelForCausalLM.from_pretrained(folder)`` without a quantization override.
"""

LLMPRESS, TRANSFORMERS, TRANSFORMERS_CT, VLLM, LM_EVAL = (
    "llmpress", "transformers", "transformers (compressed-tensors)", "vLLM", "lm-eval")
