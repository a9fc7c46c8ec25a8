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
