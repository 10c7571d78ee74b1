"""Named base models: the paper's three (hub ids + their 260-adapter collections) and the embedded default."""

from __future__ import annotations

from dataclasses import dataclass

from logo.errors import LogoError

LOGO_ADAPTER_REPO = "archon159/LoGo-loras-collection"


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None
    """Hub id of the base model (None for the embedded default)."""
    default_adapters: str | None
    """Default ``--adapters`` spec for this model."""
    signal_layer: int = -1
    signal_module: str = "q_proj"


PRESETS: dict[str, Preset] = {
    "Llama-3.1-8B": Preset(
        "Llama-3.1-8B", "meta-llama/Llama-3.1-8B", f"hub:{LOGO_ADAPTER_REPO}/Llama-3.1-8B-loras-flanv2/flanv2."
    ),
    "Qwen2.5-7B": Preset(
        "Qwen2.5-7B", "Qwen/Qwen2.5-7B", f"hub:{LOGO_ADAPTER_REPO}/Qwen2.5-7B-loras-flanv2/flanv2."
    ),
    "deepseek-llm-7b-base": Preset(
        "deepseek-llm-7b-base",
        "deepseek-ai/deepseek-llm-7b-base",
        f"hub:{LOGO_ADAPTER_REPO}/deepseek-llm-7b-base-loras-flanv2/flanv2.",
    ),
    "smollm2-135m": Preset("smollm2-135m", None, "embedded:demo"),
}


def get_preset(name: str) -> Preset | None:
    """Return the preset called ``name`` (case-insensitive), or None."""
    for key, preset in PRESETS.items():
        if key.lower() == name.lower():
            return preset
    return None


def default_adapters(name: str) -> str:
    """The ``--adapters`` spec of preset ``name``; an error for a model that has no default library."""
    preset = get_preset(name)
    if preset is None or preset.default_adapters is None:
        raise LogoError(f"--adapters is required for {name!r} (it has no default adapter library)")
    return preset.default_adapters
