"""Fast CPU checks of mabn.py on tiny synthetic domains: python -m pytest -q test_mabn.py"""
import copy
import functools
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
    """Every test on one CPU thread: on a machine with other work running, torch's default threads made the suite up
    to 10x slower, and one thread gives every test the same summation order on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, width=4, n_outputs=3, model_cls=mabn.MABNNet, make_target=mabn.make_target):
    torch.manual_seed(seed)
    backbone = nn.Sequential(mabn.normalizer(NORM, 3), mabn.build_backbone("small_resnet", 3, width=width)[0])
    model = model_cls(backbone, 4 * width, n_outputs, 16, 8)
    return model, make_target(model)


def trained_bn(model, target, n_batches=3):
    """Give BN running statistics and affine parameters non-trivial values, as after stage 1."""
    model.train()
    target.train()
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.rand(8, 3, 8, 8)
            model(x, aux=True)
            target(x)
        for p in mabn.split_params(model)[0].values():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    target.eval()
    return model, target


def fixed_aug(x):
    return x  # identity views: the BYOL loss stays non-trivial (online predictor vs target projector)


def jitter_aug(seed=0):
    return functools.partial(mabn.augment, gen=torch.Generator().manual_seed(seed), min_scale=0.8, jitter=0.2,
                             noise=0.05)


def make_synthetic(n_source=4, n_val=2, n_test=3, per_domain=24, size=8, n_classes=3, seed=0, gain=0.5):
    """Tiny multi-domain data. An image is a noisy dark field with a square at a random place; the class is the
    square's brightness level. Each domain multiplies its images by its own gain a = exp(U(-gain, gain)): a
    shift that the BN after the first conv undoes exactly (gamma / a), and one that no single model can ignore,
    since a bright level in a dim domain looks like a dimmer level in a bright one."""
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
        parts = ({"train": slice(0, per_domain * 3 // 4), "id_test": slice(per_domain * 3 // 4, None)}
                 if d < n_source else {("val" if d < n_source + n_val else "test"): slice(None)})
        for s, sl in parts.items():
            for lst, t in zip(splits[s], (x[sl], y[sl], dom[sl])):
                lst.append(t)
    out = {s: mabn.Split(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), torch.cat(ds), s)
           for s, (xs, ys, ds) in splits.items()}
    return dict(splits=out, n_outputs=n_classes, task="classification", in_channels=3, norm=NORM,
                val_metric="acc_avg", evaluate=lambda split, p, t: mabn.domain_metrics(p, t, split.domains))


def tiny_args(tmp_path, *extra):
    return mabn.parse_args(["--out_dir", str(tmp_path / "run"), "--epochs", "2", "--meta_epochs", "2",
                            "--batch_size", "16", "--n_support", "8", "--n_query", "8", "--n_adapt", "8",
                            "--inner_lr", "0.2", "--outer_lr", "0.01", *extra])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def flat_grad(loss, phi):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(phi.values()))])


# ----------------------------------------------------------------------------------------------------------
# The method block: copyable on its own, and the same computation as the pipeline's
# ----------------------------------------------------------------------------------------------------------
def method_block():
    """The text between BEGIN METHOD and END METHOD, executed in a fresh namespace that holds only what it imports."""
    lines = open(mabn.__file__).read().splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("#") and ("BEGIN METHOD" in line or
                                                                             "END METHOD" in line)]
    assert len(marks) == 2, marks
    block = "\n".join(lines[marks[0] + 1:marks[1]])
    roots = {line.split()[1].split(".")[0] for line in block.splitlines() if line.startswith(("import ", "from "))}
    assert roots <= {"torch"} | set(sys.stdlib_module_names), roots  # torch and the standard library only
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
    # Eq. (2): the whole network moves, the target by the EMA
    before, target_before = snapshot(model), snapshot(target)
    m["joint_step"](model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y, jitter_aug(), 0.1, 0.9)
    moved = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert "backbone.1.0.weight" in moved and "head.weight" in moved and "projector.0.weight" in moved
    assert any(not torch.equal(v, target_before[k]) for k, v in snapshot(target).items())
    # Eq. (3)-(4): one meta step with Adam moves only phi
    model.eval()
    target.eval()
    phi, frozen = m["split_params"](model)
    model.requires_grad_(False)
    for p in phi.values():
        p.requires_grad_(True)
    before = snapshot(model)
    m["meta_step"](model, phi, frozen, target, torch.optim.Adam(phi.values(), lr=0.01), [(x[:4], x[4:], y[4:])],
                   fixed_aug, inner_lr=0.5)
    moved = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert moved and moved <= set(phi)
    # Alg. 1 line 12: adapt one domain, predict it; the module is never mutated
    before = snapshot(model)
    adapted = m["adapt_domain"](model, phi, frozen, target, x[:4], jitter_aug(), 0.5)
    outputs = m["predict"](model, {**frozen, **adapted}, x)
    assert outputs.shape == (8, 3) and all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert not torch.allclose(outputs, m["predict"](model, {**frozen, **phi}, x))

    # The pipeline's own stage-2 step: record it, then recompute its gradient with the copied block alone
    recorded = []
    real_meta_step = mabn.meta_step

    def recording_meta_step(model, phi, frozen, target, opt, episodes, augment_fn, **kw):
        start = {k: v.detach().clone() for k, v in phi.items()}
        gen_state = augment_fn.keywords["gen"].get_state()
        out = real_meta_step(model, phi, frozen, target, opt, episodes, augment_fn, **kw)
        recorded.append((model, start, frozen, target, episodes, augment_fn, gen_state, kw,
                         {k: v.grad.clone() for k, v in phi.items()}))
        return out

    monkeypatch.setattr(mabn, "meta_step", recording_meta_step)
    args = tiny_args(tmp_path, "--max_steps", "1", "--inner_lr", "0.5", "--meta_batch", "2")
    mabn.main(args, make_synthetic())
    model, start, frozen, target, episodes, augment_fn, gen_state, kw, grads = recorded[0]
    phi = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    gen = torch.Generator().set_state(gen_state)
    aug_kw = {k: v for k, v in augment_fn.keywords.items() if k != "gen"}
    copied_aug = functools.partial(mabn.augment, gen=gen, **aug_kw)
    loss = sum(m["meta_loss"](model, phi, frozen, target, *episode, copied_aug, **kw)[0] for episode in episodes)
    assert kw["inner_lr"] == 0.5 and not kw["first_order"] and len(episodes) == 2  # B = 2: Alg. 1's summed L_B
    assert all(len(support_x) == 8 and len(query_x) == 8 for support_x, query_x, _ in episodes)
    assert torch.allclose(flat_grad(loss, phi), torch.cat([grads[k].flatten() for k in phi]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The method against the paper's equations written out by hand (plain torch, no mabn loss function)
# ----------------------------------------------------------------------------------------------------------
def scripted(*views):
    """An augment_fn that returns the given views in order: every view a test computes with is known."""
    queue = list(views)
    return lambda x: queue.pop(0)


def by_hand(model, target, params, x, y, v1, v2):
    """L_main on the clean images, and BYOL with view 1's prediction against view 2's target projection and back."""
    def online(v):  # predictor(projector(backbone(v)))
        return functional_call(model, params, (v,), {"aux": True})[1]

    with torch.no_grad():
        z1, z2 = target(v1), target(v2)
    cos = torch.nn.functional.cosine_similarity
    aux = ((2 - 2 * cos(online(v1), z2, dim=-1)) + (2 - 2 * cos(online(v2), z1, dim=-1))).mean()
    main = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y) if y is not None else None
    return main, aux


def episode(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen), x.flip(-1), 0.5 * x + 0.2 * torch.rand(x.shape, generator=gen)


def test_eq2_losses_and_step_by_hand():
    model, target = trained_bn(*tiny_model())
    x, y, v1, v2 = episode()
    main, aux = mabn.joint_losses(model, None, target, x, y, scripted(v1, v2))
    hand_main, hand_aux = by_hand(model, target, {}, x, y, v1, v2)
    assert torch.allclose(main, hand_main, atol=1e-6) and torch.allclose(aux, hand_aux, atol=1e-6)
    params = dict(model.named_parameters())
    g_main = torch.autograd.grad(hand_main, list(params.values()), allow_unused=True)
    g_aux = torch.autograd.grad(by_hand(model, target, {}, x, y, v1, v2)[1], list(params.values()), allow_unused=True)
    before = {k: v.detach().clone() for k, v in params.items()}
    mabn.joint_step(model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y, scripted(v1, v2), aux_weight=0.3)
    for (k, p), gm, ga in zip(params.items(), g_main, g_aux):  # Eq. (2): theta - lr (grad L_main + lambda grad L_aux)
        expected = before[k] - 0.1 * ((gm if gm is not None else 0) + 0.3 * (ga if ga is not None else 0))
        assert torch.allclose(p.detach(), expected, atol=1e-6), k
    model, target = trained_bn(*tiny_model())  # the paper's defaults: lambda = 0.1, tau = 0.99
    params, target_before = dict(model.named_parameters()), snapshot(target)
    main, aux = by_hand(model, target, {}, x, y, v1, v2)
    grads = torch.autograd.grad(main + 0.1 * aux, list(params.values()), allow_unused=True)
    before = {k: v.detach().clone() for k, v in params.items()}
    mabn.joint_step(model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y, scripted(v1, v2))
    for (k, p), g in zip(params.items(), grads):
        assert torch.allclose(p.detach(), before[k] - 0.1 * (g if g is not None else 0), atol=1e-6), k
    online = dict(model.backbone.named_parameters(prefix="0"))
    online.update(model.projector.named_parameters(prefix="1"))
    for name, q in target.named_parameters():
        assert torch.allclose(q, 0.99 * target_before[name] + 0.01 * online[name].detach(), atol=1e-6), name


def test_eq3_inner_step_and_domain_adaptation_by_hand():
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    s, _, v1, v2 = episode(1)
    grads = torch.autograd.grad(by_hand(model, target, {**frozen, **phi}, s, None, v1, v2)[1], list(phi.values()))
    expected = {k: v - 0.7 * g for (k, v), g in zip(phi.items(), grads)}  # Eq. (3): phi - alpha grad L_aux(S)
    adapted = mabn.inner_step(model, phi, frozen, target, s, scripted(v1, v2), inner_lr=0.7)
    assert all(torch.allclose(adapted[k], expected[k], atol=1e-6) for k in phi)
    adapted = mabn.adapt_domain(model, phi, frozen, target, s, scripted(v1, v2), inner_lr=0.7)
    assert all(torch.allclose(adapted[k], expected[k], atol=1e-6) for k in phi)
    with torch.no_grad():  # Alg. 1 line 12: the main head with phi~ and the source statistics
        hand = functional_call(model, {**frozen, **{k: v.detach() for k, v in expected.items()}}, (s,))
    assert torch.allclose(mabn.predict(model, {**frozen, **adapted}, s), hand, atol=1e-6)


def test_eq4_objective_gradient_and_meta_step_by_hand():
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    s, _, sv1, sv2 = episode(1)
    q, qy, qv1, qv2 = episode(2)

    def objective(phi, steps=1, first_order=False, aux_weight=0.3):  # L_main(Q; phi~) + lambda L_aux(Q; phi~)
        adapted = dict(phi)
        for _ in range(steps):  # phi~ = phi - alpha grad L_aux(S; phi), a constant gradient when first order
            aux_s = by_hand(model, target, {**frozen, **adapted}, s, None, sv1, sv2)[1]
            grads = torch.autograd.grad(aux_s, list(adapted.values()), create_graph=not first_order)
            adapted = {k: v - 0.7 * g for (k, v), g in zip(adapted.items(), grads)}
        main_q, aux_q = by_hand(model, target, {**frozen, **adapted}, q, qy, qv1, qv2)
        return main_q + aux_weight * aux_q

    for steps, first_order in ((1, False), (2, False), (1, True)):
        views = [sv1, sv2] * steps + [qv1, qv2]
        loss = mabn.meta_loss(model, phi, frozen, target, s, q, qy, scripted(*views), inner_lr=0.7, aux_weight=0.3,
                              inner_steps=steps, first_order=first_order)[0]
        hand = objective(phi, steps, first_order)
        assert torch.allclose(loss, hand, atol=1e-6)
        assert torch.allclose(flat_grad(loss, phi), flat_grad(objective(phi, steps, first_order), phi), atol=1e-6)
    default = mabn.meta_loss(model, phi, frozen, target, s, q, qy, scripted(sv1, sv2, qv1, qv2), inner_lr=0.7)[0]
    assert torch.allclose(default, objective(phi, aux_weight=0.1), atol=1e-6)  # lambda = 0.1, the paper's
    adapted = mabn.inner_step(model, phi, frozen, target, s, scripted(sv1, sv2), 0.7)  # second order by default
    main_q, aux_q = by_hand(model, target, {**frozen, **adapted}, q, qy, qv1, qv2)
    hand_grad = flat_grad(objective(phi), phi)
    assert torch.allclose(flat_grad(main_q + 0.3 * aux_q, phi), hand_grad, atol=1e-6)
    start = {k: v.detach().clone() for k, v in phi.items()}
    mabn.meta_step(model, phi, frozen, target, torch.optim.SGD(phi.values(), lr=0.05), [(s, q, qy)],
                   scripted(sv1, sv2, qv1, qv2), inner_lr=0.7, aux_weight=0.3)
    moved = torch.cat([(phi[k].detach() - start[k]).flatten() for k in phi])
    assert torch.allclose(moved, -0.05 * hand_grad, atol=1e-6)  # Eq. (4): phi - beta d objective / d phi


def test_meta_gradient_matches_finite_differences():
    model, target = trained_bn(*tiny_model(width=2))
    model.double()
    target.double()
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    gen = torch.Generator().manual_seed(1)
    support_x, query_x = (torch.rand(6, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    query_y = torch.randint(0, 3, (6,), generator=gen)

    def loss_at(p, first_order=False):
        return mabn.meta_loss(model, p, frozen, target, support_x, query_x, query_y, fixed_aug, inner_lr=0.5,
                              inner_steps=2, first_order=first_order)[0]

    flat, flat_fo = flat_grad(loss_at(phi), phi), flat_grad(loss_at(phi, True), phi)
    coords = [(k, i) for k, v in phi.items() for i in range(v.numel())]
    coords = [coords[j] for j in torch.randperm(len(coords), generator=gen)[:40]]  # 40 random coordinates
    numeric, eps = [], 1e-6
    for k, i in coords:
        delta = torch.zeros(phi[k].numel(), dtype=torch.float64)
        delta[i] = eps
        moved = [{**phi, k: (phi[k].detach().flatten() + sign * delta).view_as(phi[k])} for sign in (1, -1)]
        moved = [{n: t.detach().requires_grad_(True) for n, t in m.items()} for m in moved]
        numeric.append((loss_at(moved[0]) - loss_at(moved[1])).detach() / (2 * eps))
    offsets = dict(zip(phi, torch.tensor([0] + [v.numel() for v in phi.values()]).cumsum(0).tolist()))
    picked = torch.tensor([offsets[k] + i for k, i in coords])
    assert torch.allclose(flat[picked], torch.stack(numeric), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(flat_fo[picked], torch.stack(numeric), rtol=1e-2, atol=1e-5)  # first order drops a term


def test_regression_main_loss_by_hand():
    """PovertyMap is a regression: L_main is the mean squared error of the single output wherever it is computed."""
    model, target = trained_bn(*tiny_model(n_outputs=1))
    x, labels, v1, v2 = episode()
    y = torch.rand(6)
    with torch.no_grad():
        hand = ((model(x).view(-1) - y) ** 2).mean()
        logits = torch.randn(6, 3)
        cross_entropy = -logits.log_softmax(-1)[torch.arange(6), labels].mean()
    assert torch.allclose(mabn.main_loss(model(x), y, "regression"), hand, atol=1e-6)
    assert torch.allclose(mabn.main_loss(logits, labels), cross_entropy, atol=1e-6)  # classification by default
    assert torch.allclose(mabn.joint_losses(model, None, target, x, y, scripted(v1, v2), "regression")[0], hand,
                          atol=1e-6)
    phi, frozen = mabn.split_params(model)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    query_main = mabn.meta_loss(model, phi, frozen, target, x, x, y, scripted(v1, v2, v1, v2), inner_lr=1e-9,
                                task="regression")[1]  # phi~ = phi: the query's main loss is the MSE at phi
    assert torch.allclose(query_main, hand, atol=1e-5)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(((model(x).view(-1) - y) ** 2).mean(), list(params.values()), allow_unused=True)
    before = {k: v.detach().clone() for k, v in params.items()}
    mabn.joint_step(model, target, torch.optim.SGD(model.parameters(), lr=0.1), x, y, scripted(v1, v2), 0.0, 0.9,
                    "regression")
    for (k, p), g in zip(params.items(), grads):
        assert torch.allclose(p.detach(), before[k] - 0.1 * (g if g is not None else 0), atol=1e-6), k


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
    """METHOD.md's model: BYOL's MLPs are Linear -> BN -> ReLU -> Linear, 4096 -> 256 wide by default; the target is
    gradient-free; phi is the weight and the bias of every BatchNorm, and nothing else."""
    assert [type(m) for m in mabn.mlp(4, 8, 2)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = mabn.MABNNet(backbone, 4, 3)
    widths = (model.projector[0].out_features, model.projector[3].out_features, model.predictor[3].out_features)
    assert widths == (4096, 256, 256)
    assert not any(p.requires_grad for p in mabn.make_target(model).parameters())
    model, _ = tiny_model()
    phi, frozen = mabn.split_params(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert set(phi) == {f"{n}.{p}" for n in bns for p in ("weight", "bias")} and len(bns) == 11
    assert set(frozen) == set(model.state_dict()) - set(phi)
    calls = []  # the inner step runs the online network on the two views only: 2k images, not 3k
    model.backbone.register_forward_hook(lambda mod, inputs, out: calls.append(len(inputs[0])))
    mabn.inner_step(model.eval(), phi, frozen, tiny_model()[1].eval(), torch.rand(5, 3, 8, 8), fixed_aug, 0.1)
    assert calls == [10]


def test_functional_call_matches_module():
    model, _ = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        logits, pred = model(x, aux=True)
        f_logits, f_pred = functional_call(model, {**frozen, **phi}, (x,), {"aux": True})
    assert torch.equal(logits, f_logits) and torch.equal(pred, f_pred)
    shifted = {k: v + 1.0 for k, v in phi.items()}  # and the tensors passed in are really the ones used
    assert not torch.allclose(mabn.predict(model, {**frozen, **shifted}, x), logits)


# ----------------------------------------------------------------------------------------------------------
# Stage 1, and model selection and resume in both stages, on a validation sequence under the test's control
# ----------------------------------------------------------------------------------------------------------
def test_stage1_learning_rate_halves_from_lr_decay_epoch(tmp_path, monkeypatch):
    lrs = []
    real_joint_step = mabn.joint_step

    def recording(model, target, opt, *args):
        lrs.append(opt.param_groups[0]["lr"])
        return real_joint_step(model, target, opt, *args)

    monkeypatch.setattr(mabn, "joint_step", recording)
    args = tiny_args(tmp_path, "--epochs", "3", "--lr_decay_epoch", "1", "--lr", "0.004", "--meta_epochs", "0")
    mabn.main(args, make_synthetic())
    per_epoch = len(lrs) // 3
    assert len(lrs) == 3 * per_epoch and set(lrs[:per_epoch]) == {0.004} and set(lrs[per_epoch:]) == {0.002}


def scripted_validation(monkeypatch, scores, states, first_epoch=None, targets=None):
    """Stage s's epoch e scores scores[s][e] on the validation domains; the model's state then goes to states[s] (and
    the BYOL target's to targets[s])."""
    real_evaluate = mabn.evaluate
    epoch = dict(first_epoch or {1: 0, 2: 0})

    def evaluate(model, target, phis, data, split, rows, *args, **kw):
        if split.name != "val":
            return real_evaluate(model, target, phis, data, split, rows, *args, **kw)
        stage = 1 if "stage1" in phis else 2
        states[stage].append(snapshot(model))
        if targets is not None:
            targets[stage].append(snapshot(target))
        epoch[stage] += 1
        return {rows[0]: {"acc_avg": scores[stage][epoch[stage] - 1]}}

    monkeypatch.setattr(mabn, "evaluate", evaluate)


def final_checkpoints(out_dir, key="model"):
    return [torch.load(os.path.join(out_dir, "seed0", f"stage{s}.pt"), weights_only=True)[key] for s in (1, 2)]


def test_model_selection_keeps_the_best_epoch_and_resume_restores_it(tmp_path, monkeypatch):
    """Four epochs a stage, the third scoring best: model selection keeps it (and stage 1's BYOL target of it); a run
    killed after the second epoch's checkpoint resumes into that best third epoch, whose state depends on the
    restored Adam state and random generators, and ends with the uninterrupted run's final checkpoints."""
    data, scores = make_synthetic(), {1: [0.5, 0.8, 0.9, 0.2], 2: [0.3, 0.8, 0.9, 0.1]}
    states, targets = {1: [], 2: []}, {1: [], 2: []}
    scripted_validation(monkeypatch, scores, states, targets=targets)
    epochs = ["--epochs", "4", "--meta_epochs", "4"]
    args = tiny_args(tmp_path, *epochs, "--out_dir", str(tmp_path / "whole"))
    mabn.main(args, data)
    stage1, stage2 = final_checkpoints(args.out_dir)
    assert all(torch.equal(stage1[k], states[1][2][k]) for k in stage1)  # epoch 3 of stage 1 scored best
    assert not all(torch.equal(stage1[k], states[1][3][k]) for k in stage1)  # the last epoch was not the best
    target1 = final_checkpoints(args.out_dir, "target")[0]  # and its BYOL target is kept with it, not the last one
    assert all(torch.equal(target1[k], targets[1][2][k]) for k in target1)
    assert not all(torch.equal(target1[k], targets[1][3][k]) for k in target1)
    phi_names = set(mabn.split_params(tiny_model()[0])[0])
    assert all(torch.equal(stage2[k], states[2][2][k] if k in phi_names else stage1[k]) for k in stage2)
    assert not all(torch.equal(stage2[k], states[2][3][k]) for k in phi_names)
    for stage in (1, 2):  # die after the second epoch's checkpoint of this stage, rerun: the same final models
        real_save, saves = mabn.save_atomic, []

        def save_then_die(obj, path):
            real_save(obj, path)
            saves.append(obj.get("stage") if isinstance(obj, dict) else None)
            if saves.count(stage) == 2 and obj.get("done") is False:
                raise KeyboardInterrupt

        out = str(tmp_path / f"killed{stage}")
        scripted_validation(monkeypatch, scores, {1: [], 2: []})
        monkeypatch.setattr(mabn, "save_atomic", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            mabn.main(tiny_args(tmp_path, *epochs, "--out_dir", out), data)
        monkeypatch.setattr(mabn, "save_atomic", real_save)
        resumed_from = {1: 2, 2: 0} if stage == 1 else {1: 4, 2: 2}  # the epochs the rerun still validates
        scripted_validation(monkeypatch, scores, {1: [], 2: []}, first_epoch=resumed_from)
        mabn.main(tiny_args(tmp_path, *epochs, "--out_dir", out), data)
        for whole, resumed in zip((stage1, stage2), final_checkpoints(out)):
            assert all(torch.equal(whole[k], resumed[k]) for k in whole), stage


# ----------------------------------------------------------------------------------------------------------
# Stage 2: only the BN affine moves; Algorithm 1's meta batches; the pilot for alpha and delta; the control row
# ----------------------------------------------------------------------------------------------------------
def test_stage2_changes_only_bn_affine(tmp_path):
    args = tiny_args(tmp_path, "--max_steps", "3", "--outer_lr", "0.05")
    os.makedirs(args.out_dir)
    model, target = tiny_model()
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 8, 8), aux=True)  # running statistics away from their initial values
    before = snapshot(model)
    out = mabn.train_meta(model, target, make_synthetic(), args)
    assert out["steps"] == 3
    changed = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(mabn.split_params(model)[0])
    assert any(k.endswith("running_mean") for k in before)  # the statistics were compared too


def test_stage2_stops_when_bn_leaves_eval_mode(tmp_path, monkeypatch):
    """Stage 2 rests on BN in eval mode (stage 1's statistics, never updated): a step, or a validation pass, that
    leaves the model or its BYOL target training is caught before the next step could update the statistics."""
    for name, part in (("meta_step", 0), ("evaluate", 1), ("meta_step", 3)):  # model, target; target
        real = getattr(mabn, name)

        def leaves_training(*args, real=real, part=part, **kw):
            out = real(*args, **kw)
            args[part].train()
            return out

        monkeypatch.setattr(mabn, name, leaves_training)
        args = tiny_args(tmp_path, "--meta_epochs", "2", "--out_dir", str(tmp_path / f"{name}{part}"))
        os.makedirs(args.out_dir)
        model, target = tiny_model()
        with pytest.raises(AssertionError, match="eval mode"):
            mabn.train_meta(model, target, make_synthetic(), args)
        monkeypatch.setattr(mabn, name, real)


def test_meta_batches_of_distinct_uniform_domains_each_with_disjoint_support_and_query(tmp_path):
    domains = torch.tensor([0] * 60 + [1] * 10 + [2] * 5 + [3])
    index = torch.arange(len(domains))  # each image is its own index, to read back which images an episode took
    split = mabn.Split(torch.utils.data.TensorDataset(index.float().view(-1, 1, 1, 1), index), domains, "train")
    args = tiny_args(tmp_path, "--n_support", "8", "--n_query", "6", "--meta_batch", "2")
    counts = {0: 0, 1: 0, 2: 0}
    for meta_batch in mabn.meta_batches(split, args, 600, torch.Generator().manual_seed(0), torch.device("cpu")):
        drawn = []
        for support_x, query_x, query_y in meta_batch:  # Alg. 1: B = 2 episodes per outer step
            support, query = support_x.flatten().long().tolist(), query_x.flatten().long().tolist()
            assert query == query_y.tolist()  # the query's labels are its own images'
            d = int(domains[support[0]])
            size = min(14, {0: 60, 1: 10, 2: 5}[d])  # smaller domains give all they have
            assert len(set(support + query)) == len(support + query) == size  # support and query disjoint
            assert len(support) == round(size * 8 / 14) and {int(domains[i]) for i in support + query} == {d}
            drawn.append(d)
            counts[d] += 1
        assert len(drawn) == 2 and drawn[0] != drawn[1]  # distinct domains
    # uniform over the domains (each in 2 of 3 steps: 400), not in proportion to their size (domain 0: ~580)
    assert sum(counts.values()) == 1200 and all(abs(n - 400) < 60 for n in counts.values()), counts
    args.meta_batch = 5  # more than the 3 domains with two images or more (domain 3 is skipped): B is capped
    assert [len(b) for b in mabn.meta_batches(split, args, 4, torch.Generator(), torch.device("cpu"))] == [3] * 4


def test_pilot_chooses_alpha_then_delta_on_validation_and_a_given_value_wins(tmp_path, monkeypatch):
    data = make_synthetic()
    real_evaluate, real_train_meta = mabn.evaluate, mabn.train_meta
    phi_at_stage2 = []

    def evaluate(model, target, phis, data, split, rows, ks, args, *rest, **kw):  # validation: a known optimum
        if split.name != "val":
            return real_evaluate(model, target, phis, data, split, rows, ks, args, *rest, **kw)
        alpha, delta = math.log10(args.inner_lr or 1), math.log10(args.outer_lr or 1)
        return {rows[0]: {"acc_avg": -(alpha + 2) ** 2 - (delta + 2) ** 2}}  # best: alpha 1e-2, delta 1e-2

    def train_meta(model, *rest, **kw):
        phi_at_stage2.append(mabn.clone_phi(model))
        return real_train_meta(model, *rest, **kw)

    monkeypatch.setattr(mabn, "evaluate", evaluate)
    monkeypatch.setattr(mabn, "train_meta", train_meta)
    for extra, expected, n_candidates in (([], (1e-2, 1e-2), 7), (["--inner_lr", "0.3"], (0.3, 1e-2), 3),
                                          (["--inner_lr", "0.3", "--outer_lr", "0.05"], (0.3, 0.05), 0)):
        args = mabn.parse_args(["--out_dir", str(tmp_path / str(len(extra))), "--epochs", "1", "--meta_epochs", "1",
                                "--batch_size", "16", "--n_support", "8", "--n_query", "8", "--n_adapt", "8",
                                "--pilot_steps", "2", *extra])
        out = mabn.main(args, data)["per_seed"][0]
        assert (out["pilot"]["inner_lr"], out["pilot"]["outer_lr"]) == expected
        assert (out["flags"]["inner_lr"], out["flags"]["outer_lr"]) == expected  # what stage 2 and 3 ran with
        assert len(out["pilot"]["candidates"]) == n_candidates
        if not extra:  # alpha on the grid at the largest delta, then delta at the chosen alpha; every score kept
            tried = [(c["inner_lr"], c["outer_lr"]) for c in out["pilot"]["candidates"]]
            assert tried == [(a, 1e-2) for a in mabn.ALPHAS] + [(1e-2, 1e-4), (1e-2, 1e-3)]
            saved = json.load(open(os.path.join(args.out_dir, "seed0", "results.json")))
            assert saved["pilot"]["candidates"][0]["score"] == -(-4 + 2) ** 2
            assert os.path.exists(os.path.join(args.out_dir, "seed0", "pilot_alpha0.0001_delta0.01.pt"))
            steps = []  # a rerun reuses the finished pilots: the same choice, without a single meta step
            real_meta_step = mabn.meta_step

            def counting_meta_step(*a, **kw):
                steps.append(1)
                return real_meta_step(*a, **kw)

            monkeypatch.setattr(mabn, "meta_step", counting_meta_step)
            again = mabn.main(args, data)["per_seed"][0]["pilot"]
            monkeypatch.setattr(mabn, "meta_step", real_meta_step)
            assert again == out["pilot"] and steps == []
        stage1 = torch.load(os.path.join(args.out_dir, "seed0", "stage1.pt"), weights_only=True)["model"]
        assert all(torch.equal(v, stage1[k]) for k, v in phi_at_stage2[-1].items())  # the pilot leaves the model alone


def test_control_row_is_stage2_without_the_inner_step_from_stage1(tmp_path, monkeypatch):
    """no_inner: a second stage 2 with alpha = 0 (phi fine-tuned on the joint loss), from stage 1's phi like stage 2
    proper, predicted without adaptation."""
    data = make_synthetic()
    runs, phis_seen = [], []
    real_train_joint, real_train_meta, real_evaluate = mabn.train_joint, mabn.train_meta, mabn.evaluate

    def train_joint(model, target, data, args):
        runs.append(("stage1", args.inner_lr, args.first_order, mabn.clone_phi(model)))
        return real_train_joint(model, target, data, args)

    def train_meta(model, target, data, args, name="stage2"):
        runs.append((name, args.inner_lr, args.first_order, mabn.clone_phi(model)))
        return real_train_meta(model, target, data, args, name)

    def evaluate(model, target, phis, data, split, *rest, **kw):
        if split.name == "test":
            phis_seen.append({start: {k: v.clone() for k, v in phi.items()} for start, phi in phis.items()})
        return real_evaluate(model, target, phis, data, split, *rest, **kw)

    monkeypatch.setattr(mabn, "train_joint", train_joint)
    monkeypatch.setattr(mabn, "train_meta", train_meta)
    monkeypatch.setattr(mabn, "evaluate", evaluate)
    args = tiny_args(tmp_path, "--methods", "no_inner", "none", "mabn", "--inner_lr", "0.5")
    out = mabn.main(args, data)["per_seed"][0]
    assert [(name, lr, first) for name, lr, first, _ in runs] == [("stage1", 0.5, False), ("stage2_alpha0", 0.0, True),
                                                                  ("stage2", 0.5, False)]  # (alpha 0: first order)
    ckpt = {name: torch.load(os.path.join(args.out_dir, "seed0", f"{name}.pt"), weights_only=True)["model"]
            for name in ("stage1", "stage2_alpha0", "stage2")}
    for name, _, _, start in runs[1:]:  # both stage-2 runs start from stage 1's phi
        assert all(torch.equal(start[k], ckpt["stage1"][k]) for k in start), name
    (phis,) = phis_seen
    assert all(torch.equal(phis["meta0"][k], ckpt["stage2_alpha0"][k]) for k in phis["meta0"])
    assert all(torch.equal(phis["meta"][k], ckpt["stage2"][k]) for k in phis["meta"])
    assert not all(torch.equal(phis["meta0"][k], phis["meta"][k]) for k in phis["meta"])
    assert "no_inner" in out["target"] and "stage2_alpha0" in out["stages"]


# ----------------------------------------------------------------------------------------------------------
# Stage 3 and the rows of the paper's analyses
# ----------------------------------------------------------------------------------------------------------
def phis_of(model):
    phi = mabn.split_params(model)[0]
    return {"stage1": {k: v + 0.05 for k, v in phi.items()}, "meta": phi,
            "meta0": {k: v - 0.05 for k, v in phi.items()}}


def record_row_params(monkeypatch):
    """-> the list that mabn.row_params' calls fill, (row, the tensors it starts a domain with), domain after domain."""
    made = []
    real_row_params = mabn.row_params

    def recording(row, *args):
        made.append((row, real_row_params(row, *args)))
        return made[-1][1]

    monkeypatch.setattr(mabn, "row_params", recording)
    return made


def test_adapt_domain_changes_only_bn_affine():
    model, target = trained_bn(*tiny_model())
    before, target_before = snapshot(model), snapshot(target)
    phi, frozen = mabn.split_params(model)
    adapted = mabn.adapt_domain(model, phi, frozen, target, torch.rand(8, 3, 8, 8), jitter_aug(), inner_lr=0.5, steps=2)
    assert set(adapted) == set(phi) and any("backbone" in k for k in adapted) and any("projector" in k for k in adapted)
    assert all(k.endswith((".weight", ".bias")) for k in phi) and not any(k.startswith("head.") for k in phi)
    assert any(not torch.equal(adapted[k], phi[k]) for k in adapted)  # it did adapt something
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # weights, statistics, affine
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
        getattr(model, name).register_forward_hook(lambda *a, name=name: calls.update({name: calls[name] + 1}))
    phis = phis_of(model)
    mabn.evaluate(model, target, phis, data, data["splits"]["test"], ["none", "stage1", "bn_stats"], [4], args)
    assert calls == {"projector": 0, "predictor": 0}
    mabn.evaluate(model, target, phis, data, data["splits"]["test"], ["mabn"], [4], args)
    n_steps = len(data["splits"]["test"].by_domain) * args.inner_steps  # one online forward per inner step
    assert calls == {"projector": n_steps, "predictor": n_steps}


def test_support_sets_are_drawn_per_seed_and_domain_or_first_k_on_request(tmp_path):
    split = make_synthetic(per_domain=30)["splits"]["test"]
    args = tiny_args(tmp_path)
    drawn = mabn.support_sets(split, 8, args.seed, args.support)
    assert drawn == mabn.support_sets(split, 8, args.seed, args.support)  # a seeded draw
    positions = []
    for d, idx in split.by_domain.items():
        assert len(set(drawn[d])) == 8 and set(drawn[d]) <= set(idx)
        positions.append([idx.index(i) for i in drawn[d]])
    assert positions[0] != [0, 1, 2, 3, 4, 5, 6, 7] and positions[0] != positions[1]  # random, each domain its own
    args.seed = 1
    assert all(drawn[d] != other for d, other in mabn.support_sets(split, 8, args.seed, args.support).items())  # another seed
    args.support = "first"  # Meta-DMoE's protocol
    assert mabn.support_sets(split, 8, args.seed, args.support) == {d: idx[:8] for d, idx in split.by_domain.items()}


def test_every_row_runs_on_the_same_support_sets(tmp_path, monkeypatch):
    data = make_synthetic()
    used = []  # (function, support set) for every adaptation

    def recording(name, position):  # mabn.<name>, noting its support-set argument at each call
        real = getattr(mabn, name)

        def wrapper(*a, **kw):
            used.append((name, a[position]))
            return real(*a, **kw)
        monkeypatch.setattr(mabn, name, wrapper)

    for name, position in (("adapt_domain", 4), ("reestimate_bn_stats", 2)):
        recording(name, position)
    args = tiny_args(tmp_path, "--methods", "all", "--n_adapt", "8", "4", "--seeds", "0", "1", "--epochs", "1",
                     "--meta_epochs", "1")
    out = mabn.main(args, data)
    with_k = [r for r in mabn.ROWS if mabn.ROWS[r].uses_support]
    assert set(with_k) == {"bn_stats", "no_meta", "mabn", "mabn_bn", "mabn_tent_bn", "mabn_tent_affine",
                           "mabn_unmatched"}
    for result in out["per_seed"]:
        assert set(result["target"]) == set(mabn.ROWS) - set(with_k) | {f"{r}@{k}" for r in with_k for k in (8, 4)}
    test = data["splits"]["test"]
    expected = {}  # (seed, k, domain) -> the images of its support set
    for seed in (0, 1):
        args.seed = seed
        for d, idx in mabn.support_sets(test, 8, args.seed, args.support).items():
            for k in (4, 8):
                expected[seed, k, d] = test.dataset.tensors[0][idx[:k]]  # nested: k = 4 takes the first 4 of 8
    seen = {name: set() for name, _ in used}
    for name, support_x in used:
        seen[name] |= {key for key, x in expected.items() if x.shape == support_x.shape and torch.equal(x, support_x)}
    assert all(s == set(expected) for s in seen.values()), seen


# What the README says each row does: (starts from, BN statistics, rule); written here, not read from mabn.ROWS.
README_ROWS = {"stage1": ("stage1", "source", None), "bn_stats": ("stage1", "support", None),
               "tent_bn": ("stage1", "batch", "tent"), "tent_affine": ("stage1", "source", "tent"),
               "no_meta": ("stage1", "source", "mabn"), "no_inner": ("meta0", "source", None),
               "none": ("meta", "source", None), "mabn": ("meta", "source", "mabn"),
               "mabn_bn": ("meta", "support", "mabn"), "mabn_tent_bn": ("meta", "batch", "mabn+tent"),
               "mabn_tent_affine": ("meta", "source", "mabn+tent"), "mabn_unmatched": ("meta", "source", "unmatched")}


@pytest.mark.parametrize("row", list(README_ROWS))
def test_every_row_starts_and_adapts_as_the_readme_says(row):
    model, target = trained_bn(*tiny_model())
    phi, frozen = mabn.split_params(model)
    gen = torch.Generator().manual_seed(3)
    phis = {name: {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in phi.items()}
            for name in ("stage1", "meta0")}
    phis["meta"] = phi
    support_x, args = 2 * torch.rand(6, 3, 8, 8, generator=gen), mabn.parse_args(["--inner_lr", "0.5"])
    start, stats, rule = README_ROWS[row]
    params = mabn.row_params(row, model, target, phis, frozen, support_x, fixed_aug, args.inner_lr, args.inner_steps)
    assert mabn.ROWS == README_ROWS
    # statistics: stage 1's, the support set's (the first BN sees the first conv's output), or none at all: "batch"
    # rows normalise each batch with its own (test_batch_statistics_normalise_every_layer_with_the_batchs_own)
    first_in = model.backbone[1][0](model.backbone[0](support_x))
    if stats == "batch":
        assert params["backbone.1.1.running_mean"] is None and params["projector.1.running_mean"] is not None
    else:
        expected_mean = first_in.mean((0, 2, 3)) if stats == "support" else frozen["backbone.1.1.running_mean"]
        assert torch.allclose(params["backbone.1.1.running_mean"], expected_mean, atol=1e-5)
    # the affine: from phis[start], with MABN's step (Eq. 3) where the rule has one, taken with the statistics the
    # row's MABN uses: stage 1's, or the support set's (MABN's "update BN", also before TENT's in mabn_tent_bn).
    # Unmatched takes MABN's step on the support set evaluate hands it, another domain's (the test after next).
    expected = phis[start]
    if rule in ("mabn", "mabn+tent", "unmatched"):
        step_stats = dict(frozen)
        if stats != "source":
            step_stats.update(mabn.reestimate_bn_stats(model, {**frozen, **expected}, support_x))
        expected = mabn.adapt_domain(model, expected, step_stats, target, support_x, fixed_aug, 0.5)
        assert not all(torch.equal(params[k], phis[start][k]) for k in phi)  # and the rule did move it
    # TENT's rows adapt later, online, on the test batches
    assert all(torch.equal(params[k], expected[k].detach()) for k in phi)


def test_one_pass_for_all_rows_equals_one_pass_each(tmp_path):
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    args = tiny_args(tmp_path, "--eval_batch_size", "7", "--n_adapt", "5")
    split, phis = data["splits"]["test"], phis_of(model)
    before, target_before = snapshot(model), snapshot(target)
    together = mabn.evaluate(model, target, phis, data, split, list(mabn.ROWS), [5], args)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())  # every row, TENT's too, leaves the
    assert all(torch.equal(v, target_before[k]) for k, v in snapshot(target).items())  # modules as they were
    for row in mabn.ROWS:  # (with the row it compares with for "changed")
        plain = mabn.UNADAPTED[mabn.ROWS[row][0]]
        assert mabn.evaluate(model, target, phis, data, split, [row, plain], [5], args)[row] == together[row], row
    assert together["mabn_tent_bn"] != together["mabn"] != together["none"]


def test_unmatched_uses_another_domains_adaptation(tmp_path, monkeypatch):
    data = make_synthetic()
    model, target = trained_bn(*tiny_model())
    made = record_row_params(monkeypatch)
    mabn.evaluate(model, target, phis_of(model), data, data["splits"]["test"], ["mabn", "mabn_unmatched"], [6],
                  tiny_args(tmp_path))
    matched = [p for row, p in made if row == "mabn"]
    unmatched = [p for row, p in made if row == "mabn_unmatched"]
    phi_names, n = list(mabn.split_params(model)[0]), len(matched)
    assert n == len(unmatched) == 3
    for d in range(n):  # domain d is predicted with the phi~ of domain d + 1 (cyclically): another domain's, exactly
        assert all(torch.equal(unmatched[d][k], matched[(d + 1) % n][k]) for k in phi_names)
        assert not all(torch.equal(unmatched[d][k], matched[d][k]) for k in phi_names)


def test_batch_statistics_normalise_every_layer_with_the_batchs_own():
    model, _ = trained_bn(*tiny_model())
    params = {**mabn.split_params(model)[1], **mabn.split_params(model)[0]}
    x = 3 * torch.rand(6, 3, 8, 8)
    reference = copy.deepcopy(model)  # every backbone BN in training mode, running averages off: batch statistics
    for m in reference.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = None
            m.reset_running_stats()
    before = snapshot(model)
    batch = mabn.predict(model, mabn.batch_statistics(params), x)
    with torch.no_grad():
        expected = reference(x)
    assert torch.allclose(batch, expected, atol=1e-5)
    assert not torch.allclose(batch, mabn.predict(model, params, x), atol=1e-3)  # with the source statistics
    stats = mabn.reestimate_bn_stats(model, params, x)  # Table 4's "update BN" for MABN
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert len(stats) == 2 * n_bn == 18
    for name, m in reference.backbone.named_modules():  # momentum None: the running buffers hold this batch's
        if isinstance(m, nn.BatchNorm2d):
            assert torch.allclose(stats[f"backbone.{name}.running_mean"], m.running_mean, atol=1e-5), name
            assert torch.allclose(stats[f"backbone.{name}.running_var"], m.running_var, atol=1e-4), name
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
        assert all(p.grad is None for p in model.parameters())  # only the leaves got gradients, not the module
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        for leaf, grad in zip(hand.values(), torch.autograd.grad(entropy, list(hand.values()))):
            leaf.grad = grad
        hand_opt.step()
        assert all(torch.allclose(leaves[k], hand[k], atol=1e-6) for k in hand)
    assert not all(torch.equal(leaves[k], phi[k]) for k in leaves)  # online: it moved, batch after batch
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_tent_rows_adapt_per_test_batch_from_their_start_and_reset_for_every_domain(tmp_path, monkeypatch):
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    phis = phis_of(model)
    calls, made = [], record_row_params(monkeypatch)
    real_tent = mabn.tent_forward_and_adapt

    def tent(model, params, leaves, opt, x):
        calls.append(({k: v.detach().clone() for k, v in leaves.items()}, x))
        return real_tent(model, params, leaves, opt, x)

    monkeypatch.setattr(mabn, "tent_forward_and_adapt", tent)
    args = tiny_args(tmp_path, "--eval_batch_size", "7", "--n_adapt", "5")
    for row in ("mabn_tent_affine", "mabn_tent_bn", "tent_bn"):
        calls.clear()
        made.clear()
        mabn.evaluate(model, target, phis, data, data["splits"]["test"], [row], [5], args)
        assert [len(x) for _, x in calls] == [7, 7, 7, 7, 2] * 3  # every test batch of the 3 domains, in order
        made_here = [params for name, params in made if name == row]  # the row's tensors, domain by domain
        for d in range(3):
            (first, x), (second, _) = calls[5 * d], calls[5 * d + 1]
            assert all(torch.equal(first[k], made_here[d][k]) for k in first)  # reset to the row's start: phi~
            fresh_leaves, fresh_opt = mabn.tent_setup(first)  # and a fresh optimiser: no Adam moments carried over
            real_tent(model, made_here[d], fresh_leaves, fresh_opt, x)
            assert all(torch.allclose(second[k], fresh_leaves[k]) for k in second)
            assert not all(torch.equal(first[k], second[k]) for k in first)  # online within the domain
        moved = not all(torch.equal(made_here[0][k], phis[mabn.ROWS[row][0]][k]) for k in calls[0][0])
        assert moved == (row != "tent_bn")  # MABN + TENT starts from the domain's phi~, TENT from stage 1's phi


def test_domain_metrics_by_hand():
    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0], [1.0, 0.0], [1.0, 2.0]])  # predicts 010101
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    domains = torch.tensor([7, 7, 7, 7, 9, 9])  # domain 7: 3 of 4 right; domain 9: 1 of 2
    metrics = mabn.domain_metrics(outputs, labels, domains)
    assert metrics == {"acc_avg": pytest.approx(4 / 6), "acc_wg": 0.5, "per_domain": {7: 0.75, 9: 0.5}}  # pooled
    mse = mabn.domain_metrics(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 0.0, 1.0]),
                              torch.tensor([0, 0, 3]), task="regression")
    assert mse == {"per_domain": {0: 2.0, 3: 9.0}}


def test_adaptation_is_visible_per_domain(tmp_path, monkeypatch):
    """Every adapting row records, per target domain, ||phi~ - phi|| / ||phi|| over the backbone's part of phi and the
    share of its predictions that differ from the same start's without adaptation (mabn against none, bn_stats against
    stage1)."""
    data = make_synthetic(per_domain=30)
    model, target = trained_bn(*tiny_model())
    phis, made = phis_of(model), record_row_params(monkeypatch)
    test = data["splits"]["test"]
    out = mabn.evaluate(model, target, phis, data, test, ["stage1", "none", "mabn", "bn_stats"], [5],
                        tiny_args(tmp_path, "--inner_lr", "2.0", "--n_adapt", "5"))
    assert "phi_shift" not in out["none"] and "changed" not in out["stage1"]
    x = test.dataset.tensors[0]
    for (d, idx), (_, params) in zip(test.by_domain.items(), [p for p in made if p[0] == "mabn"]):
        seen = [k for k in phis["meta"] if k.startswith("backbone.")]  # the part of phi the predictions use
        phi_d = torch.cat([params[k].flatten() for k in seen])
        phi = torch.cat([phis["meta"][k].flatten() for k in seen])
        assert out["mabn"]["phi_shift"][d] == pytest.approx(((phi_d - phi).norm() / phi.norm()).item(), rel=1e-5)
        adapted = mabn.predict(model, params, x[idx]).argmax(-1)
        plain = mabn.predict(model, {**mabn.split_params(model)[1], **phis["meta"]}, x[idx]).argmax(-1)
        assert out["mabn"]["changed"][d] == pytest.approx((adapted != plain).float().mean().item())
        assert out["bn_stats"]["phi_shift"][d] == 0.0  # statistics only: phi stays
    assert max(out["mabn"]["changed"].values()) > 0 and max(out["bn_stats"]["changed"].values()) > 0


# ----------------------------------------------------------------------------------------------------------
# End to end, and learning
# ----------------------------------------------------------------------------------------------------------
def test_main_end_to_end(tmp_path):
    args = tiny_args(tmp_path)
    out = mabn.main(args, make_synthetic())["per_seed"][0]
    saved = json.load(open(os.path.join(args.out_dir, "seed0", "results.json")))
    stages = saved["stages"]  # 72 source images: 4 batches of 16 (stage 1), 4 episodes of 8 + 8 (stage 2) an epoch
    assert stages["stage1"]["steps"] == stages["stage2"]["steps"] == 8
    assert set(saved["target"]) == {"stage1", "none", "mabn"}
    assert len(saved["target"]["mabn"]["per_domain"]) == 3
    for name in ("stage1", "stage2"):  # throughput over the training steps alone; time_s includes validation
        assert stages[name]["img_per_s"] * stages[name]["time_s"] >= 8 * 16, name
    assert stages["stage3"]["img_per_s"] * stages["stage3"]["time_s"] == pytest.approx(72, rel=0.02)
    assert saved["target"]["mabn"]["acc_avg"] == out["target"]["mabn"]["acc_avg"]
    summary = json.load(open(os.path.join(args.out_dir, "results.json")))["summary"]
    assert summary["mabn"]["acc_avg"][0] == out["target"]["mabn"]["acc_avg"]
    again = mabn.main(tiny_args(tmp_path), make_synthetic())["per_seed"][0]  # the same out_dir: stages reused
    assert again["target"]["mabn"]["acc_avg"] == out["target"]["mabn"]["acc_avg"]
    assert "img_per_s" not in again["stages"]["stage1"]  # loaded, not trained


def test_seeds_as_concurrent_processes_then_one_summary(tmp_path):
    """The several-GPU recipe on the CPU: one process per seed into one --out_dir at the same time, then one call over
    all the seeds, which reuses every finished stage and reports what the processes computed."""
    import subprocess
    flags = ["--out_dir", str(tmp_path / "run"), "--epochs", "1", "--meta_epochs", "1", "--max_steps", "2",
             "--inner_lr", "0.1", "--outer_lr", "0.01", "--n_adapt", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, mabn.__file__, *flags, "--seeds", seed], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in ("0", "1")]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    separate = {s: json.load(open(tmp_path / "run" / f"seed{s}" / "results.json"))["target"] for s in (0, 1)}
    out = mabn.main(mabn.parse_args([*flags, "--seeds", "0", "1"]))
    assert [r["stages"]["stage1"]["steps"] for r in out["per_seed"]] == [2, 2]
    assert all("img_per_s" not in r["stages"][s] for r in out["per_seed"] for s in ("stage1", "stage2"))  # reused
    assert [r["target"]["mabn"]["acc_avg"] for r in out["per_seed"]] == [separate[s]["mabn"]["acc_avg"] for s in (0, 1)]
    assert separate[0]["mabn"]["acc_avg"] != separate[1]["mabn"]["acc_avg"]  # two seeds, two models
    log = open(tmp_path / "run" / "log.txt").read()  # both processes and the summary wrote to one log, line by line
    assert log.count("stage 1 epoch 1/1:") == 2 and "seeds: mean ± std" in log


GAIN_SHIFT_FLAGS = ["--epochs", "3", "--meta_epochs", "8", "--batch_size", "16", "--n_support", "16", "--n_query", "16",
                    "--n_adapt", "16"]


def gain_shift(argv):
    """The learning check's task and flags (argv: more mabn.py flags, which win): 32 source and 6 unseen target domains
    of make_synthetic, each with its own gain; BYOL's views keep the brightness, which is the label.
    python test_mabn.py --gain-shift [mabn.py flags] runs it through mabn.main. -> (args, data)"""
    args = mabn.parse_args(["--out_dir", os.path.join("runs", "gain_shift"), *GAIN_SHIFT_FLAGS, *argv])
    args.aug = dict(min_scale=0.7, max_rot=0.0, flip=True, jitter=0.0, noise=0.05)
    return args, make_synthetic(n_source=32, n_val=4, n_test=6, per_domain=32, gain=0.5)


def test_mabn_beats_no_adaptation_on_gain_shift(tmp_path):
    """The gain-shift task (gain_shift) at alpha 0.2, delta 0.015, seeds 0, 1 and 2: MABN beats the same meta-trained
    model without adaptation in every seed by 3 points or more, and by 5 or more on average. Seeds 0-7 gave
    mabn - none = +8.9, +18.8, +12.5, +16.7, +12.0, +5.7, +4.2, +20.3 points (any three of them: +6.25 on average at
    the least); most of it is `none` being worse than a phi meta-trained without the inner step (row no_inner:
    mabn - no_inner +3.4 on average, README). On one CPU thread: a seed's outcome changes with the summation order
    of other thread counts."""
    args, data = gain_shift(["--out_dir", str(tmp_path / "run"), "--seeds", "0", "1", "2", "--inner_lr", "0.2",
                             "--outer_lr", "0.015"])
    per_seed = mabn.main(args, data)["per_seed"]  # on one thread, as every test (one_thread)
    margins = [r["target"]["mabn"]["acc_avg"] - r["target"]["none"]["acc_avg"] for r in per_seed]
    assert min(margins) >= 0.03 and sum(margins) / len(margins) >= 0.05, margins


# ----------------------------------------------------------------------------------------------------------
# Data: the six WILDS datasets through the real wilds.get_dataset, on generated data (writers at the end)
# ----------------------------------------------------------------------------------------------------------
OFFICIAL_METRICS = {"iwildcam": ["acc_avg", "F1-macro_all"], "camelyon17": ["acc_avg"], "rxrx1": ["acc_avg"],
                    "fmow": ["acc_avg", "acc_worst_region"], "poverty": ["r_all", "r_wg"],
                    "domainnet": ["acc_avg"]}


@pytest.mark.parametrize("name", sorted(OFFICIAL_METRICS))
def test_wilds_end_to_end(tmp_path, name):
    n_test_domains = fake_wilds(tmp_path / "data", name)
    args = mabn.parse_args(["--dataset", name, "--root_dir", str(tmp_path / "data"), "--out_dir",
                            str(tmp_path / "run"), "--no_pretrained", "--img_size", "32", "--epochs", "1",
                            "--meta_epochs", "1", "--max_steps", "2", "--batch_size", "4", "--n_support", "3",
                            "--n_query", "2", "--n_adapt", "2", "--eval_batch_size", "64", "--proj_hidden", "16",
                            "--proj_dim", "8", "--num_workers", "0"])
    if name != "poverty":  # the loaders are under test here; the torchvision backbones in the next test
        args.backbone = "small_resnet"
    mabn.main(args)
    saved = json.load(open(tmp_path / "run" / "seed0" / "results.json"))
    for row in ("none", "mabn"):
        metrics = saved["target"][row]
        for key in OFFICIAL_METRICS[name]:
            assert key in metrics and metrics[key] == metrics[key] and abs(metrics[key]) != float("inf"), key
        assert len(metrics["per_domain"]) == n_test_domains
    assert [saved["stages"][s]["steps"] for s in ("stage1", "stage2")] == [2, 2]
    assert len(saved["pilot"]["candidates"]) == 7  # alpha and delta chosen by the pilot on the validation domains
    assert saved["flags"]["inner_lr"] in mabn.ALPHAS and saved["flags"]["outer_lr"] in mabn.DELTAS


@pytest.mark.parametrize("name, in_channels", [("resnet50", 3), ("densenet121", 3), ("resnet18_8ch", 8)])
def test_torchvision_backbones_give_pooled_features(name, in_channels):
    backbone, dim = mabn.build_backbone(name, in_channels, pretrained=False)
    assert backbone(torch.rand(2, in_channels, 32, 32)).shape == (2, dim)


def test_wilds_missing_folder_is_one_clear_line(tmp_path):
    args = mabn.parse_args(["--dataset", "iwildcam", "--root_dir", str(tmp_path / "nowhere"), "--out_dir",
                            str(tmp_path / "run"), "--no_pretrained"])
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(args)
    message = str(exit_info.value)
    assert message.startswith("error: no iwildcam data under") and "--download" in message
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "nowhere")  # nothing left behind


# ----------------------------------------------------------------------------------------------------------
# Reliability: bad input, interruptions and repeatability
# ----------------------------------------------------------------------------------------------------------
# The flags that take their dataset's value, written here rather than read from mabn.py
TUNED = ["n_adapt", "epochs", "batch_size", "lr", "lr_decay_epoch", "weight_decay", "aux_weight", "ema", "proj_hidden",
         "proj_dim", "meta_epochs", "n_support", "n_query", "meta_batch", "inner_steps", "pilot_steps", "tent_lr",
         "eval_batch_size", "img_size"]


@pytest.mark.parametrize("dataset", ["digits", "fmow"])
def test_help_gives_every_tuned_flag_its_meaning_and_the_datasets_value(dataset, capsys, monkeypatch):
    assert all(values.keys() == mabn.DATASETS["digits"].keys() for values in mabn.DATASETS.values())
    args = mabn.parse_args(["--dataset", dataset])
    assert all(getattr(args, name) == mabn.DATASETS[dataset][name] for name in mabn.DATASETS[dataset])
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
    (["--outer_lr", "0"], "--outer_lr: must be > 0"), (["--epochs", "-1"], "--epochs: must be >= 0"),
    (["--n_adapt", "8", "0"], "--n_adapt: must be > 0"), (["--batch_size", "0"], "--batch_size: must be > 0"),
    (["--ema", "1.5"], "--ema: must be in [0, 1)"), (["--meta_batch", "0"], "--meta_batch: must be > 0"),
    (["--support", "last"], "--support"), (["--tent_lr", "0"], "--tent_lr: must be > 0"),
    (["--num_workers", "-1"], "--num_workers: must be >= 0")])
def test_bad_flags_fail_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mabn.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and err.count("\n") == 1 and err.startswith("error:")


def test_unavailable_imagenet_weights_name_no_pretrained(monkeypatch):
    import urllib.error

    import torchvision.models._api  # torchvision's weights look the download function up here: no download starts
    urls = []

    def offline(url, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as exit_info:
        mabn.build_backbone("resnet18_8ch", 8, pretrained=True)
    assert "--no_pretrained" in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert len(urls) == 1 and "resnet18" in urls[0]  # the stand-in, not the network, was asked for the weights


def test_unwritable_out_dir_and_bad_checkpoints(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path, "--out_dir", str(tmp_path / "a_file" / "run")), make_synthetic())
    assert "cannot write to --out_dir" in str(exit_info.value)
    args = tiny_args(tmp_path)
    mabn.main(args, make_synthetic())
    ckpt = os.path.join(args.out_dir, "seed0", "stage1.pt")
    with pytest.raises(SystemExit) as exit_info:  # same out_dir, other flags: refused, file and flag named
        mabn.main(tiny_args(tmp_path, "--lr", "0.5"), make_synthetic())
    assert ckpt in str(exit_info.value) and "lr: 0.002 in file vs 0.5 now" in str(exit_info.value)
    saved = torch.load(ckpt, weights_only=True)  # a checkpoint of the format before (best target not kept): refused
    torch.save({**saved, "flags": {k: v for k, v in saved["flags"].items() if k != "format"}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        mabn.main(tiny_args(tmp_path), make_synthetic())
    assert "format: None in file vs 2 now" in str(exit_info.value)
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


def test_two_runs_with_one_seed_are_identical(tmp_path):  # kill and resume: test_model_selection_keeps_the_best...
    data = make_synthetic()
    full, again = [mabn.main(tiny_args(tmp_path, "--out_dir", str(tmp_path / name), "--epochs", "1", "--meta_epochs",
                                       "1"), data)["per_seed"][0] for name in ("full", "again")]
    assert again["target"] == full["target"]
    assert all(torch.equal(a, b) for a, b in zip(final_checkpoints(tmp_path / "full")[1].values(),
                                                 final_checkpoints(tmp_path / "again")[1].values()))


def test_small_target_domain_adapts_on_all_it_has_and_says_so(tmp_path, monkeypatch, caplog):
    data = make_synthetic(per_domain=6)
    model, target = trained_bn(*tiny_model())
    used = []
    real_adapt_domain = mabn.adapt_domain

    def recording(*args):
        used.append(len(args[4]))  # the support set's size
        return real_adapt_domain(*args)

    monkeypatch.setattr(mabn, "adapt_domain", recording)
    caplog.set_level(logging.INFO, logger="mabn")
    mabn.evaluate(model, target, phis_of(model), data, data["splits"]["test"], ["none", "mabn"], [10],
                  tiny_args(tmp_path, "--n_adapt", "10"))
    notes = [r.getMessage() for r in caplog.records if r.name == "mabn"]
    assert len(notes) == 1 and "fewer than 10 images" in notes[0] and used == [6, 6, 6]


def test_cost_probe_counts_flops_in_proportion_to_the_images():
    """The cost script's probe (python test_mabn.py --cost) on PovertyMap's network, at 64 px for speed: a stage-1
    step on two images costs twice one image's FLOPs, and a meta step's query image less than its support image."""
    one, two = (cost_probe("poverty", 1, n, img_size=64) for n in (1, 2))
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=0.01) and one["flops"] > 1e9
    base, support, query = (cost_probe("poverty", 2, s, q, img_size=64) for s, q in ((1, 1), (2, 1), (1, 2)))
    assert 0 < query["flops"] - base["flops"] < support["flops"] - base["flops"]


def test_speed_script_runs_every_measurement():
    """The GPU speed script (python test_mabn.py --speed) end to end on the CPU at tiny sizes: every figure present."""
    out = speed(tiny=True, extra=["--num_workers", "0", "--img_size", "16"], backbone="small_resnet",
                log=lambda msg: None)
    assert out["a_fed_over_resident"] == out["fed_img_s"] / out["resident_img_s"]
    assert out["c_stage3_over_plain"] == out["stage3_img_s"] / out["plain_img_s"]
    assert out["d_meta_cost_per_image"] == out["resident_img_s"] / out["meta_img_s"]
    assert out["d_peak_gib"] is None  # no CUDA here


# ----------------------------------------------------------------------------------------------------------
# Tools, not tests: the generated-WILDS writers, the speed script and the cost script (python test_mabn.py ...)
# ----------------------------------------------------------------------------------------------------------
def _image(path, seed, size=12):
    """A photo-like image (smooth colour blobs plus sensor noise) of size (width, height) or size x size."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    blobs = torch.rand(1, 3, h // 120 + 2, w // 120 + 2, generator=gen) * 255
    pixels = torch.nn.functional.interpolate(blobs, size=(h, w), mode="bilinear")[0] + 20 * torch.randn(3, h, w,
                                                                                                       generator=gen)
    Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(path, quality=90)


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
    """Write a tiny `name` dataset under root in its WILDS release layout; -> number of OOD test domains.
    iwildcam_layout: {split: (domains, images per domain)} (default 4 train, 2 val and 3 test domains)."""
    import numpy as np
    import pandas as pd
    rows = []
    if name == "iwildcam":
        d = _release(root, "iwildcam_v2.0")
        layout = iwildcam_layout or {s: (n, per_domain) for s, n in dict(train=4, id_test=4, val=2, test=3).items()}
        first = dict(train=0, id_test=0, val=layout["train"][0], test=layout["train"][0] + layout["val"][0])
        jobs = []
        for split, (n_domains, n_images) in layout.items():
            for loc in range(first[split], first[split] + n_domains):
                for k in range(n_images):
                    i = len(rows)
                    rows.append(dict(split=split, filename=f"{i}.jpg", y=i % 3, location_remapped=loc,
                                     sequence_remapped=i, datetime="2013-06-01 12:30:00.000"))
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
                    rows.append(dict(patient=patient, node=node, x_coord=x, y_coord=y, tumor=k % 2, slide=slide,
                                     center=center, split=int(k == 0)))
                    _image(os.path.join(d, "patches", f"patient_{patient}_node_{node}",
                                        f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"), len(rows), image_size)
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
                    rows.append(dict(site_id=f"{experiment}_1_{well}_{site}", well_id=f"{experiment}_1_{well}",
                                     cell_type="HEPG2", dataset=split, experiment=experiment, plate=1, well=well,
                                     site=site, well_type="treatment", sirna=f"s{k % 3}", sirna_id=k % 3))
                    _image(os.path.join(d, "images", experiment, "Plate1", f"{well}_s{site}.png"), len(rows),
                           image_size)
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"), index=False)
        return 2
    if name == "fmow":
        from wilds.datasets.fmow_dataset import categories
        d = _release(root, "fmow_v1.1")
        pd.DataFrame({"alpha-3": ["USA", "FRA", "CHN", "NGA"], "region": ["Americas", "Europe", "Asia", "Africa"]}
                     ).to_csv(os.path.join(d, "country_code_mapping.csv"), index=False)
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
        countries = ([folds["train"][i % 3] for i in range(2000 + 3 * per_domain)]  # 2000 go to id_val/id_test
                     + [c for c in folds["val"][:2] for _ in range(per_domain)]
                     + [c for c in folds["test"][:2] for _ in range(2 * per_domain)])
        gen = torch.Generator().manual_seed(0)
        os.makedirs(os.path.join(d, "images"))
        for i, country in enumerate(countries):
            rows.append(dict(country=country, wealthpooled=float(torch.randn(1, generator=gen)), urban=i % 2 == 0,
                             lat=0.0, lon=0.0, year=2012, households=10))
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
        pd.DataFrame(rows).to_csv(os.path.join(d, "metadata.csv"), index=False, quoting=csv.QUOTE_NONNUMERIC)
        return 1
    raise ValueError(name)


def speed(tiny=False, extra=(), backbone=None, log=print):
    """One run on this machine's device (CUDA if present) of every speed measurement, on generated iWildCam-layout
    data (JPEGs of 1920x1080; --tiny: 96x64 images, 64 px input, small batches, to check the script on a CPU):
      (a) the stage-1 step fed by the real input pipeline (DataLoader workers decoding and resizing to 448)
          against the same step fed from one batch already on the device;
      (c) stage 3 over all target domains with MABN's adaptation against plain inference ("none");
      (d) the second-order meta step per image against the stage-1 step, and the peak memory of one 24+16 episode.
    -> {name: number}; also printed as a table."""
    import math
    import shutil
    import tempfile
    import time
    root = tempfile.mkdtemp(prefix="mabn_speed_")
    size, per = ((96, 64), 16) if tiny else ((1920, 1080), 128)
    t0 = time.time()
    fake_wilds(root, "iwildcam", image_size=size,
               iwildcam_layout=dict(train=(4, 4 * per), id_test=(1, 1), val=(1, 2), test=(8, per)))
    write_s = time.time() - t0
    small = ["--img_size", "64", "--batch_size", "4", "--n_support", "6", "--n_query", "4", "--n_adapt", "4",
             "--eval_batch_size", "16", "--proj_hidden", "64", "--proj_dim", "32"] if tiny else []
    args = mabn.parse_args(["--dataset", "iwildcam", "--root_dir", root, "--no_pretrained", *small, *extra])
    args.backbone = backbone or args.backbone
    args.inner_lr = args.inner_lr or 1e-3  # not the pilot's: speed does not depend on it
    device, cuda = torch.device(args.device), args.device == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as mabn.main
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = mabn.load_data(args)
    model, target = mabn.build_model(args, data, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=cuda)
    augment_fn = functools.partial(mabn.augment, gen=torch.Generator(device).manual_seed(0), **args.aug)
    warmup, timed = (1, 2) if tiny else (10, 50)

    def rate(step, images_per_step, n_warmup=warmup, n_timed=timed):  # images/s of step() after n_warmup calls
        for _ in range(n_warmup):
            step()
        sync()
        t = time.time()
        for _ in range(n_timed):
            step()
        sync()
        return images_per_step * n_timed / (time.time() - t)

    # (a): stage 1 fed by the loader against stage 1 fed from the device
    model.train()
    target.train()
    loader = mabn.make_loader(data["splits"]["train"].dataset, args.num_workers, batch_size=args.batch_size,
                              shuffle=True, drop_last=True)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # endless, epoch after epoch
    on_device = [(mabn.to_device(b[0], device), b[1].to(device)) for b in (next(batches) for _ in range(3))]
    B = args.batch_size

    def stage1_step(x, y):
        mabn.joint_step(model, target, opt, x, y, augment_fn, args.aux_weight, args.ema)

    resident = rate(lambda: stage1_step(*on_device[0]), B)

    def fed_step():
        batch = next(batches)
        stage1_step(mabn.to_device(batch[0], device), batch[1].to(device, non_blocking=True))

    ready = 2 * max(1, args.num_workers)  # batches the workers hold ready: drained before timing, outnumbered in it
    fed = rate(fed_step, B, n_warmup=warmup + ready, n_timed=max(timed, 3 * ready))

    # (c): stage 3, adaptation included, against plain inference; the same loader and batches for both
    test, phis = data["splits"]["test"], {"meta": mabn.split_params(model)[0]}

    def stage3(row):
        t = time.time()
        mabn.evaluate(model, target, phis, data, test, [row], args.n_adapt, args)
        return len(test.domains) / (time.time() - t)

    stage3("none")  # first pass: page cache and the workers' first start
    plain, adapted = stage3("none"), stage3("mabn")

    # (d): the meta step on one episode of n_support + n_query images (BN in eval mode, as in stage 2)
    phi, frozen = mabn.split_params(model)
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
    meta = rate(lambda: mabn.meta_step(model, phi, frozen, target, meta_opt, [(x[:S], x[S:], y[S:])], augment_fn,
                                       inner_lr=args.inner_lr), S + Q, n_timed=max(2, timed // 5))
    peak = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None
    shutil.rmtree(root, ignore_errors=True)

    out = dict(fed_img_s=fed, resident_img_s=resident, a_fed_over_resident=fed / resident, plain_img_s=plain,
               stage3_img_s=adapted, c_stage3_over_plain=adapted / plain, meta_img_s=meta,
               d_meta_cost_per_image=resident / meta, d_peak_gib=peak)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    command = " ".join(["python test_mabn.py --speed"] + ["--tiny"] * tiny + list(extra))
    log(f"device {name}, torch {torch.__version__}, {args.num_workers} loader workers, fp32 (TF32 allowed: "
        f"{torch.backends.cuda.matmul.allow_tf32}), {args.backbone} at {args.img_size}, batch {B}, episode {S}+{Q}; "
        f"JPEGs {size[0]}x{size[1]} (written in {write_s:.0f} s); command: {command}")
    rows = [("(a) stage 1 fed by the loader / fed from the device", out["a_fed_over_resident"], ">= 0.90",
             f"{fed:.0f} vs {resident:.0f} img/s"),
            ("(c) stage 3 mabn / plain inference", out["c_stage3_over_plain"], ">= 0.80",
             f"{adapted:.0f} vs {plain:.0f} img/s, {len(test.by_domain)} domains"),
            ("(d) meta step / stage-1 step, per image", out["d_meta_cost_per_image"], "<= 4",
             f"{meta:.0f} vs {resident:.0f} img/s"),
            ("(d) peak memory of the meta steps, GiB", peak if peak is not None else float("nan"), "<= 80", "")]
    for what, value, goal, detail in rows:
        log(f"{what:<52} {value:8.3f}  {goal:>8}  {detail}")
    return out


# The size of each dataset's training split as published (WILDS 2.0; DomainNet: the five sources' official train
# lists when the target is `real`; not counted here) and its number of classes: what a full run's cost comes from.
WILDS_SIZES = {"iwildcam": (129809, 182), "camelyon17": (302436, 2), "rxrx1": (40612, 1139), "fmow": (76863, 62),
               "poverty": (9797, 1), "domainnet": (288926, 345)}


def cost_probe(name, stage, n_support, n_query=0, img_size=None):
    """In a fresh process: the FLOPs (torch's FlopCounterMode) and the peak resident memory of ONE step at the
    dataset's full-size defaults on the CPU, random weights: stage 1's joint_step on n_support labelled images, or
    the second-order meta_step on one episode of n_support + n_query. -> {"flops", "rss_gib"}"""
    import resource

    from torch.utils.flop_counter import FlopCounterMode
    args = mabn.parse_args(["--dataset", name, "--no_pretrained"])
    args.img_size = img_size or args.img_size
    channels = 8 if name == "poverty" else 3
    norm = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}.get(args.norm, args.norm)
    task = "regression" if name == "poverty" else "classification"
    data = dict(in_channels=channels, n_outputs=WILDS_SIZES[name][1], norm=norm, task=task)
    model, target = mabn.build_model(args, data, torch.device("cpu"))
    augment_fn = functools.partial(mabn.augment, gen=torch.Generator().manual_seed(0), **args.aug)
    n = n_support + n_query
    x = torch.rand(n, channels, args.img_size, args.img_size)
    y = torch.rand(n) if task == "regression" else torch.randint(0, data["n_outputs"], (n,))
    counter = FlopCounterMode(display=False)
    if stage == 1:
        opt = torch.optim.Adam(model.parameters(), args.lr)
        with counter:
            mabn.joint_step(model, target, opt, x, y, augment_fn, task=task)
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
            mabn.meta_step(model, phi, frozen, target, opt, [episode], augment_fn, inner_lr=1e-3, task=task)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
    return {"flops": counter.get_total_flops(), "rss_gib": rss_gib}


def cost(names=tuple(WILDS_SIZES), log=print):
    """The cost of one seed at each dataset's defaults, from one-step probes in fresh processes (python test_mabn.py
    --cost [NAME ...]). Costs are linear in the images of a step, so two sizes give a per-image slope and an intercept
    (the model's own memory): stage 1 on 2 and 6 images, the meta step on 2 + 2, 6 + 2 and 2 + 6 (support + query).
    One seed = stage 1 (epochs x training images) + the pilot (7 x --pilot_steps meta steps) + stage 2
    (meta_epochs x training images // (support + query)); validation and stage 3 are left out. -> {name: figures}"""
    import subprocess
    out = {}
    for name in names:
        probes = {}
        for stage, n_support, n_query in ((1, 2, 0), (1, 6, 0), (2, 2, 2), (2, 6, 2), (2, 2, 6)):
            call = f"test_mabn.cost_probe({name!r}, {stage}, {n_support}, {n_query})"
            code = f"import json, test_mabn; print(json.dumps({call}))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__)))
            probes[stage, n_support, n_query] = json.loads(done.stdout.strip().splitlines()[-1])
        args = mabn.parse_args(["--dataset", name])
        per_image_1 = {k: (probes[1, 6, 0][k] - probes[1, 2, 0][k]) / 4 for k in ("flops", "rss_gib")}
        per_support = {k: (probes[2, 6, 2][k] - probes[2, 2, 2][k]) / 4 for k in ("flops", "rss_gib")}
        per_query = {k: (probes[2, 2, 6][k] - probes[2, 2, 2][k]) / 4 for k in ("flops", "rss_gib")}
        base_1 = probes[1, 2, 0]["rss_gib"] - 2 * per_image_1["rss_gib"]  # the model's own, before any image
        base_2 = probes[2, 2, 2]["rss_gib"] - 2 * per_support["rss_gib"] - 2 * per_query["rss_gib"]
        n_train = WILDS_SIZES[name][0]
        meta_step = args.n_support * per_support["flops"] + args.n_query * per_query["flops"]
        stage1 = args.epochs * n_train * per_image_1["flops"]
        stage2 = args.meta_epochs * (n_train // (args.n_support + args.n_query)) * meta_step
        pilot = (len(mabn.ALPHAS + mabn.DELTAS) - 1) * args.pilot_steps * meta_step
        meta_gib = base_2 + args.n_support * per_support["rss_gib"] + args.n_query * per_query["rss_gib"]
        out[name] = dict(gflop_stage1_image=per_image_1["flops"] / 1e9, gflop_support_image=per_support["flops"] / 1e9,
                         gflop_query_image=per_query["flops"] / 1e9, flop_seed=stage1 + stage2 + pilot,
                         gib_stage1_step=base_1 + args.batch_size * per_image_1["rss_gib"], gib_meta_step=meta_gib,
                         flop_stage1=stage1, flop_stage2=stage2, flop_pilot=pilot)
        f = out[name]
        log(f"{name:<11} stage 1 {f['gflop_stage1_image']:6.0f} GFLOP/img, meta {f['gflop_support_image']:5.0f} "
            f"(support) {f['gflop_query_image']:5.0f} (query) GFLOP/img | memory: stage-1 step (batch "
            f"{args.batch_size}) {f['gib_stage1_step']:5.1f} GiB, meta step ({args.n_support}+{args.n_query}) "
            f"{meta_gib:5.1f} GiB | one seed {f['flop_seed']:.2e} FLOP (pilot {pilot / stage2:.1%} of stage 2)")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gain-shift"]:
        torch.set_num_threads(1)  # as the learning check
        mabn.main(*gain_shift(sys.argv[2:]))
    elif sys.argv[1:2] == ["--cost"]:
        cost(sys.argv[2:] or tuple(WILDS_SIZES))
    elif sys.argv[1:2] == ["--speed"]:
        speed(tiny="--tiny" in sys.argv, extra=[a for a in sys.argv[2:] if a != "--tiny"])
    else:
        sys.exit("usage: python test_mabn.py --speed [--tiny] | --cost [DATASET ...] | --gain-shift [mabn.py flags]  "
                 "(tests: python -m pytest test_mabn.py)")
