"""LoRAKFAC against dense Jacobians (oracle 2 of DESIGN.md).

The Jacobians come from ``torch.func.jacrev`` on the model itself, independent of the
hooks under test: the per-position output Jacobian of a LoRA module is the Jacobian of
the logits with respect to a perturbation ``ε`` added to that module's output.

Tolerance: the models are float64, but transformers' RMSNorm (Llama) and LayerNorm
paths compute in float32 internally, so two mathematically equal contractions of the
same Jacobian (``Σ_c Jᵀ S_c`` in one backward against ``Sᵀ`` times per-row backwards)
differ by float32 rounding: measured 2e-7 relative on these models. We assert 1e-5
(relative Frobenius norm), far below any modelling error (wrong normalisation, padding
leaking in, a missing position) that these tests exist to catch, each of which is
≥ 1e-2.
"""

import pytest
import torch

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor
from tests.batches import TARGET_IDS, DictDataset, left_pad, token_items
from tests.models import tiny_gpt2_lora, tiny_llama_lora

DT = torch.float64


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def loss_hessian(f):
    p = torch.softmax(f, -1)
    return torch.diag(p) - torch.outer(p, p)


def assert_rel_close(actual, expected, tol=1e-5):
    err = torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)
    assert err < tol, f"relative error {err:.2e}"


def model_and_names(family="llama"):
    build = {"llama": tiny_llama_lora, "gpt2": tiny_gpt2_lora}[family]
    clf = LLMClassifier(build(seed=0, dtype=DT), TARGET_IDS)
    params = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    return clf, params


def test_kfac_equals_exact_ggn_for_one_example_with_one_position():
    clf, params = model_and_names()
    assert 200 < sum(p.numel() for p in params.values()) < 5000
    item = token_items(1, 1, seed=3)[0]
    x = {k: v.unsqueeze(0) for k, v in item.items()}

    def f_of(ps):
        return torch.func.functional_call(clf, ps, (x,))[0]

    J = torch.func.jacrev(f_of)(params)
    J = torch.cat([J[n].reshape(len(TARGET_IDS), -1) for n in params], dim=1)
    ggn = J.T @ loss_hessian(f_of(params).detach()) @ J

    for approx in ("expand", "reduce"):
        la = LoRALaplace(clf, "classification", fisher_type="ggn", kfac_approx=approx, n_kfac=64)
        la.fit(torch.utils.data.DataLoader(DictDataset([item]), batch_size=1))
        start = 0
        for F in la.H_facs.kfacs:
            G, A = (dense(f) for f in F)
            p = G.shape[0] * A.shape[0]
            block = ggn[start : start + p, start : start + p]
            if block.abs().max() < 1e-20:
                # with one position the query's LoRA does not act (softmax over one key)
                assert torch.kron(G, A).abs().max() < 1e-20
            else:
                assert_rel_close(torch.kron(G, A), block)
            start += p
        assert start == ggn.shape[0]


def position_jacobians(clf, module, x):
    """``J[c, t, :] = ∂f_c/∂s_t`` for the output ``s`` of ``module`` on one sequence,
    and the module's inputs ``a`` (T, d_in)."""
    seen = {}

    def record(mod, inputs, output):
        seen["a"] = inputs[0].detach()[0]
        seen["shape"] = output.shape

    h = module.register_forward_hook(record)
    f0 = clf(x)[0].detach()
    h.remove()

    def f_of(eps):
        h = module.register_forward_hook(lambda m, i, o: o + eps)
        try:
            return clf(x)[0]
        finally:
            h.remove()

    J = torch.func.jacrev(f_of)(torch.zeros(seen["shape"], dtype=DT))[:, 0]
    return J, seen["a"], f0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_equal_definitions_on_padded_batches(family, approx):
    """Factors from a fit on mixed-length, left- and right-padded batches equal their
    definitions computed sequence by sequence without padding."""
    clf, _ = model_and_names(family)
    items = token_items(6, 7, seed=4, min_length=2)
    items = [left_pad(it) if i % 2 else it for i, it in enumerate(items)]
    N = len(items)
    la = LoRALaplace(clf, "classification", fisher_type="ggn", kfac_approx=approx, n_kfac=200,
                     lr_threshold=0)
    la.fit(torch.utils.data.DataLoader(DictDataset(items), batch_size=4))

    for block, F in zip(la.blocks, la.H_facs.kfacs):
        d_out, d_in = block.shape
        G_def = torch.zeros(d_out, d_out, dtype=DT)
        A_def = torch.zeros(d_in, d_in, dtype=DT)
        for it in items:
            keep = it["attention_mask"].bool()
            x = {"input_ids": it["input_ids"][keep][None], "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
            J, a, f0 = position_jacobians(clf, block.module, x)  # J: (C, T, d_out)
            Lam = loss_hessian(f0)
            T = a.shape[0]
            if approx == "expand":
                G_def += torch.einsum("cti,cd,dtj->ij", J, Lam, J)
                A_def += a.T @ a / (N * T)
            else:
                Js = J.sum(1)
                G_def += Js.T @ Lam @ Js
                A_def += torch.outer(a.mean(0), a.mean(0)) / N
        assert_rel_close(dense(F[0]), G_def)
        torch.testing.assert_close(dense(F[1]), A_def, rtol=1e-10, atol=1e-12)


def test_padding_does_not_change_the_fit():
    clf, _ = model_and_names("gpt2")
    items = token_items(5, 6, seed=8, min_length=2)
    fits = []
    for pad in (lambda it: it, left_pad):
        la = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=200)
        la.fit(torch.utils.data.DataLoader(DictDataset([pad(it) for it in items]), batch_size=5))
        fits.append(la)
    torch.testing.assert_close(fits[0].log_marginal_likelihood(), fits[1].log_marginal_likelihood())
    for F, G in zip(fits[0].H_facs.kfacs, fits[1].H_facs.kfacs):
        for f, g in zip(F, G):
            torch.testing.assert_close(dense(f), dense(g))
