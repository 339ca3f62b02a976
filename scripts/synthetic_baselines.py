"""How hard is the synthetic set? A linear classifier on raw pixels against a small ResNet,
both trained with PyTorch on shards packed by `brisk pack synthetic`.

    cargo run --release -p brisk-cli -- pack synthetic --out /tmp/syn
    python3 scripts/synthetic_baselines.py /tmp/syn [--epochs 5] [--width 0.25]

Reads the shards with Python's safetensors library (which also shows they are ordinary
safetensors files) and prints the test accuracy of each model.
"""

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402


def load(folder, split):
    xs, ys = [], []
    for path in sorted(glob.glob(os.path.join(folder, f"{split}-*.safetensors"))):
        t = load_file(path)
        xs.append(t["images"])
        ys.append(t["labels"].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def to_tensor(x, mean, std):
    x = torch.from_numpy(x).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).float().mean().item()


def train(model, x, y, epochs, lr, batch=128):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = json.load(open(os.path.join(a.data, "manifest.json")))
    (xtr, ytr), (xte, yte) = load(a.data, "train"), load(a.data, "test")
    xtr, xte = to_tensor(xtr, m["mean"], m["std"]), to_tensor(xte, m["mean"], m["std"])
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    classes = len(m["classes"])

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(xtr[0].numel(), classes))
    t = time.time()
    train(linear, xtr, ytr, a.epochs * 2, 0.01)
    print(f"linear on raw pixels: test accuracy {accuracy(linear, xte, yte):.3f} ({time.time() - t:.0f} s)")

    net = ref.ResNet("resnet18", classes, a.width, "cifar")
    t = time.time()
    train(net, xtr, ytr, a.epochs, 0.1)
    print(f"resnet18 width {a.width}: test accuracy {accuracy(net, xte, yte):.3f} ({time.time() - t:.0f} s, {a.epochs} epochs)")


if __name__ == "__main__":
    main()
