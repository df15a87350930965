"""What a ``sip adapt`` run shows of itself: the validation grid (txt2img of every class from the current
weights, one row per class, the same seed at every step so grids compare) and the model card of the output."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sip.data.durable import atomic_write


@torch.no_grad()
def validation_images(pipe: Any, method: Any, prompts: list[str], config: Any) -> list[list[Image.Image]]:
    """``config.per_class`` txt2img images per prompt, encoded through the method's trainable parts."""
    from diffusers import AutoPipelineForText2Image

    txt2img = AutoPipelineForText2Image.from_pipe(pipe)
    txt2img.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    ids = tok(prompts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.unet.device)
    hidden = method.encode(ids).to(pipe.unet.dtype)
    rows = []
    for i in range(len(prompts)):
        n = config.per_class
        gens = [torch.Generator().manual_seed(config.seed * 1000 + i * 100 + j) for j in range(n)]
        out = txt2img(prompt_embeds=hidden[i:i + 1].expand(n, -1, -1),
                      negative_prompt_embeds=hidden[-1:].expand(n, -1, -1), num_inference_steps=config.steps,
                      guidance_scale=config.guidance_scale, generator=gens, output_type="pil")
        rows.append(list(out.images))
    return rows


def save_grid(pipe: Any, method: Any, prompts: list[str], config: Any, path: Path) -> Path:
    """Write the validation grid (one row per class) as a PNG, atomically."""
    rows = validation_images(pipe, method, prompts, config)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def write_model_card(out: Path, info: dict[str, Any]) -> Path:
    """README.md of the adapted model: base, method, how to load it with diffusers, and every shot it learned."""
    method, base = info["method"], info["base"]
    load = {"textual_inversion": "\n".join(f'pipe.load_textual_inversion("{out}/embeddings/<label>", token="{t}")'
                                           for t in list(info["tokens"].values())[:3]),
            "lora": f'pipe.load_lora_weights("{out}")',
            "finetune": f'pipe = StableDiffusionPipeline.from_pretrained("{out}/pipeline")'}[method]
    if info.get("per_class"):  # one LoRA per class: load the one of the class to draw
        load = "\n".join(f'pipe.load_lora_weights("{out}/{rel}")  # {label}'
                          for label, rel in list(info["per_class"].items())[:3]) + "\n# ... one folder per class"
    lines = [f"# {method} adapter of {base.get('model')}", "",
             f"Written by `sip adapt` ({info['step']} steps). Base weights SHA-256: {base.get('weights_sha256')}.", "",
             "Trained: " + ", ".join(info.get("trained") or ["?"]) + ".", "",
             "Load it with diffusers alone:", "", "```python", load, "```", "",
             f"or with sip: `sip augment --set generate.adapter={out}` / `sip synth --set generate.adapter={out}`.",
             "", "Prompts: " + ", ".join(f"{c} → \"{info['template'].format(label=n)}\"" for c, n in info["names"].items()),
             "", f"## Shots ({len(info['shots'])})", ""]
    lines += [f"- {s['label']}: {s['source_id']}" for s in info["shots"]]
    prior = (info.get("config") or {}).get("prior") or {}
    if prior.get("per_prompt"):
        lines += ["", f"## Prior preservation (weight {prior['weight']})", "",
                  f"The base model's own {prior['per_prompt']} images of each prompt, replayed every step:", ""]
        lines += [f"- \"{q}\"" for q in prior["prompts"]]
    path = out / "README.md"
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
