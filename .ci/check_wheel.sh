#!/usr/bin/env bash
# Build the sdist and the wheel, install the wheel alone into a clean virtual environment
# and check it works there: the import, the laplace-torch registration, the console script
# and the demo's shipped base weights (laplace-torch's users once got a wheel without its
# package). Usage: .ci/check_wheel.sh [PYTHON]; PYTHON (default: python) is the CI venv's
# interpreter, whose site-packages lend the dependencies.
#
# The dependencies (torch and the rest, GBs) are not installed again: a .pth file in the
# new venv adds the CI venv's site-packages directory to sys.path. Python does not process
# the .pth files of a directory added that way, so the editable install of the checkout
# (a .pth file there) stays inactive, and the checks run from an empty temporary folder,
# so the checkout is not on sys.path either; laplace_llm.__file__ must lie in the new venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python}
# nothing but the new venv and the lent site-packages may provide laplace_llm
unset PYTHONPATH
rm -rf dist
"$PYTHON" -m build --sdist --wheel --outdir dist . >/tmp/laplace_llm_build.log 2>&1 \
    || { tail -40 /tmp/laplace_llm_build.log; exit 1; }
ls dist/*.tar.gz dist/*.whl
wheel=$(ls dist/*.whl)
"$PYTHON" - "$wheel" <<'PY'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "laplace_llm/__init__.py" in names, "the wheel lacks the package"
bases = [n for n in names if n.startswith("laplace_llm/app/demo_bases/") and n.endswith(".safetensors")]
assert bases, "the wheel lacks laplace_llm/app/demo_bases/*.safetensors"
PY

env_dir=$(mktemp -d /tmp/wheelenv.XXXXXX)
work=$(mktemp -d /tmp/wheelcheck.XXXXXX)
trap 'rm -rf "$env_dir" "$work"' EXIT
"$PYTHON" -m venv "$env_dir"   # no --system-site-packages
"$env_dir/bin/python" -m pip install -q --no-deps --no-index "$wheel"
deps=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$deps" > "$site/_ci_dependencies.pth"

cd "$work"
"$env_dir/bin/python" - "$env_dir" <<'PY'
import importlib.metadata
import sys
from pathlib import Path

env = Path(sys.argv[1]).resolve()
import laplace_llm  # noqa: E402
from laplace import Laplace  # noqa: E402, F401

where = Path(laplace_llm.__file__).resolve()
assert env in where.parents, f"laplace_llm imported from {where}, not from the wheel in {env}"
assert laplace_llm.__version__ == importlib.metadata.version("laplace-llm"), (
    laplace_llm.__version__, importlib.metadata.version("laplace-llm"))


# the factory finds the three classes by their keys (a tiny peft model, built offline)
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"]))
for structure, cls in [("kron", laplace_llm.LoRALaplace), ("diag", laplace_llm.LoRADiagLaplace),
                       ("full", laplace_llm.LoRAFullLaplace)]:
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure)
    assert type(la) is cls, (structure, type(la))

# the demo's default configuration finds its shipped base weights inside the wheel
from laplace_llm.app.demo import BASES, DemoConfig, _task, pretraining_key  # noqa: E402

cfg = DemoConfig()
assert env in BASES.resolve().parents, BASES
default = BASES / f"{pretraining_key(cfg, _task(cfg))}.safetensors"
assert default.is_file(), f"the demo's default base {default.name} is not in the wheel"
bases = sorted(BASES.glob("*.safetensors"))
print(f"wheel OK: laplace_llm {laplace_llm.__version__} from {where.parent}; "
      f"{len(bases)} demo bases; lora registered for kron, diag, full; the default demo base is there")
PY
"$env_dir/bin/laplace-llm" --help >/dev/null
"$env_dir/bin/laplace-llm" demo --help >/dev/null
echo "laplace-llm --help runs from the wheel's console script"
