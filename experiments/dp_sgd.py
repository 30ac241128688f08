"""DP-SGD on digits: per-example gradient clipping and Gaussian noise against plain SGD.

Question: what do per-example clipping (bound C on each example's gradient norm) and Gaussian
noise (standard deviation sigma * C on the summed gradient) cost in test accuracy and in time,
for a small MLP on the digits data set? Every configuration trains the same network
(64-128-10 ReLU MLP, standardised inputs, SGD with a constant learning rate, batch 64, shuffled
batches, last partial batch dropped) for the same number of epochs and seeds; only the gradient
aggregation differs:

* ``sgd``: the mean of the batch's gradients (``jax.grad`` of the mean loss);
* ``clip C``: ``jaxnet.dp_aggregate`` with ``noise_multiplier=0``: mean of clipped per-example
  gradients;
* ``dp C, sigma``: ``jaxnet.dp_aggregate``: clipped per-example gradients, summed, plus
  ``N(0, (sigma C)^2)`` noise, divided by the batch size (Abadi et al., 2016).

No privacy accounting is done (epsilon is not reported): the batches are shuffled rather than
Poisson-sampled, and the point here is the optimisation cost of the mechanism.

Run from the repository root:

    python experiments/dp_sgd.py            # full: 7 configurations x 5 seeds, ~1 minute
    python experiments/dp_sgd.py --quick    # smoke test

Writes ``experiments/results/dp_sgd/``: ``results.json``, ``results.md``, ``dp_sgd.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import common
import jaxnet as jn
from jaxnet.losses import softmax_cross_entropy
from jaxnet.models import mlp
from jaxnet.app.run import RunConfig, load_data


@dataclasses.dataclass(frozen=True)
class Settings:
    # (name, clip norm C or None for plain SGD, noise multiplier sigma)
    configs: tuple = (("sgd", None, 0.0), ("clip 1", 1.0, 0.0), ("dp 1, 0.5", 1.0, 0.5),
                      ("dp 1, 1", 1.0, 1.0), ("clip 4", 4.0, 0.0), ("dp 4, 0.5", 4.0, 0.5),
                      ("dp 4, 1", 4.0, 1.0))
    seeds: int = 5
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.1
    hidden: int = 128
    out: str = "dp_sgd"


def parse_settings() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, 3 configurations")
    args = parser.parse_args()
    settings = Settings(seeds=args.seeds, epochs=args.epochs, lr=args.lr)
    if args.quick:
        settings = dataclasses.replace(settings, seeds=2, epochs=3, out="dp_sgd/quick",
                                       configs=Settings.configs[:3])
    return settings


def make_epoch(net, n_train: int, batch_size: int, dp: bool):
    """One jitted epoch: shuffle, then ``lax.scan`` over ``n_train // batch_size`` SGD steps.

    C, sigma and the learning rate are arguments, so one program serves every DP configuration.
    Returns ``(params, mean per-example gradient norm, fraction of examples clipped)``.
    """
    steps = n_train // batch_size

    def step(params, batch, x, y, lr, max_norm, noise):
        index, key = batch
        xb, yb = x[index], y[index]  # (batch, 8, 8, 1), (batch,)
        if dp:
            grads = jn.per_example_grads(net, params, xb, yb)
            norms = jn.per_example_norms(grads)  # (batch,)
            grad = jn.dp_aggregate(grads, max_norm=max_norm, noise_multiplier=noise, key=key)
            stats = jnp.stack([norms.mean(), (norms > max_norm).mean(dtype=jnp.float32)])
        else:
            grad = jax.grad(lambda p: softmax_cross_entropy(net.apply(p, xb), yb).mean())(params)
            stats = jnp.zeros(2, jnp.float32)
        return jax.tree.map(lambda p, g: p - lr * g, params, grad), stats

    @jax.jit
    def epoch(params, x, y, key, lr, max_norm, noise):
        order = jax.random.permutation(jax.random.fold_in(key, 0), n_train)
        batches = order[:steps * batch_size].reshape(steps, batch_size)
        keys = jax.random.split(jax.random.fold_in(key, 1), steps)
        body = functools.partial(step, x=x, y=y, lr=lr, max_norm=max_norm, noise=noise)
        params, stats = jax.lax.scan(body, params, (batches, keys))
        return params, stats.mean(axis=0)

    return epoch


def run_all(settings: Settings) -> list[dict]:
    data, _ = load_data(RunConfig(dataset="digits"))  # standardised like `jaxnet train`
    net = mlp((settings.hidden,), data.num_classes)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    accuracy = jax.jit(lambda p: (net.apply(p, x_test).argmax(-1) == y_test).mean())
    epochs = {dp: make_epoch(net, len(x), settings.batch_size, dp) for dp in (False, True)}
    records = []
    for name, max_norm, noise in settings.configs:
        epoch = epochs[max_norm is not None]
        for seed in range(settings.seeds):
            init_key, run_key = jax.random.split(jax.random.key(seed))
            params = net.init(init_key, data.x_train[:1])
            args = [jnp.float32(v) for v in (settings.lr, max_norm or 1.0, noise)]
            curve, norms, clipped, seconds = [], [], [], []
            for e in range(settings.epochs):
                start = time.perf_counter()
                params, stats = epoch(params, x, y, jax.random.fold_in(run_key, e), *args)
                stats = np.asarray(stats)  # waits for the epoch
                seconds.append(time.perf_counter() - start)
                curve.append(float(accuracy(params)))
                norms.append(float(stats[0]))
                clipped.append(float(stats[1]))
            records.append({"config": name, "max_norm": max_norm, "noise_multiplier": noise,
                            "seed": seed, "test_accuracy": curve, "mean_grad_norm": norms,
                            "fraction_clipped": clipped, "epoch_seconds": seconds})
            print(f"{name} seed {seed}: test accuracy {curve[-1]:.4f}, "
                  f"{np.median(seconds[1:] or seconds) * 1e3:.1f} ms/epoch", flush=True)
    return records


def group(records, name) -> list[dict]:
    return [r for r in records if r["config"] == name]


def table(settings: Settings, records: list[dict]) -> str:
    rows = []
    steps = 1438 // settings.batch_size
    for name, max_norm, noise in settings.configs:
        runs = group(records, name)
        final = [r["test_accuracy"][-1] for r in runs]
        epoch_ms = np.median([s for r in runs for s in r["epoch_seconds"][1:]]) * 1e3
        dp = max_norm is not None
        rows.append([name, "-" if not dp else max_norm, noise if dp else "-",
                     common.format_mean_std(final),
                     f"{np.mean([r['fraction_clipped'][-1] for r in runs]):.0%}" if dp else "-",
                     f"{np.mean([r['mean_grad_norm'][-1] for r in runs]):.2f}" if dp else "-",
                     f"{epoch_ms:.1f} ({epoch_ms * 1e3 / steps:.0f} µs/step)"])
    return common.markdown_table(
        ["configuration", "clip norm C", "noise sigma", "final test accuracy (%)",
         "clipped in last epoch", "mean per-example grad norm, last epoch", "ms per epoch"], rows)


def plot(settings: Settings, records: list[dict], out_dir) -> None:
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    for name, _, _ in settings.configs:
        curves = 100 * np.array([r["test_accuracy"] for r in group(records, name)])
        epochs = np.arange(1, curves.shape[1] + 1)
        left.plot(epochs, curves.mean(0), label=name)
        left.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
    left.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits, 64-128-10 MLP, SGD")
    left.set_ylim(max(left.get_ylim()[0], 50), 100)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [name for name, _, _ in settings.configs]
    stats = [common.mean_std([r["test_accuracy"][-1] for r in group(records, n)]) for n in names]
    right.bar(range(len(names)), [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
              capsize=3, color=["gray"] + ["C0"] * (len(names) - 1))
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set(ylabel="final test accuracy (%)", title=f"after {settings.epochs} epochs, "
              f"{settings.seeds} seeds (mean ± std)")
    right.set_ylim(max(min(100 * m - 100 * s for m, s in stats) - 3, 0), 100)
    right.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(out_dir / "dp_sgd.png", dpi=100)


def main() -> None:
    settings = parse_settings()
    started, header = time.time(), {"command": common.command(), "machine": common.machine()}
    records = run_all(settings)
    out_dir = common.RESULTS / settings.out
    note = (f"Digits (1438 train, 359 test), 64-128-10 ReLU MLP, SGD lr {settings.lr}, batch "
            f"{settings.batch_size}, {settings.epochs} epochs, seeds 0..{settings.seeds - 1}. "
            "`clip C`: mean of per-example gradients clipped to norm C; `dp C, sigma`: plus "
            "Gaussian noise of std sigma*C on their sum. No privacy accounting (epsilon not "
            "computed). ms per epoch: median after the first (compiling) epoch; the DP step "
            "computes a gradient per example (`jaxnet.per_example_grads`).\n\n")
    common.write_results(out_dir, settings, records, note + table(settings, records), started,
                         header)
    plot(settings, records, out_dir)
    print(f"wrote {out_dir} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
