"""The model card (`README.md`) of every export, with the metadata header the Hugging Face Hub
reads (library_name, tags, pipeline_tag).

`save_export` writes the card from the export's `dedt_model.json` (label space, compute); a
stage adds what it knows with `update_card(store, model, {"Section": markdown})` — the train
stage the data selection and class weights, the evaluate stage the metrics. A section of the
same title is replaced, so a rerun never repeats one. The card is documentation: it is not
among the export's checksummed files.
"""

from __future__ import annotations

import re
from typing import Any

from dedt_ray.store import RunStore

CARD = "README.md"
SECTION_ORDER = ("Model", "Usage", "Data selection", "Class weights", "Training compute", "Metrics")


def header(info: dict[str, Any]) -> str:
    tags = ["diffusers", "dedt-ray", "image-generation", "data-efficient-training"]
    tags.append("class-conditional" if info.get("num_classes") else "unconditional")
    if info.get("latent"):
        tags.append("latent-diffusion")
    lines = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation"]
    lines += ["tags:", *(f"- {t}" for t in tags), "---"]
    return "\n".join(lines)


def model_section(info: dict[str, Any]) -> str:
    classes = info.get("classes")
    k = int(info.get("num_classes") or 0)
    size, channels = info.get("sample_size"), info.get("channels")
    space = "latents" if info.get("latent") else "pixels"
    text = f"A diffusion model of {size} x {size} {space} with {channels} channel(s), "
    if k:
        names = ", ".join(str(c) for c in classes) if classes else f"0..{k - 1}"
        text += f"conditioned on {k} classes ({names}); class {k} is the null class of "
        text += "classifier-free guidance."
    else:
        text += "unconditional."
    return text


def usage_section(info: dict[str, Any]) -> str:
    call = (
        "class_labels=[0, 1, 2], guidance_scale=2.0"
        if info.get("num_classes")
        else ("batch_size=4")
    )
    return (
        "```python\n"
        "from diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)\n'
        f'images = pipe({call}, scheduler="ddim", num_inference_steps=50).images\n'
        "```\n\n"
        "`trust_remote_code=True` runs this folder's `pipeline_dedt_ray.py`, one import of "
        "`dedt_ray.diffusion.pipeline.DedtRayPipeline` (`pip install dedt-ray`); "
        "`DedtRayPipeline.from_pretrained(path)` needs no remote code. The command line: "
        "`dedt-ray sample --model path/to/this/folder`."
    )


def compute_section(info: dict[str, Any]) -> str:
    rows = [
        ("optimizer steps", info.get("steps")),
        ("images processed", info.get("images_seen")),
        ("training FLOPs (forward + backward, measured)", info.get("flops")),
        ("EMA decay", info.get("ema_decay")),
    ]
    return table([(k, v) for k, v in rows if v is not None])


def metrics_section(result: dict[str, Any]) -> str:
    """The evaluate stage's metrics.json as a card section."""
    space = result.get("feature_space", {})
    sampling = result.get("sampling", {})
    samples = result.get("samples", {})
    note = (
        "FID proper (Inception-v3 pool3, pytorch-fid weights)"
        if space.get("kind") == "inception"
        else f"a Frechet distance in the `{space.get('name')}` classifier's feature space, not FID"
    )
    rows = [(k, v) for k, v in (result.get("metrics") or {}).items() if v is not None]
    return (
        f"`{result.get('metric')}` is {note}; {samples.get('generated')} generated vs "
        f"{samples.get('real')} real images, {sampling.get('scheduler')} "
        f"{sampling.get('num_inference_steps')} steps, guidance "
        f"{sampling.get('guidance_scale')} (dedt-ray `evaluate`).\n\n"
        + table(rows, ("metric", "value"))
    )


def table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("quantity", "value")) -> str:
    """A two-column markdown table."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(info: dict[str, Any], sections: dict[str, str]) -> str:
    """The whole card: header, title, then the sections in `SECTION_ORDER` (others after)."""
    title = f"# {info.get('title') or 'dedt-ray diffusion model'}"
    order = [s for s in SECTION_ORDER if s in sections]
    order += [s for s in sections if s not in SECTION_ORDER]
    body = "\n\n".join(f"## {name}\n\n{sections[name].strip()}" for name in order)
    return f"{header(info)}\n\n{title}\n\n{body}\n"


def initial_sections(info: dict[str, Any]) -> dict[str, str]:
    """What an export itself tells: the model, how to sample it, its training compute."""
    sections = {"Model": model_section(info), "Usage": usage_section(info)}
    if info.get("flops") is not None or info.get("steps") is not None:
        sections["Training compute"] = compute_section(info)
    return sections


def parse_sections(text: str) -> dict[str, str]:
    """The `## Title` sections of a card, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def update_card(
    store: RunStore, model: tuple[str, ...], sections: dict[str, str], info: dict[str, Any]
) -> None:
    """Add or replace `sections` of the card of the export at `<run>/<model>`."""
    current = store.read_bytes(*model, CARD).decode() if store.exists(*model, CARD) else ""
    merged = {**(parse_sections(current) or initial_sections(info)), **sections}
    store.write_text(render(info, merged), *model, CARD)
