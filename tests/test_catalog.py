"""Exact parameter counts: every catalog model against transformers built on the meta device."""

from __future__ import annotations

import json

import pytest

from lorabench.catalog import load_gpu, load_model, model_names
from lorabench.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _kind(name: str) -> str:
    if "lm_head" in name:
        return "lm_head"
    if any(k in name for k in ("embed_tokens", "wte", "wpe")):
        return "embeddings"
    if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
        return "norms"
    if "self_attn" in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise AssertionError(f"unclassified parameter {name}")


def _hf_counts(spec) -> dict[str, int]:  # type: ignore[no-untyped-def]
    cfg = transformers.AutoConfig.for_model(**spec.hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    counts = {k: 0 for k in ("embeddings", "attention", "mlp", "norms", "lm_head")}
    for name, p in model.named_parameters():  # tied weights appear once
        counts[_kind(name)] += p.numel()
    return counts


@pytest.mark.parametrize("name", model_names())
def test_params_by_kind_equal_transformers(name: str) -> None:
    spec = load_model(name)
    assert spec.params_by_kind() == _hf_counts(spec)


def test_reference_totals() -> None:
    expected = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
                "qwen2.5-7b": 7_615_616_512, "llama-65b": 65_285_660_672}
    for name, total in expected.items():
        assert load_model(name).total_params == total


def test_aliases_resolve() -> None:
    assert load_model("7b").name == "llama-2-7b"
    assert load_model("70b").name == "llama-2-70b"
    assert load_model("13B").name == "llama-2-13b"
    assert load_gpu("h100").name == "h100-80gb"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError, match="did you mean 'llama-2-7b'"):
        load_model("llama-2-7")


def test_config_json_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = dict(load_model("tiny-llama").hf_config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(str(tmp_path))
    assert spec.total_params == load_model("tiny-llama").total_params
    assert load_model(str(tmp_path / "config.json")).total_params == spec.total_params


@pytest.mark.parametrize("rel, extra, title", [
    ("Meta-Llama-3-8B/config.json", {}, "Meta-Llama-3-8B"),
    ("Meta-Llama-3-8B/config.json", {"_name_or_path": "meta-llama/Meta-Llama-3-8B"}, "meta-llama/Meta-Llama-3-8B"),
    ("x/config.json", {"_name_or_path": "/home/me/ckpt/llama"}, "x"),
    ("hub/models--meta-llama--Llama-3.1-8B/snapshots/0e9e39f249a16976918f6564b8830bc894c89659/config.json", {},
     "meta-llama/Llama-3.1-8B"),
    ("0e9e39f249a16976918f6564b8830bc894c89659/config.json", {}, "LlamaForCausalLM"),
    ("configs/my-llama.json", {}, "my-llama"),
])
def test_config_json_title(tmp_path, rel: str, extra: dict, title: str) -> None:  # type: ignore[no-untyped-def]
    """`plan --model path` names the model from the config or its folder, never "config.json"."""
    cfg = dict(load_model("tiny-llama").hf_config, architectures=["LlamaForCausalLM"], **extra)
    file = tmp_path / rel
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps(cfg))
    assert load_model(str(file)).display == title
    if file.name == "config.json":
        assert load_model(str(file.parent)).display == title


def test_malformed_config_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UserError, match="lacks a valid field"):
        load_model(str(bad))
    bad.write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="not supported"):
        load_model(str(bad))


def test_unknown_gpu() -> None:
    with pytest.raises(UserError, match="unknown GPU"):
        load_gpu("h1000")
