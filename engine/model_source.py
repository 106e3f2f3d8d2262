"""Find a model's files (local dir, .gguf file, hub id, or the embedded default) and its metadata.

Hub ids are fetched with huggingface_hub (revision, token, offline cache), safetensors preferred.
A missing or malformed model gives one ValueError/FileNotFoundError that names the path or id.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from engine.default_model import default_model_path

_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


@dataclass(frozen=True)
class ModelFiles:
    directory: str
    gguf_file: str | None = None  # a file name inside `directory`

    @property
    def name(self) -> str:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or model.endswith(".gguf")


def resolve_model(model: str | None, revision: str | None = None, token: str | None = None) -> ModelFiles:
    if model is None:
        path = default_model_path()
        return ModelFiles(os.path.dirname(path), os.path.basename(path))
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a model directory instead")
        return ModelFiles(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        return _local_dir(path)
    if _looks_like_path(model):
        raise ValueError(f"model path {model!r} does not exist")
    return _local_dir(_download(model, revision, token))


def _local_dir(path: str) -> ModelFiles:
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelFiles(os.path.abspath(path))
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ModelFiles(os.path.abspath(path), os.path.basename(ggufs[0]))
    if ggufs:
        raise ValueError(f"model directory {path!r} holds several .gguf files; name one of them")
    raise ValueError(f"model directory {path!r} has no config.json (and no .gguf file)")


def _download(repo_id: str, revision: str | None, token: str | None) -> str:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        try:
            files = list_repo_files(repo_id, revision=revision, token=token)
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        except OfflineModeIsEnabled:
            weights = ["*.safetensors", "*.bin"]
        return snapshot_download(repo_id, revision=revision, token=token, allow_patterns=_HUB_PATTERNS + weights)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as e:
        raise ValueError(f"could not fetch model {repo_id!r} (revision {revision or 'main'}): {e}") from e


def _json_object(path: str) -> dict:
    """The JSON object in the file at `path`; a ValueError naming the file for bad JSON or any other JSON value
    (transformers versions differ in what they raise for those: 5.17 a TypeError for a list)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # unreadable, a directory, bad bytes or JSON
        raise ValueError(f"malformed {os.path.basename(path)} in {os.path.dirname(path)!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"malformed {os.path.basename(path)} in {os.path.dirname(path)!r}: "
            f"{_JSON_KINDS.get(type(value), 'null')}, not a JSON object"
        )
    return value


def load_hf_config(files: ModelFiles, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if not files.gguf_file:  # checked here: transformers does not reject every malformed config.json clearly
        _json_object(os.path.join(files.directory, "config.json"))
    try:
        return AutoConfig.from_pretrained(
            files.directory, gguf_file=files.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed model config in {files.name!r}: {e}") from e


def load_tokenizer(files: ModelFiles, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            files.directory, gguf_file=files.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"could not load a tokenizer from {files.name!r}: {e}") from e


def eos_token_ids(files: ModelFiles, hf_config) -> frozenset[int]:
    """Every EOS id of the generation config (as `generate` uses) and of the model config."""
    ids: set[int] = set()
    for value in (_generation_config_eos(files), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def decoder_start_token_id(files: ModelFiles, hf_config) -> int:
    """Where an encoder-decoder's decoder starts (as `generate` does): the generation config's, the model config's,
    else the pad token."""
    candidates = (
        _generation_config(files).get("decoder_start_token_id"),
        getattr(hf_config, "decoder_start_token_id", None),
        getattr(hf_config, "pad_token_id", None),
    )
    for value in candidates:
        if isinstance(value, int):
            return value
    raise ValueError(f"encoder-decoder model {files.name!r} names no decoder_start_token_id (nor pad_token_id)")


def _generation_config(files: ModelFiles) -> dict:
    path = os.path.join(files.directory, "generation_config.json")
    if files.gguf_file or not os.path.isfile(path):
        return {}
    return _json_object(path)


def _generation_config_eos(files: ModelFiles):
    return _generation_config(files).get("eos_token_id")
