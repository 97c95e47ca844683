"""Brute-force reference of docs/math.md §9: torch.func Jacobians and Hessians, labels enumerated.

Nothing here uses BackPACK or fimhooks' code paths. For each input ``x_n`` it computes
``J = ∂h/∂θ`` and ``∂²h_a/∂θ²`` with ``torch.func``, enumerates the label distribution
(all classes; all ``2^C`` Bernoulli patterns) or uses Gaussian moments (Isserlis), and
returns the per-input diagonal quantities of docs/math.md §2-§3.
"""

from __future__ import annotations

import functools
import itertools
from typing import Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

_NAMES = {nn.CrossEntropyLoss: "categorical", nn.BCEWithLogitsLoss: "bernoulli"}


def per_input_reference(
    model: nn.Module,
    likelihood,
    x,
    sigma: float = 1.0,
    *,
    output=None,
    mask: Tensor = None,
    second_order: bool = True,
    batch_axis: int = 0,
    kwargs: Dict[str, Tensor] = None,
):
    """Per-input ``g, v1, v2`` and the expectations of the I1 and I2 summands.

    Args:
        likelihood: A name or a loss module. Categorical outputs ``[N, *, C]`` (class axis
            last; axis 1 for an ``nn.CrossEntropyLoss`` module) have one observation per
            position: an input's quantity is the mean over its unmasked positions, its
            label-noise variances ``(1/T²) Σ_t v_t`` (docs/math.md §7c).
        x: Inputs ``[N, ...]``, or a tuple of such tensors.
        output: Callable from the forward's return value to the output tensor.
        mask: ``[N, *positions]`` observed positions (categorical only).
        second_order: Compute ``v2`` and the I2 expectation (needs Hessians).
        batch_axis: The inputs' batch axis (1 for sequence-first ``[T, N, E]`` inputs): one
            input is selected along it and called with a singleton there. The output's
            batch axis is 0 whatever it is.
        kwargs: Keyword arguments of the forward, each ``[N, ...]`` (batch axis 0, like an
            attention mask), passed one input at a time alongside ``x``.

    Returns:
        ``{quantity: {param name: [N, *param.shape]}}``; ``v1_input`` is ``v1`` with the
        cross terms of an input's square, ``(1/T²)(Σ_t v_t + 2[(Σ_t g_t)² − Σ_t g_t²])``.
    """
    name = _NAMES.get(type(likelihood), likelihood if isinstance(likelihood, str) else "gaussian")
    class_axis = 1 if isinstance(likelihood, nn.CrossEntropyLoss) else -1
    inputs = x if isinstance(x, tuple) else (x,)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    keywords = {} if kwargs is None else kwargs

    def positions(theta: Tensor, *xn: Tensor, **kwn: Tensor) -> Tensor:
        """The output of one input as ``[T, C]``."""
        chunks = dict(zip(names, (c.reshape(s) for c, s in zip(theta.split(sizes), shapes))))
        args = tuple(a.unsqueeze(batch_axis) for a in xn)
        kwn = {k: a.unsqueeze(0) for k, a in kwn.items()}
        out = functional_call(model, {**params, **chunks}, args, kwn)
        h = (out if output is None else output(out))[0]
        if name != "categorical":
            return h.reshape(1, -1)
        axis = class_axis - 1 if class_axis > 0 else -1  # within one input's output
        return h.movedim(axis, -1).reshape(-1, h.shape[axis])

    rows = {key: [] for key in (*SCALES, "v1_input")}
    for n in range(inputs[0].shape[batch_axis]):
        xn = tuple(a.select(batch_axis, n) for a in inputs)
        f = functools.partial(positions, **{k: a[n] for k, a in keywords.items()})
        h = f(flat, *xn).detach()
        J = jacrev(f)(flat, *xn)  # [T, C, P]
        H = hessian(f)(flat, *xn) if second_order else None  # [T, C, P, P]
        observed = torch.ones(len(h), dtype=torch.bool) if mask is None else mask[n].flatten()
        terms = [
            _position_terms(name, h[t], J[t], None if H is None else H[t], sigma)
            for t in range(len(h))
            if observed[t]
        ]
        count = len(terms)
        for key, power in SCALES.items():
            rows[key].append(sum(t[key] for t in terms) / count**power)
        g = torch.stack([t["exact"] for t in terms])
        cross = g.sum(0) ** 2 - (g * g).sum(0)
        rows["v1_input"].append((sum(t["v1"] for t in terms) + 2 * cross) / count**2)
    return {key: _unflatten(torch.stack(v), names, shapes, sizes) for key, v in rows.items()}


#: Per-input quantities and the power of ``1/T`` with which positions enter them (§7c).
SCALES = {
    "exact": 1,
    "v1": 2,
    "v2": 2,
    "mean_I1": 1,
    "mean_I2": 1,
    "exact_lower": 1,
    "exact_upper": 1,
    "v1_lower": 2,
    "v1_upper": 2,
    "v2_lower": 2,
    "v2_upper": 2,
}


def _position_terms(name: str, h: Tensor, J: Tensor, H, sigma: float) -> dict:
    """docs/math.md §3, §7 quantities of one observation with output ``h [C]``, ``J [C, P]``."""
    w = torch.zeros_like(J) if H is None else torch.diagonal(H, dim1=1, dim2=2)  # ∂²h_a/∂θ_i²
    probs, residuals = _label_distribution(name, h)
    if residuals is None:  # Gaussian: moments of ρ ~ N(0, I/σ²)
        g = (J**2).sum(0) / sigma**2
        fourth = 3 * g**2  # Isserlis: E(uᵀρ)⁴ = 3 (uᵀΣu)²
        v2 = (w**2).sum(0) / sigma**2
        mean_b = g
    else:
        s = residuals @ J  # [Y, P] scores for each outcome
        r = residuals @ w  # [Y, P] Hessian residuals
        g_direct = ((_fisher_h(name, h) @ J) * J).sum(0)  # diag(Jᵀ I_h J), no P × P
        g = probs @ s**2
        assert torch.allclose(g, g_direct, rtol=1e-10, atol=1e-14)
        fourth = probs @ s**4
        v2 = probs @ r**2 - (probs @ r) ** 2
        mean_b = probs @ (g_direct - r)
    terms = {"exact": g, "v1": fourth - g**2, "v2": v2, "mean_I1": g, "mean_I2": mean_b}
    return {**terms, **_bounds(name, h, J, w, sigma)}


def _bounds(name: str, h: Tensor, J: Tensor, w: Tensor, sigma: float) -> dict:
    """Thm 4.1 of Soen & Sun 2024 for one observation (docs/math.md §7), from its definitions.

    ``λ(I_h)`` by ``eigvalsh``; ``λ̃`` of ``M = K − I_h⊗I_h``: Gaussian ``2/σ⁴``;
    categorical ``0`` and ``2 min(max p, 1 − ‖p‖²)`` (Thm 5.2); Bernoulli, where
    ``M·u⁴ = zᵀAz`` for ``z = u²`` on the simplex, the largest entry of ``A`` and the
    minimum of its diagonal part, with ``A`` read off the enumerated 4th moment tensor.
    A categorical observation's ``u``, ``w`` are centred (logits are defined up to a
    common shift), and ``λ(I_h)`` are then its eigenvalues on ``1⊥``.
    """
    if name == "gaussian":
        fisher_range, fourth_range = (sigma**-2, sigma**-2), (2 * sigma**-4, 2 * sigma**-4)
    else:
        eigenvalues = torch.linalg.eigvalsh(_fisher_h(name, h))
        if name == "categorical":
            J, w = J - J.mean(0), w - w.mean(0)
            p = torch.softmax(h, 0)
            m = min(p.max().item(), 1 - (p * p).sum().item())
            fisher_range, fourth_range = (eigenvalues[1], eigenvalues[-1]), (0.0, 2 * m)
        else:
            fisher_range, fourth_range = (eigenvalues[0], eigenvalues[-1]), _simplex_range(h)
    u2, w2 = (J**2).sum(0), (w**2).sum(0)
    out = {}
    for side, lam, kurt in zip(("lower", "upper"), fisher_range, fourth_range):
        out["exact_" + side] = u2 * lam
        out["v1_" + side] = u2 * u2 * kurt
        out["v2_" + side] = w2 * lam
    return out


def _simplex_range(h: Tensor):
    """Bernoulli: bounds on the extremes of ``M·u⁴`` over unit ``u`` (see ``_bounds``)."""
    probs, residuals = _label_distribution("bernoulli", h)
    fourth = torch.einsum("y,ya,yb,yc,yd->abcd", probs, *[residuals] * 4)
    fisher = _fisher_h("bernoulli", h)
    M = fourth - torch.einsum("ab,cd->abcd", fisher, fisher)
    A = M.diagonal(0, 0, 1).diagonal(0, 0, 1)  # M_aabb
    A = A + M.diagonal(0, 0, 2).diagonal(0, 0, 1) + M.diagonal(0, 0, 3).diagonal(0, 0, 1)
    A = A - 2 * torch.diag(A.diagonal()) / 3  # M_aaaa counted once on the diagonal
    return 1 / (1 / A.diagonal()).sum(), A.max()


def estimator_reference(model, likelihood, x, mc_samples: int, sigma: float = 1.0, **options):
    """Exact, closed-form variances and data variance of one batch (docs/math.md §3-§4)."""
    per_input = per_input_reference(model, likelihood, x, sigma, **options)
    n = len(next(iter(per_input["exact"].values())))
    out = {
        "exact": {k: v.mean(0) for k, v in per_input["exact"].items()},
        "v1": {k: v.sum(0) / (n**2 * mc_samples) for k, v in per_input["v1"].items()},
        "v2": {k: v.sum(0) / (n**2 * mc_samples) for k, v in per_input["v2"].items()},
        "data": {k: v.var(0) / n for k, v in per_input["exact"].items()},
        "mean_I2": {k: v.mean(0) for k, v in per_input["mean_I2"].items()},
    }
    scale = n**2 * mc_samples
    between = {k: v.sum(0) ** 2 - (v * v).sum(0) for k, v in per_input["exact"].items()}
    input_v1 = {k: v.sum(0) / scale for k, v in per_input["v1_input"].items()}
    out["v1_by_granularity"] = {
        "token": out["v1"],
        "input": input_v1,
        "batch": {k: v + 2 * between[k] / scale for k, v in input_v1.items()},
    }
    return out


def _label_distribution(name: str, h: Tensor):
    """Enumerated outcomes: probabilities ``[Y]`` and residuals ``t(y) − η`` ``[Y, C]``."""
    if name == "categorical":
        p = torch.softmax(h, 0)
        return p, torch.eye(len(h), dtype=h.dtype) - p
    if name == "bernoulli":
        p = torch.sigmoid(h)
        patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(h))), dtype=h.dtype)
        probs = torch.prod(torch.where(patterns == 1, p, 1 - p), dim=1)
        return probs, patterns - p
    return None, None


def _fisher_h(name: str, h: Tensor) -> Tensor:
    """``I_h``, the covariance of ``t(y)``, from its definition (docs/math.md §1 table)."""
    if name == "categorical":
        p = torch.softmax(h, 0)
        return torch.diag(p) - torch.outer(p, p)
    p = torch.sigmoid(h)
    return torch.diag(p * (1 - p))


def _unflatten(rows: Tensor, names, shapes, sizes) -> Dict[str, Tensor]:
    return {n: c.reshape(-1, *s) for n, c, s in zip(names, rows.split(sizes, dim=1), shapes)}


def empirical_fisher_reference(model, likelihood, x, y, sigma=1.0, *, mask=None, output=None):
    """Per-input empirical Fisher summands: squared NLL gradients at the data's labels.

    Each observation's negative log-likelihood is its own loss (``F.cross_entropy``,
    ``F.binary_cross_entropy_with_logits`` summed over outputs, or ``‖f − y‖²/(2σ²)``),
    differentiated by ``torch.func.grad``; an input's summand is the mean over its
    observed positions (categorical ``[N, T, C]`` outputs with labels ``[N, T]``).

    Returns:
        ``{param name: [N, *param.shape]}`` for the inputs with an observed position.
    """
    name = _NAMES.get(type(likelihood), likelihood if isinstance(likelihood, str) else "gaussian")
    params = {n: p.detach() for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]

    def nll(theta, xn, yn, t):
        out = functional_call(model, {**params, **theta}, (xn.unsqueeze(0),))
        h = (out if output is None else output(out))[0]
        if name == "categorical":
            logits = h.reshape(-1, h.shape[-1])[t]
            return nn.functional.cross_entropy(logits.unsqueeze(0), yn.reshape(-1)[t : t + 1])
        if name == "bernoulli":
            return nn.functional.binary_cross_entropy_with_logits(h, yn, reduction="sum")
        return ((h - yn) ** 2).sum() / (2 * sigma**2)

    rows = []
    for n in range(len(x)):
        count = y[n].numel() if name == "categorical" else 1
        observed = torch.ones(count, dtype=torch.bool) if mask is None else mask[n].flatten()
        if not observed.any():
            continue
        squares = [
            torch.func.grad(nll)({k: params[k] for k in trained}, x[n], y[n], t)
            for t in range(count)
            if observed[t]
        ]
        rows.append({k: sum(g[k] ** 2 for g in squares) / len(squares) for k in trained})
    return {k: torch.stack([r[k] for r in rows]) for k in trained}


def block_error_reference(model, likelihood, x, mc_samples: int, sigma: float = 1.0):
    """``{layer: (1/(N²M)) Σ_n E_y‖s_B s_Bᵀ − I_B(x_n)‖²_F}`` for each layer's block.

    The block ``B`` is a module's parameters (weight and bias). Labels are enumerated:
    ``s_y = J_Bᵀ (t(y) − η)`` and ``I_B = Σ_y p_y s_y s_yᵀ`` as ``P_B × P_B`` matrices; for
    the Gaussian, ``s ~ N(0, S)`` with ``S = J_Bᵀ J_B / σ²`` and ``E‖s‖⁴ = (tr S)² + 2‖S‖²_F``.
    """
    name = _NAMES.get(type(likelihood), likelihood if isinstance(likelihood, str) else "gaussian")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def h(theta, xn):
        return functional_call(model, {**params, **theta}, (xn.unsqueeze(0),))[0].reshape(-1)

    blocks: Dict[str, list] = {}
    for n in names:
        blocks.setdefault(n.rpartition(".")[0], []).append(n)
    errors = dict.fromkeys(blocks, 0.0)
    for xn in x:
        jac = jacrev(h)({n: params[n] for n in names}, xn)  # {name: [C, *shape]}
        probs, residuals = _label_distribution(name, h({}, xn).detach())
        for layer, members in blocks.items():
            J = torch.cat([jac[n].flatten(1) for n in members], dim=1)  # [C, P_B]
            if residuals is None:
                S = J.T @ J / sigma**2
                errors[layer] += (torch.trace(S) ** 2 + (S * S).sum()).item()
                continue
            scores = residuals @ J  # [Y, P_B]
            outer = scores.unsqueeze(2) * scores.unsqueeze(1)
            fisher = torch.einsum("y,yab->ab", probs, outer)
            errors[layer] += (probs @ ((outer - fisher) ** 2).sum((1, 2))).item()
    return {layer: e / (len(x) ** 2 * mc_samples) for layer, e in errors.items()}
