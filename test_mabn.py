"""Fast CPU checks of mabn.py on tiny synthetic domains: python -m pytest -q test_mabn.py"""
import argparse
import copy
import functools
import inspect
import json
import logging
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import mabn

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test on one CPU thread: with other work on the machine, torch's default threads made
    the suite up to 10x slower, and one thread gives every test one summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, width=4, n_outputs=3, model_cls=mabn.MABNNet, make_target=mabn.make_target):
    torch.manual_seed(seed)
    net = mabn.build_backbone("small_resnet", 3, width=width)[0]
    model = model_cls(nn.Sequential(mabn.normalizer(NORM), net), 4 * width, n_outputs, 16, 8)
    return model, make_target(model)


def trained_bn(model, target, n_batches=3):
    """BN running statistics and affine parameters with non-trivial values, as after stage 1."""
    model.train()
    target.train()
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.rand(8, 3, 8, 8)
            model(x, aux=True)
            target(x)
        for p in mabn.split_params(model)[0].values():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), target.eval()


def fixed_aug(x):
    return x, x  # identity views: the BYOL loss stays non-trivial (predictor vs target projector)


def jitter_aug(seed=0):
    return functools.partial(mabn.byol_views, gen=torch.Generator().manual_seed(seed), min_crop=0.5)


def make_synthetic(n_source=4, n_val=2, n_test=3, per_domain=24, size=8, n_classes=3, seed=0,
                   gain=0.5):
    """Tiny multi-domain data: a noisy dark field with a square; the class is the square's
    brightness. Each domain multiplies its images by its own gain exp(U(-gain, gain)): a shift
    the first BN undoes exactly, and one no single model can ignore (a bright level in a dim
    domain looks like a dimmer level in a bright one)."""
    gen = torch.Generator().manual_seed(seed)
    splits = {s: ([], [], []) for s in ("train", "id_test", "val", "test")}
    for d in range(n_source + n_val + n_test):
        y = torch.randint(0, n_classes, (per_domain,), generator=gen)
        x = 0.05 * torch.randn(per_domain, 3, size, size, generator=gen)
        for i, c in enumerate(y.tolist()):
            r, col = torch.randint(0, size - 3, (2,), generator=gen).tolist()
            x[i, :, r:r + 4, col:col + 4] += 0.3 * (c + 1)
        x = x * float(torch.exp(gain * (2 * torch.rand(1, generator=gen) - 1)))
        dom = torch.full((per_domain,), d)
        cut = per_domain * 3 // 4
        parts = ({"train": slice(0, cut), "id_test": slice(cut, None)} if d < n_source
                 else {("val" if d < n_source + n_val else "test"): slice(None)})
        for s, sl in parts.items():
            for lst, t in zip(splits[s], (x[sl], y[sl], dom[sl])):
                lst.append(t)
    out = {s: mabn.Split(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)),
                         torch.cat(ds), s) for s, (xs, ys, ds) in splits.items()}
    return dict(splits=out, n_outputs=n_classes,
                evaluate=lambda split, p, t: mabn.domain_metrics(p, t, split.domains))


def tiny_args(tmp_path, *extra):
    return mabn.parse_args(["--out_dir", str(tmp_path / "run"), "--epochs", "2", "--meta_epochs",
                            "2", "--batch_size", "16", "--n_support", "8", "--n_query", "8",
                            "--n_adapt", "8", "--inner_lr", "0.2", "--outer_lr", "0.01", *extra])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def flat_grad(loss, phi):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(phi.values()))])


def spy(monkeypatch, name, fake=None):
    """Record every call of mabn.<name>: -> the list of calls, each {parameter: value} (defaults
    filled in, **kw spread) with its "result". fake(call, run) computes the result instead (run():
    the real function on the same arguments)."""
    real = getattr(mabn, name)
    signature = inspect.signature(real)
    calls = []

    @functools.wraps(real)  # a spy of a spy sees the real signature
    def recorder(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = {}
        for key, value in bound.arguments.items():
            spread = signature.parameters[key].kind == inspect.Parameter.VAR_KEYWORD
            call.update(value if spread else {key: value})
        calls.append(call)
        call["result"] = (fake(call, lambda: real(*args, **kwargs)) if fake
                          else real(*args, **kwargs))
        return call["result"]

    monkeypatch.setattr(mabn, name, recorder)
    return calls


# ------------------------------------------------------------------------------------------------
# The method block: copyable on its own, and the same computation as the pipeline's
# ------------------------------------------------------------------------------------------------
def method_block():
    """The text between BEGIN METHOD and END METHOD, run in a fresh namespace holding only what it
    imports."""
    lines = open(mabn.__file__).read().splitlines()
    marks = [i for i, line in enumerate(lines)
             if line.startswith("#") and ("BEGIN METHOD" in line or "END METHOD" in line)]
    assert len(marks) == 2, marks
    block = "\n".join(lines[marks[0] + 1:marks[1]])
    roots = {line.split()[1].split(".")[0] for line in block.splitlines()
             if line.startswith(("import ", "from "))}
    assert roots <= {"torch"} | set(sys.stdlib_module_names), roots  # torch, the standard library
    assert len(block.splitlines()) <= 250
    namespace = {"__name__": "copied_method"}
    exec(compile(block, "method_block", "exec"), namespace)
    return namespace


def test_method_block_alone_steps_adapts_and_matches_the_pipeline(tmp_path, monkeypatch):
    m = method_block()
    assert "augment" not in m and "mabn" not in m  # none of the harness came along
    model, target = tiny_model(model_cls=m["MABNNet"], make_target=m["make_target"])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    before, target_before = snapshot(model), snapshot(target)  # Eq. (2): all moves, target by EMA
    m["joint_step"](model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y, jitter_aug(),
                    0.1, 0.9)
    moved = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert {"backbone.1.0.weight", "head.weight", "projector.0.weight"} <= moved
    assert any(not torch.equal(v, target_before[k]) for k, v in snapshot(target).items())
    model.eval()  # Eq. (3)-(4): one meta step with Adam moves only phi
    target.eval()
    phi, frozen = m["split_params"](model)
    model.requires_grad_(False)
    for p in phi.values():
        p.requires_grad_(True)
    before = snapshot(model)
    m["meta_step"](model, phi, frozen, target, torch.optim.Adam(phi.values(), lr=0.01),
                   [(x[:4], x[4:], y[4:])], fixed_aug, inner_lr=0.5)
    moved = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert moved and moved <= set(phi)
    before = snapshot(model)  # Alg. 1 line 12: adapt one domain, predict it; the module unchanged
    adapted = m["adapt_domain"](model, phi, frozen, target, x[:4], jitter_aug(), 0.5)
    outputs = m["predict"](model, {**frozen, **adapted}, x)
    assert outputs.shape == (8, 3)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert not torch.allclose(outputs, m["predict"](model, {**frozen, **phi}, x))

    def recording(call, run):  # the pipeline's stage-2 step, its start and its augmentation draws
        call["start"] = {k: v.detach().clone() for k, v in call["phi"].items()}
        call["gen_state"] = call["augment_fn"].keywords["gen"].get_state()
        out = run()
        call["grads"] = {k: v.grad.clone() for k, v in call["phi"].items()}
        return out

    steps = spy(monkeypatch, "meta_step", recording)
    args = tiny_args(tmp_path, "--max_steps", "1", "--inner_lr", "0.5", "--meta_batch", "2")
    mabn.main(args, make_synthetic())
    call = steps[0]  # recomputed with the copied block alone
    phi = {k: v.clone().requires_grad_(True) for k, v in call["start"].items()}
    aug_kw = {k: v for k, v in call["augment_fn"].keywords.items() if k != "gen"}
    gen = torch.Generator().set_state(call["gen_state"])
    copied_aug = functools.partial(mabn.byol_views, gen=gen, **aug_kw)
    kw = {k: call[k] for k in ("inner_lr", "aux_weight", "inner_steps", "first_order", "task")}
    loss = sum(m["meta_loss"](call["model"], phi, call["frozen"], call["target"], *episode,
                              copied_aug, **kw)[0] for episode in call["episodes"])
    assert kw["inner_lr"] == 0.5 and not kw["first_order"] and len(call["episodes"]) == 2  # L_B
    assert all(len(s) == 8 and len(q) == 8 for s, q, _ in call["episodes"])
    expected = torch.cat([call["grads"][k].flatten() for k in phi])
    assert torch.allclose(flat_grad(loss, phi), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The method against the paper's equations written out by hand (plain torch)
# ------------------------------------------------------------------------------------------------
def scripted(*views):
    """An augment_fn that returns the given views in pairs, in order."""
    queue = list(views)
    return lambda x: (queue.pop(0), queue.pop(0))


def by_hand(model, target, params, x, y, v1, v2):
    """L_main on the clean images; BYOL: view 1's prediction against view 2's target and back."""
    def online(v):  # predictor(projector(backbone(v)))
        return functional_call(model, params, (v,), {"aux": True})[1]

    with torch.no_grad():
        z1, z2 = target(v1), target(v2)
    cos = torch.nn.functional.cosine_similarity
    aux = ((2 - 2 * cos(online(v1), z2, dim=-1)) + (2 - 2 * cos(online(v2), z1, dim=-1))).mean()
    logits = functional_call(model, params, (x,))
    main = torch.nn.functional.cross_entropy(logits, y) if y is not None else None
    return main, aux


def episode(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y, x.flip(-1), 0.5 * x + 0.2 * torch.rand(x.shape, generator=gen)


def sgd_step_matches(model, target, x, y, v1, v2, weight, losses_of, **kw):
    """joint_step with SGD moves every parameter by -0.1 (grad L_main + weight grad L_aux)."""
    params = dict(model.named_parameters())
    main, aux = losses_of(model, target, {}, x, y, v1, v2)
    loss = main + weight * aux
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    before = {k: v.detach().clone() for k, v in params.items()}
    mabn.joint_step(model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
                    scripted(v1, v2), **kw)
    for (k, p), g in zip(params.items(), grads):
        expected = before[k] - 0.1 * (g if g is not None else 0)
        assert torch.allclose(p.detach(), expected, atol=1e-6), k


def test_eq2_losses_and_step_by_hand():
    model, target = trained_bn(*tiny_model())
    x, y, v1, v2 = episode()
    main, aux = mabn.joint_losses(model, None, target, x, y, scripted(v1, v2))
    hand_main, hand_aux = by_hand(model, target, {}, x, y, v1, v2)
    assert torch.allclose(main, hand_main, atol=1e-6) and torch.allclose(aux, hand_aux, atol=1e-6)
    sgd_step_matches(model, target, x, y, v1, v2, 0.3, by_hand, aux_weight=0.3)
    model, target = trained_bn(*tiny_model())  # the paper's defaults: lambda = 0.1, tau = 0.99
    target_before = snapshot(target)
    sgd_step_matches(model, target, x, y, v1, v2, 0.1, by_hand)
    online = dict(model.backbone.named_parameters(prefix="0"))
    online.update(model.projector.named_parameters(prefix="1"))
    for name, q in target.named_parameters():
        expected = 0.99 * target_before[name] + 0.01 * online[name].detach()
        assert torch.allclose(q, expected, atol=1e-6), name


def test_stage1_source_statistics_come_from_the_clean_images_alone():
    """Stage 1's BN running statistics, the source statistics stages 2-3 keep, come from the clean
    images; the views are normalised with their own batch statistics and leave them alone."""
    model, target = tiny_model()
    model.train()
    target.train()
    x, y, v1, v2 = episode(n=8)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)  # the clean images alone, in training mode
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mabn.joint_step(model, target, opt, x, y, scripted(v1, v2))
    for name, buffer in model.backbone.named_buffers():
        assert torch.equal(buffer, dict(reference.backbone.named_buffers())[name]), name
    moved = model.projector[1].running_mean  # the BYOL branch, which only sees views, did
    assert not torch.equal(moved, torch.zeros_like(moved))


def test_eq3_inner_step_and_domain_adaptation_by_hand():
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    s, _, v1, v2 = episode(1)
    aux = by_hand(model, target, {**frozen, **phi}, s, None, v1, v2)[1]
    grads = torch.autograd.grad(aux, list(phi.values()))
    expected = {k: v - 0.7 * g for (k, v), g in zip(phi.items(), grads)}  # phi - alpha grad L_aux
    adapted = mabn.inner_step(model, phi, frozen, target, s, scripted(v1, v2), inner_lr=0.7)
    assert all(torch.allclose(adapted[k], expected[k], atol=1e-6) for k in phi)
    adapted = mabn.adapt_domain(model, phi, frozen, target, s, scripted(v1, v2), inner_lr=0.7)
    assert all(torch.allclose(adapted[k], expected[k], atol=1e-6) for k in phi)
    with torch.no_grad():  # Alg. 1 line 12: the main head with phi~ and the source statistics
        detached = {k: v.detach() for k, v in expected.items()}
        hand = functional_call(model, {**frozen, **detached}, (s,))
    assert torch.allclose(mabn.predict(model, {**frozen, **adapted}, s), hand, atol=1e-6)


def test_eq4_objective_gradient_and_meta_step_by_hand():
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    s, _, sv1, sv2 = episode(1)
    q, qy, qv1, qv2 = episode(2)

    def objective(phi, steps=1, first_order=False, aux_weight=0.3):  # L(Q; phi~), phi~ by Eq. (3)
        adapted = dict(phi)
        for _ in range(steps):  # first order: the inner gradient a constant
            aux_s = by_hand(model, target, {**frozen, **adapted}, s, None, sv1, sv2)[1]
            grads = torch.autograd.grad(aux_s, list(adapted.values()), create_graph=not first_order)
            adapted = {k: v - 0.7 * g for (k, v), g in zip(adapted.items(), grads)}
        main_q, aux_q = by_hand(model, target, {**frozen, **adapted}, q, qy, qv1, qv2)
        return main_q + aux_weight * aux_q

    for steps, first_order in ((1, False), (2, False), (1, True)):
        views = scripted(*[sv1, sv2] * steps, qv1, qv2)
        loss = mabn.meta_loss(model, phi, frozen, target, s, q, qy, views, inner_lr=0.7,
                              aux_weight=0.3, inner_steps=steps, first_order=first_order)[0]
        assert torch.allclose(loss, objective(phi, steps, first_order), atol=1e-6)
        hand = flat_grad(objective(phi, steps, first_order), phi)
        assert torch.allclose(flat_grad(loss, phi), hand, atol=1e-6)
    views = scripted(sv1, sv2, qv1, qv2)
    default = mabn.meta_loss(model, phi, frozen, target, s, q, qy, views, inner_lr=0.7)[0]
    assert torch.allclose(default, objective(phi, aux_weight=0.1), atol=1e-6)  # lambda = 0.1
    hand_grad = flat_grad(objective(phi), phi)
    start = {k: v.detach().clone() for k, v in phi.items()}
    mabn.meta_step(model, phi, frozen, target, torch.optim.SGD(phi.values(), lr=0.05), [(s, q, qy)],
                   scripted(sv1, sv2, qv1, qv2), inner_lr=0.7, aux_weight=0.3)
    moved = torch.cat([(phi[k].detach() - start[k]).flatten() for k in phi])
    assert torch.allclose(moved, -0.05 * hand_grad, atol=1e-6)  # Eq. (4): second order by default


def test_meta_gradient_matches_finite_differences():
    model, target = trained_bn(*tiny_model(width=2))
    model.double()
    target.double()
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    gen = torch.Generator().manual_seed(1)
    support_x, query_x = (torch.rand(6, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in "sq")
    query_y = torch.randint(0, 3, (6,), generator=gen)

    def loss_at(p, first_order=False):
        return mabn.meta_loss(model, p, frozen, target, support_x, query_x, query_y, fixed_aug,
                              inner_lr=0.5, inner_steps=2, first_order=first_order)[0]

    flat, flat_fo = flat_grad(loss_at(phi), phi), flat_grad(loss_at(phi, True), phi)
    coords = [(k, i) for k, v in phi.items() for i in range(v.numel())]
    coords = [coords[j] for j in torch.randperm(len(coords), generator=gen)[:40]]  # 40 of them
    numeric, eps = [], 1e-6
    for k, i in coords:
        delta = torch.zeros(phi[k].numel(), dtype=torch.float64)
        delta[i] = eps
        moved = [{**phi, k: (phi[k].detach().flatten() + sign * delta).view_as(phi[k])}
                 for sign in (1, -1)]
        moved = [{n: t.detach().requires_grad_(True) for n, t in m.items()} for m in moved]
        numeric.append((loss_at(moved[0]) - loss_at(moved[1])).detach() / (2 * eps))
    sizes = torch.tensor([0] + [v.numel() for v in phi.values()])
    offsets = dict(zip(phi, sizes.cumsum(0).tolist()))
    picked = torch.tensor([offsets[k] + i for k, i in coords])
    assert torch.allclose(flat[picked], torch.stack(numeric), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(flat_fo[picked], torch.stack(numeric), rtol=1e-2, atol=1e-5)


def test_regression_main_loss_by_hand():
    """PovertyMap is a regression: L_main is the mean squared error wherever it is computed."""
    model, target = trained_bn(*tiny_model(n_outputs=1))
    x, labels, v1, v2 = episode()
    y = torch.rand(6)
    with torch.no_grad():
        hand = ((model(x).view(-1) - y) ** 2).mean()
        logits = torch.randn(6, 3)
        cross_entropy = -logits.log_softmax(-1)[torch.arange(6), labels].mean()
    assert torch.allclose(mabn.main_loss(model(x), y, "regression"), hand, atol=1e-6)
    assert torch.allclose(mabn.main_loss(logits, labels), cross_entropy, atol=1e-6)  # the default
    main = mabn.joint_losses(model, None, target, x, y, scripted(v1, v2), "regression")[0]
    assert torch.allclose(main, hand, atol=1e-6)
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    query_main = mabn.meta_loss(model, phi, frozen, target, x, x, y, scripted(v1, v2, v1, v2),
                                inner_lr=1e-9, task="regression")[1]  # phi~ = phi: MSE at phi
    assert torch.allclose(query_main, hand, atol=1e-5)

    def mse_by_hand(model, target, params, x, y, v1, v2):
        return ((functional_call(model, params, (x,)).view(-1) - y) ** 2).mean(), torch.zeros(())
    sgd_step_matches(model, target, x, y, v1, v2, 0.0, mse_by_hand, aux_weight=0.0, tau=0.9,
                     task="regression")


def test_byol_loss_target_and_ema():
    p = torch.randn(4, 8)
    assert torch.allclose(mabn.byol_loss(p, 3 * p), torch.zeros(4), atol=1e-6)
    assert torch.allclose(mabn.byol_loss(p, -p), torch.full((4,), 4.0), atol=1e-6)
    model, target = tiny_model()
    _, aux = mabn.joint_losses(model, None, target, torch.rand(6, 3, 8, 8), None, jitter_aug())
    aux.backward()
    assert all(q.grad is None for q in target.parameters())
    assert any(q.grad is not None for q in model.backbone.parameters())
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn_like(q))
    old = snapshot(target)
    online = dict(model.backbone.named_parameters(prefix="0"))
    online.update(model.projector.named_parameters(prefix="1"))
    mabn.ema_update(target, model, tau=0.9)
    for name, q in target.named_parameters():
        assert torch.allclose(q - old[name], 0.1 * (online[name] - old[name]), atol=1e-6)


def test_model_pieces_are_the_papers():
    """BYOL's MLPs: Linear -> BN -> ReLU -> Linear, 4096 -> 256 wide by default; the target is
    gradient-free; phi is the weight and the bias of every BatchNorm, and nothing else."""
    assert [type(m) for m in mabn.mlp(4, 8, 2)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    model = mabn.MABNNet(backbone, 4, 3)
    widths = (model.projector[0].out_features, model.projector[3].out_features,
              model.predictor[3].out_features)
    assert widths == (4096, 256, 256)
    assert not any(p.requires_grad for p in mabn.make_target(model).parameters())
    model, _ = tiny_model()
    phi, frozen = mabn.split_params(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert set(phi) == {f"{n}.{p}" for n in bns for p in ("weight", "bias")} and len(bns) == 11
    assert set(frozen) == set(model.state_dict()) - set(phi)
    calls = []  # the inner step runs the online network on the two views only: 2k images
    model.backbone.register_forward_hook(lambda mod, inputs, out: calls.append(len(inputs[0])))
    mabn.inner_step(model.eval(), phi, frozen, tiny_model()[1].eval(), torch.rand(5, 3, 8, 8),
                    fixed_aug, 0.1)
    assert calls == [10]


def test_functional_call_matches_module():
    model, _ = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        logits, pred = model(x, aux=True)
        f_logits, f_pred = functional_call(model, {**frozen, **phi}, (x,), {"aux": True})
    assert torch.equal(logits, f_logits) and torch.equal(pred, f_pred)
    shifted = {k: v + 1.0 for k, v in phi.items()}  # and the tensors passed in are the ones used
    assert not torch.allclose(mabn.predict(model, {**frozen, **shifted}, x), logits)


def test_byol_views_are_byols_two_distributions_drawn_per_image():
    """BYOL's views (Grill et al. 2020): crops of 8-100 % of the area, colour jitter p 0.8
    (torchvision's hue), grey p 0.2, blur p 1 / 0.1 and solarisation p 0 / 0.2 in the two views,
    every image its own draw."""
    from torchvision.transforms.functional import adjust_hue
    x = torch.rand(3, 3, 5, 5)
    for shift in (-0.1, 0.03, 0.1):
        expected = torch.stack([adjust_hue(image, shift) for image in x])
        assert torch.allclose(mabn.hue_shift(x, torch.full((3, 1, 1), shift)), expected, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32).expand(2000, 1, 32, 32)  # crops and flips: the ramp's span
    for min_crop, least, average in ((0.08, 0.245, 0.68), (0.5, 0.61, 0.86)):  # torchvision: 0.68
        crops = mabn.augment(ramp, gen, min_crop, None, 0.0, blur_p=0.0, solarize_p=0.0)[:, 0, 0]
        width = (crops[:, -1] - crops[:, 0]).abs() * 32 / 31  # least: sqrt(3/4 min_crop)
        assert least < width.min() < least + 0.05 and width.max() > 0.99
        assert abs(width.mean() - average) < 0.02
        assert 0.45 < (crops[:, -1] < crops[:, 0]).float().mean() < 0.55  # mirrored
    colours = torch.tensor([[0.8, 0.75, 0.7], [0.7, 0.8, 0.75]]).repeat(1000, 1).view(2000, 3, 1, 1)
    v1, v2 = mabn.byol_views(colours.expand(-1, -1, 8, 8).contiguous(), gen)
    for v, solarised in ((v1, 0.0), (v2, 0.2)):
        grey = (v.amax(1) - v.amin(1)).amax((1, 2)) < 1e-6
        assert abs(grey.float().mean() - 0.2) < 0.04
        dark = v.mean((1, 2, 3)) < 0.5  # solarised images turn dark; jitter rarely does
        assert abs(dark.float().mean() - solarised - 0.05) < 0.05
    sharp = torch.zeros(200, 1, 224, 224)
    sharp[..., 112] = 1.0  # a line at 224 px, whole-image crops: blur (sigma > 0.25 px) spreads it
    blurred = [mabn.augment(sharp, gen, 1.0, None, 0.0, p, 0.0)[:, 0, 9].amax(-1) < 0.999
               for p in (1.0, 0.1)]
    assert blurred[0].float().mean() > 0.85 and abs(blurred[1].float().mean() - 0.092) < 0.05
    assert not torch.equal(v1[0], v1[2]) and not torch.equal(v1[0], v2[0])  # own draws


# ------------------------------------------------------------------------------------------------
# Stages 1 and 2: the schedule, validation, model selection, resume, checkpoints
# ------------------------------------------------------------------------------------------------
def test_stage1_learning_rate_halves_from_lr_decay_epoch(tmp_path, monkeypatch):
    lrs = []

    def note_lr(call, run):
        lrs.append(call["opt"].param_groups[0]["lr"])
        return run()

    spy(monkeypatch, "joint_step", note_lr)
    args = tiny_args(tmp_path, "--epochs", "3", "--lr_decay_epoch", "1", "--lr", "0.004",
                     "--meta_epochs", "0")
    mabn.main(args, make_synthetic())
    per_epoch = len(lrs) // 3
    assert len(lrs) == 3 * per_epoch and set(lrs[:per_epoch]) == {0.004}
    assert set(lrs[per_epoch:]) == {0.002}


def test_validation_leaves_the_source_statistics_alone(tmp_path):
    """Validating in the middle of stage 1, with the model in training mode, must not move its BN
    statistics: the validation images would leak into the source statistics."""
    data = make_synthetic()
    model, target = trained_bn(*tiny_model())
    model.train()
    target.train()
    before, target_before = snapshot(model), snapshot(target)
    for rows in (["stage1"], ["stage2", "mabn"]):
        mabn.evaluate(model, target, {"stage1": mabn.split_params(model)[0],
                                      "stage2": mabn.split_params(model)[0]},
                      data, data["splits"]["val"], rows, [8], tiny_args(tmp_path))
        assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items()), rows
        assert all(torch.equal(v, target_before[k]) for k, v in snapshot(target).items()), rows


def scripted_validation(monkeypatch, scores, states, first_epoch=None, targets=None):
    """Stage s's epoch e scores scores[s][e] on validation; the model's state then goes to
    states[s] (the BYOL target's to targets[s])."""
    epoch = dict(first_epoch or {1: 0, 2: 0})

    def fake(call, run):
        if call["split"].name != "val":
            return run()
        stage = 1 if "stage1" in call["phis"] else 2
        states[stage].append(snapshot(call["model"]))
        if targets is not None:
            targets[stage].append(snapshot(call["target"]))
        epoch[stage] += 1
        return {call["rows"][0]: {"acc_avg": scores[stage][epoch[stage] - 1]}}

    return spy(monkeypatch, "evaluate", fake)


def final_checkpoints(out_dir, key="model", stages=(1, 2)):  # the stages' selected epochs
    paths = [os.path.join(out_dir, "seed0", f"stage{s}.pt") for s in stages]
    return [torch.load(path, weights_only=True)["best"][key] for path in paths]


def test_model_selection_keeps_the_best_epoch_and_resume_restores_it(tmp_path, monkeypatch):
    """Four epochs a stage, the third scoring best: model selection keeps it (and stage 1's BYOL
    target of it); a run killed after the second epoch's checkpoint resumes at the third epoch,
    whose state depends on the restored Adam state and generators, and ends with the
    uninterrupted run's checkpoints, history and steps."""
    data, scores = make_synthetic(), {1: [0.5, 0.8, 0.9, 0.2], 2: [0.3, 0.8, 0.9, 0.1]}
    states, targets = {1: [], 2: []}, {1: [], 2: []}
    scripted_validation(monkeypatch, scores, states, targets=targets)
    epochs = ["--epochs", "4", "--meta_epochs", "4"]
    args = tiny_args(tmp_path, *epochs, "--out_dir", str(tmp_path / "whole"))
    whole = mabn.main(args, data)["per_seed"][0]["stages"]
    stage1, stage2 = final_checkpoints(args.out_dir)
    assert all(torch.equal(stage1[k], states[1][2][k]) for k in stage1)  # epoch 3 scored best
    assert not all(torch.equal(stage1[k], states[1][3][k]) for k in stage1)  # not the last
    (target1,) = final_checkpoints(args.out_dir, "target", [1])  # with its target of epoch 3
    assert all(torch.equal(target1[k], targets[1][2][k]) for k in target1)
    assert not all(torch.equal(target1[k], targets[1][3][k]) for k in target1)
    phi_names = set(mabn.split_params(tiny_model()[0])[0])
    assert all(torch.equal(v, states[2][2][k] if k in phi_names else stage1[k])
               for k, v in stage2.items())
    assert not all(torch.equal(stage2[k], states[2][3][k]) for k in phi_names)
    for stage in (1, 2):  # die after the second epoch's checkpoint of this stage, then rerun
        real_save = mabn.save_atomic
        saved = []

        def save_then_die(obj, path):
            real_save(obj, path)
            saved.append(os.path.basename(path))
            if saved.count(f"stage{stage}.pt") == 2:
                raise KeyboardInterrupt

        out = str(tmp_path / f"killed{stage}")
        scripted_validation(monkeypatch, scores, {1: [], 2: []})
        monkeypatch.setattr(mabn, "save_atomic", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            mabn.main(tiny_args(tmp_path, *epochs, "--out_dir", out), data)
        monkeypatch.setattr(mabn, "save_atomic", real_save)
        resumed_from = {1: 2, 2: 0} if stage == 1 else {1: 4, 2: 2}  # epochs it validates again
        calls = scripted_validation(monkeypatch, scores, {1: [], 2: []}, first_epoch=resumed_from)
        rerun = mabn.main(tiny_args(tmp_path, *epochs, "--out_dir", out), data)["per_seed"][0]
        validated = [c for c in calls if c["split"].name == "val"]
        assert len(validated) == (6 if stage == 1 else 2)  # epochs 3, 4 (and stage 2's four)
        for whole_part, resumed in zip((stage1, stage2), final_checkpoints(out)):
            assert all(torch.equal(whole_part[k], resumed[k]) for k in whole_part), stage
        for name in ("stage1", "stage2"):
            assert rerun["stages"][name]["history"] == whole[name]["history"], (stage, name)
            assert rerun["stages"][name]["steps"] == whole[name]["steps"], (stage, name)


def test_a_checkpoint_with_other_stage2_flags_is_refused(tmp_path):
    """Stage 2's checkpoint depends on alpha and delta: a rerun with another alpha reuses stage 1
    and refuses stage 2's file, naming the flag."""
    data = make_synthetic()
    args = tiny_args(tmp_path, "--epochs", "1", "--meta_epochs", "1")
    mabn.main(args, data)
    for flag, value, shown in (("--inner_lr", "0.3", "inner_lr: 0.2 in file vs 0.3 now"),
                               ("--outer_lr", "0.02", "outer_lr: 0.01 in file vs 0.02 now")):
        again = tiny_args(tmp_path, "--epochs", "1", "--meta_epochs", "1", flag, value)
        with pytest.raises(SystemExit) as exit_info:
            mabn.main(again, data)
        assert "stage2.pt" in str(exit_info.value) and shown in str(exit_info.value)


def test_stage2_changes_only_bn_affine_of_its_own_copy(tmp_path):
    args = tiny_args(tmp_path, "--max_steps", "3", "--outer_lr", "0.05")
    os.makedirs(args.out_dir)
    model, target = tiny_model()
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 8, 8), aux=True)  # running statistics away from their start
    model.eval()
    before = snapshot(model)
    phi, out = mabn.train_meta(model, target, make_synthetic(), args)
    assert out["steps"] == 3
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # a copy trained
    assert set(phi) == set(mabn.split_params(model)[0]) and any("running_mean" in k for k in before)
    assert any(not torch.equal(v, before[k]) for k, v in phi.items())


def test_stage2_stops_when_bn_leaves_eval_mode(tmp_path, monkeypatch):
    """Stage 2 rests on BN in eval mode (stage 1's statistics, never updated): a step or a
    validation pass that leaves the model or its BYOL target training is caught before the next
    step could update the statistics."""
    for name, part in (("meta_step", "model"), ("evaluate", "target"), ("meta_step", "target")):
        def leaves_training(call, run, part=part):
            out = run()
            call[part].train()
            return out

        spy(monkeypatch, name, leaves_training)
        args = tiny_args(tmp_path, "--meta_epochs", "2", "--out_dir", str(tmp_path / (name + part)))
        os.makedirs(args.out_dir)
        with pytest.raises(AssertionError, match="eval mode"):
            mabn.train_meta(*tiny_model(), make_synthetic(), args)
        monkeypatch.undo()


def test_meta_batches_of_distinct_uniform_domains_each_with_disjoint_support_and_query(tmp_path):
    domains = torch.tensor([0] * 60 + [1] * 10 + [2] * 5 + [3])
    index = torch.arange(len(domains))  # each image is its own index: what an episode took
    split = mabn.Split(torch.utils.data.TensorDataset(index.float().view(-1, 1, 1, 1), index),
                       domains, "train")
    args = tiny_args(tmp_path, "--n_support", "8", "--n_query", "6", "--meta_batch", "2")
    counts = {0: 0, 1: 0, 2: 0}
    cpu = torch.device("cpu")
    for meta_batch in mabn.meta_batches(split, args, 600, torch.Generator().manual_seed(0), cpu):
        drawn = []
        for support_x, query_x, query_y in meta_batch:  # Alg. 1: B = 2 episodes per outer step
            support, query = support_x.flatten().long().tolist(), query_x.flatten().long().tolist()
            assert query == query_y.tolist()  # the query's labels are its own images'
            d = int(domains[support[0]])
            size = min(14, {0: 60, 1: 10, 2: 5}[d])  # smaller domains give all they have
            assert len(set(support + query)) == len(support + query) == size  # disjoint
            assert len(support) == round(size * 8 / 14)
            assert {int(domains[i]) for i in support + query} == {d}
            drawn.append(d)
            counts[d] += 1
        assert len(drawn) == 2 and drawn[0] != drawn[1]  # distinct domains
    # uniform over the domains (each in 2 of 3 steps: 400), not by size (domain 0: ~580)
    assert sum(counts.values()) == 1200 and all(abs(n - 400) < 60 for n in counts.values()), counts
    args.meta_batch = 5  # more than the 3 domains of two images or more: B is capped
    batches = mabn.meta_batches(split, args, 4, torch.Generator(), cpu)
    assert [len(b) for b in batches] == [3] * 4


def test_a_stage2_epoch_takes_each_source_image_about_once_with_b_episodes(tmp_path, monkeypatch):
    data = make_synthetic()  # 72 source images; episodes of 8 + 8
    for meta_batch, per_epoch in (("1", 4), ("2", 2)):
        steps = spy(monkeypatch, "meta_step")
        args = tiny_args(tmp_path, "--meta_batch", meta_batch, "--out_dir",
                         str(tmp_path / meta_batch))
        assert mabn.stage2_steps(data["splits"]["train"], args) == per_epoch
        os.makedirs(args.out_dir)
        mabn.train_meta(*trained_bn(*tiny_model()), data, args)
        assert len(steps) == 2 * per_epoch
        assert {len(c["episodes"]) for c in steps} == {int(meta_batch)}
        monkeypatch.undo()


def test_stage2_validates_at_the_first_k(tmp_path, monkeypatch):
    calls = spy(monkeypatch, "evaluate")
    mabn.main(tiny_args(tmp_path, "--n_adapt", "8", "4", "--epochs", "1", "--meta_epochs", "1"),
              make_synthetic())
    validations = [c for c in calls if c["split"].name == "val"]
    assert validations and all(c["ks"] == [8] for c in validations)  # --n_adapt's first: k = 8


def test_stage2_support_is_k_and_stage1_recipes_follow_their_sources(tmp_path, monkeypatch):
    """Stage 2 adapts on as many images as the test does (the slides' protocol alignment); RxRx1's
    stage 1 turns and mirrors its images (Meta-DMoE), PovertyMap flips them both ways for 200
    epochs (WILDS' baseline)."""
    for name in ("iwildcam", "camelyon17", "rxrx1", "fmow", "poverty", "domainnet", "digits"):
        args = mabn.parse_args(["--dataset", name])
        assert args.n_support == args.n_adapt[0] == (12 if name == "iwildcam" else 32), name
    assert mabn.parse_args(["--dataset", "fmow", "--n_adapt", "8", "4"]).n_support == 8
    assert mabn.parse_args(["--dataset", "fmow", "--n_support", "5"]).n_support == 5
    rxrx1 = mabn.parse_args(["--dataset", "rxrx1"])
    poverty = mabn.parse_args(["--dataset", "poverty"])
    assert (rxrx1.turns, poverty.turns, poverty.epochs, mabn.parse_args([]).turns) == (4, 2, 200, 0)
    x = torch.arange(2.0 * 16).view(2, 1, 4, 4).repeat(200, 1, 1, 1)  # 400 images, two patterns
    for turns, n_kinds in ((4, 8), (2, 4)):  # quarter turns and mirrors: 8; half turns: 4
        out = mabn.turn_and_mirror(x, torch.Generator().manual_seed(0), turns)
        kinds = {(q, m): x[:2].flip(3 if m else []).rot90(q, (2, 3))  # the 8 symmetries
                 for q in range(4) for m in (0, 1)}
        found = [[n for n, k in kinds.items() if torch.equal(out[i], k[i % 2])] for i in range(400)]
        assert all(len(f) == 1 for f in found)  # each image one of the symmetries, its own draw
        counts = {n: sum(f == [n] for f in found) for n in kinds}
        assert sum(c > 0 for c in counts.values()) == n_kinds
        assert max(counts.values()) < 3 * 400 / n_kinds
    calls = spy(monkeypatch, "joint_step")  # and stage 1 feeds the main loss the turned images
    data = make_synthetic()
    for turns in (0, 4):
        calls.clear()
        args = tiny_args(tmp_path, "--out_dir", str(tmp_path / str(turns)), "--max_steps", "1")
        args.turns = turns
        os.makedirs(args.out_dir)
        mabn.train_joint(*tiny_model(), data, args)
        order = torch.utils.data.RandomSampler(data["splits"]["train"].dataset,
                                               generator=torch.Generator().manual_seed(0))
        first = data["splits"]["train"].dataset.tensors[0][list(order)[:16]]
        assert torch.equal(calls[0]["x"], first) == (turns == 0), turns


def test_validation_noise_is_the_sd_around_each_pilots_line():
    checks = [[0.5, 0.6, 0.6, 0.8], [0.2, 0.2, 0.3, 0.2], [0.1, float("-inf")], [0.3, 0.4]]
    squares = 0.0
    for y in checks[:2]:  # by hand: least squares through (t, y), t = 0..3; the last two: no line
        slope = sum((t - 1.5) * (b - sum(y) / 4) for t, b in enumerate(y)) / 5
        squares += sum((b - sum(y) / 4 - slope * (t - 1.5)) ** 2 for t, b in enumerate(y))
    assert mabn.validation_noise(checks) == pytest.approx(math.sqrt(squares / 4))


def test_pilot_takes_the_largest_alpha_within_noise_at_delta_drift_over_t_and_a_given_value_wins(
        tmp_path, monkeypatch):
    """delta = DRIFT / T over stage 2's T outer steps; a pilot per alpha, the first P steps of that
    stage 2; the largest alpha within the validation noise of the best; a diverging pilot scores
    -inf and the run goes on; every candidate is kept; a value the user passes wins; a rerun
    reuses the finished pilots; if every pilot diverges, the smallest alpha."""
    data = make_synthetic()
    base = {1e-3: 0.50, 1e-2: 0.71, 0.1: 0.695}
    pattern, seen = [0.0, 0.02, -0.02, 0.0], {}
    P, T = 4, 20  # 72 source images: 4 outer steps of 8 + 8 an epoch, 5 epochs; pilots: 4 x 1

    def checks(call, run):  # each pilot's validation: its base score, then the pattern
        args = call["args"]
        if call["split"].name != "val" or call["rows"] != ["mabn"]:
            return run()
        seen[args.inner_lr] = seen.get(args.inner_lr, -1) + 1
        score = base.get(args.inner_lr, 0.0) + pattern[seen[args.inner_lr] % 4]
        return {"mabn": {"acc_avg": score}}

    def diverging(call, run):  # alpha 1 diverges
        out = run()
        return out * float("nan") if call["inner_lr"] == 1.0 else out

    spy(monkeypatch, "evaluate", checks)
    steps = spy(monkeypatch, "meta_step", diverging)
    starts = spy(monkeypatch, "train_meta")
    cases = (((None, None), (0.1, mabn.DRIFT / T), 4), ((None, 0.05), (0.1, 0.05), 4),
             ((0.3, None), (0.3, mabn.DRIFT / T), 0), ((0.3, 0.05), (0.3, 0.05), 0))
    for i, (given, expected, n_candidates) in enumerate(cases):
        seen.clear()
        args = tiny_args(tmp_path, "--out_dir", str(tmp_path / str(i)), "--epochs", "1",
                         "--meta_epochs", "5", "--pilot_share", "0.8")
        args.inner_lr, args.outer_lr = given
        out = mabn.main(args, data)["per_seed"][0]
        assert (out["pilot"]["inner_lr"], out["pilot"]["outer_lr"]) == pytest.approx(expected)
        assert (out["flags"]["inner_lr"], out["flags"]["outer_lr"]) == pytest.approx(expected)
        pilots = out["pilot"]["candidates"]
        assert len(pilots) == n_candidates
        assert all(c["outer_lr"] == pytest.approx(expected[1]) for c in pilots)  # the run's delta
        stage1 = torch.load(os.path.join(args.out_dir, "seed0", "stage1.pt"), weights_only=True)
        start = mabn.clone_phi(starts[-1]["model"])  # the last stage 2 began at stage 1's phi
        assert all(torch.equal(v, stage1["best"]["model"][k]) for k, v in start.items())
        if given != (None, None):
            continue
        assert [c["inner_lr"] for c in pilots] == list(mabn.ALPHAS)
        assert out["pilot"]["pilot_steps"] == P and out["pilot"]["stage2_steps"] == T
        healthy = pilots[:3]
        assert all(len(c["checks"]) == 4 and {"gain", "phi_shift"} <= set(c) for c in healthy)
        assert [c["score"] for c in healthy] == pytest.approx([base[a] + 0.02 for a in base])
        assert pilots[3]["score"] == -math.inf and pilots[3]["checks"] == []  # the worst
        noise = out["pilot"]["noise"]
        assert noise == pytest.approx(mabn.validation_noise([c["checks"] for c in pilots]))
        assert 0.017 < noise < 0.03  # so 0.1 (0.715) is within it of 0.01's 0.73
        saved = json.load(open(os.path.join(args.out_dir, "seed0", "results.json")))
        assert saved["pilot"]["candidates"][0]["checks"] == pytest.approx([0.5, 0.52, 0.48, 0.5])
        steps.clear()  # a rerun: the same choice, one meta step (alpha 1, diverging again)
        again = mabn.main(args, data)["per_seed"][0]["pilot"]
        assert again == out["pilot"] and len(steps) == 1
    spy(monkeypatch, "meta_step", lambda call, run: run() * float("nan"))  # every pilot diverges
    args.inner_lr = args.outer_lr = None
    args.out_dir = str(tmp_path / "diverged")
    os.makedirs(args.out_dir)
    model, target = mabn.build_model(args, data, torch.device("cpu"))
    assert mabn.choose_lrs(model, target, data, args)["inner_lr"] == mabn.ALPHAS[0]


def test_control_row_is_stage2_without_the_inner_step_from_stage1(tmp_path, monkeypatch):
    """control: a second stage 2 with alpha = 0 (phi fine-tuned on the joint loss), from stage 1's
    phi like stage 2 proper, predicted without adaptation."""
    runs = spy(monkeypatch, "train_meta")
    tests = spy(monkeypatch, "evaluate")
    args = tiny_args(tmp_path, "--methods", "control", "stage2", "mabn", "--inner_lr", "0.5")
    out = mabn.main(args, make_synthetic())["per_seed"][0]
    assert [(c["name"], c["args"].inner_lr, c["args"].first_order) for c in runs] == [
        ("control", 0.0, True), ("stage2", 0.5, False)]  # alpha 0: first order is exact
    ckpt = {name: torch.load(os.path.join(args.out_dir, "seed0", f"{name}.pt"),
                             weights_only=True)["best"]["model"]
            for name in ("stage1", "control", "stage2")}
    for call in runs:  # both stage-2 runs start from stage 1's phi
        start = mabn.clone_phi(call["model"])
        assert all(torch.equal(v, ckpt["stage1"][k]) for k, v in start.items())
    (phis,) = [c["phis"] for c in tests if c["split"].name == "test"]
    assert all(torch.equal(phis["control"][k], ckpt["control"][k]) for k in phis["control"])
    assert all(torch.equal(phis["stage2"][k], ckpt["stage2"][k]) for k in phis["stage2"])
    assert not all(torch.equal(phis["control"][k], phis["stage2"][k]) for k in phis["stage2"])
    assert "control" in out["target"] and "control" in out["stages"]


# ------------------------------------------------------------------------------------------------
# Stage 3 and the rows of the paper's analyses
# ------------------------------------------------------------------------------------------------
def phis_of(model):
    phi = mabn.split_params(model)[0]
    return {"stage1": {k: v + 0.05 for k, v in phi.items()}, "stage2": phi,
            "control": {k: v - 0.05 for k, v in phi.items()}}


def test_adapt_domain_changes_only_bn_affine():
    model, target = trained_bn(*tiny_model())
    before, target_before = snapshot(model), snapshot(target)
    phi, frozen = mabn.split_params(model)
    adapted = mabn.adapt_domain(model, phi, frozen, target, torch.rand(8, 3, 8, 8), jitter_aug(),
                                inner_lr=0.5, steps=2)
    assert set(adapted) == set(phi) and {k.split(".")[0] for k in adapted} == {
        "backbone", "projector", "predictor"}  # the main head has no BN
    assert all(k.endswith((".weight", ".bias")) for k in phi)
    assert any(not torch.equal(adapted[k], phi[k]) for k in adapted)  # it did adapt
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # module unchanged
    assert all(torch.equal(v, target_before[k]) for k, v in snapshot(target).items())
    assert all(not v.requires_grad for v in adapted.values())


def test_domains_adapt_independently():
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    x_a, x_b = torch.rand(8, 3, 8, 8), 2 * torch.rand(8, 3, 8, 8) - 0.5

    def adapt(x):
        return mabn.adapt_domain(model, phi, frozen, target, x, jitter_aug(0), 0.5, 1)

    b_alone = adapt(x_b)
    a = adapt(x_a)
    assert any(not torch.allclose(a[k], b_alone[k]) for k in a)
    assert all(torch.equal(b_alone[k], adapt(x_b)[k]) for k in a)


def test_prediction_never_runs_aux_branch(tmp_path):
    data = make_synthetic()
    model, target = trained_bn(*tiny_model())
    args = tiny_args(tmp_path, "--n_adapt", "4", "--eval_batch_size", "5", "--inner_steps", "2")
    calls = {"projector": 0, "predictor": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(
            lambda *a, name=name: calls.update({name: calls[name] + 1}))
    test = data["splits"]["test"]
    rows = ["stage2", "stage1", "bn_stats"]
    mabn.evaluate(model, target, phis_of(model), data, test, rows, [4], args)
    assert calls == {"projector": 0, "predictor": 0}
    mabn.evaluate(model, target, phis_of(model), data, test, ["mabn"], [4], args)
    n_steps = len(test.by_domain) * args.inner_steps  # one online forward per inner step
    assert calls == {"projector": n_steps, "predictor": n_steps}


def test_support_sets_are_drawn_per_seed_and_domain_or_first_k_on_request(tmp_path):
    split = make_synthetic(per_domain=30)["splits"]["test"]
    drawn = mabn.support_sets(split, 8, 0)
    assert drawn == mabn.support_sets(split, 8, 0)  # a seeded draw
    positions = []
    for d, idx in split.by_domain.items():
        assert len(set(drawn[d])) == 8 and set(drawn[d]) <= set(idx)
        positions.append([idx.index(i) for i in drawn[d]])
    assert positions[0] != list(range(8)) and positions[0] != positions[1]  # each domain its own
    assert all(drawn[d] != other for d, other in mabn.support_sets(split, 8, 1).items())  # seed 1
    first = mabn.support_sets(split, 8, 1, "first")  # Meta-DMoE's protocol
    assert first == {d: idx[:8] for d, idx in split.by_domain.items()}


def test_every_row_runs_on_the_same_support_sets(tmp_path, monkeypatch):
    data = make_synthetic()
    adapted, reestimated = spy(monkeypatch, "adapt_domain"), spy(monkeypatch, "reestimate_bn_stats")
    args = tiny_args(tmp_path, "--methods", "all", "--n_adapt", "8", "4", "--seeds", "0", "1",
                     "--epochs", "1", "--meta_epochs", "1")
    out = mabn.main(args, data)
    with_k = {"bn_stats", "no_meta", "mabn", "mabn_bn", "mabn_tent_bn", "mabn_tent_affine",
              "mabn_unmatched"}
    for result in out["per_seed"]:
        assert set(result["target"]) == set(mabn.ROWS) - with_k | {f"{r}@{k}" for r in with_k
                                                                 for k in (8, 4)}
    test = data["splits"]["test"]
    expected = {}  # (seed, k, domain) -> the images of its support set
    for seed in (0, 1):
        for d, idx in mabn.support_sets(test, 8, seed).items():
            for k in (4, 8):  # nested: k = 4 takes the first 4 of the 8
                expected[seed, k, d] = test.dataset.tensors[0][idx[:k]]
    for calls in (adapted, reestimated):  # each set of every seed, k and domain; no other image
        seen = set()
        for call in calls:
            support_x = call["support_x"]
            seen |= {key for key, x in expected.items()
                     if x.shape == support_x.shape and torch.equal(x, support_x)}
        assert seen == set(expected) and len(calls) > 0


def test_rows_that_reestimate_statistics_use_their_whole_support_set(tmp_path, monkeypatch):
    data = make_synthetic()
    model, target = trained_bn(*tiny_model())
    calls = spy(monkeypatch, "reestimate_bn_stats")
    args = tiny_args(tmp_path, "--n_adapt", "5")
    test = data["splits"]["test"]
    rows = ["bn_stats", "mabn_bn", "mabn_tent_bn"]
    mabn.evaluate(model, target, phis_of(model), data, test, rows, [5], args)
    sets = mabn.support_sets(test, 5, args.seed)
    assert len(calls) == 3 * len(sets)  # every row, every domain: its 5 images, none left out
    for call, idx in zip(calls, [i for i in sets.values() for _ in range(3)]):
        assert torch.equal(call["support_x"], test.dataset.tensors[0][idx])


# What the README says each row does: (start, statistics, MABN's step, TENT, another domain's)
README_ROWS = {"stage1": ("stage1", "source", 0, 0, 0), "bn_stats": ("stage1", "support", 0, 0, 0),
               "tent": ("stage1", "batch", 0, 1, 0), "no_meta": ("stage1", "source", 1, 0, 0),
               "control": ("control", "source", 0, 0, 0), "stage2": ("stage2", "source", 0, 0, 0),
               "mabn": ("stage2", "source", 1, 0, 0), "mabn_bn": ("stage2", "support", 1, 0, 0),
               "tent_bn": ("stage2", "batch", 0, 1, 0),
               "tent_affine": ("stage2", "source", 0, 1, 0),
               "mabn_tent_bn": ("stage2", "support", 1, 1, 0),
               "mabn_tent_affine": ("stage2", "source", 1, 1, 0),
               "mabn_unmatched": ("stage2", "source", 1, 0, 1)}


@pytest.mark.parametrize("row", list(README_ROWS))
def test_every_row_starts_and_adapts_as_the_readme_says(row):
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    gen = torch.Generator().manual_seed(3)
    phis = {name: {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in phi.items()}
            for name in ("stage1", "control")}
    phis["stage2"] = phi
    support_x = 2 * torch.rand(6, 3, 8, 8, generator=gen)
    start, stats, step, tent, other = README_ROWS[row]
    assert mabn.ROWS[row] == mabn.Row(start, stats, bool(step), bool(tent), bool(other))
    params = mabn.row_params(row, model, target, phis[start], frozen, support_x, fixed_aug, 0.5)
    # statistics: stage 1's, the support set's (the first BN sees the first conv's output), or none
    # at all: "batch" rows normalise each batch with its own (test_batch_statistics_...)
    first_in = model.backbone[1][0](model.backbone[0](support_x))
    if stats == "batch":
        assert params["backbone.1.1.running_mean"] is None
        assert params["projector.1.running_mean"] is not None
    else:
        source = frozen["backbone.1.1.running_mean"]
        mean = first_in.mean((0, 2, 3)) if stats == "support" else source
        assert torch.allclose(params["backbone.1.1.running_mean"], mean, atol=1e-5)
    # the affine: phis[start], with MABN's step (Eq. 3) where the row has it, under the statistics
    # the row keeps (kept through TENT in mabn_tent_bn). TENT's rows adapt later, on test batches.
    expected = phis[start]
    if step:
        step_stats = dict(frozen)
        if stats == "support":
            step_stats.update(mabn.reestimate_bn_stats(model, {**frozen, **expected}, support_x))
        expected = mabn.adapt_domain(model, expected, step_stats, target, support_x, fixed_aug, 0.5)
        assert not all(torch.equal(params[k], phis[start][k]) for k in phi)  # it moved
    assert all(torch.equal(params[k], expected[k].detach()) for k in phi)


def test_one_pass_for_all_rows_equals_one_pass_each(tmp_path):
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    args = tiny_args(tmp_path, "--eval_batch_size", "7", "--n_adapt", "5")
    split, phis = data["splits"]["test"], phis_of(model)
    before, target_before = snapshot(model), snapshot(target)
    together = mabn.evaluate(model, target, phis, data, split, list(mabn.ROWS), [5], args)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # every row, TENT's
    assert all(torch.equal(v, target_before[k]) for k, v in snapshot(target).items())  # too
    for row in mabn.ROWS:  # with its start's plain row, for "changed"
        start = mabn.ROWS[row].start
        alone = mabn.evaluate(model, target, phis, data, split, [row, start], [5], args)
        assert alone[row] == together[row], row
    assert together["mabn_tent_bn"] != together["mabn"] != together["stage2"]


def test_unmatched_uses_another_domains_adaptation(tmp_path, monkeypatch):
    data = make_synthetic()
    model, target = trained_bn(*tiny_model())
    made = spy(monkeypatch, "row_params")
    mabn.evaluate(model, target, phis_of(model), data, data["splits"]["test"],
                  ["mabn", "mabn_unmatched"], [6], tiny_args(tmp_path))
    matched = [c["result"] for c in made if c["row"] == "mabn"]
    unmatched = [c["result"] for c in made if c["row"] == "mabn_unmatched"]
    phi_names, n = list(mabn.split_params(model)[0]), len(matched)
    assert n == len(unmatched) == 3
    for d in range(n):  # domain d is predicted with the phi~ of domain d + 1 (cyclically), exactly
        assert all(torch.equal(unmatched[d][k], matched[(d + 1) % n][k]) for k in phi_names)
        assert not all(torch.equal(unmatched[d][k], matched[d][k]) for k in phi_names)


def test_batch_statistics_normalise_every_layer_with_the_batchs_own():
    model, _ = trained_bn(*tiny_model())
    params = {**mabn.split_params(model)[1], **mabn.split_params(model)[0]}
    x = 3 * torch.rand(6, 3, 8, 8)
    reference = copy.deepcopy(model)  # every backbone BN in training mode, no running averages
    for m in reference.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = None
            m.reset_running_stats()
    before = snapshot(model)
    batch = mabn.predict(model, {**params, **mabn.batch_statistics(model)}, x)
    with torch.no_grad():
        expected = reference(x)
    assert torch.allclose(batch, expected, atol=1e-5)
    assert not torch.allclose(batch, mabn.predict(model, params, x), atol=1e-3)  # source's
    stats = mabn.reestimate_bn_stats(model, params, x)  # Table 4's "update BN" for MABN
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert len(stats) == 2 * n_bn == 18
    for name, m in reference.backbone.named_modules():  # momentum None: this batch's statistics
        if isinstance(m, nn.BatchNorm2d):
            assert torch.allclose(stats[f"backbone.{name}.running_mean"], m.running_mean, atol=1e-5)
            assert torch.allclose(stats[f"backbone.{name}.running_var"], m.running_var, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_tent_is_online_entropy_minimisation_on_the_backbone_affine():
    model, _ = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 8, 8, generator=gen), 2 * torch.rand(5, 3, 8, 8, generator=gen)]
    before = snapshot(model)
    leaves, opt = mabn.tent_setup(phi)  # TENT's code defaults: Adam, lr 1e-3, betas (0.9, 0.999)
    assert set(leaves) == {k for k in phi if k.startswith("backbone.")}
    hand = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    hand_opt = torch.optim.Adam(list(hand.values()), 1e-3, betas=(0.9, 0.999))
    for x in batches:  # by hand: predict the batch, then one step on its mean prediction entropy
        logits = functional_call(model, {**frozen, **phi, **hand}, (x,))
        outputs = mabn.tent_forward_and_adapt(model, {**frozen, **phi}, leaves, opt, x)
        assert torch.allclose(outputs, logits, atol=1e-6)  # the prediction comes before the step
        assert all(p.grad is None for p in model.parameters())  # only the leaves got gradients
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        for leaf, grad in zip(hand.values(), torch.autograd.grad(entropy, list(hand.values()))):
            leaf.grad = grad
        hand_opt.step()
        assert all(torch.allclose(leaves[k], hand[k], atol=1e-6) for k in hand)
    assert not all(torch.equal(leaves[k], phi[k]) for k in leaves)  # online: batch after batch
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_tent_rows_adapt_per_test_batch_from_their_start_and_reset_for_every_domain(
        tmp_path, monkeypatch):
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    phis = phis_of(model)
    made, real_tent = spy(monkeypatch, "row_params"), mabn.tent_forward_and_adapt

    def before_step(call, run):  # TENT's leaves as each batch finds them
        call["start"] = {k: v.detach().clone() for k, v in call["leaves"].items()}
        return run()

    calls = spy(monkeypatch, "tent_forward_and_adapt", before_step)
    args = tiny_args(tmp_path, "--eval_batch_size", "7", "--n_adapt", "5")
    source_mean = mabn.split_params(model)[1]["backbone.1.1.running_mean"]
    for row in ("mabn_tent_affine", "mabn_tent_bn", "tent_bn", "tent"):
        calls.clear()
        made.clear()
        mabn.evaluate(model, target, phis, data, data["splits"]["test"], [row], [5], args)
        assert [len(c["x"]) for c in calls] == [7, 7, 7, 7, 2] * 3  # every batch, in order
        for d in range(3):
            first, second = calls[5 * d], calls[5 * d + 1]
            start = made[d]["result"]  # the row's tensors for domain d
            mean = first["params"]["backbone.1.1.running_mean"]  # kept through TENT: the
            stats = mabn.ROWS[row].stats  # source's, the support set's; or each batch's own
            assert (mean is None) == (stats == "batch")
            assert stats != "source" or torch.equal(mean, source_mean)
            assert stats != "support" or torch.equal(mean, start["backbone.1.1.running_mean"])
            assert all(torch.equal(first["start"][k], start[k]) for k in first["start"])  # reset
            fresh_leaves, fresh_opt = mabn.tent_setup(first["start"])  # and a fresh optimiser
            real_tent(model, start, fresh_leaves, fresh_opt, first["x"])
            assert all(torch.allclose(second["start"][k], fresh_leaves[k]) for k in fresh_leaves)
            assert not all(torch.equal(first["start"][k], second["start"][k]) for k in fresh_leaves)
        moved = not all(torch.equal(made[0]["result"][k], phis[mabn.ROWS[row].start][k])
                        for k in calls[0]["start"])
        assert moved == row.startswith("mabn")  # MABN + TENT starts from phi~, TENT from phi


def test_domain_metrics_by_hand():
    outputs = torch.tensor([[2.0, 0], [0, 1], [3, 1], [0, 5], [1, 0], [1, 2]])  # predicts 010101
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    domains = torch.tensor([7, 7, 7, 7, 9, 9])  # domain 7: 3 of 4 right; domain 9: 1 of 2
    metrics = mabn.domain_metrics(outputs, labels, domains)
    assert metrics == {"acc_avg": pytest.approx(4 / 6), "acc_wg": 0.5,
                       "per_domain": {7: 0.75, 9: 0.5}}
    mse = mabn.domain_metrics(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 0.0, 1.0]),
                              torch.tensor([0, 0, 3]), task="regression")
    assert mse == {"per_domain": {0: 2.0, 3: 9.0}}


def test_adaptation_is_visible_per_domain(tmp_path, monkeypatch):
    """Every adapting row records per target domain ||phi~ - phi|| / ||phi|| over the backbone's
    part of phi and the share of its predictions unlike its start's plain row's."""
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    phis, made = phis_of(model), spy(monkeypatch, "row_params")
    test = data["splits"]["test"]
    args = tiny_args(tmp_path, "--inner_lr", "50.0", "--n_adapt", "5")  # 50: flips predictions
    out = mabn.evaluate(model, target, phis, data, test, ["stage1", "stage2", "mabn", "bn_stats"],
                        [5], args)
    assert "phi_shift" not in out["stage2"] and "changed" not in out["stage1"]
    x = test.dataset.tensors[0]
    mabn_params = [c["result"] for c in made if c["row"] == "mabn"]
    for (d, idx), params in zip(test.by_domain.items(), mabn_params):
        seen = [k for k in phis["stage2"] if k.startswith("backbone.")]  # what predictions use
        phi_d = torch.cat([params[k].flatten() for k in seen])
        phi = torch.cat([phis["stage2"][k].flatten() for k in seen])
        shift = ((phi_d - phi).norm() / phi.norm()).item()
        assert out["mabn"]["phi_shift"][d] == pytest.approx(shift, rel=1e-5)
        adapted = mabn.predict(model, params, x[idx]).argmax(-1)
        plain = mabn.predict(model, {**mabn.split_params(model)[1], **phis["stage2"]}, x[idx])
        changed = (adapted != plain.argmax(-1)).float().mean().item()
        assert out["mabn"]["changed"][d] == pytest.approx(changed)
        assert out["bn_stats"]["phi_shift"][d] == 0.0  # statistics only: phi stays
    assert max(out["mabn"]["changed"].values()) > 0 and max(out["bn_stats"]["changed"].values()) > 0


# ------------------------------------------------------------------------------------------------
# End to end, learning, and the README's snippet
# ------------------------------------------------------------------------------------------------
def test_main_end_to_end(tmp_path):
    args = tiny_args(tmp_path)
    out = mabn.main(args, make_synthetic())["per_seed"][0]
    saved = json.load(open(os.path.join(args.out_dir, "seed0", "results.json")))
    stages = saved["stages"]  # 72 source images: 4 batches of 16, 4 episodes of 8 + 8 an epoch
    assert stages["stage1"]["steps"] == stages["stage2"]["steps"] == 8
    assert set(saved["target"]) == {"stage1", "stage2", "mabn"}
    assert len(saved["target"]["mabn"]["per_domain"]) == 3
    for name in ("stage1", "stage2"):  # throughput over the training steps; time_s with validation
        assert stages[name]["img_per_s"] * stages[name]["time_s"] >= 8 * 16, name
    assert stages["stage3"]["img_per_s"] * stages["stage3"]["time_s"] == pytest.approx(72, rel=0.02)
    assert saved["target"]["mabn"]["acc_avg"] == out["target"]["mabn"]["acc_avg"]
    summary = json.load(open(os.path.join(args.out_dir, "results.json")))["summary"]
    assert summary["mabn"]["acc_avg"][0] == out["target"]["mabn"]["acc_avg"]
    again = mabn.main(tiny_args(tmp_path), make_synthetic())["per_seed"][0]  # stages reused
    assert again["target"]["mabn"]["acc_avg"] == out["target"]["mabn"]["acc_avg"]
    assert "img_per_s" not in again["stages"]["stage1"]  # loaded, not trained


def test_seeds_as_concurrent_processes_then_one_summary(tmp_path):
    """The several-GPU recipe on the CPU: one process per seed into one --out_dir at once, then one
    call over all the seeds, which reuses every finished stage and reports what they computed."""
    import subprocess
    flags = ["--out_dir", str(tmp_path / "run"), "--epochs", "1", "--meta_epochs", "1",
             "--max_steps", "2", "--inner_lr", "0.1", "--outer_lr", "0.01", "--n_adapt", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, mabn.__file__, *flags, "--seeds", seed], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in ("0", "1")]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    separate = {s: json.load(open(tmp_path / "run" / f"seed{s}" / "results.json"))["target"]
                for s in (0, 1)}
    out = mabn.main(mabn.parse_args([*flags, "--seeds", "0", "1"]))
    assert [r["stages"]["stage1"]["steps"] for r in out["per_seed"]] == [2, 2]
    assert all("img_per_s" not in r["stages"][s]
               for r in out["per_seed"] for s in ("stage1", "stage2"))
    together = [r["target"]["mabn"]["acc_avg"] for r in out["per_seed"]]
    assert together == [separate[s]["mabn"]["acc_avg"] for s in (0, 1)]
    assert separate[0]["mabn"]["acc_avg"] != separate[1]["mabn"]["acc_avg"]  # two models
    log = open(tmp_path / "run" / "log.txt").read()  # one log, line by line, from all three
    assert log.count("stage 1 epoch 1/1:") == 2 and "seeds: mean ± std" in log


GAIN_SHIFT_FLAGS = ["--epochs", "3", "--meta_epochs", "8", "--batch_size", "16", "--n_support",
                    "16", "--n_query", "16", "--n_adapt", "16"]


def gain_shift(argv):
    """The learning check's task (argv: more mabn.py flags, which win): 32 source and 6 unseen
    target domains of make_synthetic, each with its own gain; views without colour changes keep
    the brightness, the class. python test_mabn.py --gain-shift [flags] runs it. -> (args, data)"""
    args = mabn.parse_args(["--out_dir", "runs/gain_shift", *GAIN_SHIFT_FLAGS, *argv])
    args.views, args.min_crop, args.norm = dict(colour=None, noise=0.05), 0.5, NORM
    return args, make_synthetic(n_source=32, n_val=4, n_test=6, per_domain=32, gain=0.5)


def test_mabn_beats_no_adaptation_on_gain_shift(tmp_path):
    """The gain-shift task at alpha 0.2, delta 0.015, seeds 0 and 1: MABN beats the same
    meta-trained model without adaptation (stage2) by 2 points or more in each, 3 or more on
    average, as any two of seeds 0-7 do: +17.2, +10.4, +4.2, +21.4, +2.6, +18.8, +19.3, +8.3."""
    args, data = gain_shift(["--out_dir", str(tmp_path / "run"), "--seeds", "0", "1",
                             "--inner_lr", "0.2", "--outer_lr", "0.015"])
    per_seed = mabn.main(args, data)["per_seed"]  # on one thread, as every test (one_thread)
    margins = [r["target"]["mabn"]["acc_avg"] - r["target"]["stage2"]["acc_avg"] for r in per_seed]
    assert min(margins) >= 0.02 and sum(margins) / len(margins) >= 0.03, margins


def test_the_readmes_usage_snippet_runs_as_written():
    text = open(os.path.join(os.path.dirname(os.path.abspath(mabn.__file__)), "README.md")).read()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)  # it got to the end: a domain adapted, predicted


# ------------------------------------------------------------------------------------------------
# Data: the six WILDS datasets through the real wilds.get_dataset, on generated data
# ------------------------------------------------------------------------------------------------
OFFICIAL_METRICS = {"iwildcam": ["acc_avg", "F1-macro_all"], "camelyon17": ["acc_avg"],
                    "rxrx1": ["acc_avg"], "fmow": ["acc_avg", "acc_worst_region"],
                    "poverty": ["r_all", "r_wg"], "domainnet": ["acc_avg"]}


@pytest.mark.parametrize("name", sorted(OFFICIAL_METRICS))
def test_wilds_end_to_end(tmp_path, name):
    n_test_domains = fake_wilds(tmp_path / "data", name)
    args = mabn.parse_args(["--dataset", name, "--root_dir", str(tmp_path / "data"), "--out_dir",
                            str(tmp_path / "run"), "--no_pretrained", "--img_size", "32",
                            "--epochs", "1", "--meta_epochs", "1", "--max_steps", "2",
                            "--batch_size", "4", "--n_support", "3", "--n_query", "2",
                            "--n_adapt", "2", "--eval_batch_size", "64", "--proj_hidden", "16",
                            "--proj_dim", "8", "--num_workers", "0"])
    if name != "poverty":  # the loaders are under test here; the torchvision backbones next
        args.backbone = "small_resnet"
    if name != "iwildcam":  # the pilots: once
        args.inner_lr, args.outer_lr = 0.1, 1e-3
    mabn.main(args)
    saved = json.load(open(tmp_path / "run" / "seed0" / "results.json"))
    for row in ("stage2", "mabn"):
        metrics = saved["target"][row]
        for key in OFFICIAL_METRICS[name]:
            assert key in metrics and math.isfinite(metrics[key]), key
        assert len(metrics["per_domain"]) == n_test_domains
    assert [saved["stages"][s]["steps"] for s in ("stage1", "stage2")] == [2, 2]
    pilot = saved["pilot"]  # alpha and delta chosen by the pilots on the validation domains
    assert len(pilot["candidates"]) == (4 if name == "iwildcam" else 0)
    if name == "iwildcam":
        assert saved["flags"]["inner_lr"] in mabn.ALPHAS
        assert saved["flags"]["outer_lr"] * pilot["stage2_steps"] == pytest.approx(mabn.DRIFT)


@pytest.mark.parametrize("name, in_channels",
                         [("resnet50", 3), ("densenet121", 3), ("resnet18", 8)])
def test_torchvision_backbones_give_pooled_features(name, in_channels):
    backbone, dim = mabn.build_backbone(name, in_channels, pretrained=False)
    assert backbone(torch.rand(2, in_channels, 32, 32)).shape == (2, dim)


def test_rxrx1_images_are_standardised_before_their_views():
    """RxRx1: each image and channel standardised as it is loaded (WILDS' transform), so that the
    views' per-channel gains and shifts survive: the backbone does not standardise again."""
    from PIL import Image
    image = Image.fromarray((torch.rand(20, 30, 3) * 255).to(torch.uint8).numpy())
    x = mabn.resize(image, 16, standardise=True)
    assert x.shape == (3, 16, 16) and torch.allclose(x.mean((1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((1, 2)), torch.ones(3), atol=1e-5)
    assert isinstance(mabn.normalizer("per_image"), nn.Identity)
    v1, _ = mabn.byol_views(x[None].repeat(64, 1, 1, 1), torch.Generator().manual_seed(0), 1.0,
                            "standardised")
    assert (v1.std((2, 3)) - 1).abs().max() > 0.2  # the gains change each channel's spread


def test_wilds_missing_folder_is_one_clear_line(tmp_path):
    args = mabn.parse_args(["--dataset", "iwildcam", "--root_dir", str(tmp_path / "nowhere"),
                            "--out_dir", str(tmp_path / "run"), "--no_pretrained"])
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(args)
    message = str(exit_info.value)
    assert message.startswith("error: no iwildcam data under") and "--download" in message
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# Reliability: flags, bad input, interruptions and repeatability
# ------------------------------------------------------------------------------------------------
TUNED = ["n_adapt", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay", "aux_weight",
         "ema", "proj_hidden", "proj_dim", "meta_epochs", "n_support", "n_query", "meta_batch",
         "inner_steps", "pilot_share", "min_crop", "tent_lr", "eval_batch_size", "img_size"]


@pytest.mark.parametrize("dataset", ["digits", "fmow"])
def test_help_gives_every_tuned_flag_its_meaning_and_the_datasets_value(dataset, capsys,
                                                                       monkeypatch):
    assert all(values.keys() == mabn.DATASETS["digits"].keys() for values in mabn.DATASETS.values())
    args = mabn.parse_args(["--dataset", dataset])
    values = mabn.DATASETS[dataset]
    assert all(getattr(args, name) == values[name] for name in values
               if name != "n_support")  # resolved at run time: k (test_stage2_support_is_k...)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("PYTHON_COLORS", "0")  # plain text on any Python
    with pytest.raises(SystemExit):
        mabn.parse_args(["--dataset", dataset, "--help"])
    text = capsys.readouterr().out
    assert f"the values of {dataset}" in text
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", text)]  # one per flag
    for name in TUNED:
        (entry,) = [entry for entry in entries if entry.startswith(f"--{name} ")]
        meaning = entry.split("(default:")[0].replace(f"--{name}", "").replace(name.upper(), "")
        assert len(meaning.strip(" .[]")) > 8, entry
        assert f"(default: {mabn.DATASETS[dataset][name]})" in entry, entry


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagenet"], "--dataset"), (["--methods", "mabn", "magic"], "--methods"),
    (["--lr", "0"], "--lr: must be > 0"), (["--inner_lr", "-1"], "--inner_lr: must be >= 0"),
    (["--outer_lr", "0"], "--outer_lr: must be > 0"), (["--epochs", "-1"], "--epochs: must be >="),
    (["--n_adapt", "8", "0"], "--n_adapt: must be > 0"), (["--batch_size", "0"], "must be > 0"),
    (["--ema", "1.5"], "--ema: must be in [0, 1)"), (["--meta_batch", "0"], "--meta_batch: must"),
    (["--support", "last"], "--support"), (["--tent_lr", "0"], "--tent_lr: must be > 0"),
    (["--num_workers", "-1"], "--num_workers: must be >= 0"),
    (["--meta_epochs", "0"], "--meta_epochs: 0 trains no stage 2")])
def test_bad_flags_fail_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mabn.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and err.count("\n") == 1
    assert err.startswith("error:")


def test_unavailable_imagenet_weights_name_no_pretrained(monkeypatch):
    import urllib.error

    import torchvision.models._api  # torchvision's weights look the download function up here
    urls = []

    def offline(url, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as exit_info:
        mabn.build_backbone("resnet18", 8, pretrained=True)
    assert "--no_pretrained" in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert len(urls) == 1 and "resnet18" in urls[0]  # the stand-in was asked, not the network


def test_unwritable_out_dir_and_bad_checkpoints(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path, "--out_dir", str(tmp_path / "a_file/run")), make_synthetic())
    assert "cannot write to --out_dir" in str(exit_info.value)
    mabn.main(tiny_args(tmp_path), make_synthetic())
    ckpt = os.path.join(tiny_args(tmp_path).out_dir, "seed0", "stage1.pt")
    with pytest.raises(SystemExit) as exit_info:  # same out_dir, other flags: refused, both named
        mabn.main(tiny_args(tmp_path, "--lr", "0.5"), make_synthetic())
    assert ckpt in str(exit_info.value) and "lr: 0.002 in file vs 0.5 now" in str(exit_info.value)
    saved = torch.load(ckpt, weights_only=True)  # a checkpoint of an earlier format: refused
    torch.save({**saved, "flags": {**saved["flags"], "format": 3}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path), make_synthetic())
    assert "format: 3 in file vs 4 now" in str(exit_info.value)
    data = open(ckpt, "rb").read()
    open(ckpt, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path), make_synthetic())
    assert f"cannot read checkpoint {ckpt}" in str(exit_info.value)


def test_non_finite_loss_stops_with_stage_and_step(tmp_path):
    data = make_synthetic()
    data["splits"]["train"].dataset.tensors[0][:] = float("nan")  # poisoned inputs
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path, "--batch_size", "64"), data)
    assert "stage 1, epoch 1, step 1: non-finite loss" in str(exit_info.value)


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    mabn.save_atomic({"v": torch.ones(3)}, path)

    def crashing_save(obj, f):
        open(f, "wb").write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        mabn.save_atomic({"v": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))


def test_two_runs_with_one_seed_are_identical(tmp_path):
    data = make_synthetic()
    runs = [mabn.main(tiny_args(tmp_path, "--out_dir", str(tmp_path / name), "--epochs", "1",
                                "--meta_epochs", "1"), data)["per_seed"][0] for name in ("a", "b")]
    assert runs[0]["target"] == runs[1]["target"]
    a, b = (final_checkpoints(tmp_path / name)[1] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_target_domain_adapts_on_all_it_has_and_says_so(tmp_path, monkeypatch, caplog):
    data = make_synthetic(per_domain=6)
    model, target = trained_bn(*tiny_model())
    calls = spy(monkeypatch, "adapt_domain")
    caplog.set_level(logging.INFO, logger="mabn")
    mabn.evaluate(model, target, phis_of(model), data, data["splits"]["test"], ["stage2", "mabn"],
                  [10], tiny_args(tmp_path, "--n_adapt", "10"))
    notes = [r.getMessage() for r in caplog.records if r.name == "mabn"]
    assert len(notes) == 1 and "fewer than 10 images" in notes[0]
    assert [len(c["support_x"]) for c in calls] == [6, 6, 6]


def test_cost_probe_counts_flops_in_proportion_to_the_images():
    """The cost script's probe (python test_mabn.py --cost) on PovertyMap's network at 64 px: a
    stage-1 step on two images costs twice one image's FLOPs; a meta step's query image less than
    its support image."""
    one, two = (cost_probe("poverty", 1, n, img_size=64) for n in (1, 2))
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=0.01) and one["flops"] > 1e9
    base, support, query = (cost_probe("poverty", 2, s, q, img_size=64)
                            for s, q in ((1, 1), (2, 1), (1, 2)))
    assert 0 < query["flops"] - base["flops"] < support["flops"] - base["flops"]


def test_speed_script_runs_every_measurement():
    """The GPU speed script (python test_mabn.py --speed) end to end on the CPU at tiny sizes."""
    out = speed(tiny=True, extra=["--num_workers", "0", "--img_size", "16"],
                backbone="small_resnet", log=lambda msg: None)
    assert out["a_fed_over_resident"] == out["fed_img_s"] / out["resident_img_s"]
    assert out["c_stage3_over_plain"] == out["stage3_img_s"] / out["plain_img_s"]
    assert out["d_meta_cost_per_image"] == out["resident_img_s"] / out["meta_img_s"]
    assert out["d_peak_gib"] is None  # no CUDA here


# ------------------------------------------------------------------------------------------------
# Tools, not tests: generated WILDS data; the speed, cost and alpha/delta scripts
# ------------------------------------------------------------------------------------------------
def _image(path, seed, size=12):
    """A photo-like image (smooth colour blobs, sensor noise) of (width, height) or size x size."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    blobs = torch.rand(1, 3, h // 120 + 2, w // 120 + 2, generator=gen) * 255
    pixels = torch.nn.functional.interpolate(blobs, size=(h, w), mode="bilinear")[0]
    pixels = pixels + 20 * torch.randn(3, h, w, generator=gen)
    array = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path, quality=90)


def _images(jobs):
    """Write [(path, seed, size)]; many large ones in parallel processes."""
    if len(jobs) < 64:
        return [_image(*job) for job in jobs]
    import multiprocessing
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.starmap(_image, jobs, chunksize=8)


def _release(root, folder):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    open(os.path.join(root, folder, f"RELEASE_{folder.rsplit('_', 1)[1]}.txt"), "w").close()
    return os.path.join(root, folder)


def fake_wilds(root, name, per_domain=4, image_size=12, iwildcam_layout=None):
    """Write a tiny `name` dataset under root in its WILDS release layout; -> its number of OOD
    test domains. iwildcam_layout: {split: (domains, images each)} (4 train, 2 val, 3 test)."""
    import numpy as np
    import pandas as pd
    rows = []
    if name == "iwildcam":
        d = _release(root, "iwildcam_v2.0")
        layout = iwildcam_layout or {s: (n, per_domain)
                                     for s, n in dict(train=4, id_test=4, val=2, test=3).items()}
        first = dict(train=0, id_test=0, val=layout["train"][0],
                     test=layout["train"][0] + layout["val"][0])
        jobs = []
        for split, (n_domains, n_images) in layout.items():
            for loc in range(first[split], first[split] + n_domains):
                for k in range(n_images):
                    i = len(rows)
                    rows.append(dict(split=split, filename=f"{i}.jpg", y=i % 3,
                                     location_remapped=loc, sequence_remapped=i,
                                     datetime="2013-06-01 12:30:00.000"))
                    jobs.append((os.path.join(d, "train", f"{i}.jpg"), i, image_size))
        _images(jobs)
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"), index=False)
        return layout["test"][0]
    if name == "camelyon17":
        d = _release(root, "camelyon17_v1.0")
        for center in range(5):  # centers 1 (val) and 2 (test) are moved by the loader itself
            for slide in (2 * center, 2 * center + 1):
                for k in range(per_domain):
                    patient, node, x, y = f"{slide:03d}", slide % 5, 10 * k, 7 * k
                    rows.append(dict(patient=patient, node=node, x_coord=x, y_coord=y, tumor=k % 2,
                                     slide=slide, center=center, split=int(k == 0)))
                    folder = f"patient_{patient}_node_{node}"
                    _image(os.path.join(d, "patches", folder, f"patch_{folder}_x_{x}_y_{y}.png"),
                           len(rows), image_size)
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"))
        return 2
    if name == "rxrx1":
        d = _release(root, "rxrx1_v1.0")
        layout = [("train", 1), ("train", 2), ("train", 3), ("val", 4), ("test", 5), ("test", 6)]
        for split, e in layout:
            experiment = f"HEPG2-{e:02d}"
            for k in range(per_domain):
                for site in (1, 2):
                    well = f"B{k + 2:02d}"
                    rows.append(dict(site_id=f"{experiment}_1_{well}_{site}",
                                     well_id=f"{experiment}_1_{well}", cell_type="HEPG2",
                                     dataset=split, experiment=experiment, plate=1, well=well,
                                     site=site, well_type="treatment", sirna=f"s{k % 3}",
                                     sirna_id=k % 3))
                    path = os.path.join(d, "images", experiment, "Plate1", f"{well}_s{site}.png")
                    _image(path, len(rows), image_size)
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"), index=False)
        return 2
    if name == "fmow":
        from wilds.datasets.fmow_dataset import categories
        d = _release(root, "fmow_v1.1")
        regions = {"alpha-3": ["USA", "FRA", "CHN", "NGA"],
                   "region": ["Americas", "Europe", "Asia", "Africa"]}
        pd.DataFrame(regions).to_csv(os.path.join(d, "country_code_mapping.csv"), index=False)
        layout = [("train", 2010), ("test", 2011), ("val", 2014), ("test", 2016), ("seq", 2010)]
        for split, year in layout:
            for country in ("USA", "FRA", "CHN", "NGA"):
                for k in range(per_domain if split != "seq" else 1):
                    rows.append(dict(split=split, category=categories[k % 3], country_code=country,
                                     timestamp=f"{year}-03-0{k + 1}T10:00:00Z"))
        for i, row in enumerate(rows):
            _image(os.path.join(d, "images", f"rgb_img_{i}.png"), i, image_size)
        pd.DataFrame(rows).to_csv(os.path.join(d, "rgb_metadata.csv"), index=False)
        return 4
    if name == "poverty":
        from wilds.datasets.poverty_dataset import SURVEY_NAMES
        d = _release(root, "poverty_v1.1")
        folds = SURVEY_NAMES["2009-17A"]
        countries = ([folds["train"][i % 3] for i in range(2000 + 3 * per_domain)]  # 2000: id_*
                     + [c for c in folds["val"][:2] for _ in range(per_domain)]
                     + [c for c in folds["test"][:2] for _ in range(2 * per_domain)])
        gen = torch.Generator().manual_seed(0)
        os.makedirs(os.path.join(d, "images"))
        for i, country in enumerate(countries):
            rows.append(dict(country=country, wealthpooled=float(torch.randn(1, generator=gen)),
                             urban=i % 2 == 0, lat=0.0, lon=0.0, year=2012, households=10))
            np.savez(os.path.join(d, "images", f"landsat_poverty_img_{i}.npz"),
                     x=torch.randn(8, image_size, image_size, generator=gen).numpy())
        pd.DataFrame(rows).to_csv(os.path.join(d, "dhs_metadata.csv"), index=False)
        return 2
    if name == "domainnet":
        import csv
        from wilds.datasets.domainnet_dataset import DOMAIN_NET_CATEGORIES
        d = _release(root, "domainnet_v1.0")
        for domain in mabn.DOMAINNET_DOMAINS:
            for split in ("train", "test"):
                for k in range(per_domain):
                    path = f"{domain}/{DOMAIN_NET_CATEGORIES[k % 3]}/{split}_{k}.jpg"
                    rows.append(dict(image_path=path, domain=domain, split=split,
                                     category=DOMAIN_NET_CATEGORIES[k % 3], y=k % 3))
                    _image(os.path.join(d, path), len(rows), image_size)
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"), index=False,
                                  quoting=csv.QUOTE_NONNUMERIC)
        return 1
    raise ValueError(name)


def speed(tiny=False, extra=(), backbone=None, log=print):
    """Every speed measurement, once, on this machine's device (CUDA if present), on generated
    iWildCam-layout data (JPEGs of 1920x1080; --tiny: 96x64, 64 px, small batches, for a CPU):
      (a) the stage-1 step fed by the input pipeline (workers decode, resize to 448) against the
          same step fed from one batch already on the device;
      (c) stage 3 over all target domains with MABN's adaptation against plain inference;
      (d) the second-order meta step per image against the stage-1 step; the peak memory of one
          k + 16 episode. -> {name: number}; also printed as a table."""
    import shutil
    import tempfile
    import time
    root = tempfile.mkdtemp(prefix="mabn_speed_")
    size, per = ((96, 64), 16) if tiny else ((1920, 1080), 128)
    t0 = time.time()
    fake_wilds(root, "iwildcam", image_size=size,
               iwildcam_layout=dict(train=(4, 4 * per), id_test=(1, 1), val=(1, 2), test=(8, per)))
    write_s = time.time() - t0
    small = ["--img_size", "64", "--batch_size", "4", "--n_support", "6", "--n_query", "4",
             "--n_adapt", "4", "--eval_batch_size", "16", "--proj_hidden", "64", "--proj_dim", "32"]
    args = mabn.parse_args(["--dataset", "iwildcam", "--root_dir", root, "--no_pretrained",
                            *(small if tiny else []), *extra])
    args.backbone = backbone or args.backbone
    args.inner_lr = args.inner_lr or 1e-3  # not the pilots': speed does not depend on it
    device, cuda = torch.device(args.device), args.device == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as mabn.main
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = mabn.load_data(args)
    model, target = mabn.build_model(args, data, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=cuda)
    augment_fn = mabn.views_of(args, torch.Generator(device).manual_seed(0))
    warmup, timed = (1, 2) if tiny else (10, 50)

    def rate(step, images_per_step, n_warmup=warmup, n_timed=timed):  # img/s after n_warmup calls
        for _ in range(n_warmup):
            step()
        sync()
        t = time.time()
        for _ in range(n_timed):
            step()
        sync()
        return images_per_step * n_timed / (time.time() - t)

    model.train()  # (a): stage 1 fed by the loader against stage 1 fed from the device
    target.train()
    loader = mabn.make_loader(data["splits"]["train"].dataset, args.num_workers,
                              batch_size=args.batch_size, shuffle=True, drop_last=True)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # endless, epoch after epoch
    on_device = [(mabn.to_device(b[0], device), b[1].to(device))
                 for b in (next(batches) for _ in range(3))]
    B = args.batch_size

    def stage1_step(x, y):
        mabn.joint_step(model, target, opt, x, y, augment_fn, args.aux_weight, args.ema)

    resident = rate(lambda: stage1_step(*on_device[0]), B)

    def fed_step():
        batch = next(batches)
        stage1_step(mabn.to_device(batch[0], device), batch[1].to(device, non_blocking=True))

    ready = 2 * max(1, args.num_workers)  # batches the workers hold: drained, outnumbered
    fed = rate(fed_step, B, n_warmup=warmup + ready, n_timed=max(timed, 3 * ready))
    test, phis = data["splits"]["test"], {"stage2": mabn.split_params(model)[0]}  # (c): stage 3

    def stage3(row):  # the same loader and batches for both rows
        t = time.time()
        mabn.evaluate(model, target, phis, data, test, [row], args.n_adapt, args)
        return len(test.domains) / (time.time() - t)

    stage3("stage2")  # first pass: page cache and the workers' first start
    plain, adapted = stage3("stage2"), stage3("mabn")
    phi, frozen = mabn.split_params(model)  # (d): one episode, BN in eval mode, as in stage 2
    model.requires_grad_(False)
    for p in phi.values():
        p.requires_grad_(True)
    meta_opt = torch.optim.Adam(phi.values(), lr=1e-3, fused=cuda)
    S, Q = args.n_support, args.n_query
    x = torch.cat([b[0] for b in on_device] * math.ceil((S + Q) / (3 * B)))[:S + Q]
    y = torch.cat([b[1] for b in on_device] * math.ceil((S + Q) / (3 * B)))[:S + Q]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    episode = [(x[:S], x[S:], y[S:])]
    meta = rate(lambda: mabn.meta_step(model, phi, frozen, target, meta_opt, episode, augment_fn,
                                       inner_lr=args.inner_lr), S + Q, n_timed=max(2, timed // 5))
    peak = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None
    shutil.rmtree(root, ignore_errors=True)
    out = dict(fed_img_s=fed, resident_img_s=resident, a_fed_over_resident=fed / resident,
               plain_img_s=plain, stage3_img_s=adapted, c_stage3_over_plain=adapted / plain,
               meta_img_s=meta, d_meta_cost_per_image=resident / meta, d_peak_gib=peak)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    command = " ".join(["python test_mabn.py --speed"] + ["--tiny"] * tiny + list(extra))
    log(f"device {name}, torch {torch.__version__}, {args.num_workers} loader workers, fp32 (TF32: "
        f"{torch.backends.cuda.matmul.allow_tf32}), {args.backbone} at {args.img_size}, batch {B}, "
        f"episode {S}+{Q}; JPEGs {size[0]}x{size[1]} (written in {write_s:.0f} s); {command}")
    rows = [("(a) stage 1 fed by the loader / fed from the device", out["a_fed_over_resident"],
             ">= 0.90", f"{fed:.0f} vs {resident:.0f} img/s"),
            ("(c) stage 3 mabn / plain inference", out["c_stage3_over_plain"], ">= 0.80",
             f"{adapted:.0f} vs {plain:.0f} img/s, {len(test.by_domain)} domains"),
            ("(d) meta step / stage-1 step, per image", out["d_meta_cost_per_image"], "<= 4",
             f"{meta:.0f} vs {resident:.0f} img/s"),
            ("(d) peak memory of the meta steps, GiB", peak if cuda else float("nan"), "<= 80", "")]
    for what, value, goal, detail in rows:
        log(f"{what:<52} {value:8.3f}  {goal:>8}  {detail}")
    return out


# Each dataset's training split as published (WILDS 2.0; DomainNet: the five sources' train lists,
# target `real`; not counted here) and its number of classes: what a full run's cost comes from.
WILDS_SIZES = {"iwildcam": (129809, 182), "camelyon17": (302436, 2), "rxrx1": (40612, 1139),
               "fmow": (76863, 62), "poverty": (9797, 1), "domainnet": (288926, 345)}


def cost_probe(name, stage, n_support, n_query=0, img_size=None):
    """In a fresh process: the FLOPs (torch's FlopCounterMode) and the peak resident memory of ONE
    step at the dataset's full-size defaults on the CPU, random weights: stage 1's joint_step on
    n_support images, or the second-order meta_step on one n_support + n_query episode."""
    import resource

    from torch.utils.flop_counter import FlopCounterMode
    args = mabn.parse_args(["--dataset", name, "--no_pretrained"])
    args.img_size = img_size or args.img_size
    data = dict(n_outputs=WILDS_SIZES[name][1])
    model, target = mabn.build_model(args, data, torch.device("cpu"))
    augment_fn = mabn.views_of(args, torch.Generator().manual_seed(0))
    n = n_support + n_query
    x = torch.rand(n, args.in_channels, args.img_size, args.img_size)
    y = torch.rand(n) if args.task == "regression" else torch.randint(0, data["n_outputs"], (n,))
    counter = FlopCounterMode(display=False)
    if stage == 1:
        opt = torch.optim.Adam(model.parameters(), args.lr)
        with counter:
            mabn.joint_step(model, target, opt, x, y, augment_fn, task=args.task)
    else:
        model.eval()
        target.eval()
        model.requires_grad_(False)
        phi, frozen = mabn.split_params(model)
        for p in phi.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(phi.values(), 1e-3)
        episode = (x[:n_support], x[n_support:], y[n_support:])
        with counter:
            mabn.meta_step(model, phi, frozen, target, opt, [episode], augment_fn, inner_lr=1e-3,
                           task=args.task)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
    return {"flops": counter.get_total_flops(), "rss_gib": rss_gib}


def cost(names=tuple(WILDS_SIZES), log=print):
    """One seed's cost at each dataset's defaults, from one-step probes in fresh processes (python
    test_mabn.py --cost [NAME ...]). Costs are linear in a step's images: stage 1 on 2 and 6, the
    meta step on 2 + 2, 6 + 2, 2 + 6 give per-image slopes and the model's own memory. One seed =
    stage 1 (epochs x training images) + the pilots (--pilot_share x stage 2's meta steps) + stage
    2 (meta_epochs x training images // (support + query)); validation and stage 3 left out."""
    import subprocess
    out = {}
    for name in names:
        probes = {}
        for stage, n_support, n_query in ((1, 2, 0), (1, 6, 0), (2, 2, 2), (2, 6, 2), (2, 2, 6)):
            call = f"test_mabn.cost_probe({name!r}, {stage}, {n_support}, {n_query})"
            code = f"import json, test_mabn; print(json.dumps({call}))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            probes[stage, n_support, n_query] = json.loads(done.stdout.strip().splitlines()[-1])
        args = mabn.parse_args(["--dataset", name])

        def slope(a, b):
            return {k: (probes[b][k] - probes[a][k]) / 4 for k in ("flops", "rss_gib")}
        per_image_1 = slope((1, 2, 0), (1, 6, 0))
        per_support, per_query = slope((2, 2, 2), (2, 6, 2)), slope((2, 2, 2), (2, 2, 6))
        base_1 = probes[1, 2, 0]["rss_gib"] - 2 * per_image_1["rss_gib"]  # the model's own
        base_2 = probes[2, 2, 2]["rss_gib"] - 2 * per_support["rss_gib"] - 2 * per_query["rss_gib"]
        n_train = WILDS_SIZES[name][0]
        meta_step = args.n_support * per_support["flops"] + args.n_query * per_query["flops"]
        stage1 = args.epochs * n_train * per_image_1["flops"]
        steps2 = args.meta_epochs * (n_train // (args.n_support + args.n_query))
        stage2, pilot = steps2 * meta_step, args.pilot_share * steps2 * meta_step
        meta_gib = (base_2 + args.n_support * per_support["rss_gib"]
                    + args.n_query * per_query["rss_gib"])
        out[name] = dict(gflop_stage1_image=per_image_1["flops"] / 1e9,
                         gflop_support_image=per_support["flops"] / 1e9,
                         gflop_query_image=per_query["flops"] / 1e9,
                         flop_seed=stage1 + stage2 + pilot,
                         gib_stage1_step=base_1 + args.batch_size * per_image_1["rss_gib"],
                         gib_meta_step=meta_gib, flop_stage1=stage1, flop_stage2=stage2,
                         flop_pilot=pilot, stage2_steps=steps2)
        f = out[name]
        log(f"{name:<11} stage 1 {f['gflop_stage1_image']:6.0f} GFLOP/img, meta "
            f"{f['gflop_support_image']:5.0f} (support) {f['gflop_query_image']:5.0f} (query) "
            f"GFLOP/img | memory: stage-1 step ({args.batch_size}) {f['gib_stage1_step']:5.1f} "
            f"GiB, meta step ({args.n_support}+{args.n_query}) {meta_gib:5.1f} GiB | one seed "
            f"{f['flop_seed']:.2e} FLOP, stage 2 {steps2} meta steps")
    return out


DRIFTS = (0.1, 1.0, 10.0)  # the lr study's grid of delta x T


def lr_study(task, seed, meta_epochs=60, out="runs/lr_study", log=print):
    """The evidence for the choice of alpha and delta (python test_mabn.py --lr-study
    digits|gain-shift SEED [META_EPOCHS]; one thread): stage 1 as mabn.py trains it; the program's
    pilots (choose_lrs); the previous rule (pilots of 100 outer steps: alpha on 1e-4 .. 1 at delta
    1e-2, then delta on 1e-4, 1e-3, 1e-2; ties to the smaller); then a whole stage 2 from that
    stage 1 at every candidate (ALPHAS x DRIFTS, delta = drift / T) and at the previous rule's
    choice. Regret: the best stage-2 validation score of all these runs less the chosen one's."""
    import shutil
    logger = logging.getLogger("mabn")
    logger.setLevel(logging.INFO)
    logger.handlers = [logging.StreamHandler(sys.stdout)]
    where = os.path.join(out, task, f"seed{seed}")
    argv = ["--meta_epochs", str(meta_epochs), "--seeds", str(seed), "--methods", "stage2", "mabn"]
    if task == "gain-shift":
        base, data = gain_shift(argv)
    else:
        base = mabn.parse_args(["--dataset", task, *argv])
        data = mabn.load_data(base)

    def at(name, **kw):  # base's flags, with out_dir <where>/<name>
        args = mabn.with_flags(base, out_dir=os.path.join(where, name), **kw)
        os.makedirs(args.out_dir, exist_ok=True)
        return args
    torch.manual_seed(seed)  # stage 1 as run_seed trains it
    model, target = mabn.build_model(base, data, torch.device("cpu"))
    mabn.train_joint(model, target, data, at("stage1"))
    chosen = mabn.choose_lrs(model, target, data, at("pilots"))
    steps, scores = chosen["stage2_steps"], {}

    def previous(alpha, delta):  # a pilot of 4 x 25 outer steps, once
        if (alpha, delta) not in scores:
            out = mabn.pilot(model, target, data, at("previous"), alpha, delta, 25)
            scores[alpha, delta] = out["score"]
        return scores[alpha, delta]
    alpha = max((1e-4, 1e-3, 1e-2, 0.1, 1.0), key=lambda a: previous(a, 1e-2))
    delta = max((1e-4, 1e-3, 1e-2), key=lambda d: previous(alpha, d))

    def stage2_val(name, inner_lr, outer_lr):  # a whole run from that stage 1 -> stage 2's best
        args = at(name, inner_lr=inner_lr, outer_lr=outer_lr)
        os.makedirs(os.path.join(args.out_dir, f"seed{seed}"), exist_ok=True)
        shutil.copy(os.path.join(where, "stage1", "stage1.pt"),
                    os.path.join(args.out_dir, f"seed{seed}"))
        value = mabn.main(args, data)["per_seed"][0]["stages"]["stage2"]["val"]
        logger.handlers = [logging.StreamHandler(sys.stdout)]
        log(f"{task} seed {seed} {name}: stage-2 validation {value:.4f}")
        return value
    runs = {(a, c): stage2_val(f"alpha{a:g}_drift{c:g}", a, c / steps) for c in DRIFTS
            for a in mabn.ALPHAS}
    runs["previous"] = stage2_val(f"previous_alpha{alpha:g}_delta{delta:g}", alpha, delta)
    best = max(runs.values())
    mine = (chosen["inner_lr"], mabn.DRIFT)
    figures = dict(task=task, seed=seed, stage2_steps=steps, pilot_steps=chosen["pilot_steps"],
                   noise=chosen["noise"], runs={str(k): v for k, v in runs.items()}, chosen=mine,
                   regret=best - runs[mine], previous=(alpha, delta),
                   previous_regret=best - runs["previous"], pilots=chosen["candidates"])
    log(f"{task} seed {seed}: chosen alpha {mine[0]:g}, drift {mine[1]:g}, regret "
        f"{figures['regret']:.4f} (noise {figures['noise']:.4f}); the previous rule's alpha "
        f"{alpha:g}, delta {delta:g}, regret {figures['previous_regret']:.4f}")
    mabn.save_atomic(figures, os.path.join(where, "lr_study.json"))
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gain-shift"]:
        torch.set_num_threads(1)  # as the learning check
        mabn.main(*gain_shift(sys.argv[2:]))
    elif sys.argv[1:2] == ["--cost"]:
        cost(sys.argv[2:] or tuple(WILDS_SIZES))
    elif sys.argv[1:2] == ["--lr-study"]:
        torch.set_num_threads(1)
        lr_study(sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:5]))
    elif sys.argv[1:2] == ["--speed"]:
        speed(tiny="--tiny" in sys.argv, extra=[a for a in sys.argv[2:] if a != "--tiny"])
    else:
        sys.exit("usage: python test_mabn.py --speed [--tiny] | --cost [DATASET ...] | "
                 "--gain-shift "
                 "[mabn.py flags] | --lr-study digits|gain-shift SEED [META_EPOCHS]  (tests: "
                 "python -m pytest test_mabn.py)")
