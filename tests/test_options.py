"""KFACOptions: defaults written once, validation, and every place that derives from it."""

import dataclasses
import json

import pytest
from safetensors import safe_open

from laplace_llm import FisherType, KFACApprox, KFACOptions, LLMClassifier, LoRALaplace
from laplace_llm.app.cli import build_parser
from laplace_llm.app.demo import DemoConfig
from laplace_llm.options import from_arguments
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_llama_lora

DEFAULTS = {"n_kfac": 16, "lr_threshold": 128, "fisher_type": "mc", "mc_samples": 1,
            "kfac_approx": "expand", "truncation": "isotropic", "share_input_factors": True,
            "evidence": "map", "accumulation": "sketch", "sketch_size": 0, "sketch_seed": 0,
            "sketch_adapt": -1, "sketch_readapt": True}


def test_defaults_are_the_documented_ones_and_plain_json():
    options = KFACOptions()
    assert options.to_dict() == DEFAULTS
    # str enums: equal to their strings, and JSON writes the plain value
    assert options.fisher_type == "mc" and options.fisher_type is FisherType.MC
    assert options.kfac_approx == "expand" and options.kfac_approx is KFACApprox.EXPAND
    assert json.loads(json.dumps(options.to_dict())) == DEFAULTS
    assert all(type(v) in (bool, int, str) for v in options.to_dict().values())
    assert KFACOptions.from_dict({**DEFAULTS, "not an option": 1}) == options


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_kfac": 0}, "n_kfac must be an integer ≥ 1; got 0"),
        ({"lr_threshold": -1}, "lr_threshold must be an integer ≥ 0"),
        ({"mc_samples": True}, "mc_samples must be an integer ≥ 1; got True"),
        ({"fisher_type": "hessian"}, r"fisher_type must be one of \('mc', 'ggn', 'ef'\)"),
        ({"kfac_approx": "mean"}, r"kfac_approx must be one of \('expand', 'reduce'\)"),
        ({"accumulation": "svd"}, r"accumulation must be one of \('sketch', 'truncate'\)"),
        ({"n_kfac": 32, "sketch_size": 20}, "sketch_size=20 is below n_kfac=32"),
        ({"sketch_seed": -1}, "sketch_seed must be an integer ≥ 0"),
        ({"sketch_adapt": -2}, "sketch_adapt must be an integer ≥ -1"),
        ({"sketch_adapt": 96}, "sketch_adapt=96 must be below the sketch's 96 columns"),
        ({"sketch_size": 40, "sketch_adapt": 40}, "sketch_adapt=40 must be below the sketch's 40"),
    ],
)
def test_invalid_options_are_refused_on_construction_and_replace(changes, message):
    with pytest.raises(ValueError, match=message):
        KFACOptions(**changes)
    with pytest.raises(ValueError, match=message):
        KFACOptions().replace(**changes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        KFACOptions().n_kfac = 3


def test_laplace_and_backend_take_the_options_as_keywords_or_one_object():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    default = LoRALaplace(clf, "classification")
    assert default.options == KFACOptions()
    assert default.backend.options is default.options
    la = LoRALaplace(clf, "classification", n_kfac=3, fisher_type="ggn")
    assert la.options == KFACOptions(n_kfac=3, fisher_type=FisherType.GGN)
    assert (la.n_kfac, la.fisher_type, la.backend.n_kfac) == (3, "ggn", 3)
    same = LoRALaplace(clf, "classification", options=la.options)
    assert same.options == la.options
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['n_kfacs'\].*n_kfac"):
        LoRALaplace(clf, "classification", n_kfacs=3)


def test_cli_demo_and_posterior_header_agree_with_the_defaults(tmp_path):
    """Each default is written once, in KFACOptions; the CLI's `fit`, the demo and the
    file header derive from it."""
    args = build_parser().parse_args(["fit", "--model", "m", "--data", "d", "--posterior", "p"])
    assert from_arguments(args) == KFACOptions()
    for name in KFACOptions.names():
        assert vars(args)[name] == DEFAULTS[name]
    assert DemoConfig().kfac == KFACOptions() == DemoConfig.quick().kfac

    la = LoRALaplace(LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS), "classification")
    la.fit(token_loader(n=6, length=5))
    path = tmp_path / "post.safetensors"
    la.save(path)
    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["laplace_llm"])
    assert header["options"] == DEFAULTS
    assert la.state_dict()["options"] == DEFAULTS
    assert LoRALaplace.load(path, la.model).options == KFACOptions()


def test_cli_options_parse_into_kfac_options():
    args = build_parser().parse_args([
        "fit", "--model", "m", "--data", "d", "--posterior", "p", "--n-kfac", "4",
        "--lr-threshold", "0", "--fisher-type", "ef", "--mc-samples", "3",
        "--kfac-approx", "reduce",
    ])
    assert from_arguments(args) == KFACOptions(
        n_kfac=4, lr_threshold=0, fisher_type="ef", mc_samples=3, kfac_approx="reduce"
    )


def test_a_bool_or_float_option_is_one_field():
    """Other option kinds than ints and choices (for options still to come) are checked
    and parsed from their default's type alone."""
    import argparse

    from laplace_llm.options import _option, add_arguments

    @dataclasses.dataclass(frozen=True)
    class More(KFACOptions):
        flag: bool = dataclasses.field(default=False, metadata=_option("a switch"))
        share: float = dataclasses.field(default=0.5, metadata=_option("a share", 0.0))

    assert More(flag=True, share=0.25).to_dict() == {**DEFAULTS, "flag": True, "share": 0.25}
    with pytest.raises(ValueError, match="flag must be True or False; got 1"):
        More(flag=1)
    with pytest.raises(ValueError, match=r"share must be a finite number ≥ 0.0; got -1.0"):
        More(share=-1.0)
    parser = argparse.ArgumentParser()
    add_arguments(parser, More)
    args = parser.parse_args(["--flag", "--share", "0.75", "--n-kfac", "2"])
    assert from_arguments(args, More) == More(flag=True, share=0.75, n_kfac=2)
    assert from_arguments(parser.parse_args([]), More) == More()
