"""A synthetic task where the right answer is known: do the heads pay once routing is right?

T tasks share one low-rank input subspace A* (r x d) and differ in their output maps B*_t:
the ideal update of task t is dW_t = B*_t A*. A task is marked only by its input
distribution: x = mu_t + noise. One HydraLoRA layer (k = T heads, rank r) can represent every
task exactly if each example reaches its own head; a LoRA of any rank is one linear map for all
tasks and cannot (its error is bounded below by the best single linear map, computed here in
closed form by least squares). Variants, all trained with Adam on the same data:

    oracle          gates one-hot by the true task (the upper bound of routing)
    learned         the paper's per-token softmax router on x
    guided          learned router + a loss pulling each example's gates toward its k-means
                    cluster (clusters of x, found without the task labels)
    sequence        one gate vector per example (here an example is one token: as learned)
    lora r          one head (k = 1)
    lora equal      a LoRA with as many parameters as HydraLoRA

Runs in seconds on a CPU: `python benchmarks/mechanism.py` prints, per variant, the held-out
relative error (squared error / squared norm of the ideal update's output) and for the oracle
the per-task error of the recovered update. `tests/test_mechanism.py` asserts the mechanism.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from hydralora import HydraLoraConfig, HydraLoraLinear, RoutingContext


@dataclass
class Tasks:
    """Inputs x (N, d), targets y (N, o) = dW_task x, task labels (N,), the true updates."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor
    updates: torch.Tensor  # (T, o, d)
    x_test: torch.Tensor
    y_test: torch.Tensor
    task_test: torch.Tensor


def make_tasks(num_tasks: int = 4, d: int = 32, o: int = 24, r: int = 4, n: int = 256,
               separation: float = 4.0, seed: int = 0) -> Tasks:
    g = torch.Generator().manual_seed(seed)
    a_star = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T  # (r, d), orthonormal rows
    b_star = torch.randn(num_tasks, o, r, generator=g)  # (T, o, r)
    updates = b_star @ a_star  # (T, o, d): shared row space, different B
    means = torch.linalg.qr(torch.randn(d, num_tasks, generator=g))[0].T * separation  # (T, d)

    def sample(count: int):
        task = torch.arange(num_tasks).repeat_interleave(count)
        x = means[task] + torch.randn(len(task), d, generator=g)
        y = torch.einsum("nod,nd->no", updates[task], x)
        return x, y, task

    x, y, task = sample(n)
    x_test, y_test, task_test = sample(n // 4)
    return Tasks(x, y, task, updates, x_test, y_test, task_test)


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target) ** 2).sum() / (target ** 2).sum())


def best_single_map_error(t: Tasks) -> float:
    """Held-out relative error of the least-squares linear map fitted to all tasks at once: no
    LoRA (of any rank) can do better on average, since a LoRA is one linear map."""
    m = torch.linalg.lstsq(t.x, t.y).solution  # (d, o)
    return relative_error(t.x_test @ m, t.y_test)


def make_layer(t: Tasks, heads: int, r: int, seed: int, **cfg) -> HydraLoraLinear:
    torch.manual_seed(seed)
    d, o = t.x.shape[1], t.y.shape[1]
    base = nn.Linear(d, o, bias=False)
    nn.init.zeros_(base.weight)  # W0 = 0: the layer's output is its update
    config = HydraLoraConfig(r=r, alpha=float(r), num_heads=heads, dropout=0.0,
                             init_heads="random", target_modules=["x"], **cfg)
    return HydraLoraLinear(base, config)


def train(layer: HydraLoraLinear, t: Tasks, steps: int, lr: float, oracle: bool = False,
          guide_labels: torch.Tensor | None = None, guide_weight: float = 0.0,
          router_lr_multiplier: float = 10.0) -> HydraLoraLinear:
    k = layer.num_heads
    params = [layer.lora_A, layer.lora_B]
    groups = [{"params": params, "lr": lr}]
    if layer.router is not None:
        groups.append({"params": [layer.router], "lr": lr * router_lr_multiplier})
    opt = torch.optim.Adam(groups)
    layer.train()
    forced = nn.functional.one_hot(t.task, k).float() if oracle else None
    for _ in range(steps):
        with RoutingContext(forced_gates=forced, labels=guide_labels,
                            example_gates=guide_weight > 0) as routing:
            loss = ((layer(t.x) - t.y) ** 2).mean()
        loss = loss + routing.aux_loss(guide_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    return layer


@torch.no_grad()
def held_out_error(layer: HydraLoraLinear, t: Tasks, oracle: bool = False) -> float:
    forced = nn.functional.one_hot(t.task_test, layer.num_heads).float() if oracle else None
    with RoutingContext(forced_gates=forced):
        return relative_error(layer(t.x_test), t.y_test)


@torch.no_grad()
def recovered_update_errors(layer: HydraLoraLinear, t: Tasks) -> list[float]:
    """Per task: ||scaling * B_t A - dW_t|| / ||dW_t|| of head t (oracle routing)."""
    errors = []
    for i in range(t.updates.shape[0]):
        delta = layer.delta_weight(nn.functional.one_hot(torch.tensor(i), layer.num_heads).float())
        errors.append(float((delta - t.updates[i]).norm() / t.updates[i].norm()))
    return errors


def equal_rank(t: Tasks, heads: int, r: int) -> int:
    """The LoRA rank with (about) as many parameters as HydraLoRA: r*d + k*o*r + k*d."""
    d, o = t.x.shape[1], t.y.shape[1]
    return max(1, round((r * d + heads * o * r + heads * d) / (d + o)))


def run(steps: int = 600, lr: float = 2e-2, seed: int = 0, num_tasks: int = 4, r: int = 4) -> dict:
    t = make_tasks(num_tasks=num_tasks, r=r, seed=seed)
    k = num_tasks
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(t.x.numpy())
    cluster_labels = torch.as_tensor(clusters.labels_, dtype=torch.long)
    rows: dict[str, dict] = {}
    oracle = train(make_layer(t, k, r, seed), t, steps, lr, oracle=True)
    rows["oracle"] = {"error": held_out_error(oracle, t, oracle=True),
                      "update_errors": recovered_update_errors(oracle, t)}
    rows["learned"] = {"error": held_out_error(train(make_layer(t, k, r, seed), t, steps, lr), t)}
    guided = train(make_layer(t, k, r, seed), t, steps, lr, guide_labels=cluster_labels, guide_weight=1.0)
    rows["guided"] = {"error": held_out_error(guided, t)}
    rows[f"lora r={r}"] = {"error": held_out_error(train(make_layer(t, 1, r, seed), t, steps, lr), t)}
    r_eq = equal_rank(t, k, r)
    rows[f"lora r={r_eq} (equal params)"] = {
        "error": held_out_error(train(make_layer(t, 1, r_eq, seed), t, steps, lr), t)}
    purity = float(np.mean([np.bincount(t.task.numpy()[cluster_labels.numpy() == c]).max()
                            / max((cluster_labels == c).sum().item(), 1) for c in range(k)]))
    return {"rows": rows, "best_single_map": best_single_map_error(t), "cluster_purity": purity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results = [run(steps=args.steps, seed=s) for s in args.seeds]
    names = list(results[0]["rows"])
    print(f"held-out relative error (lower is better), seeds {args.seeds}:")
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---" * (len(args.seeds) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r['rows'][name]['error']:.4f}" for r in results) + " |")
    print("| best single linear map (bound for any LoRA) | "
          + " | ".join(f"{r['best_single_map']:.4f}" for r in results) + " |")
    for s, r in zip(args.seeds, results):
        errs = ", ".join(f"{e:.3f}" for e in r["rows"]["oracle"]["update_errors"])
        print(f"seed {s}: oracle heads recover the task updates to relative error {errs}; "
              f"k-means purity of the inputs {r['cluster_purity']:.3f}")


if __name__ == "__main__":
    main()
