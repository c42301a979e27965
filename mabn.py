"""MABN: Test-Time Domain Adaptation by Learning Domain-Aware Batch Normalization (AAAI 2024, arXiv 2312.10165).

A single-file reference implementation. The method in three lines:
  1. Train backbone + linear head jointly with a BYOL auxiliary branch on all source domains (Eq. 2).
  2. Freeze the weights and BN statistics; meta-learn only the BN affine (gamma, beta) so that one BYOL step on a
     domain's unlabelled support set lowers the labelled loss on a disjoint query set (Alg. 1, Eq. 3-4).
  3. At test time, per target domain: one BYOL step on k unlabelled images, then predict the whole domain.

Commands:
  python mabn.py                                   # offline default benchmark (sklearn digits, 36 domains)
  python mabn.py --dataset iwildcam --root_dir DATA
  python mabn.py --methods all --n_adapt 32 1 2 4 8 16 64 --seeds 0 1 2 3 4   # baselines and the paper's analyses
  python -m pytest -q test_mabn.py
  python test_mabn.py --speed                      # the GPU speed figures of the README, on generated data
Top to bottom: the method (BEGIN/END METHOD, torch only), baselines and analyses, data, loops, flags and main.
"""
# ================================================== BEGIN METHOD ==================================================
# All of MABN as one copyable block, on torch alone. Every function is pure in its arguments: adapted parameters are
# {name: tensor} dicts run through torch.func.functional_call. phi: the BN affine (gamma, beta); frozen: the rest.
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

def mlp(d_in, d_hidden, d_out):
    """BYOL projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

class MABNNet(nn.Module):
    """backbone (with BN) -> pooled feature -> main head (one linear layer, no BN) | BYOL projector -> predictor."""
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
        return self.head(feats), self.predictor(self.projector(feats))  # (B, n_outputs), (B, proj_dim)

def make_target(model):
    """BYOL's target network: a gradient-free copy of backbone + projector, kept as an EMA of the online one."""
    return nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.projector)).requires_grad_(False)

def split_params(model):
    """-> (phi: every BatchNorm weight (gamma) and bias (beta), all that MABN adapts; frozen: every other parameter and
    buffer), both {name: tensor}."""
    bn = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for p in ("weight", "bias")}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v for k, v in state.items() if k in bn}, {k: v for k, v in state.items() if k not in bn}

def byol_loss(prediction, target_projection):
    """2 - 2 cos(p, z) per sample: (B, D), (B, D) -> (B,)."""
    return 2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target_projection, dim=-1)).sum(-1)

def main_loss(outputs, y, task="classification"):
    """Cross-entropy, or MSE for regression (PovertyMap): outputs (B, n_outputs), y (B,)."""
    if task == "classification":
        return F.cross_entropy(outputs, y)
    return F.mse_loss(outputs.view(-1), y.float().view(-1))

def joint_losses(model, params, target, x, y, augment_fn, task="classification"):
    """-> (L_main on the images x, or 0 when y is None; L_aux: BYOL on two augmented views of x, symmetrised). params
    {name: tensor} replace the module's own tensors (stages 2-3); None runs the module as it is (stage 1)."""
    B = x.shape[0]
    v1 = augment_fn(x)  # every image draws its own random view, twice
    v2 = augment_fn(x)
    inputs = torch.cat([v1, v2] if y is None else [x, v1, v2])  # (2B or 3B, C, H, W)
    outputs, predictions = functional_call(model, params or {}, (inputs,), {"aux": True})  # {}: the module's own
    with torch.no_grad():
        z = target(torch.cat([v1, v2]))  # (2B, proj_dim): the target network gets no gradient
    p1, p2, z1, z2 = predictions[-2 * B:-B], predictions[-B:], z[:B], z[B:]  # (B, proj_dim) each
    loss_aux = (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()  # view 1 predicts view 2's target, and back
    loss_main = main_loss(outputs[:B], y, task) if y is not None else torch.zeros((), device=x.device)
    return loss_main, loss_aux

@torch.no_grad()
def ema_update(target, model, tau):
    """BYOL target <- tau * target + (1 - tau) * online, for every parameter of backbone + projector."""
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    torch._foreach_lerp_(list(target.parameters()), online, 1 - tau)  # one fused kernel, not one per tensor

def joint_step(model, target, opt, x, y, augment_fn, aux_weight=0.1, tau=0.99, task="classification"):
    """Stage 1, one step of Eq. (2) on a labelled batch x (B, C, H, W), y (B,): the whole network on
    L_main + lambda L_aux, then the EMA update of the target. -> (L_main, L_aux), detached, left on the device."""
    loss_main, loss_aux = joint_losses(model, None, target, x, y, augment_fn, task)
    opt.zero_grad(set_to_none=True)
    (loss_main + aux_weight * loss_aux).backward()  # Eq. (2)
    opt.step()
    ema_update(target, model, tau)
    return loss_main.detach(), loss_aux.detach()

def inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps=1, create_graph=True):
    """Eq. (3): phi~ = phi - alpha * grad_phi L_aux(S; phi), `steps` times, on unlabelled images support_x (S, C, H, W).
    create_graph=True keeps phi~ differentiable through the gradient (second order); False treats it as a constant."""
    adapted = dict(phi)
    for _ in range(steps):
        _, loss_aux = joint_losses(model, {**frozen, **adapted}, target, support_x, None, augment_fn)
        grads = torch.autograd.grad(loss_aux, list(adapted.values()), create_graph=create_graph)
        adapted = {k: v - inner_lr * g for (k, v), g in zip(adapted.items(), grads)}  # Eq. (3)
    return adapted

def meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn, inner_lr, aux_weight=0.1,
              inner_steps=1, first_order=False, task="classification"):
    """Eq. (4)'s objective: L_main(Q; phi~) + lambda L_aux(Q; phi~), phi~ adapted on the support set by Eq. (3).
    Differentiable in the original phi. -> (objective, L_main, L_aux)."""
    adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, inner_steps, not first_order)
    loss_main, loss_aux = joint_losses(model, {**frozen, **adapted}, target, query_x, query_y, augment_fn, task)
    return loss_main + aux_weight * loss_aux, loss_main, loss_aux

def meta_step(model, phi, frozen, target, opt, episodes, augment_fn, **meta_kw):
    """Stage 2, one outer step of Alg. 1 on a meta batch: episodes = [(support_x, query_x, query_y), ...], one per
    sampled source domain (unlabelled support S_i, labelled query Q_i). Eq. (4): the gradient of the SUMMED objective
    (Alg. 1's L_B) w.r.t. the ORIGINAL phi through each inner step, then opt's step (Adam, delta) on phi. BN must be in
    eval mode (source statistics, never updated). meta_kw: meta_loss's. -> per-episode means of the losses, detached."""
    opt.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=episodes[0][0].device)
    for support_x, query_x, query_y in episodes:
        losses = meta_loss(model, phi, frozen, target, support_x, query_x, query_y, augment_fn, **meta_kw)
        losses[0].backward()  # Eq. (4), episode by episode: the gradients add up to the sum's, one graph at a time
        totals += torch.stack(losses).detach()
    opt.step()
    return totals / len(episodes)

def adapt_domain(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps=1):
    """Alg. 1, line 12, first half: Eq. (3) from the meta-learned phi on a target domain's k unlabelled images support_x
    (k, C, H, W). -> phi~, detached; then predict(model, {**frozen, **phi~}, x) for every image x of the domain."""
    phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad():
        adapted = inner_step(model, phi, frozen, target, support_x, augment_fn, inner_lr, steps, create_graph=False)
    return {k: v.detach() for k, v in adapted.items()}

@torch.no_grad()
def predict(model, params, x):
    """Alg. 1, line 12, second half: the main head's outputs (B, n_outputs) for images x (B, C, H, W) with the tensors
    in params, e.g. {**frozen, **phi~}; the auxiliary branch is discarded. The model's BN must be in eval mode."""
    return functional_call(model, params, (x,))
# =================================================== END METHOD ===================================================
import argparse, functools, glob, json, math, os, sys, time  # noqa: E401, E402 (the harness's imports)
from statistics import mean  # noqa: E402
from tqdm import tqdm  # noqa: E402 (comes with wilds; shown on a terminal only)

# --- Baselines and the paper's analyses (Tables 3-4, Fig. 5) --------------------------------------------------------
def batch_statistics(params):
    """params without the backbone's BN running statistics: every BN then normalises each batch with that batch's own
    (as in training, with nothing stored), TENT's "update BN"."""
    return {k: None if k.startswith("backbone.") and k.endswith(("running_mean", "running_var")) else v
            for k, v in params.items()}

@torch.no_grad()
def reestimate_bn_stats(model, params, support_x):
    """BN statistics re-estimated on a support set (Schneider et al. 2020), to replace the backbone's running ones
    (Table 4's "update BN" for MABN): what each BN sees of support_x, normalised layer by layer with its own."""
    names = {m: f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stats = {}

    def record(mod, inputs):  # x (B, C, H, W)
        stats[f"{names[mod]}.running_mean"] = inputs[0].mean((0, 2, 3))
        stats[f"{names[mod]}.running_var"] = inputs[0].var((0, 2, 3))  # unbiased, as training stores it
    handles = [mod.register_forward_pre_hook(record) for mod in names]
    try:
        functional_call(model, batch_statistics(params), (support_x,))
    finally:
        for handle in handles:
            handle.remove()
    return stats

def tent_setup(phi, lr=1e-3):
    """TENT's collect_params and setup_optimizer, with its code's defaults (Adam, lr 1e-3, betas 0.9, 0.999): fresh
    leaves for phi's backbone part (the BN affine the main head sees) and their optimiser. -> (leaves, optimiser)"""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items() if k.startswith("backbone.")}
    return leaves, torch.optim.Adam(leaves.values(), lr, betas=(0.9, 0.999))

def tent_forward_and_adapt(model, params, leaves, opt, x):
    """TENT (Wang et al. 2021) on one test batch x (B, C, H, W), as its forward_and_adapt: predict x with params and
    the leaves, minimise the batch's mean prediction entropy, step opt on the leaves. -> the outputs (B, n_classes)."""
    with torch.enable_grad():
        logits = functional_call(model, {**params, **leaves}, (x,))
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        grads = torch.autograd.grad(entropy, list(leaves.values()))  # nothing else gets a gradient
    for leaf, grad in zip(leaves.values(), grads):
        leaf.grad = grad
    opt.step()
    return logits.detach()

# The rows of stage 3: (the model a row starts from: after stage 1, meta-trained, or meta-trained with alpha = 0; its BN
# statistics: stage 1's running ones, re-estimated on the support set, or each batch's own; its adaptation rule).
ROWS = {
    "stage1": ("stage1", "source", None),  # component ablation: joint training, no adaptation
    "bn_stats": ("stage1", "support", None),  # BN statistics re-estimated on the support set
    "tent_bn": ("stage1", "batch", "tent"),  # Table 4: TENT, update BN (TENT as published)
    "tent_affine": ("stage1", "source", "tent"),  # Table 4: TENT, update affine
    "no_meta": ("stage1", "source", "mabn"),  # Fig. 5 and the ablation: MABN's step without meta-training
    "no_inner": ("meta0", "source", None),  # the control: stage 2 without its inner step (alpha = 0), no adaptation
    "none": ("meta", "source", None),  # Table 3 and the ablation: meta-trained, no adaptation
    "mabn": ("meta", "source", "mabn"),  # MABN (Table 3: matched; Table 4: MABN, update affine)
    "mabn_bn": ("meta", "support", "mabn"),  # Table 4: MABN, update BN
    "mabn_tent_bn": ("meta", "batch", "mabn+tent"),  # Table 4: MABN + TENT, update BN
    "mabn_tent_affine": ("meta", "source", "mabn+tent"),  # Table 4: MABN + TENT, update affine
    "mabn_unmatched": ("meta", "source", "unmatched"),  # Table 3: each domain predicted with another domain's phi~
}
UNADAPTED = {"stage1": "stage1", "meta": "none", "meta0": "no_inner"}  # each start's row without adaptation

def sees_support(row):  # whether a row uses a domain's k support images (TENT alone adapts on the test batches)
    return ROWS[row][1] == "support" or ROWS[row][2] in ("mabn", "mabn+tent", "unmatched")

def row_name(row, k, ks):  # a row's name in the results: row@k when several k are evaluated and the row uses k images
    return f"{row}@{k}" if sees_support(row) and len(ks) > 1 else row

def row_params(row, model, target, phis, frozen, support_x, augment_fn, args):
    """The tensors `row` starts a domain's predictions with, from phis[its start] and k unlabelled images support_x
    (k, C, H, W): MABN's step (Eq. 3) taken; TENT's rows go on to adapt online on each test batch (evaluate)."""
    start, stats, rule = ROWS[row]
    phi = phis[start]
    if stats == "support" or (stats == "batch" and rule == "mabn+tent"):  # MABN's "update BN", before TENT's
        frozen = {**frozen, **reestimate_bn_stats(model, {**frozen, **phi}, support_x)}
    if rule in ("mabn", "mabn+tent", "unmatched"):
        phi = adapt_domain(model, phi, frozen, target, support_x, augment_fn, args.inner_lr, args.inner_steps)
    if stats == "batch":  # TENT's "update BN" from here on: every test batch normalised with its own statistics
        frozen = batch_statistics(frozen)
    return {**frozen, **{k: v.detach() for k, v in phi.items()}}

# --- Data and backbones. A split: dataset[i] -> (x, y, ...), domains[i] = the domain of item i ------------------------
class Split:
    def __init__(self, dataset, domains, name):
        self.dataset, self.domains, self.name = dataset, torch.as_tensor(domains), name
        self.by_domain = {int(d): torch.nonzero(self.domains == d).flatten().tolist()  # {domain: indices, in order}
                          for d in torch.unique(self.domains)}

def make_loader(dataset, args, device, **kw):  # the run's workers, kept alive across epochs; pinned memory on CUDA
    return torch.utils.data.DataLoader(dataset, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=args.num_workers > 0, **kw)

def to_device(x, device):  # without blocking the host; uint8 photos become floats in [0, 1] there
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x

def make_digits(size=16, n_source=24, n_val=4, n_test=8, per_domain=150, seed=0):
    """The offline benchmark: sklearn's 1797 bundled 8x8 digits drawn by "cameras" (domains), each with its own colours,
    grating, stroke, rotation, zoom, blur and noise; each split its own drawings. -> {split: (x uint8, y, domain)}."""
    from sklearn.datasets import load_digits
    gen = torch.Generator().manual_seed(seed)

    def u(lo, hi, *shape):  # uniform in [lo, hi)
        return lo + (hi - lo) * torch.rand(shape, generator=gen)
    digits = load_digits()
    ink_all = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y_all = torch.tensor(digits.target)
    pools = dict(zip(("train", "id_test", "val", "test"),  # 48/12/12/28 % of the drawings
                     torch.randperm(len(y_all), generator=gen).tensor_split([862, 1078, 1293])))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = {s: [] for s in pools}
    for d in range(n_source + n_val + n_test):
        if d < n_source:
            take = {"train": int(0.8 * per_domain), "id_test": per_domain - int(0.8 * per_domain)}
        else:
            take = {"val" if d < n_source + n_val else "test": per_domain}
        drawn = {s: pools[s][torch.randperm(len(pools[s]), generator=gen)[:k]] for s, k in take.items()}
        idx = torch.cat(list(drawn.values()))
        ink = F.interpolate(ink_all[idx, None], size=(size, size), mode="bilinear", align_corners=False)
        stroke = int(torch.randint(0, 3, (1,), generator=gen))  # 0 thin, 1 as drawn, 2 thick
        if stroke == 2:
            ink = F.max_pool2d(ink, 3, 1, 1)
        elif stroke == 0:
            ink = 0.5 * (ink - F.max_pool2d(-ink, 3, 1, 1))  # half-way to an erosion
        angle, zoom = math.radians(float(u(-30, 30))), float(u(0.8, 1.25))
        rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
        grid = F.affine_grid((rot / zoom).expand(len(idx), 2, 3), [len(idx), 1, size, size], align_corners=False)
        ink = F.grid_sample(ink, grid, align_corners=False)  # zeros outside: background
        taps = torch.exp(-torch.arange(-3, 4.0) ** 2 / (2 * float(u(0.1, 1.2)) ** 2))  # a Gaussian blur
        taps = taps / taps.sum()
        ink = F.conv2d(F.conv2d(ink, taps.view(1, 1, 1, 7), padding=(0, 3)), taps.view(1, 1, 7, 1), padding=(3, 0))
        grey = float(u(0.2, 0.8))  # background grey level; the ink lighter or darker by a contrast, both tinted
        ink_grey = grey + (1 if grey < 0.5 else -1) * float(u(0.3, 0.6))
        bg, fg = grey + u(-0.2, 0.2, 3), ink_grey + u(-0.2, 0.2, 3)
        freq, theta, amp = float(u(1, 4)), float(u(0, math.pi)), float(u(0, 0.2))
        texture = amp * torch.sin(math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))  # (size, size)
        img = (bg.view(3, 1, 1) + texture * u(-1, 1, 3).view(3, 1, 1)) * (1 - ink) + fg.view(1, 3, 1, 1) * ink
        img = img + float(u(0, 0.1)) * torch.randn(img.shape, generator=gen)  # (n, 3, size, size)
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        for (split, part), img_part in zip(drawn.items(), img.split([len(p) for p in drawn.values()])):
            out[split].append((img_part, y_all[part], torch.full((len(part),), d)))
    return {s: tuple(torch.cat(t) for t in zip(*parts)) for s, parts in out.items()}

def resize(x, img_size):  # -> (C, img_size, img_size): photos uint8 (to_device scales them), arrays (Poverty) float
    if torch.is_tensor(x):
        return F.interpolate(x[None].float(), size=(img_size,) * 2, mode="bilinear", antialias=True)[0]
    from torchvision.transforms.functional import pil_to_tensor
    return pil_to_tensor(x.convert("RGB").resize((img_size,) * 2, 2, reducing_gap=3.0))  # 2: bilinear, antialiased

def scatter(src, index, dim=-1, dim_size=None, reduce="sum"):  # torch_scatter's, as wilds' grouped metrics use it
    out = torch.zeros(dim_size, dtype=src.dtype, device=src.device)  # empty groups give 0
    return out.scatter_reduce(0, index, src, reduce="mean" if reduce == "mean" else "sum", include_self=False)

DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]

def load_wilds(args):
    """The train, OOD validation and OOD test splits of a WILDS dataset, through wilds.get_dataset."""
    where = os.path.abspath(args.root_dir)
    if not args.download and not glob.glob(os.path.join(args.root_dir, f"{args.dataset}_v*", "RELEASE_v*.txt")):
        sys.exit(f"error: no {args.dataset} data under {where} (wilds expects a folder {args.dataset}_v<version>/ "
                 f"with a RELEASE_v<version>.txt); download it there or pass --download")  # before the slow imports
    sys.modules.setdefault("outdated", None)  # wilds' background version check needs the network
    sys.modules.setdefault("torch_scatter", argparse.Namespace(scatter=scatter))  # no wheel on every platform
    import wilds
    from wilds.common.grouper import CombinatorialGrouper

    def get(**kw):
        try:
            return wilds.get_dataset(dataset=args.dataset, root_dir=args.root_dir, download=args.download, **kw)
        except (OSError, ValueError) as e:  # a failed download, or a folder without the files wilds reads
            sys.exit(f"error: {args.dataset} under {where} is incomplete ({type(e).__name__}: {e}); fetch it by hand")
    if args.dataset == "domainnet":  # leave one out: a wilds object per source; validation on their own test images
        objs = [get(source_domain=d, target_domain=args.target_domain) for d in DOMAINNET_DOMAINS
                if d != args.target_domain]
        parts = {"train": [(o, "train") for o in objs], "val": [(o, "id_test") for o in objs]}
    else:
        objs = [get()]
        parts = {"train": [(objs[0], "train")], "val": [(objs[0], "val")]}
    parts["test"] = [(objs[0], "test")]
    grouper, splits, metadata = CombinatorialGrouper(objs[0], args.domain_fields), {}, {}
    for name, pieces in parts.items():
        subsets = [o.get_subset(s, transform=functools.partial(resize, img_size=args.img_size)) for o, s in pieces]
        metadata[name] = torch.cat([sub.metadata_array for sub in subsets])
        domains = grouper.metadata_to_group(metadata[name])
        splits[name] = Split(torch.utils.data.ConcatDataset(subsets), domains, name)
    task = "regression" if args.dataset == "poverty" else "classification"

    def evaluate(split, outputs, labels):  # WILDS' official metrics on the pooled predictions, and per domain
        y_pred = outputs.argmax(-1) if task == "classification" else outputs.view(-1, 1)
        official = objs[0].eval(y_pred, labels.view(y_pred.shape).to(y_pred.dtype), metadata[split.name])[0]
        per_domain = domain_metrics(outputs, labels, split.domains, task)["per_domain"]
        return {**{k: float(v) for k, v in official.items()}, "per_domain": per_domain}
    norm = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}.get(args.norm, args.norm)
    return dict(splits=splits, n_outputs=1 if task == "regression" else objs[0].n_classes, task=task,
                in_channels=8 if args.dataset == "poverty" else 3, norm=norm, evaluate=evaluate)

def load_data(args):  # -> dict(splits={name: Split}, n_outputs, task, in_channels, norm, evaluate=f(split, out, y))
    if args.dataset != "digits":
        return load_wilds(args)
    splits = {s: Split(torch.utils.data.TensorDataset(x.float() / 255, y), dom, s)
              for s, (x, y, dom) in make_digits(size=args.img_size).items() if s != "id_test"}
    return dict(splits=splits, n_outputs=10, task="classification", in_channels=3, norm=args.norm,
                evaluate=lambda split, outputs, labels: domain_metrics(outputs, labels, split.domains))

def domain_metrics(outputs, labels, domains, task="classification"):
    """Accuracy of all images (acc_avg), of the worst domain (acc_wg), per domain; regression: per-domain MSE only."""
    if task != "classification":
        squared_error = (outputs.view(-1) - labels.view(-1).float()) ** 2
        return {"per_domain": {int(d): squared_error[domains == d].mean().item() for d in torch.unique(domains)}}
    correct = (outputs.argmax(-1) == labels).float()
    per_domain = {int(d): correct[domains == d].mean().item() for d in torch.unique(domains)}
    return {"acc_avg": correct.mean().item(), "acc_wg": min(per_domain.values()), "per_domain": per_domain}

def augment(x, gen, min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0):
    """BYOL's views on x's device, (B, C, H, W) -> (B, C, H, W): each image its own crop, rotation, flip, colour."""
    B = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=x.device)
    scale = min_scale + (1 - min_scale) * rand(B)  # random resized crop: zoom into a part of the image
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
        gain = 1 + 0.5 * jitter * (2 * rand(B, x.shape[1], 1, 1) - 1) if x.shape[1] == 3 else 1.0
        x = ((x - mean) * contrast + mean) * brightness * gain
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, device=x.device)
    return x

def normalizer(norm, channels):  # images (B, C, H, W) -> normalised the dataset's way, before the backbone
    import torchvision
    if norm == "per_image":  # each image and channel standardised (RxRx1)
        return nn.InstanceNorm2d(channels)
    return torchvision.transforms.Normalize(*norm) if norm else nn.Identity()  # (mean, std) per channel, or none

def build_backbone(name, in_channels, pretrained=False, width=16):
    """-> (module: images (B, C, H, W) -> pooled features (B, d), d); small_resnet trains on two CPU cores."""
    import torchvision
    block = torchvision.models.resnet.BasicBlock
    if name == "small_resnet":  # three residual stages of width 16, 32, 64

        def halving(c_in, c_out):  # stride 2, with a 1x1 convolution + BN on the shortcut
            return block(c_in, c_out, 2, nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out)))
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             block(width, width), halving(width, 2 * width), halving(2 * width, 4 * width),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * width
    arch = name.removesuffix("_8ch")  # resnet50, densenet121, resnet18 (PovertyMap's, with 8 input bands)
    try:
        net = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as e:  # offline, or a broken download
        sys.exit(f"error: could not load ImageNet weights for {arch} ({type(e).__name__}); put them in the torch hub "
                 f"cache, or pass --no_pretrained to start from random weights")
    last = "classifier" if arch == "densenet121" else "fc"
    dim = getattr(net, last).in_features
    setattr(net, last, nn.Identity())
    if in_channels != 3:  # PovertyMap's 8 bands: the pretrained RGB filters, and their mean for the other bands
        rgb = net.conv1.weight.detach()  # (64, 3, 7, 7)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        with torch.no_grad():
            net.conv1.weight.copy_(torch.cat([rgb, rgb.mean(1, keepdim=True).expand(-1, in_channels - 3, -1, -1)], 1))
    return net, dim

def build_model(args, data, device):  # -> (MABNNet, its BYOL target); channels_last on CUDA (faster convolutions)
    net, feat_dim = build_backbone(args.backbone, data["in_channels"], args.pretrained)
    backbone = nn.Sequential(normalizer(data["norm"], data["in_channels"]), net)
    model = MABNNet(backbone, feat_dim, data["n_outputs"], args.proj_hidden, args.proj_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, make_target(model)

# --- Loops: stage 3's evaluation pass, checkpoints, stages 1 and 2 --------------------------------------------------
def support_sets(split, k, args):
    """{domain: the indices of its k support images}, drawn at random from a generator seeded by the run's seed and the
    domain (the paper's protocol), or its first k in index order (--support first, Meta-DMoE's)."""
    if args.support == "first":
        return {d: idx[:k] for d, idx in split.by_domain.items()}
    gens = {d: torch.Generator().manual_seed(2 * (1000 * args.seed + d)) for d in split.by_domain}
    return {d: [idx[i] for i in torch.randperm(len(idx), generator=gens[d])[:k]] for d, idx in split.by_domain.items()}

def evaluate(model, target, phis, data, split, rows, ks, args, device, log=print):
    """Stage 3: every row adapts each domain from its support set at each k in ks (row@k if several), then one pass
    predicts every image of the domain with every row; TENT's rows go on adapting on each test batch, reset for every
    domain. phis: {start: phi}. -> {row: metrics; for a row that adapts, per domain: phi_shift, ||phi~ - phi|| / ||phi||
    at the domain's end, and changed, the share of its predictions that differ from its start's without adaptation}"""
    model.eval()
    target.eval()
    names = {row_name(row, k, ks): (row, k) for row in rows for k in (sorted(ks) if sees_support(row) else [None])
             if data["task"] == "classification" or ROWS[row][2] not in ("tent", "mabn+tent")}  # (regression: no TENT)
    adapting = {name: UNADAPTED[ROWS[row][0]] for name, (row, k) in names.items()  # {name: the row it compares with}
                if ROWS[row][1:] != ("source", None) and UNADAPTED[ROWS[row][0]] in names}
    supports = {}
    if any(k for _, k in names.values()):  # every domain's support set, read once, on the host
        sets = support_sets(split, max(ks), args)
        loader = make_loader(split.dataset, args, device, batch_sampler=list(sets.values()))
        supports = {d: batch[0] for d, batch in zip(sets, loader)}
        if min(map(len, sets.values())) < max(ks):
            log(f"note: '{split.name}' has domains of fewer than {max(ks)} images: they adapt on all they have")
    domains = list(split.by_domain)
    swap = dict(zip(domains, domains[1:] + domains[:1]))  # Table 3: every domain paired with another (one: itself)
    frozen = split_params(model)[1]
    adapted_phi = {name: {} for name in names}  # {name: {domain: phi~}}; TENT's leaves move on in place

    def domain_rows(d):  # every row's (tensors, TENT's leaves and optimiser or None) for domain d
        moved = {e: to_device(supports[e], device) for e in (d, swap[d])} if supports else {}  # once per domain
        states = {}
        for name, (row, k) in names.items():
            start, _, rule = ROWS[row]
            e = swap[d] if rule == "unmatched" else d
            gen = torch.Generator(device).manual_seed(2 * (1000 * args.seed + e) + 1)  # the domain's own augmentations
            params = row_params(row, model, target, phis, frozen, moved[e][:k] if k else None,
                                functools.partial(augment, gen=gen, **args.aug), args)
            phi = {n: params[n] for n in phis[start]}
            tent = tent_setup(phi, args.tent_lr) if rule in ("tent", "mabn+tent") else None
            states[name] = (params, tent)
            adapted_phi[name][d] = {**phi, **(tent[0] if tent else {})}
        return states
    batches = [idx[a:a + args.eval_batch_size] for idx in split.by_domain.values()
               for a in range(0, len(idx), args.eval_batch_size)]
    outputs = {name: [] for name in names}
    labels = []
    current = None  # the domain being predicted
    for idx, (x, y, *_) in tqdm(zip(batches, make_loader(split.dataset, args, device, batch_sampler=batches)),
                                total=len(batches), desc=f"stage 3 {split.name}", leave=False, disable=None):
        if int(split.domains[idx[0]]) != current:  # a new domain: every row adapts to it (Alg. 1, line 12)
            current = int(split.domains[idx[0]])
            states = domain_rows(current)
        x = to_device(x, device)
        for name, (params, tent) in states.items():  # the outputs stay on the device: no host sync per batch
            outputs[name].append(tent_forward_and_adapt(model, params, *tent, x) if tent else predict(model, params, x))
        labels.append(y)
    inverse = torch.argsort(torch.tensor([i for idx in batches for i in idx]))  # back to the split's index order
    outputs = {name: torch.cat(out).cpu()[inverse] for name, out in outputs.items()}
    results = {name: data["evaluate"](split, outputs[name], torch.cat(labels)[inverse]) for name in names}
    for name, plain in adapting.items():  # what adaptation changed: ||phi~ - phi|| / ||phi||, and the predictions
        seen = [k for k in phis[ROWS[plain][0]] if k.startswith("backbone.")]  # the part of phi predictions use
        start = torch.cat([phis[ROWS[plain][0]][k].flatten() for k in seen])
        results[name]["phi_shift"] = {d: ((torch.cat([phi[k].flatten() for k in seen]) - start).norm() /
                                          start.norm()).item() for d, phi in adapted_phi[name].items()}
        if data["task"] == "classification":
            changed = (outputs[name].argmax(-1) != outputs[plain].argmax(-1)).float()
            results[name]["changed"] = {d: changed[split.domains == d].mean().item() for d in domains}
    return results

STAGE_FLAGS = {1: ("dataset", "seed", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay", "aux_weight",
                   "ema", "max_steps", "img_size", "proj_hidden", "proj_dim", "pretrained", "target_domain"),
               2: ("meta_epochs", "n_support", "n_query", "meta_batch", "inner_lr", "outer_lr", "inner_steps",
                   "first_order", "support")}

def stage_flags(args, stage):  # the flags a stage's checkpoint depends on; stage 2 also on the k it selects with
    flags = {"format": 2, **{k: getattr(args, k) for s in range(1, stage + 1) for k in STAGE_FLAGS[s]}}
    return {**flags, "val_n_adapt": args.n_adapt[0]} if stage == 2 else flags

def save_atomic(obj, path):  # a temporary file renamed over path: a crash leaves the old file or the new, never half
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
    diff = [f"{k}: {ckpt['flags'].get(k)!r} in file vs {v!r} now" for k, v in stage_flags(args, stage).items()
            if ckpt["flags"].get(k) != v]
    if diff:
        sys.exit(f"error: checkpoint {path} was made with other flags ({', '.join(diff)}); use another --out_dir")
    return ckpt

def mean_losses(losses, where, path):
    """{name: mean} of an epoch's losses, read in ONE sync; a non-finite loss stops the run, naming its step."""
    values = torch.stack([torch.stack(list(step.values())) for step in losses]).tolist()  # (steps, losses)
    bad = [i for i, row in enumerate(values) if not all(map(math.isfinite, row))]
    if bad:
        sys.exit(f"error: {where}, step {bad[0] + 1}: non-finite loss {dict(zip(losses[0], values[bad[0]]))}; the "
                 f"last good checkpoint is {path}; lower the learning rate")
    return {k: sum(row[j] for row in values) / len(values) for j, k in enumerate(losses[0])}

def meta_batches(split, args, device, n_steps, gen):
    """Stage 2's data, a meta batch per outer step (Alg. 1): B source domains (tasks), distinct and drawn uniformly,
    each giving an episode of disjoint support and query images (smaller domains all they have; single-image ones
    none), split n_support : n_query. Yields [(support_x, query_x, query_y)] * B, on the device."""
    by_domain = [torch.tensor(idx) for idx in split.by_domain.values() if len(idx) >= 2]
    per_step = min(args.meta_batch, len(by_domain))
    episodes = []  # index lists, B after B
    for _ in range(n_steps):
        for idx in [by_domain[d] for d in torch.randperm(len(by_domain), generator=gen)[:per_step]]:
            episodes.append(idx[torch.randperm(len(idx), generator=gen)][:args.n_support + args.n_query].tolist())
    meta_batch = []
    for x, y, *_ in make_loader(split.dataset, args, device, batch_sampler=episodes):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        n_s = min(max(1, round(len(x) * args.n_support / (args.n_support + args.n_query))), len(x) - 1)
        meta_batch.append((x[:n_s], x[n_s:], y[n_s:]))
        if len(meta_batch) == per_step:
            yield meta_batch
            meta_batch = []

def meta_steps_per_epoch(split, args):  # an epoch of stage 2 sees about every source image once
    return max(1, len(split.domains) // ((args.n_support + args.n_query) * args.meta_batch))

def train(stage, model, target, data, args, device, log, name=None):
    """Stage 1 (Eq. 2): the whole network, all source domains mixed, Adam, the LR halved from --lr_decay_epoch. Stage 2
    (Alg. 1): weights and BN statistics frozen, phi learnt by meta_step on meta batches of one-domain episodes. Keeps
    the epoch best on the validation domains (with its BYOL target); atomic checkpoints (<out_dir>/<name>.pt):
    resumes after the last finished epoch, loads a finished stage. -> dict(steps, time_s, img_per_s, val)"""
    t_start = time.time()
    split = data["splits"]["train"]
    phi, frozen = split_params(model)
    seed = args.seed + 2 * (stage - 1)  # the order of images has a generator of its own, so a resumed run draws the
    gens = [torch.Generator(device).manual_seed(seed), torch.Generator().manual_seed(seed)]  # orders a whole run would
    if stage == 1:  # one loader for every epoch, its workers kept alive
        opt = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
        loader = make_loader(split.dataset, args, device, batch_size=args.batch_size, drop_last=True,
                             sampler=torch.utils.data.RandomSampler(split.dataset, generator=gens[1]))
    else:
        model.requires_grad_(False)  # freeze every weight matrix; only phi (BN gamma, beta) learns, by delta (Eq. 4)
        for p in phi.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(phi.values(), lr=args.outer_lr, fused=device.type == "cuda")
    label = name or f"stage {stage}"
    path = os.path.join(args.out_dir, f"{name or f'stage{stage}'}.pt")
    ckpt = load_checkpoint(path, args, stage) or dict(epoch=-1, steps=0, best_metric=-math.inf, best=None)
    if "model" in ckpt:
        model.load_state_dict(ckpt["model"])
        target.load_state_dict(ckpt["target"])
        if ckpt["done"]:
            log(f"{label}: loaded finished checkpoint {path}")
            return dict(steps=ckpt["steps"], time_s=time.time() - t_start, val=ckpt["best_metric"])
        opt.load_state_dict(ckpt["opt"])
        for gen, state in zip(gens, ckpt["gens"]):
            gen.set_state(state)
        log(f"{label}: resuming after epoch {ckpt['epoch'] + 1} ({path})")
    steps, best_metric, best = ckpt["steps"], ckpt["best_metric"], ckpt["best"]
    start, row = ("stage1", "stage1") if stage == 1 else ("meta", "mabn")  # how the validation domains score it
    selected = set(phi if stage == 2 else model.state_dict())  # what model selection keeps
    n_epochs, total_images, total_s = args.epochs if stage == 1 else args.meta_epochs, 0, 0.0
    augment_fn = functools.partial(augment, gen=gens[0], **args.aug)
    for epoch in range(ckpt["epoch"] + 1, n_epochs):
        where, t0, losses, n_images = f"{label}, epoch {epoch + 1}", time.time(), [], 0
        if stage == 1:
            for group in opt.param_groups:  # the paper halves the LR after a fixed epoch
                group["lr"] = args.lr * (0.5 if epoch >= args.lr_decay_epoch else 1.0)
        else:
            loader = meta_batches(split, args, device, meta_steps_per_epoch(split, args), gens[1])
        model.train(stage == 1)  # stage 2: BN normalises with (and keeps) the source statistics of stage 1
        target.train(stage == 1)
        for batch in tqdm(loader, desc=where, leave=False, disable=None):
            if args.max_steps is not None and steps >= args.max_steps:
                break
            if stage == 1:  # Eq. (2); the losses stay on the device
                x, y = to_device(batch[0], device), batch[1].to(device, non_blocking=True)
                step_losses = joint_step(model, target, opt, x, y, augment_fn, args.aux_weight, args.ema, data["task"])
                losses.append(dict(zip(("main", "aux"), step_losses)))
                n_images += len(x)
            else:  # Eq. (3)-(4) on a meta batch: B episodes of (unlabelled) support and (labelled) query images
                step_losses = meta_step(model, phi, frozen, target, opt, batch, augment_fn, inner_lr=args.inner_lr,
                                        aux_weight=args.aux_weight, inner_steps=args.inner_steps,
                                        first_order=args.first_order, task=data["task"])
                losses.append(dict(zip(("meta", "main", "aux"), step_losses)))
                n_images += sum(len(support_x) + len(query_x) for support_x, query_x, _ in batch)
            steps += 1
        means = mean_losses(losses, where, path) if losses else {}
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's time includes its queued GPU work
        seconds = time.time() - t0
        total_images += n_images
        total_s += seconds
        val = evaluate(model, target, {start: phi}, data, data["splits"]["val"], [row], args.n_adapt[:1], args, device,
                       log)[row][args.val_metric]
        if best is None or val > best_metric:
            best_metric = val
            best = dict(model={k: v.detach().clone() for k, v in model.state_dict().items() if k in selected},
                        target={k: v.detach().clone() for k, v in target.state_dict().items()})
        log(f"{label} epoch {epoch + 1}/{n_epochs}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) +
            f" | {n_images / seconds:.0f} img/s | val {row} {args.val_metric} {val:.4f}")
        if epoch + 1 < n_epochs:  # resumable from here; the last epoch is saved as the finished stage below
            save_atomic(dict(done=False, stage=stage, epoch=epoch, steps=steps, model=model.state_dict(),
                             target=target.state_dict(), opt=opt.state_dict(), gens=[g.get_state() for g in gens],
                             best_metric=best_metric, best=best, flags=stage_flags(args, stage)), path)
    if best is not None:  # the best epoch's network, and its BYOL target with it
        model.load_state_dict(best["model"], strict=False)
        target.load_state_dict(best["target"])
    save_atomic(dict(done=True, stage=stage, steps=steps, model=model.state_dict(), target=target.state_dict(),
                     best_metric=best_metric, flags=stage_flags(args, stage)), path)
    img_per_s = round(total_images / total_s, 1) if total_s else None
    return dict(steps=steps, time_s=time.time() - t_start, img_per_s=img_per_s, val=best_metric)

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the pilot's log grid for alpha (inner LR)
DELTAS = (1e-4, 1e-3, 1e-2)  # and for delta (outer LR); alpha's pilots run at the last

def choose_lrs(model, target, data, args, device, log):
    """alpha and delta, which the paper does not publish, chosen on the validation domains unless the user set them: a
    pilot per candidate, stage 2 cut to --pilot_steps outer steps from the stage-1 phi, scored as stage 2 scores itself
    (row mabn, args.val_metric); alpha on ALPHAS at delta = DELTAS[-1], then delta on DELTAS at that alpha. A pilot is a
    stage-2 checkpoint of its own. -> {inner_lr, outer_lr, candidates}; the model's phi is stage 1's on return."""
    stage1_phi = clone_phi(model)
    n_steps = args.pilot_steps if args.max_steps is None else min(args.pilot_steps, args.max_steps)
    n_epochs = math.ceil(n_steps / meta_steps_per_epoch(data["splits"]["train"], args))
    scores = {}

    def score(inner_lr, outer_lr):  # the validation score of a pilot with these learning rates
        if (inner_lr, outer_lr) not in scores:
            trial = argparse.Namespace(**{**vars(args), "inner_lr": inner_lr, "outer_lr": outer_lr,
                                          "meta_epochs": n_epochs, "max_steps": n_steps})
            name = f"pilot_alpha{inner_lr:g}_delta{outer_lr:g}"
            scores[inner_lr, outer_lr] = train(2, model, target, data, trial, device, log, name)["val"]
            model.load_state_dict(stage1_phi, strict=False)
        return scores[inner_lr, outer_lr]
    inner_lr = args.inner_lr
    if inner_lr is None:  # the first best: on a tie, the smaller step
        inner_lr = max(ALPHAS, key=lambda alpha: score(alpha, args.outer_lr or DELTAS[-1]))
    outer_lr = args.outer_lr or max(DELTAS, key=lambda delta: score(inner_lr, delta))
    log(f"pilot: alpha {inner_lr:g}, delta {outer_lr:g}; scored " + ", ".join(f"({a:g}, {d:g}) {val:.4f}"
                                                                            for (a, d), val in scores.items()))
    candidates = [dict(inner_lr=alpha, outer_lr=delta, score=val) for (alpha, delta), val in scores.items()]
    return dict(inner_lr=inner_lr, outer_lr=outer_lr, candidates=candidates)

# --- Flags with per-dataset defaults, and main ----------------------------------------------------------------------
RGB_AUG = dict(min_scale=0.6, max_rot=0.0, flip=True, jitter=0.4, noise=0.0)
WILDS_KEYS = ("backbone", "img_size", "domain_fields", "n_adapt", "batch_size", "lr", "epochs", "n_support", "n_query",
              "eval_batch_size", "val_metric")
DATASETS = {name: dict(pretrained=True, norm="imagenet", proj_hidden=4096, proj_dim=256, lr_decay_epoch=20,
                       weight_decay=0.0, meta_epochs=10, aug=RGB_AUG, **dict(zip(WILDS_KEYS, row))) for name, row in {
    # METHOD.md's and Meta-DMoE's values, columns as WILDS_KEYS; (*) marks ours where both papers are silent
    "iwildcam": ("resnet50", 448, ["location"], [12], 16, 3e-5, 12, 24, 16, 64, "F1-macro_all"),
    "camelyon17": ("densenet121", 96, ["slide"], [32], 32, 1e-3, 5, 64, 32, 256, "acc_avg"),
    "rxrx1": ("resnet50", 256, ["experiment"], [32], 75, 1e-4, 90, 75, 48, 150, "acc_avg"),
    "fmow": ("densenet121", 224, ["region", "year"], [32], 64, 1e-4, 20, 64, 48, 128, "acc_worst_region"),
    "poverty": ("resnet18_8ch", 224, ["country"], [32], 64, 1e-3, 50, 64, 48, 128, "r_wg"),  # (*)
    "domainnet": ("resnet50", 224, ["domain"], [32], 32, 1e-4, 10, 64, 48, 128, "acc_avg"),  # (*)
}.items()}
DATASETS["camelyon17"].update(weight_decay=1e-2, aug=dict(RGB_AUG, min_scale=0.8, max_rot=180.0))  # (*) any rotation
DATASETS["rxrx1"].update(norm="per_image", weight_decay=1e-5, aug=dict(DATASETS["camelyon17"]["aug"], jitter=0.2))
DATASETS["poverty"].update(norm=None, aug=dict(RGB_AUG, min_scale=0.8, max_rot=180.0, jitter=0.0, noise=0.02))  # (*)
DATASETS["digits"] = dict(  # the offline default: sklearn's handwritten digits drawn by 36 "cameras" (make_digits)
    backbone="small_resnet", img_size=16, norm=((0.5,) * 3, (0.25,) * 3), pretrained=False, val_metric="acc_avg",
    n_adapt=[32], batch_size=64, lr=2e-3, weight_decay=0.0, epochs=10, lr_decay_epoch=7, meta_epochs=6, n_support=32,
    n_query=32, proj_hidden=256, proj_dim=64, eval_batch_size=50, aug=dict(min_scale=0.7, max_rot=15.0, flip=False,
                                                                          jitter=0.4, noise=0.05))
SHARED = dict(aux_weight=0.1, ema=0.99, inner_steps=1, meta_batch=1, pilot_steps=100, tent_lr=1e-3)
TUNED = ("epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay", "aux_weight", "ema", "proj_hidden", "proj_dim",
         "meta_epochs", "n_support", "n_query", "meta_batch", "inner_steps", "pilot_steps", "eval_batch_size",
         "img_size", "tent_lr")
MAY_BE_ZERO = ("epochs", "meta_epochs", "lr_decay_epoch", "weight_decay", "aux_weight", "ema", "num_workers",
               "inner_lr")

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: what is wrong and where to look
        self.exit(2, f"error: {message} (see python mabn.py --help)\n")

def parse_args(argv=None):
    p = OneLineParser(description="MABN: test-time domain adaptation through the BN affine parameters.")
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--root_dir", default="data", help="where WILDS datasets live (ROOT/<name>_v<version>/)")
    p.add_argument("--download", action="store_true", help="let wilds download the dataset into --root_dir")
    p.add_argument("--no_pretrained", dest="pretrained", action="store_false", default=None, help="random backbone")
    p.add_argument("--target_domain", default="real", choices=DOMAINNET_DOMAINS, help="DomainNet's held-out domain")
    p.add_argument("--out_dir", help="checkpoints, log.txt and results.json (default runs/<dataset>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run everything for each; table: mean ± std")
    p.add_argument("--methods", nargs="+", default=["stage1", "none", "mabn"], choices=[*ROWS, "all"],
                   help="the rows of stage 3 (ROWS in mabn.py; all: every one), all on the same support sets")
    p.add_argument("--n_adapt", type=int, nargs="+", help="k, the unlabelled images of a target domain it adapts on; "
                   "several values evaluate every adapting row at each (model selection adapts with the first)")
    p.add_argument("--inner_lr", type=float, help="alpha, Eq. (3)'s step (also stage 3's); default: the pilot's pick")
    p.add_argument("--outer_lr", type=float, help="delta, Eq. (4)'s Adam LR; default: the pilot's pick")
    p.add_argument("--support", default="random", choices=["random", "first"],
                   help="a target domain's k support images: drawn at random per seed, or its first k (Meta-DMoE)")
    p.add_argument("--first_order", action="store_true", help="drop the second-order term of Eq. (4)'s gradient")
    p.add_argument("--num_workers", type=int, help="DataLoader workers (default: 0 for digits, else cores - 1, <= 16)")
    p.add_argument("--max_steps", type=int, help="cap on the steps of each training stage (smoke runs)")
    group = p.add_argument_group("the dataset's values (DATASETS in mabn.py) unless set; the README's Flags say more")
    for name in TUNED:
        group.add_argument(f"--{name}", type=type({**SHARED, **DATASETS["digits"]}[name]))
    args = p.parse_args(argv)
    for key, value in {**SHARED, **DATASETS[args.dataset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    checked = {**{k: getattr(args, k) for k in TUNED}, "n_adapt": min(args.n_adapt), "num_workers": args.num_workers,
               "inner_lr": args.inner_lr, "outer_lr": args.outer_lr}
    for name, value in checked.items():
        if value is not None and (value < 0 or (value == 0 and name not in MAY_BE_ZERO)):
            p.error(f"--{name} must be {'>= 0' if name in MAY_BE_ZERO else '> 0'}, got {value}")
    if args.ema >= 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA_VISIBLE_DEVICES= keeps a run on the CPU
    if args.num_workers is None:  # decoding WILDS images needs workers; the in-memory digits do not
        args.num_workers = 0 if args.dataset == "digits" else max(1, min(16, len(os.sched_getaffinity(0)) - 1))
    chosen = set(ROWS) if "all" in args.methods else set(args.methods)
    chosen |= {UNADAPTED[ROWS[row][0]] for row in chosen}  # each start's row without adaptation, for "changed"
    args.methods = [row for row in ROWS if row in chosen]  # in ROWS' order
    args.out_dir = args.out_dir or os.path.join("runs", args.dataset)
    args.seed = args.seeds[0]
    return args

def clone_phi(model):  # a detached copy of the model's phi
    return {k: v.detach().clone() for k, v in split_params(model)[0].items()}

def run_seed(args, data, device, log):
    """The whole pipeline for args.seed, in args.out_dir (args: this seed's own copy, which gets the pilot's alpha and
    delta). -> its results (also written to results.json)."""
    torch.manual_seed(args.seed)
    model, target = build_model(args, data, device)
    stages = {"stage1": train(1, model, target, data, args, device, log)}
    phis = {"stage1": clone_phi(model)}
    t0 = time.time()
    pilot = choose_lrs(model, target, data, args, device, log)
    stages["pilot"] = dict(time_s=time.time() - t0)
    vars(args).update(inner_lr=pilot["inner_lr"], outer_lr=pilot["outer_lr"])
    if "no_inner" in args.methods:  # the control: stage 2 with alpha = 0 (phi fine-tuned on the joint loss alone);
        # first order: with alpha = 0 the same gradient as second order, without building the second-order graph
        control = argparse.Namespace(**{**vars(args), "inner_lr": 0.0, "first_order": True})
        stages["stage2_alpha0"] = train(2, model, target, data, control, device, log, name="stage2_alpha0")
        phis["meta0"] = clone_phi(model)
        model.load_state_dict(phis["stage1"], strict=False)  # stage 2 proper starts from stage 1's phi too
    stages["stage2"] = train(2, model, target, data, args, device, log)
    phis["meta"] = split_params(model)[0]
    t0 = time.time()
    test = data["splits"]["test"]  # stage 3: each target domain adapted to by every row from its support set
    results = {"target": evaluate(model, target, phis, data, test, args.methods, args.n_adapt, args, device, log)}
    seconds = time.time() - t0
    stages["stage3"] = dict(time_s=seconds, img_per_s=round(len(test.domains) / seconds, 1))
    log(f"seed {args.seed}: " + ", ".join(f"{name} {s['time_s']:.1f} s" + (f" ({s['img_per_s']:.0f} img/s)" if
                                          s.get("img_per_s") else "") for name, s in stages.items()))
    log("adaptation, mean over target domains (||phi~ - phi|| / ||phi||, predictions changed): " + ", ".join(
        f"{name} {mean(r['phi_shift'].values()):.2%} {mean(r.get('changed', {0: math.nan}).values()):.1%}"
        for name, r in results["target"].items() if "phi_shift" in r))
    out = dict(flags=vars(args), seed=args.seed, device=str(device), stages=stages, pilot=pilot, **results)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    return out

GRID = {"TENT": ("tent_bn", "tent_affine"), "MABN": ("mabn_bn", "mabn"),  # Table 4: rule x (update BN, affine)
        "MABN+TENT": ("mabn_tent_bn", "mabn_tent_affine")}

def summarize(per_seed, ks, log):
    """Print and return {row: {metric: (mean, std over seeds)}} on the target split, with each row's start and stats;
    then, when all its rows ran, Table 4's grid: adaptation rule x what BN updates, at each k."""
    metrics = [k for k, v in next(iter(per_seed[0]["target"].values())).items() if not isinstance(v, dict)]
    many, width = len(per_seed) > 1, max(map(len, metrics)) + (10 if len(per_seed) > 1 else 2)
    log(f"\n{'row':<24}{'from':>7}{'stats':>8}" + "".join(f"{m:>{width}}" for m in metrics) + f"   (target domains, "
        f"split 'test', {len(per_seed)} seed{'s: mean ± std' if many else ''})")
    summary = {}
    for name in per_seed[0]["target"]:
        values = {k: torch.tensor([r["target"][name][k] for r in per_seed]) for k in metrics}
        summary[name] = {k: (v.mean().item(), v.std().item() if many else 0.0) for k, v in values.items()}
        cells = [f"{mean:.4f} ± {std:.3f}" if many else f"{mean:.4f}" for mean, std in summary[name].values()]
        start, stats, _ = ROWS[name.split("@")[0]]
        log(f"{name:<24}{start:>7}{stats:>8}" + "".join(f"{c:>{width}}" for c in cells))
    for k in sorted(ks):
        cells = [[summary.get(row_name(row, k, ks)) for row in pair] for pair in GRID.values()]
        if all(all(pair) for pair in cells):
            log(f"\nTable 4 at k={k}, {metrics[0]}: {'update BN':>15}{'update affine':>18}")
            for label, pair in zip(GRID, cells):
                log(f"{label:<27}" + "".join(f"{cell[metrics[0]][0]:>{w}.4f}" for cell, w in zip(pair, (15, 18))))
    return summary

def main(args, data=None):
    """Run every seed of args.seeds (each in <out_dir>/seed<k>/, reusing finished stages) and print one table, row x
    metric, mean ± std over seeds. `data` (as load_data returns it) replaces --dataset's data."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed training shapes: let cuDNN pick its fastest
    t0 = time.time()
    data = load_data(args) if data is None else data  # missing data stops here, before anything is written
    data_s = time.time() - t0
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log_file = open(os.path.join(args.out_dir, "log.txt"), "a")
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir {args.out_dir} ({e.strerror}); pick a writable folder")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()
    log("flags: " + json.dumps(vars(args), sort_keys=True))
    log(f"data ({data_s:.1f} s): " + ", ".join(f"{name} {len(split.domains)} images in {len(split.by_domain)}"
                                                        f" domains" for name, split in data["splits"].items()))
    per_seed = []
    for seed in args.seeds:
        seed_args = copy.copy(args)
        seed_args.seed, seed_args.out_dir = seed, os.path.join(args.out_dir, f"seed{seed}")
        os.makedirs(seed_args.out_dir, exist_ok=True)
        per_seed.append(run_seed(seed_args, data, device, log))
    out = dict(flags=vars(args), seeds=args.seeds, summary=summarize(per_seed, args.n_adapt, log), per_seed=per_seed)
    save_atomic(out, os.path.join(args.out_dir, "results.json"))
    log_file.close()
    return out

if __name__ == "__main__":
    main(parse_args())
