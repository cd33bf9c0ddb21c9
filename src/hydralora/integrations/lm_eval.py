"""Score a HydraLoRA (or PEFT LoRA) adapter with EleutherAI's lm-evaluation-harness.

    python -m hydralora.integrations.lm_eval --model hydralora \\
        --model_args pretrained=BASE,adapter=DIR --tasks mmlu,gsm8k --device cuda --batch_size 8

The harness has no plugin discovery for models (its registry only knows the modules it
ships), so its own `lm_eval` command cannot find `hydralora`; this module registers the model
class with `lm_eval.api.registry.register_model` when it is imported and then runs the
harness's command line unchanged (every flag of `lm_eval` works). From Python, import this
module and call `lm_eval.simple_evaluate(model="hydralora", model_args=...)`.

`HydraLoraLM` is the harness's `HFLM` with the adapter applied right after the base model is
loaded (before it is moved to the device): routing stays dynamic (per token, as in training),
batching, devices, dtypes and generation are the harness's own. `pretrained` also takes this
package's built-in names (`smollm2-135m`) and `.gguf` files; `adapter` a folder or a hub id.
Padding: the harness pads loglikelihood batches on the right without an attention mask; with
per-token routing (the default) real tokens are unaffected, with `routing="sequence"` the
pooled prompt would include the padding, so such adapters are scored one example at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..base_models import resolve_model_path
from ..config import HydraLoraConfig
from ..errors import ConfigError
from ..hub import resolve_adapter
from ..files import CONFIG_NAME
from ..info import adapter_kind
from ..methods import METHODS
from ..routing.context import RoutingContext

__all__ = ["HydraLoraLM", "main"]


@register_model("hydralora")
class HydraLoraLM(HFLM):
    """HFLM with a HydraLoRA or PEFT LoRA adapter (`adapter=DIR or hub id`)."""

    def __init__(self, pretrained: Any = None, adapter: str | None = None, **kwargs: Any):
        self._adapter = str(resolve_adapter(adapter)) if adapter else None
        self._adapter_kind = adapter_kind(self._adapter) if self._adapter else None
        if self._adapter_kind == "lora-split":
            raise ConfigError(f"{adapter}: a LoRA-Split folder routes whole prompts to separate "
                              "adapters; score one of its adapters, or use `hydralora eval`")
        if isinstance(pretrained, str):
            path, extra = resolve_model_path(pretrained)
            pretrained = path
            if "gguf_file" in extra:
                kwargs.setdefault("gguf_file", extra["gguf_file"])
        if self._adapter_kind == "hydralora" and \
                HydraLoraConfig.from_json_file(Path(self._adapter) / CONFIG_NAME).routing == "sequence":
            kwargs["batch_size"] = 1  # see the module docstring: padding would enter the pool
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, *args: Any, **kwargs: Any) -> None:
        super()._create_model(pretrained, *args, **kwargs)
        if self._adapter:
            self._model, _ = METHODS[self._adapter_kind].load(self._model, Path(self._adapter))
            self._model.eval()

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """The harness's generation inside one routing context per call: sequence routing pools
        the prompt (its attention mask) once and every decoding step reuses those gates."""
        mask = generation_kwargs.get("attention_mask")
        with RoutingContext(prompt_mask=None if mask is None else mask.bool(), generation=True):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["hydralora_adapter"] = self._adapter
        return info


def main(argv: list[str] | None = None) -> None:
    """The harness's command line, with `--model hydralora` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
