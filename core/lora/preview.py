"""A LoRA file in a loaded pipeline, at a strength: the Prompt tab's engine, ``sample``, ``verify-lora``, ``merge``.

Every layout the app writes or people share is read here: kohya/A1111 and
diffusers LoRA files through diffusers' loaders, the flow families' original-
model layout through ``core.base.flow_names``, and LoHa / LoKr files (which
diffusers' loaders drop) through ``core.lora.adapters``.
"""

from __future__ import annotations

from pathlib import Path

from core.base.sample import generate, image_grid, load_pipeline


def apply_lora(pipe, lora_path: str | Path, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Load a LoRA file (kohya/A1111 or diffusers layout) into the pipeline at ``scale``."""
    path = Path(lora_path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    from safetensors.torch import load_file

    from core.base.sample import _flow_family
    from core.lora.adapters import is_lycoris, load_into

    tensors = load_file(str(path))
    if is_lycoris(tensors):  # LoHa / LoKr: diffusers' loaders drop them; peft's own layers apply them
        from core.base.families import detect_pipeline_family

        try:
            load_into(pipe, detect_pipeline_family(pipe), tensors, adapter_name)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
        return
    converted = None
    flow = _flow_family(pipe)
    if flow:  # sd-scripts' layout of the original model, read here at the pipeline's own layer widths
        from core.base.flow_names import for_diffusers

        converted = for_diffusers(pipe, flow, tensors)
    if converted is not None:
        pipe.load_lora_weights(converted, adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[scale])



class Previewer:
    """Keeps one pipeline loaded between generations (the Prompt tab's engine).

    The base model is reloaded only when it changes; LoRA files are loaded once
    each as named adapters and switched with their strength, so comparing
    checkpoints and strengths does not reload anything.
    """

    def __init__(self, device: str | None = None):
        self.device = device
        self.pipe = None
        self.model: str | None = None
        self.loads = 0  # how many times a base model was loaded (tests check reuse)
        self.adapters: dict[str, str] = {}  # LoRA file (path + mtime) -> adapter name

    def pipeline(self, model: str):
        if self.pipe is None or model != self.model:
            self.pipe = None  # free the old one before loading the next
            self.adapters.clear()
            self.pipe = load_pipeline(model, device=self.device)
            self.model = model
            self.loads += 1
        return self.pipe

    def _use_lora(self, lora: str | None, scale: float) -> None:
        pipe = self.pipe
        if not lora:
            if self.adapters:
                pipe.disable_lora()
            return
        path = Path(lora)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {path} does not exist")
        key = f"{path.resolve()}:{path.stat().st_mtime_ns}"
        if key not in self.adapters:
            import warnings

            name = f"lora{len(self.adapters)}"
            with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                apply_lora(pipe, path, scale, adapter_name=name)
            self.adapters[key] = name
        pipe.enable_lora()
        pipe.set_adapters([self.adapters[key]], adapter_weights=[scale])

    def generate(self, model: str, prompt: str, *, lora: str | None = None, scale: float = 1.0, seed: int = 0,
                 steps: int = 20, guidance_scale: float = 7.5, width: int = 512, height: int = 512,
                 negative_prompt: str = ""):
        pipe = self.pipeline(model)
        self._use_lora(lora, scale)
        return generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, width=width,
                        height=height, negative_prompt=negative_prompt)

    def grid(self, model: str, prompt: str, loras: list[str], scales: list[float], on_cell=None, **kwargs):
        """One image per (LoRA file, strength) at the same seed, as a labelled grid (rows: files);
        ``on_cell(done, total)`` after each picture."""
        cells, total = [], len(loras) * len(scales)
        for lora in loras:
            cells.append([])
            for scale in scales:
                cells[-1].append(self.generate(model, prompt, lora=lora, scale=scale, **kwargs))
                if on_cell is not None:
                    on_cell(sum(map(len, cells)), total)
        return image_grid(cells, [Path(p).stem for p in loras], [f"{s:g}" for s in scales])
