"""PyTorch's side of the GPU training-step comparison: img/s of the reference ResNet-18
(../shared/reference/torch_train_step.py's model) on CUDA in f32 and under bf16/f16
autocast, timed to the device's completion, so brisk's `bench step --device cuda`
figures have a side-by-side ratio.

    python3 scripts/torch_gpu_train_step.py --reference ../shared/reference --batch 256
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reference", required=True, help="folder holding torch_train_step.py")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    sys.path.insert(0, a.reference)
    from torch_train_step import ResNet18  # noqa: E402

    dev = torch.device("cuda")
    for dtype in ["f32", "bf16", "f16"]:
        torch.manual_seed(0)
        model = ResNet18(10, 1.0, False, "cifar").to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == "f16")
        x = torch.randn(a.batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (a.batch,), device=dev)
        half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(dtype)
        times = []
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=half or torch.float32, enabled=half is not None):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"torch resnet18 cifar batch {a.batch} {dtype}: {a.batch / med:.1f} img/s")


if __name__ == "__main__":
    main()
