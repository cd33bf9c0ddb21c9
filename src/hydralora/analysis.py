"""What the router learned, and the paper's Fig. 3 question (are A matrices shared across
domains while B matrices differ?) asked of our own data.

Outputs of `hydralora analyze` (PNG files and analysis.json):
  router_heatmap.png  mean gate per head and domain: averaged over layers (left) and per layer
                      (right, one block of k columns per domain); gate entropy per domain
  ab_similarity.png   per adapted layer, the mean pairwise similarity across domains of the
                      LoRA A matrices and of the B matrices (cosine of the flattened matrices
                      and overlap of the subspaces they span), plus a PCA picture
The A/B comparison uses LoRAs trained separately on each domain with the same seed (so they
start from the same A, as the paper's separately trained LoRAs can be compared), trained here
(`--per-domain-steps`) or given (`--domain-lora NAME=DIR`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import load_file
from sklearn.decomposition import PCA

from .commands.analyze import AnalyzeOptions
from .config import HydraLoraConfig
from .data.words import names_a_mixture, resolve_words
from .files import CONFIG_NAME, atomic_write, write_json
from .folders import claim, owned_folder
from .hub import resolve_adapter
from .data import load_examples, tokenize_examples
from .errors import ConfigError
from .info import adapter_kind
from .methods import load_model_with_adapter
from .routing.stats import gates_by_domain, router_report


def plot_router(report: dict[str, Any], path: Path) -> None:
    domains, layers, k = report["domains"], report["layers"], report["num_heads"]
    summary = np.array([report["mean_gate_by_domain"][d] for d in domains])  # (D, k)
    per_layer = np.array([[g for d in domains for g in report["per_layer"][l][d]] for l in layers])
    fig = Figure(figsize=(12, max(4, 0.12 * len(layers) + 2)))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    im = ax1.imshow(summary, cmap="viridis", vmin=0, vmax=max(summary.max(), 1e-6), aspect="auto")
    ax1.set_xticks(range(k), [f"head {i}" for i in range(k)])
    ax1.set_yticks(range(len(domains)),
                   [f"{d}\n(entropy {report['entropy_by_domain'][d] / max(report['max_entropy'], 1e-9):.2f})"
                    for d in domains])
    for (i, j), v in np.ndenumerate(summary):
        ax1.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax1.set_title("mean gate, averaged over layers")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    ax2.imshow(per_layer, cmap="viridis", vmin=0, vmax=max(per_layer.max(), 1e-6), aspect="auto",
               interpolation="nearest")
    ax2.set_xticks([i * k + (k - 1) / 2 for i in range(len(domains))], domains)
    for i in range(1, len(domains)):
        ax2.axvline(i * k - 0.5, color="w", lw=1)
    step = max(1, len(layers) // 20)
    ax2.set_yticks(range(0, len(layers), step), [layers[i].replace("model.layers.", "") for i in range(0, len(layers), step)],
                   fontsize=6)
    ax2.set_title(f"mean gate per layer: {k} heads per domain block "
                  f"(mean domain spread {report['domain_spread_mean']:.3f})")
    _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


# ---------------------------------------------------------------------------- A vs B
def read_peft_lora(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": (r, in), "B": (out, r)}} from a PEFT LoRA directory (safetensors)."""
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                out.setdefault(module, {})[part[-1]] = value.float()
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _subspace_overlap(a: torch.Tensor, b: torch.Tensor, rows: bool) -> float:
    """Mean squared cosine of the principal angles between the spans (1 = same subspace)."""
    ma, mb = (a.T, b.T) if rows else (a, b)  # columns span the subspace
    qa, _ = torch.linalg.qr(ma)
    qb, _ = torch.linalg.qr(mb)
    r = min(qa.shape[1], qb.shape[1])
    return float((qa.T @ qb).pow(2).sum() / r)


def ab_similarity(loras: dict[str, dict[str, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Per module: mean over domain pairs of A and B similarity (cosine and subspace overlap)."""
    domains = list(loras)
    modules = sorted(set.intersection(*(set(m) for m in loras.values())))
    pairs = list(combinations(domains, 2))
    per_module = {}
    for module in modules:
        a = {d: loras[d][module]["A"] for d in domains}
        b = {d: loras[d][module]["B"] for d in domains}
        per_module[module] = {
            "A_cos": float(np.mean([_cos(a[x], a[y]) for x, y in pairs])),
            "B_cos": float(np.mean([_cos(b[x], b[y]) for x, y in pairs])),
            "A_subspace": float(np.mean([_subspace_overlap(a[x], a[y], rows=True) for x, y in pairs])),
            "B_subspace": float(np.mean([_subspace_overlap(b[x], b[y], rows=False) for x, y in pairs])),
        }
    summary = {key: float(np.mean([m[key] for m in per_module.values()]))
               for key in ("A_cos", "B_cos", "A_subspace", "B_subspace")}
    return {"domains": domains, "modules": modules, "per_module": per_module, "summary": summary}


def plot_ab(result: dict[str, Any], loras: dict, path: Path) -> None:
    modules, domains = result["modules"], result["domains"]
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    x = np.arange(len(modules))
    for key, style in (("A_cos", "-o"), ("B_cos", "-s"), ("A_subspace", "--o"), ("B_subspace", "--s")):
        axes[0].plot(x, [result["per_module"][m][key] for m in modules], style, ms=3, label=key)
    axes[0].set_xlabel("adapted layer (in model order)")
    axes[0].set_ylabel("mean similarity across domain pairs")
    axes[0].set_title("A vs B similarity across domains")
    axes[0].legend(fontsize=8)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, part in ((axes[1], "A"), (axes[2], "B")):
        # one point per (domain, layer); each layer's matrices normalized so layers are comparable
        vecs, labels = [], []
        for d in domains:
            for m in modules:
                v = loras[d][m][part].flatten()
                vecs.append((v / v.norm().clamp_min(1e-12)).numpy())
                labels.append(d)
        width = min(len(v) for v in vecs)
        points = PCA(n_components=2, random_state=0).fit_transform(np.stack([v[:width] for v in vecs]))
        for i, d in enumerate(domains):
            sel = [j for j, lab in enumerate(labels) if lab == d]
            ax.scatter(points[sel, 0], points[sel, 1], s=10, color=colors[i % len(colors)], label=d)
        ax.set_title(f"PCA of the {part} matrices (point = domain x layer)")
        ax.legend(fontsize=8)
    _save_figure(fig, path)


ANALYSIS_FILES = ("router_heatmap.png", "analysis.json")
AB_FILE = "ab_similarity.png"


def run_analyze(opts: AnalyzeOptions, data: list[str],
                domain_loras: dict[str, str] | None = None) -> dict:
    """Router report of the adapter on `data` (files), and the A/B comparison of
    `domain_loras` (PEFT LoRA folders per domain) when given. Reads adapters; never trains.
    Files of those names in --output that the tool did not write are never replaced."""
    if adapter_kind(opts.adapter) != "hydralora":
        raise ConfigError(f"{opts.adapter}: analyze takes a HydraLoRA adapter (it studies the router)")
    names = [*ANALYSIS_FILES, *([AB_FILE] if domain_loras else [])]
    with owned_folder(Path(opts.output), names, opts.overwrite):
        return _analyze(opts, data, domain_loras)


def _analyze(opts: AnalyzeOptions, data: list[str], domain_loras: dict[str, str] | None) -> dict:
    out = Path(opts.output)
    model, tokenizer = load_model_with_adapter(opts.model, opts.adapter, dtype=opts.dtype, device=opts.device)
    features, _ = tokenize_examples(load_examples(data), tokenizer, opts.max_length, skip_overlong=True)
    if not any(f.get("domain") for f in features):
        print("note: the examples carry no 'domain' field; all are treated as one domain")
    report: dict[str, Any] = {"router": router_report(gates_by_domain(model, features, tokenizer.pad_token_id))}
    plot_router(report["router"], out / "router_heatmap.png")
    if domain_loras:
        loras = {d: read_peft_lora(p) for d, p in domain_loras.items()}
        report["ab"] = ab_similarity(loras)
        plot_ab(report["ab"], loras, out / "ab_similarity.png")
    write_json(out / "analysis.json", report, indent=1)
    r = report["router"]
    print(f"router: mean domain spread of the gates {r['domain_spread_mean']:.3f} "
          f"(0 = same routing for every domain, 1 = disjoint heads); normalized gate entropy "
          + ", ".join(f"{d} {e / max(r['max_entropy'], 1e-9):.2f}" for d, e in r["entropy_by_domain"].items()))
    if "ab" in report:
        s = report["ab"]["summary"]
        print(f"A vs B across domains: cosine A {s['A_cos']:.3f} vs B {s['B_cos']:.3f}; "
              f"subspace overlap A {s['A_subspace']:.3f} vs B {s['B_subspace']:.3f}")
    print(f"wrote {out / 'router_heatmap.png'}" + (f", {out / 'ab_similarity.png'}" if "ab" in report else "")
          + f", {out / 'analysis.json'}")
    return report


def run_analyze_command(opts: AnalyzeOptions) -> None:
    """`hydralora analyze`: first train the per-domain LoRAs when asked to, then analyze."""
    from .train.per_domain import train_domain_loras

    opts = dataclasses.replace(opts, adapter=str(resolve_adapter(opts.adapter)))  # a hub id: its snapshot
    out = Path(opts.output)
    loras = opts.domain_loras()
    train_loras = loras is None and opts.per_domain_steps > 0
    inputs = [*(["data"] if names_a_mixture(opts.data) else []), *(["per_domain"] if train_loras else [])]
    claim(out, [*ANALYSIS_FILES, *([AB_FILE] if loras or train_loras else []), *inputs], opts.overwrite)
    with owned_folder(out, inputs, overwrite=True) if inputs else contextlib.nullcontext():
        data = resolve_words(opts.data, out / "data", "test")
        if train_loras:
            adapter = HydraLoraConfig.from_json_file(Path(opts.adapter) / CONFIG_NAME)
            extra = {"batch_size": opts.batch_size, "lr": opts.lr, "skip_overlong": True, "max_length": 256}
            loras = {d: str(p) for d, p in train_domain_loras(
                opts.model, data, out, opts.per_domain_steps, opts.seed,
                adapter.target_modules, adapter.r, extra, overwrite=opts.overwrite).items()}
    run_analyze(opts, data, loras)
