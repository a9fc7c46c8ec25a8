"""Posterior files: round trip, wrong model, truncation, corruption, pickles refused."""

import pickle

import pytest
import torch

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.serialization import PosteriorFileError
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_gpt2_lora, tiny_llama_lora


@pytest.fixture(scope="module")
def fitted():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    la = LoRALaplace(clf, "classification", n_kfac=3, lr_threshold=8, fisher_type="ggn")
    la.fit(token_loader(n=10, length=6))
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=20)
    return la


def test_round_trip_gives_the_same_posterior(fitted, tmp_path):
    path = tmp_path / "post.safetensors"
    fitted.save(path)
    loaded = LoRALaplace.load(path, fitted.model)
    batch = next(iter(token_loader(n=3, length=6, seed=2)))
    torch.testing.assert_close(loaded(batch), fitted(batch), rtol=0, atol=0)
    torch.testing.assert_close(loaded.prior_precision, fitted.prior_precision, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.log_marginal_likelihood(), fitted.log_marginal_likelihood(), rtol=0, atol=0
    )
    assert (loaded.n_kfac, loaded.lr_threshold, loaded.fisher_type) == (3, 8, "ggn")


def test_file_of_another_model_is_refused(fitted, tmp_path):
    path = tmp_path / "post.safetensors"
    fitted.save(path)
    other = LLMClassifier(tiny_gpt2_lora(seed=0), TARGET_IDS)
    with pytest.raises(PosteriorFileError, match="fitted on another model"):
        LoRALaplace.load(path, other)
    same_shape = LLMClassifier(tiny_llama_lora(seed=5), TARGET_IDS)
    with pytest.raises(PosteriorFileError, match="other LoRA weights"):
        LoRALaplace.load(path, same_shape)
    LoRALaplace.load(path, same_shape, check_weights=False)  # on purpose: allowed


def test_truncated_file_is_refused(fitted, tmp_path):
    path = tmp_path / "post.safetensors"
    fitted.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(PosteriorFileError, match="not a readable"):
        LoRALaplace.load(path, fitted.model)


def test_corrupted_tensor_bytes_are_detected(fitted, tmp_path):
    path = tmp_path / "post.safetensors"
    fitted.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(PosteriorFileError, match="checksum mismatch"):
        LoRALaplace.load(path, fitted.model)


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle executed')",))


def test_pickle_is_refused_without_executing_it(fitted, tmp_path):
    path = tmp_path / "post.safetensors"
    with open(path, "wb") as fh:
        pickle.dump({"mean": Boom()}, fh)
    with pytest.raises(PosteriorFileError, match="never pickles"):
        LoRALaplace.load(path, fitted.model)
    torch.save({"H": Boom()}, path)
    with pytest.raises(PosteriorFileError):
        LoRALaplace.load(path, fitted.model)


def test_laplace_torch_state_dict_loads_with_weights_only(fitted, tmp_path):
    """laplace-torch's state_dict path keeps working, and holds only tensors and plain
    types, so torch.load(weights_only=True) reads it."""
    path = tmp_path / "state.pt"
    torch.save(fitted.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = LoRALaplace(fitted.model, "classification", n_kfac=3, lr_threshold=8)
    other.load_state_dict(state)
    batch = next(iter(token_loader(n=3, length=6, seed=2)))
    torch.testing.assert_close(other(batch), fitted(batch))


def test_files_of_the_first_release_still_load(fitted, tmp_path):
    """Version-1 files written before the header carried laplace-torch's sigma_noise,
    enable_backprop and cls_name load with their defaults, to the same posterior."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "post.safetensors"
    fitted.save(path)
    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["laplace_llm"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for key in ("sigma_noise", "enable_backprop", "cls_name"):
        del header[key]
    save_file(tensors, str(path), metadata={"laplace_llm": json.dumps(header)})
    loaded = LoRALaplace.load(path, fitted.model)
    batch = next(iter(token_loader(n=3, length=6, seed=2)))
    torch.testing.assert_close(loaded(batch), fitted(batch), rtol=0, atol=0)
    assert loaded.options == fitted.options


def _without_option(path, name):
    """Rewrite a posterior file as one written before option ``name`` existed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["laplace_llm"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    del header["options"][name]
    save_file(tensors, str(path), metadata={"laplace_llm": json.dumps(header)})


def test_files_without_truncation_option_keep_their_meaning(tmp_path):
    """Files written before ``truncation`` existed were fitted with truncated directions
    left to the prior; they load as ``truncation="prior"``, to the same predictions."""
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    la = LoRALaplace(clf, "classification", n_kfac=3, lr_threshold=8, fisher_type="ggn",
                     truncation="prior", prior_precision=0.5)
    la.fit(token_loader(n=10, length=6))
    path = tmp_path / "post.safetensors"
    la.save(path)
    _without_option(path, "truncation")
    loaded = LoRALaplace.load(path, clf)
    assert loaded.truncation == "prior"
    batch = next(iter(token_loader(n=3, length=6, seed=2)))
    torch.testing.assert_close(loaded(batch), la(batch), rtol=0, atol=0)
    isotropic = LoRALaplace.load(path, clf, truncation="isotropic")
    assert not torch.equal(isotropic(batch), la(batch))


def test_files_without_evidence_option_keep_their_meaning(tmp_path):
    """Files written before ``evidence`` existed hold a prior chosen by laplace-torch's
    evidence; they load as ``evidence="map"``, to the same evidence."""
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    la = LoRALaplace(clf, "classification", n_kfac=3, lr_threshold=8, fisher_type="ggn",
                     evidence="map", prior_precision=0.5)
    la.fit(token_loader(n=10, length=6))
    path = tmp_path / "post.safetensors"
    la.save(path)
    _without_option(path, "evidence")
    loaded = LoRALaplace.load(path, clf)
    assert loaded.evidence == "map"
    torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               rtol=0, atol=0)
    linearised = LoRALaplace.load(path, clf, evidence="linearised")
    assert linearised.log_marginal_likelihood() > la.log_marginal_likelihood()


def test_files_that_record_the_linearised_evidence_keep_it(tmp_path):
    """A posterior saved with ``evidence="linearised"`` loads with it, whatever the
    default, to the same evidence."""
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    la = LoRALaplace(clf, "classification", n_kfac=3, lr_threshold=8, fisher_type="ggn",
                     evidence="linearised", prior_precision=0.5)
    la.fit(token_loader(n=10, length=6))
    path = la.save(tmp_path / "post.safetensors")
    loaded = LoRALaplace.load(path, clf)
    assert loaded.evidence == "linearised"
    torch.testing.assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               rtol=0, atol=0)


def test_a_folder_means_its_posterior_file(fitted, tmp_path):
    """save(folder) writes POSTERIOR_FILENAME inside; load(folder) finds it; an empty
    folder is named in the error."""
    from laplace_llm.serialization import POSTERIOR_FILENAME

    path = fitted.save(tmp_path)
    assert path == tmp_path / POSTERIOR_FILENAME and path.is_file()
    loaded = LoRALaplace.load(tmp_path, fitted.model)
    batch = next(iter(token_loader(n=3, length=6, seed=2)))
    torch.testing.assert_close(loaded(batch), fitted(batch), rtol=0, atol=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no posterior"):
        LoRALaplace.load(empty, fitted.model)


def test_saving_over_another_models_posterior_or_an_adapter_is_refused(fitted, tmp_path):
    """Nothing is written: the other file keeps its bytes. The same model's posterior is
    replaced (a refit after more training)."""
    other = LoRALaplace(LLMClassifier(tiny_gpt2_lora(seed=0), TARGET_IDS), "classification",
                        n_kfac=3, lr_threshold=8)
    other.fit(token_loader(n=4, length=6))
    path = other.save(tmp_path)
    before = path.read_bytes()
    with pytest.raises(PosteriorFileError, match="posterior of another model"):
        fitted.save(tmp_path)
    assert path.read_bytes() == before

    adapter = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(adapter))
    weights = adapter.read_bytes()
    with pytest.raises(PosteriorFileError, match="not a readable laplace-llm posterior"):
        fitted.save(adapter)
    assert adapter.read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, adapter.name])

    mine = tmp_path / "mine.safetensors"
    fitted.save(mine)
    fitted.save(mine)  # same blocks: allowed
    LoRALaplace.load(mine, fitted.model)
