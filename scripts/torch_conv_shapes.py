"""PyTorch counterpart of `cargo run --release -p brisk-ops --example conv_shapes`: times
conv2d forward, input gradient and weight gradient on each CIFAR ResNet-18 conv shape.

    python3 scripts/torch_conv_shapes.py [BATCH] [THREADS]
"""

import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("stem", 3, 64, 32, 3, 1, 1),
    ("layer1", 64, 64, 32, 3, 1, 4),
    ("layer2.0.conv1", 64, 128, 32, 3, 2, 1),
    ("layer2", 128, 128, 16, 3, 1, 3),
    ("layer2.ds", 64, 128, 32, 1, 2, 1),
    ("layer3.0.conv1", 128, 256, 16, 3, 2, 1),
    ("layer3", 256, 256, 8, 3, 1, 3),
    ("layer3.ds", 128, 256, 16, 1, 2, 1),
    ("layer4.0.conv1", 256, 512, 8, 3, 2, 1),
    ("layer4", 512, 512, 4, 3, 1, 3),
    ("layer4.ds", 256, 512, 8, 1, 2, 1),
]


def best(f):
    f()
    t = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(f"{'shape':<16} {'fwd':>9} {'dx':>9} {'dw':>9}  (ms, best of 5)")
    totals = [0.0, 0.0, 0.0]
    for name, cin, cout, hw, k, s, count in SHAPES:
        x = torch.randn(batch, cin, hw, hw, requires_grad=True)
        w = torch.randn(cout, cin, k, k, requires_grad=True)
        y = F.conv2d(x, w, stride=s, padding=k // 2)
        g = torch.randn_like(y)
        with torch.no_grad():
            fwd = best(lambda: F.conv2d(x, w, stride=s, padding=k // 2))
        dx = best(lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=k // 2))
        dw = best(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=k // 2))
        for i, v in enumerate((fwd, dx, dw)):
            totals[i] += v * count
        print(f"{name:<16} {fwd*1e3:>9.2f} {dx*1e3:>9.2f} {dw*1e3:>9.2f}")
    print(f"network totals (ms): forward {totals[0]*1e3:.1f}, input grad {totals[1]*1e3:.1f}, "
          f"weight grad {totals[2]*1e3:.1f}")


if __name__ == "__main__":
    main()
