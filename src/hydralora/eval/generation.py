"""Batched greedy generation with left padding and the KV cache, chat template applied."""

from __future__ import annotations

import torch

from ..data import bos_ids, render_prompt
from ..dist import progress
from ..routing.context import RoutingContext


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """The model's answer to each conversation (greedy unless `do_sample`).

    `adapter_names` (LoRA-Split) gives the PEFT adapter of each conversation; a batch may mix them.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow the prompt directly
    bos = tokenizer.decode(bos_ids(tokenizer))  # as in training (plain-template models only)
    texts = [bos + render_prompt(c, tokenizer) for c in conversations]
    answers: list[str] = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    try:
        for start in progress(range(0, len(order), batch_size), "generating", unit="batch"):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            extra = {"adapter_names": [adapter_names[i] for i in idx]} if adapter_names else {}
            # one routing context per generate call: sequence routing pools the prompt once and
            # every decoding step reuses its gates
            with RoutingContext(prompt_mask=enc["attention_mask"].bool(), generation=True):
                out = model.generate(
                    **enc,
                    **extra,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=None,
                    top_k=None,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
