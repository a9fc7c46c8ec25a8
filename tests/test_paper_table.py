"""benchmarks/paper_table.py on the real SmolLM2 (installed by .ci/run): the quick run writes
every (set, seed, method) row, the rows agree with their own probabilities, a second run
resumes without redoing anything, and the deep ensemble is rendered from the seeds' MAPs."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from laplace_llm.tools import metrics

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_table.py"


def load_script(name: str = "paper_table.py"):
    path = SCRIPT.parent / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # its shared helpers sit beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_centred_moments_are_the_moments_of_the_centred_logits():
    pt = load_script()
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2)
    samples = mu + torch.einsum("bij,sbj->sbi", torch.linalg.cholesky(cov),
                                torch.randn(200_000, 3, 4, generator=gen, dtype=torch.float64))
    centred = samples - pt.CENTER * samples.mean(-1, keepdim=True)
    m, c = pt.centred(mu, cov)
    torch.testing.assert_close(m, mu - pt.CENTER * mu.mean(-1, keepdim=True))
    emp = torch.einsum("sbi,sbj->bij", centred - m, centred - m) / len(samples)
    torch.testing.assert_close(c, emp, rtol=0, atol=0.05 * float(cov.abs().max()))
    # softmax ignores the offset: MC of centred and raw moments agree
    torch.testing.assert_close(pt.monte_carlo(m, c + 1e-9 * torch.eye(4), 20_000, 0),
                               pt.monte_carlo(mu, cov, 20_000, 0), rtol=0, atol=0.02)


def test_contrasts_make_the_probit_blind_to_a_common_offset():
    """predictive_agreement's full centring: adding a random common offset to every logit
    (mean shift and its variance along 1) changes laplace-torch's probit, but neither the
    contrasts' probit nor the exact (MC) predictive, which it leaves unchanged."""
    agreement = load_script("predictive_agreement.py")
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(64, 4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.1 * torch.eye(4, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    mu_s = mu - 20.0  # a large common offset with a large variance, as summed scores have
    cov_s = cov + 50.0 * torch.outer(ones, ones)
    assert not torch.allclose(agreement.probit(mu, cov), agreement.probit(mu_s, cov_s), atol=0.05)
    torch.testing.assert_close(agreement.probit(*agreement.centre(mu, cov, 1.0)),
                               agreement.probit(*agreement.centre(mu_s, cov_s, 1.0)))
    # the exact predictive ignores the offset (same normal draws, both factorisations
    # exact): Monte Carlo of the raw and the shifted moments agree to sampling error
    torch.testing.assert_close(agreement.monte_carlo(mu, cov, 40_000, 0),
                               agreement.monte_carlo(mu_s, cov_s, 40_000, 0), rtol=0, atol=0.02)


@pytest.mark.slow  # SmolLM2 on 16/8/16 questions, every method: ~3-5 min on 2 cores
def test_quick_run_writes_every_row_resumes_and_renders_a_deep_ensemble(tmp_path):
    pt = load_script()
    out, work = tmp_path / "out", tmp_path / "work"
    pt.main(["--quick", "--out", str(out), "--work", str(work)])
    rows = pt.load_rows(out)["openbookqa"][0]
    assert set(rows) == set(pt.METHODS) - {"deep_ensemble"}
    for row in rows.values():
        probs = torch.tensor(row["probs"]["test"], dtype=torch.float64)  # as written
        labels = torch.tensor(row["labels"]["test"])
        assert len(labels) == 16
        # the stored metrics are those of the stored probabilities
        assert row["test"]["accuracy"] == pytest.approx(metrics.accuracy(probs, labels))
        assert row["test"]["nll"] == pytest.approx(metrics.nll(probs, labels), rel=1e-5)
        assert "shift" in row and 0.0 <= row["ood_auroc"] <= 1.0
        torch.testing.assert_close(probs.sum(-1), torch.ones(16, dtype=probs.dtype),
                                   rtol=0, atol=1e-5)
    # one curvature, three priors: laplace-torch's evidence row uses its own prior
    assert rows["la_map_probit"]["prior"] == rows["la_map_mc"]["prior"]
    assert 0.0 <= rows["la_map_mc"]["mc_agrees_with_probit"] <= 1.0

    # the exported GLM moments are the ones the rows were computed from
    from safetensors import safe_open

    with safe_open(out / "openbookqa" / "seed0" / "glm_moments.safetensors", "pt") as f:
        k = f.metadata()["priors"].split(",").index("map")
        for split in ("test", "shift", "ood"):
            mu, cov = f.get_tensor(f"{split}.mean")[k], f.get_tensor(f"{split}.cov")[k]
            torch.testing.assert_close(
                pt.probit(mu, cov),
                torch.tensor(rows["la_map_probit"]["probs"][split], dtype=torch.float64),
                rtol=0, atol=1e-12)
    agreement = load_script("predictive_agreement.py")
    agreement.main(["--results", str(out), "--reference-samples", "20000"])
    measured = json.loads((out / "predictive_agreement.json").read_text())
    assert [(r["set"], r["seed"]) for r in measured] == [("openbookqa", 0)]
    # same moments, same 1,000-sample draw as the row: the same agreement
    assert measured[0]["probit_mc"] == rows["la_map_mc"]["mc_agrees_with_probit"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    pt.main(["--quick", "--out", str(out), "--work", str(work)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps

    # a second seed with the same MAP: the deep ensemble equals that MAP
    shutil.copytree(out / "openbookqa" / "seed0", out / "openbookqa" / "seed1")
    for path in (out / "openbookqa" / "seed1").glob("*.json"):
        row = json.loads(path.read_text())
        row["seed"] = 1
        path.write_text(json.dumps(row))
    table = pt.render(out)
    line = next(x for x in table.splitlines() if x.startswith("| Deep ensemble"))
    acc = 100 * rows["map"]["test"]["accuracy"]
    assert f"| 2 members | {acc:.1f} |" in line
    map_probs = np.array(rows["map"]["probs"]["test"])
    assert pt.deep_ensemble(pt.load_rows(out)["openbookqa"])["test"]["nll"] == pytest.approx(
        metrics.nll(torch.tensor(map_probs), torch.tensor(rows["map"]["labels"]["test"])))
