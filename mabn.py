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
  python test_mabn.py --speed           # the README's GPU speed figures
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

def joint_losses(model, params, target, x, y, augment_fn, task="classification"):
    """-> (L_main on the images x, or 0 if y is None; L_aux: BYOL on two augmented views of x,
    symmetrised). params {name: tensor} replace the module's tensors (stages 2-3)."""
    B = x.shape[0]
    v1 = augment_fn(x)  # every image draws its own random view, twice
    v2 = augment_fn(x)
    inputs = torch.cat([v1, v2] if y is None else [x, v1, v2])  # (2B or 3B, C, H, W)
    outputs, predictions = functional_call(model, params or {}, (inputs,), {"aux": True})
    with torch.no_grad():
        z = target(torch.cat([v1, v2]))  # (2B, proj_dim): the target network gets no gradient
    p1, p2, z1, z2 = predictions[-2 * B:-B], predictions[-B:], z[:B], z[B:]  # (B, proj_dim) each
    loss_aux = (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()  # each view predicts the other's
    if y is None:
        return torch.zeros((), device=x.device), loss_aux
    return main_loss(outputs[:B], y, task), loss_aux

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
def batch_statistics(params):
    """params without the backbone's BN statistics: each batch normalised with its own (TENT)."""
    running = ("running_mean", "running_var")
    return {k: None if k.startswith("backbone.") and k.endswith(running) else v
            for k, v in params.items()}

@torch.no_grad()
def reestimate_bn_stats(model, params, support_x):
    """The backbone's BN statistics re-estimated on support_x, layer by layer (Schneider et al.
    2020; MABN's "update BN" in Table 4)."""
    bns = {m: f"backbone.{n}" for n, m in model.backbone.named_modules()
           if isinstance(m, nn.BatchNorm2d)}
    stats = {}

    def record(bn, inputs):
        stats[f"{bns[bn]}.running_mean"] = inputs[0].mean((0, 2, 3))  # (B, C, H, W) -> (C,)
        stats[f"{bns[bn]}.running_var"] = inputs[0].var((0, 2, 3))  # unbiased, as BN stores it
    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        functional_call(model, batch_statistics(params), (support_x,))
    finally:
        for handle in handles:
            handle.remove()
    return stats

def tent_setup(phi, lr=1e-3):
    """TENT's collect_params and setup_optimizer (its Adam, lr 1e-3, betas 0.9, 0.999) on phi's
    backbone part. -> (leaves, optimiser)"""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()
              if k.startswith("backbone.")}
    return leaves, torch.optim.Adam(leaves.values(), lr, betas=(0.9, 0.999))

def tent_forward_and_adapt(model, params, leaves, opt, x):
    """TENT's forward_and_adapt (Wang et al. 2021) on a test batch x (B, C, H, W): predict, then
    one step of opt on the batch's mean entropy. -> (B, n_classes)"""
    with torch.enable_grad():
        logits = functional_call(model, {**params, **leaves}, (x,))
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        grads = torch.autograd.grad(entropy, list(leaves.values()))
    for leaf, grad in zip(leaves.values(), grads):
        leaf.grad = grad
    opt.step()
    return logits.detach()

MABN_RULES = ("mabn", "mabn+tent", "unmatched")  # the rules that take MABN's step (Eq. 3)

class Row(NamedTuple):  # a row of stage 3's table
    start: str  # stage1 (after stage 1), meta (after stage 2), meta0 (stage 2, alpha = 0)
    stats: str  # BN statistics: source (stage 1's), support (from k images), batch (its own)
    rule: str | None  # adaptation: mabn (Eq. 3), tent (online), mabn+tent, unmatched

    @property
    def uses_support(self):
        return self.stats == "support" or self.rule in MABN_RULES

ROWS = {
    "stage1": Row("stage1", "source", None),  # ablation: joint training, no adaptation
    "bn_stats": Row("stage1", "support", None),  # Schneider et al. 2020
    "tent_bn": Row("stage1", "batch", "tent"),  # Table 4: TENT, update BN (as published)
    "tent_affine": Row("stage1", "source", "tent"),  # Table 4: TENT, update affine
    "no_meta": Row("stage1", "source", "mabn"),  # Fig. 5, ablation: no meta-training
    "no_inner": Row("meta0", "source", None),  # the control: stage 2 without its inner step
    "none": Row("meta", "source", None),  # Table 3, ablation: no adaptation
    "mabn": Row("meta", "source", "mabn"),  # MABN; Table 3: matched; Table 4: update affine
    "mabn_bn": Row("meta", "support", "mabn"),  # Table 4: MABN, update BN
    "mabn_tent_bn": Row("meta", "batch", "mabn+tent"),  # Table 4: MABN + TENT, update BN
    "mabn_tent_affine": Row("meta", "source", "mabn+tent"),  # Table 4: MABN + TENT, affine
    "mabn_unmatched": Row("meta", "source", "unmatched")}  # Table 3: another domain's phi~
UNADAPTED = {"stage1": "stage1", "meta": "none", "meta0": "no_inner"}  # per start, its plain row

def row_names(rows, ks):
    """{name: (row, k)}: row@k for each of several k if the row uses k images, else row."""
    names = {}
    for row in rows:
        for k in sorted(ks) if ROWS[row].uses_support else [None]:
            names[f"{row}@{k}" if k and len(ks) > 1 else row] = (row, k)
    return names

def row_params(row, model, target, phis, frozen, support_x, augment_fn, inner_lr, inner_steps=1):
    """The tensors `row` predicts a domain with, from phis[its start] and support_x (k, C, H, W)."""
    start, stats, rule = ROWS[row]
    phi = phis[start]
    if stats == "support" or (stats == "batch" and rule == "mabn+tent"):  # MABN's "update BN"
        frozen = {**frozen, **reestimate_bn_stats(model, {**frozen, **phi}, support_x)}
    if rule in MABN_RULES:
        phi = adapt_domain(model, phi, frozen, target, support_x, augment_fn, inner_lr, inner_steps)
    if stats == "batch":  # TENT's "update BN" from here on
        frozen = batch_statistics(frozen)
    return {**frozen, **{k: v.detach() for k, v in phi.items()}}

# --- Data and backbones ---
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

def resize(x, img_size):  # -> (C, img_size, img_size): uint8 photos, float arrays
    if torch.is_tensor(x):
        return F.interpolate(x[None].float(), (img_size,) * 2, mode="bilinear", antialias=True)[0]
    from torchvision.transforms.functional import pil_to_tensor
    return pil_to_tensor(x.convert("RGB").resize((img_size,) * 2, 2, reducing_gap=3.0))  # bilinear

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
            sys.exit(f"error: {name} under {where} is incomplete ({type(e).__name__}: {e}); fetch "
                     f"it by hand")
    if name == "domainnet":  # leave one out; validation on the sources' test sets
        objs = [get(source_domain=d, target_domain=args.target_domain) for d in DOMAINNET_DOMAINS
                if d != args.target_domain]
        parts = {"train": [(o, "train") for o in objs], "val": [(o, "id_test") for o in objs]}
    else:
        objs = [get()]
        parts = {"train": [(objs[0], "train")], "val": [(objs[0], "val")]}
    parts["test"] = [(objs[0], "test")]
    grouper = CombinatorialGrouper(objs[0], args.domain_fields)
    transform = functools.partial(resize, img_size=args.img_size)
    splits, metadata = {}, {}
    for split, pieces in parts.items():
        subsets = [o.get_subset(s, transform=transform) for o, s in pieces]
        metadata[split] = torch.cat([sub.metadata_array for sub in subsets])
        domains = grouper.metadata_to_group(metadata[split])
        splits[split] = Split(torch.utils.data.ConcatDataset(subsets), domains, split)
    task = "regression" if name == "poverty" else "classification"

    def evaluate(split, outputs, labels):  # WILDS' metrics, and per domain
        y_pred = outputs.argmax(-1) if task == "classification" else outputs.view(-1, 1)
        y_true = labels.view(y_pred.shape).to(y_pred.dtype)
        official = objs[0].eval(y_pred, y_true, metadata[split.name])[0]
        per_domain = domain_metrics(outputs, labels, split.domains, task)["per_domain"]
        return {**{k: float(v) for k, v in official.items()}, "per_domain": per_domain}
    norm = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}.get(args.norm, args.norm)
    return dict(splits=splits, n_outputs=1 if task == "regression" else objs[0].n_classes,
                task=task, in_channels=8 if name == "poverty" else 3, norm=norm, evaluate=evaluate)

def load_data(args):  # -> dict(splits, n_outputs, task, in_channels, norm, evaluate)
    if args.dataset != "digits":
        return load_wilds(args)
    splits = {s: Split(torch.utils.data.TensorDataset(x.float() / 255, y), domains, s)
              for s, (x, y, domains) in make_digits(size=args.img_size).items() if s != "id_test"}
    return dict(splits=splits, n_outputs=10, task="classification", in_channels=3, norm=args.norm,
                evaluate=lambda split, outputs, y: domain_metrics(outputs, y, split.domains))

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

def augment(x, gen, min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0):
    """BYOL's views of x (B, C, H, W), on its device: each image its own crop, rotation, colour."""
    B = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=x.device)
    scale = min_scale + (1 - min_scale) * rand(B)  # random resized crop
    angle = (2 * rand(B) - 1) * math.radians(max_rot)
    shift = (2 * rand(B, 2) - 1) * (1 - scale)[:, None]
    mirror = torch.where(rand(B) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=x.device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    if jitter > 0:  # brightness, contrast and (for RGB) per-channel gain
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + jitter * (2 * rand(B, 1, 1, 1) - 1)
        brightness = 1 + jitter * (2 * rand(B, 1, 1, 1) - 1)
        gain = 1 + 0.5 * jitter * (2 * rand(B, 3, 1, 1) - 1) if x.shape[1] == 3 else 1.0
        x = ((x - mean) * contrast + mean) * brightness * gain
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, device=x.device)
    return x

def normalizer(norm, channels):  # (B, C, H, W) -> normalised the dataset's way
    import torchvision
    if norm == "per_image":  # RxRx1: each image and channel standardised
        return nn.InstanceNorm2d(channels)
    return torchvision.transforms.Normalize(*norm) if norm else nn.Identity()  # (mean, std)

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
    arch = name.removesuffix("_8ch")  # resnet18_8ch: PovertyMap's, 8 bands
    try:
        net = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as e:  # offline
        sys.exit(f"error: could not load ImageNet weights for {arch} ({type(e).__name__}); put "
                 f"them in the torch hub cache, or pass --no_pretrained for random weights")
    last = "classifier" if arch == "densenet121" else "fc"
    dim = getattr(net, last).in_features
    setattr(net, last, nn.Identity())
    if in_channels != 3:  # PovertyMap's 8 bands: RGB filters, their mean for the rest
        rgb = net.conv1.weight.detach()  # (64, 3, 7, 7)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        extra = rgb.mean(1, keepdim=True).expand(-1, in_channels - 3, -1, -1)
        with torch.no_grad():
            net.conv1.weight.copy_(torch.cat([rgb, extra], 1))
    return net, dim

def build_model(args, data, device):  # -> (MABNNet, its target)
    net, feat_dim = build_backbone(args.backbone, data["in_channels"], args.pretrained)
    backbone = nn.Sequential(normalizer(data["norm"], data["in_channels"]), net)
    model = MABNNet(backbone, feat_dim, data["n_outputs"], args.proj_hidden, args.proj_dim)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, make_target(model)

# --- Loops: stage 3, checkpoints, stages 1 and 2, the pilot ---
def support_sets(split, k, seed, how="random"):
    """{domain: its k support images' indices}: at random per seed and domain (the paper), or the
    first k (Meta-DMoE)."""
    if how == "first":
        return {d: idx[:k] for d, idx in split.by_domain.items()}
    gens = {d: torch.Generator().manual_seed(2 * (1000 * seed + d)) for d in split.by_domain}
    return {d: [idx[i] for i in torch.randperm(len(idx), generator=gens[d])[:k]]
            for d, idx in split.by_domain.items()}

def evaluate(model, target, phis, data, split, rows, ks, args):
    """Stage 3: each row adapts to every domain from its support set (at each k), then predicts it
    in one pass. -> {name: metrics; per domain phi_shift, ||phi~ - phi|| / ||phi||, and changed,
    the share of predictions unlike the plain row's}"""
    device = next(model.parameters()).device
    model.eval()
    target.eval()
    tent_rules = ("tent", "mabn+tent")  # entropy: classification only
    names = {name: (row, k) for name, (row, k) in row_names(rows, ks).items()
             if data["task"] == "classification" or ROWS[row].rule not in tent_rules}
    supports = {}  # each domain's support images, read once
    if any(k for _, k in names.values()):
        sets = support_sets(split, max(ks), args.seed, args.support)
        loader = make_loader(split.dataset, args.num_workers, batch_sampler=list(sets.values()))
        supports = {d: batch[0] for d, batch in zip(sets, loader)}
        if min(map(len, sets.values())) < max(ks):
            log(f"note: '{split.name}' has domains of fewer than {max(ks)} images: they use all")
    domains = list(split.by_domain)
    swap = dict(zip(domains, domains[1:] + domains[:1]))  # Table 3: domains paired
    frozen = split_params(model)[1]

    def start_domain(d):  # {name: (tensors, TENT's state or None, phi~)}
        moved = {e: to_device(supports[e], device) for e in (d, swap[d])} if supports else {}
        states = {}
        for name, (row, k) in names.items():
            e = swap[d] if ROWS[row].rule == "unmatched" else d
            aug_gen = torch.Generator(device).manual_seed(2 * (1000 * args.seed + e) + 1)
            params = row_params(row, model, target, phis, frozen, moved[e][:k] if k else None,
                                functools.partial(augment, gen=aug_gen, **args.aug),
                                args.inner_lr, args.inner_steps)
            phi = {n: params[n] for n in phis[ROWS[row].start]}
            tent = tent_setup(phi, args.tent_lr) if ROWS[row].rule in tent_rules else None
            states[name] = (params, tent, {**phi, **(tent[0] if tent else {})})
        return states

    # one pass: the test batches, domain after domain
    size = args.eval_batch_size
    batches = [idx[a:a + size] for idx in split.by_domain.values()
               for a in range(0, len(idx), size)]
    loader = make_loader(split.dataset, args.num_workers, batch_sampler=batches)
    outputs = {name: [] for name in names}
    labels = []
    adapted = {name: {} for name in names}  # {name: {domain: phi~}}
    for idx, (x, y, *_) in tqdm(zip(batches, loader), total=len(batches),
                                desc=f"stage 3 {split.name}", leave=False, disable=None):
        d = int(split.domains[idx[0]])
        if idx[0] == split.by_domain[d][0]:  # a domain starts: every row adapts
            states = start_domain(d)
            for name, (_, _, phi) in states.items():
                adapted[name][d] = phi  # TENT's leaves: moved by its steps
        x = to_device(x, device)
        for name, (params, tent, _) in states.items():  # outputs stay on the device
            if tent:
                outputs[name].append(tent_forward_and_adapt(model, params, *tent, x))
            else:
                outputs[name].append(predict(model, params, x))
        labels.append(y)
    inverse = torch.argsort(torch.tensor([i for idx in batches for i in idx]))  # the split's order
    outputs = {name: torch.cat(out).cpu()[inverse] for name, out in outputs.items()}
    results = {name: data["evaluate"](split, outputs[name], torch.cat(labels)[inverse])
               for name in names}
    for name, (row, _) in names.items():  # what adaptation changed
        start, stats, rule = ROWS[row]
        if (stats, rule) == ("source", None) or UNADAPTED[start] not in names:
            continue
        seen = [k for k in phis[start] if k.startswith("backbone.")]  # the part predictions use
        before = torch.cat([phis[start][k].flatten() for k in seen])
        shifts = {d: torch.cat([phi[k].flatten() for k in seen]) - before
                  for d, phi in adapted[name].items()}
        results[name]["phi_shift"] = {d: (s.norm() / before.norm()).item()
                                      for d, s in shifts.items()}
        if data["task"] == "classification":
            changed = (outputs[name].argmax(-1) != outputs[UNADAPTED[start]].argmax(-1)).float()
            results[name]["changed"] = {d: changed[split.domains == d].mean().item()
                                        for d in domains}
    return results

STAGE_FLAGS = {  # what a stage's checkpoint depends on
    1: ("dataset", "seed", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay",
        "aux_weight", "ema", "max_steps", "img_size", "proj_hidden", "proj_dim", "pretrained",
        "target_domain"),
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

def mean_losses(losses, where, path):  # {name: mean} of an epoch's losses, read in ONE sync
    values = torch.stack([torch.stack(list(step.values())) for step in losses]).tolist()
    bad = [i for i, row in enumerate(values) if not all(map(math.isfinite, row))]
    if bad:
        sys.exit(f"error: {where}, step {bad[0] + 1}: non-finite loss "
                 f"{dict(zip(losses[0], values[bad[0]]))}; the last good checkpoint: {path}; "
                 f"lower the learning rate")
    return {k: sum(row[j] for row in values) / len(values) for j, k in enumerate(losses[0])}

class StageRun:
    """What stages 1 and 2 share around their loops: resuming from <out_dir>/<name>.pt; after each
    epoch the loss check, validation, model selection, the log line, a checkpoint; finish()."""

    def __init__(self, stage, name, model, target, opt, gens, data, args):
        self.label = f"stage {stage}" if name == f"stage{stage}" else name
        self.path = os.path.join(args.out_dir, f"{name}.pt")
        names = [k for s in range(1, stage + 1) for k in STAGE_FLAGS[s]]
        self.flags = {"format": 2, **{k: getattr(args, k) for k in names}}
        if stage == 2:  # the k of its validation
            self.flags["val_n_adapt"] = args.n_adapt[0]
        self.model = model
        self.target = target
        self.opt = opt
        self.gens = gens
        self.data = data
        self.args = args
        self.val_row = "stage1" if stage == 1 else "mabn"
        self.kept = set(model.state_dict() if stage == 1 else split_params(model)[0])
        self.n_epochs = args.epochs if stage == 1 else args.meta_epochs
        self.started = time.time()
        self.images = 0
        self.seconds = 0.0
        fresh = dict(done=False, stage=stage, epoch=-1, steps=0, best_metric=-math.inf, best=None)
        self.ckpt = load_checkpoint(self.path, self.flags) or fresh
        for key in ("model", "target", "opt"):
            if key in self.ckpt:
                getattr(self, key).load_state_dict(self.ckpt[key])
        for gen, state in zip(gens, self.ckpt.get("gens", [])):
            gen.set_state(state)
        if "model" in self.ckpt:
            resume = "" if self.ckpt["done"] else f", resuming after epoch {self.ckpt['epoch'] + 1}"
            log(f"{self.label}: loaded {self.path}{resume}")
        self.steps = self.ckpt["steps"]

    def epochs(self):  # the epochs still to run: none for a finished stage
        return range(0) if self.ckpt["done"] else range(self.ckpt["epoch"] + 1, self.n_epochs)

    def end_epoch(self, epoch, losses, n_images, t0):
        means = mean_losses(losses, f"{self.label}, epoch {epoch + 1}", self.path) if losses else {}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the epoch's time includes its GPU work
        seconds = time.time() - t0
        self.images += n_images
        self.seconds += seconds
        row = self.val_row
        phis = {ROWS[row].start: split_params(self.model)[0]}
        results = evaluate(self.model, self.target, phis, self.data, self.data["splits"]["val"],
                           [row], self.args.n_adapt[:1], self.args)
        val = results[row][self.args.val_metric]
        if self.ckpt["best"] is None or val > self.ckpt["best_metric"]:
            model = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                     if k in self.kept}
            target = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
            self.ckpt.update(best_metric=val, best=dict(model=model, target=target))
        losses_text = "".join(f"{k} {v:.4f} " for k, v in means.items())
        log(f"{self.label} epoch {epoch + 1}/{self.n_epochs}: {losses_text}| "
            f"{n_images / seconds:.0f} img/s | val {row} {self.args.val_metric} {val:.4f}")
        self.ckpt.update(epoch=epoch, steps=self.steps)
        if epoch + 1 < self.n_epochs:  # resumable; finish() saves the last epoch
            states = {key: getattr(self, key).state_dict() for key in ("model", "target", "opt")}
            gens = [gen.get_state() for gen in self.gens]
            save_atomic(dict(self.ckpt, **states, gens=gens, flags=self.flags), self.path)

    def finish(self):  # -> dict(steps, time_s, val, and img_per_s if it trained)
        if not self.ckpt["done"]:
            if self.ckpt["best"] is not None:  # the best epoch, with its target
                self.model.load_state_dict(self.ckpt["best"]["model"], strict=False)
                self.target.load_state_dict(self.ckpt["best"]["target"])
            save_atomic(dict(done=True, stage=self.ckpt["stage"], steps=self.steps,
                             model=self.model.state_dict(), target=self.target.state_dict(),
                             best_metric=self.ckpt["best_metric"], flags=self.flags), self.path)
        seconds = time.time() - self.started
        out = dict(steps=self.steps, time_s=seconds, val=self.ckpt["best_metric"])
        if self.seconds:
            out["img_per_s"] = round(self.images / self.seconds, 1)
        return out

def train_joint(model, target, data, args):
    """Stage 1, Eq. (2): the whole network on the source domains mixed, Adam."""
    device = next(model.parameters()).device
    train = data["splits"]["train"]
    # own generators for views and order, restored on resuming
    aug_gen = torch.Generator(device).manual_seed(args.seed)
    order_gen = torch.Generator().manual_seed(args.seed)
    augment_fn = functools.partial(augment, gen=aug_gen, **args.aug)
    sampler = torch.utils.data.RandomSampler(train.dataset, generator=order_gen)
    loader = make_loader(train.dataset, args.num_workers, batch_size=args.batch_size,
                         sampler=sampler, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")
    run = StageRun(1, "stage1", model, target, opt, [aug_gen, order_gen], data, args)
    for epoch in run.epochs():
        t0 = time.time()
        # the paper halves the LR after a fixed epoch
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.5 if epoch >= args.lr_decay_epoch else 1.0)
        model.train()
        target.train()
        # Eq. (2) on every batch, the losses left on the device
        losses = []
        n_images = 0
        for x, y, *_ in tqdm(loader, desc=f"stage 1, epoch {epoch + 1}", leave=False, disable=None):
            if run.steps >= (args.max_steps or math.inf):
                break
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            loss_main, loss_aux = joint_step(model, target, opt, x, y, augment_fn, args.aux_weight,
                                             args.ema, data["task"])
            losses.append(dict(main=loss_main, aux=loss_aux))
            n_images += len(x)
            run.steps += 1
        run.end_epoch(epoch, losses, n_images, t0)
    return run.finish()

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

def meta_steps_per_epoch(split, args):  # an epoch: each source image about once
    return max(1, len(split.domains) // ((args.n_support + args.n_query) * args.meta_batch))

def train_meta(model, target, data, args, name="stage2"):
    """Stage 2, Alg. 1: weights and BN statistics frozen, phi learnt by meta_step (Eq. 3-4)."""
    device = next(model.parameters()).device
    train = data["splits"]["train"]
    phi, frozen = split_params(model)
    aug_gen = torch.Generator(device).manual_seed(args.seed + 2)  # stage 1's seeds + 2
    order_gen = torch.Generator().manual_seed(args.seed + 2)
    model.requires_grad_(False)
    for p in phi.values():  # only phi learns (Eq. 4)
        p.requires_grad_(True)
    opt = torch.optim.Adam(phi.values(), lr=args.outer_lr, fused=device.type == "cuda")
    run = StageRun(2, name, model, target, opt, [aug_gen, order_gen], data, args)
    meta_kw = dict(augment_fn=functools.partial(augment, gen=aug_gen, **args.aug),
                   inner_lr=args.inner_lr, aux_weight=args.aux_weight, inner_steps=args.inner_steps,
                   first_order=args.first_order, task=data["task"])
    model.eval()  # BN: stage 1's source statistics, never updated
    target.eval()
    for epoch in run.epochs():
        t0 = time.time()
        losses = []
        n_images = 0
        batches = meta_batches(train, args, meta_steps_per_epoch(train, args), order_gen, device)
        for episodes in tqdm(batches, desc=f"{run.label}, epoch {epoch + 1}", leave=False,
                             disable=None):
            if run.steps >= (args.max_steps or math.inf):
                break
            # Eq. (3)-(4) on B episodes
            modes = [m.training for m in (*model.modules(), *target.modules())]
            assert not any(modes), "stage 2 needs BN in eval mode (its source statistics)"
            step_losses = meta_step(model, phi, frozen, target, opt, episodes, **meta_kw)
            losses.append(dict(zip(("meta", "main", "aux"), step_losses)))
            n_images += sum(len(support_x) + len(query_x) for support_x, query_x, _ in episodes)
            run.steps += 1
        run.end_epoch(epoch, losses, n_images, t0)
    return run.finish()

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the pilot's grid for alpha (inner LR)
DELTAS = (1e-4, 1e-3, 1e-2)  # and delta's; alpha's pilots use the last

def choose_lrs(model, target, data, args):
    """alpha and delta (unpublished) unless given, by validation: a pilot of --pilot_steps per
    candidate, alpha on ALPHAS, then delta on DELTAS. The model's phi is stage 1's on return."""
    stage1_phi = clone_phi(model)
    n_steps = min(args.pilot_steps, args.max_steps or math.inf)
    n_epochs = math.ceil(n_steps / meta_steps_per_epoch(data["splits"]["train"], args))
    scores = {}

    def score(alpha, delta):  # a pilot's best validation score
        if (alpha, delta) not in scores:
            trial = argparse.Namespace(**{**vars(args), "inner_lr": alpha, "outer_lr": delta,
                                          "meta_epochs": n_epochs, "max_steps": n_steps})
            name = f"pilot_alpha{alpha:g}_delta{delta:g}"
            scores[alpha, delta] = train_meta(model, target, data, trial, name)["val"]
            model.load_state_dict(stage1_phi, strict=False)
        return scores[alpha, delta]
    inner_lr = args.inner_lr
    if inner_lr is None:  # the first best: on a tie, the smaller step
        inner_lr = max(ALPHAS, key=lambda alpha: score(alpha, args.outer_lr or DELTAS[-1]))
    outer_lr = args.outer_lr
    if outer_lr is None:
        outer_lr = max(DELTAS, key=lambda delta: score(inner_lr, delta))
    tried = ", ".join(f"({a:g}, {d:g}) {val:.4f}" for (a, d), val in scores.items())
    log(f"pilot: alpha {inner_lr:g}, delta {outer_lr:g}; scored {tried}")
    candidates = [dict(inner_lr=a, outer_lr=d, score=val) for (a, d), val in scores.items()]
    return dict(inner_lr=inner_lr, outer_lr=outer_lr, candidates=candidates)

# --- Flags with per-dataset defaults, and main ---
# Sources: [P] paper, [D] Meta-DMoE, [B] byol-pytorch, [T] TENT, [M] measured (README), [*] ours
RGB_AUG = dict(min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0)  # [*] BYOL's views
ROTATED = dict(RGB_AUG, min_scale=0.8, max_rot=180.0)  # [*] tissue, cells, PovertyMap: any angle
BASE = dict(  # every dataset's unless overridden
    backbone="resnet50", img_size=224, pretrained=True, norm="imagenet", n_adapt=[32],  # [P]
    val_metric="acc_avg", aux_weight=0.1, lr_decay_epoch=20, meta_epochs=10, inner_steps=1,  # [P]
    proj_hidden=4096, proj_dim=256,  # [P]
    weight_decay=0.0, n_support=64, n_query=48,  # [D]
    ema=0.99,  # [B]
    tent_lr=1e-3,  # [T]
    meta_batch=1, pilot_steps=100,  # [M]
    eval_batch_size=128, aug=RGB_AUG, domain_fields=None)  # [*]
DATASETS = {
    "digits": dict(  # offline, for two CPU cores [*]
        BASE, backbone="small_resnet", img_size=16, norm=((0.5,) * 3, (0.25,) * 3),
        pretrained=False, batch_size=64, lr=2e-3, epochs=10, lr_decay_epoch=7, meta_epochs=6,
        n_support=32, n_query=32, proj_hidden=256, proj_dim=64, eval_batch_size=50,
        aug=dict(RGB_AUG, min_scale=0.7, max_rot=15.0, flip=False, noise=0.05)),
    "iwildcam": dict(
        BASE, img_size=448, n_adapt=[12], domain_fields=["location"],  # [P]
        val_metric="F1-macro_all",  # [P]
        batch_size=16, lr=3e-5, epochs=12, n_support=24, n_query=16,  # [D]
        eval_batch_size=64),  # [*]
    "camelyon17": dict(
        BASE, backbone="densenet121", img_size=96, domain_fields=["slide"],  # [P]
        batch_size=32, lr=1e-3, epochs=5, weight_decay=1e-2, n_query=32,  # [D]
        eval_batch_size=256, aug=ROTATED),  # [*]
    "rxrx1": dict(
        BASE, img_size=256, domain_fields=["experiment"], norm="per_image",  # [P]
        batch_size=75, lr=1e-4, epochs=90, weight_decay=1e-5, n_support=75,  # [D]
        eval_batch_size=150, aug=dict(ROTATED, jitter=0.2)),  # [*]
    "fmow": dict(
        BASE, backbone="densenet121", domain_fields=["region", "year"],  # [P]
        val_metric="acc_worst_region",  # [P]
        batch_size=64, lr=1e-4, epochs=20),  # [D]
    "poverty": dict(
        BASE, backbone="resnet18_8ch", domain_fields=["country"], val_metric="r_wg",  # [P]
        norm=None, batch_size=64, lr=1e-3, epochs=50,  # [*], as are BASE's [D] values here
        aug=dict(ROTATED, jitter=0.0, noise=0.02)),  # [*]
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
    flag("--methods", nargs="+", default=["stage1", "none", "mabn"], metavar="ROW",
         choices=[*ROWS, "all"], help=f"stage 3's rows: all, or of {', '.join(ROWS)}")
    flag("--support", default="random", choices=["random", "first"], help="a domain's k images")
    flag("--inner_lr", type=rate0, help="alpha, Eq. (3)'s step (%(default)s: the pilot's)")
    flag("--outer_lr", type=rate, help="delta, Eq. (4)'s Adam LR (%(default)s: the pilot's)")
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
    tuned("--n_support", type=count, help="an episode's support images")
    tuned("--n_query", type=count, help="an episode's query images")
    tuned("--meta_batch", type=count, help="B, Alg. 1's episodes per outer step")
    tuned("--inner_steps", type=count, help="Eq. (3)'s steps, stages 2 and 3")
    tuned("--pilot_steps", type=count, help="a pilot's outer steps")
    tuned("--tent_lr", type=rate, help="TENT's Adam LR")
    tuned("--eval_batch_size", type=count, help="stage 3's (TENT's test) batch size")
    tuned("--img_size", type=count, help="the input's side in pixels")
    p.set_defaults(**DATASETS[dataset])
    args = p.parse_args(argv)
    if args.ema >= 1:
        p.error(f"argument --ema: must be in [0, 1), got {args.ema}")
    # values computed at run time
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.num_workers is None:  # WILDS decodes images in workers
        cores = len(os.sched_getaffinity(0))
        args.num_workers = 0 if args.dataset == "digits" else max(1, min(16, cores - 1))
    chosen = set(ROWS) if "all" in args.methods else set(args.methods)
    chosen |= {UNADAPTED[ROWS[row].start] for row in chosen}  # each start's plain row: "changed"
    args.methods = [row for row in ROWS if row in chosen]  # in ROWS' order
    args.out_dir = args.out_dir or os.path.join("runs", args.dataset)
    args.seed = args.seeds[0]
    return args

def clone_phi(model):
    return {k: v.detach().clone() for k, v in split_params(model)[0].items()}

def run_seed(args, data):
    """The pipeline for args.seed (args: the seed's copy; it takes the pilot's alpha and delta)."""
    torch.manual_seed(args.seed)
    model, target = build_model(args, data, torch.device(args.device))
    stages = {"stage1": train_joint(model, target, data, args)}
    phis = {"stage1": clone_phi(model)}
    t0 = time.time()
    pilot = choose_lrs(model, target, data, args)
    stages["pilot"] = dict(time_s=time.time() - t0)
    vars(args).update(inner_lr=pilot["inner_lr"], outer_lr=pilot["outer_lr"])
    # the control: stage 2 from stage 1's phi at alpha = 0 (first order: the same gradient)
    if "no_inner" in args.methods:
        control = argparse.Namespace(**{**vars(args), "inner_lr": 0.0, "first_order": True})
        stages["stage2_alpha0"] = train_meta(model, target, data, control, "stage2_alpha0")
        phis["meta0"] = clone_phi(model)
        model.load_state_dict(phis["stage1"], strict=False)
    stages["stage2"] = train_meta(model, target, data, args)
    phis["meta"] = split_params(model)[0]
    t0 = time.time()  # stage 3
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
    log(f"\n{'row':<24}{'from':>7}{'stats':>8}" + "".join(f"{m:>{width}}" for m in metrics)
        + f"   (target domains, split 'test', {seeds})")
    names = row_names(ROWS, ks)
    summary = {}
    for name in per_seed[0]["target"]:
        values = {m: torch.tensor([r["target"][name][m] for r in per_seed]) for m in metrics}
        summary[name] = {m: (v.mean().item(), v.std().item() if many else 0.0)
                         for m, v in values.items()}
        cells = [f"{avg:.4f} ± {std:.3f}" if many else f"{avg:.4f}"
                 for avg, std in summary[name].values()]
        start, stats, _ = ROWS[names[name][0]]
        log(f"{name:<24}{start:>7}{stats:>8}" + "".join(f"{c:>{width}}" for c in cells))
    for k in sorted(ks):
        at_k = {row: name for name, (row, k_row) in names.items() if k_row in (k, None)}
        pairs = [[summary.get(at_k[row]) for row in pair] for pair in GRID.values()]
        if all(all(pair) for pair in pairs):
            log(f"\nTable 4 at k={k}, {metrics[0]}: {'update BN':>15}{'update affine':>18}")
            for label, (bn, affine) in zip(GRID, pairs):
                log(f"{label:<27}{bn[metrics[0]][0]:>15.4f}{affine[metrics[0]][0]:>18.4f}")
    return summary

def main(args, data=None):
    """Every seed in <out_dir>/seed<k>/ (finished stages reused), then the table over seeds.
    `data` (as load_data returns it) replaces --dataset's."""
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
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
        seed_args.out_dir = os.path.join(args.out_dir, f"seed{seed}")
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
