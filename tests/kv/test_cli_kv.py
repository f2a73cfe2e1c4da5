from __future__ import annotations

import pytest

from qins.cli import build_parser, main
from qins.kv import KVConfig


def test_flags_parse_to_config():
    from qins.cli import _kv_config
    a = build_parser().parse_args(["generate", "m", "hi", "--kv-bits", "8,4", "--kv-residual", "0",
                                   "--kv-page-kb", "16"])
    assert _kv_config(a) == KVConfig(k_bits=8, v_bits=4, residual=0, page_kb=16)
    a = build_parser().parse_args(["eval", "--kv-bits", "4"])
    assert _kv_config(a) == KVConfig(k_bits=4)
    assert _kv_config(build_parser().parse_args(["eval"])) is None
    a = build_parser().parse_args(["eval", "--kv-bits", "4", "--kv-prerope", "--kv-rotate-values"])
    assert _kv_config(a) == KVConfig(k_bits=4, k_prerope=True, v_rotate=True)


@pytest.mark.parametrize("flags", [["--kv-bits", "7"], ["--kv-bits", "4", "--kv-page-kb", "8"],
                                   ["--kv-bits", "4,4,4"], ["--kv-residual", "3"], ["--kv-prerope"],
                                   ["--kv-rotate-values"], ["--kv-bits", "4", "--kv-plan-out", "plan.json"],
                                   ["--kv-bits", "4", "--kv-plan", "sampled", "--kv-plan-out", "/no/such/dir/p.json"],
                                   ["--kv-plan", "sampled"]])
def test_bad_flags_fail_before_loading(flags, capsys):
    assert main(["generate", "/nonexistent-model", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "not found" not in err
