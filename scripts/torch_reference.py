"""brisk's PyTorch reference: the same ResNets brisk builds, and a timer for their
training step (or eval forward), on the CPU or a CUDA GPU.

The model is a torchvision-named BasicBlock ResNet exactly as brisk's `ModelSpec` derives
it: ResNet-18/34, with or without squeeze-and-excitation (hidden width max(1, C // r)),
CIFAR stem (3x3 conv) or ImageNet stem (7x7/2 conv + max-pool), a width multiplier on the
stage widths 64/128/256/512 (rounded half to even, at least 1), any input channels and
classes. Its `state_dict` names are brisk's checkpoint names, so brisk's weights load
with `load_state_dict(strict=True)`.

Timing runs the work PyTorch users run: forward, cross-entropy, backward and SGD
(momentum 0.9, weight decay 5e-4) per step on random data, under autocast for bf16/f16
(with a GradScaler for f16 on a GPU), channels-last on request; eval mode times
`model(x)` under `no_grad`. Needs torch (pip install torch).

    python3 scripts/torch_reference.py --batch 32 --threads 2 --steps 5
    python3 scripts/torch_reference.py --arch seresnet18 --width 0.5 --dtype bf16 --json
    python3 scripts/torch_reference.py --device cuda --batch 256 --dtype f16 --channels-last

Prints `torch <arch> <dtype> <mode> batch=B img/s median M (min a max b)`, or with --json
one JSON object with the keys `brisk bench step --json` uses (img_per_s, img_per_s_min,
img_per_s_max, peak_rss_mib, batch, threads, dtype, arch, width, image, mode, device).
With --profile (training, CPU), `--steps` more steps run under torch.profiler and the
output adds `ops`: milliseconds per step by the op names of `brisk bench step --profile`
(PyTorch's convolution backward is one op, `conv-backward`, for both gradients), so
`cargo xtask compare-torch --profile` can print the two side by side.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = (64, 128, 256, 512)
BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def scaled(c, width):
    """max(1, round(c * width)), rounding half to even as brisk's ModelSpec does."""
    return max(1, round(c * width))


class SE(nn.Module):
    def __init__(self, c, ratio):
        super().__init__()
        hidden = max(1, c // ratio)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, se_ratio):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SE(cout, se_ratio) if se_ratio else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.se is not None:
            y = self.se(y)
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class ResNet(nn.Module):
    """brisk's ModelSpec as a torch module: `arch` is resnet18, resnet34, seresnet18 or
    seresnet34; `se_ratio` applies to the SE architectures."""

    def __init__(self, arch="resnet18", classes=10, width=1.0, stem="cifar", in_channels=3, se_ratio=16):
        super().__init__()
        se = arch.startswith("se")
        blocks = BLOCKS[arch.removeprefix("se")]
        w = [scaled(c, width) for c in STAGES]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, w[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(w[0])
        cin = w[0]
        for i, (c, n) in enumerate(zip(w, blocks)):
            layer = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layer.append(BasicBlock(cin, c, stride, se_ratio if se else 0))
                cin = c
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


HALF = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}


def time_steps(a, model, x, y):
    """Seconds per timed step (after the warm-up ones)."""
    dev = x.device
    half = HALF[a.dtype]
    autocast = lambda: torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None)  # noqa: E731
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=a.dtype == "f16" and dev.type == "cuda")
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        if a.mode == "eval":
            with torch.no_grad(), autocast():
                model(x)
        else:
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return times


# PyTorch's ops by brisk's names (`brisk_models::Op`), per phase of the step. In the
# forward, ReLU and the residual add count with batch-norm, which brisk fuses with them;
# in the backward, ReLU's backward and the gradient sums are `relu-backward`.
def brisk_op(phase, name):
    n = name.removeprefix("aten::")
    if phase == "optimizer":
        return "optimizer"
    if "conv" in n:
        return "conv-forward" if phase == "forward" else "conv-backward"
    if "batch_norm" in n:
        return "batch-norm-forward" if phase == "forward" else "batch-norm-backward"
    if n.startswith(("relu", "clamp", "threshold", "add")):
        return "batch-norm-forward" if phase == "forward" else "relu-backward"
    if n.startswith(("adaptive_avg_pool", "mean", "linear", "addmm", "mm", "max_pool", "sum", "div", "expand")):
        return "pool-and-classifier"
    return "rest"


def profile_steps(a, model, x, y):
    """The `ops` table: self CPU time of every PyTorch op over `a.steps` steps, by
    brisk's op names; steps are split into forward (with the loss), backward and optimizer
    by record_function ranges."""
    from torch.profiler import ProfilerActivity, profile, record_function

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            with record_function("brisk:forward"):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            with record_function("brisk:backward"):
                loss.backward()
            with record_function("brisk:optimizer"):
                opt.step()
    totals = {}
    for ev in prof.events():
        phase, p = None, ev
        while p is not None and phase is None:
            if p.name.startswith("brisk:"):
                phase = p.name.removeprefix("brisk:")
            p = p.cpu_parent
        if phase is None or ev.name.startswith("brisk:"):
            continue
        op = brisk_op(phase, ev.name)
        ms, calls = totals.get(op, (0.0, 0))
        # Calls count ops that no other op called (an autograd node or a phase did);
        # self time covers every level.
        top = not (ev.cpu_parent is not None and ev.cpu_parent.name.startswith("aten::"))
        totals[op] = (ms + ev.self_cpu_time_total / 1e3, calls + int(top))
    order = ["conv-forward", "conv-backward", "batch-norm-forward", "batch-norm-backward",
             "relu-backward", "pool-and-classifier", "optimizer", "rest"]
    return [
        {"op": op, "ms_per_step": totals[op][0] / a.steps, "calls_per_step": totals[op][1] / a.steps}
        for op in order
        if op in totals
    ]


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="train", choices=["train", "eval"])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "seresnet18", "seresnet34"])
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--se-ratio", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image", type=int, default=None, help="by default 32 (cifar stem) or 224 (imagenet)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="f32", choices=list(HALF))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", action="store_true", help="add the per-op table (training on the CPU)")
    a = p.parse_args()
    a.image = a.image or (32 if a.stem == "cifar" else 224)
    return a


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = ResNet(a.arch, a.classes, a.width, a.stem, a.in_channels, a.se_ratio).to(dev)
    model.train(a.mode == "train")
    x = torch.randn(a.batch, a.in_channels, a.image, a.image, device=dev)
    y = torch.randint(0, a.classes, (a.batch,), device=dev)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = time_steps(a, model, x, y)
    med = statistics.median(times)
    result = {
        "img_per_s": a.batch / med,
        "img_per_s_min": a.batch / max(times),
        "img_per_s_max": a.batch / min(times),
        "peak_rss_mib": peak_mib(dev),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": a.batch,
        "threads": a.threads,
        "dtype": a.dtype,
        "arch": a.arch,
        "width": a.width,
        "image": a.image,
        "mode": a.mode,
        "device": a.device,
        "torch": torch.__version__,
    }
    if a.profile and a.mode == "train" and dev.type == "cpu":
        result["ops"] = profile_steps(a, model, x, y)
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"torch {a.arch} {a.dtype} {a.mode} batch={a.batch} img/s median {result['img_per_s']:.2f} "
            f"(min {result['img_per_s_min']:.2f} max {result['img_per_s_max']:.2f})"
        )
        for row in result.get("ops", []):
            print(f"{row['op']:<22} {row['ms_per_step']:>10.1f} ms/step {row['calls_per_step']:>6.0f} calls/step")


if __name__ == "__main__":
    main()
