"""The consumer commands answer `--help` without the training stack."""

from __future__ import annotations

import pytest
from test_export import heavy_imports_of_help


@pytest.mark.parametrize("module", ["clickvec.stream.consumers.alerts", "clickvec.stream.consumers.recommend"])
def test_consumer_help_imports_neither_torch_nor_onnx(module):
    assert heavy_imports_of_help(module) == []
