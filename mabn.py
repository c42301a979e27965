"""MABN: Test-Time Domain Adaptation by Learning Domain-Aware Batch Normalization (AAAI 2024).

arXiv 2312.10165. A single-file reference implementation. The method in three lines:
  1. Train backbone and linear head jointly with a BYOL auxiliary branch on the sources (Eq. 2).
  2. Freeze the weights and BN statistics; meta-learn only the BN affine (gamma, beta) so that one
     BYOL step on a domain's unlabelled support set lowers the loss on its query set (Eq. 3-4).
  3. At test time, per target domain: one BYOL step on k unlabelled images, then predict it all.
Commands:
  python mabn.py                        # the offline default benchmark (digits, 36 domains)
  python mabn.py --dataset iwildcam --root_dir DATA
  python mabn.py --methods all --n_adapt 32 1 2 4 8 16 64 --seeds 0 1 2 3 4   # the paper's analyses
  python mabn.py --dataset fmow --help  # every flag, its meaning, the dataset's value
  python -m pytest -q test_mabn.py
  python test_mabn.py --speed           # the speed targets, on a CUDA device
"""
# ======================== BEGIN METHOD ========================
# All of MABN as one copyable block, on torch alone. Every function is pure in its arguments:
# adapted parameters are {name: tensor} dicts run through torch.func.functional_call.
# phi: the BN affine (gamma, beta); frozen: every other parameter and buffer.
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

def mlp(d_in, d_hidden, d_out):
    """BYOL projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(),
                         nn.Linear(d_hidden, d_out))

class MABNNet(nn.Module):
    """backbone (with BN) -> pooled feature -> main head (one linear layer, no BN), and the
    auxiliary branch: pooled feature -> BYOL projector -> predictor."""
    def __init__(self, backbone, feat_dim, n_outputs, proj_hidden=4096, proj_dim=256):
        super().__init__()
        self.backbone = backbone  # (B, C, H, W) -> (B, feat_dim)
        self.head = nn.Linear(feat_dim, n_outputs)
        self.projector = mlp(feat_dim, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)

    def forward(self, x, aux=False):
        feats = self.backbone(x)  # (B, feat_dim)
        if not aux:
            return self.head(feats)  # (B, n_outputs): inference never runs the auxiliary branch
        return self.head(feats), self.predictor(self.projector(feats))  # and (B, proj_dim)

def make_target(model):
    """BYOL's target network: a gradient-free copy of backbone + projector, the online one's EMA."""
    target = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.projector))
    return target.requires_grad_(False)

def split_params(model):
    """-> (phi: every BatchNorm weight (gamma) and bias (beta), all that MABN adapts; frozen: every
    other parameter and buffer), both {name: tensor}."""
    bn = {f"{name}.{p}" for name, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    phi = {k: v for k, v in state.items() if k in bn}
    return phi, {k: v for k, v in state.items() if k not in bn}

def byol_loss(prediction, target_projection):
    """2 - 2 cos(p, z) per sample: (B, D), (B, D) -> (B,)."""
    cos = (F.normalize(prediction, dim=-1) * F.normalize(target_projection, dim=-1)).sum(-1)
    return 2 - 2 * cos

def main_loss(outputs, y, task="classification"):
    """Cross-entropy, or MSE for regression (PovertyMap): outputs (B, n_outputs), y (B,)."""
    if task == "classification":
        return F.cross_entropy(outputs, y)
    return F.mse_loss(outputs.view(-1), y.float().view(-1))

def batch_statistics(model):
    """{name: None} for the backbone's BN statistics: a forward with these normalises each batch
    with its own statistics, leaving the running ones alone (stage 1's views; TENT)."""
    return {f"backbone.{name}.{buffer}": None for name, m in model.backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")}

def joint_losses(model, params, target, x, y, augment_fn, task="classification"):
    """-> (L_main on the images x, or 0 if y is None; L_aux: BYOL between two augmented views of x,
    symmetrised). params {name: tensor} replace the module's tensors (stages 2-3). In training mode
    (stage 1) the backbone's running statistics come from x alone, the source images."""
    v1, v2 = augment_fn(x)  # (B, C, H, W) each: every image its own draw of BYOL's two views
    views = torch.cat([v1, v2])  # (2B, C, H, W)
    view_params = {**(params or {}), **(batch_statistics(model) if model.training else {})}
    _, predictions = functional_call(model, view_params, (views,), {"aux": True})  # (2B, proj_dim)
    with torch.no_grad():
        z = target(views)  # (2B, proj_dim): the target network gets no gradient
    p1, p2 = predictions.chunk(2)
    z1, z2 = z.chunk(2)
    loss_aux = (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()  # each view predicts the other's
    if y is None:
        return torch.zeros((), device=x.device), loss_aux
    outputs = functional_call(model, params or {}, (x,))  # (B, n_outputs)
    return main_loss(outputs, y, task), loss_aux

@torch.no_grad()
def ema_update(target, model, tau):
    """BYOL target <- tau * target + (1 - tau) * online, for backbone + projector's parameters."""
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    torch._foreach_lerp_(list(target.parameters()), online, 1 - tau)  # one fused kernel

def joint_step(model, target, opt, x, y, augment_fn, aux_weight=0.1, tau=0.99,
               task="classification"):
    """Stage 1, one step of Eq. (2) on a labelled batch x (B, C, H, W), y (B,): the whole network on
    L_main + lambda L_aux, then the target's EMA. -> (L_main, L_aux), detached, on the device."""
    loss_main, loss_aux = joint_losses(model, None, target, x, y, augment_fn, task)
    opt.zero_grad(set_to_none=True)
    (loss_main + aux_weight * loss_aux).backward()  # Eq. (2)
    opt.step()
    ema_update(target, model, tau)
    return loss_main.detach(), loss_aux.detach()

def inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps=1,
               create_graph=True):
    """Eq. (3): phi~ = phi - alpha * grad_phi L_aux(S; phi), `steps` times, on unlabelled images
    support_x (S, C, H, W); create_graph: phi~ differentiable through the gradient (2nd order)."""
    adapted = dict(phi)
    for _ in range(steps):
        params = {**frozen, **adapted}
        _, loss_aux = joint_losses(model, params, target, support_x, None, augment_fn)
        grads = torch.autograd.grad(loss_aux, list(adapted.values()), create_graph=create_graph)
        adapted = {k: v - inner_lr * g for (k, v), g in zip(adapted.items(), grads)}  # Eq. (3)
    return adapted

def meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn, inner_lr,
              aux_weight=0.1, inner_steps=1, first_order=False, task="classification"):
    """Eq. (4)'s objective: L_main(Q; phi~) + lambda L_aux(Q; phi~), phi~ adapted on the support set
    by Eq. (3); differentiable in the original phi. -> (objective, L_main, L_aux)."""
    adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, inner_steps,
                         create_graph=not first_order)
    params = {**frozen, **adapted}
    loss_main, loss_aux = joint_losses(model, params, target, query_x, query_y, augment_fn, task)
    return loss_main + aux_weight * loss_aux, loss_main, loss_aux

def meta_step(model, phi, frozen, target, opt, episodes, augment_fn, **meta_kw):
    """Stage 2, one outer step of Alg. 1 on a meta batch: episodes = [(support_x, query_x, query_y),
    ...], one per sampled source domain. Eq. (4): the gradient of the SUMMED objective (Alg. 1's
    L_B) w.r.t. the ORIGINAL phi through each inner step, then opt's step (Adam, delta). BN must
    be in eval mode. -> per-episode means of the losses, detached."""
    opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=episodes[0][0].device)
    for support_x, query_x, query_y in episodes:
        losses = meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn,
                           **meta_kw)
        losses[0].backward()  # Eq. (4) episode by episode: the gradients add up to the sum's
        totals += torch.stack(losses).detach()
    opt.step()
    return totals / len(episodes)

def adapt_domain(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps=1):
    """Alg. 1, line 12, first half: Eq. (3) from the meta-learned phi on a target domain's k
    unlabelled images support_x (k, C, H, W). -> phi~, detached, for predict."""
    phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad():
        adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps,
                             create_graph=False)
    return {k: v.detach() for k, v in adapted.items()}

@torch.no_grad()
def predict(model, params, x):
    """Alg. 1, line 12, second half: the main head's outputs (B, n_outputs) for images x
    (B, C, H, W) with params, e.g. {**frozen, **phi~}. The model's BN must be in eval mode."""
    return functional_call(model, params, (x,))
# ======================== END METHOD ========================
import argparse, functools, glob, json, logging, math, os, sys, time  # noqa: E401, E402
from statistics import mean  # noqa: E402
from typing import NamedTuple  # noqa: E402

from tqdm import tqdm  # noqa: E402 (comes with wilds)

log = logging.getLogger("mabn").info  # main: to the terminal and log.txt

# --- Baselines and the paper's analyses (Tables 3-4, Fig. 5) ---
@torch.no_grad()
def reestimate_bn_stats(model, params, support_x):
    """The backbone's BN statistics re-estimated on support_x (Schneider et al. 2020)."""
    bns = {m: f"backbone.{n}" for n, m in model.backbone.named_modules()
           if isinstance(m, nn.BatchNorm2d)}
    stats = {}

    def record(bn, inputs):
        stats[f"{bns[bn]}.running_mean"] = inputs[0].mean((0, 2, 3))  # (B, C, H, W) -> (C,)
        stats[f"{bns[bn]}.running_var"] = inputs[0].var((0, 2, 3))  # unbiased, as BN stores it
    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        functional_call(model, {**params, **batch_statistics(model)}, (support_x,))
    finally:
        for handle in handles:
            handle.remove()
    return stats

def tent_setup(phi, lr=1e-3):
    """TENT's collect_params, setup_optimizer (Adam) on phi's backbone part. -> (leaves, opt)"""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()
              if k.startswith("backbone.")}
    return leaves, torch.optim.Adam(leaves.values(), lr, betas=(0.9, 0.999))

def tent_forward_and_adapt(model, params, leaves, opt, x):
    """TENT's forward_and_adapt (Wang et al. 2021): predict x, then step on its mean entropy."""
    with torch.enable_grad():
        logits = functional_call(model, {**params, **leaves}, (x,))
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        grads = torch.autograd.grad(entropy, list(leaves.values()))
    for leaf, grad in zip(leaves.values(), grads):
        leaf.grad = grad
    opt.step()
    return logits.detach()

class Row(NamedTuple):  # a row of stage 3's table: how it predicts a target domain
    start: str  # the model: stage1, stage2, or control (stage 2 without the inner step)
    stats: str  # BN statistics: source (stage 1's), support (the k images'), batch (each batch's)
    step: bool = False  # MABN's step (Eq. 3) on k images of the domain
    tent: bool = False  # TENT on each test batch, online (after the step if there is one)
    other: bool = False  # the step on the NEXT domain's images and draws (Table 3: unmatched)

ROWS = {
    "stage1": Row("stage1", "source"),  # ablation: joint training, no adaptation
    "bn_stats": Row("stage1", "support"),  # Schneider et al. 2020
    "tent": Row("stage1", "batch", tent=True),  # TENT as published (Wang et al. 2021)
    "no_meta": Row("stage1", "source", step=True),  # Fig. 5, ablation: no meta-training
    "control": Row("control", "source"),  # stage 2 without its inner step (alpha = 0)
    "stage2": Row("stage2", "source"),  # Table 3, ablation: no adaptation
    "mabn": Row("stage2", "source", step=True),  # MABN; Table 3: matched; Table 4: update affine
    "mabn_bn": Row("stage2", "support", step=True),  # Table 4: MABN, update BN
    "tent_bn": Row("stage2", "batch", tent=True),  # Table 4: TENT, update BN
    "tent_affine": Row("stage2", "source", tent=True),  # Table 4: TENT, update affine
    "mabn_tent_bn": Row("stage2", "support", step=True, tent=True),  # Table 4: MABN + TENT
    "mabn_tent_affine": Row("stage2", "source", step=True, tent=True),  # update BN / affine
    "mabn_unmatched": Row("stage2", "source", step=True, other=True)}  # Table 3: unmatched
assert all(ROWS[row.start] == Row(row.start, "source") for row in ROWS.values())  # plain rows

def row_names(rows, ks):
    """{name: (row, k)}: row@k for each of several k if the row uses k images, else row."""
    names = {}
    for row in rows:
        uses_support = ROWS[row].stats == "support" or ROWS[row].step
        for k in sorted(ks) if uses_support else [None]:
            names[f"{row}@{k}" if k and len(ks) > 1 else row] = (row, k)
    return names

def row_params(row, model, target, phi, frozen, support_x, augment_fn, inner_lr, inner_steps=1):
    """The tensors `row` predicts a domain with, from phi and support_x (k, C, H, W)."""
    stats = ROWS[row].stats
    if stats == "support":  # re-estimated on the k images, then fixed for the domain
        frozen = {**frozen, **reestimate_bn_stats(model, {**frozen, **phi}, support_x)}
    if stats == "batch":  # every batch its own, as TENT runs
        frozen = {**frozen, **batch_statistics(model)}
    if ROWS[row].step:
        phi = adapt_domain(model, phi, frozen, target, support_x, augment_fn, inner_lr, inner_steps)
    return {**frozen, **{k: v.detach() for k, v in phi.items()}}

# --- Data, BYOL's views, backbones ---
class Split:  # dataset[i] -> (x, y, ...); domains[i]: its domain
    def __init__(self, dataset, domains, name):
        self.dataset = dataset
        self.domains = torch.as_tensor(domains)
        self.name = name
        self.by_domain = {int(d): torch.nonzero(self.domains == d).flatten().tolist()
                          for d in torch.unique(self.domains)}

def make_loader(dataset, num_workers, **kw):  # workers kept across epochs
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, **kw,
                                       persistent_workers=num_workers > 0,
                                       pin_memory=torch.cuda.is_available())

def to_device(x, device):  # uint8 photos -> floats in [0, 1]
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x

def make_digits(size=16, n_source=24, n_val=4, n_test=8, per_domain=150, seed=0):
    """The offline benchmark: sklearn's 1797 8x8 digits drawn by "cameras" (domains), each its own
    colours, grating, stroke, pose, blur and noise. -> {split: (x uint8, y, domain)}"""
    from sklearn.datasets import load_digits
    gen = torch.Generator().manual_seed(seed)

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)
    digits = load_digits()
    ink_all = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y_all = torch.tensor(digits.target)
    # 48/12/12/28 % of the drawings (id_test: unused)
    pools = torch.randperm(len(y_all), generator=gen).tensor_split([862, 1078, 1293])
    pools = dict(zip(("train", "id_test", "val", "test"), pools))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = {s: [] for s in pools}
    for d in range(n_source + n_val + n_test):
        if d < n_source:
            take = {"train": int(0.8 * per_domain), "id_test": per_domain - int(0.8 * per_domain)}
        else:
            take = {"val" if d < n_source + n_val else "test": per_domain}
        drawn = {s: pools[s][torch.randperm(len(pools[s]), generator=gen)[:k]]
                 for s, k in take.items()}
        idx = torch.cat(list(drawn.values()))
        ink = F.interpolate(ink_all[idx, None], size=(size, size), mode="bilinear")
        stroke = int(torch.randint(0, 3, (1,), generator=gen))  # 0 thin, 1 as drawn, 2 thick
        if stroke == 2:
            ink = F.max_pool2d(ink, 3, 1, 1)
        elif stroke == 0:
            ink = 0.5 * (ink - F.max_pool2d(-ink, 3, 1, 1))  # half-way to an erosion
        angle = math.radians(float(u(-30, 30)))
        zoom = float(u(0.8, 1.25))
        rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0],
                            [math.sin(angle), math.cos(angle), 0.0]]) / zoom
        grid = F.affine_grid(rot.expand(len(idx), 2, 3), [len(idx), 1, size, size],
                             align_corners=False)
        ink = F.grid_sample(ink, grid, align_corners=False)
        taps = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * float(u(0.1, 1.2)) ** 2))  # a blur
        taps = taps / taps.sum()
        ink = F.conv2d(ink, taps.view(1, 1, 1, 7), padding=(0, 3))
        ink = F.conv2d(ink, taps.view(1, 1, 7, 1), padding=(3, 0))
        grey = float(u(0.2, 0.8))  # the background; the ink lighter or darker
        ink_grey = grey + (1 if grey < 0.5 else -1) * float(u(0.3, 0.6))
        bg, fg = grey + u(-0.2, 0.2, 3), ink_grey + u(-0.2, 0.2, 3)  # both tinted
        freq, theta, amp = float(u(1, 4)), float(u(0, math.pi)), float(u(0, 0.2))  # a grating
        texture = amp * torch.sin(math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
        img = (bg.view(3, 1, 1) + texture * u(-1, 1, 3).view(3, 1, 1)) * (1 - ink)
        img = img + fg.view(1, 3, 1, 1) * ink
        img = img + float(u(0, 0.1)) * torch.randn(img.shape, generator=gen)  # (n, 3, H, W)
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        sizes = [len(part) for part in drawn.values()]
        for (split, part), part_img in zip(drawn.items(), img.split(sizes)):
            out[split].append((part_img, y_all[part], torch.full((len(part),), d)))
    return {s: tuple(torch.cat(t) for t in zip(*parts)) for s, parts in out.items()}

def resize(x, img_size, standardise=False):  # -> (C, img_size, img_size): uint8 photos, floats
    if torch.is_tensor(x):
        return F.interpolate(x[None].float(), (img_size,) * 2, mode="bilinear", antialias=True)[0]
    from torchvision.transforms.functional import pil_to_tensor
    x = pil_to_tensor(x.convert("RGB").resize((img_size,) * 2, 2, reducing_gap=3.0))  # bilinear
    if not standardise:
        return x
    # RxRx1: each channel to mean 0, std 1 (WILDS' transform), before the views' colour changes
    x = x.float() / 255
    std = x.std((1, 2), keepdim=True)
    return (x - x.mean((1, 2), keepdim=True)) / torch.where(std > 0, std, 1.0)

def scatter(src, index, dim=-1, dim_size=None, reduce="sum"):  # torch_scatter's, for wilds
    out = torch.zeros(dim_size, dtype=src.dtype, device=src.device)  # empty groups: 0
    return out.scatter_reduce(0, index, src, reduce=reduce, include_self=False)  # sum or mean

DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]

def load_wilds(args):
    """A WILDS dataset's train, OOD val and OOD test splits, via wilds.get_dataset."""
    name = args.dataset
    where = os.path.abspath(args.root_dir)
    if not args.download and not glob.glob(os.path.join(where, f"{name}_v*", "RELEASE_v*.txt")):
        sys.exit(f"error: no {name} data under {where} (wilds expects a folder {name}_v<version>/ "
                 f"with a RELEASE_v<version>.txt); download it there or pass --download")
    sys.modules.setdefault("outdated", None)  # wilds' version check: network
    sys.modules.setdefault("torch_scatter", argparse.Namespace(scatter=scatter))
    import wilds
    from wilds.common.grouper import CombinatorialGrouper

    def get(**kw):
        try:
            return wilds.get_dataset(name, root_dir=args.root_dir, download=args.download, **kw)
        except (OSError, ValueError) as e:  # a failed download, missing files
            sys.exit(f"error: {name} under {where} is incomplete ({type(e).__name__}: {e})")
    if name == "domainnet":  # leave one out; validation on the sources' test sets
        objs = [get(source_domain=d, target_domain=args.target_domain) for d in DOMAINNET_DOMAINS
                if d != args.target_domain]
        parts = {"train": [(o, "train") for o in objs], "val": [(o, "id_test") for o in objs]}
    else:
        objs = [get()]
        parts = {"train": [(objs[0], "train")], "val": [(objs[0], "val")]}
    parts["test"] = [(objs[0], "test")]
    grouper = CombinatorialGrouper(objs[0], args.domain_fields)
    standardise = args.norm == "per_image"
    transform = functools.partial(resize, img_size=args.img_size, standardise=standardise)
    splits, metadata = {}, {}
    for split, pieces in parts.items():
        subsets = [o.get_subset(s, transform=transform) for o, s in pieces]
        metadata[split] = torch.cat([sub.metadata_array for sub in subsets])
        domains = grouper.metadata_to_group(metadata[split])
        splits[split] = Split(torch.utils.data.ConcatDataset(subsets), domains, split)

    def evaluate(split, outputs, labels):  # WILDS' metrics, and per domain
        y_pred = outputs.argmax(-1) if args.task == "classification" else outputs.view(-1, 1)
        y_true = labels.view(y_pred.shape).to(y_pred.dtype)
        official = objs[0].eval(y_pred, y_true, metadata[split.name])[0]
        per_domain = domain_metrics(outputs, labels, split.domains, args.task)["per_domain"]
        return {**{k: float(v) for k, v in official.items()}, "per_domain": per_domain}
    n_outputs = objs[0].n_classes if args.task == "classification" else 1
    return dict(splits=splits, n_outputs=n_outputs, evaluate=evaluate)

def load_data(args):  # -> dict(splits: {train, val, test}, n_outputs, evaluate)
    if args.dataset != "digits":
        return load_wilds(args)
    splits = {s: Split(torch.utils.data.TensorDataset(x.float() / 255, y), domains, s)
              for s, (x, y, domains) in make_digits(size=args.img_size).items() if s != "id_test"}
    return dict(splits=splits, n_outputs=10, evaluate=lambda split, outputs, y: domain_metrics(
        outputs, y, split.domains))

def domain_metrics(outputs, labels, domains, task="classification"):
    """Accuracy of all images, of the worst domain, per domain; regression: per-domain MSE."""
    if task != "classification":
        squared_error = (outputs.view(-1) - labels.view(-1).float()) ** 2
        return {"per_domain": {int(d): squared_error[domains == d].mean().item()
                               for d in torch.unique(domains)}}
    correct = (outputs.argmax(-1) == labels).float()
    per_domain = {int(d): correct[domains == d].mean().item() for d in torch.unique(domains)}
    return {"acc_avg": correct.mean().item(), "acc_wg": min(per_domain.values()),
            "per_domain": per_domain}

def hue_shift(x, shift):  # RGB (B, 3, H, W) in [0, 1], hue turned by shift (B, 1, 1) of a circle
    value, top = x.max(1)  # HSV: value, and which channel is largest
    delta = value - x.min(1).values
    r, g, b = x.unbind(1)
    safe = delta.clamp_min(1e-8)
    hue = torch.where(top == 0, ((g - b) / safe) % 6, torch.where(top == 1, (b - r) / safe + 2,
                                                                   (r - g) / safe + 4))
    hue = (hue + 6 * shift) % 6  # in sixths of the circle
    saturation = delta / value.clamp_min(1e-8)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (n + hue[:, None]) % 6
    return value[:, None] * (1 - saturation[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1)))

def augment(x, gen, min_crop, colour, noise, blur_p, solarize_p):
    """One of BYOL's views (Grill et al. 2020) of x (B, C, H, W), each image its own draw; colour:
    "rgb" (photos in [0, 1]), "standardised" (per-channel gain and shift) or None."""
    B, C, H, W = x.shape

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=x.device)

    def chance(p):  # (B, 1, 1, 1): True with probability p, per image
        return (rand(B) < p).view(B, 1, 1, 1)

    def uniform(lo, hi, *shape):  # (B, *shape)
        return lo + (hi - lo) * rand(B, *shape)
    # random resized crop: area min_crop..1, aspect 3/4..4/3 log-uniform, the first of 10 draws
    # that fits, else the whole image (torchvision's); then a horizontal flip, p 0.5
    area = min_crop + (1 - min_crop) * rand(10, B)
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * rand(10, B))
    sides = torch.stack([(area * aspect).sqrt(), (area / aspect).sqrt()], -1)  # (10, B, 2)
    fits = (sides <= 1).all(-1)
    sides = torch.where(fits.any(0)[:, None], sides[fits.int().argmax(0), torch.arange(B)], 1.0)
    centre = (2 * rand(B, 2) - 1) * (1 - sides)
    mirror = torch.where(rand(B) < 0.5, -1.0, 1.0)
    zero = torch.zeros(B, device=x.device)
    theta = torch.stack([torch.stack([sides[:, 0] * mirror, zero, centre[:, 0]], 1),
                         torch.stack([zero, sides[:, 1], centre[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), [B, C, H, W], align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if colour == "rgb":  # p 0.8: brightness, contrast, saturation, hue, each image its own order
        factors = [uniform(0.6, 1.4, 1, 1, 1), uniform(0.6, 1.4, 1, 1, 1),
                   uniform(0.8, 1.2, 1, 1, 1), uniform(-0.1, 0.1, 1, 1)]
        order = torch.argsort(rand(B, 4), 1)
        jittered = chance(0.8)

        def grey(x):  # (B, 1, H, W)
            return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]

        def blend(x, f, base):  # torchvision's: f x + (1 - f) base, in [0, 1]
            return (f * x + (1 - f) * base).clamp(0, 1)
        ops = [lambda x, f: (f * x).clamp(0, 1),
               lambda x, f: blend(x, f, grey(x).mean((2, 3), keepdim=True)),
               lambda x, f: blend(x, f, grey(x)),
               hue_shift]
        for slot in range(4):
            for i, (op, factor) in enumerate(zip(ops, factors)):
                pick = jittered & (order[:, slot] == i).view(B, 1, 1, 1)
                x = torch.where(pick, op(x, factor), x)  # all images: a mask, no host sync
        x = torch.where(chance(0.2), grey(x).expand(-1, 3, -1, -1), x)  # colour dropping
    elif colour == "standardised":  # p 0.8: each channel's gain and shift, in its own units
        gain, shift = uniform(0.6, 1.4, C, 1, 1), uniform(-0.4, 0.4, C, 1, 1)
        x = torch.where(chance(0.8), x * gain + shift, x)
    # Gaussian blur: BYOL's kernel of 10 % of the side, sigma 0.1..2 px at 224 px, scaled with H
    radius = max(1, H // 20)
    sigma = uniform(0.1, 2.0) * H / 224
    taps = torch.exp(-torch.arange(-radius, radius + 1.0, device=x.device) ** 2
                     / (2 * sigma[:, None] ** 2))
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, 2 radius + 1)
    blurred = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="reflect")
    blurred = F.conv2d(blurred, taps.view(B * C, 1, 1, -1), groups=B * C)
    blurred = F.conv2d(blurred, taps.view(B * C, 1, -1, 1), groups=B * C)
    x = torch.where(chance(blur_p), blurred.view(B, C, H, W), x)
    if colour == "rgb":
        x = torch.where(chance(solarize_p) & (x >= 0.5), 1 - x, x)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, device=x.device)
    return x

def byol_views(x, gen, min_crop=0.08, colour="rgb", noise=0.0):
    """BYOL's two views: T (blur p 1, no solarisation), T' (blur p 0.1, solarisation p 0.2)."""
    return (augment(x, gen, min_crop, colour, noise, blur_p=1.0, solarize_p=0.0),
            augment(x, gen, min_crop, colour, noise, blur_p=0.1, solarize_p=0.2))

def views_of(args, gen):  # the dataset's BYOL views, drawn from gen
    return functools.partial(byol_views, gen=gen, min_crop=args.min_crop, **args.views)

def turn_and_mirror(x, gen, turns):
    """Each square image turned by a random multiple of 360 / turns degrees, then mirrored with
    p 0.5 (turns 4: rot90 and flips; 2: horizontal and vertical flips)."""
    B = x.shape[0]
    k = torch.randint(0, turns, (B,), generator=gen, device=x.device) * (4 // turns)
    for quarter in (1, 2, 3):
        x = torch.where((k == quarter).view(B, 1, 1, 1), x.rot90(quarter, (2, 3)), x)
    mirror = torch.rand(B, generator=gen, device=x.device) < 0.5
    return torch.where(mirror.view(B, 1, 1, 1), x.flip(3), x)

def normalizer(norm):  # (B, C, H, W) -> normalised the dataset's way, as the backbone's first layer
    import torchvision
    if norm in (None, "per_image"):  # PovertyMap's arrays; RxRx1: standardised as it is loaded
        return nn.Identity()
    return torchvision.transforms.Normalize(*norm)  # (mean, std)

def build_backbone(name, in_channels, pretrained=False, width=16):
    """-> (images (B, C, H, W) -> features (B, d), d); small_resnet trains on two CPU cores."""
    import torchvision
    block = torchvision.models.resnet.BasicBlock
    if name == "small_resnet":  # three residual stages, widths 16, 32, 64

        def halving(c_in, c_out):  # stride 2; a 1x1 convolution + BN on the shortcut
            shortcut = [nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out)]
            return block(c_in, c_out, 2, nn.Sequential(*shortcut))
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(), block(width, width), halving(width, 2 * width),
                  halving(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), 4 * width
    try:
        net = getattr(torchvision.models, name)(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as e:  # offline
        sys.exit(f"error: could not load ImageNet weights for {name} ({type(e).__name__}); put "
                 f"them in the torch hub cache, or pass --no_pretrained for random weights")
    last = "classifier" if name == "densenet121" else "fc"
    dim = getattr(net, last).in_features
    setattr(net, last, nn.Identity())
    if in_channels != 3:  # PovertyMap's 8 bands (ResNet): RGB filters, their mean for the rest
        rgb = net.conv1.weight.detach()  # (64, 3, 7, 7)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        extra = rgb.mean(1, keepdim=True).expand(-1, in_channels - 3, -1, -1)
        with torch.no_grad():
            net.conv1.weight.copy_(torch.cat([rgb, extra], 1))
    return net, dim

def build_model(args, data, device):  # -> (MABNNet, its target)
    net, feat_dim = build_backbone(args.backbone, args.in_channels, args.pretrained)
    backbone = nn.Sequential(normalizer(args.norm), net)
    model = MABNNet(backbone, feat_dim, data["n_outputs"], args.proj_hidden, args.proj_dim)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, make_target(model)

# --- Stage 3, checkpoints, the loop of stages 1 and 2, the pilots ---
def support_sets(split, k, seed, how="random"):
    """{domain: k indices}: random per seed and domain (the paper), or the first k (Meta-DMoE)."""
    if how == "first":
        return {d: idx[:k] for d, idx in split.by_domain.items()}
    gens = {d: torch.Generator().manual_seed(2 * (1000 * seed + d)) for d in split.by_domain}
    return {d: [idx[i] for i in torch.randperm(len(idx), generator=gens[d])[:k]]
            for d, idx in split.by_domain.items()}

def evaluate(model, target, phis, data, split, rows, ks, args):
    """Stage 3: each row adapts to every domain from its support set (at each k), then predicts
    it; one pass for all rows. phis: {start: phi}. -> {name: metrics, and per domain phi_shift
    (||phi~ - phi|| / ||phi||) and changed (predictions unlike its start's plain row's)}"""
    device = next(model.parameters()).device
    model.eval()
    target.eval()
    names = {name: (row, k) for name, (row, k) in row_names(rows, ks).items()
             if args.task == "classification" or not ROWS[row].tent}  # TENT: entropy
    sets = support_sets(split, max(ks), args.seed, args.support)
    uses_k = any(k for _, k in names.values())
    if uses_k and min(map(len, sets.values())) < max(ks):
        log(f"note: '{split.name}' has domains of fewer than {max(ks)} images: they use all")
    domains = list(split.by_domain)
    following = dict(zip(domains, domains[1:] + domains[:1]))  # Table 3: the next domain's
    unmatched = any(ROWS[row].other for row, _ in names.values())
    frozen = split_params(model)[1]

    def start_domain(d):  # {name: (tensors to predict with, their phi~, TENT's state or None)}
        needed = (d, following[d]) if unmatched else (d,)  # each support set read once
        moved = {e: to_device(torch.stack([split.dataset[i][0] for i in sets[e]]), device)
                 for e in needed} if uses_k else {}
        states = {}
        for name, (row, k) in names.items():
            e = following[d] if ROWS[row].other else d
            aug_gen = torch.Generator(device).manual_seed(2 * (1000 * args.seed + e) + 1)
            params = row_params(row, model, target, phis[ROWS[row].start], frozen,
                                moved[e][:k] if k else None, views_of(args, aug_gen),
                                args.inner_lr, args.inner_steps)
            phi = {n: params[n] for n in phis[ROWS[row].start]}
            states[name] = (params, phi, tent_setup(phi, args.tent_lr) if ROWS[row].tent else None)
        return states
    size = args.eval_batch_size  # one pass: the test batches, domain after domain
    batches = [idx[a:a + size] for idx in split.by_domain.values()
               for a in range(0, len(idx), size)]
    loader = make_loader(split.dataset, args.num_workers, batch_sampler=batches)
    outputs = {name: [] for name in names}
    labels = []
    adapted = {name: {} for name in names}  # {name: {domain: phi~ at the domain's end}}
    for idx, (x, y, *_) in tqdm(zip(batches, loader), total=len(batches),
                                desc=f"stage 3 {split.name}", leave=False, disable=None):
        d = int(split.domains[idx[0]])
        if idx[0] == split.by_domain[d][0]:  # a domain starts: every row adapts to it
            states = start_domain(d)
        x = to_device(x, device)
        for name, (params, phi, tent) in states.items():  # outputs stay on the device
            if tent:
                outputs[name].append(tent_forward_and_adapt(model, params, *tent, x))
            else:
                outputs[name].append(predict(model, params, x))
            adapted[name][d] = {**phi, **(tent[0] if tent else {})}  # TENT's: after its steps
        labels.append(y)
    inverse = torch.argsort(torch.tensor([i for idx in batches for i in idx]))  # split's order
    outputs = {name: torch.cat(out).cpu()[inverse] for name, out in outputs.items()}
    results = {name: data["evaluate"](split, outputs[name], torch.cat(labels)[inverse])
               for name in names}
    for name, (row, _) in names.items():  # what adaptation changed
        start = ROWS[row].start
        if ROWS[row] == ROWS[start] or start not in names:
            continue
        seen = [k for k in phis[start] if k.startswith("backbone.")]  # the part predictions use
        before = torch.cat([phis[start][k].flatten() for k in seen])
        shifts = {d: torch.cat([phi[k].flatten() for k in seen]) - before
                  for d, phi in adapted[name].items()}
        results[name]["phi_shift"] = {d: (s.norm() / before.norm()).item()
                                      for d, s in shifts.items()}
        if args.task == "classification":
            changed = (outputs[name].argmax(-1) != outputs[start].argmax(-1)).float()
            results[name]["changed"] = {d: changed[split.domains == d].mean().item()
                                        for d in domains}
    return results

STAGE_FLAGS = {  # what a stage's checkpoint depends on
    1: ("dataset", "seed", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay",
        "aux_weight", "ema", "max_steps", "img_size", "proj_hidden", "proj_dim", "pretrained",
        "target_domain", "min_crop", "views", "turns"),
    2: ("meta_epochs", "n_support", "n_query", "meta_batch", "inner_lr", "outer_lr", "inner_steps",
        "first_order", "support")}

def save_atomic(obj, path):  # renamed over path: the old file or the new, never half
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)

def load_checkpoint(path, flags):  # None if there is none; exits if unusable
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt
        sys.exit(f"error: cannot read checkpoint {path} ({type(e).__name__}); delete it or "
                 f"pick another --out_dir")
    diff = [f"{k}: {ckpt['flags'].get(k)!r} in file vs {v!r} now" for k, v in flags.items()
            if ckpt["flags"].get(k) != v]
    if diff:
        sys.exit(f"error: {path} was made with other flags ({', '.join(diff)}); use another "
                 f"--out_dir")
    return ckpt

class NonFiniteLoss(SystemExit):  # a run stops with its message; a pilot is scored -inf
    pass

def mean_losses(losses, where, path):  # {name: mean} of an epoch's losses, read in ONE sync
    values = torch.stack([torch.stack(list(step.values())) for step in losses]).tolist()
    bad = [i for i, row in enumerate(values) if not all(map(math.isfinite, row))]
    if bad:
        raise NonFiniteLoss(f"error: {where}, step {bad[0] + 1}: non-finite loss "
                            f"{dict(zip(losses[0], values[bad[0]]))}; the last good checkpoint: "
                            f"{path}; lower the learning rate")
    return {k: sum(row[j] for row in values) / len(values) for j, k in enumerate(losses[0])}

def run_stage(name, stage, model, target, opt, gens, data, args, batches, step, epoch_steps=None):
    """The loop of stages 1 and 2, resumable from <out_dir>/<name>.pt. Per epoch: step(batch) ->
    (losses, images) on batches(epoch), at most --max_steps in all; the loss check; validation;
    the best epoch kept; the log line; the checkpoint (one format: the flags, counters, the best
    epoch, and until done the state to resume). Leaves the model (stage 1: and the target) at
    the best epoch. -> dict(steps, time_s, val, history, and img_per_s if it trained)"""
    started = time.time()
    label = f"stage {stage}" if name == f"stage{stage}" else name
    path = os.path.join(args.out_dir, f"{name}.pt")
    names = [k for s in range(1, stage + 1) for k in STAGE_FLAGS[s]]
    flags = {"format": 4, **{k: getattr(args, k) for k in names}}
    if stage == 2:  # the k of its validation; a pilot's short epochs
        flags.update(val_n_adapt=args.n_adapt[0], epoch_steps=epoch_steps)
    trained = dict(model=model, target=target) if stage == 1 else dict(model=model)
    n_epochs, val_row = (args.epochs, "stage1") if stage == 1 else (args.meta_epochs, "mabn")
    ckpt = load_checkpoint(path, flags) or dict(flags=flags, epoch=-1, steps=0, history=[],
                                                best_metric=-math.inf, best=None, state=None)
    if ckpt["state"] is not None:  # interrupted: resume after its last epoch
        for key, part in {**trained, "opt": opt}.items():
            part.load_state_dict(ckpt["state"][key])
        for gen, state in zip(gens, ckpt["state"]["gens"]):
            gen.set_state(state)
    if ckpt["epoch"] >= 0:
        resume = f", resuming after epoch {ckpt['epoch'] + 1}" if ckpt["state"] else ""
        log(f"{label}: loaded {path}{resume}")
    images, seconds = 0, 0.0
    for epoch in range(ckpt["epoch"] + 1, n_epochs):
        t0 = time.time()
        losses = []
        epoch_images = 0
        for batch in batches(epoch):
            if ckpt["steps"] >= (args.max_steps or math.inf):
                break
            step_losses, n_images = step(batch)
            losses.append(step_losses)
            epoch_images += n_images
            ckpt["steps"] += 1
        means = mean_losses(losses, f"{label}, epoch {epoch + 1}", path) if losses else {}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the epoch's time includes its GPU work
        epoch_seconds = time.time() - t0
        images += epoch_images
        seconds += epoch_seconds
        phis = {ROWS[val_row].start: split_params(model)[0]}
        val = evaluate(model, target, phis, data, data["splits"]["val"], [val_row],
                       args.n_adapt[:1], args)[val_row][args.val_metric]
        ckpt["history"].append(val)
        if ckpt["best"] is None or val > ckpt["best_metric"]:
            best = {key: {k: v.detach().clone() for k, v in part.state_dict().items()}
                    for key, part in trained.items()}
            ckpt.update(best_metric=val, best=best)
        losses_text = "".join(f"{k} {v:.4f} " for k, v in means.items())
        speed = epoch_images / epoch_seconds
        log(f"{label} epoch {epoch + 1}/{n_epochs}: {losses_text}| {speed:.0f} img/s | val "
            f"{val_row} {args.val_metric} {val:.4f}")
        state = {key: part.state_dict() for key, part in {**trained, "opt": opt}.items()}
        state["gens"] = [gen.get_state() for gen in gens]
        ckpt.update(epoch=epoch, state=None if epoch + 1 == n_epochs else state)  # None: done
        save_atomic(ckpt, path)
    for key, part in trained.items() if ckpt["best"] else ():
        part.load_state_dict(ckpt["best"][key])
    out = dict(steps=ckpt["steps"], time_s=time.time() - started, val=ckpt["best_metric"],
               history=ckpt["history"])
    if seconds:
        out["img_per_s"] = round(images / seconds, 1)
    return out

def train_joint(model, target, data, args):
    """Stage 1, Eq. (2), on the sources mixed; the LR halves after --lr_decay_epoch (the paper)."""
    device = next(model.parameters()).device
    train = data["splits"]["train"]
    aug_gen = torch.Generator(device).manual_seed(args.seed)  # views and order: restored on resume
    order_gen = torch.Generator().manual_seed(args.seed)
    augment_fn = views_of(args, aug_gen)
    sampler = torch.utils.data.RandomSampler(train.dataset, generator=order_gen)
    loader = make_loader(train.dataset, args.num_workers, batch_size=args.batch_size,
                         sampler=sampler, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")

    def batches(epoch):  # the epoch's LR, then its batches
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.5 if epoch >= args.lr_decay_epoch else 1.0)
        return tqdm(loader, desc=f"stage 1, epoch {epoch + 1}", leave=False, disable=None)

    def step(batch):  # Eq. (2); the losses stay on the device
        x, y = to_device(batch[0], device), batch[1].to(device, non_blocking=True)
        if args.turns:  # RxRx1, PovertyMap: their sources' label-keeping flips and turns
            x = turn_and_mirror(x, aug_gen, args.turns)
        model.train()
        target.train()
        loss_main, loss_aux = joint_step(model, target, opt, x, y, augment_fn, args.aux_weight,
                                         args.ema, args.task)
        return dict(main=loss_main, aux=loss_aux), len(x)
    return run_stage("stage1", 1, model, target, opt, [aug_gen, order_gen], data, args, batches,
                     step)

def meta_batches(split, args, n_steps, order_gen, device):
    """Stage 2's meta batches (Alg. 1): B distinct source domains of two images or more, each an
    episode of disjoint support and query images: [(support_x, query_x, query_y)] * B."""
    by_domain = [torch.tensor(idx) for idx in split.by_domain.values() if len(idx) >= 2]
    per_step = min(args.meta_batch, len(by_domain))
    episodes = []  # index lists, B after B
    for _ in range(n_steps):
        for d in torch.randperm(len(by_domain), generator=order_gen)[:per_step]:
            idx = by_domain[d][torch.randperm(len(by_domain[d]), generator=order_gen)]
            episodes.append(idx[:args.n_support + args.n_query].tolist())
    meta_batch = []
    for x, y, *_ in make_loader(split.dataset, args.num_workers, batch_sampler=episodes):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        n_s = round(len(x) * args.n_support / (args.n_support + args.n_query))
        n_s = min(max(1, n_s), len(x) - 1)  # at least one image on each side
        meta_batch.append((x[:n_s], x[n_s:], y[n_s:]))
        if len(meta_batch) == per_step:
            yield meta_batch
            meta_batch = []

def stage2_steps(split, args, epochs=None):  # outer steps: an epoch's (each image about once)
    per_epoch = max(1, len(split.domains) // ((args.n_support + args.n_query) * args.meta_batch))
    return per_epoch if epochs is None else min(epochs * per_epoch, args.max_steps or math.inf)

def train_meta(model, target, data, args, name="stage2", epoch_steps=None):
    """Stage 2, Alg. 1, on a copy of model: phi learnt by meta_step (Eq. 3-4), all else frozen;
    epochs of epoch_steps outer steps (pilots), else of the data. -> (phi, the run's figures)"""
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    train = data["splits"]["train"]
    phi, frozen = split_params(model)
    aug_gen = torch.Generator(device).manual_seed(args.seed + 2)  # stage 1's seeds + 2
    order_gen = torch.Generator().manual_seed(args.seed + 2)
    model.requires_grad_(False)
    for p in phi.values():  # only phi learns (Eq. 4)
        p.requires_grad_(True)
    opt = torch.optim.Adam(phi.values(), lr=args.outer_lr, fused=device.type == "cuda")
    meta_kw = dict(augment_fn=views_of(args, aug_gen), inner_lr=args.inner_lr,
                   aux_weight=args.aux_weight, inner_steps=args.inner_steps,
                   first_order=args.first_order, task=args.task)
    model.eval()  # BN: stage 1's source statistics, never updated
    target.eval()

    def batches(epoch):
        n_steps = epoch_steps or stage2_steps(train, args)
        episodes = meta_batches(train, args, n_steps, order_gen, device)
        return tqdm(episodes, desc=f"{name}, epoch {epoch + 1}", leave=False, disable=None)

    def step(episodes):  # Eq. (3)-(4) on B episodes
        modes = [m.training for m in (*model.modules(), *target.modules())]
        assert not any(modes), "stage 2 needs BN in eval mode (its source statistics)"
        losses = meta_step(model, phi, frozen, target, opt, episodes, **meta_kw)
        n_images = sum(len(support_x) + len(query_x) for support_x, query_x, _ in episodes)
        return dict(zip(("meta", "main", "aux"), losses)), n_images
    out = run_stage(name, 2, model, target, opt, [aug_gen, order_gen], data, args, batches, step,
                    epoch_steps)
    return clone_phi(model), out

def clone_phi(model):
    return {k: v.detach().clone() for k, v in split_params(model)[0].items()}

def with_flags(args, **changes):  # a copy of args with some flags changed
    return argparse.Namespace(**{**vars(args), **changes})

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)  # the candidates for alpha, Eq. (3)'s step
DRIFT = 10.0  # delta x T: how far Adam may move a coordinate of phi in stage 2 [M] (README)
PILOT_CHECKS = 4  # the validations of a pilot

def validation_noise(checks):
    """The sd of the checks around a straight line through each pilot's (its trend), pooled."""
    squares, dof = 0.0, 0
    for scores in checks:
        if len(scores) < 3 or not all(map(math.isfinite, scores)):
            continue
        y = torch.tensor(scores, dtype=torch.float64)[:, None]
        line = torch.stack([torch.ones(len(y)), torch.arange(len(y))], 1).double()
        squares += (y - line @ torch.linalg.lstsq(line, y).solution).square().sum().item()
        dof += len(y) - 2
    return math.sqrt(squares / dof) if dof else 0.0

def pilot(model, target, data, args, alpha, outer_lr, epoch_steps):
    """A short stage 2 at (alpha, outer_lr): PILOT_CHECKS epochs of epoch_steps outer steps, each
    validated; a non-finite loss scores -inf. -> dict(outer_lr, score: its best check, checks,
    and on validation gain: mabn - stage2 (adapted - not), phi_shift: ||phi~ - phi|| / ||phi||)"""
    trial = with_flags(args, inner_lr=alpha, outer_lr=outer_lr, meta_epochs=PILOT_CHECKS)
    name = f"pilot_alpha{alpha:g}_delta{outer_lr:g}"
    try:
        phi, run = train_meta(model, target, data, trial, name, epoch_steps)
    except NonFiniteLoss as e:  # the run goes on without this candidate
        log(f"{name} diverged: {e}")
        return dict(outer_lr=outer_lr, score=-math.inf, checks=[])
    results = evaluate(model, target, {"stage2": phi}, data, data["splits"]["val"],
                       ["stage2", "mabn"], args.n_adapt[:1], trial)
    gain = results["mabn"][args.val_metric] - results["stage2"][args.val_metric]
    return dict(outer_lr=outer_lr, score=run["val"], checks=run["history"], gain=gain,
                phi_shift=mean(results["mabn"]["phi_shift"].values()))

def choose_lrs(model, target, data, args):
    """alpha and delta (unpublished) unless given. delta = DRIFT / T for stage 2's T outer steps:
    Adam moves a coordinate of phi about delta a step, so DRIFT bounds how far stage 2 takes it
    (and stage 2 keeps its best epoch). alpha by validation: a pilot per candidate, the first P
    steps of that stage 2, and the largest alpha within the validation noise of the best, the
    step that adapts most among those validation cannot tell apart (all diverged: the smallest).
    The pilots take --pilot_share x T outer steps in all."""
    n_steps = stage2_steps(data["splits"]["train"], args, args.meta_epochs)
    outer_lr = args.outer_lr or DRIFT / max(1, n_steps)
    if args.inner_lr is not None:
        return dict(inner_lr=args.inner_lr, outer_lr=outer_lr, candidates=[])
    epoch_steps = max(1, round(args.pilot_share * n_steps / len(ALPHAS) / PILOT_CHECKS))
    tried = {alpha: pilot(model, target, data, args, alpha, outer_lr, epoch_steps)
             for alpha in ALPHAS}
    noise = validation_noise([c["checks"] for c in tried.values()])
    finite = {a: c["score"] for a, c in tried.items() if c["score"] > -math.inf}
    best = max(finite.values(), default=-math.inf)
    within = [a for a, score in finite.items() if score >= best - noise]
    inner_lr = max(within) if within else ALPHAS[0]
    for alpha, c in tried.items():
        effect = (f"mabn - stage2 {c['gain']:+.4f}, ||phi~ - phi|| / ||phi|| {c['phi_shift']:.2%}"
                  if "gain" in c else "diverged")
        log(f"pilot alpha {alpha:g}: val {c['score']:.4f}, {effect}")
    log(f"pilot: {len(tried)} pilots of {PILOT_CHECKS * epoch_steps} outer steps for a stage 2 of "
        f"{n_steps}; validation noise {noise:.4f} (sd around each pilot's trend); alpha "
        f"{inner_lr:g}, delta {outer_lr:.3g}")
    return dict(inner_lr=inner_lr, outer_lr=outer_lr, noise=noise, stage2_steps=n_steps,
                pilot_steps=PILOT_CHECKS * epoch_steps,
                candidates=[dict(inner_lr=a, **c) for a, c in tried.items()])

# --- Flags with per-dataset defaults, and main ---
# Sources: [P] the paper, [G] BYOL's paper (the views the paper adopts), [D] Meta-DMoE's code,
# [W] WILDS' baseline code, [B] byol-pytorch, [T] TENT's code, [M] measured (README), [*] ours
BASE = dict(  # every dataset's unless overridden
    backbone="resnet50", img_size=224, pretrained=True, n_adapt=[32],  # [P]
    norm=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # [P] ImageNet weights: their inputs
    task="classification", in_channels=3,  # [P]
    val_metric="acc_avg", aux_weight=0.1, lr_decay_epoch=20, meta_epochs=10, inner_steps=1,  # [P]
    proj_hidden=4096, proj_dim=256,  # [P]
    n_support=None,  # [P] k, as the test adapts (the slides' "protocol alignment via simulation")
    min_crop=0.08, views=dict(colour="rgb"),  # [G]
    weight_decay=0.0, n_query=48,  # [D]
    ema=0.99,  # [B]
    tent_lr=1e-3,  # [T]
    meta_batch=1,  # [M]
    pilot_share=0.1, turns=0, eval_batch_size=128, domain_fields=None)  # [*]
DATASETS = {
    "digits": dict(  # offline, for two CPU cores [*]
        BASE, backbone="small_resnet", img_size=16, norm=((0.5,) * 3, (0.25,) * 3),
        pretrained=False, batch_size=64, lr=2e-3, epochs=10, lr_decay_epoch=7, n_query=32,
        proj_hidden=256, proj_dim=64, eval_batch_size=50),
    "iwildcam": dict(
        BASE, img_size=448, n_adapt=[12], domain_fields=["location"],  # [P]
        val_metric="F1-macro_all",  # [P]
        batch_size=16, lr=3e-5, epochs=12, n_query=16,  # [D]
        eval_batch_size=64),  # [*]
    "camelyon17": dict(
        BASE, backbone="densenet121", img_size=96, domain_fields=["slide"],  # [P]
        batch_size=32, lr=1e-3, epochs=5, weight_decay=1e-2, n_query=32,  # [D]
        eval_batch_size=256),  # [*]
    "rxrx1": dict(
        BASE, img_size=256, domain_fields=["experiment"], norm="per_image",  # [P]
        batch_size=75, lr=1e-4, epochs=90, weight_decay=1e-5, turns=4,  # [D]
        eval_batch_size=150, views=dict(colour="standardised")),  # [*]
    "fmow": dict(
        BASE, backbone="densenet121", domain_fields=["region", "year"],  # [P]
        val_metric="acc_worst_region",  # [P]
        batch_size=64, lr=1e-4, epochs=20),  # [D]
    "poverty": dict(
        BASE, backbone="resnet18", in_channels=8, task="regression",  # [P]
        domain_fields=["country"], val_metric="r_wg",  # [P]
        norm=None, batch_size=64, lr=1e-3, epochs=200, turns=2,  # [W]
        views=dict(colour=None, noise=0.1)),  # [*], as are BASE's [D] values here
    "domainnet": dict(
        BASE, domain_fields=["domain"],  # [P]
        batch_size=32, lr=1e-4, epochs=10),  # [*], as are BASE's backbone, img_size, [D]
}
assert all(d.keys() == DATASETS["digits"].keys() for d in DATASETS.values())  # the same keys

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"error: {message} (see python mabn.py --help)\n")

def number(kind, zero_ok=False):  # an argparse type: > 0, or >= 0 if zero_ok
    def parse(text):
        value = kind(text)
        if value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero_ok else '> 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value"
    return parse

def parse_args(argv=None):
    """Every flag with its meaning; --dataset's values fill those left unset."""
    first = OneLineParser(add_help=False)
    first.add_argument("--dataset", default="digits", choices=list(DATASETS),
                       help="the data, and the defaults below")
    dataset = first.parse_known_args(argv)[0].dataset
    p = OneLineParser(parents=[first], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    count, count0 = number(int), number(int, zero_ok=True)
    rate, rate0 = number(float), number(float, zero_ok=True)
    flag = p.add_argument
    flag("--root_dir", default="data", help="WILDS' folder, with <name>_v<version>/")
    flag("--download", action="store_true", help="let wilds download into --root_dir")
    flag("--no_pretrained", dest="pretrained", action="store_false",
         help="random backbone weights (pretrained: %(default)s)")
    flag("--target_domain", default="real", choices=DOMAINNET_DOMAINS, help="DomainNet's target")
    flag("--out_dir", help="checkpoints, log.txt, results.json (%(default)s: runs/<dataset>)")
    flag("--seeds", type=int, nargs="+", default=[0], help="the table: mean ± std")
    flag("--methods", nargs="+", default=["stage1", "stage2", "mabn"], metavar="ROW",
         choices=[*ROWS, "all"], help=f"stage 3's rows: all, or of {', '.join(ROWS)}")
    flag("--support", default="random", choices=["random", "first"], help="a domain's k images")
    flag("--inner_lr", type=rate0, help="alpha, Eq. (3)'s step (%(default)s: the pilot's)")
    flag("--outer_lr", type=rate,
         help=f"delta, Eq. (4)'s Adam LR (%(default)s: {DRIFT:g} / stage 2's outer steps)")
    flag("--first_order", action="store_true", help="drop Eq. (4)'s second-order term")
    flag("--num_workers", type=count0, help="loader workers (%(default)s: 0 for digits, cores - 1)")
    flag("--max_steps", type=count, help="a cap on each training stage's steps")
    tuned = p.add_argument_group(f"the values of {dataset} (DATASETS in mabn.py)").add_argument
    tuned("--n_adapt", type=count, nargs="+", help="k, a target domain's images; several: each k")
    tuned("--epochs", type=count0, help="stage 1's epochs")
    tuned("--batch_size", type=count, help="stage 1's batch size")
    tuned("--lr", type=rate, help="stage 1's Adam LR")
    tuned("--lr_decay_epoch", type=count0, help="stage 1's LR halves after this many epochs")
    tuned("--weight_decay", type=rate0, help="stage 1's Adam weight decay")
    tuned("--aux_weight", type=rate0, help="lambda, BYOL's weight in Eq. (2), (4)")
    tuned("--ema", type=rate0, help="tau, the BYOL target's momentum, in [0, 1)")
    tuned("--proj_hidden", type=count, help="BYOL's hidden width")
    tuned("--proj_dim", type=count, help="BYOL's projection width")
    tuned("--meta_epochs", type=count0, help="stage 2's epochs")
    tuned("--n_support", type=count, help="an episode's support images (None: k)")
    tuned("--n_query", type=count, help="an episode's query images")
    tuned("--meta_batch", type=count, help="B, Alg. 1's episodes per outer step")
    tuned("--inner_steps", type=count, help="Eq. (3)'s steps, stages 2 and 3")
    tuned("--pilot_share", type=rate, help="the pilots' outer steps, as a share of stage 2's")
    tuned("--min_crop", type=rate, help="BYOL's crop: the least share of the image's area")
    tuned("--tent_lr", type=rate, help="TENT's Adam LR")
    tuned("--eval_batch_size", type=count, help="stage 3's (TENT's test) batch size")
    tuned("--img_size", type=count, help="the input's side in pixels")
    p.set_defaults(**DATASETS[dataset])
    args = p.parse_args(argv)
    if args.ema >= 1:
        p.error(f"argument --ema: must be in [0, 1), got {args.ema}")
    if args.meta_epochs == 0 and args.inner_lr is None:
        p.error("argument --meta_epochs: 0 trains no stage 2 to choose alpha with; pass --inner_lr")
    # values computed at run time
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.n_support = args.n_support or args.n_adapt[0]  # as the test adapts
    if args.num_workers is None:  # WILDS decodes images in workers
        cores = len(os.sched_getaffinity(0))
        args.num_workers = 0 if args.dataset == "digits" else max(1, min(16, cores - 1))
    chosen = set(ROWS) if "all" in args.methods else set(args.methods)
    chosen |= {ROWS[row].start for row in chosen}  # each start's plain row, for "changed"
    args.methods = [row for row in ROWS if row in chosen]  # in ROWS' order
    args.out_dir = args.out_dir or os.path.join("runs", args.dataset)
    args.seed = args.seeds[0]
    return args

def run_seed(args, data):
    """Stage 1, the pilots, the control, stage 2, stage 3 for args.seed -> its results.json."""
    torch.manual_seed(args.seed)
    model, target = build_model(args, data, torch.device(args.device))
    stages = {"stage1": train_joint(model, target, data, args)}
    phis = {"stage1": clone_phi(model)}
    t0 = time.time()
    pilot = choose_lrs(model, target, data, args)
    stages["pilot"] = dict(time_s=time.time() - t0)
    args = with_flags(args, inner_lr=pilot["inner_lr"], outer_lr=pilot["outer_lr"])
    if "control" in args.methods:  # alpha = 0: first order is the same gradient
        control = with_flags(args, inner_lr=0.0, first_order=True)
        phis["control"], stages["control"] = train_meta(model, target, data, control, "control")
    phis["stage2"], stages["stage2"] = train_meta(model, target, data, args)
    t0 = time.time()
    test = data["splits"]["test"]
    results = evaluate(model, target, phis, data, test, args.methods, args.n_adapt, args)
    seconds = time.time() - t0
    stages["stage3"] = dict(time_s=seconds, img_per_s=round(len(test.domains) / seconds, 1))
    times = []
    for name, s in stages.items():
        speed = f" ({s['img_per_s']:.0f} img/s)" if s.get("img_per_s") else ""
        times.append(f"{name} {s['time_s']:.1f} s{speed}")
    log(f"seed {args.seed}: " + ", ".join(times))
    effects = []
    for name, r in results.items():
        if "phi_shift" in r:
            changed = f" {mean(r['changed'].values()):.1%}" if "changed" in r else ""
            effects.append(f"{name} {mean(r['phi_shift'].values()):.2%}{changed}")
    log("adaptation, mean over target domains (||phi~ - phi|| / ||phi||, predictions changed): "
        + ", ".join(effects))
    out = dict(flags=vars(args), seed=args.seed, device=args.device, stages=stages, pilot=pilot,
               target=results)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    return out

GRID = {"TENT": ("tent_bn", "tent_affine"), "MABN": ("mabn_bn", "mabn"),  # Table 4: rule ->
        "MABN+TENT": ("mabn_tent_bn", "mabn_tent_affine")}  # (update BN, update affine)

def summarize(per_seed, ks):
    """Log and return {name: {metric: (mean, std over seeds)}}, then Table 4 at each k."""
    first = next(iter(per_seed[0]["target"].values()))
    metrics = [k for k, v in first.items() if not isinstance(v, dict)]
    many = len(per_seed) > 1
    width = max(map(len, metrics)) + (10 if many else 2)
    seeds = f"{len(per_seed)} seeds: mean ± std" if many else "1 seed"
    log(f"\n{'row':<24}{'from':>8}{'stats':>8}" + "".join(f"{m:>{width}}" for m in metrics)
        + f"   (target domains, split 'test', {seeds})")
    names = row_names(ROWS, ks)
    summary = {}
    for name in per_seed[0]["target"]:
        values = {m: torch.tensor([r["target"][name][m] for r in per_seed]) for m in metrics}
        summary[name] = {m: (v.mean().item(), v.std().item() if many else 0.0)
                         for m, v in values.items()}
        cells = [f"{avg:.4f} ± {std:.3f}" if many else f"{avg:.4f}"
                 for avg, std in summary[name].values()]
        row = ROWS[names[name][0]]
        log(f"{name:<24}{row.start:>8}{row.stats:>8}" + "".join(f"{c:>{width}}" for c in cells))
    for k in sorted(ks):
        at_k = {row: name for name, (row, k_row) in names.items() if k_row in (k, None)}
        pairs = [[summary.get(at_k[row]) for row in pair] for pair in GRID.values()]
        if all(all(pair) for pair in pairs):
            log(f"\nTable 4 at k={k}, {metrics[0]}: {'update BN':>15}{'update affine':>18}")
            for label, (bn, affine) in zip(GRID, pairs):
                log(f"{label:<27}{bn[metrics[0]][0]:>15.4f}{affine[metrics[0]][0]:>18.4f}")
    return summary

def main(args, data=None):
    """Every seed in <out_dir>/seed<k>/ (reusing finished stages), the table; data: load_data's."""
    torch.backends.cudnn.benchmark = args.device == "cuda"  # fixed training shapes
    t0 = time.time()
    data = load_data(args) if data is None else data  # missing data stops here, before any write
    data_s = time.time() - t0
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(args.out_dir, "log.txt"), encoding="utf-8")
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir {args.out_dir} ({e.strerror}); pick a "
                 f"writable folder")
    logger = logging.getLogger("mabn")  # log() writes here
    logger.setLevel(logging.INFO)
    logger.handlers = [logging.StreamHandler(sys.stdout), log_file]
    log("flags: " + json.dumps(vars(args), sort_keys=True))
    sizes = [f"{name} {len(s.domains)} images in {len(s.by_domain)} domains"
             for name, s in data["splits"].items()]
    log(f"data ({data_s:.1f} s): " + ", ".join(sizes))
    per_seed = []
    for seed in args.seeds:
        seed_args = with_flags(args, seed=seed, out_dir=os.path.join(args.out_dir, f"seed{seed}"))
        os.makedirs(seed_args.out_dir, exist_ok=True)
        per_seed.append(run_seed(seed_args, data))
    summary = summarize(per_seed, args.n_adapt)
    out = dict(flags=vars(args), seeds=args.seeds, summary=summary, per_seed=per_seed)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    logger.handlers = []
    log_file.close()
    return out

if __name__ == "__main__":
    main(parse_args())
