"""PyTorch reference for eval-mode forward throughput (the counterpart of
`brisk bench step --eval`), with the model of ../shared/reference/torch_train_step.py.

    python3 scripts/torch_eval_forward.py --batch 32 --threads 2 --steps 5

Prints one line: `torch <arch> eval batch=B img/s median M (min a max b)`.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference"))
import torch_train_step as ref  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "seresnet18"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ref.ResNet18(a.classes, a.width, a.arch == "seresnet18", "cifar").eval()
    x = torch.randn(a.batch, 3, a.image, a.image)
    times = []
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            model(x)
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {a.arch} eval batch={a.batch} img/s median {a.batch / med:.2f} "
          f"(min {a.batch / max(times):.2f} max {a.batch / min(times):.2f})")


if __name__ == "__main__":
    main()
