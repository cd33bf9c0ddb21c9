"""Train a HydraLoRA model with TRL's `SFTTrainer`.

    from trl import SFTConfig
    from hydralora import HydraLoraConfig, add_hydralora, save_adapter
    from hydralora.integrations.trl import HydraSFTTrainer

    model = add_hydralora(AutoModelForCausalLM.from_pretrained(BASE),
                          HydraLoraConfig.from_preset("recommended"))
    trainer = HydraSFTTrainer(model=model, args=SFTConfig(output_dir="out", completion_only_loss=True),
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    save_adapter(model, "out/adapter")

`HydraSFTTrainer` is TRL's SFTTrainer with `hydralora.train.integration.HydraLoraTrainerMixin`,
the same mixin `hydralora train` uses: the routing context of every batch, the balance (and
guide) loss scaled for gradient accumulation as the Trainer scales the language-model loss,
the routers' learning-rate group (default: the adapter's preset's multiplier) and router
statistics in the logs. The mixin works with any other Trainer subclass too:
`class MyTrainer(HydraLoraTrainerMixin, MyBaseTrainer)`. trl is imported only by this module.
"""

from __future__ import annotations

from trl import SFTTrainer

from ..train.integration import HydraLoraTrainerMixin

__all__ = ["HydraLoraTrainerMixin", "HydraSFTTrainer"]


class HydraSFTTrainer(HydraLoraTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with HydraLoRA's routing context, loss terms, router lr and logs."""
