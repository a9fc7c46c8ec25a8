"""Posterior and fit memory of one Llama-shaped LoRA layer pair at hidden size 4096."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from laplace_llm import LoRALaplace

D = 4096


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation allocates while active (views of
    existing tensors, such as the transposed base weight inside F.linear, are not
    allocations and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or in-place result: no new memory
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class QProj(nn.Module):
    """A q_proj-shaped layer (4096 → 4096) read out to 4 logits from its mean over tokens."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D, bias=False)
        self.readout = nn.Linear(D, 4, bias=False)

    def forward(self, x):
        return self.readout(torch.tanh(self.q_proj(x)).mean(1))


def test_posterior_of_a_4096_lora_pair_holds_under_one_percent_of_dense_factors():
    torch.manual_seed(0)
    model = get_peft_model(QProj(), LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    X = torch.randn(32, 16, D) / D**0.5 * 8
    loader = DataLoader(TensorDataset(X, torch.randint(0, 4, (32,))), batch_size=8)
    la = LoRALaplace(model, "classification", n_kfac=16)
    with LargestTensor() as probe:
        la.fit(loader)
    # dense K-FAC factors: lora_A's input factor and lora_B's output factor are 4096²,
    # plus the two 8×8 factors
    dense_bytes = 4 * (2 * D * D + 2 * 8 * 8)
    assert la.posterior_nbytes() < 0.01 * dense_bytes
    # no d×d matrix existed during fit: the largest allocation is the streaming root
    # just before a truncation, 4096 × (16 + 2·128) = 1114112 elements (measured), a
    # fifteenth of 4096²; the frozen base weight existed before fit and is not counted
    assert probe.largest <= D * (16 + 2 * 128) < D * D / 15


# ---------------------------------------------------------------- memory model
# laplace_llm.tools.memory.posterior_bytes against the bytes the posteriors really hold, on
# a small Llama with grouped-query attention (k/v narrower than q) and every factor
# kind: hidden 256 > lr_threshold (low-rank), intermediate 384, r = 4 (dense).

import pytest  # noqa: E402
from laplace import Laplace  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from laplace_llm import LLMClassifier  # noqa: E402
from laplace_llm.tools import memory  # noqa: E402
from tests.fixtures.batches import TARGET_IDS, token_loader  # noqa: E402
from tests.fixtures.models import add_lora  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2, vocab_size=100)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(targets):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    return LLMClassifier(add_lora(model, r=4, target_modules=targets), TARGET_IDS)


def tensor_bytes(ts):
    seen = {id(t): t for t in ts}
    return sum(t.numel() * t.element_size() for t in seen.values())


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEAR], ids=["qv", "all"])
@pytest.mark.parametrize("share", [True, False])
def test_posterior_bytes_formula_equals_measured_lora_laplace(targets, share):
    """Exact integer equality: the formula counts the tensors the fit keeps.

    The formula assumes the data span ``n_kfac`` directions of every factor. The last
    layer's query gradients are non-zero at the last position only (one column per
    sequence under ``fisher_type="mc"``), so the data set has more sequences (24) than
    ``n_kfac``."""
    clf = small_llama(targets)
    loader = token_loader(n=24, length=6, batch_size=8)
    for n_kfac in (8, 16):
        la = LoRALaplace(clf, "classification", n_kfac=n_kfac, share_input_factors=share)
        la.fit(loader)
        predicted = memory.posterior_bytes(SMALL, targets, r=4, n_kfac=n_kfac,
                                           share_input_factors=share)
        assert la.posterior_nbytes() == predicted


@pytest.mark.parametrize("structure", ["kron", "full", "diag"])
def test_posterior_bytes_formula_equals_measured_laplace_torch(structure):
    clf = small_llama(["q_proj", "v_proj"]) if structure != "full" else None
    if structure == "full":  # P² floats: a one-layer model keeps this small (P = 2048);
        # eager attention: the GGN of "full" uses forward-mode AD, which SDPA lacks on CPU
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        cfg = {**SMALL, "num_hidden_layers": 1}
        clf = LLMClassifier(
            add_lora(LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval(),
                     r=4, target_modules=["q_proj"]),
            TARGET_IDS,
        )
    la = Laplace(clf, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(token_loader(n=8, length=6, batch_size=4))
    if structure == "kron":
        ts = [t for F in la.H_facs.kfacs for t in F]
        ts += [t for qs, ls in zip(la.H.eigenvectors, la.H.eigenvalues) for t in (*qs, *ls)]
        predicted = memory.posterior_bytes(SMALL, ["q_proj", "v_proj"], r=4, method="kron")
    elif structure == "full":
        la.posterior_scale  # noqa: B018  (cached by the first prediction)
        ts = [la.H, la._posterior_scale]
        predicted = memory.posterior_bytes(cfg, ["q_proj"], r=4, method="full")
    else:
        ts = [la.H]
        predicted = memory.posterior_bytes(SMALL, ["q_proj", "v_proj"], r=4, method="diag")
    assert tensor_bytes(ts) == predicted


def test_posterior_bytes_formula_equals_measured_bayesian_lora():
    """bayesian-lora (the ``bench`` and ``dev`` extras) keeps roots ``s × n_kfac`` for
    sides ``≥ lr_threshold`` and Cholesky factors otherwise."""
    try:
        import bayesian_lora as bl
    except ImportError:
        pytest.fail("bayesian-lora is part of the dev extra: pip install -e '.[dev]'")
    clf = small_llama(["q_proj", "v_proj"])
    loader = token_loader(n=8, length=6, batch_size=4)
    factors = bl.calculate_kronecker_factors(
        clf, lambda m, b: m(b), loader, n_kfac=8, lr_threshold=128,
        target_module_keywords=["lora"],
    )
    factors = bl.cholesky_decompose_small_factors(factors, 128, "cpu", torch.float32)
    measured = tensor_bytes([t for pair in factors.values() for t in pair])
    assert measured == memory.posterior_bytes(
        SMALL, ["q_proj", "v_proj"], r=4, method="bayesian-lora", n_kfac=8
    )


def test_llama_2_shapes_in_the_memory_model():
    """LLaMA-2-7B, q and v, r = 8: 32 layers × 2 modules × 2·8·4096 = 4 194 304 LoRA
    parameters; LoRALaplace at n_kfac 16 holds per module 2·(4096·16·2 + 16) + 2·(2·64 + 8)
    floats with the q/v input factor shared."""
    cfg = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_hidden_layers=32)
    layers = memory.llama_lora_linears(cfg, ["q_proj", "v_proj"])
    assert sum(8 * (m.d_in + m.d_out) for m in layers) == 4_194_304
    assert memory.posterior_bytes(cfg, ["q_proj", "v_proj"], r=8, method="diag") == 4 * 4_194_304
    lr = 4096 * 16 * 2 + 16
    small = 2 * 64 + 8
    per_layer = 2 * (2 * small) + 3 * lr  # q: A, G_B; v: G_B (A shared)
    assert memory.posterior_bytes(cfg, ["q_proj", "v_proj"], r=8) == 4 * 32 * per_layer


def test_output_gradient_workspace_of_llama_2_7b():
    """Hand count: q and v of 32 layers, lora_A output 8 + lora_B output 4096 each, for
    2 sequences of 512 tokens, 4 probes, float32: 4·1024·64·4104·4 bytes = 4.0 GiB."""
    cfg = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_hidden_layers=32)
    got = memory.output_gradient_bytes(cfg, ["q_proj", "v_proj"], r=8, tokens=1024, n_probes=4)
    assert got == 4 * 1024 * 64 * (8 + 4096) * 4
    # C = 1,000 ggn probes run 16 at a time (PROBE_CHUNK): 16 probes' gradients at once
    many = memory.output_gradient_bytes(cfg, ["q_proj", "v_proj"], r=8, tokens=1024,
                                        n_probes=1000)
    assert many == 16 * 1024 * 64 * (8 + 4096) * 4


@pytest.mark.parametrize("tied", [False, True])
def test_base_parameter_count_equals_a_built_llama(tied):
    """GQA shapes, tied or not: the count equals the parameters transformers allocates."""
    from transformers import LlamaForCausalLM

    cfg = dict(SMALL, tie_word_embeddings=tied)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    per_layer, outside = memory.base_parameter_count(cfg)
    layer0 = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())  # a tied head counts once
    assert (per_layer, SMALL["num_hidden_layers"] * per_layer + outside) == (layer0, total)


def test_fsdp_rank_bytes_of_llama_2_13b_by_hand():
    """LLaMA-2-13B (13.0 B parameters: 40 layers of 4·5120² + 3·5120·13824 + 2·5120 and
    2·32000·5120 + 5120 outside), q and v at r = 8 (6 553 600 LoRA weights), 4 ranks,
    2 × 512 tokens: the bf16 shards, two gathered layers plus the root, and the
    activations of each phase as the docstring's assumptions give them."""
    cfg = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
               num_hidden_layers=40)
    h, T, P = 5120, 1024, 6_553_600
    layer = 4 * h * h + 3 * h * 13824 + 2 * h
    outside = 2 * 32000 * h + h
    n_base = 40 * layer + outside
    assert n_base == 13_015_864_320
    train = memory.fsdp_rank_bytes(cfg, ["q_proj", "v_proj"], 8, world=4, tokens=T, phase="train")
    fit = memory.fsdp_rank_bytes(cfg, ["q_proj", "v_proj"], 8, world=4, tokens=T, phase="fit")
    shards = 2 * n_base // 4 + 4 * P // 4
    assert train["shards"] == fit["shards"] == shards
    assert train["gathered"] == fit["gathered"] == 2 * (2 * layer + outside)
    assert train["activations"] == 40 * 2 * T * h + 34 * T * h  # checkpointed inputs + one layer
    assert train["optimizer"] == 3 * 4 * P // 4 and train["logits"] == T * 32000 * 4
    assert fit["activations"] == 40 * 34 * T * h  # eval mode: no checkpointing
    laplace = (memory.posterior_bytes(cfg, ["q_proj", "v_proj"], 8) + 4 * P
               + 1 * T * 80 * (8 + h) * 4)
    assert fit["laplace"] == laplace
    assert fit["total"] == shards + 2 * (2 * layer + outside) + 40 * 34 * T * h + laplace
    # the shards shrink with the ranks; the gathered layers and the posterior do not
    eight = memory.fsdp_rank_bytes(cfg, ["q_proj", "v_proj"], 8, world=8, tokens=T, phase="fit")
    assert eight["total"] == fit["total"] - (shards - (2 * n_base // 8 + 4 * P // 8))
