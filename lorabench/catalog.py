"""The model and GPU catalogs: conf/model/*.yaml, conf/gpu/*.yaml, aliases, local config.json paths.

The YAML files are the same ones Hydra composes for the sweep runner (config groups ``model`` and ``gpu``),
so the planner and the runner read one source of truth.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from lorabench.architectures import spec_from_hf_config
from lorabench.errors import UserError, suggest
from lorabench.specs import GpuSpec, ModelSpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


#: libyaml's C loader parses the catalog ~10x faster than the pure-Python one (cold start of `plan`).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        doc = yaml.load(fh, Loader=_Loader)  # noqa: S506 - a safe loader
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a YAML mapping", "fix or remove the file")
    return doc


@functools.lru_cache(maxsize=None)
def _model_docs() -> dict[str, dict[str, Any]]:
    return {p.stem: _load_yaml(p) for p in sorted((CONF_DIR / "model").glob("*.yaml"))}


@functools.lru_cache(maxsize=None)
def _gpu_docs() -> dict[str, dict[str, Any]]:
    return {p.stem: _load_yaml(p) for p in sorted((CONF_DIR / "gpu").glob("*.yaml"))}


@functools.lru_cache(maxsize=None)
def _cpu_docs() -> dict[str, dict[str, Any]]:
    """Measured CPU entries (scripts/bench_cpu_device.py writes them), resolvable like GPUs."""
    return {p.stem: _load_yaml(p) for p in sorted((CONF_DIR / "cpu").glob("*.yaml"))}


def _alias_map(docs: dict[str, dict[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for name, doc in docs.items():
        names[name.lower()] = name
        for alias in doc.get("aliases") or []:
            names[str(alias).lower()] = name
    return names


def model_names() -> list[str]:
    """Catalog model names (file stems of conf/model/*.yaml)."""
    return list(_model_docs())


def model_aliases() -> dict[str, list[str]]:
    """name -> aliases."""
    return {n: [str(a) for a in d.get("aliases") or []] for n, d in _model_docs().items()}


def _read_config_json(path: Path) -> tuple[dict[str, Any], str]:
    """The (language-model) config dict and a display name for it (see ``config_display_name``)."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no config.json at {path}", "pass a catalog model name or a path to a Hugging Face config.json")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})",
                        "pass an unmodified Hugging Face config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file} does not hold a JSON object", "pass a Hugging Face config.json")
    display = config_display_name(cfg, file)
    # Multimodal/wrapped configs keep the language model under text_config.
    if "model_type" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    return cfg, display


_HEX_FOLDER = re.compile(r"[0-9a-f]{12,}")


def config_display_name(cfg: dict[str, Any], file: Path) -> str:
    """How a local config.json is titled: the first of

    1. its ``_name_or_path`` / ``name_or_path`` (written by ``save_pretrained``) when it is a hub id or a
       folder name, not an absolute path;
    2. ``org/name`` from a Hugging Face cache folder ``models--org--name/snapshots/<sha>/``;
    3. the file's own name when it is not ``config.json`` (``llama-8b.json`` -> ``llama-8b``), else its
       folder's name, unless that is a bare commit hash;
    4. ``architectures[0]`` (``LlamaForCausalLM``), else ``model_type``.
    """
    for key in ("_name_or_path", "name_or_path"):
        value = str(cfg.get(key) or "").strip().rstrip("/")
        if value and not value.startswith(("/", ".", "~")) and value.count("/") <= 1:
            return value
    parts = file.resolve().parts
    for part in reversed(parts[:-1]):
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    if file.name != "config.json":
        return file.stem
    folder = file.resolve().parent.name
    if folder and not _HEX_FOLDER.fullmatch(folder):
        return folder
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else str(cfg.get("model_type", "config.json"))


def load_model(name_or_path: str) -> ModelSpec:
    """Resolve a catalog name, an alias (``7b``) or a local config.json path/folder to a ModelSpec.

    Raises:
        UserError: unknown name (with close suggestions), missing or malformed config.json.
    """
    key = name_or_path.strip()
    docs = _model_docs()
    aliases = _alias_map(docs)
    if key.lower() in aliases:
        name = aliases[key.lower()]
        doc = docs[name]
        return spec_from_hf_config(doc["hf_config"], name=name, display=str(doc.get("display", name)))
    path = Path(key).expanduser()
    if path.exists() or key.endswith(".json") or "/" in key:
        cfg, display = _read_config_json(path)
        return spec_from_hf_config(cfg, name=str(path), display=display)
    raise suggest(key, list(aliases), "model")


def gpu_names() -> list[str]:
    return list(_gpu_docs())


def load_gpu(name: str) -> GpuSpec:
    """Resolve a GPU catalog name or alias (``h100``), or a measured CPU entry from conf/cpu/."""
    docs = {**_gpu_docs(), **_cpu_docs()}
    aliases = _alias_map(docs)
    if name.strip().lower() not in aliases:
        raise suggest(name, list(aliases), "GPU")
    key = aliases[name.strip().lower()]
    return gpu_from_doc(key, docs[key])


_GPU_FLOAT_FIELDS = ("fp16_flops_per_s", "fp32_flops_per_s", "interconnect_bidirectional_bytes_per_s",
                     "pcie_bidirectional_bytes_per_s", "usd_per_hour", "kernel_overhead_s")
_GPU_STR_FIELDS = ("interconnect", "price_date", "price_source", "spec_source", "kind")


def gpu_from_doc(key: str, doc: dict[str, Any]) -> GpuSpec:
    """A GpuSpec from one catalog YAML document (optional fields keep the dataclass defaults)."""
    extra: dict[str, Any] = {f: float(doc[f]) for f in _GPU_FLOAT_FIELDS if doc.get(f) is not None}
    extra.update({f: str(doc[f]) for f in _GPU_STR_FIELDS if doc.get(f) is not None})
    if doc.get("nvlink_domain_gpus") is not None:
        extra["nvlink_domain_gpus"] = int(doc["nvlink_domain_gpus"])
    return GpuSpec(
        name=key,
        memory_bytes=int(doc["memory_bytes"]),
        bf16_flops_per_s=float(doc["bf16_flops_per_s"]),
        memory_bandwidth_bytes_per_s=float(doc["memory_bandwidth_bytes_per_s"]),
        display=str(doc.get("display", key)),
        aliases=tuple(str(a) for a in doc.get("aliases") or []),
        **extra,
    )


def all_gpus() -> list[GpuSpec]:
    """Every catalog GPU, smallest memory first."""
    return sorted((load_gpu(n) for n in gpu_names()), key=lambda g: g.memory_bytes)
