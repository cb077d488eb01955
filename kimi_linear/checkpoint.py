"""Checkpoints in the released HF format: ``config.json`` + safetensors, sharded with an index.

The model's state dict already uses the release's tensor names except for the routed experts,
which the model stacks into ``experts.{w1,w2,w3}`` ``[E, F, D]`` / ``[E, D, F]`` parameters while the release
stores one tensor per expert. ``NAME_TABLE`` is that one mapping, both ways.

Loading builds the model on the meta device and materialises each tensor straight from the (memory-mapped)
files onto the target device, so peak host memory stays near one copy of the weights. Every inconsistency —
unknown, missing or misshaped tensors, a config.json that contradicts the weights, a corrupt file — raises an
error naming the tensor or file. Writes are atomic: each file goes to a temporary name in the same folder and
is renamed into place.

A saved folder is servable (vLLM, SGLang, transformers): the tokenizer files, ``generation_config.json`` and the
remote-code ``*.py`` files of the folder the model was loaded from are copied next to the weights, and the
config.json keys the project does not use (``auto_map``, ``transformers_version``, ``head_dim``, ...) are
written back unchanged.

Where the release's own code and the servers differ, the project follows the servers: ``kv_a_layernorm`` (the
MLA latent's RMSNorm) uses ``rms_norm_eps`` (1e-5) as vLLM does, while the release's ``modeling_kimi.py`` and
transformers' native ``kimi_linear`` use the norm class's default 1e-6 (tests/test_interop_hf.py holds the
logits of the two within 1e-4 relative). Routing is the same everywhere: experts are chosen by ``scores + e_score_correction_bias`` and
weighted by the unbiased scores (renormalised, times ``routed_scaling_factor``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import torch
import torch.nn as nn

from kimi_linear.config import KimiLinearConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# What a server needs next to the weights to tokenize and chat (the release ships these, plus the remote-code
# *.py files that config.json's auto_map names, e.g. tokenization_kimi.py).
TOKENIZER_FILES = (
    "tiktoken.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.json",
)

# (model name pattern, checkpoint name template, checkpoint name pattern): stacked experts <-> one tensor per
# expert.
NAME_TABLE = [
    (
        re.compile(r"^(?P<prefix>model\.layers\.\d+\.block_sparse_moe\.experts)\.(?P<w>w[123])$"),
        "{prefix}.{e}.{w}.weight",
        re.compile(
            r"^(?P<prefix>model\.layers\.\d+\.block_sparse_moe\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$"
        ),
    ),
]

# Names other writers use for the same tensors -> the release's name. HF transformers 5.24 maps every ".mlp."
# of its model to ".block_sparse_moe." when saving, so the dense SwiGLU of the first layers comes out under
# the MoE's prefix (the release stores it as "mlp.").
ALIASES = [
    (
        re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.weight$"),
        r"\1.mlp.\2.weight",
    ),
]

# Kept in fp32 whatever the model's dtype (the release stores them so; the gate is numerically sensitive).
FP32_SUFFIXES = (
    "self_attn.A_log",
    "self_attn.dt_bias",
    "block_sparse_moe.gate.weight",
    "block_sparse_moe.gate.e_score_correction_bias",
)


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold a valid model (the message names the tensor or file)."""


def keeps_fp32(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


def to_checkpoint_names(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One model tensor -> the (checkpoint name, tensor) pairs the release stores for it."""
    for model_pattern, template, _ in NAME_TABLE:
        m = model_pattern.match(name)
        if m:
            for e in range(tensor.shape[0]):
                yield template.format(e=e, **m.groupdict()), tensor[e]
            return
    yield name, tensor


def from_checkpoint_name(name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (model tensor name, index into its first dim or None)."""
    for _, _, ckpt_pattern in NAME_TABLE:
        m = ckpt_pattern.match(name)
        if m:
            return f"{m['prefix']}.{m['w']}", int(m["e"])
    return name, None


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or a string like '5GB' / '200MB', got {size!r}")
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m[1]) * base**power)


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename over ``path`` (same folder, so the rename is atomic). The file gets
    the umask's mode, not the 0600 of ``mkstemp``: servers that read a saved folder may run as other users."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def _copy_file(src: str, dst: str) -> None:
    _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def serving_files(directory: str) -> list[str]:
    """Names of the tokenizer, generation-config and remote-code (*.py) files in a checkpoint folder."""
    names = [*TOKENIZER_FILES, GENERATION_CONFIG_FILE]
    present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
    code = sorted(
        n for n in os.listdir(directory) if n.endswith(".py") and os.path.isfile(os.path.join(directory, n))
    )
    return present + code


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    source_directory: str | os.PathLike | None = None,
) -> None:
    """Write ``model`` (a ``KimiLinearForCausalLM``) as the release does, as a folder a server can load.

    Besides the weights and ``config.json`` (with the keys of the config.json the model was read from kept
    unchanged, see ``KimiLinearConfig.to_hf``), the folder gets the tokenizer files, ``generation_config.json``
    and remote-code ``*.py`` files of ``source_directory`` (default: the folder ``from_pretrained`` read the model
    from, ``model.checkpoint_directory``), each copied atomically; without a ``generation_config.json`` there,
    one is written from the config's bos/eos/pad ids.

    Args:
        directory: created if missing; existing model files are replaced (stale shards of an earlier save with
            more shards are removed).
        max_shard_size: bytes per shard (int) or a string such as "5GB"; a tensor larger than this gets a
            shard of its own. One shard is written as ``model.safetensors`` (no index), several as
            ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
        dtype: cast floating tensors to this dtype (default: as they are); A_log, dt_bias and the router stay
            fp32.
        source_directory: where the tokenizer and generation config come from (None: the model's own folder,
            if it was loaded from one).

    Raises:
        ValueError: bad max_shard_size, or a config the release format cannot express.
    """
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    config: KimiLinearConfig = model.config
    hf_config = config.to_hf()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    total = 0
    for name, tensor in state.items():
        for ckpt_name, t in to_checkpoint_names(name, tensor):
            if keeps_fp32(ckpt_name):
                t = t.float()
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and shard_bytes + nbytes > limit:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((ckpt_name, t))
            shard_bytes += nbytes
            total += nbytes
    float_dtypes = {
        t.dtype for shard in shards for n, t in shard if t.is_floating_point() and not keeps_fp32(n)
    }
    if len(float_dtypes) == 1:
        hf_config["dtype"] = str(next(iter(float_dtypes))).removeprefix("torch.")

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(names, shards, strict=False):
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in shard}
        _atomic_write(
            os.path.join(directory, file), lambda tmp, d=tensors: save_file(d, tmp, metadata={"format": "pt"})
        )
    stale = [
        f
        for f in os.listdir(directory)
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", f) and f not in names
    ]
    index_path = os.path.join(directory, INDEX_FILE)
    if n > 1:
        weight_map = {name: file for file, shard in zip(names, shards, strict=False) for name, _ in shard}
        _write_json(
            index_path, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        )
    elif os.path.exists(index_path):
        os.remove(index_path)
    for f in stale:
        os.remove(os.path.join(directory, f))
    if source_directory is None:
        source_directory = getattr(model, "checkpoint_directory", None)
    copied: list[str] = []
    if source_directory is not None and os.path.isdir(source_directory):
        source_directory = os.fspath(source_directory)
        if not os.path.samefile(source_directory, directory):
            for name in serving_files(source_directory):
                _copy_file(os.path.join(source_directory, name), os.path.join(directory, name))
            copied = serving_files(source_directory)
    if GENERATION_CONFIG_FILE not in copied and not os.path.isfile(
        os.path.join(directory, GENERATION_CONFIG_FILE)
    ):
        generation = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(
            os.path.join(directory, GENERATION_CONFIG_FILE),
            {k: v for k, v in generation.items() if v is not None},
        )
    _write_json(os.path.join(directory, CONFIG_FILE), hf_config)


def checkpoint_files(directory: str) -> dict[str, str]:
    """Checkpoint tensor name -> file path, from the index or the single file.

    Raises:
        FileNotFoundError / NotADirectoryError: missing folder or no weights in it.
        CheckpointError: unreadable index or header (names the file).
    """
    from safetensors import safe_open

    if not os.path.exists(directory):
        raise FileNotFoundError(f"checkpoint folder not found: {directory}")
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"checkpoint must be a folder, got a file: {directory}")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from None
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} names {os.path.basename(path)}, which is missing")
        return files
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (only safetensors are supported)"
        )
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{single} is not a readable safetensors file: {e}") from None


def expected_checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for a model built (possibly on the meta device) from its config."""
    shapes = {}
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        for ckpt_name, t in to_checkpoint_names(name, tensor):
            shapes[ckpt_name] = tuple(t.shape)
    return shapes


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"model has no tensor {name}")


def load_pretrained(
    cls,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Build ``cls(config)`` on the meta device and fill it from the checkpoint folder (see module docstring).

    Raises:
        FileNotFoundError / NotADirectoryError: no folder, config.json or weights.
        CheckpointError (a ValueError): unexpected, missing or misshaped tensors, a corrupt file.
        TypeError: dtype not a floating torch.dtype.
    """
    from safetensors import safe_open

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    directory = os.fspath(directory)
    files = checkpoint_files(directory)
    config = KimiLinearConfig.from_hf(directory)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config)
    expected = expected_checkpoint_shapes(model)
    meta_state = model.state_dict()
    renamed: dict[str, str] = {}  # release name -> name stored in the file

    for name in list(files):
        for pattern, replacement in ALIASES:
            alias = pattern.sub(replacement, name)
            if alias != name and alias in expected and alias not in files and name not in expected:
                files[alias] = files.pop(name)
                renamed[alias] = name
    unexpected = sorted(set(files) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors the config does not describe: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} (config.json: {directory})"
        )
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(
            f"checkpoint is missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )

    def target_dtype(name: str, stored: torch.dtype) -> torch.dtype:
        if keeps_fp32(name):
            return torch.float32
        return dtype if (dtype is not None and stored.is_floating_point) else stored

    stacked: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        with handle as f:
            present = set(f.keys())
            for ckpt_name in sorted(names):
                stored_name = renamed.get(ckpt_name, ckpt_name)
                if stored_name not in present:
                    raise CheckpointError(
                        f"tensor {stored_name} is listed for {os.path.basename(path)} but not in it"
                    )
                try:
                    tensor = f.get_tensor(stored_name)
                except Exception as e:
                    raise CheckpointError(
                        f"tensor {ckpt_name} in {path} cannot be read (truncated?): {e}"
                    ) from None
                if tuple(tensor.shape) != expected[ckpt_name]:
                    raise CheckpointError(
                        f"tensor {ckpt_name} has shape {list(tensor.shape)} in the checkpoint but "
                        "config.json "
                        "implies "
                        f"{list(expected[ckpt_name])}"
                    )
                tensor = tensor.to(device=device, dtype=target_dtype(ckpt_name, tensor.dtype))
                name, expert = from_checkpoint_name(ckpt_name)
                if expert is None:
                    _set_tensor(model, name, tensor)
                    continue
                if name not in stacked:
                    stacked[name] = torch.empty(meta_state[name].shape, dtype=tensor.dtype, device=device)
                stacked[name][expert].copy_(tensor)
                del tensor
    for name, tensor in stacked.items():
        _set_tensor(model, name, tensor)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, buf in model.named_buffers():
        if buf.is_meta:  # non-persistent buffers are not in the checkpoint: start them at zero
            _set_tensor(model, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors not filled from the checkpoint: {still_meta[:8]}")
    model.checkpoint_directory = os.path.abspath(directory)  # save_pretrained copies its tokenizer files
    return model
