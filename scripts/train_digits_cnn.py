"""Train a small ResNet on scikit-learn's bundled digits (no download) for hwprune's real-weight CNN check.

    python scripts/train_digits_cnn.py -o runs/digits            # ~2 min on 2 CPU cores

Data: the 1797 8x8 digits, scaled to [0, 1], upsampled to 32x32 (bilinear) and standardised; a fixed
stratified 75/25 split (seed 0) gives 1347 training and 450 test images, and the 1347 are split again
(stratified, seed 0) into 1047 to train on and 300 validation images the model never sees. Three disjoint
sets, so a pruning benchmark can calibrate on training images, select on validation and report on test
(``bench_cnn_digits.py``). Training uses small random shifts (+-2 px). The model is ``digits_resnet``: a
stem and three stages of two basic blocks (32, 64, 128 channels), batch norm, global pooling, a 10-way
linear head; hwprune loads it as ``--model scripts.train_digits_cnn:digits_resnet --input-shape
1,1,32,32`` from the repository root.

Writes into ``-o`` (a folder, unlike the benchmarks' ``-o`` file: ``bench_cnn_digits.py --data`` reads
it): ``model.safetensors`` (state dict), ``train.npy``/``train_labels.npy``, ``val.npy``/``val_labels.npy``,
``test.npy``/``test_labels.npy`` (model inputs, already normalised) and ``train.json`` (accuracy, time;
command, date and machine as every benchmark result, through ``scripts/_common.py:write_result``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fail, write_result

from hwprune.errors import HwpruneError

SIZE = 32
WIDTHS = (32, 64, 128)


class BasicBlock(nn.Module):
    def __init__(self, ci: int, co: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(co)
        self.conv2 = nn.Conv2d(co, co, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), nn.BatchNorm2d(co))
            if stride != 1 or ci != co
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class DigitsResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, ci = [], widths[0]
        for i, co in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(ci, co, 1 if i == 0 else 2), BasicBlock(co, co, 1)))
            ci = co
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(ci, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def digits_resnet() -> nn.Module:
    """The ``--model`` factory (random init; weights come from ``--weights``)."""
    return DigitsResNet()


Split = tuple[torch.Tensor, torch.Tensor]  # (images (N, 1, 32, 32) float32 standardised, int64 labels (N,))


def digits_data(seed: int = 0, *, n_val: int = 300) -> dict[str, Split]:
    """``{"train", "val", "test"}`` -> (x, y): three disjoint stratified splits of the 1797 digits. The
    test split is the same 450 images for every ``n_val`` (it is cut first)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise HwpruneError("the digits data comes with scikit-learn; pip install scikit-learn") from None

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - 0.2) / 0.3  # roughly zero mean, unit variance
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=0.25, random_state=seed, stratify=d.target)
    tr, va = train_test_split(tr, test_size=n_val, random_state=seed, stratify=d.target[tr])
    y = torch.from_numpy(d.target.astype(np.int64))
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


def shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_px`` pixels (zero-padded): the only augmentation."""
    p = max_px
    padded = nn.functional.pad(x, (p, p, p, p), value=float(x.min()))
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = padded[i, :, dy : dy + SIZE, dx : dx + SIZE]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 256) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 64,
    log: bool = True,
) -> nn.Module:
    """SGD with momentum, cosine schedule, label smoothing 0.05; also used for the bench's fine-tune."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            j = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(shift(x[j], g)), y[j])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(j)
        if log:
            print(f"epoch {ep + 1}/{epochs}: loss {total / len(x):.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "-o",
        "--out",
        default="runs/digits",
        help="output folder: model, data and the result train.json (bench_cnn_digits.py --data)",
    )
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val", type=int, default=300, help="training images held back as the validation split")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    try:
        splits = digits_data(a.seed, n_val=a.val)
    except HwpruneError as e:
        return fail(e)
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    model = digits_resnet()
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=a.epochs, lr=a.lr, seed=a.seed)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, xte, yte)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    for split, (x, y) in splits.items():
        np.save(out / f"{split}.npy", x.numpy())
        np.save(out / f"{split}_labels.npy", y.numpy())
    info = {
        "test_accuracy": acc,
        "val_accuracy": accuracy(model, *splits["val"]),
        "train_seconds": round(seconds, 1),
        "epochs": a.epochs,
        "threads": a.threads,
        "n_train": len(xtr),
        "n_val": len(splits["val"][0]),
        "n_test": len(xte),
    }
    print(json.dumps(info))
    write_result(out / "train.json", info, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
