"""MABN: Test-Time Domain Adaptation by Learning Domain-Aware Batch Normalization (AAAI 2024, arXiv 2312.10165).

A single-file reference implementation. The method, in three lines:
  1. Train backbone + linear head jointly with a BYOL auxiliary branch on all source domains (Eq. 2).
  2. Freeze weights and BN statistics; meta-learn only the BN affine (gamma, beta) so that one BYOL step on a
     domain's unlabelled support set improves the labelled loss on a disjoint query set (Alg. 1, Eq. 3-4).
  3. At test time, per target domain: one BYOL step on k unlabelled images, then predict the whole domain.

Commands:
  python mabn.py                                  # offline default benchmark (sklearn digits, 36 domains)
  python mabn.py --dataset iwildcam --root_dir DATA
  python -m pytest -q test_mabn.py
  python test_mabn.py --speed                     # GPU speed targets (a)-(d) of the README, on generated data
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

# ----------------------------------------------------------------------------------------------------------
# Flags and per-dataset defaults (one dict). A flag left unset takes its dataset's value.
# ----------------------------------------------------------------------------------------------------------
RGB_AUG = dict(min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0)
DATASETS = {
    # Offline default: sklearn's bundled handwritten digits rendered by 36 "cameras" (see make_digits).
    "digits": dict(backbone="small_resnet", img_size=16, norm=((0.5,) * 3, (0.25,) * 3), pretrained=False,
                   val_metric="acc_avg", n_adapt=32, batch_size=64, lr=2e-3, weight_decay=0.0,
                   epochs=10, lr_decay_epoch=7, meta_epochs=6, n_support=32, n_query=32, inner_lr=0.2,
                   outer_lr=1e-2, proj_hidden=256, proj_dim=64, eval_batch_size=50,
                   aug=dict(min_scale=0.7, max_rot=15.0, flip=False, jitter=0.4, noise=0.05)),
}
WILDS_COMMON = dict(proj_hidden=4096, proj_dim=256, meta_epochs=10, lr_decay_epoch=20, pretrained=True)
DATASETS.update({  # METHOD.md / Meta-DMoE values; (*) marks our choice where both papers are silent
    "iwildcam": dict(backbone="resnet50", img_size=448, norm="imagenet", domain_fields=["location"], n_adapt=12,
                     batch_size=16, lr=3e-5, weight_decay=0.0, epochs=12, n_support=24, n_query=16, inner_lr=3e-4,
                     outer_lr=3e-5, eval_batch_size=64, val_metric="F1-macro_all", aug=RGB_AUG),
    "camelyon17": dict(backbone="densenet121", img_size=96, norm="imagenet", domain_fields=["slide"], n_adapt=32,
                       batch_size=32, lr=1e-3, weight_decay=1e-2, epochs=5, n_support=64, n_query=32, inner_lr=1e-3,
                       outer_lr=1e-4, eval_batch_size=256, val_metric="acc_avg",
                       aug=dict(RGB_AUG, min_scale=0.8, max_rot=180.0)),  # (*) patches have no orientation
    "rxrx1": dict(backbone="resnet50", img_size=256, norm="per_image", domain_fields=["experiment"], n_adapt=32,
                  batch_size=75, lr=1e-4, weight_decay=1e-5, epochs=90, n_support=75, n_query=48, inner_lr=1e-4,
                  outer_lr=1e-6, eval_batch_size=150, val_metric="acc_avg",
                  aug=dict(min_scale=0.8, max_rot=180.0, flip=True, jitter=0.2, noise=0.0)),  # (*) no colour mixing
    "fmow": dict(backbone="densenet121", img_size=224, norm="imagenet", domain_fields=["region", "year"], n_adapt=32,
                 batch_size=64, lr=1e-4, weight_decay=0.0, epochs=20, n_support=64, n_query=48, inner_lr=1e-4,
                 outer_lr=1e-5, eval_batch_size=128, val_metric="acc_worst_region", aug=RGB_AUG),
    "poverty": dict(backbone="resnet18_8ch", img_size=224, norm=None, domain_fields=["country"], n_adapt=32,
                    batch_size=64, lr=1e-3, weight_decay=0.0, epochs=50, n_support=64, n_query=48, inner_lr=1e-3,
                    outer_lr=1e-4, eval_batch_size=128, val_metric="r_wg",  # (*) LRs, sizes, epochs
                    aug=dict(min_scale=0.8, max_rot=180.0, flip=True, jitter=0.0, noise=0.02)),  # no colour jitter
    "domainnet": dict(backbone="resnet50", img_size=224, norm="imagenet", domain_fields=["domain"], n_adapt=32,
                      batch_size=32, lr=1e-4, weight_decay=0.0, epochs=10, n_support=64, n_query=48, inner_lr=1e-4,
                      outer_lr=1e-5, eval_batch_size=128, val_metric="acc_avg", aug=RGB_AUG),  # (*) all but backbone
})
for _name in DATASETS:
    if _name != "digits":
        DATASETS[_name] = {**WILDS_COMMON, **DATASETS[_name]}
DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
DEFAULTS = dict(aux_weight=0.1, ema=0.99, inner_steps=1)
METHODS = ["none", "bn_stats", "tent", "mabn", "mabn_tent", "mabn_tent_affine", "mabn_unmatched", "no_meta"]
TENT_OF = {"tent": "batch", "mabn_tent": "batch", "mabn_tent_affine": "source"}  # BN statistics TENT runs with


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: what is wrong and where to look
        self.exit(2, f"error: {message} (see python mabn.py --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description="MABN: test-time domain adaptation through BN affine parameters.")
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    p.add_argument("--root_dir", default="data", help="where WILDS datasets live (ROOT/<name>_v<version>/)")
    p.add_argument("--download", action="store_true", help="let wilds download the dataset into --root_dir")
    p.add_argument("--no_pretrained", dest="pretrained", action="store_false", default=None,
                   help="start the backbone from random weights instead of ImageNet")
    p.add_argument("--target_domain", default="real", choices=DOMAINNET_DOMAINS,
                   help="DomainNet: the held-out domain; the other five are the sources")
    p.add_argument("--out_dir", default=None, help="checkpoints, logs and results.json (default runs/<dataset>)")
    p.add_argument("--seed", type=int, default=0, help="one seed (shorthand for --seeds SEED)")
    p.add_argument("--seeds", type=int, nargs="+", help="run the whole pipeline for each; table is mean ± std")
    p.add_argument("--methods", nargs="+", default=["none", "mabn"], choices=METHODS,
                   help="what stage 3 compares on the target domains (same support sets for all)")
    p.add_argument("--no_meta_n_adapt", type=int, nargs="+", help="no_meta: the numbers of adaptation images")
    p.add_argument("--tent_lr", type=float, default=1e-3, help="TENT's Adam step on the BN affine per test batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: forward passes under bf16 autocast "
                   "(default on CUDA); fp32: no autocast (default on CPU)")
    p.add_argument("--num_workers", type=int, help="DataLoader workers (default: 0 for digits, else one per core "
                   "but one, up to 16)")
    p.add_argument("--max_steps", type=int, default=None, help="cap on the steps of each stage (smoke runs)")
    g = p.add_argument_group("stage 1: joint training (Eq. 2)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch_size", type=int)
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--lr_decay_epoch", type=int, help="the learning rate is halved from this epoch on")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--aux_weight", type=float, help="lambda, weight of the BYOL loss (Eq. 2 and 4)")
    g.add_argument("--ema", type=float, help="tau, BYOL target network momentum")
    g.add_argument("--width", type=int, default=16, help="channels of small_resnet's first stage (digits)")
    g.add_argument("--proj_hidden", type=int, help="BYOL projector/predictor hidden width")
    g.add_argument("--proj_dim", type=int, help="BYOL projection width")
    g = p.add_argument_group("stage 2: meta-auxiliary training (Alg. 1, Eq. 3-4)")
    g.add_argument("--meta_epochs", type=int)
    g.add_argument("--n_support", type=int, help="unlabelled support images per episode")
    g.add_argument("--n_query", type=int, help="labelled query images per episode")
    g.add_argument("--inner_lr", type=float, help="alpha, SGD step of Eq. 3")
    g.add_argument("--outer_lr", type=float, help="beta, Adam step of Eq. 4")
    g.add_argument("--inner_steps", type=int)
    g.add_argument("--first_order", action="store_true", help="drop the second-order term of the meta-gradient")
    g = p.add_argument_group("stage 3: test-time adaptation")
    g.add_argument("--n_adapt", type=int, help="unlabelled images of each target domain used to adapt")
    g.add_argument("--eval_batch_size", type=int)
    g.add_argument("--img_size", type=int, help="input side in pixels")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **DATASETS[args.dataset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", args.dataset)
    args.seeds = args.seeds or [args.seed]
    if args.num_workers is None:  # decoding WILDS images needs workers; the in-memory digits do not
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.num_workers = 0 if args.dataset == "digits" else max(1, min(16, cores - 1))
    for key in ("lr", "inner_lr", "outer_lr", "tent_lr", "batch_size", "n_adapt", "n_support", "n_query",
                "inner_steps", "eval_batch_size", "img_size", "width"):
        if getattr(args, key) <= 0:
            p.error(f"--{key} must be > 0, got {getattr(args, key)}")
    for key in ("epochs", "meta_epochs", "weight_decay", "num_workers"):
        if getattr(args, key) < 0:
            p.error(f"--{key} must be >= 0, got {getattr(args, key)}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data. Every split is a Split(dataset, domains): dataset[i] -> (x, y, ...), domains[i] = domain id of item i.
# ----------------------------------------------------------------------------------------------------------
class Split:
    def __init__(self, dataset, domains, name):
        self.dataset, self.domains, self.name = dataset, torch.as_tensor(domains), name
        # {domain id: item indices of that domain, in index order}
        self.by_domain = {int(d): torch.nonzero(self.domains == d).flatten().tolist()
                          for d in torch.unique(self.domains)}


def collate_xy(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([torch.as_tensor(b[1]) for b in batch])


def make_loader(dataset, args, device, **kw):
    """A DataLoader with the run's workers (kept alive across epochs) and pinned memory on CUDA."""
    return torch.utils.data.DataLoader(dataset, collate_fn=collate_xy, num_workers=args.num_workers,
                                       pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, **kw)


def to_device(x, device):
    """A batch to the device without blocking the host; uint8 photos become floats in [0, 1] there."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def make_digits(size=16, n_source=24, n_val=4, n_test=8, per_domain=150, seed=0):
    """A camera-trap-like benchmark from sklearn's 1797 bundled 8x8 digits (offline, ~2 s, deterministic).

    Each domain is a "camera" with its own fixed rendering: ink and background colours, a background texture
    (a sinusoidal grating), stroke width, rotation, zoom, blur and sensor noise. The digits are split into
    four disjoint pools: source-train, source-held-out, validation and test. Source domains draw their
    `train` images (80%) and `id_test` images (20%) from the first two pools; the validation and test
    (target) domains draw from the last two, so no target image shows a digit drawing seen in training.
    Returns {split: (x uint8 (N, 3, size, size), y (N,), domain (N,))}.
    """
    from sklearn.datasets import load_digits
    gen = torch.Generator().manual_seed(seed)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(shape, generator=gen)  # noqa: E731
    digits = load_digits()
    ink_all = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y_all = torch.tensor(digits.target)
    order = torch.randperm(len(y_all), generator=gen)
    cut = [int(f * len(order)) for f in (0.48, 0.6, 0.72)]
    pools = dict(zip(("train", "id_test", "val", "test"), order.tensor_split(cut)))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = {s: ([], [], []) for s in pools}
    for d in range(n_source + n_val + n_test):
        n_train = int(0.8 * per_domain)
        if d < n_source:
            take = {"train": n_train, "id_test": per_domain - n_train}
        else:
            take = {"val" if d < n_source + n_val else "test": per_domain}
        drawn = {s: pools[s][torch.randperm(len(pools[s]), generator=gen)[:k]] for s, k in take.items()}
        idx = torch.cat(list(drawn.values()))
        n = len(idx)
        ink = F.interpolate(ink_all[idx, None], size=(size, size), mode="bilinear", align_corners=False)
        stroke = int(torch.randint(0, 3, (1,), generator=gen))  # 0 thin, 1 as drawn, 2 thick
        if stroke == 2:
            ink = F.max_pool2d(ink, 3, 1, 1)
        elif stroke == 0:
            ink = 0.5 * (ink - F.max_pool2d(-ink, 3, 1, 1))  # half-way to an erosion
        angle, zoom = math.radians(float(u(-30, 30))), float(u(0.8, 1.25))
        rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
        grid = F.affine_grid((rot / zoom).expand(n, 2, 3), [n, 1, size, size], align_corners=False)
        ink = F.grid_sample(ink, grid, align_corners=False)  # zeros outside: background
        sigma = float(u(0.1, 1.2))
        taps = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * sigma ** 2))
        taps = taps / taps.sum()
        ink = F.conv2d(F.conv2d(ink, taps.view(1, 1, 1, 7), padding=(0, 3)), taps.view(1, 1, 7, 1), padding=(3, 0))
        grey = float(u(0.2, 0.8))  # background grey level, ink lighter or darker by a contrast, both tinted
        ink_grey = grey + (1 if grey < 0.5 else -1) * float(u(0.3, 0.6))
        bg, fg = grey + u(-0.2, 0.2, 3), ink_grey + u(-0.2, 0.2, 3)
        freq, theta, amp = float(u(1, 4)), float(u(0, math.pi)), float(u(0, 0.2))
        texture = amp * torch.sin(math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))  # (size, size)
        background = bg.view(3, 1, 1) + texture * u(-1, 1, 3).view(3, 1, 1)  # (3, size, size)
        img = background * (1 - ink) + fg.view(1, 3, 1, 1) * ink  # (n, 3, size, size)
        img = img + float(u(0, 0.1)) * torch.randn(img.shape, generator=gen)
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        for (split, part), img_part in zip(drawn.items(), img.split([len(p) for p in drawn.values()])):
            for lst, t in zip(out[split], (img_part, y_all[part], torch.full((len(part),), d))):
                lst.append(t)
    return {s: tuple(torch.cat(t) for t in ts) for s, ts in out.items()}


def install_torch_scatter_standin():
    """wilds' grouped metrics import torch_scatter only for a grouped mean; supply one when it is missing."""
    import importlib.util
    import types
    if "torch_scatter" in sys.modules or importlib.util.find_spec("torch_scatter") is not None:
        return

    def scatter(src, index, dim=-1, dim_size=None, reduce="sum"):
        out = torch.zeros(dim_size, dtype=src.dtype, device=src.device)  # empty groups stay 0
        return out.scatter_reduce(0, index, src, reduce="mean" if reduce == "mean" else "sum", include_self=False)

    sys.modules["torch_scatter"] = standin = types.ModuleType("torch_scatter")
    standin.scatter = scatter


class WildsImages(torch.utils.data.Dataset):
    """A WILDS subset -> (tensor (C, img_size, img_size), label). Photos are resized by PIL and stay uint8 (a
    quarter of the bytes to copy; to_device scales them); arrays (PovertyMap) are resized floats.
    Normalisation and augmentation happen on the device (Normalize, augment)."""

    def __init__(self, subset, img_size):
        self.subset, self.img_size = subset, img_size

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, i):
        x, y, _ = self.subset[i]
        if not torch.is_tensor(x):  # a PIL image: bilinear resize with antialiasing, on uint8
            from PIL import Image
            from torchvision.transforms.functional import pil_to_tensor
            x = pil_to_tensor(x.convert("RGB").resize((self.img_size,) * 2, Image.BILINEAR, reducing_gap=3.0))
        elif x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None].float(), size=(self.img_size, self.img_size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        return x, y.view(-1)[0] if y.dim() else y


def load_wilds(args):
    """Train / OOD val / OOD test (/ ID test) splits of a WILDS dataset through wilds.get_dataset."""
    import glob
    missing = (f"error: no {args.dataset} data under {os.path.abspath(args.root_dir)} (wilds expects a folder "
               f"{args.dataset}_v<version>/ with a RELEASE_v<version>.txt); download it there or pass --download")
    if not args.download and not glob.glob(os.path.join(args.root_dir, f"{args.dataset}_v*", "RELEASE_v*.txt")):
        sys.exit(missing)  # before the slow imports
    sys.modules.setdefault("outdated", None)  # wilds' background version check needs the network
    install_torch_scatter_standin()
    import wilds
    from wilds.common.grouper import CombinatorialGrouper

    def get(**kw):
        try:
            return wilds.get_dataset(dataset=args.dataset, root_dir=args.root_dir, download=args.download, **kw)
        except (OSError, ValueError) as e:  # a failed download, or a folder without the files wilds reads
            what = "--download did not produce the data" if args.download else "the data there is incomplete"
            sys.exit(f"error: {args.dataset} under {os.path.abspath(args.root_dir)}: {what} ({type(e).__name__}: "
                     f"{e}); fetch it by hand into that folder")

    if args.dataset == "domainnet":  # leave one domain out: five wilds objects, one per source domain
        sources = [d for d in DOMAINNET_DOMAINS if d != args.target_domain]
        objs = [get(source_domain=d, target_domain=args.target_domain) for d in sources]
        parts = {"train": [(o, "train") for o in objs], "val": [(o, "id_test") for o in objs],
                 "test": [(objs[0], "test")]}  # val: the sources' own test images (no other domain is left)
    else:
        objs = [get()]
        held_out = "id_test" if "id_test" in objs[0].split_dict else "id_val"  # source images kept from training
        parts = {"train": [(objs[0], "train")], "val": [(objs[0], "val")], "test": [(objs[0], "test")],
                 "id_test": [(objs[0], held_out)]}
    dataset = objs[0]
    grouper = CombinatorialGrouper(dataset, args.domain_fields)
    splits, metadata = {}, {}
    for name, pieces in parts.items():
        subsets = [o.get_subset(s) for o, s in pieces]
        metadata[name] = torch.cat([sub.metadata_array for sub in subsets])
        images = torch.utils.data.ConcatDataset([WildsImages(sub, args.img_size) for sub in subsets])
        splits[name] = Split(images, grouper.metadata_to_group(metadata[name]), name)
    task = "regression" if args.dataset == "poverty" else "classification"

    def evaluate(split, outputs, labels):
        y_pred = outputs.argmax(-1) if task == "classification" else outputs.view(-1, 1)
        y_true = labels if task == "classification" else labels.view(-1, 1).float()
        official = dataset.eval(y_pred, y_true, metadata[split.name])[0]
        per_domain = domain_metrics(outputs, labels, split.domains, task)["per_domain"]
        return {**{k: float(v) for k, v in official.items()}, "per_domain": per_domain}

    norm = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}.get(args.norm, args.norm)
    return dict(splits=splits, n_outputs=1 if task == "regression" else dataset.n_classes, task=task,
                in_channels=8 if args.dataset == "poverty" else 3, norm=norm, val_metric=args.val_metric,
                evaluate=evaluate)


def load_data(args):
    """-> dict(splits={train, val, test[, id_test]: Split}, n_outputs, task, in_channels, norm, val_metric,
    evaluate(split, outputs, labels) -> {metric: value, "per_domain": {...}})."""
    if args.dataset != "digits":
        return load_wilds(args)
    parts = make_digits(size=args.img_size)
    splits = {s: Split(torch.utils.data.TensorDataset(x.float() / 255, y), dom, s) for s, (x, y, dom) in parts.items()}
    return dict(splits=splits, n_outputs=10, task="classification", in_channels=3, norm=args.norm,
                val_metric=args.val_metric,
                evaluate=lambda split, outputs, labels: domain_metrics(outputs, labels, split.domains))


def domain_metrics(outputs, labels, domains, task="classification"):
    """Per-domain accuracy with its mean (acc_avg) and worst domain (acc_wg), as WILDS names them; for
    regression, per-domain MSE. outputs (N, n_outputs), labels (N,), domains (N,)."""
    if task == "classification":
        score = (outputs.argmax(-1) == labels).float()
    else:
        score = (outputs.view(-1) - labels.view(-1).float()) ** 2
    per_domain = {int(d): score[domains == d].mean().item() for d in torch.unique(domains)}
    if task != "classification":
        return {"per_domain": per_domain}
    return {"acc_avg": score.mean().item(), "acc_wg": min(per_domain.values()), "per_domain": per_domain}


# ----------------------------------------------------------------------------------------------------------
# BYOL augmentations, batched on the model's device: every image draws its own crop, rotation, flip, colour.
# ----------------------------------------------------------------------------------------------------------
def augment(x, gen, min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0):
    """x (B, C, H, W) in input space -> an independently augmented view (B, C, H, W)."""
    B = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=x.device)  # noqa: E731
    scale = min_scale + (1 - min_scale) * rand(B)  # random resized crop: zoom into a part of the image
    angle = (2 * rand(B) - 1) * math.radians(max_rot)
    shift = (2 * rand(B, 2) - 1) * (1 - scale)[:, None]
    mirror = torch.where(rand(B) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=x.device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    if jitter > 0:  # brightness, contrast and (for RGB) per-channel gain, each image its own draw
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + jitter * (2 * rand(B, 1, 1, 1) - 1)
        brightness = 1 + jitter * (2 * rand(B, 1, 1, 1) - 1)
        gain = 1 + 0.5 * jitter * (2 * rand(B, x.shape[1], 1, 1) - 1) if x.shape[1] == 3 else 1.0
        x = ((x - mean) * contrast + mean) * brightness * gain
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, device=x.device)
    return x


# ----------------------------------------------------------------------------------------------------------
# Model: backbone -> pooled feature -> main linear head (no BN) | BYOL projector -> predictor (with BN).
# ----------------------------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """norm = (mean, std) per channel, "per_image" (each image and channel standardised, RxRx1) or None."""

    def __init__(self, norm):
        super().__init__()
        self.per_image = norm == "per_image"
        mean, std = norm if isinstance(norm, (tuple, list)) else ((0.0,), (1.0,))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        if self.per_image:
            return (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-5)
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(in_channels=3, width=16):
    """A ResNet-style CNN with BN for small inputs (16-32 px) that trains on two CPU cores: (B, C, H, W) -> (B, 4w)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_backbone(name, in_channels, pretrained=False, width=16):
    """-> (module mapping images (B, C, H, W) to pooled features (B, d), d). ImageNet weights via torchvision."""
    if name == "small_resnet":
        return small_resnet(in_channels, width), 4 * width
    import torchvision
    arch = {"resnet50": "resnet50", "densenet121": "densenet121", "resnet18_8ch": "resnet18"}[name]
    try:
        net = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as e:  # offline, or a broken download
        sys.exit(f"error: could not load ImageNet weights for {arch} ({type(e).__name__}); put them in the torch "
                 f"hub cache, or pass --no_pretrained to start from random weights")
    if arch == "densenet121":
        dim, net.classifier = net.classifier.in_features, nn.Identity()
    else:
        dim, net.fc = net.fc.in_features, nn.Identity()
    if in_channels != 3:  # PovertyMap: 8 bands; pretrained RGB filters, the mean filter for the other bands
        rgb = net.conv1.weight.detach()  # (64, 3, 7, 7)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        with torch.no_grad():
            net.conv1.weight.copy_(torch.cat([rgb, rgb.mean(1, keepdim=True).expand(-1, in_channels - 3, -1, -1)], 1))
    return net, dim


def mlp(d_in, d_hidden, d_out):
    """BYOL projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class MABNNet(nn.Module):
    def __init__(self, backbone, feat_dim, n_outputs, proj_hidden, proj_dim, norm):
        super().__init__()
        self.backbone = nn.Sequential(Normalize(norm), backbone)
        self.head = nn.Linear(feat_dim, n_outputs)  # main branch: one linear layer, no BN
        self.projector = mlp(feat_dim, proj_hidden, proj_dim)  # auxiliary branch (BYOL online side)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)

    def forward(self, x, aux=False):
        feats = self.backbone(x)  # (B, C, H, W) -> (B, d)
        if not aux:
            return self.head(feats)  # (B, n_outputs): inference never touches the auxiliary branch
        return self.head(feats), self.predictor(self.projector(feats))  # (B, n_outputs), (B, proj_dim)


def make_target(model):
    """BYOL target network: a gradient-free copy of backbone + projector, later an EMA of the online one."""
    target = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.projector))
    return target.requires_grad_(False)


def build_model(args, data, device):
    """-> (MABNNet, its BYOL target) on device; channels_last on CUDA (NHWC convolutions run faster there)."""
    backbone, feat_dim = build_backbone(args.backbone, data["in_channels"], args.pretrained, args.width)
    model = MABNNet(backbone, feat_dim, data["n_outputs"], args.proj_hidden, args.proj_dim, data["norm"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, make_target(model)


def autocast(device_type, precision):
    """-> a context factory for forward passes: bf16 autocast on device_type ("cuda", "cpu") when precision is
    "bf16", else a no-op. Gradients are always taken outside it (autograd then runs each op in the dtype its
    forward used)."""
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def ema_update(target, model, tau):
    """target <- tau * target + (1 - tau) * online, for every parameter of backbone + projector."""
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    torch._foreach_lerp_(list(target.parameters()), online, 1 - tau)  # one fused kernel, not one per tensor


def bn_affine_names(model):
    """Names of every BatchNorm weight (gamma) and bias (beta) in the model: the only parameters MABN adapts."""
    return [f"{mod_name}.{p}" for mod_name, mod in model.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine for p in ("weight", "bias")]


def split_params(model):
    """-> (phi: BN affine parameters, frozen: every other parameter and buffer), both {name: tensor}."""
    names = set(bn_affine_names(model))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return ({k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names})


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------
def byol_loss(prediction, target_projection):
    """2 - 2 cos(p, z) per sample: (B, D), (B, D) -> (B,)."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target_projection, dim=-1)).sum(-1)


def main_loss(outputs, y, task):
    """Cross-entropy, or MSE for regression (PovertyMap): outputs (B, n_outputs), y (B,)."""
    return F.cross_entropy(outputs, y) if task == "classification" else F.mse_loss(outputs.view(-1), y.float())


def joint_losses(model, params, target, x, y, augment_fn, task="classification", amp=contextlib.nullcontext):
    """L_main on x (skipped when y is None) and the symmetric BYOL loss on two augmented views of x.

    params=None calls the module as it is (stage 1); a {name: tensor} dict runs it functionally with those
    tensors in place of its own (stages 2-3), so adapted parameters never touch the module. The forward passes
    run under amp() (see autocast), the losses in the dtype of x.
    """
    B = x.shape[0]
    v1, v2 = augment_fn(x), augment_fn(x)
    inputs = torch.cat([v1, v2] if y is None else [x, v1, v2])  # (2B or 3B, C, H, W)
    run = model if params is None else (lambda *a, **k: functional_call(model, params, a, k))
    with amp():
        outputs, predictions = run(inputs, aux=True)
        with torch.no_grad():
            z = target(torch.cat([v1, v2]))  # (2B, proj_dim), no gradient to the target network
    outputs, predictions, z = (t.to(x.dtype) for t in (outputs, predictions, z))  # bf16 -> the input's dtype
    p1, p2 = predictions[-2 * B:-B], predictions[-B:]
    aux = (byol_loss(p1, z[B:]) + byol_loss(p2, z[:B])).mean()  # view 1 predicts view 2 and vice versa
    main = main_loss(outputs[:B], y, task) if y is not None else torch.zeros((), device=x.device)
    return main, aux


# ----------------------------------------------------------------------------------------------------------
# The inner step (Eq. 3), shared by stage 2 (inside the meta-objective) and stage 3 (per-domain adaptation)
# ----------------------------------------------------------------------------------------------------------
def inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps=1, create_graph=True,
               amp=contextlib.nullcontext):
    """Eq. (3): phi~ = phi - alpha * grad_phi L_aux(S; phi), repeated `steps` times. No labels are used.

    With create_graph=True the result stays differentiable w.r.t. phi through the gradient itself (second-order
    MAML); with False the gradient is a constant and d phi~ / d phi is the identity (first-order).
    """
    adapted = dict(phi)
    for _ in range(steps):
        _, loss_aux = joint_losses(model, {**frozen, **adapted}, target, support_x, None, augment_fn, amp=amp)
        grads = torch.autograd.grad(loss_aux, list(adapted.values()), create_graph=create_graph)
        adapted = {k: v - inner_lr * g for (k, v), g in zip(adapted.items(), grads)}
    return adapted


def adapt_domain(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps, amp=contextlib.nullcontext):
    """Adapt one domain (Alg. 1, line 12): Eq. (3) on its k unlabelled images (k, C, H, W), from phi.

    Pure: returns new {name: tensor} affine parameters; the module, phi and the target are left as they were.
    """
    phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad():
        adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps, False, amp)
    return {k: v.detach() for k, v in adapted.items()}


# ----------------------------------------------------------------------------------------------------------
# Baselines' pieces: BN with batch statistics (TENT, BN re-estimation) and TENT's entropy step
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def bn_batch_stats(model, record=None):
    """Within the block, every BN of the backbone normalises with the statistics of the batch it sees (its affine
    still from the tensors in use); record, if given, receives {module name: (mean, unbiased var)}."""
    names = {m: n for n, m in model.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def hook(mod, inputs, output):
        x = inputs[0].float()  # statistics in fp32, also under bf16 autocast
        dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if record is not None:
            record[f"backbone.{names[mod]}"] = (mean.detach(), x.var(dims, unbiased=True).detach())
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + mod.eps) * mod.weight.view(shape) \
            + mod.bias.view(shape)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def bn_stats_overrides(model, params, support_x):
    """BN statistics re-estimated on a support set (Schneider et al. / Nado et al. 2020): new running buffers."""
    record = {}
    with bn_batch_stats(model, record):
        functional_call(model, params, (support_x,))
    return {k: v for name, (mean, var) in record.items()
            for k, v in ((f"{name}.running_mean", mean), (f"{name}.running_var", var))}


def entropy(logits):
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (B, n_classes) -> (B,)


# ----------------------------------------------------------------------------------------------------------
# Stage 3: one loader over a split, batches grouped by domain; adapt when the domain changes, then predict
# ----------------------------------------------------------------------------------------------------------
def predict(model, target, phi, split, methods, args, device, n_adapt, augment_fn, adapted=None, swap=None):
    """Predict every item of split with every method in ONE pass: one loader, batches grouped by domain, a domain's
    first batch opening with its support set (its first n_adapt images in index order, Meta-DMoE's protocol).
    When the domain changes, each method gets its parameters for the domain, all from phi and that support set:
      none: phi | bn_stats: BN statistics re-estimated on the support set | tent: TENT per test batch (whole BN)
      mabn: phi~ = adapt_domain(support set) | mabn_tent[_affine]: TENT from phi~, with batch [stored] statistics
      mabn_unmatched: adapted[swap[d]], another domain's phi~ (adapted: {domain: phi~} computed beforehand).
    TENT (Wang et al. 2021): one entropy step on the backbone's BN affine per test batch, after predicting with it.
    -> {method: (outputs (N, n_outputs), labels (N,))} in the split's index order. Never runs the auxiliary branch.
    """
    amp, frozen = autocast(args.device, args.precision), split_params(model)[1]
    params = {**frozen, **{k: v.detach() for k, v in phi.items()}}
    first = max(args.eval_batch_size, n_adapt)  # a domain's first batch holds its whole support set
    batches = [idx[a:b] for idx in split.by_domain.values()
               for a, b in itertools.pairwise([0, *range(first, len(idx), args.eval_batch_size), len(idx)])]
    affine_names = [f"backbone.{n}" for n in bn_affine_names(model.backbone)]  # TENT adapts the backbone's BN
    outputs, labels, order, current = {m: [] for m in methods}, [], [], None
    from tqdm import tqdm
    loader = make_loader(split.dataset, args, device, batch_sampler=batches)
    benchmark = torch.backends.cudnn.benchmark  # batch sizes vary with the domains here: autotuning cuDNN for
    torch.backends.cudnn.benchmark = False  # every new shape would cost more than it saves
    for idx, (x, y) in tqdm(zip(batches, loader), total=len(batches), desc=f"stage 3 {split.name}", leave=False,
                            disable=None):
        x, d = to_device(x, device), int(split.domains[idx[0]])
        if d != current:  # a new domain: adapt on its support set (Alg. 1, line 12), set up every method
            current, support_x, state = d, x[:n_adapt], {}  # (k, C, H, W)
            if any(m in ("mabn", "mabn_tent", "mabn_tent_affine") for m in methods):
                phi_d = adapted[d] if adapted else adapt_domain(model, phi, frozen, target, support_x, augment_fn,
                                                                args.inner_lr, args.inner_steps, amp)
            for m in methods:
                if m == "bn_stats":
                    p = {**params, **bn_stats_overrides(model, params, support_x)}
                elif m == "mabn_unmatched":
                    p = {**params, **adapted[swap[d]]}
                else:
                    p = {**params, **phi_d} if m.startswith("mabn") else params
                affine = {k: p[k].detach().clone().requires_grad_(True) for k in affine_names} if m in TENT_OF else {}
                state[m] = (p, affine, torch.optim.Adam(affine.values(), lr=args.tent_lr) if affine else None)
        for m, (p, affine, opt) in state.items():
            if opt is None:
                with torch.no_grad(), amp():
                    out = functional_call(model, p, (x,))  # main branch only
            else:
                batch_stats = bn_batch_stats(model) if TENT_OF[m] == "batch" else contextlib.nullcontext()
                with torch.enable_grad(), batch_stats:
                    with amp():
                        out = functional_call(model, {**p, **affine}, (x,))
                    opt.zero_grad(set_to_none=True)
                    entropy(out.float()).mean().backward()  # TENT: predict with this forward, then update
                    opt.step()
            outputs[m].append(out.detach().float())  # stays on the device: no host sync per batch
        labels.append(y), order.extend(idx)
    torch.backends.cudnn.benchmark = benchmark
    inverse = torch.argsort(torch.tensor(order))
    return {m: (torch.cat(outs).cpu()[inverse], torch.cat(labels)[inverse]) for m, outs in outputs.items()}


def support_set(split, d_indices, n_adapt):
    """The first n_adapt images of a domain, in index order (Meta-DMoE's protocol): (k, C, H, W)."""
    return torch.stack([split.dataset[i][0] for i in d_indices[:n_adapt]])


def derangement(n, gen):
    """A random permutation of range(n) with no fixed point (n >= 2), for the unmatched analysis (Table 3)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        if not (perm == torch.arange(n)).any():
            return perm.tolist()


def evaluate_methods(model, target, phi, data, split, args, device, methods=("none", "mabn"), n_adapt=None,
                     log=print):
    """-> {method: metrics} on split (methods: see predict), every domain starting from the affine phi and every
    method adapting on the same support set of a domain (its first n_adapt images)."""
    model.eval(), target.eval()
    n_adapt, by_domain = n_adapt or args.n_adapt, split.by_domain
    if data["task"] != "classification" and any(m in TENT_OF for m in methods):
        log("note: tent and mabn_tent* minimise prediction entropy, which regression does not have: skipped")
        methods = [m for m in methods if m not in TENT_OF]
    if "mabn_unmatched" in methods and len(by_domain) < 2:
        log("note: mabn_unmatched needs two or more domains: skipped")
        methods = [m for m in methods if m != "mabn_unmatched"]
    uses_support = [m for m in methods if m not in ("none", "tent")]
    short = {d: len(idx) for d, idx in by_domain.items() if len(idx) < n_adapt}
    if short and uses_support:
        log(f"note: {len(short)} domains of split '{split.name}' have fewer than n_adapt={n_adapt} images "
            f"(fewest: {min(short.values())}): they adapt on all they have")
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    augment_fn = lambda x: augment(x, gen, **args.aug)  # noqa: E731
    adapted, swap = None, None
    if "mabn_unmatched" in methods:  # every domain's phi~ is needed before the pass: adapt them all first
        frozen = split_params(model)[1]
        adapted = {d: adapt_domain(model, phi, frozen, target, to_device(support_set(split, idx, n_adapt), device),
                                   augment_fn, args.inner_lr, args.inner_steps, autocast(args.device, args.precision))
                   for d, idx in by_domain.items()}
        perm = derangement(len(by_domain), torch.Generator().manual_seed(args.seed))
        swap = {d: list(by_domain)[j] for d, j in zip(by_domain, perm)}
    results = {}
    for method, (outputs, labels) in predict(model, target, phi, split, methods, args, device, n_adapt, augment_fn,
                                             adapted, swap).items():
        results[method] = data["evaluate"](split, outputs, labels)
        if short and method in uses_support:
            results[method]["short_domains"] = short  # {domain: images}, each adapted on all of its images
    return results


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (written atomically, loaded with weights_only=True) and the epoch loop both stages share
# ----------------------------------------------------------------------------------------------------------
STAGE_FLAGS = {1: ("dataset", "seed", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay",
                   "aux_weight", "ema", "max_steps", "img_size", "proj_hidden", "proj_dim", "pretrained", "width",
                   "target_domain"),
               2: ("meta_epochs", "n_support", "n_query", "inner_lr", "outer_lr", "inner_steps", "first_order")}


def stage_flags(args, stage):
    keys = STAGE_FLAGS[1] + (STAGE_FLAGS[2] if stage == 2 else ())
    return {k: getattr(args, k) for k in keys}


def save_atomic(obj, path):
    """Write to a temporary file, then rename over path: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, args, stage):
    """The checkpoint at path, or None if there is none; exits with one line if it is unreadable or stale."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a checkpoint
        sys.exit(f"error: cannot read checkpoint {path} ({type(e).__name__}); delete it or pick another --out_dir")
    want = stage_flags(args, stage)
    diff = {k: (ckpt["flags"].get(k), v) for k, v in want.items() if ckpt["flags"].get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} in file vs {b!r} now" for k, (a, b) in diff.items())
        sys.exit(f"error: checkpoint {path} was made with other flags ({what}); use another --out_dir")
    return ckpt


def peak_gib(device):
    """Peak GPU memory allocated since the last reset, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


LOG_EVERY = 50  # steps between log points; between them the training loop never waits on the device


def read_back(pending, sums, where, path):
    """A log point: the losses of the pending steps [(step number, {name: scalar tensor})] come to the host in ONE
    sync; a non-finite one stops the run; the rest are added to sums {name: float}. Empties pending."""
    if not pending:
        return
    rows = torch.stack([torch.stack([v.float() for v in losses.values()]) for _, losses in pending]).tolist()
    for (step_no, losses), row in zip(pending, rows):
        if not all(math.isfinite(v) for v in row):
            values = ", ".join(f"{k}={v}" for k, v in zip(losses, row))
            sys.exit(f"error: {where}, step {step_no}: non-finite loss ({values}); the last good checkpoint is {path}; "
                     f"lower the learning rate")
        for k, v in zip(losses, row):
            sums[k] = sums.get(k, 0.0) + v
    pending.clear()


def fit(stage, model, target, opt, gens, epoch_batches, step, n_epochs, val_method, data, args, device, log):
    """Run `step` over `epoch_batches(epoch)` for n_epochs; after each epoch score val_method on the validation
    domains, keep the best (model selection, WILDS' OOD validation), checkpoint atomically. Resumes an
    interrupted stage from its last finished epoch; a finished stage is loaded, not rerun.
    -> {steps, img_per_s, peak_gib}: steps taken; speed and peak GPU memory of the epochs run now."""
    path = os.path.join(args.out_dir, f"stage{stage}.pt")
    ckpt = load_checkpoint(path, args, stage)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"]), target.load_state_dict(ckpt["target"])
        if ckpt["done"]:
            log(f"stage {stage}: loaded finished checkpoint {path}")
            return dict(steps=ckpt["steps"])
        opt.load_state_dict(ckpt["opt"])
        for g, state in zip(gens, ckpt["gens"]):
            g.set_state(state)
        log(f"stage {stage}: resuming after epoch {ckpt['epoch'] + 1} ({path})")
    start, steps, best = (0, 0, (-math.inf, None)) if ckpt is None else \
        (ckpt["epoch"] + 1, ckpt["steps"], (ckpt["best_metric"], ckpt["best"]))
    kept = set(bn_affine_names(model)) if stage == 2 else set(model.state_dict())  # what model selection keeps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total_images, total_s = 0, 0.0
    from tqdm import tqdm  # comes with wilds; shown only on a terminal
    for epoch in range(start, n_epochs):
        t0, n_images, n_steps, sums, pending = time.time(), 0, 0, {}, []
        where = f"stage {stage}, epoch {epoch + 1}"
        bar = tqdm(epoch_batches(epoch), desc=where, leave=False, disable=None)
        for batch in bar:
            if args.max_steps is not None and steps >= args.max_steps:
                break
            losses, n = step(batch)  # {name: scalar tensor, left on the device}, images used
            n_images, n_steps, steps = n_images + n, n_steps + 1, steps + 1
            pending.append((steps, losses))
            if len(pending) == LOG_EVERY:
                read_back(pending, sums, where, path)
                bar.set_postfix_str(" ".join(f"{k} {v / n_steps:.4f}" for k, v in sums.items()))
        read_back(pending, sums, where, path)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's time includes its queued GPU work
        seconds = time.time() - t0
        total_images, total_s = total_images + n_images, total_s + seconds
        phi = split_params(model)[0]
        metric = evaluate_methods(model, target, phi, data, data["splits"]["val"], args, device, (val_method,),
                                  log=log)[val_method][data["val_metric"]]
        if best[1] is None or metric > best[0]:
            best = (metric, {k: v.detach().clone() for k, v in model.state_dict().items() if k in kept})
        means = " ".join(f"{k} {v / max(1, n_steps):.4f}" for k, v in sums.items())
        memory = f" | peak {peak_gib(device):.1f} GiB" if device.type == "cuda" else ""
        log(f"stage {stage} epoch {epoch + 1}/{n_epochs}: {means} | {n_images / seconds:.0f} img/s{memory} | "
            f"val {val_method} {data['val_metric']} {metric:.4f}")
        if epoch + 1 < n_epochs:  # resumable from here; the last epoch is saved as the finished stage below
            save_atomic(dict(done=False, stage=stage, epoch=epoch, steps=steps, model=model.state_dict(),
                             target=target.state_dict(), opt=opt.state_dict(), gens=[g.get_state() for g in gens],
                             best_metric=best[0], best=best[1], flags=stage_flags(args, stage)), path)
    if best[1] is not None:
        model.load_state_dict(best[1], strict=False)
    save_atomic(dict(done=True, stage=stage, steps=steps, model=model.state_dict(), target=target.state_dict(),
                     flags=stage_flags(args, stage)), path)
    return dict(steps=steps, img_per_s=round(total_images / total_s, 1) if total_s else None,
                peak_gib=peak_gib(device))


# ----------------------------------------------------------------------------------------------------------
# Stage 1: joint training of the whole network on all source domains mixed, L = L_main + lambda L_aux (Eq. 2).
# ----------------------------------------------------------------------------------------------------------
def joint_step(model, target, opt, x, y, augment_fn, aux_weight, ema, task="classification",
               amp=contextlib.nullcontext):
    """One step of Eq. (2) on a labelled batch x (B, C, H, W), y (B,), then the EMA update of the BYOL target.
    -> (L_main, L_aux), detached, still on the device (reading them would wait for the step to finish)."""
    loss_main, loss_aux = joint_losses(model, None, target, x, y, augment_fn, task, amp)
    opt.zero_grad(set_to_none=True)
    (loss_main + aux_weight * loss_aux).backward()  # Eq. (2)
    opt.step()
    ema_update(target, model, ema)
    return loss_main.detach(), loss_aux.detach()


def train_joint(model, target, data, args, device, log):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    gen, sampler_gen = torch.Generator(device).manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    train = data["splits"]["train"].dataset
    # The shuffle has its own generator, so a resumed run draws the same orders as an uninterrupted one.
    loader = make_loader(train, args, device, batch_size=args.batch_size, drop_last=True,
                         sampler=torch.utils.data.RandomSampler(train, generator=sampler_gen))
    augment_fn, amp = (lambda x: augment(x, gen, **args.aug)), autocast(args.device, args.precision)

    def epoch_batches(epoch):
        for group in opt.param_groups:  # the paper halves the LR after a fixed epoch
            group["lr"] = args.lr * (0.5 if epoch >= args.lr_decay_epoch else 1.0)
        model.train(), target.train()
        return loader

    def step(batch):
        x, y = to_device(batch[0], device), batch[1].to(device, non_blocking=True)
        loss_main, loss_aux = joint_step(model, target, opt, x, y, augment_fn, args.aux_weight, args.ema,
                                         data["task"], amp)
        return {"main": loss_main, "aux": loss_aux}, len(x)

    return fit(1, model, target, opt, [gen, sampler_gen], epoch_batches, step, args.epochs, "none", data, args,
               device, log)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: meta-auxiliary training of the BN affine parameters (Algorithm 1, Eq. 3-4).
# ----------------------------------------------------------------------------------------------------------
def meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn, args, task="classification",
              amp=contextlib.nullcontext):
    """Eq. (4) objective: L_main(Q; phi~) + lambda L_aux(Q; phi~), phi~ adapted on S. Differentiable in phi."""
    adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, args.inner_lr, args.inner_steps,
                         create_graph=not args.first_order, amp=amp)
    loss_main, loss_aux = joint_losses(model, {**frozen, **adapted}, target, query_x, query_y, augment_fn, task,
                                       amp)
    return loss_main + args.aux_weight * loss_aux, loss_main, loss_aux


def meta_step(model, phi, frozen, target, opt, support_x, query_x, query_y, augment_fn, args,
              task="classification", amp=contextlib.nullcontext):
    """One outer step of Alg. 1 on one episode: Eq. (4) through the inner step, then opt (Adam, beta) on phi.
    -> (meta loss, L_main, L_aux) on the query set, detached, still on the device."""
    loss, loss_main, loss_aux = meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn,
                                          args, task, amp)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # Eq. (4): gradient w.r.t. the ORIGINAL phi, through the inner step
    opt.step()
    return loss.detach(), loss_main.detach(), loss_aux.detach()


def n_support_of(n, n_support, n_query):
    """How many of an episode's n images are its support set: n_support of a full episode, else in proportion
    (at least one support and one query image)."""
    return min(max(1, round(n * n_support / (n_support + n_query))), n - 1)


def episodes(split, n_support, n_query, n_episodes, gen):
    """Yield (domain, support indices, query indices): one source domain per episode (a task), disjoint sets.

    Domains are drawn in proportion to their size; a domain smaller than n_support + n_query gives what it
    has, split by n_support_of (domains of a single image are skipped).
    """
    by_domain = {d: torch.tensor(idx) for d, idx in split.by_domain.items() if len(idx) >= 2}
    domains = list(by_domain)
    sizes = torch.tensor([len(by_domain[d]) for d in domains], dtype=torch.float)
    for _ in range(n_episodes):
        d = domains[int(torch.multinomial(sizes, 1, generator=gen))]
        idx = by_domain[d][torch.randperm(len(by_domain[d]), generator=gen)]
        n = min(len(idx), n_support + n_query)
        n_s = n_support_of(n, n_support, n_query)
        yield d, idx[:n_s].tolist(), idx[n_s:n].tolist()


class EpisodeSampler:
    """Stage 2's batch sampler: every batch is one episode, its support indices then its query indices. Episodes
    are drawn afresh at each pass, so one DataLoader (and its workers) serves every meta-epoch."""

    def __init__(self, split, n_support, n_query, n_episodes, gen):
        self.episode_args = (split, n_support, n_query, n_episodes, gen)

    def __iter__(self):
        return (support + query for _, support, query in episodes(*self.episode_args))

    def __len__(self):
        return self.episode_args[3]


def train_meta(model, target, data, args, device, log):
    phi, frozen = split_params(model)
    model.requires_grad_(False)  # freeze every weight matrix; only phi (BN gamma, beta) learns
    for p in phi.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(phi.values(), lr=args.outer_lr, fused=device.type == "cuda")
    gen, episode_gen = torch.Generator(device).manual_seed(args.seed + 2), torch.Generator().manual_seed(args.seed + 2)
    train = data["splits"]["train"]
    n_episodes = max(1, len(train.domains) // (args.n_support + args.n_query))  # an epoch sees ~every image once
    loader = make_loader(train.dataset, args, device,
                         batch_sampler=EpisodeSampler(train, args.n_support, args.n_query, n_episodes, episode_gen))
    augment_fn, amp = (lambda x: augment(x, gen, **args.aug)), autocast(args.device, args.precision)
    small = [d for d, idx in train.by_domain.items() if len(idx) < args.n_support + args.n_query]
    if small:
        log(f"note: {len(small)} source domains have fewer than n_support + n_query images: their episodes split "
            f"what they have in the same proportion (no image in both sets); single-image domains are skipped")

    def epoch_batches(epoch):
        model.eval(), target.eval()  # BN uses (and keeps) the source statistics from stage 1
        return loader

    def step(episode):  # one domain: the first n_s images are the support set, the rest the query set
        x, y = to_device(episode[0], device), episode[1].to(device, non_blocking=True)
        n_s = n_support_of(len(x), args.n_support, args.n_query)
        support_x, query_x, query_y = x[:n_s], x[n_s:], y[n_s:]  # (S, C, H, W) without labels, (Q, ...), (Q,)
        loss, loss_main, loss_aux = meta_step(model, phi, frozen, target, opt, support_x, query_x, query_y,
                                              augment_fn, args, data["task"], amp)
        return {"meta": loss, "main": loss_main, "aux": loss_aux}, len(x)

    return fit(2, model, target, opt, [gen, episode_gen], epoch_batches, step, args.meta_epochs, "mabn", data, args,
               device, log)


# ----------------------------------------------------------------------------------------------------------
# main: per seed, data -> stage 1 -> stage 2 -> stage 3 on every target domain; then a table over seeds
# ----------------------------------------------------------------------------------------------------------
def run_seed(args, data, device, log):
    """The whole pipeline for args.seed, in args.out_dir. -> its results (also written to results.json)."""
    torch.manual_seed(args.seed)
    model, target = build_model(args, data, device)
    t0 = time.time()
    stages = {"stage1": train_joint(model, target, data, args, device, log)}
    stages["stage1"]["time_s"], t0 = time.time() - t0, time.time()
    stage1_phi = {k: v.detach().clone() for k, v in split_params(model)[0].items()}
    stages["stage2"] = train_meta(model, target, data, args, device, log)
    stages["stage2"]["time_s"], t0 = time.time() - t0, time.time()

    # Stage 3: every target domain adapted from the same meta-learned phi, then predicted; the baselines too.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    splits, meta_phi = data["splits"], split_params(model)[0]
    evaluate = lambda phi, split, methods, **kw: evaluate_methods(  # noqa: E731
        model, target, phi, data, splits[split], args, device, methods, log=log, **kw)
    results = {"target": evaluate(meta_phi, "test", [m for m in args.methods if m != "no_meta"])}
    n_test, seconds = len(splits["test"].domains), time.time() - t0
    stages["stage3"] = dict(img_per_s=round(n_test / seconds, 1), peak_gib=peak_gib(device))
    log(f"stage 3: {n_test} target images, adapted and predicted by {len(results['target'])} methods in one pass: "
        f"{n_test / seconds:.0f} img/s" + (f" | peak {peak_gib(device):.1f} GiB" if device.type == "cuda" else ""))
    results["target"]["stage1"] = evaluate(stage1_phi, "test", ("none",))["none"]
    if "no_meta" in args.methods:  # Fig. 5: the stage-1 model adapted directly, without meta-auxiliary training
        for k in args.no_meta_n_adapt or [args.n_adapt]:
            results["target"][f"no_meta@{k}"] = evaluate(stage1_phi, "test", ("mabn",), n_adapt=k)["mabn"]
    if "id_test" in splits:  # the stage-1 model on held-out images of the source domains: the size of the shift
        results["source_heldout"] = evaluate(stage1_phi, "id_test", ("none",))["none"]
    stages["stage3"]["time_s"] = time.time() - t0
    out = dict(flags=vars(args), seed=args.seed, device=str(device), stages=stages, **results)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    return out


def summarize(per_seed):
    """{method: {metric: (mean, std over seeds)}} for the target split (and the source held-out images)."""
    rows = {m: [r["target"][m] for r in per_seed] for m in per_seed[0]["target"]}
    if "source_heldout" in per_seed[0]:
        rows["stage1 (source id_test)"] = [r["source_heldout"] for r in per_seed]
    return {m: {k: (torch.tensor([r[k] for r in rs]).mean().item(),
                    torch.tensor([r[k] for r in rs]).std().item() if len(rs) > 1 else 0.0)
                for k in rs[0] if k not in ("per_domain", "short_domains")} for m, rs in rows.items()}


def main(args, data=None):
    """Run every seed of args.seeds (each in <out_dir>/seed<k>/, reusing finished stages) and print one table
    method x metric, mean +- std over seeds. `data` (as load_data returns it) replaces --dataset's data."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed training shapes: let cuDNN pick its fastest
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log_file = open(os.path.join(args.out_dir, "log.txt"), "a")
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir {args.out_dir} ({e.strerror}); pick a writable folder")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n"), log_file.flush()

    log("flags: " + json.dumps(vars(args), sort_keys=True))
    t0 = time.time()
    data = load_data(args) if data is None else data
    for name, split in data["splits"].items():
        log(f"data: {name}: {len(split.domains)} images, {len(torch.unique(split.domains))} domains")
    log(f"data: ready in {time.time() - t0:.1f} s")
    per_seed = []
    for seed in args.seeds:
        seed_args = copy.copy(args)
        seed_args.seed, seed_args.out_dir = seed, os.path.join(args.out_dir, f"seed{seed}")
        os.makedirs(seed_args.out_dir, exist_ok=True)
        per_seed.append(run_seed(seed_args, data, device, log))
        log(f"seed {seed}: " + ", ".join(f"{name} {s['time_s']:.1f} s" + (f" ({s['img_per_s']:.0f} img/s)"
                                         if s.get("img_per_s") else "") for name, s in per_seed[-1]["stages"].items()))

    summary = summarize(per_seed)
    names = list(next(iter(summary.values())))
    many = len(args.seeds) > 1
    w = max(map(len, names)) + (10 if many else 2)
    cell = (lambda m, s: f"{m:.4f} ± {s:.3f}") if many else (lambda m, s: f"{m:.4f}")  # noqa: E731
    log(f"\n{'method':<24}" + "".join(f"{n:>{w}}" for n in names) + f"   (target domains, split 'test', "
        f"{len(args.seeds)} seed{'s' if many else ''}{': mean ± std' if many else ''})")
    for method, metrics in summary.items():
        log(f"{method:<24}" + "".join(f"{cell(*metrics[n]):>{w}}" for n in names))
    out = dict(flags=vars(args), seeds=args.seeds, summary=summary, per_seed=per_seed)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    log_file.close()
    return out


if __name__ == "__main__":
    main(parse_args())

