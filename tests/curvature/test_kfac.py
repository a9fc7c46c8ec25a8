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
from tests.fixtures.batches import TARGET_IDS, DictDataset, left_pad, token_items
from tests.fixtures.models import tiny_gpt2_lora, tiny_llama_lora

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


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shared_and_separate(lr_threshold, n_kfac, **fit_kwargs):
    model = LLMClassifier(tiny_llama_lora(seed=3, dtype=DT, target_modules=ALL_LINEAR), TARGET_IDS)
    loader = torch.utils.data.DataLoader(
        DictDataset(token_items(9, 7, seed=4, min_length=3)), batch_size=4
    )
    fits = []
    for share in (True, False):
        la = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=n_kfac,
                         lr_threshold=lr_threshold, share_input_factors=share, **fit_kwargs)
        la.fit(loader)
        fits.append(la)
    return model, loader, fits


def _same(a, b, bitwise):
    if bitwise:
        assert torch.equal(a, b)
    else:  # two sketches, each exact (s ≥ side), with their own Ω: float64 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("lr_threshold, accumulation", [(0, "truncate"), (0, "sketch"),
                                                         (128, "sketch")],
                         ids=["lowrank-truncate", "lowrank-sketch", "dense"])
def test_shared_input_factor_equals_separate_factors_at_full_rank(lr_threshold, accumulation):
    """q/k/v (and gate/up) lora_A read one input: one A factor object serves them all.

    The shared factor receives the very same columns as each separate one, in the same
    order, so with dense or truncated factors, factors, log det, evidence and GLM
    predictive must be *bit-equal*, not merely close; the bytes drop by exactly the
    duplicated factors and eigenpairs. Sketched factors each have their own Ω (issue 31):
    the separate factors of a group are sketched with other Ω than the shared one, and
    at full rank (s = 384 ≥ every side) both are exact, so they agree to float64
    rounding (tolerance 1e-10 relative, 1e-12 of the largest entry absolute).
    """
    _, _, (shared, separate) = shared_and_separate(lr_threshold, n_kfac=64,
                                                   accumulation=accumulation)
    bitwise = lr_threshold > 0 or accumulation == "truncate"
    blocks = shared.blocks
    reads = {"q_proj": "x", "k_proj": "x", "v_proj": "x", "o_proj": "attn", "gate_proj": "h",
             "up_proj": "h", "down_proj": "act"}  # which input each projection reads
    groups = {}
    for i, b in enumerate(blocks):
        if b.role == "lora_A" and b.kind == "weight":
            proj = b.module_name.split(".")[-3]
            layer = b.module_name.split(".layers.")[1].split(".")[0]
            groups.setdefault((layer, reads[proj]), []).append(i)
    # 2 layers × {q,k,v}, {gate,up}, {o}, {down}
    assert sorted(len(g) for g in groups.values()) == [1, 1, 1, 1, 2, 2, 3, 3]
    for g in groups.values():
        objs = {id(shared.H_facs.kfacs[i][1]) for i in g}
        assert len(objs) == 1
        assert len({id(separate.H_facs.kfacs[i][1]) for i in g}) == len(g)
    for F, G in zip(shared.H_facs.kfacs, separate.H_facs.kfacs, strict=True):
        for f, g in zip(F, G):
            _same(dense(f), dense(g), bitwise)
    _same(shared.log_marginal_likelihood(), separate.log_marginal_likelihood(), bitwise)
    batch = next(iter(torch.utils.data.DataLoader(DictDataset(token_items(3, 7, seed=8)), batch_size=3)))
    _same(shared(batch), separate(batch), bitwise)
    f_s, v_s = shared._glm_predictive_distribution(batch)
    f_p, v_p = separate._glm_predictive_distribution(batch)
    _same(v_s, v_p, bitwise)
    # bytes: each group of g members saves (g − 1) input factors and their eigenpairs
    d = blocks[0].shape[1]
    per_A = (d * min(64, d) * 8) if lr_threshold == 0 else d * d * 8  # root / dense
    per_eig = (d * d + d) * 8  # full rank: Q (d × d) and λ (d)
    saved = sum(len(g) - 1 for g in groups.values()) * (per_A + per_eig)
    assert separate.posterior_nbytes() - shared.posterior_nbytes() == saved


def test_shared_input_factor_survives_save_load_and_adding_fits(tmp_path):
    """The file stores a shared factor once; loading and ``fit(override=False)`` keep it
    shared and the posterior equal. Tolerance 1e-12 relative (float64): the file holds
    contiguous copies of the roots, and a matmul of a contiguous root rounds differently
    from one of the strided original."""
    model, loader, (shared, separate) = shared_and_separate(0, n_kfac=64)
    shared.save(tmp_path / "p.safetensors")
    back = LoRALaplace.load(tmp_path / "p.safetensors", model)
    from laplace_llm.serialization import read_posterior

    header, tensors = read_posterior(tmp_path / "p.safetensors")
    assert len(header["shared"]) == 2 * (2 + 1)  # per layer: k, v (to q) and up (to gate)
    stored = sum(k.startswith("H.") and k.endswith((".root", ".dense")) for k in tensors)
    assert stored == sum(len(F) for F in shared.H_facs.kfacs) - 6
    for F, G in zip(back.H_facs.kfacs, shared.H_facs.kfacs):
        for f, g in zip(F, G):
            torch.testing.assert_close(dense(f), dense(g), rtol=1e-12, atol=1e-16)
    assert len({id(F[1]) for F in back.H_facs.kfacs if len(F) == 2}) == len(
        {id(F[1]) for F in shared.H_facs.kfacs if len(F) == 2}
    )
    torch.testing.assert_close(
        back.log_marginal_likelihood(), shared.log_marginal_likelihood(), rtol=1e-12, atol=0
    )
    for la in (shared, separate):
        la.fit(loader, override=False)
    for F, G in zip(shared.H_facs.kfacs, separate.H_facs.kfacs):
        for f, g in zip(F, G):
            torch.testing.assert_close(dense(f), dense(g), rtol=1e-12, atol=1e-14)
    assert shared.H_facs.kfacs[0][1] is shared.H_facs.kfacs[2][1]  # q.lora_A, k.lora_A


def test_bf16_model_shares_the_input_factor_of_equal_float32_copies():
    """peft casts a bf16 layer input to its float32 adapters once per adapter, so q/k/v
    read *equal* copies, not one tensor: they still share one input factor, and the fit
    is bit-equal to separate factors (the same columns in the same order; truncated
    factors, as sketched ones have an Ω per factor, see the test above)."""
    from peft import LoraConfig, get_peft_model

    from tests.fixtures.models import tiny_causal_lm

    base = tiny_causal_lm("llama", seed=5, dtype=torch.bfloat16)
    torch.manual_seed(5)
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    model = LLMClassifier(get_peft_model(base, config).eval(), TARGET_IDS)
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_A" in n}
    assert lora_dtypes == {torch.float32}  # what makes the copies
    loader = torch.utils.data.DataLoader(DictDataset(token_items(8, 6, seed=6)), batch_size=4)
    fits = []
    for share in (True, False):
        la = LoRALaplace(model, "classification", n_kfac=64, lr_threshold=0, seed=0,
                         share_input_factors=share, accumulation="truncate")
        la.fit(loader)
        fits.append(la)
    shared, separate = fits
    kfacs = shared.H_facs.kfacs
    a_blocks = [i for i, b in enumerate(shared.blocks) if b.role == "lora_A"]
    assert len({id(kfacs[i][1]) for i in a_blocks}) == 2  # one per layer
    for F, G in zip(kfacs, separate.H_facs.kfacs):
        for f, g in zip(F, G):
            assert torch.equal(dense(f), dense(g))
    assert torch.equal(shared.log_marginal_likelihood(), separate.log_marginal_likelihood())


def test_queued_truncations_give_the_fit_of_one_factor_at_a_time(monkeypatch):
    """Low-rank factors are appended together (their truncations share eigh calls);
    a queue of 1 byte appends each factor as soon as its columns exist, as before.
    Both go through the same truncations, so the curvature is the same."""
    from laplace_llm.curvature import kfac_accumulation as curvature

    model = LLMClassifier(tiny_llama_lora(seed=3, dtype=DT, target_modules=ALL_LINEAR), TARGET_IDS)
    loader = torch.utils.data.DataLoader(
        DictDataset(token_items(9, 7, seed=4, min_length=3)), batch_size=4
    )
    fits = []
    for queue in (curvature.QUEUE_BYTES, 1):
        monkeypatch.setattr(curvature, "QUEUE_BYTES", queue)
        la = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=3, lr_threshold=0,
                         prior_precision=0.7)
        la.fit(loader)
        fits.append(la)
    # the same precision: the same products with random vectors and the same evidence
    V = torch.randn(5, fits[0].n_params, generator=torch.Generator().manual_seed(0), dtype=DT)
    a, b = (la.posterior_precision.bmm(V, exponent=1) for la in fits)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fits[0].log_marginal_likelihood(),
                               fits[1].log_marginal_likelihood(), rtol=1e-12, atol=0)
    # (sanity) truncation happened: the data give more directions than n_kfac = 3
    assert any(r.share_kept < 1 - 1e-6 for r in fits[0].low_rank_report())


def test_zero_rows_skip_the_sketch_but_non_finite_rows_reach_its_trace():
    """Rows of exactly zero add nothing to a sketched factor and are left out of its
    products (a last layer's query has output gradients at the read position only); a
    row holding NaN must stay in, so that the factor's exact trace shows it."""
    from laplace_llm.curvature.kfac_accumulation import _accumulate, _ColumnQueue

    gen = torch.Generator().manual_seed(0)
    cols = torch.zeros(10, 32, dtype=torch.float64)
    cols[3] = torch.randn(32, generator=gen, dtype=torch.float64)
    F = LowRankFactor.zeros(32, 4, dtype=torch.float64, sketch_size=16)
    _accumulate(F, cols, _ColumnQueue(), 0.5, [])
    ref = LowRankFactor.zeros(32, 4, dtype=torch.float64, sketch_size=16)
    ref.append_(cols[3:4].T, scale=0.5)
    torch.testing.assert_close(F.sketch(), ref.sketch())
    torch.testing.assert_close(F.exact_trace, 0.5 * cols[3].square().sum())
    cols[7, 0] = float("nan")
    _accumulate(F, cols, _ColumnQueue(), 1.0, [])
    assert torch.isnan(F.exact_trace)
