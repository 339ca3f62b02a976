"""brisk's training recipe in PyTorch, for time to accuracy side by side with `brisk train`.

Reads a brisk training config (TOML, as `brisk train --config` takes it or a run's
config.toml) and a dataset packed by `brisk pack`, and trains the same recipe in eager
PyTorch on the CPU: the same network (scripts/torch_reference.py's ResNet, torchvision's
initialisation: Kaiming normal fan-out for convolutions, batch-norm 1/0, `zero_init_residual`),
the same learning-rate and momentum schedule (brisk's one-cycle, cosine, step or
constant, with warm-up, as a function of fractional epochs), SGD with Nesterov and
weight decay (none on batch-norm and biases unless `decay_norm_and_bias`), label
smoothing, the batch schedule, per-image random crop (zero padding) and flip, the
exponential moving average of the weights (`ema.decay`, with brisk's warm-up of the
decay) and flip test-time augmentation (`eval.flip`); probes of the first
`eval.probe_images` test images every `eval.probe_every_steps` updates, and evaluations
every `eval.every_epochs`, are not counted as training time, as in brisk.

    python3 scripts/torch_train.py --config experiments/... --data DIR --seed 0 --json

Prints one JSON object: top1 (final, whole test split), train_s, img_per_s, updates,
seed, and curve: [[training seconds, top-1], ...] at every probe and evaluation.
Needs torch, numpy and safetensors (pip install torch numpy safetensors).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402
from synthetic_baselines import load  # noqa: E402


def load_split(folder, split):
    """A split's images as uint8 [N, C, H, W] and labels (synthetic_baselines' reader)."""
    try:
        x, y = load(folder, split)
    except ValueError:
        sys.exit(f"{folder}: no {split} shards (pack a dataset with `brisk pack`)")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def cosine(a, b, t):
    return b + (a - b) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0))) / 2


def lr_and_momentum(c, epoch):
    """brisk's LrSchedule::lr and ::momentum at fractional `epoch`."""
    lr_cfg = c.get("lr", {})
    base = lr_cfg.get("base", 0.1)
    shape = lr_cfg.get("shape", {"kind": "one_cycle"})
    epochs = c.get("epochs", 30)
    t = min(max(epoch / epochs, 0.0), 1.0)
    kind = shape["kind"]
    momentum = None
    if kind == "constant":
        lr = base
    elif kind == "step":
        lr = base * shape["gamma"] ** sum(epoch >= m for m in shape["milestones"])
    elif kind == "cosine":
        lr = cosine(base, shape.get("min_lr", 0.0), t)
    else:
        pct, div, final = shape.get("pct_start", 0.3), shape.get("div", 25.0), shape.get("final_div", 1e4)
        start = base / div
        lr = cosine(start, base, t / pct) if t < pct else cosine(base, start / final, (t - pct) / (1 - pct))
        if "momentum" in shape:
            hi, lo = shape["momentum"]
            momentum = cosine(hi, lo, t / pct) if t < pct else cosine(lo, hi, (t - pct) / (1 - pct))
    warm = lr_cfg.get("warmup_epochs", 0.0)
    if epoch < warm:
        lr *= epoch / warm
    return lr, momentum


def batch_size(c, epoch):
    b = c.get("batch", {"kind": "fixed", "size": 128})
    if b["kind"] == "fixed":
        return b["size"]
    if b["kind"] == "list":
        return b["sizes"][min(epoch, len(b["sizes"]) - 1)]
    return min(b["start"] * b["factor"] ** (epoch // b["every"]), b["max"])


def build_model(c, classes, channels):
    m = c.get("model", {})
    preset = m.get("preset", "resnet18-cifar")
    arch, stem = preset.rsplit("-", 1)
    model = ref.ResNet(arch, classes, m.get("width", 1.0), stem, channels, m.get("se_ratio", 16))
    # torchvision's initialisation, as brisk's.
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    if m.get("zero_init_residual", False):
        for mod in model.modules():
            if isinstance(mod, ref.BasicBlock):
                nn.init.zeros_(mod.bn2.weight)
    return model


def augment(x, padding, flip, gen):
    """Per-image random crop (zero padding) and horizontal flip of uint8 images [N,C,H,W]."""
    n, _, h, w = x.shape
    if padding:
        p = padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def normalise(x, mean, std):
    return (x.float().div_(255) - mean) / std


class Average:
    """brisk's WeightAverage: every float tensor of the state dict, decay warmed up."""

    def __init__(self, model, decay):
        self.decay = decay
        self.values = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def update(self, model, t):
        d = min(self.decay, (1 + t) / (10 + t))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in self.values:
                    self.values[k].mul_(d).add_(v, alpha=1 - d)

    def model(self, model):
        m = copy.deepcopy(model)
        m.load_state_dict({**m.state_dict(), **self.values})
        return m


def evaluate(model, x, y, mean, std, flip, limit=None, batch=256):
    model.eval()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = normalise(x[i:i + batch], mean, std)
            logits = model(xb)
            if flip:
                logits = (logits + model(xb.flip(3))) / 2
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(x)


def train(c, data, seed, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    manifest_path = os.path.join(data, "manifest.json")
    if not os.path.isfile(manifest_path):
        sys.exit(f"{data}: no packed dataset there (no manifest.json; make one with `brisk pack`)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    xtr, ytr = load_split(data, "train")
    xte, yte = load_split(data, "test")
    mean = torch.tensor(manifest["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, -1, 1, 1)
    model = build_model(c, len(manifest["classes"]), xtr.shape[1])
    opt_cfg = c.get("optimizer", {})
    decay_all = opt_cfg.get("decay_norm_and_bias", False)
    decayed = [p for n, p in model.named_parameters() if decay_all or (p.dim() > 1)]
    plain = [p for n, p in model.named_parameters() if not (decay_all or p.dim() > 1)]
    opt = torch.optim.SGD(
        [{"params": decayed, "weight_decay": opt_cfg.get("weight_decay", 5e-4)}, {"params": plain, "weight_decay": 0.0}],
        lr=0.1,
        momentum=opt_cfg.get("momentum", 0.9),
        nesterov=opt_cfg.get("nesterov", True),
    )
    loader = c.get("loader", {})
    ev = c.get("eval", {})
    flip_tta = ev.get("flip", False)
    probe_every, probe_images = ev.get("probe_every_steps", 0), ev.get("probe_images", 512)
    ema_decay = c.get("ema", {}).get("decay", 0.0)
    average = Average(model, ema_decay) if ema_decay > 0 else None
    smoothing = c.get("label_smoothing", 0.0)
    gen = torch.Generator().manual_seed(seed)
    epochs = c.get("epochs", 30)
    curve, train_s, step, images = [], 0.0, 0, 0

    def measured(limit=None):
        m = average.model(model) if average else model
        return evaluate(m, xte, yte, mean, std, flip_tta, limit)

    model.train()
    for epoch in range(epochs):
        b = batch_size(c, epoch)
        order = torch.randperm(len(xtr), generator=gen)
        per_epoch = math.ceil(len(xtr) / b)
        t0 = time.perf_counter()
        for i in range(per_epoch):
            idx = order[i * b:(i + 1) * b]
            lr, momentum = lr_and_momentum(c, epoch + i / per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
                if momentum is not None:
                    g["momentum"] = momentum
            xb = normalise(augment(xtr[idx], loader.get("crop_padding", 4), loader.get("flip", True), gen), mean, std)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if average:
                average.update(model, step)
            step += 1
            images += len(idx)
            if probe_every and step % probe_every == 0:
                train_s += time.perf_counter() - t0
                curve.append([train_s, measured(probe_images)])
                t0 = time.perf_counter()
        train_s += time.perf_counter() - t0
        every = ev.get("every_epochs", 1)
        if epoch == epochs - 1 or (every and (epoch + 1) % every == 0):
            curve.append([train_s, measured()])
    return {
        "seed": seed,
        "top1": curve[-1][1],
        "train_s": train_s,
        "img_per_s": images / train_s,
        "updates": step,
        "curve": curve,
        "threads": threads,
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a brisk training config (TOML)")
    p.add_argument("--data", required=True, help="a dataset folder packed by `brisk pack`")
    p.add_argument("--seed", type=int, default=None, help="by default the config's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    with open(a.config, "rb") as f:
        text = f.read().decode()
    # A run's config.toml ends with brisk's checksum line, a TOML comment.
    c = tomllib.loads(text)
    seed = c.get("seed", 0) if a.seed is None else a.seed
    r = train(c, a.data, seed, a.threads)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"torch: top-1 {100 * r['top1']:.2f}% in {r['train_s']:.1f} s of training ({r['img_per_s']:.0f} img/s)")


if __name__ == "__main__":
    main()
